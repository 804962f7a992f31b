"""Benchmark: the project's encoders side by side with RecBole's SASRec, GRU4Rec, BERT4Rec and Pop, same split.

    make bench-peers        # builds .venv-peers (RecBole 1.2.1), then runs this script with the defaults
    python benchmarks/peers.py --peer-python .venv-peers/bin/python [--dataset ml-latest-small]
                               [--out runs/bench-peers] [--recipes default,...] [--peers SASRec,...]

The split is the project's (stable time order, last event = test, second-last = validation), written as RecBole
atomic files with each event's per-user rank as its timestamp (`fed_userllm.data.atomic_files`). Each peer
trains in RecBole's own environment with RecBole's defaults and early stopping on validation NDCG@10
(`benchmarks/recbole_peer.py`, at most ``--budget-minutes`` each) and saves its full-ranking scores; every
metric in the table is computed from those scores by the project's ranking code, and the script checks that
RecBole's validation/test targets and histories are the project's and that RecBole's own Recall/NDCG equal
the project's on the same scores. ``--verify`` first runs Pop on both sides on a tiny split and checks the
metrics are equal.

Unmasked: every catalog item is a candidate. Masked: the items of the history the models read (the last
``max_len`` events before the target, for peers and the project alike) are removed from the ranking.
Ties count pessimistically. Train seconds include each epoch's validation, on 1 torch thread for all models.
Recipes (rows of the project's AR encoder) are chosen on validation NDCG@10; test is reported once per recipe.
The app's federated runs (benchmarks/federated.py's results, ``--federated``) join the table on their dataset.
Writes ``OUT/peers.json``, ``OUT/peers.png`` and ``OUT/peers.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fed_userllm.data import load_sequences  # noqa: E402
from fed_userllm.data.atomic_files import write_atomic_files  # noqa: E402
from fed_userllm.data.sequences import UserSequences  # noqa: E402
from fed_userllm.eval.evaluate import evaluation_sums  # noqa: E402
from fed_userllm.eval.ranking import finalize, ranking_sums, target_ranks  # noqa: E402
from fed_userllm.models import load_pretrained  # noqa: E402
from fed_userllm.rundir import RunDir, find_encoder  # noqa: E402
from fed_userllm.runtime import atomic_write_bytes, atomic_write_json, set_threads  # noqa: E402
from fed_userllm.train.centralized import pretrain  # noqa: E402
from fed_userllm.train.pretrain_config import PretrainConfig  # noqa: E402

PEERS = ("SASRec", "GRU4Rec", "BERT4Rec", "Pop")
METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@10")
HEADLINE = ("recall@10", "ndcg@10")
PEER_SCRIPT = Path(__file__).with_name("recbole_peer.py")
# Rows of the project: the default `fed-userllm pretrain` recipe and one lever changed in each ablation
# (PretrainConfig overrides), chosen on validation NDCG@10; "app-width" is the federated app's encoder trained
# centrally (its width, public item features and dropout: simulations/movielens/pyproject.toml).
RECIPES: dict[str, dict] = {
    "default": {},
    "no-seen-offset": {"seen_offset": False},
    "label-smoothing": {"label_smoothing": 0.1},
    "dropout-0.5": {"dropout": 0.5},
    "wide": {"d_model": 128, "item_dim": 128},
    "deep": {"n_layers": 4},
    "window-stride-25": {"window_stride": 25},  # overlapping windows: each transition twice per epoch
    "public-item-features": {"item_features": "public"},
    "app-width": {"d_model": 32, "item_dim": 16, "item_features": "public", "dropout": 0.1},
    "popularity": {"model": "popularity"},
}
# The federated rows (benchmarks/federated.py's runs of the app, same split, test unmasked only).
FEDERATED_ROWS = ("federated-public-no-dp", "federated-public-eps8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", default=".venv-peers/bin/python",
                        help="the Python of RecBole's environment (make bench-peers builds it)")
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--out", default="runs/bench-peers")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS}")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {list(RECIPES)}")
    parser.add_argument("--budget-minutes", type=float, default=40.0, help="training budget of each peer")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="first check RecBole's and the project's metrics agree (Pop on a tiny split)")
    parser.add_argument("--federated", default="benchmarks/results/federated.json",
                        help="benchmarks/federated.py's results: its runs of the app join the table ('' to skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    result: dict = {"dataset": args.dataset, "protocol": __doc__.split("\n\n")[3].replace("\n", " ")}
    if args.verify:
        result["verification"] = verify_pop(args.peer_python, out / "verify")
        print(f"verification: {result['verification']}", flush=True)
    max_len = PretrainConfig.max_len
    seq = load_sequences(args.dataset, max_len=max_len)
    data = out / "data"
    write_atomic_files(seq, data, "split")
    result["models"] = {}
    for peer in filter(None, args.peers.split(",")):
        row = run_peer(args.peer_python, data, "split", peer, out / "peers" / peer, args.budget_minutes)
        result["models"][peer] = {"kind": "peer", **score_peer(seq, out / "peers" / peer, row)}
        print(f"{peer}: {brief(result['models'][peer])}", flush=True)
    for name in filter(None, args.recipes.split(",")):
        config = PretrainConfig(**{"dataset": args.dataset, "max_len": max_len, **RECIPES[name]})
        result["models"][name] = {"kind": "project", "overrides": RECIPES[name],
                                  **run_recipe(config, seq, out / "project" / name)}
        print(f"{name}: {brief(result['models'][name])}", flush=True)
    if args.federated and Path(args.federated).is_file():
        result["models"].update(federated_rows(json.loads(Path(args.federated).read_text()), args.dataset))
    add_ratios(result)
    atomic_write_json(out / "peers.json", result)
    plot(result, out / "peers.png")
    table = markdown_table(result)
    atomic_write_bytes(out / "peers.md", table.encode())
    print(table)


# --- the peers ---------------------------------------------------------------------------------------------
def run_peer(python: str, data: Path, dataset: str, model: str, out: Path, budget_minutes: float,
             train_batch_size: int | None = None) -> dict:
    """Train ``model`` with RecBole unless ``out`` already holds its result; returns RecBole's result.json."""
    if not (out / "result.json").is_file():
        if not Path(python).is_file():
            raise FileNotFoundError(f"--peer-python {python}: not found; `make bench-peers` builds RecBole's venv")
        command = [python, str(PEER_SCRIPT), "--data", str(data), "--dataset", dataset, "--model", model,
                   "--out", str(out), "--budget-minutes", str(budget_minutes)]
        if train_batch_size:
            command += ["--train-batch-size", str(train_batch_size)]
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "stdout.log", "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"RecBole {model} failed (exit {done.returncode}); see {out / 'stdout.log'}")
    return json.loads((out / "result.json").read_text())


