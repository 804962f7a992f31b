"""Autoregressive user encoder (User-LLM's default, "early fusion").

Each event's feature embeddings are concatenated and projected to ``d_model``; a causal Transformer turns
the sequence into one user embedding per event. Per-feature heads predict the next event's features with
softmaxes whose weights are tied to the input embedding tables. With ``item_features="public"`` items are read
and scored through frozen public catalog features instead of a learned table (`models.public_items`).
With ``seen_offset`` the item scores are repeat-aware: one learned offset is added to the score of every item
already in the history, so a dataset whose users never repeat an item (ratings) learns to rank them last,
and one with repeats learns how much to favour them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from fed_userllm.models.public_items import public_items

# The seen-item indicator's value: scaling the offset's input scales its Adam steps, so the offset can move by
# tens of logits within one training run instead of a few.
SEEN_SCALE = 10.0


@dataclass
class ARUserEncoderConfig(EncoderConfig):
    """``loss_weights`` (one positive weight per feature) defaults to item 1.0, other features 0.5.
    ``seen_offset`` learns the repeat-aware item score offset; ``label_smoothing`` softens every feature's
    next-event target."""

    loss_weights: dict[str, float] | None = None
    seen_offset: bool = False
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing}: expected 0 <= label_smoothing < 1")
        if self.loss_weights is None:
            self.loss_weights = {f: 1.0 if f == "item" else 0.5 for f in self.features}
        self.loss_weights = check_per_feature("loss_weights", self.loss_weights, self.features, float)


class ARUserEncoder(Pretrained, nn.Module):
    """Causal Transformer over fused event features; ``encode`` gives [B, T, state_dim] user embeddings."""

    config_class = ARUserEncoderConfig
    model_type = "ar_encoder"

    def __init__(self, config: ARUserEncoderConfig, item_features: torch.Tensor | None = None):
        """``item_features`` [vocab, public_feature_dim]: the public table when ``item_features="public"``
        (zeros when omitted, e.g. before ``from_pretrained`` loads the saved one)."""
        super().__init__()
        self.config = config
        c = config
        public = c.item_features == "public"
        learned = [f for f in c.features if not (public and f == "item")]
        self.embed = nn.ModuleDict({f: nn.Embedding(c.vocab_sizes[f], c.feature_dims[f]) for f in learned})
        self.fuse = nn.Linear(sum(c.feature_dims.values()), c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.d_model, c.n_layers, c.n_heads, c.dropout)
        self.heads = nn.ModuleDict({f: nn.Linear(self.state_dim, c.public_feature_dim if public and f == "item"
                                                 else c.feature_dims[f]) for f in c.features})
        self.unembed = nn.ModuleDict()
        if public:
            if item_features is None:
                item_features = torch.zeros(c.vocab_sizes["item"], c.public_feature_dim)
            if tuple(item_features.shape) != (c.vocab_sizes["item"], c.public_feature_dim):
                raise ValueError(f"item_features has shape {tuple(item_features.shape)}: expected "
                                 f"{(c.vocab_sizes['item'], c.public_feature_dim)} (vocab, public_feature_dim)")
            self.embed["item"], self.unembed["item"] = public_items(item_features, c.feature_dims["item"])
        self.apply(init_weights)
        if public:  # the query starts as `content_prior` x the current item's features: "more like this one"
            with torch.no_grad():
                self.heads["item"].weight.zero_()
                self.heads["item"].weight[:, c.d_model:] = c.content_prior * torch.eye(c.public_feature_dim)
        self.unembed.update({f: tied_output(self.embed[f]) for f in learned})
        if c.seen_offset:  # an nn.Linear on the indicator, so Opacus computes its per-sample gradients
            self.seen = nn.Linear(1, 1, bias=False)
            nn.init.zeros_(self.seen.weight)

    @property
    def state_dim(self) -> int:
        """Width of the per-event states: d_model, plus the public item features (their skip path) if used."""
        return self.config.d_model + self.config.public_feature_dim

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-event user states [B, T, state_dim]; position t depends on events <= t only.

        With public item features the state ends with the event's own public features: a skip path that lets
        the next-item query say "items like this one" without learning it through the Transformer."""
        B, T = check_batch(batch, self.config.features, self.config.max_len)
        x = torch.cat([self.embed[f](batch[f]) for f in self.config.features], dim=-1)
        x = self.drop(self.fuse(x) + self.pos(position_ids(B, T, x.device)))
        h = self.transformer(x, attention_mask(batch["mask"], causal=True))
        if self.config.item_features == "public":
            h = torch.cat([h, F.embedding(batch["item"], self.embed["item"].features)], dim=-1)
        return h

    forward = encode

    def logits(self, h: torch.Tensor, feature: str) -> torch.Tensor:
        """Scores over ``feature``'s whole vocabulary from user embeddings h [..., d_model]."""
        return self.unembed[feature](self.heads[feature](h))

    def first_seen(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, vocab] position of each item's first real occurrence in the row (T where it never occurs)."""
        items, mask = batch["item"], batch["mask"]
        B, T = items.shape
        first = torch.full((B, self.config.vocab_sizes["item"]), T, dtype=torch.long, device=items.device)
        positions = torch.where(mask, position_ids(B, T, items.device), T)
        return first.scatter_reduce(1, items, positions, reduce="amin")

    def seen_scores(self, seen: torch.Tensor) -> torch.Tensor:
        """The learned offset for a bool indicator [..., vocab] of items already in the history."""
        return self.seen((SEEN_SCALE * seen.to(self.seen.weight.dtype)).unsqueeze(-1)).squeeze(-1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted next-event cross-entropy: position t predicts event t+1 where t+1 is real and not UNK.

        Averaged per row, then over rows (each window's loss depends on that window only).
        """
        h = self.encode(batch)[:, :-1]
        total = h.new_zeros(h.shape[0])
        for f, weight in self.config.loss_weights.items():
            target = batch[f][:, 1:]
            valid = batch["mask"][:, 1:] & (target >= NUM_RESERVED)
            logits = self.logits(h, f)
            if f == "item" and self.config.seen_offset:  # position t has seen the items at positions <= t
                steps = torch.arange(h.shape[1], device=h.device)
                logits = logits + self.seen_scores(self.first_seen(batch)[:, None, :] <= steps[None, :, None])
            total = total + weight * row_mean_nll(logits, target, valid, self.config.label_smoothing)
        return total.mean()

    def next_scores(self, batch: dict[str, torch.Tensor], features: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Per feature, scores [B, vocab_sizes[feature]] for the event after each row's last real event (one
        pass of the Transformer for all of them)."""
        for feature in features:
            if feature not in self.config.features:
                raise ValueError(f"feature={feature!r}: expected one of the configured {self.config.features}")
        h = self.encode(batch)
        last = h[torch.arange(h.shape[0], device=h.device), last_index(batch["mask"])]
        return {f: self.next_item_scores(last, batch) if f == "item" else self.logits(last, f) for f in features}

    def next_logits(self, batch: dict[str, torch.Tensor], feature: str) -> torch.Tensor:
        """``feature`` scores [B, vocab_sizes[feature]] for the event after each row's last real event."""
        return self.next_scores(batch, (feature,))[feature]

    def next_item_scores(self, last: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Item scores [B, vocab] from each row's last-event embedding ``last`` [B, d_model] (computed here or by
        the exported encoder on a phone): the tied item head, plus the seen offset on the row's history."""
        logits = self.logits(last, "item")
        if self.config.seen_offset:
            logits = logits + self.seen_scores(self.first_seen(batch) <= last_index(batch["mask"])[:, None])
        return logits

    @property
    def next_item_dim(self) -> int:
        return self.heads["item"].out_features

    def next_item_vectors(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, next_item_dim] from ``encode`` output h: what the item head scores every item embedding
        against after the last event."""
        return self.heads["item"](h[torch.arange(h.shape[0], device=h.device), last_index(mask)])[:, None]

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-item scores [B, vocab_sizes['item']] (reserved ids included; the evaluator drops them)."""
        return self.next_logits(batch, "item")
