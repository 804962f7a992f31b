"""The centralized (non-federated) reference trainer for the user encoders.

AdamW with a linear warm-up and cosine decay (the paper's schedule), early stopping on validation NDCG@10,
a resumable checkpoint after every epoch, and a run directory (`fed_userllm.rundir`):

    config.json        the PretrainConfig
    metrics.jsonl      one line per epoch: train loss, validation metrics, seconds
    checkpoint.pt      model + optimiser + scheduler + RNG state
    best/              the best model by validation NDCG@10 (save_pretrained)
    results.json       validation and test metrics of the best model
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fed_userllm.data import UserSequences, load_sequences
from fed_userllm.eval.evaluate import evaluation_sums
from fed_userllm.eval.ranking import finalize
from fed_userllm.models import Popularity, PopularityConfig, build_encoder, load_pretrained, public_items
from fed_userllm.rundir import BEST, RunDir, find_encoder
from fed_userllm.runtime import resolve_device, seed_everything
from fed_userllm.train.pretrain_config import PretrainConfig


def build_model(config: PretrainConfig, seq: UserSequences) -> torch.nn.Module:
    """A fresh model of ``config.model`` sized for the dataset's vocabularies and window length."""
    if config.model == "popularity":
        return Popularity(PopularityConfig(vocab_sizes=seq.vocab_sizes))
    options = {"label_smoothing": config.label_smoothing} if config.model == "ar" else {}
    return build_encoder(config, seq.vocab_sizes, config.max_len, public_items(config, config.dataset), **options)


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
    run = RunDir(run_dir)
    if not run.check_resume(config, resume):
        run.write_config(asdict(config))
        run.mark_latest()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    seq = load_sequences(config.dataset, max_len=config.max_len)
    model = build_model(config, seq).to(device)

    if isinstance(model, Popularity):
        starts, ends = seq.train_ranges()
        train_events = np.concatenate([seq.features["item"][s:e] for s, e in zip(starts, ends, strict=True)])
        model.fit(torch.from_numpy(train_events))
        model.save_pretrained(run / BEST)
        return _finish(model, seq, run, device)

    windows = seq.windows(stride=config.window_stride or None)
    steps_per_epoch = math.ceil(len(windows) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * config.epochs, config.warmup_frac))
    state = {"epoch": 0, "best_ndcg": -1.0, "stale": 0}
    if resume and (ckpt := run.load_checkpoint(map_location=device)):
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
            model.save_pretrained(run / BEST)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                  "seconds": time.time() - start, **{f"val_{k}": v for k, v in val.items()}}
        run.append_metrics(record)
        run.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "state": state, "torch_rng": torch.get_rng_state()})
        if progress:
            print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  val recall@10 {val['recall@10']:.4f}  "
                  f"ndcg@10 {val['ndcg@10']:.4f}  ({record['seconds']:.1f}s)" + ("  *best" if improved else ""))
    return _finish(load_pretrained(run / BEST, device), seq, run, device)


def _finish(model, seq: UserSequences, run: RunDir, device) -> dict[str, dict[str, float]]:
    results = {split: finalize(evaluation_sums(model, seq, split, device=device)) for split in ("val", "test")}
    run.write_results(results)
    return results


def evaluate_run(path: str | Path, split: str = "test", mask_seen: bool = False,
                 device: str = "auto") -> dict[str, float]:
    """Metrics of the encoder of a run of any kind (or of a model folder in one) on its own dataset and split."""
    source = find_encoder(path)
    if source.dataset is None:
        raise ValueError(f"{path}: a model folder outside a run directory; evaluate the run directory (its "
                         "config.json names the dataset)")
    dev = resolve_device(device)
    model = load_pretrained(source.folder, dev)
    seq = load_sequences(source.dataset, max_len=source.max_len or model.config.max_len - 1)
    return finalize(evaluation_sums(model, seq, split, mask_seen=mask_seen, device=dev))
