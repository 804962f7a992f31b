"""PNG plots of a federated run from its metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from fed_userllm.rundir import PLOTS, RunDir  # noqa: E402


def plot_run(run: RunDir) -> list[Path]:
    """metrics.png (train loss and validation metrics vs round) and, for DP runs, epsilon.png."""
    records = run.read_metrics()
    metrics_png, epsilon_png = (run / name for name in PLOTS)
    written = []
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in dict.fromkeys(r["phase"] for r in records):
        rows = [r for r in records if r["phase"] == phase and r.get("train_loss") is not None]
        loss_ax.plot([r["round"] for r in rows], [r["train_loss"] for r in rows], marker=".", label=phase)
        for key in ("val_recall@10", "val_ndcg@10"):
            rows = [r for r in records if r["phase"] == phase and key in r]
            eval_ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o",
                         label=f"{phase} {key}")
    loss_ax.set(xlabel="round", ylabel="mean client training loss", title="training")
    eval_ax.set(xlabel="round", ylabel="metric (sampled clients)", title="federated validation")
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(metrics_png, dpi=120)
    plt.close(fig)
    written.append(metrics_png)
    rows = [r for r in records if "epsilon" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(rows) + 1), [r["epsilon"] for r in rows], marker=".")
        ax.set(xlabel="round (all phases)", ylabel=f"epsilon at delta={rows[-1]['delta']:.2g}",
               title="privacy spent")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(epsilon_png, dpi=120)
        plt.close(fig)
        written.append(epsilon_png)
    return written
