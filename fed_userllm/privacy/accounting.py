"""Privacy accounting for Poisson-subsampled Gaussian mechanisms, via Opacus accountants.

Both DP modes of fed-userllm are compositions of the same mechanism: a sum with L2 sensitivity C, Poisson
subsampled at rate q, plus N(0, (sigma*C)^2) noise, repeated `steps` times.
- user-level DP-FedAvg: one step per federated round, q = client sampling rate, units = users (clients);
- sample-level DP-SGD: one step per local optimizer step, q = batch size / local examples, units = examples.
Opacus's RDP and PRV accountants assume exactly this (Poisson sampling, add/remove-one neighbours), so we
feed them a history [(sigma, q, steps)] directly instead of stepping an accountant round by round.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
# Opacus's PRV accountant returns an upper bound that is at most this far above the true epsilon.
PRV_EPS_ERROR = 0.01

History = Sequence[tuple[float, float, int]]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def _check_steps(steps: int, minimum: int = 0) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < minimum:
        raise ValueError(f"steps must be an integer >= {minimum}, got {steps!r}")


def _accountant_kwargs(accountant: str) -> dict:
    return {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}


def epsilon_from_history(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after the composition of [(noise_multiplier, sample_rate, steps), ...].

    A heterogeneous history covers a client whose DP-SGD sample rate changed between rounds.
    Zero steps cost nothing (epsilon 0); a zero noise multiplier gives no privacy (epsilon inf).
    """
    _check_accountant(accountant)
    _check_delta(delta)
    for sigma, q, steps in history:
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {sigma}")
        _check_sample_rate(q)
        _check_steps(steps)
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acct = create_accountant(accountant)
    acct.history = history
    try:
        # PRV evaluates log(1 - q), which is log(0) for q = 1; Opacus handles the resulting -inf correctly.
        with np.errstate(divide="ignore"):
            return float(acct.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"the {accountant} accountant cannot evaluate history={history} at delta={delta}: {err} "
            "(PRV has numerical limits for tiny delta or extreme noise; use accountant='rdp')"
        ) from err


def extend_history(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> list[list]:
    """``history`` with ``steps`` more steps at (noise_multiplier, sample_rate), merged into the last entry when
    that has the same parameters (so a single-rate history stays one entry, exactly as before)."""
    history = [list(entry) for entry in history]
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        return [*history[:-1], [noise_multiplier, sample_rate, history[-1][2] + steps]]
    return [*history, [noise_multiplier, sample_rate, steps]]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian releases (0 for steps=0)."""
    return epsilon_from_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to `epsilon_tolerance`) whose epsilon after `steps` is <= target_epsilon.

    Call it before training: the budget then holds for the planned number of steps/rounds.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, minimum=1)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    # The search visits tiny noise levels whose optimal RDP order is the grid's edge; Opacus warns about
    # those intermediate points, not about the result (epsilon() at the returned sigma still would).
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
                **_accountant_kwargs(accountant),
            )
        )


def calibrate_noise_for_plan(
    target_epsilon: float,
    delta: float,
    plan: Sequence[tuple[float, int]],
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose epsilon after the composed plan [(sample_rate, steps), ...] is <= target.

    For runs whose phases sample at different rates (one noise multiplier for all of them). A one-entry
    plan is exactly `calibrate_noise`; otherwise the same doubling-then-bisection search as Opacus's
    ``get_noise_multiplier``, over the composed history.
    """
    if len(plan) == 1:
        return calibrate_noise(target_epsilon, delta, plan[0][0], plan[0][1], accountant, epsilon_tolerance)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if not plan:
        raise ValueError("plan must hold at least one (sample_rate, steps) entry")

    def spent(sigma: float) -> float:
        return epsilon_from_history([(sigma, q, steps) for q, steps in plan], delta, accountant)

    low, high = 0.0, 10.0
    with warnings.catch_warnings():  # intermediate points only, as in `calibrate_noise`
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        while (eps_high := spent(high)) > target_epsilon:
            low, high = high, 2 * high
            if high > 1e6:
                raise ValueError(f"target_epsilon={target_epsilon} is too low for plan={list(plan)}")
        while target_epsilon - eps_high > epsilon_tolerance:
            mid = (low + high) / 2
            eps = spent(mid)
            if eps < target_epsilon:
                high, eps_high = mid, eps
            else:
                low = mid
    return high


def max_rounds_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    accountant: str = "rdp",
    limit: int = 100_000,
    history: History = (),
) -> int:
    """Largest R <= limit with epsilon(R) <= target_epsilon (0 if even one round exceeds it).

    R rounds at (noise_multiplier, sample_rate) are composed after ``history`` (rounds already spent,
    possibly at other rates). Epsilon grows monotonically with R, so an exponential then binary search needs
    O(log R) accountant calls. `limit` bounds the search because PRV's cost grows with R (about a second
    at 1e5 steps).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    _check_steps(limit, minimum=1)

    def within(rounds: int) -> bool:
        composed = extend_history(history, noise_multiplier, sample_rate, rounds)
        return epsilon_from_history(composed, delta, accountant) <= target_epsilon

    if not within(1):
        return 0
    low, high = 1, 2  # invariant: within(low)
    while high <= limit and within(high):
        low, high = high, 2 * high
    if high > limit:
        if within(limit):
            return limit
        high = limit
    while high - low > 1:  # invariant: within(low) and not within(high)
        mid = (low + high) // 2
        low, high = (mid, high) if within(mid) else (low, mid)
    return low


def default_delta(num_units: int) -> float:
    """Default delta = min(1e-5, 1 / N**1.1) for N protected units (users for user-level DP, training
    examples for sample-level DP).

    delta must be far below 1/N: a mechanism that publishes one random unit's data in the clear is
    (0, 1/N)-DP, and N * delta is roughly the chance that some unit is exposed. 1 / N**1.1 keeps delta
    polynomially below 1/N at every scale; the 1e-5 cap is the usual practice for populations of up to
    ~35,000 units, where 1 / N**1.1 alone would still be large (N * delta = 0.53 at N = 610).
    """
    if isinstance(num_units, bool) or not isinstance(num_units, int | np.integer) or num_units < 2:
        raise ValueError(f"num_units must be an integer >= 2, got {num_units!r}")
    return min(1e-5, float(num_units) ** -1.1)
