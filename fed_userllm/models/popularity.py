"""Most-popular baseline: every user gets the training-set item counts as scores.

The floor any sequence model must beat; counts are additive, so federated clients can sum theirs. In the
federated app's ``popularity`` phase the counts are a differentially private release (how many users rated
each item, each user contributing a unit-norm vector) that becomes the AR encoder's item prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.models.layers import Pretrained


@dataclass
class PopularityConfig:
    vocab_sizes: dict[str, int]

    def __post_init__(self) -> None:
        if self.vocab_sizes.get("item", 0) <= NUM_RESERVED:
            raise ValueError(f"vocab_sizes['item']={self.vocab_sizes.get('item')}: expected an int > "
                             f"{NUM_RESERVED} (the reserved ids are included)")


class Popularity(Pretrained, nn.Module):
    """Scores [B, V] = how often each item occurred in the training events given to ``fit`` (or a release)."""

    config_class = PopularityConfig
    model_type = "popularity"

    def __init__(self, config: PopularityConfig):
        super().__init__()
        self.config = config
        self.counts = nn.Parameter(torch.zeros(config.vocab_sizes["item"]), requires_grad=False)

    def fit(self, item_ids: torch.Tensor) -> Popularity:
        """Count real item ids (any shape; PAD/UNK/MASK are ignored, so padded batches are fine)."""
        V = self.config.vocab_sizes["item"]
        ids = item_ids.flatten().to(self.counts.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"item ids span {int(ids.min())}..{int(ids.max())}: expected 0..{V - 1}")
        with torch.no_grad():
            self.counts.copy_(torch.bincount(ids[ids >= NUM_RESERVED], minlength=V))
        return self

    def log_prior(self, floor: float) -> torch.Tensor:
        """log(max(counts, floor)) [V]: an item bias. ``floor`` keeps rare items (noise, under DP) comparable."""
        if not floor > 0:
            raise ValueError(f"floor={floor}: expected > 0")
        return self.counts.detach().clamp(min=floor).log()

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The counts for every row of the batch (a copy, so callers may edit it in place)."""
        if "mask" not in batch:
            raise ValueError("batch is missing 'mask' (needed for the batch size)")
        return self.counts.expand(batch["mask"].shape[0], -1).clone()
