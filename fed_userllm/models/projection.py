"""Projection from user-encoder embeddings to the tokens an LLM consumes (User-LLM, Ning, Liu et al., 2024, §3).

The user encoder emits one embedding per event ([B, T, d_user]). ``Projection`` maps them to ``d_out``:
a small cross-attention dimension (cross-attention integration) or the LLM hidden size (soft prompt).
With ``perceiver=True`` a ``PerceiverResampler`` first compresses the T events to ``num_latents`` tokens
(the paper: 50 events -> 16 tokens at no loss in accuracy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of ``q_dim`` queries over ``kv_dim`` keys/values, computed at ``inner_dim``.

    Kept separate from the LLM's hidden size so user tokens can stay small (the paper's point that user
    embeddings need not be projected up to the LLM width for cross-attention).
    """

    def __init__(self, q_dim: int, kv_dim: int, inner_dim: int, n_heads: int, out_dim: int | None = None):
        super().__init__()
        if inner_dim % n_heads:
            raise ValueError(f"inner_dim={inner_dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(q_dim, inner_dim, bias=False)
        self.kv = nn.Linear(kv_dim, 2 * inner_dim, bias=False)
        self.out = nn.Linear(inner_dim, out_dim or q_dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, q_dim] queries; ctx: [B, N, kv_dim]; ctx_mask: [B, N] True at real context tokens."""
        b, n_q, _ = x.shape
        q = self.q(x).view(b, n_q, self.n_heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n_q, -1))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GELU MLP used by the Perceiver and the gated cross-attention blocks."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class PerceiverResampler(nn.Module):
    """Trainable latent queries cross-attend to the event embeddings and return ``num_latents`` tokens.

    As in Flamingo, the keys/values are the events concatenated with the latents themselves; padded
    events are masked out, so the output does not depend on padding.
    """

    def __init__(self, dim: int, num_latents: int = 16, depth: int = 1, n_heads: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm_x": nn.LayerNorm(dim),
                    "norm_latents": nn.LayerNorm(dim),
                    "attn": CrossAttention(dim, dim, dim, n_heads),
                    "ff": feed_forward(dim),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] event embeddings; mask: [B, T] True at real events -> [B, num_latents, dim]."""
        b = x.shape[0]
        lat = self.latents.expand(b, -1, -1)
        lat_mask = torch.ones(b, lat.shape[1], dtype=torch.bool, device=x.device)
        kv_mask = torch.cat([mask.bool(), lat_mask], dim=1)
        for layer in self.layers:
            xn, latn = layer["norm_x"](x), layer["norm_latents"](lat)
            lat = lat + layer["attn"](latn, torch.cat([xn, latn], dim=1), kv_mask)
            lat = lat + layer["ff"](lat)
        return self.norm(lat)


class Projection(nn.Module):
    """User embeddings [B, T, d_user] (+ event mask) -> LLM-side user tokens [B, N, d_out] (+ token mask).

    N = T without the Perceiver (padded events stay masked), N = num_latents with it (all tokens real).
    """

    def __init__(
        self,
        d_user: int,
        d_out: int,
        perceiver: bool = True,
        num_latents: int = 16,
        perceiver_depth: int = 1,
        n_heads: int = 4,
    ):
        super().__init__()
        # the most heads up to n_heads that split d_user evenly: encoder states with public item features are
        # [h ; features], whose width need not be a multiple of n_heads
        heads = max(h for h in range(1, n_heads + 1) if d_user % h == 0)
        self.perceiver = PerceiverResampler(d_user, num_latents, perceiver_depth, heads) if perceiver else None
        self.mlp = nn.Sequential(nn.Linear(d_user, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask.bool()
        if not mask.any(dim=1).all():
            raise ValueError("every row of the user mask needs at least one real event (mask all False)")
        if self.perceiver is not None:
            states = self.perceiver(states, mask)
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return self.mlp(states), mask
