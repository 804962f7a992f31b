"""Building blocks shared by the encoders: config checks, batch checks, a pre-LN Transformer, save/load.

Everything here keeps the batch as dimension 0 of every module input and uses only modules Opacus has
per-sample gradient rules for (nn.Linear, nn.Embedding, nn.LayerNorm); attention is the parameter-free
``scaled_dot_product_attention``, so the models train under DP-SGD and export with ``torch.export``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.settings import ITEM_FEATURES

CONFIG_FILE = "config.json"  # a saved model: its config with model_type (save_pretrained / from_pretrained)
WEIGHTS_FILE = "model.safetensors"  # ... and its weights
DEFAULT_FEATURE_DIMS = {"item": 64, "genre": 16, "rating": 8}


@dataclass
class EncoderConfig:
    """Fields every sequence encoder shares; vocab sizes come from the data layer (reserved ids included).

    ``max_len`` is the longest sequence accepted (training windows are the data's ``max_len + 1`` long).
    ``feature_dims`` defaults to ``DEFAULT_FEATURE_DIMS`` for the configured features.
    """

    vocab_sizes: dict[str, int]
    features: tuple[str, ...] = ("item", "genre", "rating")
    feature_dims: dict[str, int] | None = None
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 51
    dropout: float = 0.1
    item_features: str = "learned"  # learned: a per-item table | public: frozen catalog features + a projection
    public_feature_dim: int = 0  # width of the public item features (item_features="public")
    content_prior: float = 4.0  # public: initial weight of the current item's features in the next-item query

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        self.vocab_sizes = {f: int(v) for f, v in self.vocab_sizes.items()}
        if "item" not in self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features={self.features}: expected distinct names including 'item'")
        for f in self.features:
            if self.vocab_sizes.get(f, 0) <= NUM_RESERVED:
                raise ValueError(f"vocab_sizes[{f!r}]={self.vocab_sizes.get(f)}: expected an int > "
                                 f"{NUM_RESERVED} (the reserved ids are included) for every feature")
        if self.feature_dims is None:
            unknown = [f for f in self.features if f not in DEFAULT_FEATURE_DIMS]
            if unknown:
                raise ValueError(f"feature_dims is required for features {unknown} (no default dim)")
            self.feature_dims = {f: DEFAULT_FEATURE_DIMS[f] for f in self.features}
        self.feature_dims = check_per_feature("feature_dims", self.feature_dims, self.features, int)
        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model}, n_heads={self.n_heads}: "
                             "expected d_model divisible by n_heads")
        if self.n_layers < 1 or self.max_len < 1:
            raise ValueError(f"n_layers={self.n_layers}, max_len={self.max_len}: expected both >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.item_features not in ITEM_FEATURES:
            raise ValueError(f"item_features={self.item_features!r}: expected one of {ITEM_FEATURES}")
        if (self.item_features == "public") != (self.public_feature_dim > 0):
            raise ValueError(f"public_feature_dim={self.public_feature_dim} with item_features="
                             f"{self.item_features!r}: expected > 0 exactly when item_features='public'")


def with_item_dim(config: EncoderConfig, item_dim: int) -> EncoderConfig:
    """``config`` with item embeddings ``item_dim`` wide, the other features keeping their widths."""
    return replace(config, feature_dims={**config.feature_dims, "item": item_dim})


def check_per_feature(name: str, values: dict, features: tuple[str, ...], kind: type) -> dict:
    """A per-feature dict must name exactly ``features`` with positive values (coerced to ``kind``)."""
    if set(values) != set(features):
        raise ValueError(f"{name} has keys {sorted(values)}: expected exactly the features {list(features)}")
    out = {f: kind(values[f]) for f in features}
    bad = {f: v for f, v in out.items() if not v > 0}
    if bad:
        raise ValueError(f"{name}={bad}: expected positive values")
    return out


def check_batch(batch: dict[str, torch.Tensor], features: tuple[str, ...], max_len: int) -> tuple[int, int]:
    """Validate a batch against the batch contract and return (B, T)."""
    missing = [k for k in (*features, "mask") if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}: the model reads features {list(features)} and 'mask'")
    mask = batch["mask"]
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"batch['mask'] is {mask.dtype} of shape {tuple(mask.shape)}: expected bool [B, T]")
    B, T = mask.shape
    if T > max_len:
        raise ValueError(f"batch has T={T} events per row: expected T <= max_len={max_len}")
    for f in features:
        if batch[f].shape != mask.shape or batch[f].dtype != torch.long:
            raise ValueError(f"batch[{f!r}] is {batch[f].dtype} of shape {tuple(batch[f].shape)}: "
                             f"expected int64 of shape {(B, T)} like batch['mask']")
    if not torch.compiler.is_compiling() and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("batch['mask'] has a real event after padding: sequences must be right-padded")
    return B, T


def attention_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Bool [B, 1, T, T] (True = may attend): real keys only, and only keys <= query when causal.

    Every query may also attend to itself, so padded queries never see an empty row (no NaNs); real
    queries are unaffected because their own key is real anyway.
    """
    T = mask.shape[1]
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return allowed | torch.eye(T, dtype=torch.bool, device=mask.device)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real event ([B]); right padding makes it length - 1."""
    return (mask.sum(1) - 1).clamp(min=0)


def position_ids(B: int, T: int, device: torch.device) -> torch.Tensor:
    """[B, T] positions: batched (not [1, T]) so Opacus sees the batch dimension in the position table."""
    return torch.arange(T, device=device).expand(B, T)


def row_mean_nll(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over real ids, averaged over each row's valid targets: [B].

    ``logits`` covers the full vocabulary; reserved ids are dropped from the softmax (scored -inf in place of
    slicing them off, which would copy the [.., vocab] logits forward and backward). A per-row mean (not a
    mean over all tokens of the batch) keeps each sample's loss independent of the others, as DP-SGD needs.
    ``label_smoothing`` spreads that share of the target over the real ids.
    """
    reserved = torch.arange(logits.shape[-1], device=logits.device) < NUM_RESERVED
    logits = logits.masked_fill(reserved, float("-inf"))
    targets = targets.clamp(min=NUM_RESERVED)
    nll = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    if label_smoothing:
        log_normalizer = nll + logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        spread = log_normalizer - logits[..., NUM_RESERVED:].mean(-1)  # mean -log p over the real ids
        nll = (1 - label_smoothing) * nll + label_smoothing * spread
    valid = valid.to(nll.dtype)
    return (nll * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the second-to-last dim of [..., T, d] (any leading dims)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        *lead, T, d = x.shape
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(-3, -2)  # [..., H, T, d / H]
                   for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(-3, -2).reshape(*lead, T, d))


class Block(nn.Module):
    """Pre-LN Transformer block."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)


def tied_output(embedding: nn.Embedding) -> nn.Linear:
    """Output layer whose weight IS ``embedding.weight`` (one Parameter, two modules).

    Opacus 1.6 supports this: each hooked module adds its per-sample gradient into the shared parameter
    (counted by ``_forward_counter``), so the tied table gets input and output contributions.
    """
    out = nn.Linear(embedding.embedding_dim, embedding.num_embeddings)
    out.weight = embedding.weight
    nn.init.zeros_(out.bias)  # a per-id bias (e.g. item popularity) is separate from the tied table
    return out


def init_weights(module: nn.Module) -> None:
    """Small embeddings (tied logits start near uniform); variance-preserving Linear layers, zero biases.

    A Linear at std 0.02 after 0.02-std embeddings would shrink the item signal far below the position
    embeddings and stall learning, so Linear weights use std 1/sqrt(fan_in) instead.
    Apply before tying: the tied output layer shares the embedding's init.
    """
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Pretrained:
    """save_pretrained / from_pretrained: ``config.json`` (with ``model_type``) + ``model.safetensors``.

    safetensors refuses shared tensors, so ``save_model`` writes a tied table once and ``load_model``
    copies it into the already-tied parameter of a freshly built model.
    """

    config_class: ClassVar[type]
    model_type: ClassVar[str]
    config: Any

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({"model_type": self.model_type, **asdict(self.config)},
                                                   indent=2) + "\n")
        save_model(self, str(path / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Self:
        """Rebuild the model from ``path`` in eval mode on ``device``."""
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
        model_type = config.pop("model_type", None)
        if model_type != cls.model_type:
            raise ValueError(f"{path} holds model_type={model_type!r}: expected {cls.model_type!r}")
        model = cls(cls.config_class(**config))
        load_model(model, str(Path(path) / WEIGHTS_FILE))
        return model.to(device).eval()

