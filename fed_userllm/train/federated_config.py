"""The settings of a federated run: one typed, checked view of the Flower run config, nested by concern.

Every hyperparameter lives in ``[tool.flwr.app.config]`` of ``simulations/movielens/pyproject.toml`` (keys in
kebab-case); ``flwr run --run-config "key=value ..."`` overrides them. The ServerApp and the ClientApp both
parse the same run config with `FederatedConfig.from_run_config`, so a bad value fails fast on either side
with an error naming the key. There are no defaults here on purpose: the app's pyproject is the single
source of truth, and a missing key is an error.

`KEYS` says which nested setting each key sets. A key shared by phases (e.g. ``strategy``) sets each phase
that uses it; a phase has ``None`` for what it does not use, and the popularity phase's fixed choices are
`popularity_choices`. Each part checks itself (``__post_init__``); `FederatedConfig` checks how they combine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fed_userllm.data import DEFAULT_DATASET
from fed_userllm.data.download import VARIANTS
from fed_userllm.data.reviews import detect_reviews
from fed_userllm.settings import ENCODER_NAMES, INTEGRATION_NAMES, ITEM_FEATURES

PHASE_NAMES = ("pretrain", "contextualize", "popularity")  # the index seeds each phase's noise: append only
LLM_TASKS = ("nextitem", "favgenre", "reviewg")  # reviewg: an Amazon / Google Local review folder as dataset
LLM_OBJECTIVES = ("lm", "catalog")  # see fed_userllm.train.contextualize
LLM_USER_TOKENS = ("events", "next_item")  # see fed_userllm.models.userllm
STRATEGIES = ("fedavg", "fedavgm", "fedadam")
LR_SCHEDULES = ("constant", "cosine")
DP_MODES = ("none", "user", "sample")
ACCOUNTANTS = ("rdp", "prv")
FAULT_KINDS = ("error", "hang")
SHORT_ROUND_POLICIES = ("retry", "skip", "stop")


class InvalidSetting(ValueError):
    """A setting whose value is not what it must be; ``field`` names it within its part of the settings."""

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"{field}={value!r}: expected {expected}")
        self.field, self.value, self.expected = field, value, expected


def _require(settings: Any, ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise InvalidSetting(field, getattr(settings, field), expected)


def _require_all(settings: Any, ok: Any, names: tuple[str, ...], expected: str) -> None:
    """``ok(value)`` for each of ``names`` that is set (not None)."""
    for name in names:
        value = getattr(settings, name)
        _require(settings, value is None or ok(value), name, expected)


def _positive_finite(value: float) -> bool:
    return value > 0 and math.isfinite(value)


@dataclass(frozen=True)
class DataSettings:
    """The dataset and how it is windowed and split into clients."""

    dataset: str
    max_len: int  # history window (events)
    users_per_client: int
    partition_seed: int

    def __post_init__(self) -> None:
        known = (self.dataset == DEFAULT_DATASET or self.dataset in VARIANTS or self.dataset.startswith("synthetic")
                 or Path(self.dataset).expanduser().is_dir())
        _require(self, known, "dataset",
                 f"{DEFAULT_DATASET}, one of {sorted(VARIANTS)}, 'synthetic[:users=N,...]' or a folder")
        _require_all(self, lambda v: v >= 1, ("max_len", "users_per_client"), "an integer >= 1")


@dataclass(frozen=True)
class EncoderSettings:
    """The user encoder's architecture, and the pretrained encoder a run without pretraining starts from."""

    model: str
    d_model: int
    n_layers: int
    n_heads: int
    item_dim: int
    item_features: str  # learned: a per-item table | public: frozen features of the public catalog (ar only)
    item_features_llm: str  # public item features: the LLM whose title representation is used ("": none)
    dropout: float
    seen_offset: bool  # ar: learn one score offset for items already in the history (repeat-aware output)
    pretrained: str  # contextualize without pretrain in this run: the pretrained encoder to start from

    def __post_init__(self) -> None:
        _require(self, self.model in ENCODER_NAMES, "model", f"one of {sorted(ENCODER_NAMES)}")
        _require(self, self.item_features in ITEM_FEATURES, "item_features", f"one of {ITEM_FEATURES}")
        _require(self, self.item_features == "learned" or self.model == "ar", "item_features",
                 "'learned' unless model='ar' (public item features are implemented for the AR encoder)")
        _require_all(self, lambda v: v >= 1, ("d_model", "n_layers", "n_heads", "item_dim"), "an integer >= 1")
        _require(self, self.d_model % self.n_heads == 0, "d_model", f"a multiple of n-heads={self.n_heads}")
        _require(self, 0 <= self.dropout < 1, "dropout", "0 <= dropout < 1")


