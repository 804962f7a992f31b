"""Dataset names -> data: the embedded default, named GroupLens variants, local folders, synthetic specs.

``prepare`` turns a dataset into `UserSequences` once and caches the arrays with a manifest that hashes
the inputs and settings; later loads with the same inputs and settings read the cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from fed_userllm.data.download import VARIANTS, cache_dir, fetch, file_digest
from fed_userllm.data.movielens import Catalog, DataError, Interactions, read_catalog, read_movielens
from fed_userllm.data.reviews import detect_reviews, read_review_catalog, read_reviews
from fed_userllm.data.sequences import UserSequences
from fed_userllm.data.synthetic import synthetic_movielens
from fed_userllm.data.vocab import Vocab

DEFAULT_DATASET = "ml-latest-small"
PREPARED_FORMAT = 2  # bump when the prepared layout or the protocol changes


def embedded_dir() -> Path:
    """The vendored ml-latest-small folder shipped inside the package."""
    return Path(str(resources.files("fed_userllm.data") / DEFAULT_DATASET))


def resolve(dataset: str | os.PathLike | None = None) -> Path | dict:
    """Where a dataset spec points: a local folder, or a dict of synthetic-generator arguments."""
    spec = str(dataset or DEFAULT_DATASET)
    if spec == DEFAULT_DATASET:
        return embedded_dir()
    if spec in VARIANTS:
        return fetch(VARIANTS[spec])
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic_args(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise DataError(f"unknown dataset {spec!r}: expected {DEFAULT_DATASET} (embedded), one of "
                    f"{', '.join(VARIANTS)} (downloaded), 'synthetic[:users=N,items=M,...]', or a folder path")


def _is_review_folder(dataset: str | os.PathLike | None) -> bool:
    return dataset is not None and detect_reviews(dataset) is not None


def load_interactions(dataset: str | os.PathLike | None = None) -> tuple[Interactions, Catalog]:
    """Events and catalog of MovieLens (embedded, downloaded or a folder), synthetic data, or an Amazon /
    Google Local review folder."""
    if _is_review_folder(dataset):
        data = read_reviews(dataset)
        return data.interactions, data.catalog
    source = resolve(dataset)
    return synthetic_movielens(**source) if isinstance(source, dict) else read_movielens(source)


def load_catalog(dataset: str | os.PathLike | None = None) -> Catalog:
    """The public item catalog of a dataset, without reading anybody's events (a synthetic dataset is
    generated whole: it holds no private data)."""
    if _is_review_folder(dataset):
        return read_review_catalog(dataset)
    source = resolve(dataset)
    return synthetic_movielens(**source)[1] if isinstance(source, dict) else read_catalog(source)


def load_sequences(dataset: str | os.PathLike | None = None, max_len: int = 50, min_events: int = 3,
                   cache: bool = True) -> UserSequences:
    """The dataset as `UserSequences`, from the prepared-data cache when the inputs are unchanged (review
    folders are read directly: those files are small)."""
    if not cache or _is_review_folder(dataset):
        return UserSequences.from_interactions(*load_interactions(dataset), max_len=max_len, min_events=min_events)
    return prepare(dataset, max_len=max_len, min_events=min_events)[0]


def prepare(dataset: str | os.PathLike | None = None, max_len: int = 50, min_events: int = 3,
            out: Path | None = None) -> tuple[UserSequences, Path]:
    """Build (or reuse) the processed splits in ``out`` (default: the cache) and return them with the folder."""
    source = resolve(dataset)
    inputs = _input_digests(source)
    settings = {"max_len": max_len, "min_events": min_events, "format": PREPARED_FORMAT}
    key = _digest({"inputs": inputs, "settings": settings})[:16]
    folder = Path(out) if out else cache_dir() / "prepared" / key
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
        return _load_prepared(folder, max_len), folder
    interactions, catalog = (synthetic_movielens(**source) if isinstance(source, dict)
                             else read_movielens(source))
    seq = UserSequences.from_interactions(interactions, catalog, max_len=max_len, min_events=min_events)
    manifest = {"key": key, "dataset": str(dataset or DEFAULT_DATASET), "inputs": inputs, "settings": settings,
                "users": seq.num_users, "events": seq.num_events, "skipped": seq.skipped or {}}
    _save_prepared(seq, folder, manifest)
    return seq, folder


def describe(dataset: str | os.PathLike | None = None, max_len: int = 50) -> dict:
    """Counts and distributions a user wants to see before training on a dataset."""
    interactions, catalog = load_interactions(dataset)
    seq = UserSequences.from_interactions(interactions, catalog, max_len=max_len)
    lengths = seq.lengths()
    genre_counts: dict[str, int] = {}
    for item, n in zip(*np.unique(interactions.item, return_counts=True), strict=True):
        for g in catalog.genres.get(int(item), ()) or ("(no genre)",):
            genre_counts[g] = genre_counts.get(g, 0) + int(n)
    return {
        "dataset": str(dataset or DEFAULT_DATASET),
        "users": int(len(np.unique(interactions.user))),
        "events": len(interactions),
        "known_items": len(catalog),
        "rated_items": int(len(np.unique(interactions.item))),
        "users_kept": seq.num_users,
        "item_vocab": len(seq.vocabs["item"]),
        "skipped": seq.skipped or {},
        "sequence_length_percentiles": {f"p{p}": float(np.percentile(lengths, p))
                                        for p in (0, 10, 25, 50, 75, 90, 100)},
        "genre_event_counts": dict(sorted(genre_counts.items(), key=lambda kv: -kv[1])),
        "time_range": [int(interactions.timestamp.min()), int(interactions.timestamp.max())],
    }


def _synthetic_args(spec: str) -> dict:
    aliases = {"users": "num_users", "items": "num_items", "genres": "num_genres", "events": "mean_events"}
    args: dict = {}
    for part in filter(None, spec.partition(":")[2].split(",")):
        key, sep, value = part.partition("=")
        key = aliases.get(key.strip(), key.strip())
        if not sep or key not in inspect.signature(synthetic_movielens).parameters:
            raise DataError(f"synthetic dataset spec {spec!r}: cannot read {part!r}; expected key=value with keys "
                            f"{', '.join(aliases)}, seed, drift, series, min_events, max_events")
        try:
            args[key] = float(value) if key in ("drift", "series") else int(value)
        except ValueError as err:
            raise DataError(f"synthetic dataset spec {spec!r}: {key}={value!r} is not a number") from err
    return args


def _input_digests(source: Path | dict) -> dict:
    if isinstance(source, dict):
        return {"synthetic": source}
    return {p.name: file_digest(p) for p in sorted(source.iterdir()) if p.is_file()
            and p.name in ("ratings.csv", "movies.csv", "ratings.dat", "movies.dat", "u.data", "u.item")}


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _save_prepared(seq: UserSequences, folder: Path, manifest: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        np.savez(tmp / "events.npz", user_ids=seq.user_ids, offsets=seq.offsets, raw_item=seq.raw_item,
                 timestamp=seq.timestamp, **{f"feature_{k}": v for k, v in seq.features.items()})
        meta = {"vocabs": {k: v.to_list() for k, v in seq.vocabs.items()},
                "titles": {str(k): v for k, v in seq.catalog.titles.items()},
                "genres": {str(k): list(v) for k, v in seq.catalog.genres.items()}}
        (tmp / "vocab_catalog.json").write_text(json.dumps(meta))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_prepared(folder: Path, max_len: int) -> UserSequences:
    arrays = np.load(folder / "events.npz")
    meta = json.loads((folder / "vocab_catalog.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    catalog = Catalog({int(k): v for k, v in meta["titles"].items()},
                      {int(k): tuple(v) for k, v in meta["genres"].items()})
    features = {k.removeprefix("feature_"): arrays[k] for k in arrays.files if k.startswith("feature_")}
    return UserSequences(arrays["user_ids"], arrays["offsets"], arrays["raw_item"], arrays["timestamp"], features,
                         {k: Vocab(v) for k, v in meta["vocabs"].items()}, catalog, max_len,
                         manifest.get("skipped") or None)
