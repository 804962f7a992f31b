"""Autoregressive user encoder (User-LLM's default, "early fusion").

Each event's feature embeddings are concatenated and projected to ``d_model``; a causal Transformer turns
the sequence into one user embedding per event. Per-feature heads predict the next event's features with
softmaxes whose weights are tied to the input embedding tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.models.layers import (
    EncoderConfig,
    Pretrained,
    Transformer,
    attention_mask,
    check_batch,
    check_per_feature,
    init_weights,
    last_index,
    position_ids,
    row_mean_nll,
    tied_output,
)


@dataclass
class ARUserEncoderConfig(EncoderConfig):
    """``loss_weights`` (one positive weight per feature) defaults to item 1.0, other features 0.5."""

    loss_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_weights is None:
            self.loss_weights = {f: 1.0 if f == "item" else 0.5 for f in self.features}
        self.loss_weights = check_per_feature("loss_weights", self.loss_weights, self.features, float)


class ARUserEncoder(Pretrained, nn.Module):
    """Causal Transformer over fused event features; ``encode`` gives [B, T, d_model] user embeddings."""

    config_class = ARUserEncoderConfig
    model_type = "ar_encoder"

    def __init__(self, config: ARUserEncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.ModuleDict({f: nn.Embedding(c.vocab_sizes[f], c.feature_dims[f]) for f in c.features})
        self.fuse = nn.Linear(sum(c.feature_dims.values()), c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.d_model, c.n_layers, c.n_heads, c.dropout)
        self.heads = nn.ModuleDict({f: nn.Linear(c.d_model, c.feature_dims[f]) for f in c.features})
        self.apply(init_weights)
        self.unembed = nn.ModuleDict({f: tied_output(self.embed[f]) for f in c.features})

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-event user embeddings [B, T, d_model]; position t depends on events <= t only."""
        B, T = check_batch(batch, self.config.features, self.config.max_len)
        x = torch.cat([self.embed[f](batch[f]) for f in self.config.features], dim=-1)
        x = self.drop(self.fuse(x) + self.pos(position_ids(B, T, x.device)))
        return self.transformer(x, attention_mask(batch["mask"], causal=True))

    forward = encode

    def logits(self, h: torch.Tensor, feature: str) -> torch.Tensor:
        """Scores over ``feature``'s whole vocabulary from user embeddings h [..., d_model]."""
        return self.unembed[feature](self.heads[feature](h))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted next-event cross-entropy: position t predicts event t+1 where t+1 is real and not UNK.

        Averaged per row, then over rows (each window's loss depends on that window only).
        """
        h = self.encode(batch)[:, :-1]
        total = h.new_zeros(h.shape[0])
        for f, weight in self.config.loss_weights.items():
            target = batch[f][:, 1:]
            valid = batch["mask"][:, 1:] & (target >= NUM_RESERVED)
            total = total + weight * row_mean_nll(self.logits(h, f), target, valid)
        return total.mean()

    def next_logits(self, batch: dict[str, torch.Tensor], feature: str) -> torch.Tensor:
        """``feature`` scores [B, vocab_sizes[feature]] for the event after each row's last real event."""
        if feature not in self.config.features:
            raise ValueError(f"feature={feature!r}: expected one of the configured {self.config.features}")
        h = self.encode(batch)
        last = h[torch.arange(h.shape[0], device=h.device), last_index(batch["mask"])]
        return self.logits(last, feature)

    @property
    def next_item_dim(self) -> int:
        return self.config.feature_dims["item"]

    def next_item_vectors(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, next_item_dim] from ``encode`` output h: what the item head scores every item embedding
        against after the last event."""
        return self.heads["item"](h[torch.arange(h.shape[0], device=h.device), last_index(mask)])[:, None]

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-item scores [B, vocab_sizes['item']] (reserved ids included; the evaluator drops them)."""
        return self.next_logits(batch, "item")

    def genre_logits_last(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-genre scores [B, vocab_sizes['genre']] after the last real event (FavGenre probe)."""
        return self.next_logits(batch, "genre")
