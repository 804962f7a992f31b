"""The one-shot empirical privacy audit (Andrew et al., ICLR 2024): the two-Gaussian epsilon, the estimate on a
Gaussian mechanism of known epsilon, canary clients, and the audit of real federated runs against their bound.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from federation_fixtures import PINNED, TINY_FEDERATION, USERS
from scipy.optimize import brentq
from scipy.stats import norm

from fed_userllm import streams
from fed_userllm.cli import main
from fed_userllm.privacy import Canaries, canary_seed, empirical_audit, estimate_epsilon, gaussian_epsilon
from fed_userllm.privacy.sampling import poisson_sample
from fed_userllm.server import strategy as strategy_module
from fed_userllm.server.local_grid import LocalGrid, app_defaults
from fed_userllm.server.runner import run
from fed_userllm.train.federated_config import FederatedConfig

DELTA = 1e-5
# the values these tests were written for
TINY = {**TINY_FEDERATION, **PINNED, "eval-every": 0, "test-fraction": 0.25, "phases": "pretrain", "dp": "user",
        "dp-seed": 3, "canaries": 100, "fraction-train": 0.5, "num-rounds": 5}


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle and Wang (2018): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps."""
    gap = lambda eps: norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta  # noqa: E731
    return 0.0 if gap(0) <= 0 else brentq(gap, 0, 500, xtol=1e-12)


@pytest.mark.parametrize("mu", [0.01, 0.5, 1.0, 3.0, 8.0, 20.0])
def test_gaussian_epsilon_is_balle_and_wangs_analytic_gaussian_mechanism(mu):
    assert gaussian_epsilon(mu, DELTA)[0] == pytest.approx(analytic_gaussian_epsilon(mu, DELTA), rel=1e-7)
    assert gaussian_epsilon(-mu, DELTA)[0] == gaussian_epsilon(mu, DELTA)[0]  # either direction of the shift


def test_gaussian_epsilon_edges():
    assert gaussian_epsilon(0.0, DELTA)[0] == 0.0
    assert list(gaussian_epsilon([0.5, 1.0, 2.0], DELTA)) == sorted(gaussian_epsilon([0.5, 1.0, 2.0], DELTA))
    assert gaussian_epsilon(1.0, 1e-3)[0] < gaussian_epsilon(1.0, 1e-6)[0]
    assert math.isinf(gaussian_epsilon(1e3, DELTA)[0])  # certain to tell apart


def test_the_estimate_is_the_gaussian_mechanism_of_the_fitted_separation():
    rng = np.random.default_rng(0)
    inserted, held_out = rng.normal(0.3, 0.1, 400), rng.normal(0.0, 0.1, 300)
    estimate = estimate_epsilon(inserted, held_out, DELTA)
    pooled = math.sqrt((399 * inserted.var(ddof=1) + 299 * held_out.var(ddof=1)) / 698)
    assert estimate.std == pytest.approx(pooled)
    mu = (inserted.mean() - held_out.mean()) / pooled
    assert estimate.epsilon == pytest.approx(analytic_gaussian_epsilon(mu, DELTA), rel=1e-6)
    assert estimate.ci_low < estimate.epsilon < estimate.ci_high and estimate.confidence == 0.95
    # the interval narrows with more canaries, about as 1/sqrt(k)
    wide = estimate_epsilon(inserted[:100], held_out[:75], DELTA)
    assert wide.ci_high - wide.ci_low > 1.5 * (estimate.ci_high - estimate.ci_low)


def test_estimate_validates_its_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        estimate_epsilon(np.array([1.0]), np.zeros(5), DELTA)
    with pytest.raises(ValueError, match="NaN"):
        estimate_epsilon(np.array([1.0, np.nan]), np.zeros(5), DELTA)
    with pytest.raises(ValueError, match="delta"):
        estimate_epsilon(np.ones(3), np.zeros(3), 0.0)