@dataclass(frozen=True)
class LLMSettings:
    """The contextualize phase's frozen LLM and how the user embeddings reach it."""

    model: str  # "smollm2" (embedded), an HF id or a local path
    task: str
    integration: str
    xattn_ffn: bool  # a gated feed-forward after each cross-attention block (most of the exchanged tensors)
    objective: str  # lm: token cross-entropy | catalog: NextItem, one block after the last layer, cached states
    user_tokens: str  # events: one token per event, Perceiver-compressed | next_item: the encoder's prediction

    def __post_init__(self) -> None:
        _require(self, bool(self.model.strip()), "model",
                 "'smollm2' (the embedded SmolLM2-135M-Instruct), an HF id or a path")
        _require(self, self.task in LLM_TASKS, "task", f"one of {LLM_TASKS}")
        _require(self, self.integration in INTEGRATION_NAMES, "integration", f"one of {INTEGRATION_NAMES}")
        _require(self, self.objective in LLM_OBJECTIVES, "objective", f"one of {LLM_OBJECTIVES}")
        _require(self, self.objective != "catalog" or (self.task, self.integration) == ("nextitem", "xattn"),
                 "objective", "'lm' unless llm-task='nextitem' and llm-integration='xattn' (the catalog objective "
                 "scores NextItem titles through one cross-attention block after the last layer)")
        _require(self, self.user_tokens in LLM_USER_TOKENS, "user_tokens", f"one of {LLM_USER_TOKENS}")


@dataclass(frozen=True)
class PhaseSettings:
    """One phase's round loop, client work, server optimiser and evaluation; None: the phase has no such
    setting (popularity trains nothing on clients; contextualize runs a fixed number of local steps)."""

    rounds: int
    fraction_train: float  # q: each client joins a round independently with this probability (Poisson)
    local_epochs: int | None
    local_steps: int | None  # > 0: exactly this many local steps per round instead of local_epochs epochs
    batch_size: int | None
    lr: float | None  # the clients' learning rate
    strategy: str
    server_lr: float  # FedAdam's eta / FedAvgM's server SGD step; FedAvg applies the average as is
    server_momentum: float  # FedAvgM's server momentum
    server_tau: float | None  # FedAdam's adaptivity floor: coordinates whose updates stay below it move less
    server_lr_schedule: str  # constant | cosine (eta decays to 0 over the phase's rounds)
    eval_every: int  # evaluate on validation targets every k rounds (0: only the final test evaluation)
    eval_fraction: float | None  # share of clients in an intermediate validation evaluation
    test_fraction: float  # share of clients in the final test evaluation (1: every client)

    def __post_init__(self) -> None:
        _require_all(self, lambda v: v >= 1, ("rounds", "local_epochs", "batch_size"), "an integer >= 1")
        if self.local_epochs is None:
            _require_all(self, lambda v: v >= 1, ("local_steps",), "an integer >= 1")
        _require_all(self, lambda v: v >= 0, ("local_steps", "eval_every"), "an integer >= 0")
        _require(self, 0 < self.fraction_train <= 1, "fraction_train", "a client sampling rate q in (0, 1]")
        _require_all(self, _positive_finite, ("lr", "server_lr", "server_tau"), "a finite number > 0")
        _require(self, self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}")
        _require(self, 0 <= self.server_momentum < 1, "server_momentum", "a momentum in [0, 1)")
        _require(self, self.server_lr_schedule in LR_SCHEDULES, "server_lr_schedule", f"one of {LR_SCHEDULES}")
        _require(self, self.eval_every == 0 or self.eval_fraction is not None, "eval_fraction",
                 "a share of clients when eval-every > 0")
        _require_all(self, lambda v: 0 < v <= 1, ("eval_fraction", "test_fraction"), "a share of clients in (0, 1]")


