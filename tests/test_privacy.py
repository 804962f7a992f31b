"""Tests for fed_userllm.privacy: sampling, DP-FedAvg, accounting, ledger and audit."""

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from fed_userllm.privacy import (
    SAMPLE_LEVEL,
    USER_LEVEL,
    LedgerConfig,
    LedgerError,
    LedgerMismatchError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    TornLedgerError,
    aggregate_dp_fedavg,
    audit,
    calibrate_noise,
    calibrate_noise_for_plan,
    clip_update,
    default_delta,
    epsilon,
    epsilon_from_history,
    max_rounds_within_budget,
    model_update,
    poisson_sample,
    release_digest,
    weighted_fedavg,
)
from fed_userllm.privacy.accounting import PRV_EPS_ERROR
from fed_userllm.privacy.ledger import GENESIS_HASH, canonical_json, chain_hash
from fed_userllm.rundir import LEDGER

# ---------------------------------------------------------------- sampling


def test_poisson_sample_matches_independent_bernoulli():
    n, q, draws = 1000, 0.05, 2000
    rng = np.random.default_rng(0)
    hits = np.zeros(n)
    counts = []
    for _ in range(draws):
        idx = poisson_sample(n, q, rng)
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0) and (len(idx) == 0 or 0 <= idx[0] <= idx[-1] < n)
        hits[idx] += 1
        counts.append(len(idx))
    counts = np.array(counts)
    # cohort size ~ Binomial(N, q): mean Nq, variance Nq(1-q) (fixed-size sampling would have variance 0)
    assert abs(counts.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert counts.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.15)
    # each client is included at rate q: per-client counts ~ Binomial(draws, q)
    assert np.abs(hits - draws * q).max() < 5 * math.sqrt(draws * q * (1 - q))


def test_poisson_sample_edges_and_validation():
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(poisson_sample(7, 1.0, rng), np.arange(7))
    big = poisson_sample(100_000, 1e-3, rng)
    assert 40 < len(big) < 170 and len(np.unique(big)) == len(big)
    for bad_q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="q"):
            poisson_sample(10, bad_q, rng)
    with pytest.raises(ValueError, match="num_clients"):
        poisson_sample(0, 0.5, rng)
    with pytest.raises(TypeError, match="Generator"):
        poisson_sample(10, 0.5, np.random.RandomState(0))


# ---------------------------------------------------------------- clipping and aggregation


