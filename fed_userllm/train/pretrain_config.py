"""The settings of a centralized pretraining run (its config.json), importable without torch so the CLI can
show them quickly."""

from __future__ import annotations

from dataclasses import dataclass

from fed_userllm.settings import ENCODER_NAMES, ITEM_FEATURES, check_choices, from_dict, setting

MODEL_NAMES = (*ENCODER_NAMES, "popularity")


@dataclass
class PretrainConfig:
    """Everything a centralized pretraining run depends on (saved as the run's config.json)."""

    dataset: str = setting("ml-latest-small", "ml-latest-small (embedded), a GroupLens name (ml-100k ... ml-32m, "
                                              "downloaded), 'synthetic:users=N,items=M', or a folder path")
    model: str = setting("ar", "user encoder (ar, dual, bert4rec) or the popularity baseline", MODEL_NAMES)
    max_len: int = setting(50, "history window length in events")
    d_model: int = setting(64, "encoder width")
    n_layers: int = setting(2, "encoder layers")
    n_heads: int = setting(2, "attention heads per layer")
    item_dim: int = setting(64, "item embedding width, tied with the output layer")
    item_features: str = setting("learned", "learned: a per-item table | public: frozen features of the public "
                                            "catalog and a learned projection (ar only)", ITEM_FEATURES)
    item_features_llm: str = setting("smollm2", "public item features: the LLM whose title representation is "
                                                "used ('' for genres and year only)")
    dropout: float = setting(0.2, "dropout probability")
    seen_offset: bool = setting(True, "learn one score offset for items already in the history: repeat-aware "
                                      "ranking (ar only; the other models ignore it)")
    label_smoothing: float = setting(0.0, "label smoothing of the next-event cross-entropy (ar only)")
    epochs: int = setting(20, "maximum epochs (early stopping may end sooner)")
    batch_size: int = setting(64, "training windows per step")
    window_stride: int = setting(0, "a training window ends every this many events of a user (0: max_len, "
                                    "so each transition is predicted once per epoch)")
    lr: float = setting(5e-3, "peak AdamW learning rate (linear warm-up, cosine decay)")
    weight_decay: float = setting(1e-3, "AdamW weight decay")
    warmup_frac: float = setting(0.05, "fraction of the steps spent warming up")
    patience: int = setting(5, "stop after this many epochs without a better validation NDCG@10")
    seed: int = setting(0, "random seed")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("max_len", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if not 0 <= self.window_stride <= self.max_len:
            raise ValueError(f"window_stride={self.window_stride}: expected 0..max_len ({self.max_len})")
        if self.model != "ar" and self.label_smoothing:
            raise ValueError(f"label_smoothing={self.label_smoothing} with model={self.model!r}: an option of the "
                             "ar encoder only")
        if self.lr <= 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError(f"lr={self.lr}, warmup_frac={self.warmup_frac}: expected lr > 0, 0 <= warmup_frac < 1")

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        return from_dict(cls, values, "pretraining")
