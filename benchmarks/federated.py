"""Benchmark: the privacy-utility curve of federated pretraining, learned vs public item features, and scale.

    python benchmarks/federated.py [--out runs/bench-federated] [--parts utility,synthetic,scale] [--workers 1]

Utility (ml-latest-small, 610 one-user clients, test = each user's last event, full ranking, all users): the
Flower app's default pretraining recipe (a DP popularity release, then DP-FedAdam on the encoder; see
simulations/movielens/pyproject.toml) at epsilon in {1, 2, 4, 8, 16} (delta = 1e-5, RDP, noise multiplier
calibrated for the whole plan), without DP, and the centralized encoder of the same size, each with learned and
with public item features. Synthetic: the same comparison (by default at epsilon 8 and without DP) on a
100,000-client synthetic population (cohorts of ~250, evaluation on a fixed 2% sample). Scale: seconds per round
and peak memory at 10,000 and 100,000 clients.

Every federated run is the app's ServerApp and ClientApp (`server.runner.run`, `clients.client_app`) over
`LocalGrid`, which delivers messages by function call; each run is a fresh process (its peak memory is its own).
The recipe was chosen on validation targets of ml-latest-small (never on test targets); test is reported once per run.
Finished runs are reused when the script is run again with the same --out. Prints one JSON object; writes
federated.json and federated.png into --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fed_userllm.rundir import RunDir
from fed_userllm.runtime import atomic_write_json, set_threads  # noqa: E402
from fed_userllm.server.local_grid import app_defaults, run_local  # noqa: E402
from fed_userllm.train.centralized import pretrain  # noqa: E402
from fed_userllm.train.pretrain_config import PretrainConfig  # noqa: E402

DATASET = "ml-latest-small"
EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0)
DELTA = 1e-5
FEATURES = ("public", "learned")
SYNTHETIC = "synthetic:users=100000,items=2000"
# Large populations: cohorts of ~250 clients (q = 250 / N) over more rounds; the popularity release samples ~1000.
SYNTHETIC_RECIPE = {"fraction-train": 0.0025, "num-rounds": 30, "popularity-fraction-train": 0.01,
                    "test-fraction": 0.02, "eval-every": 0}
POPULATIONS = (10_000, 100_000)
COHORT = 250
TIMING = {"local-steps": 1, "eval-every": 0, "test-fraction": 0.02, "phases": "pretrain", "dp": "none"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-federated")
    parser.add_argument("--parts", default="utility,synthetic,scale")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    parser.add_argument("--synthetic-epsilons", default="8",
                        help="epsilons of the 100k-client population (each run takes ~30 rounds of 250 clients)")
    parser.add_argument("--centralized-epochs", type=int, default=20)
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of the timing-only runs")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (each a fresh process)")
    args = parser.parse_args()
    out, parts = Path(args.out), args.parts.split(",")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    started = time.time()
    defaults = app_defaults()
    recipe = {"phases": "popularity,pretrain", "dp": "user", "noise-multiplier": 0.0, "target-delta": DELTA}
    jobs: dict[str, tuple] = {}
    if "utility" in parts:
        jobs["popularity"] = ("centralized", asdict(PretrainConfig(dataset=DATASET, model="popularity")))
        for features in FEATURES:
            model = {k.replace("-", "_"): defaults[k] for k in ("d-model", "n-layers", "n-heads", "item-dim",
                                                                 "dropout", "max-len")}
            jobs[f"centralized-{features}"] = ("centralized", asdict(PretrainConfig(
                dataset=DATASET, epochs=args.centralized_epochs, device="cpu", item_features=features, **model)))
            base = {**recipe, "dataset": DATASET, "item-features": features}
            jobs[f"federated-{features}-no-dp"] = ("federated", {**base, "dp": "none", "dp-seed": 1})
            for eps in epsilons:
                jobs[f"federated-{features}-eps{eps:g}"] = ("federated", {**base, "target-epsilon": eps})
    if "synthetic" in parts:
        for features in FEATURES:
            base = {**recipe, **SYNTHETIC_RECIPE, "dataset": SYNTHETIC, "item-features": features,
                    "item-features-llm": ""}  # synthetic titles carry no meaning: genres and years only
            jobs[f"synthetic-{features}-no-dp"] = ("federated", {**base, "dp": "none", "dp-seed": 1})
            for eps in (float(e) for e in args.synthetic_epsilons.split(",")):
                jobs[f"synthetic-{features}-eps{eps:g}"] = ("federated", {**base, "target-epsilon": eps})
    if "scale" in parts:
        for n in POPULATIONS:
            population = {**TIMING, "dataset": f"synthetic:users={n},items=2000", "fraction-train": COHORT / n,
                          "num-rounds": args.timing_rounds}
            jobs[f"scale-{n}-timing"] = ("federated", population)
            if n == max(POPULATIONS):
                jobs[f"scale-{n}-timing-2x-cohort"] = ("federated", {**population, "fraction-train": 2 * COHORT / n})
    rows = {}
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {name: pool.submit(run_job, kind, settings, str(out / name)) for name, (kind, settings)
                   in jobs.items()}
        for name, future in futures.items():
            rows[name] = future.result()
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    result = {"settings": {"app_defaults": defaults, "recipe": recipe, "synthetic_recipe": SYNTHETIC_RECIPE,
                           "delta": DELTA, "cohort": COHORT, **vars(args)},
              "protocol": ("test target = each user's last event, never trained on; full ranking over all items; "
                           "ml-latest-small: all 610 users; synthetic: a fixed 2% sample of the clients"),
              "runs": rows, "acceptance": acceptance(rows), "seconds": round(time.time() - started, 1)}
    atomic_write_json(out / "federated.json", result)
    plot(rows, out / "federated.png")
    print(json.dumps(result, indent=2))


def run_job(kind: str, settings: dict, run_dir: str) -> dict:
    """One run in this (fresh) process, or the record of a finished one; with its own peak memory."""
    set_threads(1)
    record_path = Path(run_dir) / "benchmark.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    began = time.time()
    if kind == "centralized":
        results = pretrain(PretrainConfig(**settings), run_dir, resume=True, progress=False)
        record = {"test": results["test"], "val": results["val"]}
    else:
        run_local({**settings, "run-dir": run_dir, "resume": RunDir(run_dir).exists()})
        record = federated_record(Path(run_dir))
    record |= {"seconds": round(time.time() - began, 1),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    atomic_write_json(record_path, record)
    return record


def federated_record(run_dir: Path) -> dict:
    """Test metrics (every phase), epsilon, clients and seconds per round of a finished federated run."""
    run = RunDir(run_dir)
    results, rounds, config = run.read_results(), run.read_metrics(), run.read_config()
    last = "pretrain" if "pretrain" in results else next(iter(results))
    train = [r for r in rounds if r["phase"] == last]
    seconds = sorted(r["round_seconds"] - r.get("eval_seconds", 0.0) for r in train)
    return {"test": results[last]["test"], "phases": {k: v["test"] for k, v in results.items()},
            "rounds": len(rounds), "num_clients": config["num_clients"],
            "noise_multiplier": config["privacy"]["noise_multiplier"], "delta": config["privacy"]["delta"],
            "epsilon": rounds[-1].get("epsilon"), "clients_per_round": sum(r["clients_sampled"] for r in train)
            / len(train), "median_round_seconds": seconds[len(seconds) // 2],
            "bytes_per_round": sum(r["bytes_sent"] + r["bytes_received"] for r in train) / len(train)}


def acceptance(rows: dict) -> dict:
    """The private-utility issue's goal: test Recall@10 >= 0.030 at epsilon <= 8, delta <= 1e-5 (ml-latest-small)."""
    checks = {}
    if "federated-public-eps8" in rows:
        run = rows["federated-public-eps8"]
        checks |= {"eps8_recall@10": run["test"]["recall@10"], "eps8_epsilon": run["epsilon"],
                   "eps8_delta": run["delta"], "eps8_meets_0.030": run["test"]["recall@10"] >= 0.030}
    timing = [rows[k] for k in rows if k.startswith("scale-")]
    if timing:
        checks["scale_peak_rss_gib"] = max(r["peak_rss_gib"] for r in timing)
    return checks


