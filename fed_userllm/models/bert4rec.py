"""BERT4Rec baseline: a bidirectional Transformer trained to recover masked events' items.

A masked event has every feature replaced by MASK_ID (its genre or rating would leak the item). To rank
the next item, a MASK event is appended after the last real event and the item head is read there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fed_userllm.data.vocab import MASK_ID, NUM_RESERVED, PAD_ID
from fed_userllm.models.layers import (
    EncoderConfig,
    Pretrained,
    Transformer,
    attention_mask,
    check_batch,
    init_weights,
    last_index,
    position_ids,
    row_mean_nll,
    tied_output,
)


@dataclass
class BERT4RecConfig(EncoderConfig):
    """Item ids only by default; ``mask_prob`` is the share of real events masked per training row."""

    features: tuple[str, ...] = ("item",)
    mask_prob: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.item_features != "learned":
            raise ValueError(f"item_features={self.item_features!r}: public item features are implemented for the "
                             "AR encoder (model='ar') only")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob={self.mask_prob}: expected 0 < mask_prob < 1")


class BERT4Rec(Pretrained, nn.Module):
    """Bidirectional encoder; ``encode`` gives [B, T, d_model] (each event sees the whole real sequence)."""

    config_class = BERT4RecConfig
    model_type = "bert4rec"

    def __init__(self, config: BERT4RecConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.ModuleDict({f: nn.Embedding(c.vocab_sizes[f], c.feature_dims[f]) for f in c.features})
        self.fuse = nn.Linear(sum(c.feature_dims.values()), c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.d_model, c.n_layers, c.n_heads, c.dropout)
        self.head = nn.Linear(c.d_model, c.feature_dims["item"])
        self.apply(init_weights)
        self.unembed = tied_output(self.embed["item"])

    @property
    def state_dim(self) -> int:
        """Width of the user states ``encode`` returns."""
        return self.config.d_model

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B, T = check_batch(batch, self.config.features, self.config.max_len)
        x = torch.cat([self.embed[f](batch[f]) for f in self.config.features], dim=-1)
        x = self.drop(self.fuse(x) + self.pos(position_ids(B, T, x.device)))
        return self.transformer(x, attention_mask(batch["mask"], causal=False))

    forward = encode

    def sample_mask(self, batch: dict[str, torch.Tensor],
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Events to mask [B, T]: each real event with ``mask_prob``; a row that drew none masks its last."""
        real = batch["mask"]
        draw = torch.rand(real.shape, generator=generator, device=real.device)
        masked = (draw < self.config.mask_prob) & real
        last = F.one_hot(last_index(real), real.shape[1]).bool() & real
        return masked | (last & ~masked.any(dim=1, keepdim=True))

    def masked_item_loss(self, batch: dict[str, torch.Tensor], masked: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the true item at the ``masked`` events (averaged per row, then over rows)."""
        if masked.shape != batch["mask"].shape or bool((masked & ~batch["mask"]).any()):
            raise ValueError("masked must be a bool [B, T] selecting real events only")
        corrupted = {**batch, **{f: batch[f].masked_fill(masked, MASK_ID) for f in self.config.features}}
        h = self.encode(corrupted)
        valid = masked & (batch["item"] >= NUM_RESERVED)
        return row_mean_nll(self.unembed(self.head(h)), batch["item"], valid).mean()

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked-item objective on a freshly sampled mask."""
        return self.masked_item_loss(batch, self.sample_mask(batch, generator))

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Item scores [B, V] at a MASK event appended after the last real event.

        If T < max_len the batch grows by one column; otherwise full rows drop their oldest event.
        """
        _, T = check_batch(batch, self.config.features, self.config.max_len)
        keys = (*self.config.features, "mask")
        if T < self.config.max_len:
            batch = {k: F.pad(batch[k], (0, 1), value=False if k == "mask" else PAD_ID) for k in keys}
            T += 1
        full = batch["mask"][:, -1:]
        batch = {k: torch.where(full, batch[k].roll(-1, dims=1), batch[k]) for k in keys}
        slot = torch.where(full[:, 0], T - 1, batch["mask"].sum(1))
        at = F.one_hot(slot, T).bool()
        query = {f: batch[f].masked_fill(at, MASK_ID) for f in self.config.features}
        query["mask"] = batch["mask"] | at
        h = self.encode(query)[torch.arange(at.shape[0], device=at.device), slot]
        return self.unembed(self.head(h))
