"""Data layer: every MovieLens format, the split protocol, partitions, synthetic data, bad input."""

import http.server
import shutil
import socket
import threading
import warnings
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from fed_userllm.cli import main
from fed_userllm.data import (
    PAD_ID,
    UNK_ID,
    Catalog,
    DataError,
    Interactions,
    Partitioner,
    UserSequences,
    describe,
    load_sequences,
    prepare,
    read_movielens,
    synthetic_movielens,
)
from fed_userllm.data.download import Variant, fetch, file_digest

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = ["ml-csv", "ml-dat", "ml-100k"]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_embedded_dataset_counts(capsys):
    assert main(["data", "describe"]) == 0
    out = capsys.readouterr().out
    assert "users          610\n" in out
    assert "events         100,836\n" in out
    assert "known items    9,742" in out
    info = describe()
    assert (info["users"], info["events"], info["known_items"]) == (610, 100836, 9742)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_parses_to_the_same_representation(fmt):
    reference, ref_catalog = read_movielens(FIXTURES / "ml-csv")
    interactions, catalog = read_movielens(FIXTURES / fmt)
    for field in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(interactions, field), getattr(reference, field))
    assert catalog.titles == ref_catalog.titles
    assert catalog.titles[3] == "Amélie (2001)"  # utf-8 csv, latin-1 .dat and u.item all decode
    # ml-100k has no "no genres" label of its own: its "unknown" flag maps to no genres, like the others
    assert catalog.genres == ref_catalog.genres
    assert catalog.genres[2] == ("Action", "Crime", "Thriller") and catalog.genres[7] == ()


def test_stable_sort_keeps_file_order_for_ties_and_split_is_last_two():
    with pytest.warns(UserWarning, match="skipped 1 users"):
        seq = UserSequences.from_interactions(*read_movielens(FIXTURES / "ml-csv"), max_len=3)
    raw = {int(u): seq.raw_item[seq.offsets[i]:seq.offsets[i + 1]].tolist() for i, u in enumerate(seq.user_ids)}
    assert raw[1] == [3, 2, 1, 5]  # sorted by timestamp
    assert raw[2] == [2, 1, 5, 7]  # 2 and 1 share a second: file order kept
    assert 4 not in raw  # two events only: skipped
    users = np.arange(seq.num_users)
    test, val = seq.target_index(users, "test"), seq.target_index(users, "val")
    np.testing.assert_array_equal(seq.raw_item[test], [5, 7, 2])
    np.testing.assert_array_equal(seq.raw_item[val], [1, 5, 1])


def test_min_events_skips_short_users_with_a_count():
    with pytest.warns(UserWarning, match="skipped 1 users"):
        seq = UserSequences.from_interactions(*read_movielens(FIXTURES / "ml-csv"))
    assert seq.num_users == 3 and 4 not in seq.user_ids.tolist()
    assert seq.skipped == {"users with < 3 events": 1}


def test_no_test_or_validation_event_leaks_into_training():
    seq = load_sequences(max_len=20)
    windows = seq.windows()
    covered = np.zeros(seq.num_events, dtype=int)
    for start, end in windows:
        covered[start:end] += 1
    users = np.arange(seq.num_users)
    assert covered[seq.target_index(users, "test")].sum() == 0
    assert covered[seq.target_index(users, "val")].sum() == 0
    lengths = windows[:, 1] - windows[:, 0]
    assert lengths.min() >= 2 and lengths.max() == seq.max_len + 1
    # every training transition (event t -> t+1 inside a user's training range) is predicted exactly once
    targets = np.zeros(seq.num_events, dtype=int)
    for start, end in windows:
        targets[start + 1:end] += 1
    starts, ends = seq.train_ranges()
    expected = np.zeros(seq.num_events, dtype=int)
    for s, e in zip(starts, ends, strict=True):
        expected[s + 1:e] = 1
    np.testing.assert_array_equal(targets, expected)


def test_vocabularies_come_from_the_public_catalog_not_from_ratings():
    interactions, catalog = read_movielens(FIXTURES / "ml-csv")
    with pytest.warns(UserWarning, match="skipped 1 users"):
        seq = UserSequences.from_interactions(interactions, catalog, min_events=3)
    # every catalog movie has an id, including 5 and 7, which only ever appear as validation / test targets
    assert seq.vocabs["item"].tokens == [1, 2, 3, 5, 7]
    assert seq.vocabs["genre"].tokens == ["Action", "Animation", "Comedy", "Crime", "Mystery", "Romance", "Thriller"]
    users = np.arange(seq.num_users)
    assert UNK_ID not in seq.features["item"][seq.target_index(users, "test")].tolist()
    # shuffled, thinned or re-rated events leave the vocabularies (hence every model config) unchanged
    rng = np.random.default_rng(0)
    for keep in (rng.permutation(len(interactions)), np.flatnonzero(interactions.user != 2)):
        other = Interactions(interactions.user[keep], interactions.item[keep], 5.0 - interactions.rating[keep] / 2,
                             interactions.timestamp[keep])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = UserSequences.from_interactions(other, catalog)
        assert {k: v.tokens for k, v in again.vocabs.items()} == {k: v.tokens for k, v in seq.vocabs.items()}
        assert again.vocab_sizes == seq.vocab_sizes


