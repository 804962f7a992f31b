"""Evaluate an encoder on users' validation or test targets with full ranking (and FavGenre when it can)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from fed_userllm.data.sequences import UserSequences
from fed_userllm.eval.ranking import add_sums, ranking_sums, target_ranks


@torch.no_grad()
def evaluation_sums(model, seq: UserSequences, split: str = "val", users: np.ndarray | None = None,
                    batch_size: int = 256, mask_seen: bool = False, device: str | torch.device = "cpu",
                    progress: bool = False) -> dict[str, float]:
    """Summed Recall@1/5/10 hits, NDCG@10 and (for models with a genre head) FavGenre hits over ``users``.

    Sums rather than means, so that federated clients can report counts that the server adds up.
    """
    users = np.arange(seq.num_users) if users is None else np.asarray(users)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    sums: dict[str, float] = {}
    genre_head = hasattr(model, "next_scores") and "genre" in model.config.features  # the AR encoder's
    for lo in tqdm(range(0, len(users), batch_size), desc=f"eval {split}", disable=not progress, leave=False):
        chunk = users[lo:lo + batch_size]
        batch = {k: v.to(device) for k, v in seq.eval_batch(chunk, split).items()}
        scores = model.next_scores(batch, ("item", "genre")) if genre_head else {"item": model.score_items(batch)}
        ranks = target_ranks(scores["item"], batch["target_item"], batch["item"] if mask_seen else None)
        sums = add_sums(sums, ranking_sums(ranks))
        if genre_head:
            labels = torch.from_numpy(seq.favorite_genre(chunk, split)).to(device)
            predicted = scores["genre"][:, 3:].argmax(1) + 3
            sums = add_sums(sums, {"fav_genre": float((predicted == labels).sum())})
    if was_training:
        model.train()
    return sums
