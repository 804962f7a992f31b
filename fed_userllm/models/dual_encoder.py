"""Dual encoder baseline (User-LLM's "late fusion" alternative).

User tower: every feature sequence goes through the same causal Transformer on its own (features do not
attend to each other), then fusion layers (an MLP over the concatenated per-feature states) turn each
position into ``num_user_embeddings`` user embeddings. Label tower: one embedding per id of each label
feature (the rows of a bias-free Linear), scored against the user embeddings by dot product with a softmax
over the full vocabulary; with several user embeddings a label's score is its best match (max over k).

Training signal: the paper uses one label per sequence; here every prefix predicts its next event, which
gives a window T-1 labels for the same compute (the causal tower makes each prefix's state a summary of
that prefix only). Full-vocabulary softmax (not in-batch negatives) keeps each sample's loss independent of
the rest of the batch, which DP-SGD needs.
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
    init_weights,
    last_index,
    position_ids,
    row_mean_nll,
)


@dataclass
class DualEncoderConfig(EncoderConfig):
    """``label_weights``: loss weight per label-tower feature (default item 1.0, genre 0.5 if configured)."""

    num_user_embeddings: int = 1
    fusion_hidden: int = 128
    label_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.item_features != "learned":
            raise ValueError(f"item_features={self.item_features!r}: public item features are implemented for the "
                             "AR encoder (model='ar') only")
        if self.label_weights is None:
            self.label_weights = {"item": 1.0, **({"genre": 0.5} if "genre" in self.features else {})}
        self.label_weights = {f: float(w) for f, w in self.label_weights.items()}
        if "item" not in self.label_weights or not set(self.label_weights) <= set(self.features):
            raise ValueError(f"label_weights keys {sorted(self.label_weights)}: expected 'item' and only "
                             f"configured features {list(self.features)}")
        if min(self.label_weights.values()) <= 0:
            raise ValueError(f"label_weights={self.label_weights}: expected positive weights")
        if self.num_user_embeddings < 1 or self.fusion_hidden < 1:
            raise ValueError(f"num_user_embeddings={self.num_user_embeddings}, fusion_hidden="
                             f"{self.fusion_hidden}: expected both >= 1")


class DualEncoder(Pretrained, nn.Module):
    """Two-tower model; ``encode`` gives [B, k, d_model] user embeddings after each row's last event."""

    config_class = DualEncoderConfig
    model_type = "dual_encoder"

    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.ModuleDict({f: nn.Embedding(c.vocab_sizes[f], c.feature_dims[f]) for f in c.features})
        self.proj = nn.ModuleDict({f: nn.Linear(c.feature_dims[f], c.d_model) for f in c.features})
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.d_model, c.n_layers, c.n_heads, c.dropout)
        self.fusion = nn.Sequential(nn.Linear(len(c.features) * c.d_model, c.fusion_hidden), nn.GELU(),
                                    nn.Linear(c.fusion_hidden, c.num_user_embeddings * c.d_model))
        self.label = nn.ModuleDict({f: nn.Linear(c.d_model, c.vocab_sizes[f], bias=False)
                                    for f in c.label_weights})
        self.apply(init_weights)

    def user_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """User embeddings after every prefix: [B, T, k, d_model]."""
        B, T = check_batch(batch, self.config.features, self.config.max_len)
        pos = self.pos(position_ids(B, T, batch["mask"].device))
        x = torch.stack([self.proj[f](self.embed[f](batch[f])) + pos for f in self.config.features], dim=1)
        mask = attention_mask(batch["mask"], causal=True).unsqueeze(1)  # broadcast over features
        h = self.transformer(self.drop(x), mask)  # [B, F, T, d]
        u = self.fusion(h.transpose(1, 2).flatten(2))  # [B, T, k * d]
        return u.unflatten(-1, (self.config.num_user_embeddings, self.config.d_model))

    @property
    def state_dim(self) -> int:
        """Width of the user states ``encode`` returns."""
        return self.config.d_model

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """User embeddings [B, k, d_model] summarising each row's whole history."""
        u = self.user_states(batch)
        return u[torch.arange(u.shape[0], device=u.device), last_index(batch["mask"])]

    forward = encode

    def next_item_vectors(self, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``encode`` output itself: the user embeddings are what the item label tower is scored against."""
        return u

    @property
    def next_item_dim(self) -> int:
        return self.config.d_model

    def similarity(self, u: torch.Tensor, feature: str) -> torch.Tensor:
        """Scores [..., V] of every label-tower id against user embeddings u [..., k, d]: max over k."""
        return self.label[feature](u).max(dim=-2).values

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every prefix predicts the next event's label features (full softmax), averaged per row."""
        u = self.user_states(batch)[:, :-1]
        total = u.new_zeros(u.shape[0])
        for f, weight in self.config.label_weights.items():
            target = batch[f][:, 1:]
            valid = batch["mask"][:, 1:] & (target >= NUM_RESERVED)
            total = total + weight * row_mean_nll(self.similarity(u, f), target, valid)
        return total.mean()

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Similarity [B, vocab_sizes['item']] of the user embeddings with every item's label embedding."""
        return self.similarity(self.encode(batch), "item")
