"""Readers for every MovieLens release, all normalised to one `Interactions` + `Catalog` pair.

Formats (detected from the files present in a directory):
- ``csv``: ml-20m, ml-25m, ml-32m, ml-latest, ml-latest-small (``ratings.csv``, ``movies.csv``).
- ``dat``: ml-1m, ml-10m (``ratings.dat``, ``movies.dat``, ``::``-separated).
- ``100k``: ml-100k (``u.data`` tab-separated, ``u.item`` pipe-separated with 19 genre flags, latin-1).

Rows keep the order of the source file: the sequence builder's stable sort relies on it to order
several ratings given in the same second.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# ml-100k's u.item genre flag columns, in file order (its u.genre file lists the same names).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRE_LABELS = {"(no genres listed)", "unknown"}
RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
MOVIE_COLUMNS = ("movieId", "title", "genres")


class DataError(ValueError):
    """Bad input data; the message names the file, line and problem."""


@dataclass
class Interactions:
    """All rating events of a dataset in source-file order (one entry per event)."""

    user: np.ndarray  # int64 raw user ids
    item: np.ndarray  # int64 raw movie ids
    rating: np.ndarray  # float32 star ratings (0.5..5)
    timestamp: np.ndarray  # int64 seconds since epoch
    skipped: dict[str, int] = field(default_factory=dict)  # counted, warned-about rows that were dropped

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Catalog:
    """Item metadata: title text and genre names per raw movie id."""

    titles: dict[int, str]
    genres: dict[int, tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.titles)

    def title(self, item: int) -> str:
        return self.titles.get(int(item), f"movie {int(item)}")

    @property
    def items(self) -> np.ndarray:
        """Every item id the catalog knows (with a title, genres or both), sorted."""
        return np.array(sorted(self.titles.keys() | self.genres.keys()), dtype=np.int64)


def detect_format(directory: Path) -> str:
    """Return ``csv``, ``dat`` or ``100k`` from the files present, or raise a DataError saying what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory; expected a MovieLens folder (ratings.csv + movies.csv, "
                        "ratings.dat + movies.dat, or u.data + u.item)")
    for fmt, names in (("csv", ("ratings.csv", "movies.csv")), ("dat", ("ratings.dat", "movies.dat")),
                       ("100k", ("u.data", "u.item"))):
        present = [(directory / n).is_file() for n in names]
        if all(present):
            return fmt
        if any(present):
            missing = [n for n, p in zip(names, present, strict=True) if not p]
            raise DataError(f"{directory}: found {', '.join(n for n, p in zip(names, present, strict=True) if p)} "
                            f"but {', '.join(missing)} is missing")
    raise DataError(f"{directory}: no MovieLens files found; expected ratings.csv + movies.csv, "
                    "ratings.dat + movies.dat, or u.data + u.item")


def read_movielens(directory: str | Path) -> tuple[Interactions, Catalog]:
    """Read any MovieLens release from a local directory."""
    directory = Path(directory)
    fmt = detect_format(directory)
    if fmt == "csv":
        return _read_ratings(directory / "ratings.csv", sep=",", header=True), read_catalog(directory)
    if fmt == "dat":
        return _read_ratings(directory / "ratings.dat", sep="::", header=False), read_catalog(directory)
    return _read_ratings(directory / "u.data", sep="\t", header=False), read_catalog(directory)


def read_catalog(directory: str | Path) -> Catalog:
    """Only the public movie catalog of a MovieLens release (titles and genres), not its ratings."""
    directory = Path(directory)
    fmt = detect_format(directory)
    if fmt == "csv":
        return _read_movies_csv(directory / "movies.csv")
    if fmt == "dat":
        return _read_movies_dat(directory / "movies.dat")
    return _read_u_item(directory / "u.item")


def _read_text(path: Path, encodings: tuple[str, ...] = ("utf-8",)) -> str:
    raw = path.read_bytes()
    for enc in encodings:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError as err:
            last = err
    raise DataError(f"{path}: cannot decode as {' or '.join(encodings)} ({last})")


def _parse_table(path: Path, text: str, sep: str, columns: tuple[str, ...], header: bool,
                 quoting: int = csv.QUOTE_MINIMAL, optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """Parse delimited text into string columns; malformed rows raise a DataError naming the line."""
    if sep == "::":  # no title contains a tab, so this keeps pandas' fast C parser
        text = text.replace("::", "\t")
        sep = "\t"
    first_line = 2 if header else 1
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, header=0 if header else None, dtype=str,
                         keep_default_na=False, quoting=quoting, engine="c")
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed row ({err})") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: file is empty") from err
    if header:
        found = tuple(str(c).strip() for c in df.columns)
        if found != columns:
            raise DataError(f"{path}: line 1: unexpected columns {list(found)}; expected {list(columns)}")
        df.columns = list(found)
    elif df.shape[1] != len(columns):
        raise DataError(f"{path}: line 1: expected {len(columns)} fields ({', '.join(columns)}), "
                        f"found {df.shape[1]}")
    else:
        df.columns = list(columns)
    df = df[list(columns)]
    required = [c for c in columns if c not in optional]
    empty = (df[required].isna() | (df[required] == "")).to_numpy()
    if empty.any():
        row, col = np.argwhere(empty)[0]
        raise DataError(f"{path}: line {row + first_line}: missing value for field '{required[col]}'")
    df.attrs["first_line"] = first_line
    return df


