"""Tiny user encoders and batches for tests: every encoder class at test size, and right-padded batches with
learnable patterns."""

import torch

from fed_userllm.data.vocab import NUM_RESERVED, PAD_ID
from fed_userllm.models import BERT4Rec, DualEncoder

VOCAB = {"item": 23, "genre": 7, "rating": 8}
MAX_LEN = 12


def tiny(cls, **overrides):
    """A small model of ``cls``; BERT4Rec also reads genre so every model sees several features."""
    features = ("item", "genre") if cls is BERT4Rec else ("item", "genre", "rating")
    kwargs = dict(vocab_sizes=VOCAB, features=features, feature_dims={f: 8 for f in features}, d_model=16,
                  n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.1)
    if cls is DualEncoder:
        kwargs.update(num_user_embeddings=2, fusion_hidden=24)
    kwargs.update(overrides)
    return cls(cls.config_class(**kwargs))


def make_batch(lengths, T, seed=0, pattern="random"):
    """Right-padded batch. Learnable patterns: "successor" (next item = item + 1), "repeat" (one item per row)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    n_items = VOCAB["item"] - NUM_RESERVED
    if pattern == "random":
        item, genre, rating = (torch.randint(NUM_RESERVED, VOCAB[f], mask.shape, generator=g)
                               for f in ("item", "genre", "rating"))
    else:
        start = torch.randint(0, n_items, (len(lengths), 1), generator=g)
        item = NUM_RESERVED + (start + torch.arange(T) * (pattern == "successor")) % n_items
        genre, rating = NUM_RESERVED + item % 4, NUM_RESERVED + item % 5
    batch = {f: x.masked_fill(~mask, PAD_ID) for f, x in zip(("item", "genre", "rating"), (item, genre, rating),
                                                                  strict=True)}
    batch["mask"] = mask
    return batch
