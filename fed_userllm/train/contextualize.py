"""Phase two: contextualize an LLM with a pretrained user encoder on one task (User-LLM, Ning, Liu et al., 2024, §3-4).

Trains a `UserLLM` (cross-attention or soft prompt; strategies full / lora / enc / proj) or, with
``method="textprompt"``, the TextPrompt baseline (`TextPromptLLM`: the history as text, the LLM fine-tuned fully
or with LoRA).
``text_history_len > 0`` with a User-LLM integration is the long+short variant (AR50TP10: the encoder reads 50
events, the prompt lists the 10 most recent). AdamW with linear warm-up and cosine decay (the paper: lr 1e-3,
weight decay 1e-3), batches sampled per step from every training target, so a run is resumable step by step.
The loss is the LM cross-entropy of the target tokens, or for NextItem with one cross-attention block after
the last decoder layer (``xattn_layers=[-1]``) ``objective="catalog"``: -log P(target title | catalog), what
constrained ranking scores, computed from cached text states (`fed_userllm.tasks.catalog`) fast enough to
train on every example on a CPU. A run directory holds:

    config.json      the ContextualizeConfig
    metrics.jsonl    training loss every 10 steps; validation metrics every ``eval_every`` steps
    checkpoint.pt    trainable parameters + optimiser + scheduler + step
    userllm/         the trained model (UserLLM.save_pretrained or TextPromptLLM.save_pretrained)
    results.json     validation and test metrics on a fixed random subset of users

(`fed_userllm.rundir` owns the names and writes them atomically.)

The training step itself (`Examples`, `local_train_steps`, the trainable state) is `fed_userllm.train.steps`,
shared with the Flower client of the federated Enc phase.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fed_userllm.data import DEFAULT_DATASET, load_sequences
from fed_userllm.data.reviews import detect_reviews, event_texts, read_reviews, review_sequences
from fed_userllm.data.sequences import UserSequences
from fed_userllm.eval.ranking import finalize
from fed_userllm.models import load_pretrained
from fed_userllm.models.llm import load_llm
from fed_userllm.models.textprompt import TextPromptLLM
from fed_userllm.models.userllm import ENCODER_DIR, UserLLM
from fed_userllm.rundir import USERLLM, RunDir, find_encoder, find_userllm
from fed_userllm.runtime import resolve_device
from fed_userllm.tasks import TASKS, ReviewG, Task, evaluate
from fed_userllm.tasks.catalog import CatalogScorer
from fed_userllm.train.centralized import warmup_cosine
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.steps import Examples, load_trainable_state, local_train_steps, trainable_state

EVAL_SEED = 0  # the evaluation subset of users is the same for every run, so runs are comparable
LOG_EVERY = 10


# --------------------------------------------------------------------------------------------- data and model


def load_task(config: ContextualizeConfig, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task over the run's dataset (the encoder run's, unless ``config.dataset`` names one)."""
    source = find_encoder(config.encoder) if config.encoder else None
    dataset = config.dataset or (source.dataset if source else None) or DEFAULT_DATASET
    max_len = (source.max_len if source else None) or config.history_len
    return dataset_task(config.task, dataset, max_len, tokenizer, config.review_field, config.noun,
                        config.max_target_tokens)


def dataset_task(name: str, dataset: str, max_len: int, tokenizer: PreTrainedTokenizerBase,
                 review_field: str = "text", noun: str | None = None, max_target_tokens: int = 64,
                 seq: UserSequences | None = None) -> Task:
    """Task ``name`` over ``dataset`` (windows of ``max_len``; ``seq``: its sequences, when already loaded).
    Items are movies, or items (Amazon) / places (Google Local) in a review folder, whose review texts are
    ReviewG's targets."""
    found = detect_reviews(dataset)
    noun = noun or ("movie" if not found else "item" if found[0] == "amazon" else "place")
    if name == "reviewg":
        if not found:
            raise ValueError(f"task='reviewg' needs review text; dataset {dataset!r} has none (use an Amazon "
                             "or Google Local review folder)")
        data = read_reviews(dataset)  # read once: the sequences and the texts aligned with their events
        seq = seq or review_sequences(data, max_len=max_len)
        return ReviewG(seq, tokenizer, event_texts(seq, data, review_field), noun=noun,
                       max_new_tokens=max_target_tokens)
    return TASKS[name](seq or load_sequences(dataset, max_len=max_len), tokenizer, noun=noun)


