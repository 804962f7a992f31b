"""Review readers: Amazon (2014 and 2018 releases) and Google Local, normalised like MovieLens; bad lines."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fed_userllm.data import DataError, describe, load_sequences
from fed_userllm.data.reviews import (
    detect_reviews,
    event_texts,
    read_amazon,
    read_google_local,
    read_reviews,
    review_sequences,
)

FIXTURES = Path(__file__).parent / "fixtures"
AMAZON, GOOGLE = FIXTURES / "amazon", FIXTURES / "google_local"


def test_amazon_2018_gzip_fixture():
    with pytest.warns(UserWarning, match="skipped 1 duplicate reviews"):
        data = read_reviews(AMAZON)
    i = data.interactions
    assert data.user_keys == ["A1XYZ", "A2ABC", "A3DEF"]
    assert data.item_keys[:3] == ["B00AAA0001", "B00AAA0002", "B00AAA0003"] and len(data.item_keys) == 7
    # 17 lines: one review of an item without a title and one exact repeat are dropped
    assert len(i) == 15
    assert i.skipped == {"reviews of items without a title": 1, "repeated metadata entries": 1,
                         "duplicate reviews": 1}
    assert i.user[:3].tolist() == [1, 1, 2] and i.item[:3].tolist() == [1, 2, 3]
    assert i.rating[:3].tolist() == [5.0, 4.0, 5.0] and i.timestamp[0] == 1420070400
    assert data.catalog.titles[1] == "The Shawshank Redemption" and 6 not in data.catalog.titles
    # the department ("Movies & TV") names the whole dataset: the leaf category is the genre
    assert data.catalog.genres[1] == ("Drama",) and data.catalog.genres[3] == ("Movies",)
    assert data.catalog.genres[5] == ()
    assert data.summary[0] == "Hope is a good thing" and data.text[0].startswith("A moving story")
    assert data.text[3] == "" and data.summary[5] == ""  # missing reviewText / summary


def test_amazon_2014_python_literal_metadata():
    folder = AMAZON / "2014"
    data = read_amazon(folder / "reviews_Movies_and_TV_5.json", folder / "meta_Movies_and_TV.json")
    assert data.catalog.titles == {1: "The Matrix", 2: "Heat", 3: "Toy Story"}
    action = "Action & Adventure"
    assert data.catalog.genres == {1: ("Science Fiction", action), 2: (action,), 3: ()}
    assert data.interactions.item.tolist() == [1, 2, 3]
    assert data.summary.tolist() == ["Whoa", "Tense", "Toys!"]


def test_google_local_fixture_times_in_ms():
    with pytest.warns(UserWarning, match="1 reviews of items without a title"):
        data = read_google_local(GOOGLE / "review-Vermont.json", GOOGLE / "meta-Vermont.json.gz")
    i = data.interactions
    assert len(i) == 8 and i.timestamp[0] == 1629520000  # milliseconds -> seconds
    assert data.catalog.titles[1] == "Burlington Pizza"
    assert data.catalog.genres[1] == ("Pizza restaurant", "Italian restaurant")
    assert data.catalog.genres[3] == ()
    assert data.text[3] == "" and set(data.summary.tolist()) == {""}  # null text; Google has no summaries
    assert detect_reviews(GOOGLE)[0] == "google_local" and detect_reviews(AMAZON)[0] == "amazon"


def test_sequences_and_aligned_review_text():
    with pytest.warns(UserWarning):
        data = read_reviews(AMAZON)
    seq = review_sequences(data, max_len=4)
    assert seq.num_users == 3 and seq.num_events == 15
    texts = event_texts(seq, data, "text")
    summaries = event_texts(seq, data, "summary")
    i = data.interactions
    for e in range(seq.num_events):  # every event carries the text of its own (user, item, time) review
        user = seq.user_ids[np.searchsorted(seq.offsets, e, side="right") - 1]
        same = (i.user == user) & (i.item == seq.raw_item[e]) & (i.timestamp == seq.timestamp[e])
        row = np.flatnonzero(same)
        assert len(row) == 1 and texts[e] == data.text[row[0]] and summaries[e] == data.summary[row[0]]
    assert seq.titles(0, 2) == ["The Shawshank Redemption", "Groundhog Day"]  # user A1XYZ, in time order
    with pytest.raises(ValueError, match="field='stars'"):
        event_texts(seq, data, "stars")
    with pytest.warns(UserWarning):
        other = read_google_local(GOOGLE / "review-Vermont.json", GOOGLE / "meta-Vermont.json.gz")
    with pytest.raises(ValueError, match="same ReviewData"):
        event_texts(seq, other)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines))
    return path


GOOD = json.dumps({"reviewerID": "A", "asin": "X", "overall": 4.0, "unixReviewTime": 1, "reviewText": "ok"})
META = json.dumps({"asin": "X", "title": "Thing", "category": ["Dept", "Leaf"]})


@pytest.mark.parametrize("bad,message", [
    ("{not json", r"reviews.json:2: not a JSON object"),
    ("[1, 2]", r"reviews.json:2: expected a JSON object, found list"),
    (json.dumps({"asin": "X", "overall": 4.0, "unixReviewTime": 1}),
     r"reviews.json:2: missing field 'reviewerID'"),
    (json.dumps({"reviewerID": "A", "asin": "X", "overall": 7, "unixReviewTime": 1}),
     r"reviews.json:2: field 'overall' is 7, expected 1..5"),
    (json.dumps({"reviewerID": "A", "asin": "X", "overall": 4.0, "unixReviewTime": "2015"}),
     r"reviews.json:2: field 'unixReviewTime' is '2015', expected int"),
])
def test_bad_review_lines_name_file_and_line(tmp_path, bad, message):
    meta = write(tmp_path / "meta_Test.json", [META])
    reviews = write(tmp_path / "reviews.json", [GOOD, bad])
    with pytest.raises(DataError, match=message):
        read_amazon(reviews, meta)


def test_bad_metadata_and_folders(tmp_path):
    reviews = write(tmp_path / "reviews.json", [GOOD])
    with pytest.raises(DataError, match=r"meta_Bad.json:1: missing field 'asin'"):
        read_amazon(reviews, write(tmp_path / "meta_Bad.json", [json.dumps({"title": "No id"})]))
    gz = tmp_path / "meta_Gz.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write(META + "\n" + json.dumps({"asin": "Y", "title": "T", "categories": "Dept"}) + "\n")
    with pytest.raises(DataError, match=r"meta_Gz.json.gz:2: field 'categories' is 'Dept', expected list"):
        read_amazon(reviews, gz)
    with pytest.raises(DataError, match="missing.json: file not found"):
        read_amazon(tmp_path / "missing.json", write(tmp_path / "meta_Ok.json", [META]))
    with pytest.raises(DataError, match="no reviews of items with a title"):
        unknown_item = write(tmp_path / "r2.json", [GOOD.replace('"X"', '"Z"')])
        read_amazon(unknown_item, write(tmp_path / "m2.json", [META]))
    assert detect_reviews(FIXTURES / "ml-csv") is None
    with pytest.raises(DataError, match="no review dataset found"):
        read_reviews(FIXTURES / "ml-csv")
    folder = tmp_path / "two"
    shutil.copytree(AMAZON, folder, ignore=shutil.ignore_patterns("2014"))
    shutil.copy(AMAZON / "Movies_and_TV.json.gz", folder / "Books.json.gz")
    with pytest.raises(DataError, match="expected one meta_"):
        read_reviews(folder)


def test_load_sequences_reads_a_review_folder_like_any_dataset():
    """What `fed-userllm pretrain --dataset FOLDER`, `data describe` and the Flower app load: the review readers'
    sequences."""
    expected = review_sequences(read_google_local(*detect_reviews(GOOGLE)[1:]), max_len=4)
    seq = load_sequences(str(GOOGLE), max_len=4)
    assert seq.num_users == expected.num_users and seq.vocab_sizes == expected.vocab_sizes
    for f in ("item", "rating"):
        np.testing.assert_array_equal(seq.features[f], expected.features[f])
    np.testing.assert_array_equal(seq.offsets, expected.offsets)
    assert describe(str(GOOGLE), max_len=4)["users"] == expected.num_users
