"""User encoders (AR, dual, BERT4Rec) and the popularity baseline, with one loader for all of them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fed_userllm.models.ar_encoder import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.models.bert4rec import BERT4Rec, BERT4RecConfig
from fed_userllm.models.dual_encoder import DualEncoder, DualEncoderConfig
from fed_userllm.models.popularity import Popularity, PopularityConfig

MODELS = {cls.model_type: cls for cls in (ARUserEncoder, DualEncoder, BERT4Rec, Popularity)}


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load any saved model of this package, dispatching on ``model_type`` in its config.json."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"{path}/config.json has model_type={model_type!r}: "
                         f"expected one of {sorted(MODELS)}")
    return MODELS[model_type].from_pretrained(path, device)


__all__ = [
    "MODELS", "ARUserEncoder", "ARUserEncoderConfig", "BERT4Rec", "BERT4RecConfig", "DualEncoder",
    "DualEncoderConfig", "Popularity", "PopularityConfig", "load_pretrained",
]
