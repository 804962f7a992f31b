"""Canary clients for the empirical privacy audit, and the audit of a run's canaries.

A canary is a fake client whose update is always C * u for a fixed random unit direction u in the space of the
exchanged tensors (all of them, flattened and concatenated). `count` canaries are inserted: every round each
joins independently with probability q, like any client, and is clipped and summed like one, but they never
count as users (the DP average still divides by q*N of the real population, and they are not in the cohort
counts). As many directions again are held out (never inserted). Canaries are data-independent, so they
change nothing of the users' guarantee; they only let `empirical_audit` measure what the final model reveals
(`fed_userllm.privacy.empirical`).

Directions and participation are drawn from a canary seed in streams of their own (distinct SeedSequence
keys), so they are independent of the cohorts and the noise; the seed is a one-way hash of the run's secret
seed, so canary files, which are operator-private, reveal nothing about the noise.

Files, per phase of a run with canaries: ``canaries/<phase>.json`` (the canary seed, count, tensor layout,
C and q) and ``canaries/<phase>.safetensors`` (the phase's initial and final exchanged tensors).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from fed_userllm.privacy.accounting import epsilon_from_history, extend_history
from fed_userllm.privacy.empirical import EmpiricalEstimate, estimate_epsilon
from fed_userllm.privacy.ledger import USER_LEVEL, LedgerConfig, read_ledger
from fed_userllm.privacy.sampling import poisson_sample
from fed_userllm.rundir import CANARIES, LEDGER
from fed_userllm.runtime import atomic_write_bytes, atomic_write_json

_DIRECTIONS, _PARTICIPATION = 0, 1  # SeedSequence keys of the two streams


def canary_seed(secret_seed: int, phase: str) -> int:
    """The canary seed of ``phase``: a one-way hash of the run's secret seed (63 bits)."""
    digest = hashlib.sha256(f"fed-userllm canaries {secret_seed} {phase}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Canaries:
    """``count`` inserted canaries (indices 0..count-1) and ``count`` held-out ones (count..2*count-1)."""

    seed: int
    count: int
    tensors: list[tuple[str, tuple[int, ...]]]  # the exchanged tensors' names and shapes, in order
    clip_norm: float
    sample_rate: float

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if not (0 < self.clip_norm < float("inf")):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")

    @classmethod
    def for_arrays(cls, seed: int, count: int, arrays: Mapping[str, np.ndarray], clip_norm: float,
                   sample_rate: float) -> Canaries:
        return cls(seed, count, [(name, tuple(np.shape(a))) for name, a in arrays.items()], clip_norm, sample_rate)

    @property
    def dimension(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors)

    def direction(self, index: int) -> np.ndarray:
        """Canary ``index``'s unit direction, flat (float64)."""
        if not 0 <= index < 2 * self.count:
            raise IndexError(f"canary {index} out of range 0..{2 * self.count - 1}")
        u = np.random.default_rng([self.seed, _DIRECTIONS, index]).standard_normal(self.dimension)
        return u / np.linalg.norm(u)

    def participants(self, server_round: int, attempt: int = 0) -> np.ndarray:
        """The inserted canaries that take part in ``server_round`` (attempt ``attempt``): Poisson at rate q."""
        rng = np.random.default_rng([self.seed, _PARTICIPATION, server_round, attempt])
        return poisson_sample(self.count, self.sample_rate, rng)

    def update(self, index: int) -> list[np.ndarray]:
        """Canary ``index``'s update C * u, split into the exchanged tensors' shapes."""
        return self.split(self.clip_norm * self.direction(index))

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """A flat vector as the exchanged tensors (their shapes, in order)."""
        sizes = [int(np.prod(shape)) for _, shape in self.tensors]
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return [p.reshape(shape) for p, (_, shape) in zip(parts, self.tensors, strict=True)]

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The exchanged tensors ``arrays`` as one flat float64 vector (the directions' space)."""
        return np.concatenate([np.asarray(arrays[name], dtype=np.float64).ravel() for name, _ in self.tensors])

    def cosines(self, change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cosines of the flat model ``change`` with the inserted and with the held-out directions."""
        norm = np.linalg.norm(change)
        if not norm > 0:
            raise ValueError("the model did not change: there is nothing to compare the canaries with")
        values = np.array([self.direction(i) @ change for i in range(2 * self.count)]) / norm
        return values[:self.count], values[self.count:]

    def save(self, run_dir: Path, phase: str, initial: Mapping[str, np.ndarray],
             final: Mapping[str, np.ndarray]) -> None:
        """Write the phase's canary files (operator-private) into ``run_dir/canaries``."""
        folder = Path(run_dir) / CANARIES
        atomic_write_json(folder / f"{phase}.json", {"phase": phase, **asdict(self)})
        tensors = {f"initial/{k}": np.ascontiguousarray(v) for k, v in initial.items()}
        tensors |= {f"final/{k}": np.ascontiguousarray(v) for k, v in final.items()}
        atomic_write_bytes(folder / f"{phase}.safetensors", save(tensors))

    @classmethod
    def load(cls, path: Path) -> tuple[Canaries, np.ndarray]:
        """The canaries described by ``<phase>.json`` and the flat change final - initial of that phase."""
        spec = json.loads(Path(path).read_text())
        canaries = cls(spec["seed"], spec["count"], [(n, tuple(s)) for n, s in spec["tensors"]],
                       spec["clip_norm"], spec["sample_rate"])
        tensors = load_file(Path(path).with_suffix(".safetensors"))
        initial = {name: tensors[f"initial/{name}"] for name, _ in canaries.tensors}
        final = {name: tensors[f"final/{name}"] for name, _ in canaries.tensors}
        return canaries, canaries.flatten(final) - canaries.flatten(initial)


@dataclass(frozen=True)
class PhaseAudit:
    """The empirical estimate of one phase beside the accountant's bound for that phase's rounds alone."""

    phase: str
    rounds: int
    dimension: int
    estimate: EmpiricalEstimate
    bound_rdp: float
    bound_prv: float

    @property
    def exceeds_bound(self) -> bool:
        """The whole interval above the tighter bound: the run leaks more than its accountant claims."""
        return self.estimate.ci_low > min(self.bound_rdp, self.bound_prv)

    def to_dict(self) -> dict:
        return {**asdict(self), "exceeds_bound": self.exceeds_bound}

    def to_text(self) -> str:
        e = self.estimate
        return (f"[{self.phase}] {e.inserted} inserted / {e.held_out} held-out canaries, d={self.dimension:,}, "
                f"{self.rounds} rounds: empirical epsilon {e.epsilon:.3g} ({100 * e.confidence:g}% CI "
                f"{e.ci_low:.3g} .. {e.ci_high:.3g}) at delta={e.delta:.3g}; accountant bound for these rounds "
                f"RDP {self.bound_rdp:.4g}, PRV {self.bound_prv:.4g}"
                + ("  <-- EXCEEDS THE BOUND" if self.exceeds_bound else ""))


def empirical_audit(run_dir: str | Path, bootstrap: int = 1000) -> list[PhaseAudit]:
    """The empirical privacy estimate of every phase of ``run_dir`` that inserted canaries.

    The bound beside it is the accountant's epsilon for that phase's charged rounds alone (from the ledger
    header and lines): the estimate is about that phase's final model, whatever ran before it.
    """
    run_dir = Path(run_dir)
    specs = sorted((run_dir / CANARIES).glob("*.json"))
    if not specs:
        raise FileNotFoundError(f"{run_dir} has no {CANARIES}/*.json: the run inserted no canaries (they "
                                "need dp='user' and canaries > 0, and are deleted after an audit if you chose so)")
    entries = read_ledger(run_dir / LEDGER).entries
    config = LedgerConfig.from_header(entries[0])
    if config.mechanism != USER_LEVEL:
        raise ValueError(f"canaries audit user-level DP-FedAvg; this ledger is {config.mechanism}")
    audits = []
    for spec in specs:
        phase = spec.stem
        canaries, change = Canaries.load(spec)
        history: list[list] = []
        records = [r for r in entries[1:] if r.get("phase", phase) == phase]
        for record in records:
            history = extend_history(history, config.noise_multiplier, record.get("sample_rate") or
                                     config.sample_rate, 1)
        inserted, held_out = canaries.cosines(change)
        audits.append(PhaseAudit(
            phase, len(records), canaries.dimension,
            estimate_epsilon(inserted, held_out, config.delta, bootstrap=bootstrap, seed=canaries.seed),
            epsilon_from_history(history, config.delta, "rdp"), epsilon_from_history(history, config.delta, "prv")))
    return audits
