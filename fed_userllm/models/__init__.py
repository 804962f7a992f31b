"""User encoders (AR, dual, BERT4Rec) and the popularity baseline, with one loader for all of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fed_userllm.data.item_features import public_item_table
from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.bert4rec import BERT4Rec, BERT4RecConfig
from fed_userllm.models.dual_encoder import DualEncoder, DualEncoderConfig
from fed_userllm.models.layers import CONFIG_FILE, with_item_dim
from fed_userllm.models.popularity import Popularity, PopularityConfig
from fed_userllm.settings import ENCODER_NAMES

MODELS = {cls.model_type: cls for cls in (ARUserEncoder, DualEncoder, BERT4Rec, Popularity)}
ENCODERS = dict(zip(ENCODER_NAMES, ((ARUserEncoder, ARUserEncoderConfig), (DualEncoder, DualEncoderConfig),
                                     (BERT4Rec, BERT4RecConfig)), strict=True))


def build_encoder(settings: EncoderArchitecture, vocab_sizes: dict[str, int], max_len: int,
                  item_features: np.ndarray | None = None, **options) -> torch.nn.Module:
    """A fresh encoder as run ``settings`` describe it (``model``: ar | dual | bert4rec, and its sizes) for
    windows of ``max_len`` events (plus the target).

    ``item_features`` [vocab, dim], the public item table (`public_items`), makes the encoder read and score
    items through it instead of a learned table. The AR encoder takes its ``seen_offset`` from ``settings``;
    ``options`` are further fields of the encoder's config (e.g. ``label_smoothing`` of the AR encoder).
    """
    if settings.model not in ENCODERS:
        raise ValueError(f"model={settings.model!r}: expected one of {sorted(ENCODERS)}")
    model_class, config_class = ENCODERS[settings.model]
    if settings.model == "ar":
        options = {"seen_offset": settings.seen_offset, **options}
    public = {} if item_features is None else {"item_features": "public",
                                                "public_feature_dim": int(item_features.shape[1])}
    config = with_item_dim(config_class(vocab_sizes=vocab_sizes, max_len=max_len + 1,
                                        d_model=settings.d_model, n_layers=settings.n_layers,
                                        n_heads=settings.n_heads, dropout=settings.dropout, **public, **options),
                           settings.item_dim)
    if item_features is None:
        return model_class(config)
    return model_class(config, torch.from_numpy(np.asarray(item_features, dtype=np.float32)))


def public_items(settings: EncoderArchitecture, dataset: str) -> np.ndarray | None:
    """The public item table of ``dataset``'s catalog an encoder of ``settings`` reads (None: it learns a table)."""
    if settings.item_features != "public":
        return None
    return public_item_table(dataset, settings.item_features_llm)


class EncoderArchitecture(Protocol):
    """What `build_encoder` reads of a run's settings (`PretrainConfig` and the federated `EncoderSettings`
    both have it)."""

    model: str
    d_model: int
    n_layers: int
    n_heads: int
    dropout: float
    item_dim: int
    item_features: str
    item_features_llm: str
    seen_offset: bool  # the AR encoder's repeat-aware output (the others have none)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load any saved model of this package, dispatching on ``model_type`` in its config.json."""
    model_type = json.loads((Path(path) / CONFIG_FILE).read_text()).get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"{path}/{CONFIG_FILE} has model_type={model_type!r}: "
                         f"expected one of {sorted(MODELS)}")
    return MODELS[model_type].from_pretrained(path, device)


__all__ = [
    "ENCODERS", "MODELS", "ARUserEncoder", "ARUserEncoderConfig", "BERT4Rec", "BERT4RecConfig", "DualEncoder",
    "DualEncoderConfig", "Popularity", "PopularityConfig", "build_encoder", "load_pretrained", "public_items",
]
