"""The settings of a federated run: one typed, checked view of the Flower run config.

Every hyperparameter lives in ``[tool.flwr.app.config]`` of ``simulations/movielens/pyproject.toml`` (keys in
kebab-case); ``flwr run --run-config "key=value ..."`` overrides them. The ServerApp and the ClientApp both
parse the same run config with `FederatedConfig.from_run_config`, so a bad value fails fast on either side
with an error naming the setting. There are no defaults here on purpose: the app's pyproject is the single
source of truth, and a missing key is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fed_userllm.data import DEFAULT_DATASET
from fed_userllm.data.download import VARIANTS
from fed_userllm.data.reviews import detect_reviews
from fed_userllm.settings import ENCODER_NAMES, ITEM_FEATURES

PHASE_NAMES = ("pretrain", "contextualize", "popularity")  # the index seeds each phase's noise: append only
LLM_TASKS = ("nextitem", "favgenre", "reviewg")  # reviewg: an Amazon / Google Local review folder as dataset
LLM_INTEGRATIONS = ("xattn", "softprompt")
LLM_OBJECTIVES = ("lm", "catalog")  # see fed_userllm.train.contextualize
LLM_USER_TOKENS = ("events", "next_item")  # see fed_userllm.models.userllm
STRATEGIES = ("fedavg", "fedavgm", "fedadam")
LR_SCHEDULES = ("constant", "cosine")
DP_MODES = ("none", "user", "sample")
ACCOUNTANTS = ("rdp", "prv")
FAULT_KINDS = ("error", "hang")
SHORT_ROUND_POLICIES = ("retry", "skip", "stop")


@dataclass(frozen=True)
class FederatedConfig:
    """One federated run. Field ``x_y`` is run-config key ``x-y``."""

    phases: str  # comma-separated phase names, run in order
    popularity_rounds: int  # the popularity phase: releases averaged into the item prior
    popularity_fraction_train: float  # q of the popularity phase (1: every client in every release)
    dataset: str
    max_len: int
    users_per_client: int
    partition_seed: int
    model: str
    d_model: int
    n_layers: int
    n_heads: int
    item_dim: int
    item_features: str  # learned: a per-item table | public: frozen features of the public catalog (ar only)
    item_features_llm: str  # public item features: the LLM whose title representation is used ("": none)
    dropout: float
    encoder: str  # contextualize without pretrain in this run: the pretrained encoder to start from
    llm: str  # the contextualize phase's frozen LLM: "smollm2" (embedded), an HF id or a local path
    llm_task: str
    llm_integration: str
    llm_xattn_ffn: bool  # a gated feed-forward after each cross-attention block (most of the exchanged tensors)
    llm_objective: str  # lm: token cross-entropy | catalog: NextItem, one block after the last layer, cached states
    llm_user_tokens: str  # events: one token per event, Perceiver-compressed | next_item: the encoder's prediction
    llm_rounds: int
    llm_fraction_train: float  # q of the contextualize phase
    llm_local_steps: int
    llm_batch_size: int
    llm_lr: float  # client AdamW learning rate in the contextualize phase
    llm_server_lr: float  # FedAdam's server learning rate in the contextualize phase
    llm_eval_fraction: float  # share of clients in the contextualize phase's validation and final test
    num_rounds: int
    fraction_train: float  # q: each client joins a round independently with this probability (Poisson)
    local_epochs: int
    local_steps: int  # > 0: exactly this many local steps per round instead of local_epochs epochs
    batch_size: int
    lr: float
    strategy: str
    server_lr: float  # FedAdam's eta / FedAvgM's server SGD step; FedAvg applies the average as is
    server_momentum: float  # FedAvgM's server momentum
    server_tau: float  # FedAdam's adaptivity floor: coordinates whose updates stay below it move less than eta
    server_lr_schedule: str  # constant | cosine (eta decays to 0 over the phase's rounds)
    dp: str
    noise_multiplier: float
    clip_norm: float  # user DP: L2 bound of a client's update; sample DP: per-example gradient bound
    target_epsilon: float  # > 0: calibrate noise_multiplier to this budget and never exceed it
    target_delta: float  # 0: the default min(1e-5, 1 / N**1.1), N clients (user DP) or training windows (sample DP)
    accountant: str
    dp_seed: int  # 0: a secret seed from the OS for cohort sampling and DP noise
    canaries: int  # user DP: canary clients inserted per phase for the empirical audit (0: none)
    max_update_norm: float  # a client update (local - global) with a larger L2 norm is a failed client
    eval_every: int  # evaluate on validation targets every k rounds (0: only the final test evaluation)
    eval_fraction: float  # share of clients in an intermediate validation evaluation
    test_fraction: float  # share of clients in the final test evaluation (1: every client)
    seed: int
    threads: int
    device: str
    run_dir: str  # "": runs/flower-<timestamp> relative to the ServerApp's working directory
    resume: bool
    round_timeout: float  # seconds to wait for a round's replies
    max_in_flight: int  # messages outstanding at once (0: all of a round at once)
    max_failure_fraction: float  # a round with more failed clients than this share of its cohort is short
    on_short_round: str  # retry (a new cohort, twice at most, then stop) | skip (no update) | stop
    fault_rate: float  # injected faults: the chance that a sampled client fails (tests, benchmarks)
    fault_kind: str  # error (the client raises before replying) | hang (it answers after round-timeout)

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
        check(len(set(self.phase_names)) == len(self.phase_names), "phases", "each phase at most once")
        check(self.popularity_rounds >= 1, "popularity-rounds", "an integer >= 1")
        check(0 < self.popularity_fraction_train <= 1, "popularity-fraction-train",
              "a client sampling rate q in (0, 1]")
        if "popularity" in self.phase_names:
            check("pretrain" in self.phase_names and self.phase_names.index("popularity")
                  < self.phase_names.index("pretrain"), "phases",
                  "popularity before pretrain (its release initializes the encoder's item prior)")
            check(self.model == "ar", "phases", "no 'popularity' unless model='ar' (whose item scores have a "
                  "per-item bias to initialize)")
        known_dataset = (self.dataset == DEFAULT_DATASET or self.dataset in VARIANTS
                         or self.dataset.startswith("synthetic") or Path(self.dataset).expanduser().is_dir())
        check(known_dataset, "dataset",
              f"{DEFAULT_DATASET}, one of {sorted(VARIANTS)}, 'synthetic[:users=N,...]' or a folder")
        check(self.model in ENCODER_NAMES, "model", f"one of {sorted(ENCODER_NAMES)}")
        check(self.item_features in ITEM_FEATURES, "item-features", f"one of {ITEM_FEATURES}")
        check(self.item_features == "learned" or self.model == "ar", "item-features",
              "'learned' unless model='ar' (public item features are implemented for the AR encoder)")
        check(self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}")
        check(self.dp in DP_MODES, "dp", f"one of {DP_MODES}")
        check(self.accountant in ACCOUNTANTS, "accountant", f"one of {ACCOUNTANTS}")
        check(self.fault_kind in FAULT_KINDS, "fault-kind", f"one of {FAULT_KINDS}")
        check(self.server_lr_schedule in LR_SCHEDULES, "server-lr-schedule", f"one of {LR_SCHEDULES}")
        check(self.on_short_round in SHORT_ROUND_POLICIES, "on-short-round", f"one of {SHORT_ROUND_POLICIES}")
        for key in ("max-len", "users-per-client", "d-model", "n-layers", "n-heads", "item-dim", "num-rounds",
                    "local-epochs", "batch-size", "threads"):
            check(getattr(self, key.replace("-", "_")) >= 1, key, "an integer >= 1")
        for key in ("local-steps", "eval-every", "dp-seed", "max-in-flight", "canaries"):
            check(getattr(self, key.replace("-", "_")) >= 0, key, "an integer >= 0")
        check(self.d_model % self.n_heads == 0, "d-model", f"a multiple of n-heads={self.n_heads}")
        check(0 <= self.dropout < 1, "dropout", "0 <= dropout < 1")
        check(0 < self.fraction_train <= 1, "fraction-train", "a client sampling rate q in (0, 1]")
        check(0 < self.eval_fraction <= 1, "eval-fraction", "a share of clients in (0, 1]")
        check(0 < self.test_fraction <= 1, "test-fraction", "a share of clients in (0, 1]")
        check(0 <= self.max_failure_fraction < 1, "max-failure-fraction", "a share of the cohort in [0, 1)")
        check(0 <= self.fault_rate < 1, "fault-rate", "a probability in [0, 1)")
        for key in ("lr", "server-lr", "round-timeout", "max-update-norm"):
            value = getattr(self, key.replace("-", "_"))
            check(value > 0 and math.isfinite(value), key, "a finite number > 0")
        check(0 <= self.server_momentum < 1, "server-momentum", "a momentum in [0, 1)")
        check(self.server_tau > 0 and math.isfinite(self.server_tau), "server-tau", "a finite number > 0")
        check(self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier), "noise-multiplier",
              "a finite number >= 0")
        check(self.clip_norm > 0, "clip-norm", "a number > 0 (inf disables clipping when dp='none')")
        check(self.target_epsilon >= 0 and math.isfinite(self.target_epsilon), "target-epsilon",
              "0 (no target) or a finite epsilon > 0")
        check(0 <= self.target_delta < 1, "target-delta", "0 (default min(1e-5, 1/N**1.1)) or a delta in (0, 1)")
        if self.dp != "none":
            check(math.isfinite(self.clip_norm), "clip-norm", f"a finite bound when dp={self.dp!r}")
            check(self.noise_multiplier > 0 or self.target_epsilon > 0, "noise-multiplier",
                  f"> 0 when dp={self.dp!r} (or set target-epsilon to calibrate it)")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
              "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self._check_contextualize(check)

    def _check_contextualize(self, check: Callable[[bool, str, str], None]) -> None:
        """The contextualize phase's settings, and how it combines with the phases and DP mode."""
        check(bool(self.llm.strip()), "llm", "'smollm2' (the embedded SmolLM2-135M-Instruct), an HF id or a path")
        check(self.llm_task in LLM_TASKS, "llm-task", f"one of {LLM_TASKS}")
        check(self.llm_task != "reviewg" or "contextualize" not in self.phase_names
              or detect_reviews(self.dataset) is not None, "llm-task",
              "nextitem or favgenre unless dataset is an Amazon / Google Local review folder (reviewg needs "
              "review text)")
        check(self.llm_integration in LLM_INTEGRATIONS, "llm-integration", f"one of {LLM_INTEGRATIONS}")
        check(self.llm_objective in LLM_OBJECTIVES, "llm-objective", f"one of {LLM_OBJECTIVES}")
        check(self.llm_objective != "catalog" or (self.llm_task, self.llm_integration) == ("nextitem", "xattn"),
              "llm-objective", "'lm' unless llm-task='nextitem' and llm-integration='xattn' (the catalog "
              "objective scores NextItem titles through one cross-attention block after the last layer)")
        check(self.llm_user_tokens in LLM_USER_TOKENS, "llm-user-tokens", f"one of {LLM_USER_TOKENS}")
        check(self.llm_user_tokens == "events" or self.model in ("ar", "dual"), "llm-user-tokens",
              "'events' unless model is 'ar' or 'dual' (the encoders with a next-item vector)")
        for key in ("llm-rounds", "llm-local-steps", "llm-batch-size"):
            check(getattr(self, key.replace("-", "_")) >= 1, key, "an integer >= 1")
        check(0 < self.llm_fraction_train <= 1, "llm-fraction-train", "a client sampling rate q in (0, 1]")
        check(0 < self.llm_eval_fraction <= 1, "llm-eval-fraction", "a share of clients in (0, 1]")
        for key in ("llm-lr", "llm-server-lr"):
            value = getattr(self, key.replace("-", "_"))
            check(value > 0 and math.isfinite(value), key, "a finite number > 0")
        names = self.phase_names
        if "contextualize" not in names:
            return
        if "pretrain" in names:
            check(names.index("pretrain") < names.index("contextualize"), "phases",
                  "pretrain before contextualize (the LLM phase starts from the pretrained encoder)")
            check(not self.encoder, "encoder",
                  "'' when phases includes pretrain: contextualize starts from this run's pretrained encoder")
        else:
            check(bool(self.encoder), "encoder",
                  "a pretrained encoder when phases has contextualize without pretrain: a saved model folder, "
                  "a Flower run directory (final/) or a `fed-userllm pretrain` run directory (best/)")
        check(self.dp != "sample", "dp",
              "'user' or 'none' when phases includes contextualize. DP-SGD (dp='sample') is not supported for "
              "the LLM phase: its loss is a mean over all target tokens of a batch (per-example gradients are "
              "not independent) and its batches are not Poisson-sampled, so Opacus's accounting would not "
              "hold. Use dp='user' (DP-FedAvg on exactly the exchanged tensors) or phases='pretrain'")

    @property
    def phase_names(self) -> list[str]:
        return [p.strip() for p in self.phases.split(",") if p.strip()]

    def for_phase(self, name: str) -> FederatedConfig:
        """The settings as phase ``name``'s round loop, strategy and clients see them: contextualize runs
        ``llm-rounds`` rounds at q = ``llm-fraction-train`` with its own learning rates, local steps, batch
        size and evaluation share; popularity runs ``popularity-rounds`` rounds at q = ``popularity-fraction-train``
        and the server averages the releases (server SGD at rate 1/rounds, no momentum); pretrain uses the
        settings as they are."""
        if name == "popularity":
            return replace(self, num_rounds=self.popularity_rounds, fraction_train=self.popularity_fraction_train,
                           strategy="fedavgm",
                           server_lr=1.0 / self.popularity_rounds, server_momentum=0.0,
                           server_lr_schedule="constant", eval_every=0)
        if name != "contextualize":
            return self
        return replace(self, num_rounds=self.llm_rounds, fraction_train=self.llm_fraction_train,
                       local_steps=self.llm_local_steps, batch_size=self.llm_batch_size, lr=self.llm_lr,
                       server_lr=self.llm_server_lr, eval_fraction=self.llm_eval_fraction,
                       test_fraction=self.llm_eval_fraction)

    def to_dict(self) -> dict:
        return asdict(self)
