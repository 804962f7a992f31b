"""The project's split as RecBole atomic files, so a peer library trains and ranks on exactly the same events.

``NAME.inter`` holds one line per event: the user's index, the item's vocabulary id and, as the timestamp, the
event's rank within its user (0, 1, 2, ...). RecBole stores timestamps as float32 and sorts them itself, so the
raw seconds would merge events a few seconds apart and leave ties to its sort; the rank keeps the project's
stable time order exactly (ranks are exact in float32 far beyond any user's event count).
With that order, RecBole's leave-one-out split (``LS: valid_and_test``, ``order: TO``) picks the same validation
and test targets as `UserSequences`. ``NAME.item`` lists every item id of the vocabulary, so RecBole ranks the
same candidates (the whole public catalog), rated or not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_userllm.data.sequences import UserSequences
from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.runtime import atomic_write_bytes

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token"
FLOAT32_EXACT = 2 ** 24  # every integer below this is exact in float32


def event_ranks(seq: UserSequences) -> np.ndarray:
    """[E] each event's position within its user's time-ordered events."""
    lengths = seq.lengths()
    return np.arange(seq.num_events) - np.repeat(seq.offsets[:-1], lengths)


def write_atomic_files(seq: UserSequences, folder: str | Path, name: str) -> Path:
    """Write ``folder/name/name.inter`` and ``name.item`` (the layout RecBole reads); returns the dataset folder."""
    if seq.lengths().max() >= FLOAT32_EXACT:
        raise ValueError(f"a user has {seq.lengths().max()} events: ranks above {FLOAT32_EXACT} are not exact "
                         "in RecBole's float32 timestamps")
    out = Path(folder) / name
    users = np.repeat(np.arange(seq.num_users), seq.lengths())
    rows = np.stack([users, seq.features["item"], event_ranks(seq)], axis=1)
    lines = [INTER_HEADER, *("\t".join(map(str, row)) for row in rows.tolist())]
    atomic_write_bytes(out / f"{name}.inter", ("\n".join(lines) + "\n").encode())
    items = range(NUM_RESERVED, len(seq.vocabs["item"]))
    atomic_write_bytes(out / f"{name}.item", ("\n".join([ITEM_HEADER, *map(str, items)]) + "\n").encode())
    return out
