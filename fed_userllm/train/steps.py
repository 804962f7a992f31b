"""One User-LLM training step and the state it trains: the examples of a task (`Examples`: spans sampled per
step, batched, and their loss), ``steps`` optimiser steps on them (`local_train_steps`), and the trainable
parameters by name (what a run checkpoints and a Flower client exchanges). The local trainer
(`fed_userllm.train.contextualize`) and the federated client (`fed_userllm.clients.contextualize`) both train
with exactly these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fed_userllm.models.userllm import UserLLM
from fed_userllm.tasks import Task, to_device
from fed_userllm.tasks.catalog import CatalogScorer
from fed_userllm.tasks.tasks import IGNORE


@dataclass
class Examples:
    """Training examples of one task: spans of some users' histories, how a batch is built from them and
    its loss: the LM loss on prompt + target tokens, or with ``catalog`` -log P(target title | catalog)."""

    task: Task
    spans: np.ndarray  # [N, 2] (start, end) from Task.spans(users, "train", history_len)
    history_len: int
    text_history: int = 0
    max_target_tokens: int = 64
    catalog: CatalogScorer | None = None

    def sample(self, batch_size: int, seed: int, step: int,
               micro_batch_size: int | None = None) -> list[dict]:
        """The batch of ``step`` (a function of (seed, step) only, so resumed runs see the same data), as
        micro-batches of at most ``micro_batch_size`` examples (one batch when None)."""
        if len(self.spans) == 0:
            raise ValueError("no training examples: the users have no training events with a target")
        rows = np.random.default_rng([seed, step]).integers(len(self.spans), size=batch_size)
        size = micro_batch_size or batch_size
        return [self.batch(self.spans[rows[i:i + size]]) for i in range(0, batch_size, size)]

    def batch(self, spans: np.ndarray) -> dict:
        if self.catalog is None:
            return self.task.batch(spans, self.history_len, self.text_history, self.max_target_tokens)
        return {"user": self.task.seq.gather(spans[:, 0], spans[:, 1], self.history_len),
                "title": self.task.answer_ids(spans)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if self.catalog is None:
            return task_loss(model, batch)
        return -self.catalog.log_probs(batch["user"], batch["title"]).mean()

    def weight(self, batch: dict) -> int:
        """What the loss averages over: target tokens (LM loss) or examples (catalog)."""
        if self.catalog is None:
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        return len(batch["title"])


def task_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the target tokens, for a UserLLM or a text-only LM."""
    if isinstance(model, UserLLM):
        return model(batch["user"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss


def local_train_steps(model: nn.Module, examples: Examples, steps: int, optimizer: torch.optim.Optimizer,
                      batch_size: int = 8, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                      seed: int = 0, start_step: int = 0, max_grad_norm: float = 1.0,
                      micro_batch_size: int | None = None, progress: tqdm | None = None) -> float:
    """Run ``steps`` optimiser steps (numbered from ``start_step``) and return their mean loss.

    Dropout is seeded per step as well, so the same (seed, steps) give the same parameters however the
    steps are split across calls (federated rounds, resumed runs). With ``micro_batch_size`` the gradients
    of micro-batches are accumulated, weighted by their target tokens: the same step at a fraction of the
    activation memory (long TextPrompt prompts need it).
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for step in range(start_step, start_step + steps):
        torch.manual_seed(seed * 1_000_003 + step)
        parts = [to_device(b, device) for b in examples.sample(batch_size, seed, step, micro_batch_size)]
        targets = [examples.weight(b) for b in parts]
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for batch, n in zip(parts, targets, strict=True):
            part = examples.loss(model, batch) * (n / sum(targets))
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return float(np.mean(losses))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (CPU copies): what a federated client sends and receives."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the trainable parameters from ``state`` (exactly the names of `trainable_state`)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"state does not match the trainable parameters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"state[{name!r}] has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(state[name])