def score_peer(seq: UserSequences, out: Path, row: dict) -> dict:
    """The project's metrics of a peer's saved scores, after checking RecBole ranked the project's targets."""
    saved = np.load(out / "scores.npz")
    metrics: dict = {}
    for split in ("val", "test"):
        users = saved[f"{split}_users"]
        batch = seq.eval_batch(users, split)
        check_protocol(seq, saved, split, batch)
        scores = torch.from_numpy(saved[f"{split}_scores"])
        for masked in (False, True):
            ranks = target_ranks(scores, batch["target_item"], batch["item"] if masked else None)
            metrics[key(split, masked)] = finalize(ranking_sums(ranks))
    # RecBole's own numbers on the same scores: unmasked for sequential models, all history masked for Pop.
    users = saved["test_users"]
    if row["recbole_masks_history"]:
        longest = int(seq.lengths().max())
        history = seq.gather(seq.offsets[users], seq.target_index(users, "test"), longest)["item"]
    else:
        history = None
    ranks = target_ranks(torch.from_numpy(saved["test_scores"]), torch.from_numpy(saved["test_targets"]), history)
    ours = finalize(ranking_sums(ranks))
    agreement = max(abs(ours[m] - row["recbole_test"][m]) for m in METRICS)
    return {**metrics, "train_seconds": row["train_seconds"], "epochs_run": row["epochs_run"],
            "best_epoch": row["best_epoch"], "stopped_by_budget": row["stopped_by_budget"],
            "parameters": row["parameters"], "recbole_test": row["recbole_test"],
            "recbole_vs_project_max_abs_diff": agreement}


def check_protocol(seq: UserSequences, saved, split: str, batch: dict) -> None:
    """RecBole's targets and histories must be the project's, user by user."""
    if len(saved[f"{split}_users"]) != seq.num_users:
        raise AssertionError(f"RecBole evaluated {len(saved[f'{split}_users'])} {split} users: expected "
                             f"{seq.num_users}")
    if not np.array_equal(saved[f"{split}_targets"], batch["target_item"].numpy()):
        raise AssertionError(f"RecBole's {split} targets differ from the project's split")
    if f"{split}_histories" in saved:
        theirs = np.maximum(saved[f"{split}_histories"], 0)  # -1 pads -> PAD
        if not np.array_equal(theirs, batch["item"].numpy()):
            raise AssertionError(f"RecBole's {split} histories differ from the project's last max_len events")


