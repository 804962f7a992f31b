"""Readers for review datasets (Amazon Review, Google Local Review), normalised like MovieLens.

Both become the same `Interactions` + `Catalog` pair the MovieLens readers return, so the sequence protocol,
the encoders and the LLM tasks run on them unchanged. Review text does not fit that representation, so it
travels beside it in `ReviewData` (one entry per event) and `event_texts` aligns it with `UserSequences`.

Formats (JSON lines, plain or gzip):
- Amazon (2014 / 2018 releases): reviews ``{reviewerID, asin, overall, unixReviewTime, summary, reviewText}``;
  metadata ``meta_*.json`` ``{asin, title, category: [...]}`` (2018) or ``{asin, title, categories: [[...]]}``
  (2014, written as Python literals rather than JSON). Category paths run from the department, which names
  the whole dataset ("Movies & TV"), down to a leaf; the leaves are the item's genres.
- Google Local (2021 release): reviews ``{user_id, gmap_id, rating, time (ms), text}``; metadata
  ``meta-*.json`` ``{gmap_id, name, category: [...]}``.

String user and item ids become integers 1, 2, ... (users in order of first review, items in metadata
order); the original keys are kept. Reviews of items with no title in the metadata and exact repeats of
(user, item, time) are dropped, counted in ``Interactions.skipped`` and warned about.
"""

from __future__ import annotations

import ast
import gzip
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_userllm.data.movielens import Catalog, DataError, Interactions
from fed_userllm.data.sequences import UserSequences

TEXT_FIELDS = ("text", "summary")


