"""Per-user, time-ordered event sequences and the paper's example protocol.

Protocol (User-LLM §4): each user's events are sorted by timestamp with a *stable* sort (ties keep the
source-file order); the last event is the user's **test** target, the one before it the **validation**
target; training uses windows of up to ``max_len + 1`` events drawn only from the events before those two,
so neither target ever appears in training.

Vocabularies come from the public item catalog (every catalog item and genre gets an id whether or not anyone
rated it) and the fixed rating buckets, never from the private events: their sizes are written into every
model config, so a vocabulary built from ratings would publish which items somebody rated.

Storage is CSR-like (one flat array per feature plus per-user offsets), so a federated client that owns a
few users is just a list of user indices: no per-client copies of the data.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from fed_userllm.data.movielens import Catalog, Interactions
from fed_userllm.data.vocab import NUM_RESERVED, PAD_ID, UNK_ID, Vocab

FEATURES = ("item", "genre", "rating")
RATING_BUCKETS = (1, 2, 3, 4, 5)


def rating_bucket(rating: np.ndarray) -> np.ndarray:
    """Star ratings 0.5..5 to integer buckets 1..5 (half stars round up)."""
    return np.clip(np.ceil(np.asarray(rating, dtype=np.float64) - 1e-9), 1, 5).astype(np.int64)


@dataclass
class UserSequences:
    """Every user's time-ordered events with vocabulary ids per feature, plus the train/val/test split."""

    user_ids: np.ndarray  # [U] raw user ids
    offsets: np.ndarray  # [U + 1] user u's events are [offsets[u], offsets[u + 1])
    raw_item: np.ndarray  # [E] raw movie ids
    timestamp: np.ndarray  # [E]
    features: dict[str, np.ndarray]  # feature name -> [E] vocabulary ids
    vocabs: dict[str, Vocab]
    catalog: Catalog
    max_len: int = 50
    skipped: dict[str, int] | None = None

    @classmethod
    def from_interactions(cls, interactions: Interactions, catalog: Catalog, max_len: int = 50,
                          min_events: int = 3) -> UserSequences:
        """Sort, split and encode. Users with fewer than ``min_events`` (>= 3) events are skipped, counted."""
        if min_events < 3:
            raise ValueError(f"min_events={min_events}: every user needs >= 3 events (train, validation, test)")
        if max_len < 1:
            raise ValueError(f"max_len={max_len}: expected a positive window length")
        if len(interactions) == 0:
            raise ValueError("the dataset has no events")
        order = np.argsort(interactions.timestamp, kind="stable")
        order = order[np.argsort(interactions.user[order], kind="stable")]
        user = interactions.user[order]
        user_ids, starts, counts = np.unique(user, return_index=True, return_counts=True)
        keep_user = counts >= min_events
        skipped = dict(interactions.skipped)
        if (~keep_user).any():
            skipped[f"users with < {min_events} events"] = int((~keep_user).sum())
            warnings.warn(f"skipped {int((~keep_user).sum())} users with fewer than {min_events} events",
                          stacklevel=2)
        if not keep_user.any():
            raise ValueError(f"no user has at least {min_events} events")
        keep_event = np.repeat(keep_user, counts)
        order, counts = order[keep_event], counts[keep_user]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        raw_item = interactions.item[order]
        genre_names = np.array([(catalog.genres.get(int(i)) or ("",))[0] for i in raw_item.tolist()], dtype=object)
        vocabs = public_vocabularies(catalog)
        unknown = int((~np.isin(raw_item, vocabs["item"].tokens)).sum())
        if unknown:
            skipped["events of items missing from the catalog (kept as UNK)"] = unknown
            warnings.warn(f"{unknown} events name items missing from the catalog: they are kept as UNK", stacklevel=2)
        features = {
            "item": vocabs["item"].encode(raw_item),
            "genre": vocabs["genre"].encode(genre_names),
            "rating": vocabs["rating"].encode(rating_bucket(interactions.rating[order])),
        }
        return cls(user_ids[keep_user], offsets, raw_item, interactions.timestamp[order], features, vocabs,
                   catalog, max_len, skipped)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {name: len(v) for name, v in self.vocabs.items()}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    # --- the split ---------------------------------------------------------------------------------------
    def train_ranges(self, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Global [start, end) of each user's training events (all but the last two)."""
        users = self._users(users)
        return self.offsets[users], self.offsets[users + 1] - 2

    def target_index(self, users: np.ndarray | None, split: str) -> np.ndarray:
        """Global event index of each user's validation (second to last) or test (last) target."""
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: expected 'val' or 'test'")
        return self.offsets[self._users(users) + 1] - (2 if split == "val" else 1)

    def windows(self, users: np.ndarray | None = None, stride: int | None = None) -> np.ndarray:
        """Training windows [W, 2] of global (start, end): each holds 2..max_len+1 training events.

        Windows are cut backwards from each user's last training event with ``stride`` (default
        ``max_len``, so consecutive windows overlap by one event and every training transition is
        predicted exactly once per epoch).
        """
        stride = stride or self.max_len
        if not 1 <= stride <= self.max_len:
            raise ValueError(f"stride={stride}: expected 1..max_len ({self.max_len})")
        starts, ends = self.train_ranges(users)
        length = ends - starts
        n = np.where(length >= 2, np.maximum(0, np.ceil((length - 1 - self.max_len) / stride)).astype(int) + 1, 0)
        user_end = np.repeat(ends, n)
        step = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        win_end = user_end - step * stride
        win_start = np.maximum(np.repeat(starts, n), win_end - self.max_len - 1)
        return np.stack([win_start, win_end], axis=1)

    # --- batches -----------------------------------------------------------------------------------------
    def gather(self, starts: np.ndarray, ends: np.ndarray, length: int) -> dict[str, torch.Tensor]:
        """Right-padded feature ids of the event spans [start, end), truncated to the last ``length`` events."""
        starts = np.maximum(np.asarray(starts), np.asarray(ends) - length)
        n = np.asarray(ends) - starts
        pos = np.arange(length)
        mask = pos[None, :] < n[:, None]
        idx = np.where(mask, starts[:, None] + pos[None, :], 0)
        batch = {name: torch.from_numpy(np.where(mask, values[idx], PAD_ID)) for name, values in self.features.items()}
        batch["mask"] = torch.from_numpy(mask)
        return batch

    def training_batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        """Batch of training windows, T = max_len + 1 (models predict event t+1 from events <= t)."""
        return self.gather(windows[:, 0], windows[:, 1], self.max_len + 1)

    def eval_batch(self, users: np.ndarray, split: str) -> dict[str, torch.Tensor]:
        """History (last max_len events before the target, T = max_len) plus the target event's ids."""
        users = self._users(users)
        target = self.target_index(users, split)
        batch = self.gather(self.offsets[users], target, self.max_len)
        for name, values in self.features.items():
            batch[f"target_{name}"] = torch.from_numpy(values[target])
        return batch

    # --- text and labels for the LLM tasks -------------------------------------------------------------
    def titles(self, start: int, end: int) -> list[str]:
        return [self.catalog.title(i) for i in self.raw_item[start:end].tolist()]

    def favorite_genre(self, users: np.ndarray, split: str = "test") -> np.ndarray:
        """FavGenre label: the most frequent genre id over all genres of the history's items (ties: smallest id)."""
        labels = []
        for start, end in zip(self.offsets[self._users(users)], self.target_index(users, split), strict=True):
            counts = Counter(g for i in self.raw_item[max(start, end - self.max_len):end].tolist()
                             for g in self.catalog.genres.get(int(i), ()))
            ids = [(-c, gid) for g, c in counts.items() if (gid := int(self.vocabs["genre"].encode([g])[0])) != UNK_ID]
            labels.append(min(ids)[1] if ids else UNK_ID)
        return np.asarray(labels, dtype=np.int64)

    def _users(self, users: np.ndarray | None) -> np.ndarray:
        if users is None:
            return np.arange(self.num_users)
        users = np.asarray(users, dtype=np.int64)
        if users.size and (users.min() < 0 or users.max() >= self.num_users):
            raise IndexError(f"user index out of range 0..{self.num_users - 1}")
        return users


def public_vocabularies(catalog: Catalog) -> dict[str, Vocab]:
    """Item, genre and rating vocabularies from public facts only: the catalog's items and genres (all of them,
    sorted, so ids depend on nothing but the catalog) and the fixed rating buckets."""
    return {"item": Vocab(catalog.items.tolist()),
            "genre": Vocab(sorted({g for genres in catalog.genres.values() for g in genres})),
            "rating": Vocab(list(RATING_BUCKETS))}


def item_genre_ids(seq: UserSequences) -> np.ndarray:
    """Primary-genre id of every item id in the item vocabulary (reserved ids map to PAD)."""
    out = np.full(len(seq.vocabs["item"]), PAD_ID, dtype=np.int64)
    names = [(seq.catalog.genres.get(int(i)) or ("",))[0] for i in seq.vocabs["item"].tokens]
    out[NUM_RESERVED:] = seq.vocabs["genre"].encode(np.array(names, dtype=object))
    return out