@dataclass(frozen=True)
class DPSettings:
    """Differential privacy: the mechanism, its noise and bound, the budget, and the failed-update bound."""

    mode: str  # none | user (DP-FedAvg, server noise) | sample (DP-SGD on each client)
    noise_multiplier: float
    clip_norm: float  # user DP: L2 bound of a client's update; sample DP: per-example gradient bound
    target_epsilon: float  # > 0: calibrate noise_multiplier to this budget and never exceed it
    target_delta: float  # 0: the default min(1e-5, 1 / N**1.1), N clients (user DP) or training windows (sample DP)
    accountant: str
    seed: int  # 0: a secret seed from the OS for cohort sampling and DP noise
    canaries: int  # user DP: canary clients inserted per phase for the empirical audit (0: none)
    max_update_norm: float  # a client update (local - global) with a larger L2 norm is a failed client

    def __post_init__(self) -> None:
        _require(self, self.mode in DP_MODES, "mode", f"one of {DP_MODES}")
        _require(self, self.accountant in ACCOUNTANTS, "accountant", f"one of {ACCOUNTANTS}")
        _require_all(self, lambda v: v >= 0, ("seed", "canaries"), "an integer >= 0")
        _require(self, _positive_finite(self.max_update_norm), "max_update_norm", "a finite number > 0")
        _require(self, self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier), "noise_multiplier",
                 "a finite number >= 0")
        _require(self, self.clip_norm > 0, "clip_norm", "a number > 0 (inf disables clipping when dp='none')")
        _require(self, self.target_epsilon >= 0 and math.isfinite(self.target_epsilon), "target_epsilon",
                 "0 (no target) or a finite epsilon > 0")
        _require(self, 0 <= self.target_delta < 1, "target_delta",
                 "0 (default min(1e-5, 1/N**1.1)) or a delta in (0, 1)")
        if self.mode != "none":
            _require(self, math.isfinite(self.clip_norm), "clip_norm", f"a finite bound when dp={self.mode!r}")
            _require(self, self.noise_multiplier > 0 or self.target_epsilon > 0, "noise_multiplier",
                     f"> 0 when dp={self.mode!r} (or set target-epsilon to calibrate it)")


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the run executes; only ``seed`` changes what is computed."""

    seed: int  # model init, local shuffling/dropout, evaluation samples
    threads: int
    device: str
    run_dir: str  # "": runs/flower-<timestamp> relative to the ServerApp's working directory
    resume: bool

    def __post_init__(self) -> None:
        _require(self, self.threads >= 1, "threads", "an integer >= 1")
        _require(self, self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device",
                 "'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class FaultSettings:
    """How the server waits for clients and treats failed ones, and the faults injected for tests."""

    round_timeout: float  # seconds to wait for a round's replies
    max_in_flight: int  # messages outstanding at once (0: all of a round at once)
    max_failure_fraction: float  # a round with more failed clients than this share of its cohort is short
    on_short_round: str  # retry (a new cohort, twice at most, then stop) | skip (no update) | stop
    fault_rate: float  # injected faults: the chance that a sampled client fails (tests, benchmarks)
    fault_kind: str  # error (the client raises before replying) | hang (it answers after round-timeout)

    def __post_init__(self) -> None:
        _require(self, _positive_finite(self.round_timeout), "round_timeout", "a finite number > 0")
        _require(self, self.max_in_flight >= 0, "max_in_flight", "an integer >= 0")
        _require(self, 0 <= self.max_failure_fraction < 1, "max_failure_fraction", "a share of the cohort in [0, 1)")
        _require(self, self.on_short_round in SHORT_ROUND_POLICIES, "on_short_round",
                 f"one of {SHORT_ROUND_POLICIES}")
        _require(self, 0 <= self.fault_rate < 1, "fault_rate", "a probability in [0, 1)")
        _require(self, self.fault_kind in FAULT_KINDS, "fault_kind", f"one of {FAULT_KINDS}")


# Each run-config key and the settings it sets ("part.field"). Keys of the pretrain phase's round loop that
# the contextualize phase shares (strategy, server optimiser, eval-every) set both phases; test-fraction is
# shared with the popularity phase.
KEYS: dict[str, tuple[str, ...]] = {
    "phases": ("phases",),
    "popularity-rounds": ("popularity.rounds",),
    "popularity-fraction-train": ("popularity.fraction_train",),
    "dataset": ("data.dataset",),
    "max-len": ("data.max_len",),
    "users-per-client": ("data.users_per_client",),
    "partition-seed": ("data.partition_seed",),
    "model": ("encoder.model",),
    "d-model": ("encoder.d_model",),
    "n-layers": ("encoder.n_layers",),
    "n-heads": ("encoder.n_heads",),
    "item-dim": ("encoder.item_dim",),
    "item-features": ("encoder.item_features",),
    "item-features-llm": ("encoder.item_features_llm",),
    "dropout": ("encoder.dropout",),
    "seen-offset": ("encoder.seen_offset",),
    "encoder": ("encoder.pretrained",),
    "llm": ("llm.model",),
    "llm-task": ("llm.task",),
    "llm-integration": ("llm.integration",),
    "llm-xattn-ffn": ("llm.xattn_ffn",),
    "llm-objective": ("llm.objective",),
    "llm-user-tokens": ("llm.user_tokens",),
    "llm-rounds": ("contextualize.rounds",),
    "llm-fraction-train": ("contextualize.fraction_train",),
    "llm-local-steps": ("contextualize.local_steps",),
    "llm-batch-size": ("contextualize.batch_size",),
    "llm-lr": ("contextualize.lr",),
    "llm-server-lr": ("contextualize.server_lr",),
    "llm-eval-fraction": ("contextualize.eval_fraction", "contextualize.test_fraction"),
    "num-rounds": ("pretrain.rounds",),
    "fraction-train": ("pretrain.fraction_train",),
    "local-epochs": ("pretrain.local_epochs",),
    "local-steps": ("pretrain.local_steps",),
    "batch-size": ("pretrain.batch_size",),
    "lr": ("pretrain.lr",),
    "strategy": ("pretrain.strategy", "contextualize.strategy"),
    "server-lr": ("pretrain.server_lr",),
    "server-momentum": ("pretrain.server_momentum", "contextualize.server_momentum"),
    "server-tau": ("pretrain.server_tau", "contextualize.server_tau"),
    "server-lr-schedule": ("pretrain.server_lr_schedule", "contextualize.server_lr_schedule"),
    "dp": ("dp.mode",),
    "noise-multiplier": ("dp.noise_multiplier",),
    "clip-norm": ("dp.clip_norm",),
    "target-epsilon": ("dp.target_epsilon",),
    "target-delta": ("dp.target_delta",),
    "accountant": ("dp.accountant",),
    "dp-seed": ("dp.seed",),
    "canaries": ("dp.canaries",),
    "max-update-norm": ("dp.max_update_norm",),
    "eval-every": ("pretrain.eval_every", "contextualize.eval_every"),
    "eval-fraction": ("pretrain.eval_fraction",),
    "test-fraction": ("pretrain.test_fraction", "popularity.test_fraction"),
    "seed": ("runtime.seed",),
    "threads": ("runtime.threads",),
    "device": ("runtime.device",),
    "run-dir": ("runtime.run_dir",),
    "resume": ("runtime.resume",),
    "round-timeout": ("faults.round_timeout",),
    "max-in-flight": ("faults.max_in_flight",),
    "max-failure-fraction": ("faults.max_failure_fraction",),
    "on-short-round": ("faults.on_short_round",),
    "fault-rate": ("faults.fault_rate",),
    "fault-kind": ("faults.fault_kind",),
}
KEY_OF = {path: key for key, paths in KEYS.items() for path in paths}


def popularity_choices(rounds: int) -> dict[str, Any]:
    """The popularity phase's fixed settings: the server averages its ``rounds`` releases (server SGD at rate
    1/rounds, no momentum), clients train nothing, and only the final test evaluates."""
    return {"strategy": "fedavgm", "server_lr": 1.0 / max(rounds, 1),  # rounds < 1: refused by PhaseSettings
            "server_momentum": 0.0, "server_lr_schedule": "constant", "eval_every": 0, "eval_fraction": None,
            "lr": None, "local_epochs": None, "local_steps": None, "batch_size": None, "server_tau": None}


# What a phase has no key for, besides the popularity phase's `popularity_choices`.
UNSET = {"contextualize": {"local_epochs": None}}


@dataclass(frozen=True)
class FederatedConfig:
    """One federated run: the phases to run, in order, and the settings of each concern."""

    phases: tuple[str, ...]
    data: DataSettings
    encoder: EncoderSettings
    llm: LLMSettings
    popularity: PhaseSettings
    pretrain: PhaseSettings
    contextualize: PhaseSettings
    dp: DPSettings
    runtime: RuntimeSettings
    faults: FaultSettings

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederatedConfig:
        """Parse and check a Flower run config (kebab-case keys); raise ValueError naming any bad key."""
        unknown = sorted(set(run_config) - set(KEYS))
        missing = sorted(set(KEYS) - set(run_config))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; known keys: {sorted(KEYS)}")
        if missing:
            raise ValueError(f"run config is missing {missing}: every setting is in [tool.flwr.app.config]")
        nested = nest({key: _typed(key, value) for key, value in run_config.items()})
        parts = {}
        for name, part in _PARTS.items():
            try:
                parts[name] = part(**nested[name])
            except InvalidSetting as err:
                path = f"{name}.{err.field}"
                raise ValueError(f"{KEY_OF.get(path, path)}={err.value!r}: expected {err.expected}") from None
        return cls(phases=tuple(nested["phases"]), **parts)

    def __post_init__(self) -> None:
        names = self.phases

        def check(ok: bool, path: str, expected: str) -> None:
            if not ok:
                value = ",".join(names) if path == "phases" else self._value(path)
                raise ValueError(f"{KEY_OF[path]}={value!r}: expected {expected}")

        for name in names:
            check(name in PHASE_NAMES, "phases", f"comma-separated phase names from {PHASE_NAMES}")
        check(bool(names), "phases", "at least one phase")
        check(len(set(names)) == len(names), "phases", "each phase at most once")
        if "popularity" in names:
            check("pretrain" in names and names.index("popularity") < names.index("pretrain"), "phases",
                  "popularity before pretrain (its release initializes the encoder's item prior)")
            check(self.encoder.model == "ar", "phases", "no 'popularity' unless model='ar' (whose item scores have "
                  "a per-item bias to initialize)")
            check(self.dp.mode != "sample", "dp.mode", "'user' or 'none' when phases includes popularity: its "
                  "clients send their rated items for the server to clip and noise (user-level DP), which DP-SGD on "
                  "the clients (dp='sample', the server not trusted) does not cover")
        check(self.llm.user_tokens == "events" or self.encoder.model in ("ar", "dual"), "llm.user_tokens",
              "'events' unless model is 'ar' or 'dual' (the encoders with a next-item vector)")
        if "contextualize" not in names:
            return
        check(self.llm.task != "reviewg" or detect_reviews(self.data.dataset) is not None, "llm.task",
              "nextitem or favgenre unless dataset is an Amazon / Google Local review folder (reviewg needs "
              "review text)")
        if "pretrain" in names:
            check(names.index("pretrain") < names.index("contextualize"), "phases",
                  "pretrain before contextualize (the LLM phase starts from the pretrained encoder)")
            check(not self.encoder.pretrained, "encoder.pretrained",
                  "'' when phases includes pretrain: contextualize starts from this run's pretrained encoder")
        else:
            check(bool(self.encoder.pretrained), "encoder.pretrained",
                  "a pretrained encoder when phases has contextualize without pretrain: a saved model folder, "
                  "a Flower run directory (final/) or a `fed-userllm pretrain` run directory (best/)")
        check(self.dp.mode != "sample", "dp.mode",
              "'user' or 'none' when phases includes contextualize. DP-SGD (dp='sample') is not supported for "
              "the LLM phase: its loss is a mean over all target tokens of a batch (per-example gradients are "
              "not independent) and its batches are not Poisson-sampled, so Opacus's accounting would not "
              "hold. Use dp='user' (DP-FedAvg on exactly the exchanged tensors) or phases='pretrain'")

    def phase(self, name: str) -> PhaseSettings:
        """Phase ``name``'s settings (every phase has them, whether or not this run runs it)."""
        if name not in PHASE_NAMES:
            raise ValueError(f"phase {name!r}: expected one of {PHASE_NAMES}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        """The nested settings as JSON values (what a run directory's config.json holds)."""
        return {**asdict(self), "phases": list(self.phases)}

    def _value(self, path: str) -> Any:
        part, name = path.split(".")
        return getattr(getattr(self, part), name)


_PARTS = {"data": DataSettings, "encoder": EncoderSettings, "llm": LLMSettings, "popularity": PhaseSettings,
          "pretrain": PhaseSettings, "contextualize": PhaseSettings, "dp": DPSettings, "runtime": RuntimeSettings,
          "faults": FaultSettings}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _typed(key: str, value: Any) -> Any:
    """``value`` as the type of the settings ``key`` sets (an int is a valid float); ValueError naming the key."""
    part, _, name = KEYS[key][0].partition(".")
    type_name = "str" if part == "phases" else next(
        f.type for f in fields(_PARTS[part]) if f.name == name).removesuffix(" | None")
    kind = _TYPES[type_name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r}: expected a {type_name}")
    return value


def nest(run_config: dict) -> dict:
    """The nested settings (`FederatedConfig.to_dict`'s form) that the run-config keys present in
    ``run_config`` set, with the popularity phase's fixed choices and each phase's unset fields."""
    nested: dict = {part: dict(UNSET.get(part, {})) for part in _PARTS}
    for key, value in run_config.items():
        for path in KEYS[key]:
            if path == "phases":
                nested["phases"] = [p.strip() for p in value.split(",") if p.strip()]
            else:
                part, name = path.split(".")
                nested[part][name] = value
    if "popularity-rounds" in run_config:
        nested["popularity"] |= popularity_choices(run_config["popularity-rounds"])
    return nested


def run_config_of(nested: dict) -> dict:
    """The run-config keys of nested settings (the inverse of `nest` for the keys they hold)."""
    keys = {}
    for key, (path, *_) in KEYS.items():
        if path == "phases":
            keys[key] = ",".join(nested["phases"])
            continue
        part, name = path.split(".")
        if name in nested.get(part, {}):
            keys[key] = nested[part][name]
    return keys


def saved_settings(settings: dict) -> dict:
    """A Flower run directory's saved settings in the nested form. Runs written before the settings were
    nested saved one flat field per run-config key (``max_len`` for ``max-len``); they are converted. A
    setting added since takes the value such runs had (``seen_offset``: False)."""
    if "data" not in settings:
        settings = nest({key: value for key, value in ((k.replace("_", "-"), v) for k, v in settings.items())
                         if key in KEYS})
    return {**settings, "encoder": {"seen_offset": False, **settings.get("encoder", {})}}
