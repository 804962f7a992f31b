"""What both sides of the Flower app share: the model, its wire format, and a client's local work.

Wire format: an ArrayRecord holding the model's trainable ``named_parameters`` (a tied embedding/output
table is one parameter, so it travels once); nothing else about the model crosses the network. A client's
local work is training on its own windows (plainly, or with DP-SGD through Opacus) and counting hits on its
own validation/test targets; both return only aggregate numbers.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fed_userllm.data import NUM_RESERVED, Partitioner, UserSequences, load_sequences
from fed_userllm.eval.evaluate import evaluation_sums
from fed_userllm.models import build_encoder, public_items
from fed_userllm.train.federated_config import DataSettings, DPSettings, FederatedConfig, PhaseSettings


def initial_encoder(cfg: FederatedConfig, vocab_sizes: dict[str, int]) -> torch.nn.Module:
    """A fresh encoder of ``cfg.encoder`` (seeded by the run's seed, so server and tests agree on round 0). With
    ``item-features='public'`` every side computes the same frozen item table from the public catalog; only
    the trainable parameters are ever exchanged."""
    torch.manual_seed(cfg.runtime.seed)
    return build_encoder(cfg.encoder, vocab_sizes, cfg.data.max_len, public_items(cfg.encoder, cfg.data.dataset))


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that are trained (and so exchanged); shared parameters once, under their first name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def get_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's trainable parameters as an ArrayRecord."""
    return ArrayRecord({name: Array(p.detach().cpu().numpy()) for name, p in trainable(model).items()})


def set_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy ``arrays`` into the model; names and shapes must match its trainable parameters exactly."""
    params = trainable(model)
    if set(arrays.keys()) != set(params):
        names = set(arrays.keys())
        raise ValueError(f"arrays do not match the model: missing {sorted(set(params) - names)}, "
                         f"unexpected {sorted(names - set(params))}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.from_numpy(arrays[name].numpy())
            if value.shape != p.shape:
                raise ValueError(f"array {name!r} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(p.shape)}")
            p.copy_(value)


@lru_cache(maxsize=2)
def load_data(dataset: str, max_len: int) -> UserSequences:
    """The dataset, loaded once per process (a simulation worker serves many clients)."""
    return load_sequences(dataset, max_len=max_len)


def client_users(data: DataSettings, seq: UserSequences, partition_id: int) -> np.ndarray:
    """The user indices this client holds: its partition, and nothing else."""
    return Partitioner(seq.num_users, data.users_per_client, data.partition_seed).users(partition_id)


def popularity_update(seq: UserSequences, users: np.ndarray, clip_norm: float) -> np.ndarray:
    """The client's share of the item-popularity release [vocab]: each user marks the distinct items of their
    training events with ``clip_norm / sqrt(#items)`` (one user's vector has L2 norm exactly ``clip_norm``, so
    clipping keeps all of it); the sum over users counts how many users rated each item, per unit of norm."""
    update = np.zeros(seq.vocab_sizes["item"], dtype=np.float32)
    starts, ends = seq.train_ranges(users)
    for start, end in zip(starts, ends, strict=True):
        items = np.unique(seq.features["item"][start:end])
        items = items[items >= NUM_RESERVED]
        if len(items):
            update[items] += clip_norm / np.sqrt(len(items))
    return update


@dataclass
class LocalResult:
    loss: float  # mean training loss over the non-empty local batches
    num_examples: int  # training windows held by the client
    steps: int  # optimizer steps taken
    sample_rate: float  # DP-SGD Poisson rate (1/batches per epoch); 1.0 without DP-SGD


def local_plan(num_windows: int, phase: PhaseSettings) -> tuple[float, int]:
    """(DP-SGD sample rate, optimizer steps) of a client's round of ``phase`` on ``num_windows`` windows, known
    before it trains: Opacus samples each window with probability 1 / (batches per epoch)."""
    batches = math.ceil(num_windows / phase.batch_size)
    return 1 / batches, phase.local_steps or phase.local_epochs * batches


def train_local(model: torch.nn.Module, seq: UserSequences, users: np.ndarray, phase: PhaseSettings,
                dp: DPSettings, seed: int, noise_multiplier: float, device: torch.device) -> LocalResult:
    """Train on the clients' own windows with SGD: ``local_steps`` steps if > 0, else ``local_epochs`` epochs.

    With ``dp.mode == "sample"`` this is DP-SGD via Opacus (per-window clipping to ``clip_norm``, Gaussian
    noise, Poisson batches with rate batch_size/windows). Its batches and noise come from a generator
    seeded by the OS, never by ``seed``: whoever knows the seed could otherwise subtract the noise.
    """
    windows = seq.windows(users)
    if len(windows) == 0:
        raise ValueError(f"users {users.tolist()} have no training windows (each needs >= 4 events)")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=phase.lr)
    _, total = local_plan(len(windows), phase)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    loader, sample_rate = None, 1.0
    if dp.mode == "sample":
        secret = torch.Generator().manual_seed(secrets.randbits(63))
        loader = DataLoader(TensorDataset(torch.arange(len(windows))), batch_size=phase.batch_size,
                            generator=secret)
        _, optimizer, loader = PrivacyEngine(accountant=dp.accountant).make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=dp.clip_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(secrets.randbits(63)))
        sample_rate = loader.sample_rate
    losses, steps = [], 0
    while steps < total:
        epoch = loader if loader is not None else _shuffled_batches(len(windows), phase.batch_size, rng)
        for (idx,) in epoch:
            batch = {k: v.to(device) for k, v in seq.training_batch(windows[idx.numpy()]).items()}
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # DP-SGD: an empty Poisson batch still takes its noise-only step
            steps += 1
            if len(idx):
                losses.append(loss.item())
            if steps == total:
                break
    return LocalResult(float(np.mean(losses)) if losses else 0.0, len(windows), steps, sample_rate)


def _shuffled_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[tuple[torch.Tensor]]:
    """One epoch of window indices in random order, in batches (the non-DP loader)."""
    order = torch.from_numpy(rng.permutation(n))
    return [(order[i:i + batch_size],) for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate_local(model: torch.nn.Module, seq: UserSequences, users: np.ndarray, split: str,
                   device: torch.device) -> dict[str, float]:
    """Summed hit counts (Recall@1/5/10, NDCG@10, FavGenre) and ``n`` over the client's own users."""
    return evaluation_sums(model.to(device), seq, split, users, device=device)
