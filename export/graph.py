"""The AR user encoder rewritten for ExecuTorch's XNNPACK backend: same weights, same numbers, other ops.

XNNPACK does not take ``scaled_dot_product_attention``, ``layer_norm``, tensor slicing of activations or
reshapes with a symbolic size, so lowering the training model splits it into many delegate pieces with
portable kernels in between. This module computes ``ARUserEncoder.encode`` for one history with ops XNNPACK
takes whole: q/k/v as three Linear layers (the fused ``qkv`` weight split by rows), attention as 3-D ``bmm``
with an additive causal mask built from ``arange``, LayerNorm written out with means as matrix products,
and reshapes that infer the (dynamic) sequence length. Only the embedding lookups stay outside the delegate.

No padding mask is needed: the encoder is causal and histories are right-padded, so an event's embedding
never depends on what follows it, padded or not.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fed_userllm.models import ARUserEncoder
from fed_userllm.models.layers import Block


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dim with the means as products with a constant [d, 1] column."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        d = ln.normalized_shape[-1]
        self.eps = ln.eps
        self.register_buffer("weight", ln.weight.detach().clone())
        self.register_buffer("bias", ln.bias.detach().clone())
        self.register_buffer("mean", torch.full((d, 1), 1.0 / d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x @ self.mean
        return xc * torch.rsqrt((xc * xc) @ self.mean + self.eps) * self.weight + self.bias


class ExportBlock(nn.Module):
    """A pre-LN Transformer block on one sequence [T, d] with an additive causal mask [T, T]."""

    def __init__(self, block: Block):
        super().__init__()
        attn = block.attn
        d = attn.proj.in_features
        self.n_heads, self.scale = attn.n_heads, (d // attn.n_heads) ** -0.5
        self.ln1, self.ln2 = LayerNorm(block.ln1), LayerNorm(block.ln2)
        w, b = attn.qkv.weight, attn.qkv.bias  # rows: q, then k, then v
        self.q, self.k, self.v = (_linear(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i in range(3))
        self.proj, self.mlp = copy.deepcopy(attn.proj), copy.deepcopy(block.mlp)

    def attention(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        heads = (-1, self.n_heads, d // self.n_heads)  # -1: the sequence length, which may be dynamic
        q, k, v = (lin(x).view(heads).transpose(0, 1) for lin in (self.q, self.k, self.v))
        scores = torch.bmm(q, k.transpose(1, 2)) * self.scale + causal  # [H, T, T]
        y = torch.bmm(torch.softmax(scores, dim=-1), v)  # [H, T, d / H]
        return self.proj(y.transpose(0, 1).contiguous().view(-1, d))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x), causal)
        return x + self.mlp(self.ln2(x))


class ExportableEncoder(nn.Module):
    """``ARUserEncoder.encode`` for one history: ids [1, T, F] (features in config order) -> [1, T, state_dim].

    ``max_len`` is the longest history the export accepts (at most the model's ``max_len``). The module owns
    copies of the weights, so quantizing it leaves the source model untouched.
    """

    def __init__(self, model: ARUserEncoder, max_len: int):
        super().__init__()
        c = model.config
        if not 1 <= max_len <= c.max_len:
            raise ValueError(f"max_len={max_len}: expected 1..{c.max_len} (the model's max_len)")
        self.features, self.max_len = c.features, max_len
        self.embed = nn.ModuleList(copy.deepcopy(model.embed[f]) for f in c.features)
        self.fuse = copy.deepcopy(model.fuse)
        self.register_buffer("pos", model.pos.weight.detach()[:max_len].clone())
        self.blocks = nn.ModuleList(ExportBlock(b) for b in model.transformer.blocks)
        self.ln_f = LayerNorm(model.transformer.ln_f)
        public = c.item_features == "public"  # the state ends with the event's public item features
        self.item_column = c.features.index("item") if public else None
        self.register_buffer("item_features", model.embed["item"].features.detach().clone() if public else None)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = torch.cat([emb(ids[0, :, i]) for i, emb in enumerate(self.embed)], dim=-1)
        x = self.fuse(x) + self.pos[:T]
        t = torch.arange(T, device=ids.device)
        causal = torch.where(t[None, :] > t[:, None], float("-inf"), 0.0)  # [T, T]: -inf above the diagonal
        for block in self.blocks:
            x = block(x, causal)
        x = self.ln_f(x)
        if self.item_column is not None:
            x = torch.cat([x, self.item_features[ids[0, :, self.item_column]]], dim=-1)
        return x.unsqueeze(0)