def test_events_of_items_missing_from_the_catalog_are_counted_as_unknown():
    interactions, catalog = read_movielens(FIXTURES / "ml-csv")
    small = Catalog({k: v for k, v in catalog.titles.items() if k != 7}, {k: v for k, v in catalog.genres.items()
                                                                       if k != 7})
    with pytest.warns(UserWarning, match="1 events name items missing from the catalog"):
        seq = UserSequences.from_interactions(interactions, small)
    assert seq.skipped["events of items missing from the catalog (kept as UNK)"] == 1
    assert seq.features["item"][seq.raw_item == 7].tolist() == [UNK_ID]


def test_batches_are_right_padded_and_truncate_to_recent_events():
    seq = load_sequences(max_len=50)
    batch = seq.training_batch(seq.windows()[:64])
    assert batch["item"].shape == (64, 51)
    mask = batch["mask"]
    assert mask[:, 0].all() and (mask.sum(1) >= 2).all()
    assert (batch["item"][~mask] == PAD_ID).all() and (batch["item"][mask] != PAD_ID).all()
    assert not (mask[:, 1:] & ~mask[:, :-1]).any()  # no real event after a pad
    ev = seq.eval_batch(np.arange(5), "test")
    target = seq.target_index(np.arange(5), "test")
    for row, t in enumerate(target):
        n = int(ev["mask"][row].sum())
        np.testing.assert_array_equal(ev["item"][row, :n].numpy(), seq.features["item"][t - n:t])
        assert ev["target_item"][row] == seq.features["item"][t]


@pytest.mark.filterwarnings("ignore:skipped 1 users")
def test_splits_are_deterministic_and_prepare_caches_with_a_manifest(tmp_path):
    a, folder = prepare(max_len=30)
    b, folder_again = prepare(max_len=30)
    assert folder == folder_again and (folder / "manifest.json").is_file()
    for name in a.features:
        np.testing.assert_array_equal(a.features[name], b.features[name])
    np.testing.assert_array_equal(a.windows(), b.windows())
    assert a.vocabs["item"].tokens == b.vocabs["item"].tokens
    fresh = load_sequences(max_len=30, cache=False)
    np.testing.assert_array_equal(fresh.features["item"], a.features["item"])
    _, other = prepare(max_len=40)
    assert other != folder  # settings are part of the cache key
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURES / "ml-csv", copy)
    _, before = prepare(copy)
    with open(copy / "ratings.csv", "ab") as f:
        f.write(b"1,2,1.0,964990000\r\n")
    _, after = prepare(copy)
    assert before != after  # inputs are hashed


def test_partitions_are_lazy_disjoint_and_deterministic():
    p = Partitioner(100_000)
    assert p.num_clients == 100_000 and p.users(99_999).tolist() == [99_999]
    assert "_order" not in p.__dict__  # one user per client never builds the permutation
    g = Partitioner(10, users_per_client=3, seed=1)
    groups = [g.users(c).tolist() for c in range(g.num_clients)]
    assert g.num_clients == 4 and sorted(sum(groups, [])) == list(range(10))
    assert groups == [Partitioner(10, 3, seed=1).users(c).tolist() for c in range(4)]
    with pytest.raises(IndexError, match="client_id=4"):
        g.users(4)


def test_synthetic_data_has_the_schema_and_learnable_structure():
    interactions, catalog = synthetic_movielens(num_users=300, num_items=400, num_genres=8, seed=3)
    again, _ = synthetic_movielens(num_users=300, num_items=400, num_genres=8, seed=3)
    np.testing.assert_array_equal(interactions.item, again.item)
    seq = UserSequences.from_interactions(interactions, catalog)
    assert seq.num_users == 300 and set(np.unique(interactions.rating)) <= {1, 2, 3, 4, 5}
    genre = seq.features["genre"]
    same_user = np.ones(seq.num_events - 1, dtype=bool)
    same_user[seq.offsets[1:-1] - 1] = False
    repeat = (genre[1:] == genre[:-1])[same_user].mean()
    assert repeat > 0.5  # genre preference persists, far above chance (1/8)


def test_synthetic_spec_and_population_scale():
    seq = load_sequences("synthetic:users=2000,items=500,seed=1", cache=False)
    assert seq.num_users == 2000
    with pytest.raises(DataError, match="'colour=3'"):
        load_sequences("synthetic:colour=3")
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_sequences("nope")


# --- bad input -------------------------------------------------------------------------------------------

def _dataset(tmp_path, ratings: str, movies: str = "movieId,title,genres\n1,A (1990),Drama\n") -> Path:
    (tmp_path / "ratings.csv").write_text(ratings)
    (tmp_path / "movies.csv").write_text(movies)
    return tmp_path


