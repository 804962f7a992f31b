"""Benchmark: the one-shot empirical privacy estimate against the accountant's bound, across noise multipliers.

    python benchmarks/empirical_privacy.py [--out runs/bench-empirical] [--sigmas 0.3,0.5,1,2,4,8]

Federated runs: the Flower app (ServerApp + ClientApp over `LocalGrid`) on a small synthetic population, user-level
DP-FedAvg with the app's model and server optimizer and ``--canaries`` canary clients; `empirical_audit` estimates
the final model's epsilon (95% bootstrap interval) beside the RDP and PRV bounds of the same rounds. Calibration:
a Gaussian mechanism of known epsilon (sum of the inserted canaries plus N(0, sigma^2 I), no training), estimated
the same way, at the same sigmas; beside its true epsilon (mu = 1/sigma), the epsilon an adversary reading one
canary can reach, for whom the other k-1 canaries add (k-1)/d to the noise (mu = 1/sqrt(sigma^2 + (k-1)/d)).
Prints one JSON object; writes empirical_privacy.json and empirical_privacy.png into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fed_userllm.privacy import Canaries, empirical_audit, estimate_epsilon, gaussian_epsilon  # noqa: E402
from fed_userllm.rundir import RunDir
from fed_userllm.runtime import atomic_write_json, set_threads  # noqa: E402
from fed_userllm.server.local_grid import run_local  # noqa: E402

DELTA = 1e-5
# A population small enough for minutes on 2 cores: 400 one-user clients, ~100 per round (q = 0.25), one local
# epoch each, the app's AR encoder and FedAdam; the final test on a 10% sample.
RUN = {"dataset": "synthetic:users=400,items=200", "phases": "pretrain", "dp": "user", "fraction-train": 0.25,
       "num-rounds": 10, "eval-every": 0, "test-fraction": 0.1, "target-delta": DELTA}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-empirical")
    parser.add_argument("--sigmas", default="0.3,0.5,1,2,4,8")
    parser.add_argument("--canaries", type=int, default=500, help="inserted canaries (as many held out)")
    parser.add_argument("--dimension", type=int, default=50_000, help="dimension of the simulated mechanism")
    args = parser.parse_args()
    set_threads(1)
    out = Path(args.out)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    started = time.time()
    rows = {"federated": [federated(sigma, args.canaries) for sigma in sigmas],
            "gaussian_mechanism": [simulated(sigma, args.canaries, args.dimension) for sigma in sigmas]}
    federated_rows = rows["federated"]
    # With k canaries the separation mu is resolved to ~sqrt(2/k): smaller epsilons are estimated as noise.
    resolution = float(gaussian_epsilon(3 * np.sqrt(2 / args.canaries), DELTA)[0])
    resolved = [r for r in federated_rows if r["bound_prv"] > resolution]
    result = {
        "benchmark": "empirical_privacy", "delta": DELTA, "run": RUN, "canaries": args.canaries,
        "resolution_epsilon": resolution, **rows,
        "checks": {
            "federated_interval_never_above_the_bound": all(r["ci_low"] <= r["bound_prv"] for r in federated_rows),
            "federated_estimate_below_every_resolved_bound": all(r["estimate"] < r["bound_prv"] for r in resolved),
            "simulated_reachable_epsilon_inside_the_interval": all(
                r["ci_low"] <= r["reachable_epsilon"] <= r["ci_high"] for r in rows["gaussian_mechanism"]),
        },
        "seconds": time.time() - started,
    }
    atomic_write_json(out / "empirical_privacy.json", result)
    plot(result, out / "empirical_privacy.png")
    print(json.dumps(result, indent=2))


def federated(sigma: float, canaries: int) -> dict:
    """One federated DP run at noise multiplier ``sigma``: estimate and bound of its final model."""
    began = time.time()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = run_local({**RUN, "noise-multiplier": sigma, "canaries": canaries, "run-dir": f"{folder}/run"})
        (phase,) = empirical_audit(run_dir)
        test = RunDir(run_dir).read_results()["pretrain"]["test"]
    e = phase.estimate
    return {"sigma": sigma, "rounds": phase.rounds, "dimension": phase.dimension, "estimate": e.epsilon,
            "ci_low": e.ci_low, "ci_high": e.ci_high, "bound_rdp": phase.bound_rdp, "bound_prv": phase.bound_prv,
            "test_recall@10": test["recall@10"], "seconds": time.time() - began}


def simulated(sigma: float, count: int, dimension: int) -> dict:
    """The sum of ``count`` canaries plus N(0, sigma^2 I): the Gaussian mechanism with epsilon at mu = 1/sigma."""
    canaries = Canaries(int(100 * sigma), count, [("w", (dimension,))], clip_norm=1.0, sample_rate=1.0)
    noise = sigma * np.random.default_rng([int(100 * sigma), 1]).standard_normal(dimension)
    e = estimate_epsilon(*canaries.cosines(sum(canaries.direction(i) for i in range(count)) + noise), DELTA)
    reachable = 1 / np.sqrt(sigma**2 + (count - 1) / dimension)
    return {"sigma": sigma, "true_epsilon": float(gaussian_epsilon(1 / sigma, DELTA)[0]),
            "reachable_epsilon": float(gaussian_epsilon(reachable, DELTA)[0]), "estimate": e.epsilon,
            "ci_low": e.ci_low, "ci_high": e.ci_high, "dimension": dimension}


def plot(result: dict, path: Path) -> None:
    """Estimate (with its interval) and bounds against sigma; the simulated mechanism's estimate against truth."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    floor = 0.01  # log axes: an interval reaching 0 is drawn down to here
    titles = (f"federated DP-FedAvg, {RUN['num-rounds']} rounds, q={RUN['fraction-train']}",
              f"Gaussian mechanism, {result['canaries']} canaries")
    for ax, rows, title in zip((left, right), (result["federated"], result["gaussian_mechanism"]), titles,
                               strict=True):
        sigma = [r["sigma"] for r in rows]
        ax.errorbar(sigma, [r["estimate"] for r in rows],
                    yerr=[[r["estimate"] - max(r["ci_low"], floor) for r in rows],
                          [r["ci_high"] - r["estimate"] for r in rows]],
                    fmt="o", capsize=3, label="empirical estimate (95% CI)")
        ax.set(xscale="log", yscale="log", xlabel="noise multiplier sigma", ylabel=f"epsilon at delta={DELTA:g}",
               title=title)
        ax.set_xticks(sigma, [f"{s:g}" for s in sigma])
        ax.minorticks_off()
    rows = result["federated"]
    sigma = [r["sigma"] for r in rows]
    left.plot(sigma, [r["bound_rdp"] for r in rows], "--", label="accountant bound, RDP")
    left.plot(sigma, [r["bound_prv"] for r in rows], ":", label="accountant bound, PRV")
    left.axhline(result["resolution_epsilon"], color="gray", linewidth=0.8,
                 label=f"resolution of {result['canaries']} canaries")
    sims = result["gaussian_mechanism"]
    right.plot(sigma, [r["true_epsilon"] for r in sims], "-", label="true epsilon (analytic)")
    right.plot(sigma, [r["reachable_epsilon"] for r in sims], "--", label="reachable reading one canary")
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
