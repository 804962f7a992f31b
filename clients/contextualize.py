"""The contextualize phase's model and a client's local work on it: the federated Enc strategy
(User-LLM, Ning, Liu et al., 2024, §3).

The model is a `UserLLM` whose LLM is frozen. Clients train the user encoder, the projection and the
cross-attention blocks (or the soft prompt) on their own task examples, and only those tensors cross the
network: the wire format of `fed_userllm.clients.task` (an ArrayRecord of exactly the trainable parameters),
so user-level DP-FedAvg clips and noises exactly them. The LLM is loaded once per process (a simulation
worker serves many clients, one at a time) and never sent. Every message overwrites all trainable tensors
first, so one model object serves every client of the process; the server builds the same model to start
the phase from the pretrained encoder and to save the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fed_userllm.clients.task import initial_encoder, load_data
from fed_userllm.models import load_pretrained
from fed_userllm.models.llm import load_llm
from fed_userllm.models.userllm import UserLLM, UserLLMConfig
from fed_userllm.rundir import find_encoder
from fed_userllm.runtime import resolve_device
from fed_userllm.tasks import NextItem, Task, evaluate
from fed_userllm.tasks.catalog import CatalogScorer
from fed_userllm.train.contextualize import dataset_task
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.federated_config import FederatedConfig
from fed_userllm.train.steps import Examples, load_trainable_state, local_train_steps, trainable_state


@dataclass(frozen=True)
class SharedUserLLM:
    """A process's UserLLM, its tokenizer and its trainable tensors as initialised (seeded by the run's seed)."""

    model: UserLLM
    tokenizer: PreTrainedTokenizerBase
    initial: dict[str, torch.Tensor]


def shared_userllm(cfg: FederatedConfig, vocab_sizes: dict[str, int]) -> SharedUserLLM:
    """The process's UserLLM for ``cfg`` (its LLM settings and encoder), built on first use.

    One per process on purpose: `UserLLM` hooks its cross-attention into the LLM's layers, so each model
    needs its own LLM, and loading SmolLM2 takes seconds and half a gigabyte.
    """
    return _build(cfg, tuple(sorted(vocab_sizes.items())))


@lru_cache(maxsize=1)
def _build(cfg: FederatedConfig, vocab_items: tuple[tuple[str, int], ...]) -> SharedUserLLM:
    llm, tokenizer = load_llm(cfg.llm.model, device=resolve_device(cfg.runtime.device))
    encoder = initial_encoder(cfg, dict(vocab_items))  # seeds torch with the run's seed: the new layers too
    config = UserLLMConfig(llm=cfg.llm.model, integration=cfg.llm.integration, xattn_ffn=cfg.llm.xattn_ffn,
                           xattn_layers=[-1] if cfg.llm.objective == "catalog" else None,
                           user_tokens=cfg.llm.user_tokens, perceiver=cfg.llm.user_tokens == "events")
    model = UserLLM(config, encoder, llm)
    return SharedUserLLM(model, tokenizer, trainable_state(model))


@lru_cache(maxsize=1)
def client_task(cfg: FederatedConfig) -> Task:
    """The phase's task over the client's copy of the dataset (NextItem builds its title trie once)."""
    data = cfg.data
    seq = load_data(data.dataset, data.max_len)
    return dataset_task(cfg.llm.task, data.dataset, data.max_len, shared_userllm(cfg, seq.vocab_sizes).tokenizer,
                        seq=seq)


@lru_cache(maxsize=1)
def catalog_scorer(model: UserLLM, task: NextItem) -> CatalogScorer:
    """The process's cached text states for the catalog objective, computed for its first client."""
    return CatalogScorer.for_task(model, task)


def initial_userllm(cfg: FederatedConfig, vocab_sizes: dict[str, int], encoder_source: str | Path) -> UserLLM:
    """The phase's starting model: the pretrained encoder of ``encoder_source``, the new layers as initialised."""
    shared = shared_userllm(cfg, vocab_sizes)
    model = shared.model
    try:
        path = find_encoder(encoder_source).folder
    except FileNotFoundError as err:
        raise FileNotFoundError(f"encoder={str(encoder_source)!r}: {err}") from err
    pretrained = load_pretrained(path)
    if pretrained.config != model.encoder.config:
        raise ValueError(f"the encoder in {path} ({pretrained.config}) differs from the one the run config "
                         f"describes ({model.encoder.config}): set model, d-model, n-layers, n-heads, item-dim, "
                         "dropout, seen-offset and max-len to the pretrained encoder's")
    load_trainable_state(model, shared.initial)
    model.encoder.load_state_dict(pretrained.state_dict())
    return model


def train_local(model: UserLLM, task: Task, users: np.ndarray, cfg: FederatedConfig,
                seed: int) -> tuple[float, int]:
    """``llm-local-steps`` AdamW steps on the users' own task examples; (mean loss, number of examples).

    A fresh optimiser every round (nothing about a client persists on the server side); batches of
    ``llm-batch-size`` examples drawn from (seed, step), as in the local trainer.
    """
    phase, max_len = cfg.contextualize, cfg.data.max_len
    catalog = catalog_scorer(model, task) if cfg.llm.objective == "catalog" else None
    examples = Examples(task, task.spans(users, "train", max_len), max_len, catalog=catalog)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=ContextualizeConfig.weight_decay)
    loss = local_train_steps(model, examples, phase.local_steps, optimizer, phase.batch_size, seed=seed)
    return loss, len(examples.spans)


def evaluate_local(model: UserLLM, task: Task, users: np.ndarray, split: str,
                   cfg: FederatedConfig) -> dict[str, float]:
    """Summed task metrics (NextItem: Recall@1/5/10 hits, NDCG@10; FavGenre: hits) and ``n`` on ``split``;
    a catalog model ranks every title exactly, any other decodes by constrained beam search."""
    max_len = cfg.data.max_len
    spans = task.spans(users, split, max_len)
    if cfg.llm.objective == "catalog":
        return catalog_scorer(model, task).evaluate(task, spans, max_len)
    return evaluate(model, task, spans, max_len, batch_size=ContextualizeConfig.eval_batch_size)
