"""Feature vocabularies with reserved ids shared by every feature: PAD=0, UNK=1, MASK=2."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD_ID, UNK_ID, MASK_ID = 0, 1, 2
NUM_RESERVED = 3


@dataclass
class Vocab:
    """Maps raw feature values (ints or strings) to ids ``NUM_RESERVED..``; anything unseen maps to UNK."""

    tokens: list
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.tokens)
        self._index = {t: i + NUM_RESERVED for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def build(cls, values) -> Vocab:
        """Vocabulary of the distinct values, sorted (so ids do not depend on event order)."""
        return cls(sorted(set(np.asarray(values).tolist())))

    def __len__(self) -> int:
        """Size including the reserved ids: the embedding table size."""
        return len(self.tokens) + NUM_RESERVED

    def encode(self, values) -> np.ndarray:
        """Ids of ``values`` (any iterable); unknown values get UNK_ID."""
        get = self._index.get
        return np.fromiter((get(v, UNK_ID) for v in np.asarray(values).tolist()), dtype=np.int64,
                           count=len(values))

    def decode(self, token_id: int):
        """The raw value of a non-reserved id."""
        if not NUM_RESERVED <= token_id < len(self):
            raise KeyError(f"id {token_id} is reserved or outside the vocabulary (size {len(self)})")
        return self.tokens[token_id - NUM_RESERVED]

    def to_list(self) -> list:
        return list(self.tokens)