def plot(rows: dict, path: Path) -> None:
    """Recall@10 against epsilon per population and item features, with the no-DP and centralized references."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, prefix, title in ((axes[0], "federated", "ml-latest-small, 610 clients"),
                              (axes[1], "synthetic", "synthetic, 100,000 clients")):
        for i, features in enumerate(FEATURES):
            curve = sorted((r["epsilon"], r["test"]["recall@10"]) for k, r in rows.items()
                           if k.startswith(f"{prefix}-{features}-eps"))
            if curve:
                ax.plot(*zip(*curve, strict=True), "o-", color=f"C{i}", label=f"DP, {features} item features")
            for name, style in ((f"{prefix}-{features}-no-dp", "--"), (f"centralized-{features}", ":")):
                if prefix == "federated" or name.startswith(prefix):
                    if name in rows:
                        ax.axhline(rows[name]["test"]["recall@10"], linestyle=style, color=f"C{i}", alpha=0.7,
                                   label=name)
        if prefix == "federated" and "popularity" in rows:
            ax.axhline(rows["popularity"]["test"]["recall@10"], linestyle="-.", color="gray", label="popularity")
        ax.set_xscale("log")
        ax.set(xlabel=f"epsilon (delta = {DELTA:g}, RDP)", ylabel="test Recall@10", title=title)
        ax.legend(fontsize=7)
    timing = sorted((r["num_clients"], r["median_round_seconds"]) for k, r in rows.items()
                    if k.startswith("scale-") and k.endswith("timing"))
    if timing:
        axes[2].plot(*zip(*timing, strict=True), "o-", label=f"~{COHORT} clients per round")
        double = [(r["num_clients"], r["median_round_seconds"]) for k, r in rows.items() if k.endswith("2x-cohort")]
        if double:
            axes[2].plot(*zip(*double, strict=True), "s", color="C1", label=f"~{2 * COHORT} clients per round")
        axes[2].set_xscale("log")
        axes[2].set_ylim(bottom=0)
        axes[2].legend(fontsize=8)
    axes[2].set(xlabel="population (clients)", ylabel="seconds per round", title="round time vs population")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
