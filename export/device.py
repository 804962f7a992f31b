"""The on-device path: a CSV of a user's events -> per-event user embeddings, with ExecuTorch only.

This is what an app does with an exported artifact, and it needs no model code and no torch weights: read
the events (movieId, rating, timestamp), order them by time (stable), keep the last ``max_len``, map movie
ids and ratings to feature ids with the manifest's vocabularies (unknown -> UNK), run the verified .pte and
return one embedding per event; the last event's embedding summarises the user. Only the embedding leaves
the device (the serving API receives it together with the model hash that produced it).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import executorch.kernels.quantized  # noqa: F401  registers the int8 embedding-lookup kernels with the runtime
import numpy as np
import torch
from executorch.runtime import Runtime

from fed_userllm.export.artifact import PTE_NAME, Artifact, ArtifactError, load_artifact
from fed_userllm.runtime import atomic_write_bytes, atomic_write_json, quiet_native_stderr

COLUMNS = ("movieId", "rating", "timestamp")
OUT_SUFFIXES = (".json", ".npy")
RATING_RANGE = (0.5, 5.0)


class HistoryError(ValueError):
    """The events CSV cannot be read; the message names the line and field."""


def read_history(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Movie ids and ratings of a CSV with a header naming movieId, rating, timestamp, in time order.

    Other columns (e.g. userId) are ignored; blank lines are skipped; ties in time keep file order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise HistoryError(f"{path}: no such file") from err
    except UnicodeDecodeError as err:
        raise HistoryError(f"{path}: not UTF-8 text ({err})") from err
    rows = csv.reader(io.StringIO(text))
    header = [name.strip() for name in next(rows, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise HistoryError(f"{path}: line 1: header {header} lacks {missing}; expected columns "
                           f"{list(COLUMNS)}")
    col = {c: header.index(c) for c in COLUMNS}
    movies, ratings, times = [], [], []
    for line, row in enumerate(rows, start=2):
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            raise HistoryError(f"{path}: line {line}: {len(row)} fields, expected {len(header)} "
                               f"({','.join(header)})")
        movies.append(_field(path, line, "movieId", row[col["movieId"]], int))
        rating = _field(path, line, "rating", row[col["rating"]], float)
        if not RATING_RANGE[0] <= rating <= RATING_RANGE[1]:
            raise HistoryError(f"{path}: line {line}: field 'rating' is {rating}, expected "
                               f"{RATING_RANGE[0]}..{RATING_RANGE[1]}")
        ratings.append(rating)
        times.append(_field(path, line, "timestamp", row[col["timestamp"]], int))
    if not movies:
        raise HistoryError(f"{path}: no events after the header; expected at least one row")
    order = np.argsort(np.asarray(times, dtype=np.int64), kind="stable")
    return np.asarray(movies, dtype=np.int64)[order], np.asarray(ratings, dtype=np.float64)[order]


def _field(path: Path, line: int, name: str, value: str, kind: type) -> int | float:
    try:
        parsed = kind(value.strip())
    except ValueError:
        parsed = None
    if parsed is None or (kind is float and not math.isfinite(parsed)):
        expected = "an integer" if kind is int else "a number"
        raise HistoryError(f"{path}: line {line}: field '{name}' is {value!r}, expected {expected}")
    return parsed


def featurize(manifest: dict, movie_ids: np.ndarray, ratings: np.ndarray) -> np.ndarray:
    """Feature ids [n, F] (the manifest's feature order) from movie ids and star ratings; unknown -> UNK."""
    vocabs, unk = manifest["vocabularies"], manifest["reserved_ids"]["UNK"]

    def lookup(values: list, first_id: int, keys) -> np.ndarray:
        index = {v: first_id + i for i, v in enumerate(values)}
        return np.fromiter((index.get(k, unk) for k in keys), dtype=np.int64, count=len(keys))

    columns = []
    for feature in manifest["features"]:
        vocab = vocabs[feature]
        if feature == "item":
            columns.append(lookup(vocab["values"], vocab["first_id"], movie_ids.tolist()))
        elif feature == "genre":
            by_movie = dict(zip(vocab["by_movie"]["movie_ids"], vocab["by_movie"]["ids"], strict=True))
            columns.append(np.fromiter((by_movie.get(m, unk) for m in movie_ids.tolist()), dtype=np.int64,
                                       count=len(movie_ids)))
        elif feature == "rating":
            lo, hi = min(vocab["values"]), max(vocab["values"])
            buckets = np.clip(np.ceil(np.asarray(ratings) - 1e-9), lo, hi).astype(np.int64)
            columns.append(lookup(vocab["values"], vocab["first_id"], buckets.tolist()))
        else:
            raise ArtifactError(f"manifest feature {feature!r}: the device derives only item, genre, rating")
    return np.stack(columns, axis=1)


class PteEncoder:
    """The verified .pte in the ExecuTorch runtime: feature ids [n, F] -> per-event embeddings [n, d]."""

    def __init__(self, artifact: Artifact):
        sequence = artifact.manifest["sequence"]
        self.min_len, self.max_len = sequence["min_len"], sequence["max_len"]
        self.pad_id, self.num_features = sequence["pad_id"], len(artifact.manifest["features"])
        try:
            with quiet_native_stderr():
                self.program = Runtime.get().load_program(artifact.program)
                self.method = self.program.load_method("forward")
        except (RuntimeError, ValueError) as err:
            raise ArtifactError(f"{artifact.directory / PTE_NAME}: the ExecuTorch runtime cannot load it "
                                f"({err})") from err

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        if ids.ndim != 2 or ids.shape[1] != self.num_features or not 1 <= n <= self.max_len:
            raise ValueError(f"ids of shape {ids.shape}: expected [n, {self.num_features}] with 1 <= n <= "
                             f"{self.max_len}")
        padded = np.full((max(n, self.min_len), self.num_features), self.pad_id, dtype=np.int64)
        padded[:n] = ids  # right padding: the causal encoder's real events never see it
        with quiet_native_stderr():
            out = self.method.execute([torch.from_numpy(padded[None])])[0]
        return out[0, :n].numpy()


def embed(artifact_dir: str | Path, history_csv: str | Path, out: str | Path | None = None) -> dict:
    """User embeddings of one events CSV: ``embeddings`` [n, d] (oldest first), ``last`` [d], their shape and
    dtype, ``encoder_hash`` (sha256 of the source encoder weights, what the server checks), ``pte_sha256``,
    and event counts. ``out`` (.json or .npy) also writes them for the serving API (`write_embedding`).
    """
    if out is not None and Path(out).suffix not in OUT_SUFFIXES:
        raise ValueError(f"out={str(out)!r}: expected a file name ending in {' or '.join(OUT_SUFFIXES)}")
    artifact = load_artifact(artifact_dir)
    encoder = PteEncoder(artifact)
    movie_ids, ratings = read_history(history_csv)
    kept = slice(max(0, len(movie_ids) - encoder.max_len), None)
    manifest = artifact.manifest
    ids = featurize(manifest, movie_ids[kept], ratings[kept])
    unknown = ids[:, manifest["features"].index("item")] == manifest["reserved_ids"]["UNK"]
    embeddings = encoder(ids)
    result = {
        "embeddings": embeddings,
        "last": embeddings[-1],
        "shape": list(embeddings.shape),
        "dtype": str(embeddings.dtype),
        "encoder_hash": manifest["source"]["model_sha256"],
        "pte_sha256": artifact.model_sha256,
        "events_in_file": len(movie_ids),
        "events_used": len(ids),
        "unknown_items": int(unknown.sum()),
    }
    if out is not None:
        write_embedding(result, out)
    return result


def write_embedding(result: dict, out: str | Path) -> None:
    """``.json``: the serving API's user object (embeddings, shape, dtype, encoder_hash), to send as is.

    ``.npy``: the [n, d] float32 array, with shape, dtype and the hashes in ``<out>.json`` beside it.
    """
    out = Path(out)
    if out.suffix == ".json":
        atomic_write_json(out, {"embeddings": result["embeddings"].tolist(), "shape": result["shape"],
                                "dtype": result["dtype"], "encoder_hash": result["encoder_hash"]})
    elif out.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, result["embeddings"])
        atomic_write_bytes(out, buffer.getvalue())
        meta = {k: result[k] for k in ("shape", "dtype", "encoder_hash", "pte_sha256")}
        atomic_write_json(out.with_name(out.name + ".json"), {**meta, "embeddings_file": out.name})
    else:
        raise ValueError(f"out={str(out)!r}: expected a file name ending in {' or '.join(OUT_SUFFIXES)}")