def _numeric(path: Path, df: pd.DataFrame, column: str, kind: type) -> np.ndarray:
    values = pd.to_numeric(df[column].str.strip(), errors="coerce")
    bad = values.isna().to_numpy()
    if kind is int and not bad.any():
        bad = (values != np.floor(values)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        expected = "an integer" if kind is int else "a number"
        raise DataError(f"{path}: line {row + df.attrs['first_line']}: field '{column}' is "
                        f"{df[column].iloc[row]!r}, expected {expected}")
    return values.to_numpy(dtype=np.int64 if kind is int else np.float32)


def _read_ratings(path: Path, sep: str, header: bool) -> Interactions:
    df = _parse_table(path, _read_text(path, ("utf-8", "latin-1")), sep, RATING_COLUMNS, header)
    user, item = _numeric(path, df, "userId", int), _numeric(path, df, "movieId", int)
    rating, timestamp = _numeric(path, df, "rating", float), _numeric(path, df, "timestamp", int)
    out_of_range = (rating < 0.5) | (rating > 5.0)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise DataError(f"{path}: line {row + df.attrs['first_line']}: rating {rating[row]} is outside 0.5..5")
    # Exact repeats of (user, item, timestamp) are export duplicates: keep the first, count the rest.
    dup = pd.DataFrame({"u": user, "i": item, "t": timestamp}).duplicated(keep="first").to_numpy()
    skipped = {}
    if dup.any():
        skipped["duplicate events"] = int(dup.sum())
        warnings.warn(f"{path}: skipped {int(dup.sum())} duplicate events (same user, movie and timestamp; "
                      f"first at line {int(np.flatnonzero(dup)[0]) + df.attrs['first_line']})", stacklevel=3)
        keep = ~dup
        user, item, rating, timestamp = user[keep], item[keep], rating[keep], timestamp[keep]
    return Interactions(user, item, rating, timestamp, skipped)


def _split_genres(value: str) -> tuple[str, ...]:
    return tuple(g for g in value.strip().split("|") if g and g not in NO_GENRE_LABELS)


def _catalog(path: Path, df: pd.DataFrame, genres: list[tuple[str, ...]]) -> Catalog:
    ids = _numeric(path, df, "movieId", int)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DataError(f"{path}: line {row + df.attrs['first_line']}: movie id {ids[row]} listed twice")
    titles = [t.strip() for t in df["title"]]
    return Catalog(dict(zip(ids.tolist(), titles, strict=True)), dict(zip(ids.tolist(), genres, strict=True)))


def _read_movies_csv(path: Path) -> Catalog:
    df = _parse_table(path, _read_text(path, ("utf-8", "latin-1")), ",", MOVIE_COLUMNS, header=True)
    return _catalog(path, df, [_split_genres(g) for g in df["genres"]])


def _read_movies_dat(path: Path) -> Catalog:
    df = _parse_table(path, _read_text(path, ("utf-8", "latin-1")), "::", MOVIE_COLUMNS, header=False,
                      quoting=csv.QUOTE_NONE)
    return _catalog(path, df, [_split_genres(g) for g in df["genres"]])


def _read_u_item(path: Path) -> Catalog:
    """ml-100k's u.item: id|title|release date|video release date|IMDb URL|19 genre flags (latin-1)."""
    names = ("movieId", "title", "release", "video_release", "url", *ML100K_GENRES)
    df = _parse_table(path, _read_text(path, ("latin-1",)), "|", names, header=False, quoting=csv.QUOTE_NONE,
                      optional=("release", "video_release", "url"))
    flags = df[list(ML100K_GENRES)]
    bad = ~flags.isin(["0", "1"]).to_numpy()
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{path}: line {row + 1}: genre flag '{ML100K_GENRES[col]}' is {flags.iat[row, col]!r}, "
                        "expected 0 or 1")
    on = flags.to_numpy() == "1"
    genres = [tuple(g for g, f in zip(ML100K_GENRES, row, strict=True) if f and g not in NO_GENRE_LABELS)
              for row in on]
    return _catalog(path, df, genres)
