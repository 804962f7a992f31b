"""Full-ranking recommendation metrics: every item in the vocabulary is a candidate (no negative sampling).

Metrics are computed as *sums* plus a count, so federated clients can return their hit counts and the server
adds them up without seeing anything else; `finalize` turns sums into means.
Ties are broken pessimistically (an item scored equal to the target ranks ahead of it), so a model that
scores everything alike gets no credit. A target outside the training vocabulary (UNK) is a miss.
"""

from __future__ import annotations

import torch

from fed_userllm.data.vocab import NUM_RESERVED

KS = (1, 5, 10)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all real items; ``inf`` for reserved/unknown targets.

    ``history`` ([B, T] item ids) masks previously seen items out of the ranking when given.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"expected scores [B, V] and targets [B], got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    scores = scores.detach().float().clone()
    scores[:, :NUM_RESERVED] = float("-inf")
    if history is not None:  # PAD positions hit id 0, which is reserved and already -inf
        scores.scatter_(1, history.to(scores.device), float("-inf"))
    valid = targets >= NUM_RESERVED
    target_score = scores.gather(1, targets.clamp(min=0).unsqueeze(1).to(scores.device))
    ahead = (scores > target_score).sum(1) + (scores == target_score).sum(1) - 1
    ranks = ahead.float()
    ranks[~valid.to(ranks.device) | torch.isinf(target_score.squeeze(1))] = float("inf")
    return ranks


def ranking_sums(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k hit counts and the NDCG@10 sum for a batch of ranks, plus the count ``n``."""
    sums = {f"recall@{k}": float((ranks < k).sum()) for k in ks}
    in_top = ranks < 10
    sums["ndcg@10"] = float((1.0 / torch.log2(ranks[in_top] + 2)).sum())
    sums["n"] = float(ranks.numel())
    return sums


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    return {k: total.get(k, 0.0) + part.get(k, 0.0) for k in total.keys() | part.keys()}


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Means from summed counts (``n`` is kept as the number of evaluated users)."""
    n = sums.get("n", 0.0)
    if n == 0:
        raise ValueError("no evaluation examples")
    return {k: (v if k == "n" else v / n) for k, v in sums.items()}
