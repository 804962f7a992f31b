"""Most-popular baseline: every user gets the training-set item counts as scores.

The floor any sequence model must beat; counts are additive, so federated clients can sum theirs.
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
    """Scores [B, V] = how often each item occurred in the training events given to ``fit``."""

    config_class = PopularityConfig
    model_type = "popularity"

    def __init__(self, config: PopularityConfig):
        super().__init__()
        self.config = config
        self.register_buffer("counts", torch.zeros(config.vocab_sizes["item"]))

    def fit(self, item_ids: torch.Tensor) -> Popularity:
        """Count real item ids (any shape; PAD/UNK/MASK are ignored, so padded batches are fine)."""
        V = self.config.vocab_sizes["item"]
        ids = item_ids.flatten().to(self.counts.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"item ids span {int(ids.min())}..{int(ids.max())}: expected 0..{V - 1}")
        self.counts = torch.bincount(ids[ids >= NUM_RESERVED], minlength=V).to(self.counts.dtype)
        return self

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The counts for every row of the batch (a copy, so callers may edit it in place)."""
        if "mask" not in batch:
            raise ValueError("batch is missing 'mask' (needed for the batch size)")
        return self.counts.expand(batch["mask"].shape[0], -1).clone()