@dataclass
class ReviewData:
    """Interactions and catalog of a review dataset plus each event's review text (source-file order)."""

    interactions: Interactions
    catalog: Catalog
    text: np.ndarray  # object [E]: review body ("" when the review has none)
    summary: np.ndarray  # object [E]: Amazon's one-line summary ("" for Google Local)
    user_keys: list[str]  # raw user id i is user_keys[i - 1]
    item_keys: list[str]  # raw item id i is item_keys[i - 1] (asin / gmap_id)


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; anything but an object is a DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    try:  # the 2014 Amazon metadata is written as Python dict literals
                        record = ast.literal_eval(line)
                    except (ValueError, SyntaxError):
                        raise DataError(f"{path}:{number}: not a JSON object ({err})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
                yield number, record
    except (OSError, EOFError, UnicodeDecodeError) as err:
        if isinstance(err, FileNotFoundError):
            raise DataError(f"{path}: file not found") from err
        raise DataError(f"{path}: cannot read ({err})") from err


def _get(record: dict, name: str, kind: type | tuple[type, ...], where: str, required: bool = True):
    """A field of the expected type; missing/None is allowed only when not ``required``."""
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{name}' is {value!r}, expected {names}")
    return value


def _amazon_genres(record: dict, where: str) -> tuple[str, ...]:
    if "category" in record:  # 2018: one path, department first
        path = _get(record, "category", list, where, required=False) or []
        return (str(path[-1]).strip(),) if len(path) > 1 else ()
    paths = _get(record, "categories", list, where, required=False) or []  # 2014: several paths
    if not all(isinstance(p, list) for p in paths):
        raise DataError(f"{where}: field 'categories' is {paths!r}, expected a list of category paths")
    return tuple(dict.fromkeys(str(p[-1]).strip() for p in paths if len(p) > 1))


def _google_genres(record: dict, where: str) -> tuple[str, ...]:
    return tuple(str(c).strip() for c in _get(record, "category", list, where, required=False) or [])


def _read_meta(path: Path, key: str, title: str, genres) -> tuple[dict[str, int], Catalog, int]:
    """Item key -> integer id (file order), the catalog by id, and how many repeated entries were ignored."""
    ids: dict[str, int] = {}
    titles, genre_map, repeats = {}, {}, 0
    for number, record in _records(path):
        where = f"{path}:{number}"
        item = _get(record, key, str, where)
        if item in ids:  # real metadata dumps repeat some entries; the first one wins
            repeats += 1
            continue
        ids[item] = len(ids) + 1
        name = (_get(record, title, str, where, required=False) or "").strip()
        if name:
            titles[ids[item]] = name
        genre_map[ids[item]] = genres(record, where)
    if not ids:
        raise DataError(f"{path}: no items found")
    return ids, Catalog(titles, genre_map), repeats


def _read(reviews: Path, meta: Path, meta_fields: tuple[str, str], fields: dict[str, str], genres,
          time_scale: int) -> ReviewData:
    """Shared reader: metadata first (ids, titles, genres), then one event per review line."""
    items, catalog, repeats = _read_meta(meta, *meta_fields, genres)
    users: dict[str, int] = {}
    columns: dict[str, list] = {name: [] for name in ("user", "item", "rating", "timestamp", *TEXT_FIELDS)}
    no_title = 0
    for number, record in _records(reviews):
        where = f"{reviews}:{number}"
        user = _get(record, fields["user"], str, where)
        item = items.get(_get(record, fields["item"], str, where))
        rating = _get(record, fields["rating"], (int, float), where)
        time = _get(record, fields["time"], int, where)
        if not 1 <= rating <= 5:
            raise DataError(f"{where}: field '{fields['rating']}' is {rating!r}, expected 1..5")
        if item not in catalog.titles:
            no_title += 1
            continue
        columns["user"].append(users.setdefault(user, len(users) + 1))
        columns["item"].append(item)
        columns["rating"].append(rating)
        columns["timestamp"].append(time // time_scale)
        for name in TEXT_FIELDS:
            text = _get(record, fields[name], str, where, required=False) if name in fields else None
            columns[name].append((text or "").strip())
    if not columns["user"]:
        raise DataError(f"{reviews}: no reviews of items with a title in {meta.name}")
    skipped = {"reviews of items without a title": no_title, "repeated metadata entries": repeats}
    for reason, n in skipped.items():
        if n:
            warnings.warn(f"{reviews}: skipped {n} {reason}", stacklevel=3)
    interactions = Interactions(
        np.asarray(columns["user"], np.int64), np.asarray(columns["item"], np.int64),
        np.asarray(columns["rating"], np.float32), np.asarray(columns["timestamp"], np.int64),
        {reason: n for reason, n in skipped.items() if n},
    )
    data = ReviewData(interactions, catalog, np.asarray(columns["text"], dtype=object),
                      np.asarray(columns["summary"], dtype=object), list(users), list(items))
    _drop_repeats(data, reviews)
    return data


def _drop_repeats(data: ReviewData, path: Path) -> None:
    """Keep the first of several reviews with the same user, item and time (export duplicates)."""
    i = data.interactions
    seen: set[tuple[int, int, int]] = set()
    keep = np.ones(len(i), dtype=bool)
    for row, key in enumerate(zip(i.user.tolist(), i.item.tolist(), i.timestamp.tolist(), strict=True)):
        keep[row] = key not in seen
        seen.add(key)
    if keep.all():
        return
    i.skipped["duplicate reviews"] = int((~keep).sum())
    warnings.warn(f"{path}: skipped {int((~keep).sum())} duplicate reviews (same user, item and time)",
                  stacklevel=4)
    for name in ("user", "item", "rating", "timestamp"):
        setattr(i, name, getattr(i, name)[keep])
    data.text, data.summary = data.text[keep], data.summary[keep]


def read_amazon(reviews: str | Path, meta: str | Path) -> ReviewData:
    """Amazon Review data (any category file of the 2014 or 2018 release) and its ``meta_*`` file."""
    fields = {"user": "reviewerID", "item": "asin", "rating": "overall", "time": "unixReviewTime",
              "text": "reviewText", "summary": "summary"}
    return _read(Path(reviews), Path(meta), ("asin", "title"), fields, _amazon_genres, 1)


def read_google_local(reviews: str | Path, meta: str | Path) -> ReviewData:
    """Google Local Review data (a ``review-<State>`` file) and its ``meta-<State>`` file; times are in ms."""
    fields = {"user": "user_id", "item": "gmap_id", "rating": "rating", "time": "time", "text": "text"}
    return _read(Path(reviews), Path(meta), ("gmap_id", "name"), fields, _google_genres, 1000)


def _json_files(directory: Path) -> list[Path]:
    suffixes = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffixes))