def build_userllm(config: ContextualizeConfig, seq: UserSequences, llm: PreTrainedModel) -> UserLLM:
    """A fresh User-LLM to train on the run's pretrained encoder. Takes ownership of ``llm`` (freezes it, may add
    LoRA or hooks)."""
    encoder = load_pretrained(find_encoder(config.encoder).folder, next(llm.parameters()).device)
    if encoder.config.vocab_sizes != seq.vocab_sizes:
        raise ValueError(f"encoder vocab sizes {encoder.config.vocab_sizes} differ from the dataset's "
                         f"{seq.vocab_sizes}: the encoder was pretrained on other data")
    if config.history_len > encoder.config.max_len:
        raise ValueError(f"history_len={config.history_len} exceeds the encoder's "
                         f"max_len={encoder.config.max_len}")
    return UserLLM(config.userllm_config(), encoder, llm)


def build_textprompt(config: ContextualizeConfig, llm: PreTrainedModel) -> TextPromptLLM:
    """A fresh TextPrompt baseline to train (it reads no encoder). Takes ownership of ``llm``."""
    return TextPromptLLM(config.textprompt_config(), llm)


def prepare(config: ContextualizeConfig,
            base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> tuple[nn.Module, Task]:
    """(model, task) for ``config``; ``base`` is an already loaded (LLM, tokenizer) for ``config.llm``,
    copied so that the caller can build several models from one load."""
    if base is None:
        llm, tokenizer = load_llm(config.llm, device=resolve_device(config.device))
    else:
        llm, tokenizer = copy.deepcopy(base[0]), base[1]
    task = load_task(config, tokenizer)
    if config.method == "textprompt":
        return build_textprompt(config, llm), task
    return build_userllm(config, task.seq, llm), task


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: nn.Module, config: ContextualizeConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the encoder's at ``encoder_lr`` when that is set."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoder = [p for n, p in named if n.startswith("encoder.")]
    rest = [p for n, p in named if not n.startswith("encoder.")]
    groups = [{"params": rest, "lr": config.lr}]
    if encoder:
        lr = config.lr if config.encoder_lr is None else config.encoder_lr
        groups.append({"params": encoder, "lr": lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------------- runs


def eval_user_subset(num_users: int, size: int) -> np.ndarray:
    """A fixed random subset of ``size`` users (all when size >= num_users), sorted."""
    if size >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(EVAL_SEED).choice(num_users, size=size, replace=False))


def evaluate_model(model: nn.Module, task: Task, config: ContextualizeConfig, split: str,
                   num_users: int | None = None, progress: bool = False) -> dict[str, float]:
    """Mean metrics of ``model`` on ``split`` targets of the fixed user subset (``n`` = examples scored)."""
    users = eval_user_subset(task.seq.num_users, config.eval_users if num_users is None else num_users)
    spans = task.spans(users, split, config.history_len)
    if isinstance(model, UserLLM) and model.config.encoder_prior:  # it ranks exactly; it does not generate
        was_training = model.training
        model.eval()
        sums = CatalogScorer.for_task(model, task).evaluate(task, spans, config.history_len)
        model.train(was_training)
        return finalize(sums)
    sums = evaluate(model, task, spans, config.history_len, config.text_history_len, config.eval_batch_size,
                    progress)
    return finalize(sums)


def load_model(path: str | Path, device: str = "auto") -> tuple[nn.Module, Task, ContextualizeConfig]:
    """The trained model of a finished contextualize or Flower run (or of its userllm/ folder), its task and
    its config."""
    source = find_userllm(path)
    config = ContextualizeConfig.from_dict(source.config)
    target = resolve_device(device)
    llm, tokenizer = load_llm(config.llm, device=target)
    if config.method == "textprompt":
        model: nn.Module = TextPromptLLM.from_pretrained(source.folder, llm=llm)
    else:
        old_frozen = config.strategy == "proj" and not (source.folder / ENCODER_DIR).is_dir()
        frozen = load_pretrained(find_encoder(config.encoder).folder, target) if old_frozen else None
        model = UserLLM.from_pretrained(source.folder, llm=llm, encoder=frozen)
    return model.eval(), load_task(config, tokenizer), config


def evaluate_llm(run_dir: str | Path, split: str = "test", num_users: int | None = None, device: str = "auto",
                 progress: bool = True) -> dict[str, float]:
    """Metrics of a finished run's model on ``split`` for ``num_users`` users (default: its eval_users)."""
    model, task, config = load_model(run_dir, device)
    return evaluate_model(model, task, config, split, num_users, progress)


def contextualize(config: ContextualizeConfig, run_dir: str | Path, resume: bool = False,
                  progress: bool = True,
                  base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> dict:
    """Train ``config`` into ``run_dir``; returns results.json (val/test metrics, parameter counts, time)."""
    run = RunDir(run_dir)
    resumed = run.check_resume(config, resume)
    torch.manual_seed(config.seed)  # the new projection / cross-attention weights
    model, task = prepare(config, base)
    run.write_config(asdict(config))
    if not resumed:
        run.mark_latest()
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup_frac))
    step, seconds = 0, 0.0
    state = run.load_checkpoint(map_location=next(model.parameters()).device) if resumed else {}
    if state:
        load_trainable_state(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, seconds = state["step"], state["seconds"]
    run.keep_metrics(lambda record: record["step"] <= step)
    catalog = None
    if config.objective == "catalog" and step < config.steps:
        if progress:
            print("caching the LLM's text states at the title trie's branching nodes ...", flush=True)
        catalog = CatalogScorer.for_task(model, task)
    examples = Examples(task, task.spans(None, "train", config.history_len), config.history_len,
                        config.text_history_len, config.max_target_tokens, catalog)

    trained = config.integration if config.method == "userllm" else config.method
    bar = tqdm(total=config.steps, initial=step, desc=f"{trained}/{config.task}", disable=not progress)
    pending: list[float] = []  # per-step losses since the last log line
    periods = [p for p in (LOG_EVERY, config.checkpoint_every, config.eval_every) if p]
    while step < config.steps:
        n = min(min(p - step % p for p in periods), config.steps - step)  # up to the next log/eval/checkpoint
        start = time.time()
        loss = local_train_steps(model, examples, n, optimizer, config.batch_size, scheduler, config.seed,
                                 step, max_grad_norm=config.max_grad_norm or float("inf"),
                                 micro_batch_size=config.micro_batch_size or None, progress=bar)
        step, seconds = step + n, seconds + time.time() - start
        pending += [loss] * n
        if step % LOG_EVERY == 0 or step == config.steps:
            run.append_metrics({"step": step, "loss": float(np.mean(pending)), "lr": scheduler.get_last_lr()[0],
                                "seconds": seconds})
            pending = []
        if config.eval_every and config.eval_users and step % config.eval_every == 0 and step < config.steps:
            val = evaluate_model(model, task, config, "val")
            run.append_metrics({"step": step, **{f"val_{k}": v for k, v in val.items()}})
        if step % config.checkpoint_every == 0 or step == config.steps:
            state = {"step": step, "seconds": seconds, "trainable": trainable_state(model),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            run.save_checkpoint(state)
    bar.close()
    model.save_pretrained(run / USERLLM)
    results = {"trainable_parameters": trainable_parameters(model), "train_seconds": seconds,
               "train_examples": len(examples.spans)}
    if config.eval_users:
        for split in ("val", "test"):
            results[split] = evaluate_model(model, task, config, split, progress=progress)
    run.write_results(results)
    return results