def test_clip_update_bounds_large_and_keeps_small():
    large = [np.array([3.0, 4.0]), np.array([[12.0]])]  # global norm 13
    clipped, norm_before = clip_update(large, 2.0)
    assert norm_before == pytest.approx(13.0)
    flat = np.concatenate([c.ravel() for c in clipped])
    assert np.linalg.norm(flat) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(flat, np.array([3.0, 4.0, 12.0]) * 2.0 / 13.0)
    small = [np.array([0.3, -0.4])]
    kept, norm_small = clip_update(small, 2.0)
    assert norm_small == pytest.approx(0.5)
    np.testing.assert_array_equal(kept[0], small[0])
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(small, 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_update_refuses_a_non_finite_update(bad):
    """NaN > C is False, so a NaN norm used to leave the update unclipped: every other coordinate entered the sum
    at full size, past the sensitivity bound."""
    update = [np.array([100.0, bad]), np.array([[50.0]])]
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_update(update, 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        aggregate_dp_fedavg([np.zeros(2), np.zeros((1, 1))], [update], 1.0, 1.0, 2.0, np.random.default_rng(0))


def test_canary_updates_are_clipped_and_summed_but_are_not_clients():
    global_w = [np.zeros(2)]
    updates, canaries = [[np.array([6.0, 8.0])]], [[np.array([0.0, 1.0])], [np.array([30.0, 40.0])]]
    new, stats = aggregate_dp_fedavg(global_w, updates, 1.0, 0.0, 4.0, np.random.default_rng(0), canaries)
    np.testing.assert_allclose(new[0], (np.array([0.6, 0.8]) + np.array([0.0, 1.0]) + np.array([0.6, 0.8])) / 4)
    assert stats.num_updates == 1 and stats.update_norms == [10.0] and stats.fraction_clipped == 1.0


def _random_model(rng, shapes=((4, 3), (5,))):
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def test_noiseless_unclipped_aggregate_is_mean_over_expected_cohort():
    rng = np.random.default_rng(2)
    global_w = _random_model(rng)
    locals_ = [_random_model(rng) for _ in range(3)]
    updates = [model_update(w, global_w) for w in locals_]
    expected_cohort = 0.04 * 100  # q*N = 4, while only 3 clients were realised
    new, stats = aggregate_dp_fedavg(global_w, updates, math.inf, 0.0, expected_cohort, rng)
    for i, g in enumerate(global_w):
        total = sum(u[i] for u in updates)
        np.testing.assert_allclose(new[i], g + total / 4, rtol=1e-6, atol=1e-6)
        assert not np.allclose(new[i], g + total / 3, atol=1e-3)
        assert new[i].dtype == np.float32
    assert stats.num_updates == 3 and stats.fraction_clipped == 0.0 and stats.noise_std == 0.0

    torch_global = [torch.from_numpy(g) for g in global_w]
    new_t, _ = aggregate_dp_fedavg(torch_global, updates, math.inf, 0.0, expected_cohort, rng)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in new_t)
    np.testing.assert_allclose(new_t[0].numpy(), new[0], rtol=1e-6)


def test_aggregate_clips_each_update_with_uniform_weights():
    global_w = [np.zeros(2)]
    updates = [[np.array([6.0, 8.0])], [np.array([0.3, 0.4])]]  # norms 10 and 0.5
    new, stats = aggregate_dp_fedavg(global_w, updates, 1.0, 0.0, 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(new[0], (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 2)
    assert stats.update_norms == pytest.approx([10.0, 0.5]) and stats.fraction_clipped == 0.5


def test_weighted_fedavg_is_example_weighted_mean():
    rng = np.random.default_rng(3)
    clients = [_random_model(rng) for _ in range(3)]
    counts = [10, 30, 60]
    mean = weighted_fedavg(clients, counts)
    for i in range(2):
        expected = np.average(np.stack([c[i] for c in clients]), axis=0, weights=counts)
        np.testing.assert_allclose(mean[i], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="num_examples"):
        weighted_fedavg(clients, [1, 2])
    with pytest.raises(ValueError, match="num_examples"):
        weighted_fedavg(clients, [1, 0, 2])


def _noise_scale_ok(noise: np.ndarray, expected_std: float) -> bool:
    return abs(noise.mean()) < 0.01 * expected_std and abs(noise.std() / expected_std - 1) < 0.02


def test_noise_is_sigma_c_over_expected_cohort():
    sigma, clip, n, q = 1.3, 0.5, 1000, 0.01
    expected_cohort = q * n  # 10
    rng = np.random.default_rng(4)
    global_w = [np.zeros(120_000, np.float64), np.zeros((200, 400), np.float64)]
    updates = [[rng.standard_normal(g.shape) for g in global_w] for _ in range(7)]  # 7 realised, all clipped
    noiseless, _ = aggregate_dp_fedavg(global_w, updates, clip, 0.0, expected_cohort, np.random.default_rng(9))
    noisy, stats = aggregate_dp_fedavg(global_w, updates, clip, sigma, expected_cohort, np.random.default_rng(9))
    noise = np.concatenate([(a - b).ravel() for a, b in zip(noisy, noiseless, strict=True)]) * expected_cohort
    assert _noise_scale_ok(noise, sigma * clip)
    assert stats.noise_std == pytest.approx(sigma * clip / expected_cohort) and stats.fraction_clipped == 1.0
    # the check has the power to catch the two classic mistakes:
    assert not _noise_scale_ok(noise * expected_cohort / 7, sigma * clip)  # divided by the realised cohort
    assert not _noise_scale_ok(noise * 0, sigma * clip)  # noise missing
    again, _ = aggregate_dp_fedavg(global_w, updates, clip, sigma, expected_cohort, np.random.default_rng(9))
    other, _ = aggregate_dp_fedavg(global_w, updates, clip, sigma, expected_cohort, np.random.default_rng(10))
    np.testing.assert_array_equal(again[1], noisy[1])
    assert not np.allclose(other[1], noisy[1])


def test_empty_cohort_still_releases_noise():
    global_w = [np.zeros(50_000)]
    new, stats = aggregate_dp_fedavg(global_w, [], 2.0, 1.0, 5.0, np.random.default_rng(0))
    assert stats.num_updates == 0 and stats.fraction_clipped == 0.0
    assert new[0].std() == pytest.approx(2.0 / 5.0, rel=0.02)


def test_aggregate_validation():
    g = [np.zeros(3)]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate_dp_fedavg(g, [], 0.0, 1.0, 1.0, rng)
    with pytest.raises(ValueError, match="noise_multiplier"):
        aggregate_dp_fedavg(g, [], 1.0, -1.0, 1.0, rng)
    with pytest.raises(ValueError, match="finite clip_norm"):
        aggregate_dp_fedavg(g, [], math.inf, 1.0, 1.0, rng)
    with pytest.raises(ValueError, match="expected_cohort"):
        aggregate_dp_fedavg(g, [], 1.0, 1.0, 0.0, rng)
    with pytest.raises(ValueError, match=r"client_updates\[0\]\[0\] has shape"):
        aggregate_dp_fedavg(g, [[np.zeros(4)]], 1.0, 1.0, 1.0, rng)
    with pytest.raises(ValueError, match=r"client_updates\[0\] has 2 arrays"):
        aggregate_dp_fedavg(g, [[np.zeros(3), np.zeros(3)]], 1.0, 1.0, 1.0, rng)
    with pytest.raises(TypeError, match="floating point"):
        aggregate_dp_fedavg([np.zeros(3, np.int64)], [], 1.0, 1.0, 1.0, rng)


# ---------------------------------------------------------------- accounting

DELTA = 1e-5


def test_abadi_mnist_example_pinned():
    """Abadi et al. 2016 / the Opacus and TF Privacy MNIST example: sigma=1.1, batch 256 of 60000, 60 epochs."""
    q, steps = 256 / 60000, 60 * 60000 // 256
    rdp = epsilon(1.1, q, steps, DELTA, "rdp")
    prv = epsilon(1.1, q, steps, DELTA, "prv")
    assert rdp == pytest.approx(2.597, abs=5e-4)
    assert prv == pytest.approx(2.392, abs=5e-3)
    assert prv < rdp

    # Independent closed form: integer-order RDP of the sampled Gaussian (Mironov et al. 2019),
    # A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)), rdp(a) = log(A_a)/(a-1).
    def rdp_int(a: int) -> float:
        k = np.arange(a + 1)
        terms = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
        terms += (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * 1.1**2)
        return logsumexp(terms) / (a - 1)

    orders = np.array([*range(2, 11), *range(12, 64)], dtype=float)  # the integer orders of Opacus's grid
    total = steps * np.array([rdp_int(int(a)) for a in orders])
    balle = (total - (math.log(DELTA) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)).min()
    classic = (total + math.log(1 / DELTA) / (orders - 1)).min()
    assert rdp <= balle + 1e-9 and balle - rdp < 0.01  # Opacus also searches fractional orders
    assert classic == pytest.approx(3.01, abs=0.01)  # the figure published with the classic conversion


def test_rdp_matches_closed_form_without_subsampling():
    sigma, rounds = 2.0, 10
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rounds * orders / (2 * sigma**2)  # Gaussian mechanism, q = 1
    balle = (rdp - (math.log(DELTA) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)).min()
    classic = (rdp + math.log(1 / DELTA) / (orders - 1)).min()
    eps = epsilon(sigma, 1.0, rounds, DELTA, "rdp")
    assert eps == pytest.approx(balle, rel=1e-9)
    assert eps < classic


def test_prv_matches_analytic_gaussian_without_subsampling():
    sigma, rounds = 2.0, 10
    mu = math.sqrt(rounds) / sigma  # R Gaussian releases compose to one with sensitivity/std ratio mu

    def delta_of(eps: float) -> float:  # Balle & Wang 2018, exact
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    exact = brentq(lambda e: delta_of(e) - DELTA, 0, 100)
    prv = epsilon(sigma, 1.0, rounds, DELTA, "prv")
    assert exact - 1e-3 <= prv <= exact + 2 * PRV_EPS_ERROR
    assert prv < epsilon(sigma, 1.0, rounds, DELTA, "rdp")


def test_epsilon_edge_cases_and_validation():
    assert epsilon(1.0, 0.1, 0, DELTA, "rdp") == 0.0
    assert epsilon(1.0, 0.1, 0, DELTA, "prv") == 0.0
    assert epsilon(0.0, 0.1, 5, DELTA) == math.inf
    assert epsilon_from_history([(1.0, 0.1, 10), (1.0, 0.1, 5)], DELTA) == pytest.approx(
        epsilon(1.0, 0.1, 15, DELTA), rel=1e-12
    )
    with pytest.raises(ValueError, match="accountant"):
        epsilon(1.0, 0.1, 5, DELTA, "gdp")
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 0.1, 5, 1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon(1.0, 0.0, 5, DELTA)
    with pytest.raises(ValueError, match="steps"):
        epsilon(1.0, 0.1, -1, DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrate_noise_round_trip(accountant):
    q, steps = 0.02, 200
    sigma = calibrate_noise(1.0, DELTA, q, steps, accountant)
    eps = epsilon(sigma, q, steps, DELTA, accountant)
    assert 1.0 - 0.02 < eps <= 1.0
    assert calibrate_noise(2.0, DELTA, q, steps, accountant) < sigma
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(0.0, DELTA, q, steps, accountant)


def test_calibrate_noise_for_a_plan_of_phases_with_different_rates():
    plan = [(0.1, 20), (0.02, 5)]
    sigma = calibrate_noise_for_plan(2.0, DELTA, plan)
    spent = epsilon_from_history([(sigma, q, steps) for q, steps in plan], DELTA)
    assert 2.0 - 0.01 <= spent <= 2.0
    assert calibrate_noise(2.0, DELTA, 0.1, 20) < sigma  # the second phase costs budget too
    assert calibrate_noise_for_plan(2.0, DELTA, plan[:1]) == calibrate_noise(2.0, DELTA, 0.1, 20)
    history = [(sigma, 0.1, 20)]
    assert max_rounds_within_budget(sigma, 0.02, DELTA, 2.0, history=history) >= 5  # the plan fits


def test_max_rounds_within_budget_boundary_and_monotonic():
    sigma, q, target = 1.5, 0.05, 1.0
    rounds = max_rounds_within_budget(sigma, q, DELTA, target)
    assert rounds > 1
    assert epsilon(sigma, q, rounds, DELTA) <= target < epsilon(sigma, q, rounds + 1, DELTA)
    assert max_rounds_within_budget(2.0, q, DELTA, target) > rounds
    assert max_rounds_within_budget(sigma, q, DELTA, 1.5) > rounds
    assert max_rounds_within_budget(sigma, q, DELTA, 0.01) == 0
    assert max_rounds_within_budget(sigma, q, DELTA, target, limit=7) == 7
    assert max_rounds_within_budget(sigma, q, DELTA, target, "prv") >= rounds  # PRV is tighter


def test_default_delta_is_the_smaller_of_1e_5_and_n_to_the_minus_1_1():
    assert default_delta(610) == 1e-5  # 1/610**1.1 = 8.6e-4 would let N * delta = 0.53
    assert default_delta(100_000) == pytest.approx(10**-5.5)
    crossover = 10 ** (5 / 1.1)  # 1/N**1.1 = 1e-5 at N = 35,112
    assert default_delta(int(crossover)) == 1e-5 > default_delta(int(crossover) + 1)
    assert all(n * default_delta(n) <= n**-0.1 < 1 for n in (2, 610, 35_000, 10**6, 10**9))
    with pytest.raises(ValueError, match="num_units"):
        default_delta(1)


# ---------------------------------------------------------------- ledger and audit


def _user_config(**overrides) -> LedgerConfig:
    values = dict(
        mechanism=USER_LEVEL, noise_multiplier=2.0, clip_norm=1.0, num_clients=100, delta=DELTA, sample_rate=0.1
    )
    return LedgerConfig(**{**values, **overrides})


def _ledger_with_rounds(tmp_path, rounds: int, config: LedgerConfig | None = None) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path, config or _user_config())
    for _ in range(rounds):
        ledger.record_round()
    return ledger


def _lines(tmp_path) -> list[str]:
    return (tmp_path / LEDGER).read_text().splitlines()


def _write(tmp_path, entries: list[dict], rehash: bool) -> None:
    previous = GENESIS_HASH
    for entry in entries:
        if rehash:
            entry["hash"] = chain_hash(previous, entry)
        previous = entry["hash"]
    (tmp_path / LEDGER).write_text("".join(canonical_json(e) + "\n" for e in entries))


def test_ledger_records_resumes_and_audits(tmp_path):
    ledger = _ledger_with_rounds(tmp_path, 3)
    assert ledger.next_round == 4 and ledger.epsilon == epsilon(2.0, 0.1, 3, DELTA)
    header = json.loads(_lines(tmp_path)[0])
    assert header["sampling"] == "poisson" and header["versions"]["opacus"] == "1.6.0"

    resumed = PrivacyLedger(tmp_path, _user_config())
    assert resumed.next_round == 4 and resumed.head_hash == ledger.head_hash
    record = resumed.record_round()
    assert record["round"] == 4 and record["epsilon"] == pytest.approx(epsilon(2.0, 0.1, 4, DELTA), rel=1e-12)

    report = audit(tmp_path, expected_head_hash=resumed.head_hash)
    assert report.ok, report.problems
    assert [r.round for r in report.rounds] == [1, 2, 3, 4]
    assert all(r.recorded_epsilon == pytest.approx(r.rdp_epsilon, rel=1e-9) for r in report.rounds)
    assert all(r.prv_epsilon < r.rdp_epsilon for r in report.rounds)
    as_json = json.loads(report.to_json())
    assert as_json["ok"] is True and len(as_json["rounds"]) == 4
    assert "RDP" in report.to_text() and "PRV" in report.to_text() and "Result: OK" in report.to_text()


def test_round_lines_hold_only_what_the_accounting_needs(tmp_path):
    """The ledger is released: no cohort sizes, no timestamps (round durations follow the secret cohort size)."""
    ledger = PrivacyLedger(tmp_path, _user_config())
    ledger.record_round(phase="pretrain", release="ab" * 32)
    ledger.record_round(sample_rate=0.05, phase="contextualize")
    header, first, second = (json.loads(line) for line in _lines(tmp_path))
    assert header["format"] == 3
    assert set(first) == {"type", "round", "epsilon", "sample_rate", "phase", "release", "hash"}
    assert set(second) == {"type", "round", "epsilon", "sample_rate", "phase", "hash"}
    assert first["release"] == "ab" * 32 and audit(tmp_path).ok


def test_release_digest_changes_with_any_tensor_bit_the_cohort_the_attempt_or_the_key():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    context = {"phase": "pretrain", "round": 2, "attempt": 0, "cohort": [3, 5, 9], "succeeded": [3, 9]}
    digest = release_digest(b"key", arrays, **context)
    assert len(digest) == 64 and digest == release_digest(b"key", dict(reversed(arrays.items())), **context)
    flipped = arrays["w"].copy()
    flipped.view(np.uint32)[0, 1] ^= 1  # one bit of one float
    assert release_digest(b"key", {**arrays, "w": flipped}, **context) != digest
    assert release_digest(b"key", {**arrays, "w": arrays["w"].astype(np.float64)}, **context) != digest
    assert release_digest(b"key", {**arrays, "w": arrays["w"].reshape(3, 2)}, **context) != digest
    for change in ({"succeeded": [3, 5]}, {"attempt": 1}, {"cohort": [3, 5, 8]}, {"round": 3}):
        assert release_digest(b"key", arrays, **{**context, **change}) != digest
    assert release_digest(b"other key", arrays, **context) != digest


def test_ledger_refuses_mismatched_config(tmp_path):
    _ledger_with_rounds(tmp_path, 1)
    with pytest.raises(LedgerMismatchError, match="noise_multiplier"):
        PrivacyLedger(tmp_path, _user_config(noise_multiplier=2.1))
    with pytest.raises(LedgerMismatchError, match="target_epsilon"):
        PrivacyLedger(tmp_path, _user_config(target_epsilon=50.0))


def test_ledger_stops_at_target_epsilon(tmp_path):
    config = _user_config(target_epsilon=0.8)
    allowed = max_rounds_within_budget(2.0, 0.1, DELTA, 0.8)
    ledger = PrivacyLedger(tmp_path, config)
    assert ledger.rounds_remaining() == allowed
    for _ in range(allowed):
        ledger.record_round()
    assert ledger.rounds_remaining() == 0
    before = (tmp_path / LEDGER).read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="target 0.8"):
        ledger.record_round()
    assert (tmp_path / LEDGER).read_bytes() == before
    assert PrivacyLedger(tmp_path, config).next_round == allowed + 1


def test_ledger_charges_each_phase_at_its_own_sampling_rate_and_the_audit_agrees(tmp_path):
    config = _user_config(target_epsilon=3.0)  # header q = 0.1: the first phase's
    ledger = PrivacyLedger(tmp_path, config)
    for _ in range(3):
        ledger.record_round(phase="pretrain")
    for _ in range(2):
        record = ledger.record_round(sample_rate=0.02, phase="contextualize")
    composed = [(2.0, 0.1, 3), (2.0, 0.02, 2)]
    assert record["epsilon"] == pytest.approx(epsilon_from_history(composed, DELTA), rel=1e-12)
    assert record["sample_rate"] == 0.02 and record["phase"] == "contextualize" and record["round"] == 5
    assert epsilon(2.0, 0.1, 3, DELTA) < record["epsilon"] < epsilon(2.0, 0.1, 5, DELTA)
    for q in (0.1, 0.02):  # further rounds at the rate asked about, after everything spent so far
        k = ledger.rounds_remaining(q)
        assert epsilon_from_history([*composed, (2.0, q, k)], DELTA) <= 3.0
        assert epsilon_from_history([*composed, (2.0, q, k + 1)], DELTA) > 3.0
    assert ledger.rounds_remaining(0.02) > ledger.rounds_remaining(0.1) == ledger.rounds_remaining()

    resumed = PrivacyLedger(tmp_path, config)  # the replay charges every round at its own rate too
    assert resumed.next_round == 6 and resumed.epsilon == pytest.approx(record["epsilon"], rel=1e-12)
    report = audit(tmp_path, expected_head_hash=resumed.head_hash)
    assert report.ok, report.problems
    assert [(r.sample_rate, r.phase) for r in report.rounds] == [(0.1, "pretrain")] * 3 + [(0.02, "contextualize")] * 2
    assert report.rounds[-1].rdp_epsilon == pytest.approx(record["epsilon"], rel=1e-9)
    assert report.rounds[-1].prv_epsilon == pytest.approx(epsilon_from_history(composed, DELTA, "prv"), rel=1e-6)
    assert "contextualize" in report.to_text()

    entries = [json.loads(line) for line in _lines(tmp_path)]
    entries[4]["sample_rate"] = 0.01  # a forger lowers round 4's rate and rewrites the chain
    _write(tmp_path, entries, rehash=True)
    assert any(p.startswith("round 4: recorded epsilon") for p in audit(tmp_path).problems)
    with pytest.raises(ValueError, match="sample_rate"):
        _ledger_with_rounds(tmp_path / "other", 0).record_round(sample_rate=1.5)


def test_ledger_validates_round_inputs(tmp_path):
    ledger = PrivacyLedger(tmp_path, _user_config())
    with pytest.raises(ValueError, match="client_steps"):
        ledger.record_round({"a": (0.1, 1)})
    with pytest.raises(ValueError, match="sample_rate"):
        _user_config(sample_rate=None)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _user_config(noise_multiplier=0.0)


def test_audit_catches_edited_epsilon(tmp_path):
    _ledger_with_rounds(tmp_path, 3)
    entries = [json.loads(line) for line in _lines(tmp_path)]
    entries[2]["epsilon"] *= 0.5
    _write(tmp_path, entries, rehash=False)
    report = audit(tmp_path)
    assert not report.ok
    assert any("line 3: hash chain broken" in p for p in report.problems)
    assert any(p.startswith("round 2: recorded epsilon") for p in report.problems)
    with pytest.raises(LedgerError, match="line 3"):
        PrivacyLedger(tmp_path, _user_config())

    _write(tmp_path, entries, rehash=True)  # a forger who rewrites the chain is caught by the recomputation
    report = audit(tmp_path)
    assert [p for p in report.problems if "hash" in p] == []
    assert any(p.startswith("round 2: recorded epsilon") for p in report.problems)


@pytest.mark.parametrize("change", ["delete", "reorder"])
def test_audit_catches_deleted_or_reordered_rounds(tmp_path, change):
    _ledger_with_rounds(tmp_path, 4)
    lines = _lines(tmp_path)
    if change == "delete":
        del lines[2]
    else:
        lines[2], lines[3] = lines[3], lines[2]
    (tmp_path / LEDGER).write_text("\n".join(lines) + "\n")
    report = audit(tmp_path)
    assert any("hash chain broken" in p for p in report.problems)
    assert any("was expected" in p for p in report.problems)
    with pytest.raises(LedgerError):
        PrivacyLedger(tmp_path, _user_config())


def test_audit_catches_truncated_tail_with_head_hash(tmp_path):
    ledger = _ledger_with_rounds(tmp_path, 3)
    head = ledger.head_hash
    (tmp_path / LEDGER).write_text("\n".join(_lines(tmp_path)[:-1]) + "\n")
    assert audit(tmp_path).ok  # a chain alone cannot see a missing tail ...
    report = audit(tmp_path, expected_head_hash=head)  # ... a head hash kept elsewhere can
    assert not report.ok and "head hash" in report.problems[0]


def test_torn_last_line_is_refused_then_repaired(tmp_path):
    _ledger_with_rounds(tmp_path, 2)
    path = tmp_path / LEDGER
    torn = b'{"epsilon":0.5,"phase":"pret'
    with open(path, "ab") as f:
        f.write(torn)
    with pytest.raises(TornLedgerError, match="repair"):
        PrivacyLedger(tmp_path, _user_config())
    assert any("incomplete line" in p for p in audit(tmp_path).problems)
    assert PrivacyLedger.repair(path) == torn
    assert PrivacyLedger.repair(path) == b""
    ledger = PrivacyLedger(tmp_path, _user_config())
    assert ledger.next_round == 3
    ledger.record_round()
    assert audit(tmp_path).ok


def test_sample_level_ledger_tracks_per_client_epsilon(tmp_path):
    config = LedgerConfig(mechanism=SAMPLE_LEVEL, noise_multiplier=2.0, clip_norm=1.0, num_clients=5, delta=DELTA)
    ledger = PrivacyLedger(tmp_path, config)
    ledger.record_round({"a": (0.1, 20), "b": (0.05, 10)})
    record = ledger.record_round({"a": (0.1, 20), "c": (0.2, 5)})
    per_client = {
        "a": epsilon(2.0, 0.1, 40, DELTA),
        "b": epsilon(2.0, 0.05, 10, DELTA),
        "c": epsilon(2.0, 0.2, 5, DELTA),
    }
    assert record["epsilon"] == pytest.approx(max(per_client.values()), rel=1e-12)
    assert record["client_epsilon"]["mean"] == pytest.approx(np.mean(list(per_client.values())), rel=1e-12)
    assert record["client_epsilon"]["num_clients"] == 3
    with pytest.raises(ValueError, match="client_steps"):
        ledger.record_round()
    with pytest.raises(ValueError, match="sample rate must be in"):
        ledger.record_round({"a": (1.5, 20)})
    with pytest.raises(ValueError, match="sample_rate"):  # DP-SGD clients report their own rates
        ledger.record_round({"a": (0.1, 20)}, sample_rate=0.5)

    resumed = PrivacyLedger(tmp_path, config)
    assert resumed.next_round == 3 and resumed.epsilon == pytest.approx(record["epsilon"], rel=1e-12)
    resumed.record_round({"b": (0.1, 10)})  # a changed sample rate composes as a new history entry
    expected_b = epsilon_from_history([(2.0, 0.05, 10), (2.0, 0.1, 10)], DELTA)
    assert resumed.record_round({})["client_epsilon"]["num_clients"] == 3
    report = audit(tmp_path)
    assert report.ok, report.problems
    assert report.rounds[-1].rdp_epsilon == pytest.approx(max(per_client["a"], expected_b, per_client["c"]))


def test_cli_audit_prints_and_saves_the_report_and_fails_on_tampering(tmp_path, capsys):
    from fed_userllm.cli import main

    _ledger_with_rounds(tmp_path, 2)
    assert main(["audit", str(tmp_path)]) == 0
    assert "Result: OK" in capsys.readouterr().out
    assert json.loads((tmp_path / "privacy_audit.json").read_text())["ok"] is True
    entries = [json.loads(line) for line in _lines(tmp_path)]
    entries[1]["epsilon"] *= 0.5
    _write(tmp_path, entries, rehash=True)
    assert main(["audit", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
