"""The centralized (non-federated) reference trainer for the user encoders.

AdamW with a linear warm-up and cosine decay (the paper's schedule), early stopping on validation NDCG@10,
a resumable checkpoint after every epoch, and a run directory:

    run_dir/config.json        the PretrainConfig
    run_dir/metrics.jsonl      one line per epoch: train loss, validation metrics, seconds
    run_dir/checkpoint.pt      model + optimiser + scheduler + RNG state (written atomically)
    run_dir/best/              the best model by validation NDCG@10 (save_pretrained)
    run_dir/results.json       validation and test metrics of the best model
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fed_userllm.data import UserSequences, load_sequences
from fed_userllm.data.item_features import ItemFeatureSpec, public_item_features
from fed_userllm.eval.evaluate import evaluation_sums
from fed_userllm.eval.ranking import finalize
from fed_userllm.models import Popularity, PopularityConfig, build_encoder, load_pretrained
from fed_userllm.runtime import append_jsonl, atomic_torch_save, atomic_write_json, resolve_device, seed_everything
from fed_userllm.train.pretrain_config import PretrainConfig


def build_model(config: PretrainConfig, seq: UserSequences) -> torch.nn.Module:
    """A fresh model of ``config.model`` sized for the dataset's vocabularies and window length."""
    if config.model == "popularity":
        return Popularity(PopularityConfig(vocab_sizes=seq.vocab_sizes))
    features = None
    if config.item_features == "public":
        features = public_item_features(seq.catalog, seq.vocabs["item"], ItemFeatureSpec(llm=config.item_features_llm))
    options = {"seen_offset": config.seen_offset, "label_smoothing": config.label_smoothing} \
        if config.model == "ar" else {}
    return build_encoder(config.model, seq.vocab_sizes, seq.max_len, config.d_model, config.n_layers,
                         config.n_heads, config.dropout, config.item_dim, features, **options)


def warmup_cosine(total_steps: int, warmup_frac: float):
    """LambdaLR factor: linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return factor


def pretrain(config: PretrainConfig, run_dir: str | Path, resume: bool = False,
             progress: bool = True) -> dict[str, dict[str, float]]:
    """Train ``config.model`` centrally; returns {"val": ..., "test": ...} metrics of the best model."""
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoint.pt"
    if (run_dir / "config.json").exists():
        saved = json.loads((run_dir / "config.json").read_text())
        if not resume:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                                  "--out")
        if saved != asdict(config):
            changed = {k: (saved.get(k), v) for k, v in asdict(config).items() if saved.get(k) != v}
            raise ValueError(f"{run_dir}/config.json differs from this run's settings {changed}: a resumed run "
                             "must use the same settings")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", asdict(config))
    seed_everything(config.seed)
    device = resolve_device(config.device)
    seq = load_sequences(config.dataset, max_len=config.max_len)
    model = build_model(config, seq).to(device)

    if isinstance(model, Popularity):
        starts, ends = seq.train_ranges()
        train_events = np.concatenate([seq.features["item"][s:e] for s, e in zip(starts, ends, strict=True)])
        model.fit(torch.from_numpy(train_events))
        model.save_pretrained(run_dir / "best")
        return _finish(model, seq, run_dir, device)

    windows = seq.windows(stride=config.window_stride or None)
    steps_per_epoch = math.ceil(len(windows) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * config.epochs, config.warmup_frac))
    state = {"epoch": 0, "best_ndcg": -1.0, "stale": 0}
    if resume and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["torch_rng"])

    for epoch in range(state["epoch"], config.epochs):
        if state["stale"] >= config.patience:
            break
        start = time.time()
        model.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(windows))  # resumable per epoch
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                   leave=False)
        for step in bar:
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            batch = {k: v.to(device) for k, v in seq.training_batch(windows[idx]).items()}
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        val = finalize(evaluation_sums(model, seq, "val", device=device))
        improved = val["ndcg@10"] > state["best_ndcg"]
        state = {"epoch": epoch + 1, "best_ndcg": max(val["ndcg@10"], state["best_ndcg"]),
                 "stale": 0 if improved else state["stale"] + 1}
        if improved:
            model.save_pretrained(run_dir / "best")
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                  "seconds": time.time() - start, **{f"val_{k}": v for k, v in val.items()}}
        append_jsonl(run_dir / "metrics.jsonl", record)
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "state": state,
                           "torch_rng": torch.get_rng_state()}, checkpoint_path)
        if progress:
            print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  val recall@10 {val['recall@10']:.4f}  "
                  f"ndcg@10 {val['ndcg@10']:.4f}  ({record['seconds']:.1f}s)" + ("  *best" if improved else ""))
    return _finish(load_pretrained(run_dir / "best", device), seq, run_dir, device)


def _finish(model, seq: UserSequences, run_dir: Path, device) -> dict[str, dict[str, float]]:
    results = {split: finalize(evaluation_sums(model, seq, split, device=device)) for split in ("val", "test")}
    atomic_write_json(run_dir / "results.json", results)
    return results


def evaluate_run(run_dir: str | Path, split: str = "test", mask_seen: bool = False,
                 device: str = "auto") -> dict[str, float]:
    """Metrics of a finished run's best model on its own dataset and split."""
    run_dir = Path(run_dir)
    if not (run_dir / "best" / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained model (expected {run_dir / 'best' / 'config.json'})")
    config = PretrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    dev = resolve_device(device)
    seq = load_sequences(config.dataset, max_len=config.max_len)
    model = load_pretrained(run_dir / "best", dev)
    return finalize(evaluation_sums(model, seq, split, mask_seen=mask_seen, device=dev))
