"""Differential privacy for fed-userllm: Poisson sampling, DP-FedAvg, Opacus accounting, ledger, audit, the
empirical audit with canaries, and a federated run's budget policy (`fed_userllm.privacy.budget`).

Model-agnostic and Flower-agnostic: everything works on lists of numpy arrays / torch tensors.
"""

from fed_userllm.privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise,
    calibrate_noise_for_plan,
    default_delta,
    epsilon,
    epsilon_from_history,
    max_rounds_within_budget,
)
from fed_userllm.privacy.audit import AuditReport, audit
from fed_userllm.privacy.canaries import Canaries, canary_seed, empirical_audit
from fed_userllm.privacy.dp_fedavg import (
    DPAggregateStats,
    aggregate_dp_fedavg,
    clip_update,
    l2_norm,
    model_update,
    weighted_fedavg,
)
from fed_userllm.privacy.empirical import EmpiricalEstimate, estimate_epsilon, gaussian_epsilon
from fed_userllm.privacy.ledger import (
    SAMPLE_LEVEL,
    USER_LEVEL,
    LedgerConfig,
    LedgerError,
    LedgerMismatchError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    TornLedgerError,
    release_digest,
)
from fed_userllm.privacy.sampling import poisson_sample

__all__ = [
    "ACCOUNTANTS",
    "SAMPLE_LEVEL",
    "USER_LEVEL",
    "AuditReport",
    "Canaries",
    "DPAggregateStats",
    "EmpiricalEstimate",
    "LedgerConfig",
    "LedgerError",
    "LedgerMismatchError",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "TornLedgerError",
    "aggregate_dp_fedavg",
    "audit",
    "calibrate_noise",
    "calibrate_noise_for_plan",
    "canary_seed",
    "clip_update",
    "default_delta",
    "empirical_audit",
    "epsilon",
    "epsilon_from_history",
    "estimate_epsilon",
    "gaussian_epsilon",
    "l2_norm",
    "max_rounds_within_budget",
    "model_update",
    "poisson_sample",
    "release_digest",
    "weighted_fedavg",
]