def gaussian_mechanism_estimate(sigma: float, count: int, dim: int, seed: int):
    """Release sum(inserted canaries) + N(0, sigma^2 I): a Gaussian mechanism of sensitivity 1 per canary."""
    canaries = Canaries(seed, count, [("w", (dim // 4, 4))], clip_norm=1.0, sample_rate=1.0)
    change = sum(canaries.direction(i) for i in range(count))
    change = change + sigma * np.random.default_rng([seed, 99]).standard_normal(dim)
    return estimate_epsilon(*canaries.cosines(change), DELTA)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_on_a_gaussian_mechanism_of_known_epsilon_the_estimate_is_close_to_it(sigma):
    count, dim = 1000, 20_000
    estimate = gaussian_mechanism_estimate(sigma, count, dim, seed=int(10 * sigma))
    true = analytic_gaussian_epsilon(1 / sigma, DELTA)
    # Tolerance from the number of canaries: the two fitted means each err by ~s/sqrt(k), so their separation by
    # sqrt(2/k) standard deviations; 3 such errors either way bound the estimate. The other inserted canaries
    # add (k-1)/d to the cosines' variance, which an adversary reading one canary cannot remove.
    se = math.sqrt(2 / count)
    effective = 1 / math.sqrt(sigma**2 + (count - 1) / dim)
    low, high = (analytic_gaussian_epsilon(mu, DELTA) for mu in (effective - 3 * se, 1 / sigma + 3 * se))
    assert low < true < high
    assert low <= estimate.epsilon <= high, (estimate, true)
    assert estimate.ci_low < estimate.ci_high and estimate.inserted == estimate.held_out == count


def test_without_noise_the_estimate_is_large_and_with_large_noise_it_is_small():
    loud = gaussian_mechanism_estimate(0.0, 200, 20_000, seed=1)  # only the other canaries blur each one
    quiet = gaussian_mechanism_estimate(20.0, 1000, 20_000, seed=2)  # true epsilon 0.17
    assert loud.epsilon > 30 and loud.ci_low > 20
    assert quiet.epsilon < 1 and quiet.ci_low < analytic_gaussian_epsilon(1 / 20, DELTA)


def test_canaries_are_seeded_unit_directions_split_like_the_exchanged_tensors():
    canaries = Canaries(5, 10, [("a", (3, 4)), ("b", (7,))], clip_norm=2.0, sample_rate=0.5)
    assert canaries.dimension == 19
    u = canaries.direction(3)
    assert np.linalg.norm(u) == pytest.approx(1.0) and np.array_equal(u, canaries.direction(3))
    assert not np.allclose(u, canaries.direction(4)) and not np.allclose(u, Canaries(6, 10, canaries.tensors, 2.0,
                                                                                    0.5).direction(3))
    a, b = canaries.update(3)
    assert a.shape == (3, 4) and b.shape == (7,)
    assert np.allclose(np.concatenate([a.ravel(), b]), 2.0 * u)  # norm C: clipping keeps all of it
    assert np.allclose(canaries.flatten({"a": a, "b": b}), 2.0 * u)
    with pytest.raises(IndexError):
        canaries.direction(20)  # 10 inserted + 10 held out
    assert canary_seed(1, "pretrain") != canary_seed(1, "contextualize") != canary_seed(2, "contextualize")


def test_canary_participation_is_poisson_at_q_and_independent_of_the_cohort():
    seed, count, q, rounds = 11, 200, 0.3, 300
    canaries = Canaries(canary_seed(seed, "pretrain"), count, [("w", (4,))], 1.0, q)
    joined = np.zeros((rounds, count))
    cohort = np.zeros((rounds, count))
    for r in range(rounds):
        joined[r, canaries.participants(r + 1)] = 1
        strategy_draw = np.random.default_rng([seed, r + 1, streams.COHORT, 0])
        cohort[r, poisson_sample(count, q, strategy_draw)] = 1
    n = rounds * count
    assert abs(joined.mean() - q) < 4 * math.sqrt(q * (1 - q) / n)
    correlation = np.corrcoef(joined.ravel(), cohort.ravel())[0, 1]
    assert abs(correlation) < 4 / math.sqrt(n)  # a canary's participation says nothing about client i's
    assert not np.array_equal(canaries.participants(1, attempt=0), canaries.participants(1, attempt=1))


def dp_run(tmp_path: Path, **overrides) -> Path:
    config = {**app_defaults(), **TINY, "run-dir": str(tmp_path / "run"),
              **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return run(LocalGrid(config, USERS), FederatedConfig.from_run_config(config))


def test_in_a_federated_dp_run_the_estimate_stays_below_the_accountants_bound(tmp_path):
    run_dir = dp_run(tmp_path, noise_multiplier=1.0)
    (phase,) = empirical_audit(run_dir)
    assert phase.phase == "pretrain" and phase.rounds == 5 and phase.estimate.inserted == 100
    ledger = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    assert phase.bound_rdp == pytest.approx(ledger[-1]["epsilon"], rel=1e-9)  # one phase: the whole run's bound
    assert phase.estimate.epsilon < phase.bound_prv < phase.bound_rdp and not phase.exceeds_bound


def test_with_large_noise_the_federated_estimate_is_small(tmp_path):
    run_dir = dp_run(tmp_path, noise_multiplier=10.0, num_rounds=3)
    (phase,) = empirical_audit(run_dir)
    # 100 canaries resolve the separation mu to ~sqrt(2/100): below that, the estimate is noise around
    # gaussian_epsilon(0.14) = 0.5, and only its interval can be compared with so small a bound
    assert phase.bound_prv < 0.5 and phase.estimate.epsilon < 1 and not phase.exceeds_bound


def test_with_almost_no_dp_noise_the_federated_estimate_is_large(tmp_path):
    run_dir = dp_run(tmp_path, noise_multiplier=0.1, fraction_train=1.0, num_rounds=3)  # accountant: epsilon > 200
    (phase,) = empirical_audit(run_dir)
    assert phase.estimate.epsilon > 10 and phase.estimate.ci_low > 5


def test_the_audit_catches_a_run_that_adds_less_noise_than_it_charges(tmp_path, monkeypatch, capsys):
    real = strategy_module.aggregate_dp_fedavg

    def forgets_the_noise(global_weights, updates, clip_norm, noise_multiplier, *args, **kwargs):
        return real(global_weights, updates, clip_norm, 0.0, *args, **kwargs)

    monkeypatch.setattr(strategy_module, "aggregate_dp_fedavg", forgets_the_noise)
    run_dir = dp_run(tmp_path, noise_multiplier=2.0, num_rounds=3)
    (phase,) = empirical_audit(run_dir)
    assert phase.exceeds_bound and phase.estimate.ci_low > phase.bound_rdp  # the ledger alone cannot see it
    assert main(["audit", str(run_dir), "--empirical"]) == 1
    assert "EXCEEDS THE BOUND" in capsys.readouterr().out


def test_cli_audit_empirical_prints_the_estimate_beside_the_bound(tmp_path, capsys):
    run_dir = dp_run(tmp_path, num_rounds=2)
    assert main(["audit", str(run_dir), "--empirical"]) == 0
    text = capsys.readouterr().out
    assert "Result: OK" in text and "empirical epsilon" in text and "accountant bound for these rounds" in text
    assert main(["audit", str(run_dir), "--empirical", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (phase,) = report["empirical"]
    assert report["ok"] and phase["phase"] == "pretrain" and phase["exceeds_bound"] is False
    assert phase["estimate"]["ci_low"] <= phase["estimate"]["ci_high"]
    no_canaries = dp_run(tmp_path / "none", canaries=0, num_rounds=1)
    assert main(["audit", str(no_canaries), "--empirical"]) == 2
    assert "inserted no canaries" in capsys.readouterr().err
