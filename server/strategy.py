"""Flower's FedAvg / FedAdam with Poisson-sampled cohorts and, for user-level DP, DP-FedAvg aggregation.

Every strategy here IS a ``flwr.serverapp.strategy`` strategy; we change two steps and keep the rest:

- ``configure_train`` samples the cohort by Poisson sampling (each client joins independently with
  probability q = ``fraction_train``), from a seeded generator so a resumed run repeats its cohorts, and
  sends the phase's message type (e.g. ``train.pretrain``);
- `UserDPFedAvg.aggregate_train` replaces the weighted mean by user-level DP-FedAvg from
  `fed_userllm.privacy`: clip each update (local - global) to C, sum, add N(0, (sigma*C)^2), divide by
  the fixed expected cohort q*N with uniform weights; canary clients (`fed_userllm.privacy.canaries`), when
  set, join that sum.

Under sample-level DP the mean is weighted by the clients' DP-SGD step counts, which the accounting needs
anyway, instead of example counts, which the clients do not send there.

FedAdam composes with both through the MRO: ``class UserDPFedAdam(FedAdam, UserDPFedAvg)`` runs
FedAdam's server-side Adam step on top of the DP average (post-processing, so the guarantee is unchanged).

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it wraps FedAvg's fixed-size cohort
(``fraction_train`` of the nodes, drawn with ``random.sample``), requires exactly that many replies, and adds
noise with std sigma*C / num_sampled_clients. Its accountant (``flwr.supercore.privacy_accounting``) only
accepts ``SamplingMethod.NO_AMPLIFICATION`` for this wrapper: every round is charged as if every client took
part, which is valid but ignores privacy amplification by sampling (a much larger epsilon at q << 1).
Amplification needs Poisson sampling with a secret cohort and a denominator that does not depend on who
showed up (the expected cohort q*N); that is the mechanism the Opacus RDP/PRV accountants in
`fed_userllm.privacy` analyse, so the noise, sampling, accounting and ledger all come from there.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy

from fed_userllm import streams
from fed_userllm.privacy import Canaries, aggregate_dp_fedavg, model_update, poisson_sample
from fed_userllm.train.federated_config import DPSettings, PhaseSettings


class PoissonFedAvg(FedAvg):
    """FedAvg (weighted by ``num-examples``) over a Poisson-sampled cohort.

    Set ``seed`` (cohort randomness; keep it secret under DP: amplification assumes nobody knows who was
    sampled) and ``message_type`` (the phase's train message) after construction.
    """

    seed: int = 0
    attempt: int = 0  # a retried round (too many failures) draws a fresh cohort and fresh noise
    message_type: str = MessageType.TRAIN
    num_clients: int = 0  # N, the population the cohort was drawn from in the last configured round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        nodes = sorted(grid.get_node_ids())
        self.num_clients = len(nodes)
        rng = np.random.default_rng([self.seed, server_round, streams.COHORT, self.attempt])
        chosen = poisson_sample(len(nodes), self.fraction_train, rng)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(record, dst_node_id=nodes[i], message_type=self.message_type,
                        group_id=str(server_round)) for i in chosen]


class UserDPFedAvg(PoissonFedAvg):
    """User-level DP-FedAvg (McMahan et al. 2018) with Poisson sampling, aggregated by `fed_userllm.privacy`.

    Set ``clip_norm`` and ``noise_multiplier`` (and ``canaries`` for an empirical audit) after construction.
    The noise generator is seeded from (``seed``, round), so a resumed round adds the same noise; ``seed``
    must therefore stay secret. ``last_stats`` holds the `DPAggregateStats` of the last aggregation (update
    norms, share clipped), ``last_canaries`` how many canaries it inserted.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    canaries: Canaries | None = None
    last_stats = None
    last_canaries = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The DP average; also for an empty cohort (Poisson may sample nobody: the round is all noise)."""
        valid = [r for r in replies if not r.has_error()]
        keys = list(self.global_arrays.keys())
        base = [self.global_arrays[k].numpy() for k in keys]
        updates = (model_update([r.content[self.arrayrecord_key][k].numpy() for k in keys], base)
                   for r in valid)
        rng = np.random.default_rng([self.seed, server_round, streams.NOISE, self.attempt])
        chosen = [] if self.canaries is None else self.canaries.participants(server_round, self.attempt)
        self.last_canaries = len(chosen)
        canaries = (self.canaries.update(int(i)) for i in chosen)
        new, self.last_stats = aggregate_dp_fedavg(base, updates, self.clip_norm, self.noise_multiplier,
                                                   self.fraction_train * self.num_clients, rng, canaries)
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, new, strict=True)})
        stats = self.last_stats
        return arrays, MetricRecord({"update-norm-mean": float(np.mean(stats.update_norms or [0.0])),
                                     "fraction-clipped": stats.fraction_clipped})


class PoissonFedAdam(FedAdam, PoissonFedAvg):
    """FedAdam over a Poisson-sampled cohort (Adam applied to the weighted mean)."""


class UserDPFedAdam(FedAdam, UserDPFedAvg):
    """FedAdam applied to the user-level DP-FedAvg average."""


class _ServerMomentum(FedAvgM):
    """FedAvgM whose current model is always the one the round was configured with (the runner's), so a
    skipped, refused or resumed round cannot leave a stale copy behind."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)


class PoissonFedAvgM(_ServerMomentum, PoissonFedAvg):
    """FedAvgM (server SGD with momentum) over a Poisson-sampled cohort."""


class UserDPFedAvgM(_ServerMomentum, UserDPFedAvg):
    """Server SGD with momentum on the user-level DP-FedAvg average (DP-FedAvgM, McMahan et al. 2018): unlike
    Adam it does not rescale the coordinates that carry only noise up to full steps."""


def build_strategy(phase: PhaseSettings, dp: DPSettings, seed: int, noise_multiplier: float) -> Strategy:
    """The strategy for ``phase.strategy`` and ``dp.mode`` (sample-level DP: the mean weighted by DP-SGD steps)."""
    user_dp = dp.mode == "user"
    common = {"fraction_train": phase.fraction_train, "min_train_nodes": 0, "min_available_nodes": 1,
              "weighted_by_key": "steps" if dp.mode == "sample" else "num-examples"}
    if phase.strategy == "fedadam":
        strategy = (UserDPFedAdam if user_dp else PoissonFedAdam)(**common, eta=phase.server_lr, eta_l=phase.lr,
                                                                 tau=phase.server_tau)
    elif phase.strategy == "fedavgm":
        strategy = (UserDPFedAvgM if user_dp else PoissonFedAvgM)(
            **common, server_learning_rate=phase.server_lr, server_momentum=phase.server_momentum)
    else:
        strategy = (UserDPFedAvg if user_dp else PoissonFedAvg)(**common)
    strategy.seed = seed
    if user_dp:
        strategy.clip_norm, strategy.noise_multiplier = dp.clip_norm, noise_multiplier
    return strategy


def server_lr(phase: PhaseSettings, server_round: int) -> float:
    """The server learning rate of ``server_round`` (1-based) under the phase's ``server_lr_schedule``."""
    if phase.server_lr_schedule == "constant":
        return phase.server_lr
    return phase.server_lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / phase.rounds))


def set_server_lr(strategy: Strategy, lr: float) -> None:
    """The server learning rate of this round (FedAdam's eta, FedAvgM's server SGD step); FedAvg has none."""
    if isinstance(strategy, FedAdam):
        strategy.eta = lr
    elif isinstance(strategy, FedAvgM):
        strategy.server_learning_rate = lr


def get_server_lr(strategy: Strategy) -> float | None:
    if isinstance(strategy, FedAdam):
        return strategy.eta
    return strategy.server_learning_rate if isinstance(strategy, FedAvgM) else None


def strategy_state(strategy: Strategy) -> dict:
    """What a resumed run needs besides the global arrays: FedAdam's moments, FedAvgM's momentum."""
    return {"m_t": getattr(strategy, "m_t", None), "v_t": getattr(strategy, "v_t", None),
            "momentum": getattr(strategy, "momentum_vector", None)}


def load_strategy_state(strategy: Strategy, state: dict) -> None:
    if isinstance(strategy, FedAdam):
        strategy.m_t, strategy.v_t = state["m_t"], state["v_t"]
    if isinstance(strategy, FedAvgM):
        strategy.momentum_vector = state.get("momentum")
