"""Train one RecBole model on atomic files and save its full-ranking scores (runs in the peers' own venv).

    .venv-peers/bin/python benchmarks/recbole_peer.py --data DIR --dataset NAME --model SASRec --out DIR

`benchmarks/peers.py` starts this script in RecBole's environment (``make bench-peers`` builds it) and computes
every reported metric itself from the saved scores, with the project's ranking code. RecBole runs with its own
defaults except what the protocol fixes: leave-one-out by the given order (the files' per-user ranks), full
ranking, no negative sampling (CE loss), validation NDCG@10 for early stopping, CPU. ``--budget-minutes`` stops
training after the first validation past the budget, keeping the best checkpoint so far.

Writes ``OUT/scores.npz`` (per split: user index, target item id, history item ids or -1, and scores over the
project's item vocabulary, -inf where RecBole has no item) and ``OUT/result.json`` (RecBole's own validation
and test metrics, training seconds, epochs, whether the budget ended training).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

PROTOCOL = {
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "train_neg_sample_args": None,
    "metrics": ["Recall", "NDCG"], "topk": [1, 5, 10], "valid_metric": "NDCG@10", "metric_decimal_place": 6,
    "use_gpu": False, "show_progress": False,
}


class BudgetExceeded(Exception):
    """Raised after a validation once the training budget is spent (the best checkpoint is already saved)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder holding DATASET/DATASET.inter and .item")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True, help="a RecBole model name, e.g. SASRec, GRU4Rec, BERT4Rec, Pop")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-minutes", type=float, default=40.0)
    parser.add_argument("--epochs", type=int, help="RecBole's epochs (default: RecBole's own)")
    parser.add_argument("--train-batch-size", type=int, help="RecBole's train_batch_size (default: RecBole's own)")
    args = parser.parse_args()
    from recbole.config import Config  # imported after parsing: `--help` works without RecBole installed
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import ModelType, get_model, get_trainer, init_logger, init_seed

    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole writes its log/ and log_tensorboard/ folders into the working directory
    settings = {**PROTOCOL, "data_path": str(data), "checkpoint_dir": str(out / "saved")}
    for name in ("epochs", "train_batch_size"):
        if getattr(args, name):
            settings[name] = getattr(args, name)
    config = Config(model=args.model, dataset=args.dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    start, epochs = time.time(), []

    def on_validation(epoch: int, score: float) -> None:
        epochs.append(epoch)
        if time.time() - start > args.budget_minutes * 60:
            raise BudgetExceeded

    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=on_validation)
        stopped_by_budget = False
    except BudgetExceeded:
        stopped_by_budget = True
    train_seconds = time.time() - start
    # RecBole's own reload calls torch.load with torch's weights-only default, which its checkpoint (config
    # included) does not pass; the file is the one this run just wrote.
    best = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    trainer.model.load_state_dict(best["state_dict"])
    trainer.model.load_other_parameter(best.get("other_parameter"))
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    valid_result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    arrays = {}
    for split, data in (("val", valid_data), ("test", test_data)):
        arrays.update({f"{split}_{k}": v for k, v in split_scores(trainer.model, data, dataset, config).items()})
    np.savez(out / "scores.npz", **arrays)
    result = {"model": args.model, "recbole_val": dict(valid_result), "recbole_test": dict(test_result),
              "train_seconds": train_seconds, "epochs_run": len(epochs), "stopped_by_budget": stopped_by_budget,
              "best_epoch": epochs[-1] - trainer.cur_step if epochs else None,
              "parameters": sum(p.numel() for p in trainer.model.parameters()),
              "recbole_masks_history": config["MODEL_TYPE"] != ModelType.SEQUENTIAL,
              "config": {k: config[k] for k in ("epochs", "train_batch_size", "learning_rate", "stopping_step",
                                                "MAX_ITEM_LIST_LENGTH", "seed")}}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=float) + "\n")


@torch.no_grad()
def split_scores(model, data, dataset, config) -> dict[str, np.ndarray]:
    """Users, targets, histories and scores in the atomic files' ids (user index, item vocabulary id)."""
    from recbole.utils import ModelType

    model.eval()
    item_token = np.array([-1] + [int(t) for t in dataset.field2id_token["item_id"][1:]])
    user_token = np.array([-1] + [int(t) for t in dataset.field2id_token["user_id"][1:]])
    vocab_size = int(item_token.max()) + 1
    sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    users, targets, histories, scores = [], [], [], []
    for interaction, _, positive_u, positive_i in data:
        rows = model.full_sort_predict(interaction).view(-1, dataset.item_num)
        full = torch.full((rows.shape[0], vocab_size), float("-inf"))
        full[:, torch.from_numpy(item_token[1:])] = rows[:, 1:].float()
        target = torch.zeros(rows.shape[0], dtype=torch.long)
        target[positive_u] = positive_i  # one target per user (leave-one-out)
        users.append(user_token[interaction["user_id"].numpy()])
        targets.append(item_token[target.numpy()])
        scores.append(full.numpy())
        if sequential:
            seq = interaction["item_id_list"].numpy()
            histories.append(np.where(seq > 0, item_token[seq], -1))
    out = {"users": np.concatenate(users), "targets": np.concatenate(targets), "scores": np.concatenate(scores)}
    if sequential:
        out["histories"] = np.concatenate(histories)
    return out


if __name__ == "__main__":
    main()
