"""Benchmark: federated pretraining of the AR user encoder, with and without user-level DP, and at scale.

    python benchmarks/federated.py [--out runs/bench-federated] [--parts utility,scale] [--workers 1]

Utility (ml-latest-small, 610 clients of one user each, test = each user's last event, all users): popularity,
the centralized AR encoder, federated without DP and user-level DP-FedAvg at several noise multipliers, all
with the same encoder (the Flower app's model settings); Recall@10 against epsilon (delta = 1/N^1.1, RDP).
Scale (synthetic populations of 10,000 and 100,000 clients): seconds per round and peak memory at a fixed
expected cohort, and on 100,000 clients Recall@10 with DP at epsilon <= 8 against no DP.

Every federated run is the Flower app's ServerApp and ClientApp (`server.runner.run`, `clients.app`) over
`LocalGrid`, which delivers messages by function call; each run is a fresh process, so its peak resident
memory is its own (one process tree: server and clients). Finished runs are reused when the script is
run again with the same --out. Prints one JSON object; writes federated.json and federated.png into --out.
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

from fed_userllm.runtime import atomic_write_json, set_threads  # noqa: E402
from fed_userllm.server.local_grid import app_defaults, run_local  # noqa: E402
from fed_userllm.train.centralized import pretrain  # noqa: E402
from fed_userllm.train.pretrain_config import PretrainConfig  # noqa: E402

DATASET = "ml-latest-small"
# The federated recipe of the utility runs: the app's model; each client joins a round with q = 0.1 (~61 of
# 610) and takes one local SGD step on a batch of its own windows; FedAdam on the server with a cosine-decayed
# learning rate (FedSGD with a server-side Adam: the federated counterpart of centralized AdamW). DP runs change
# only dp and noise-multiplier. The no-DP run fixes its cohort seed (dp-seed) so that it is reproducible; DP
# runs keep theirs secret, as privacy amplification by sampling requires.
RECIPE = {"fraction-train": 0.1, "local-steps": 1, "lr": 1.0, "strategy": "fedadam", "server-lr": 0.02,
          "server-lr-schedule": "cosine", "num-rounds": 400, "eval-every": 50, "phases": "pretrain"}
SIGMAS = (0.5, 1.0, 2.0)
POPULATIONS = (10_000, 100_000)
COHORT = 250  # expected clients per round (q = COHORT / N) in the scale runs
SCALE = {"local-steps": 2, "strategy": "fedadam", "server-lr": 0.1, "eval-every": 0, "test-fraction": 0.02,
         "phases": "pretrain"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-federated")
    parser.add_argument("--parts", default="utility,scale")
    parser.add_argument("--rounds", type=int, default=RECIPE["num-rounds"], help="rounds of the utility runs")
    parser.add_argument("--scale-rounds", type=int, default=30, help="rounds of the 100,000-client DP/no-DP runs")
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of the timing-only runs")
    parser.add_argument("--centralized-epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (each a fresh process)")
    args = parser.parse_args()
    out = Path(args.out)
    parts = args.parts.split(",")
    started = time.time()
    defaults = app_defaults()
    model = {k: defaults[k] for k in ("d-model", "n-layers", "n-heads", "item-dim", "dropout", "max-len")}
    jobs: dict[str, tuple] = {}
    if "utility" in parts:
        central = PretrainConfig(dataset=DATASET, max_len=model["max-len"], d_model=model["d-model"],
                                 n_layers=model["n-layers"], n_heads=model["n-heads"], item_dim=model["item-dim"],
                                 dropout=model["dropout"], epochs=args.centralized_epochs, device="cpu")
        jobs["popularity"] = ("centralized", asdict(PretrainConfig(dataset=DATASET, model="popularity")))
        jobs["centralized"] = ("centralized", asdict(central))
        recipe = {**RECIPE, "num-rounds": args.rounds, "dataset": DATASET}
        jobs["federated-no-dp"] = ("federated", {**recipe, "dp": "none", "dp-seed": 1})
        for sigma in SIGMAS:
            jobs[f"federated-dp-sigma{sigma:g}"] = ("federated", {**recipe, "dp": "user", "noise-multiplier": sigma})
    if "scale" in parts:
        for n in POPULATIONS:
            population = {**SCALE, "dataset": f"synthetic:users={n},items=2000", "fraction-train": COHORT / n}
            jobs[f"scale-{n}-timing"] = ("federated", {**population, "dp": "none", "num-rounds": args.timing_rounds})
            if n == max(POPULATIONS):
                jobs[f"scale-{n}-timing-2x-cohort"] = ("federated", {**population, "dp": "none", "fraction-train":
                                                                      2 * COHORT / n, "num-rounds": args.timing_rounds})
                jobs[f"scale-{n}-no-dp"] = ("federated", {**population, "dp": "none", "num-rounds": args.scale_rounds})
                jobs[f"scale-{n}-dp-eps8"] = ("federated", {**population, "dp": "user", "noise-multiplier": 0.0,
                                                            "target-epsilon": 8.0, "num-rounds": args.scale_rounds})
    rows = {}
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {name: pool.submit(run_job, kind, settings, str(out / name)) for name, (kind, settings)
                   in jobs.items()}
        for name, future in futures.items():
            rows[name] = future.result()
            print(f"{name}: {json.dumps(rows[name])}", flush=True)
    result = {"settings": {"recipe": RECIPE, "model": model, "sigmas": SIGMAS, "cohort": COHORT, "scale": SCALE,
                           **vars(args)},
              "protocol": ("test target = each user's last event, never trained on; full ranking over all items; "
                           "utility runs: all 610 users; scale runs: a fixed 2% sample of the clients"),
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
        test = pretrain(PretrainConfig(**settings), run_dir, resume=True, progress=False)["test"]
        record = {"test": test}
    else:
        run_local({**settings, "run-dir": run_dir, "resume": (Path(run_dir) / "config.json").exists()})
        record = federated_record(Path(run_dir))
    record |= {"seconds": round(time.time() - began, 1),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    atomic_write_json(record_path, record)
    return record


def federated_record(run_dir: Path) -> dict:
    """Test metrics, epsilon, clients and seconds per round of a finished federated run."""
    results = json.loads((run_dir / "results.json").read_text())["pretrain"]["test"]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    seconds = sorted(r["round_seconds"] - r.get("eval_seconds", 0.0) for r in rounds)
    return {"test": results, "rounds": len(rounds), "num_clients": config["num_clients"],
            "noise_multiplier": config["privacy"]["noise_multiplier"], "delta": config["privacy"]["delta"],
            "epsilon": rounds[-1].get("epsilon"), "clients_per_round": sum(r["clients_sampled"] for r in rounds)
            / len(rounds), "median_round_seconds": seconds[len(seconds) // 2],
            "bytes_per_round": sum(r["bytes_sent"] + r["bytes_received"] for r in rounds) / len(rounds)}


def acceptance(rows: dict) -> dict:
    checks = {}
    if "centralized" in rows and "federated-no-dp" in rows:
        ratio = rows["federated-no-dp"]["test"]["recall@10"] / rows["centralized"]["test"]["recall@10"]
        checks |= {"federated_no_dp_over_centralized_recall@10": round(ratio, 3), "at_least_90%": ratio >= 0.9}
    big = max(POPULATIONS)
    if f"scale-{big}-dp-eps8" in rows:
        dp, plain = rows[f"scale-{big}-dp-eps8"], rows[f"scale-{big}-no-dp"]
        checks |= {"100k_epsilon": dp["epsilon"], "100k_epsilon_at_most_8": dp["epsilon"] <= 8,
                   "100k_dp_recall@10": dp["test"]["recall@10"], "100k_no_dp_recall@10": plain["test"]["recall@10"]}
    timing = [rows[k] for k in rows if k.startswith("scale-")]
    if timing:
        peak = max(r["peak_rss_gib"] for r in timing)
        checks |= {"scale_peak_rss_gib": peak, "scale_within_8_gib": peak <= 8}
    return checks


def plot(rows: dict, path: Path) -> None:
    """Recall@10 against epsilon (DP runs) with the no-DP references; seconds per round against population."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dp = sorted((r["epsilon"], r["test"]["recall@10"]) for k, r in rows.items() if k.startswith("federated-dp"))
    if dp:
        left.plot(*zip(*dp, strict=True), "o-", label="federated, user-level DP")
        left.set_xscale("log")
    for name, style in (("federated-no-dp", "--"), ("centralized", ":"), ("popularity", "-.")):
        if name in rows:
            left.axhline(rows[name]["test"]["recall@10"], linestyle=style, color="gray", label=name)
    left.set(xlabel="epsilon (delta = 1/N^1.1, RDP)", ylabel="test Recall@10", title="ml-latest-small, 610 clients")
    left.legend(fontsize=8)
    timing = sorted((r["num_clients"], r["median_round_seconds"], r["clients_per_round"]) for k, r in rows.items()
                    if k.startswith("scale-") and k.endswith("timing"))
    if timing:
        right.plot([t[0] for t in timing], [t[1] for t in timing], "o-", label=f"~{COHORT} clients per round")
    double = [(r["num_clients"], r["median_round_seconds"]) for k, r in rows.items() if k.endswith("2x-cohort")]
    if double:
        right.plot(*zip(*double, strict=True), "s", color="C1", label=f"~{2 * COHORT} clients per round")
    if timing or double:
        right.set_xscale("log")
        right.set_ylim(bottom=0)
    right.set(xlabel="population (clients)", ylabel="seconds per round", title="round time vs population")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
