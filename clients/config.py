"""The settings of a federated run: one typed, checked view of the Flower run config.

Every hyperparameter lives in ``[tool.flwr.app.config]`` of ``simulations/movielens/pyproject.toml`` (keys in
kebab-case); ``flwr run --run-config "key=value ..."`` overrides them. The ServerApp and the ClientApp both
parse the same run config with `FederatedConfig.from_run_config`, so a bad value fails fast on either side
with an error naming the setting. There are no defaults here on purpose: the app's pyproject is the single
source of truth, and a missing key is an error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fed_userllm.data import DEFAULT_DATASET
from fed_userllm.data.download import VARIANTS
from fed_userllm.train.centralized import ENCODERS

PHASE_NAMES = ("pretrain",)
STRATEGIES = ("fedavg", "fedadam")
DP_MODES = ("none", "user", "sample")
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class FederatedConfig:
    """One federated run. Field ``x_y`` is run-config key ``x-y``."""

    phases: str  # comma-separated phase names, run in order
    dataset: str
    max_len: int
    users_per_client: int
    partition_seed: int
    model: str
    d_model: int
    n_layers: int
    n_heads: int
    item_dim: int
    dropout: float
    num_rounds: int
    fraction_train: float  # q: each client joins a round independently with this probability (Poisson)
    local_epochs: int
    local_steps: int  # > 0: exactly this many local steps per round instead of local_epochs epochs
    batch_size: int
    lr: float
    strategy: str
    server_lr: float  # FedAdam's server learning rate (eta); FedAvg applies the average as is
    dp: str
    noise_multiplier: float
    clip_norm: float  # user DP: L2 bound of a client's update; sample DP: per-example gradient bound
    target_epsilon: float  # > 0: calibrate noise_multiplier to this budget and never exceed it
    target_delta: float  # 0: the default 1 / N**1.1 for N clients
    accountant: str
    dp_seed: int  # 0: a secret seed from the OS for cohort sampling and DP noise
    eval_every: int  # evaluate on validation targets every k rounds (0: only the final test evaluation)
    eval_fraction: float  # share of clients in an intermediate validation evaluation
    seed: int
    threads: int
    device: str
    run_dir: str  # "": runs/flower-<timestamp> relative to the ServerApp's working directory
    resume: bool
    round_timeout: float  # seconds to wait for a round's replies
    max_in_flight: int  # messages outstanding at once (0: all of a round at once)

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederatedConfig:
        """Parse and check a Flower run config (kebab-case keys); raise ValueError naming any bad setting."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        missing = sorted(set(known) - set(run_config))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; known keys: {sorted(known)}")
        if missing:
            raise ValueError(f"run config is missing {missing}: every setting is in [tool.flwr.app.config]")
        values = {}
        for key, field in known.items():
            value = run_config[key]
            kind = {"int": int, "float": float, "str": str, "bool": bool}[field.type]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{key}={value!r}: expected a {field.type}")
            values[field.name] = value
        return cls(**values)

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{key}={getattr(self, key.replace('-', '_'))!r}: expected {expected}")

        for name in self.phase_names:
            check(name in PHASE_NAMES, "phases", f"comma-separated phase names from {PHASE_NAMES}")
        check(bool(self.phase_names), "phases", "at least one phase")
        known_dataset = (self.dataset == DEFAULT_DATASET or self.dataset in VARIANTS
                         or self.dataset.startswith("synthetic") or Path(self.dataset).expanduser().is_dir())
        check(known_dataset, "dataset",
              f"{DEFAULT_DATASET}, one of {sorted(VARIANTS)}, 'synthetic[:users=N,...]' or a folder")
        check(self.model in ENCODERS, "model", f"one of {sorted(ENCODERS)}")
        check(self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}")
        check(self.dp in DP_MODES, "dp", f"one of {DP_MODES}")
        check(self.accountant in ACCOUNTANTS, "accountant", f"one of {ACCOUNTANTS}")
        for key in ("max-len", "users-per-client", "d-model", "n-layers", "n-heads", "item-dim", "num-rounds",
                    "local-epochs", "batch-size", "threads"):
            check(getattr(self, key.replace("-", "_")) >= 1, key, "an integer >= 1")
        for key in ("local-steps", "eval-every", "dp-seed", "max-in-flight"):
            check(getattr(self, key.replace("-", "_")) >= 0, key, "an integer >= 0")
        check(self.d_model % self.n_heads == 0, "d-model", f"a multiple of n-heads={self.n_heads}")
        check(0 <= self.dropout < 1, "dropout", "0 <= dropout < 1")
        check(0 < self.fraction_train <= 1, "fraction-train", "a client sampling rate q in (0, 1]")
        check(0 < self.eval_fraction <= 1, "eval-fraction", "a share of clients in (0, 1]")
        for key in ("lr", "server-lr", "round-timeout"):
            value = getattr(self, key.replace("-", "_"))
            check(value > 0 and math.isfinite(value), key, "a finite number > 0")
        check(self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier), "noise-multiplier",
              "a finite number >= 0")
        check(self.clip_norm > 0, "clip-norm", "a number > 0 (inf disables clipping when dp='none')")
        check(self.target_epsilon >= 0 and math.isfinite(self.target_epsilon), "target-epsilon",
              "0 (no target) or a finite epsilon > 0")
        check(0 <= self.target_delta < 1, "target-delta", "0 (default 1/N**1.1) or a delta in (0, 1)")
        if self.dp != "none":
            check(math.isfinite(self.clip_norm), "clip-norm", f"a finite bound when dp={self.dp!r}")
            check(self.noise_multiplier > 0 or self.target_epsilon > 0, "noise-multiplier",
                  f"> 0 when dp={self.dp!r} (or set target-epsilon to calibrate it)")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
              "'auto', 'cpu', 'cuda' or 'cuda:N'")

    @property
    def phase_names(self) -> list[str]:
        return [p.strip() for p in self.phases.split(",") if p.strip()]

    def to_dict(self) -> dict:
        return asdict(self)
