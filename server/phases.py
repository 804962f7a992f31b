"""The phases of a federated run: each names the client handlers it drives (``train.<name>``,
``evaluate.<name>``), the model it starts from and the run-directory folder of its final model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fed_userllm.clients.contextualize import initial_userllm
from fed_userllm.clients.task import initial_encoder
from fed_userllm.models import Popularity, PopularityConfig
from fed_userllm.rundir import FINAL, POPULARITY, USERLLM, RunDir
from fed_userllm.train.federated_config import FederatedConfig


@dataclass(frozen=True)
class Phase:
    """A federated phase: its client handlers (by message type) and the model it trains.

    ``initial_model(settings, vocabulary sizes, run directory)`` gives the phase's starting model; only its
    trainable parameters are exchanged. The phase runs with its own settings, ``cfg.phase(name)``: rounds, q,
    learning rates and evaluation share.
    """

    name: str
    initial_model: Callable[[FederatedConfig, dict[str, int], Path], torch.nn.Module]
    output: str  # folder in the run directory for the phase's final model

    @property
    def train_type(self) -> str:
        return f"train.{self.name}"

    @property
    def evaluate_type(self) -> str:
        return f"evaluate.{self.name}"


def _popularity(cfg: FederatedConfig, vocab_sizes: dict[str, int], run_dir: Path) -> torch.nn.Module:
    """Item counts starting at zero (popularity); the clients' unit-norm vectors are what is released."""
    model = Popularity(PopularityConfig(vocab_sizes))
    model.counts.requires_grad_(True)  # exchanged like a trained parameter; never trained by gradient
    return model


def _encoder(cfg: FederatedConfig, vocab_sizes: dict[str, int], run_dir: Path) -> torch.nn.Module:
    """A fresh user encoder (pretrain); after a popularity phase its item bias is the released prior."""
    model = initial_encoder(cfg, vocab_sizes)
    if "popularity" in cfg.phases:
        with torch.no_grad():
            prior = item_prior(run_dir, cfg)
            model.unembed["item"].bias.copy_(prior - prior.mean())
    return model


def item_prior(run_dir: Path, cfg: FederatedConfig) -> torch.Tensor:
    """log of the released popularity, floored at half the release's noise std (items whose count is lost in
    the noise tie at the floor instead of being ranked by it)."""
    release = Popularity.from_pretrained(run_dir / PHASES["popularity"].output)
    saved = RunDir(run_dir).read_config()
    sigma, n = saved["privacy"]["noise_multiplier"], saved["num_clients"]
    phase, clip_norm = cfg.popularity, cfg.dp.clip_norm
    noise_std = sigma * clip_norm / (phase.fraction_train * n * math.sqrt(phase.rounds))
    floor = 0.5 * noise_std if noise_std > 0 else 1e-3 * clip_norm / n
    return release.log_prior(floor)


def _userllm(cfg: FederatedConfig, vocab_sizes: dict[str, int], run_dir: Path) -> torch.nn.Module:
    """The UserLLM to contextualize (frozen LLM loaded on the server too: it saves the result), starting from
    this run's pretrained encoder, or from ``encoder`` when the run has no pretrain phase."""
    source = run_dir / PHASES["pretrain"].output if "pretrain" in cfg.phases else cfg.encoder.pretrained
    return initial_userllm(cfg, vocab_sizes, source)


PHASES = {"popularity": Phase("popularity", _popularity, POPULARITY),
          "pretrain": Phase("pretrain", _encoder, FINAL),
          "contextualize": Phase("contextualize", _userllm, USERLLM)}