def detect_reviews(directory: str | Path) -> tuple[str, Path, Path] | None:
    """(format, reviews file, metadata file) when ``directory`` holds one review dataset, else None.

    Amazon: ``meta_<Category>.json[.gz]`` plus one other JSON file; Google Local: ``meta-<State>`` plus
    ``review-<State>``. Two candidate review files are ambiguous and raise a DataError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = _json_files(directory)
    for fmt, meta_prefix in (("amazon", "meta_"), ("google_local", "meta-")):
        metas = [p for p in files if p.name.startswith(meta_prefix)]
        if not metas:
            continue
        others = [p for p in files if not p.name.startswith(("meta_", "meta-"))]
        if fmt == "google_local":
            others = [p for p in others if p.name.startswith("review-")]
        if len(metas) != 1 or len(others) != 1:
            raise DataError(f"{directory}: expected one {meta_prefix}* metadata file and one review file for "
                            f"the {fmt} format, found {[p.name for p in metas + others]}")
        return fmt, others[0], metas[0]
    return None


def read_reviews(directory: str | Path) -> ReviewData:
    """Read the review dataset in ``directory`` (format detected from the file names)."""
    found = detect_reviews(directory)
    if found is None:
        raise DataError(f"{directory}: no review dataset found; expected meta_<Category>.json[.gz] plus a "
                        "review file (Amazon) or meta-<State>.json[.gz] plus review-<State>.json[.gz] "
                        "(Google Local)")
    fmt, reviews, meta = found
    return (read_amazon if fmt == "amazon" else read_google_local)(reviews, meta)


def read_review_catalog(directory: str | Path) -> Catalog:
    """Only the public item catalog (the metadata file) of the review dataset in ``directory``."""
    found = detect_reviews(directory)
    if found is None:
        raise DataError(f"{directory}: no review dataset found")
    fmt, _, meta = found
    fields = ("asin", "title", _amazon_genres) if fmt == "amazon" else ("gmap_id", "name", _google_genres)
    return _read_meta(meta, *fields)[1]


def review_sequences(data: ReviewData, max_len: int = 50, min_events: int = 3) -> UserSequences:
    """The paper's sequence protocol on a review dataset (same rules as MovieLens)."""
    return UserSequences.from_interactions(data.interactions, data.catalog, max_len=max_len,
                                           min_events=min_events)


def event_texts(seq: UserSequences, data: ReviewData, field: str = "text") -> np.ndarray:
    """Review ``field`` ("text" or "summary") of every event of ``seq``, aligned with its event order.

    Events are matched on (user, item, time), which is unique once repeats are dropped; ``seq`` must have
    been built from ``data``.
    """
    if field not in TEXT_FIELDS:
        raise ValueError(f"field={field!r}: expected one of {TEXT_FIELDS}")
    i = data.interactions
    values = getattr(data, field)
    keys = zip(i.user.tolist(), i.item.tolist(), i.timestamp.tolist(), strict=True)
    lookup = dict(zip(keys, values, strict=True))
    users = np.repeat(seq.user_ids, np.diff(seq.offsets))
    keys = zip(users.tolist(), seq.raw_item.tolist(), seq.timestamp.tolist(), strict=True)
    try:
        return np.asarray([lookup[k] for k in keys], dtype=object)
    except KeyError as err:
        raise ValueError(f"event (user, item, time) {err.args[0]} is not in the review data: build the "
                         "sequences from the same ReviewData") from None
