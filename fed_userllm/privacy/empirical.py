"""One-shot empirical privacy estimation from canary cosines (Andrew, Kairouz, Oh, Oprea, McMahan,
Suriyakumar, "One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024).

k canaries (random unit directions) take part in training; k others are held out. For the final model change
Delta, the cosine between Delta and an inserted canary is what an adversary holding the final model measures
to tell whether that canary was in the data; a held-out canary shows the same statistic when it was not. For a
Gaussian mechanism in high dimension the two cosines are Gaussian with the same spread, one shifted by the
canary's contribution: the estimator fits N(mu_in, s^2) to the inserted and N(mu_out, s^2) to the held-out
cosines (s pooled) and reports the epsilon of the Gaussian mechanism with mu = |mu_in - mu_out| / s (Balle and
Wang's analytic formula), which converges to the mechanism's true epsilon. A percentile bootstrap over the
canaries gives the confidence interval.

One spread, not one per set: at a small delta the epsilon of two Gaussians of unequal spread is dominated by
their tails, so the sampling error of two separately fitted spreads alone reads as a sizeable epsilon when
nothing leaks. The shared spread is the mechanism's own structure and keeps the estimate near 0 then.

It is an estimate for an adversary who sees only the final model, not a bound: it can show that a run leaks
more than its accountant claims (an interval wholly above the bound), never prove that it leaks less.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import log_ndtr

EPSILON_CAP = 1e4  # beyond this inserted and held-out canaries are told apart with certainty: reported as inf


@dataclass(frozen=True)
class EmpiricalEstimate:
    """An epsilon estimate at ``delta`` with a bootstrap confidence interval, and the fitted Gaussians."""

    epsilon: float
    ci_low: float
    ci_high: float
    confidence: float
    delta: float
    inserted: int
    held_out: int
    inserted_mean: float
    held_out_mean: float
    std: float  # the pooled standard deviation of the cosines

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_epsilon(inserted: np.ndarray, held_out: np.ndarray, delta: float, bootstrap: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> EmpiricalEstimate:
    """The epsilon estimate from the cosines of ``inserted`` and ``held_out`` canaries with the final change.

    The interval resamples both sets of canaries with replacement ``bootstrap`` times (seeded by ``seed``).
    """
    inserted, held_out = np.asarray(inserted, dtype=np.float64), np.asarray(held_out, dtype=np.float64)
    if inserted.ndim != 1 or held_out.ndim != 1 or min(len(inserted), len(held_out)) < 2:
        raise ValueError(f"need at least 2 inserted and 2 held-out cosines, got {inserted.shape} and "
                         f"{held_out.shape}")
    if not (np.isfinite(inserted).all() and np.isfinite(held_out).all()):
        raise ValueError("the canary cosines hold NaN or infinite values")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    resampled = _separation(inserted[rng.integers(0, len(inserted), (bootstrap, len(inserted)))],
                            held_out[rng.integers(0, len(held_out), (bootstrap, len(held_out)))])
    epsilons = gaussian_epsilon(resampled, delta)
    tail = (1 - confidence) / 2
    return EmpiricalEstimate(
        epsilon=float(gaussian_epsilon(_separation(inserted[None], held_out[None]), delta)[0]),
        ci_low=float(np.quantile(epsilons, tail)),
        ci_high=float(np.quantile(epsilons, 1 - tail)),
        confidence=confidence, delta=delta, inserted=len(inserted), held_out=len(held_out),
        inserted_mean=float(inserted.mean()), held_out_mean=float(held_out.mean()),
        std=float(np.sqrt(_pooled_variance(inserted[None], held_out[None])[0])))


def _pooled_variance(inserted: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    n, m = inserted.shape[1], held_out.shape[1]
    return ((n - 1) * inserted.var(1, ddof=1) + (m - 1) * held_out.var(1, ddof=1)) / (n + m - 2)


def _separation(inserted: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """mu = |mean(inserted) - mean(held_out)| / pooled std, per row."""
    spread = np.sqrt(np.maximum(_pooled_variance(inserted, held_out), np.finfo(float).tiny))
    return np.abs(inserted.mean(1) - held_out.mean(1)) / spread


def gaussian_epsilon(mu: np.ndarray | float, delta: float) -> np.ndarray:
    """Epsilon at ``delta`` of the Gaussian mechanism whose outputs on neighbours are N(0, 1) and N(mu, 1)
    (elementwise; inf beyond `EPSILON_CAP`): the smallest epsilon >= 0 with
    Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2) <= delta (Balle and Wang 2018, Theorem 8),
    found by bisection (the left side decreases in epsilon) and evaluated in logs for large mu and epsilon.
    """
    mu = np.atleast_1d(np.abs(np.asarray(mu, dtype=np.float64)))
    log_delta = np.log(delta)

    def above(eps: np.ndarray) -> np.ndarray:  # delta(eps) > delta
        with np.errstate(divide="ignore", invalid="ignore"):
            first = log_ndtr(-eps / mu + mu / 2)
            second = eps + log_ndtr(-eps / mu - mu / 2)
            gap = first + np.log1p(-np.exp(np.minimum(second - first, 0.0)))
        return (mu > 0) & (second < first) & (gap > log_delta)

    low, high = np.zeros_like(mu), np.ones_like(mu)
    while np.any(grow := above(high) & (high < EPSILON_CAP)):
        low, high = np.where(grow, high, low), np.where(grow, 2 * high, high)
    for _ in range(60):
        mid = (low + high) / 2
        up = above(mid)
        low, high = np.where(up, mid, low), np.where(up, high, mid)
    return np.where(~above(np.zeros_like(mu)), 0.0, np.where(high >= EPSILON_CAP, np.inf, high))
