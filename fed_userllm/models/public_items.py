"""Item vectors computed from the public catalog instead of a learned per-item table.

The catalog (titles, genres, years) is public; only the users' sequences are private. With
``item_features="public"`` an encoder reads each item through a frozen table of public side information
(`fed_userllm.data.item_features`) and a small learned projection, and scores the next item as
``q . f_j + b_j`` with ``q`` in that same feature space. Under user-level DP the private update then carries
the sequence model and a projection, not a vocabulary-sized table, so the same noise buys far more signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn


class PublicItemInput(nn.Module):
    """Input vectors of item ids: ``proj(features[id])``; ``features`` is a frozen buffer (never trained or sent).

    This module has no parameter of its own (its projection is a child), so Opacus accepts its buffer."""

    def __init__(self, features: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("features", features)
        self.proj = nn.Linear(features.shape[1], dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(F.embedding(ids, self.features))


class PublicItemOutput(nn.Module):
    """Scores of every item, ``q @ features.T + bias``, from queries q in the public feature space.

    It reads the input side's frozen table (held in a tuple, so it is not registered, saved or moved twice,
    and this module owns no buffer: Opacus refuses trainable modules with buffers, which could hold private
    statistics); the per-item ``bias`` (popularity) is learned.
    """

    def __init__(self, items: PublicItemInput):
        super().__init__()
        self._items = (items,)
        self.bias = nn.Parameter(torch.zeros(items.features.shape[0]))

    @property
    def features(self) -> torch.Tensor:
        return self._items[0].features

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.linear(q, self.features, self.bias)


@register_grad_sampler(PublicItemOutput)
def _bias_grad_sample(layer: PublicItemOutput, activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus per-sample gradient of the bias (the features are frozen): summed over all but the batch dim."""
    return {layer.bias: torch.einsum("n...k->nk", backprops)} if layer.bias.requires_grad else {}


def public_items(features: torch.Tensor, dim: int) -> tuple[PublicItemInput, PublicItemOutput]:
    """The input and output layers of items over one shared, frozen ``features`` table [vocab, feature_dim]."""
    items = PublicItemInput(features.detach().to(torch.float32).contiguous(), dim)
    return items, PublicItemOutput(items)