@pytest.mark.parametrize("ratings, message", [
    ("userId,movieId,rating,timestamp\n1,1,4.0,10\n1,1,x,11\n", r"ratings.csv: line 3: field 'rating' is 'x', "
                                                                  "expected a number"),
    ("userId,movieId,rating,timestamp\n1,1,4.0,10\n1,1,4.0,11,9\n", r"ratings.csv: malformed row"),
    ("userId,movieId,rating,timestamp\n1,1,4.0\n", r"ratings.csv: line 2: missing value for field 'timestamp'"),
    ("user,movie,rating,timestamp\n1,1,4.0,10\n", r"ratings.csv: line 1: unexpected columns"),
    ("userId,movieId,rating,timestamp,extra\n1,1,4.0,10,0\n", r"ratings.csv: line 1: unexpected columns"),
    ("userId,movieId,rating,timestamp\n1,1,9.0,10\n", r"ratings.csv: line 2: rating 9.0 is outside 0.5..5"),
    ("userId,movieId,rating,timestamp\n1,1.5,4.0,10\n", r"line 2: field 'movieId' is '1.5', expected an integer"),
    ("", r"ratings.csv: file is empty"),
])
def test_bad_rating_files_name_file_line_and_problem(tmp_path, ratings, message):
    with pytest.raises(DataError, match=message):
        read_movielens(_dataset(tmp_path, ratings))


def test_bad_movie_files_and_missing_files(tmp_path):
    good = "userId,movieId,rating,timestamp\n1,1,4.0,10\n"
    with pytest.raises(DataError, match=r"movies.csv: line 3: movie id 1 listed twice"):
        read_movielens(_dataset(tmp_path, good, "movieId,title,genres\n1,A,Drama\n1,B,Drama\n"))
    (tmp_path / "movies.csv").unlink()
    with pytest.raises(DataError, match="found ratings.csv but movies.csv is missing"):
        read_movielens(tmp_path)
    with pytest.raises(DataError, match="no MovieLens files found"):
        read_movielens(tmp_path / "..")
    bad_item = tmp_path / "k"
    shutil.copytree(FIXTURES / "ml-100k", bad_item)
    text = (bad_item / "u.item").read_bytes().replace(b"|0|0|0|1|", b"|0|0|7|1|", 1)
    (bad_item / "u.item").write_bytes(text)
    with pytest.raises(DataError, match=r"u.item: line 1: genre flag 'Adventure' is '7', expected 0 or 1"):
        read_movielens(bad_item)


def test_duplicate_events_are_skipped_and_counted(tmp_path):
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,1,4.0,10\n1,1,3.0,12\n"
    with pytest.warns(UserWarning, match="skipped 1 duplicate events .* first at line 3"):
        interactions, _ = read_movielens(_dataset(tmp_path, ratings))
    assert len(interactions) == 2 and interactions.skipped == {"duplicate events": 1}


def test_cli_reports_data_errors_cleanly(tmp_path, capsys):
    assert main(["data", "describe", "--dataset", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


# --- download -----------------------------------------------------------------------------------------

@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "ml-tiny.zip", "w") as zf:
        for f in (FIXTURES / "ml-csv").iterdir():
            zf.write(f, f"ml-tiny/{f.name}")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_extracts_atomically(http_root, tmp_path):
    root, url = http_root
    digest = file_digest(root / "ml-tiny.zip")
    variant = Variant("ml-tiny", f"{url}/ml-tiny.zip", "ml-tiny", sha256=digest)
    folder = fetch(variant, tmp_path / "c")
    interactions, _ = read_movielens(folder)
    assert len(interactions) == 13
    assert fetch(variant, tmp_path / "c") == folder  # cached
    bad = Variant("ml-bad", f"{url}/ml-tiny.zip", "ml-tiny", sha256="0" * 64)
    with pytest.raises(DataError, match="sha256 .* does not match the published 0000"):
        fetch(bad, tmp_path / "c")
    assert not list((tmp_path / "c" / "downloads").glob("ml-bad*"))  # nothing half-written is left


def test_download_resumes_a_partial_file(http_root, tmp_path):
    root, url = http_root
    data = (root / "ml-tiny.zip").read_bytes()
    downloads = tmp_path / "c" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "ml-tiny.zip.part").write_bytes(data[:100])
    variant = Variant("ml-tiny", f"{url}/ml-tiny.zip", "ml-tiny", sha256=file_digest(root / "ml-tiny.zip"))
    assert (fetch(variant, tmp_path / "c") / "ratings.csv").is_file()


def test_download_without_network_says_how_to_use_local_files(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    variant = Variant("ml-1m", f"http://127.0.0.1:{port}/ml-1m.zip", "ml-1m")
    with pytest.raises(DataError, match=r"could not download ml-1m .* --dataset /path/to/ml-1m"):
        fetch(variant, tmp_path)