# --- the project's rows ------------------------------------------------------------------------------------
def run_recipe(config: PretrainConfig, seq: UserSequences, run_dir: Path) -> dict:
    start = time.time()
    pretrain(config, run_dir, resume=True, progress=False)
    elapsed = time.time() - start
    run = RunDir(run_dir)
    epochs = run.read_metrics()
    model = load_pretrained(find_encoder(run_dir).folder)
    metrics = {key(split, masked): finalize(evaluation_sums(model, seq, split, mask_seen=masked))
               for split in ("val", "test") for masked in (False, True)}
    best = max(epochs, key=lambda e: e["val_ndcg@10"])["epoch"] if epochs else None
    return {**metrics, "train_seconds": sum(e["seconds"] for e in epochs) if epochs else elapsed,
            "epochs_run": len(epochs), "best_epoch": best,
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def federated_rows(federated: dict, dataset: str) -> dict:
    """The app's federated runs from benchmarks/federated.py, when they ran on this dataset (test unmasked)."""
    if federated["settings"]["app_defaults"]["dataset"] != dataset:
        return {}
    runs = federated["runs"]
    return {name: {"kind": "federated", "test": runs[name]["test"], "epsilon": runs[name].get("epsilon"),
                   "train_seconds": runs[name]["seconds"]} for name in FEDERATED_ROWS if name in runs}


# --- the table ---------------------------------------------------------------------------------------------
def key(split: str, masked: bool) -> str:
    return f"{split}_masked" if masked else split


def add_ratios(result: dict) -> None:
    """Each project row over the best peer: per metric the best peer's value of that metric; the time ratio
    against the peer with the best validation NDCG@10 (the peers' own selection criterion)."""
    peers = {n: r for n, r in result["models"].items() if r["kind"] == "peer"}
    if not peers:
        return
    best = max(peers, key=lambda n: peers[n]["val"]["ndcg@10"])
    result["best_peer"] = best
    for row in result["models"].values():
        if row["kind"] == "peer":
            continue
        row["ratio_to_best_peer"] = {
            split: {m: ratio(row[split][m], max(p[split][m] for p in peers.values())) for m in METRICS}
            for split in (key("test", masked) for masked in (False, True)) if split in row}
        row["time_ratio_to_best_peer"] = ratio(row["train_seconds"], peers[best]["train_seconds"])


def ratio(value: float, reference: float) -> float | None:
    """value / reference; None (no ratio) when the reference is 0 (e.g. a peer that hit nothing)."""
    return value / reference if reference > 0 else None


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def brief(row: dict) -> str:
    return (f"test R@10 {row['test']['recall@10']:.4f} NDCG@10 {row['test']['ndcg@10']:.4f} | masked "
            f"{row['test_masked']['recall@10']:.4f} / {row['test_masked']['ndcg@10']:.4f} | "
            f"{row['train_seconds']:.0f} s")


def label(name: str, row: dict) -> str:
    if row["kind"] == "peer":
        return f"RecBole {name}"
    if row["kind"] == "federated":
        return f"{name} (epsilon {row['epsilon']:.1f})" if row.get("epsilon") else name
    return name if name == "popularity" else f"AR: {name}"


def markdown_table(result: dict) -> str:
    head = ("| model | R@1 | R@5 | R@10 | NDCG@10 | masked R@1 | R@5 | R@10 | NDCG@10 | val NDCG@10 | train s "
            "(epochs) | R@10, NDCG@10 vs best peer (then masked) | time vs best peer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    def cell(split: str, metric: str, form: str = ".4f") -> str:
        return format(row[split][metric], form) if split in row else "–"

    for name, row in result["models"].items():
        cells = [cell(split, m) for split in ("test", "test_masked") for m in METRICS]
        ratios_of = row.get("ratio_to_best_peer", {})
        ratios = ", ".join(times(ratios_of[split][m]) for split in ("test", "test_masked") if split in ratios_of
                           for m in HEADLINE)
        budget = ", budget" if row.get("stopped_by_budget") else ""
        epochs = f" ({row['epochs_run']}{budget})" if "epochs_run" in row else ""
        time_ratio = times(row["time_ratio_to_best_peer"]) if "time_ratio_to_best_peer" in row else ""
        lines.append(f"| {label(name, row)} | " + " | ".join(cells) + f" | {cell('val', 'ndcg@10')} | "
                     f"{row['train_seconds']:.0f}{epochs} | {ratios} | {time_ratio} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    names = [label(n, r) for n, r in result["models"].items()]
    rows = list(result["models"].values())
    panels = [("test", "recall@10"), ("test", "ndcg@10"), ("test_masked", "recall@10"), ("test_masked", "ndcg@10")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 0.35 * len(names) + 2),
                             sharey=True)
    colors = [{"peer": "tab:gray", "project": "tab:blue", "federated": "tab:green"}[r["kind"]] for r in rows]
    for ax, (split, metric) in zip(axes, panels, strict=False):
        ax.barh(names, [r[split][metric] if split in r else 0.0 for r in rows], color=colors)
        ax.set_title(f"{metric} ({'masked' if 'masked' in split else 'unmasked'})")
    axes[-1].barh(names, [r["train_seconds"] for r in rows], color=colors)
    axes[-1].set_xscale("log")
    axes[-1].set_title("train seconds (log)")
    axes[0].invert_yaxis()
    fig.suptitle(f"{result['dataset']}: test, full ranking (gray: RecBole, blue: this project, green: federated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- verification ------------------------------------------------------------------------------------------
def verify_pop(python: str, out: Path) -> dict:
    """Pop on both sides of a tiny split whose training counts are all distinct (no ties to break): RecBole's
    own test metrics (history masked) must equal the project's Popularity with the history masked.

    RecBole's Pop adds 1 per item per training batch (``item_cnt[item] += 1`` with repeated indices), so it
    counts interactions only with batches of one; the peer row of the table keeps RecBole's default batch."""
    folder = tiny_movielens(out / "movielens")
    longest = int(load_sequences(str(folder), max_len=1, cache=False).lengths().max())
    seq = load_sequences(str(folder), max_len=longest, cache=False)  # masks every earlier event, as RecBole's Pop does
    write_atomic_files(seq, out / "data", "tiny")
    row = run_peer(python, out / "data", "tiny", "Pop", out / "Pop", budget_minutes=5, train_batch_size=1)
    config = PretrainConfig(dataset=str(folder), model="popularity", max_len=longest)
    run_recipe(config, seq, out / "popularity")
    model = load_pretrained(find_encoder(out / "popularity").folder)
    ours = finalize(evaluation_sums(model, seq, "test", mask_seen=True))
    diff = max(abs(ours[m] - row["recbole_test"][m]) for m in METRICS)
    if diff > 1e-6:  # RecBole rounds to 6 decimals
        raise AssertionError(f"Pop on the tiny split: RecBole {row['recbole_test']} != project {ours}")
    return {"users": seq.num_users, "items": len(seq.vocabs["item"]) - 3,
            "recall@10": ours["recall@10"], "ndcg@10": ours["ndcg@10"], "max_abs_diff": diff}


def tiny_movielens(folder: Path, users: int = 40, items: int = 15) -> Path:
    """A MovieLens-format folder where item k is rated by 2k + 2 random users at random times (with ties),
    drawn until no two items share a training count (so Pop's ranking has no ties to break)."""
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        rows = sorted((int(user) + 1, item, int(rng.integers(0, 6))) for item in range(1, items + 1)
                      for user in rng.choice(users, size=min(users, 2 * item + 2), replace=False))
        ratings = ["userId,movieId,rating,timestamp", *(f"{u},{i},4.0,{t}" for u, i, t in rows)]
        atomic_write_bytes(folder / "ratings.csv", ("\n".join(ratings) + "\n").encode())
        movies = ["movieId,title,genres", *(f"{i},Movie {i} (2000),Drama" for i in range(1, items + 1))]
        atomic_write_bytes(folder / "movies.csv", ("\n".join(movies) + "\n").encode())
        with warnings.catch_warnings():  # a draw that leaves a user with < 3 events is rejected below
            warnings.simplefilter("ignore")
            seq = load_sequences(str(folder), max_len=1, cache=False)
        starts, ends = seq.train_ranges()
        train = np.concatenate([seq.features["item"][s:e] for s, e in zip(starts, ends, strict=True)])
        counts = np.bincount(train, minlength=len(seq.vocabs["item"]))[3:]
        if seq.num_users == users and len(set(counts.tolist())) == items:
            return folder
    raise RuntimeError("no tiny split without tied training counts in 1000 draws")


if __name__ == "__main__":
    sys.exit(main())
