"""Benchmark: AR encoder vs dual encoder vs BERT4Rec vs popularity, same split, full ranking.

    python benchmarks/encoders.py [--dataset ml-latest-small] [--out runs/bench-encoders] [--epochs 40]

Trains each model centrally with the reference trainer (early stopping on validation NDCG@10), evaluates the
best checkpoint on every user's test target, prints one JSON object and writes a bar chart PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fed_userllm.models import load_pretrained  # noqa: E402
from fed_userllm.rundir import RunDir, find_encoder
from fed_userllm.runtime import atomic_write_json, set_threads  # noqa: E402
from fed_userllm.train.centralized import pretrain  # noqa: E402
from fed_userllm.train.pretrain_config import MODEL_NAMES, PretrainConfig  # noqa: E402

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--out", default="runs/bench-encoders")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset")
    parser.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    result = {"dataset": args.dataset, "protocol": "last event = test target, full ranking over the training "
              "item vocabulary, seen items not masked, pessimistic ties", "models": {}}
    for name in args.models.split(","):
        run_dir = out / name
        config = PretrainConfig(dataset=args.dataset, model=name, epochs=args.epochs)
        start = time.time()
        metrics = pretrain(config, run_dir, resume=True, progress=False)
        model = load_pretrained(find_encoder(run_dir).folder)
        result["models"][name] = {
            **{k: round(metrics["test"][k], 4) for k in METRICS},
            "val_ndcg@10": round(metrics["val"]["ndcg@10"], 4),
            "train_seconds": round(time.time() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs_run": len(RunDir(run_dir).read_metrics()),
        }
        print(f"{name}: {result['models'][name]}", flush=True)
    atomic_write_json(out / "encoders.json", result)
    _plot(result, out / "encoders.png")
    print(json.dumps(result, indent=2))


def _plot(result: dict, path: Path) -> None:
    names = list(result["models"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [result["models"][name][m] for m in METRICS]
        ax.bar([j + i * width for j in range(len(METRICS))], values, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(METRICS))], METRICS)
    ax.set_ylabel("test metric (full ranking)")
    ax.set_title(f"User encoders on {result['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
