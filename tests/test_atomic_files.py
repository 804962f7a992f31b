"""The split as RecBole atomic files (benchmarks/peers.py): same order, same targets, same candidates, and the
project's metrics equal the top-k-list definition RecBole computes. RecBole itself is not needed here."""

import math

import numpy as np
import pytest
import torch

from fed_userllm.data.atomic_files import INTER_HEADER, ITEM_HEADER, write_atomic_files
from fed_userllm.data.movielens import Catalog, Interactions
from fed_userllm.data.sequences import UserSequences
from fed_userllm.data.vocab import NUM_RESERVED
from fed_userllm.eval.ranking import KS, finalize, ranking_sums, target_ranks

T0 = 1_500_000_000  # float32 cannot tell T0 from T0 + 1


def sequences() -> UserSequences:
    # user 7: items 30, 10, 20 share a second (file order must be kept), then 40 and 50 one second apart
    # but listed in reverse file order; user 8: five events at distinct times, one item (60) never rated.
    rows = [(7, 30, T0), (7, 10, T0), (7, 20, T0), (7, 50, T0 + 6), (7, 40, T0 + 5),
            (8, 20, 100), (8, 40, 50), (8, 10, 300), (8, 30, 200), (8, 50, 400)]
    user, item, ts = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    items = (10, 20, 30, 40, 50, 60)
    catalog = Catalog({i: f"Movie {i} (1999)" for i in items}, {i: ("Drama",) for i in items})
    return UserSequences.from_interactions(Interactions(user, item, np.full(len(rows), 4.0, np.float32), ts),
                                           catalog, max_len=3)


def read_inter(path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    return lines[0], np.array([[float(v) for v in line.split("\t")] for line in lines[1:]])


def test_the_order_survives_float32_timestamps_and_ties(tmp_path):
    seq = sequences()
    assert np.float32(T0 + 5) == np.float32(T0 + 6)  # raw seconds would tie in RecBole's float32 column
    header, rows = read_inter(write_atomic_files(seq, tmp_path, "tiny") / "tiny.inter")
    assert header == INTER_HEADER
    rank = rows[:, 2].astype(np.float32)
    order = np.lexsort((rank, rows[:, 0]))  # RecBole sorts by (user, timestamp)
    assert np.unique(np.stack([rows[:, 0], rank]), axis=1).shape[1] == len(rows)  # no ties left to break
    items = rows[order, 1].astype(np.int64)
    np.testing.assert_array_equal(items, seq.features["item"])
    raw = seq.vocabs["item"].tokens
    assert [raw[i - NUM_RESERVED] for i in items[:5]] == [30, 10, 20, 40, 50]  # ties in file order, 40 < 50


def test_leave_one_out_by_that_order_gives_the_projects_targets(tmp_path):
    seq = sequences()
    _, rows = read_inter(write_atomic_files(seq, tmp_path, "tiny") / "tiny.inter")
    for user in range(seq.num_users):
        mine = rows[rows[:, 0] == user]
        mine = mine[np.argsort(mine[:, 2].astype(np.float32), kind="stable")][:, 1].astype(np.int64)
        users = np.array([user])
        assert mine[-1] == seq.features["item"][seq.target_index(users, "test")][0]
        assert mine[-2] == seq.features["item"][seq.target_index(users, "val")][0]


def test_every_catalog_item_is_a_candidate(tmp_path):
    seq = sequences()
    lines = (write_atomic_files(seq, tmp_path, "tiny") / "tiny.item").read_text().splitlines()
    assert lines[0] == ITEM_HEADER
    assert [int(v) for v in lines[1:]] == list(range(NUM_RESERVED, len(seq.vocabs["item"])))
    assert seq.vocabs["item"].encode([60])[0] in [int(v) for v in lines[1:]]  # never rated, still ranked


@pytest.mark.parametrize("masked", [False, True])
def test_metrics_equal_the_top_k_list_definition(masked):
    """RecBole ranks with topk over the scores (history set to -inf when masked) and scores a hit at list
    position p with 1/log2(p + 2); without ties that is the project's rank-based computation."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 40, generator=g)  # distinct almost surely
    targets = torch.randint(NUM_RESERVED, 40, (200,), generator=g)
    history = torch.randint(NUM_RESERVED, 40, (200, 6), generator=g)
    history[history == targets[:, None]] = 0  # the target is not in its own history here (PAD is ignored)
    ours = finalize(ranking_sums(target_ranks(scores, targets, history if masked else None)))
    ranked = scores.clone()
    ranked[:, :NUM_RESERVED] = -math.inf
    if masked:
        ranked.scatter_(1, history, -math.inf)
    top = ranked.topk(max(KS), dim=1).indices
    hit = top == targets[:, None]
    position = hit.float().argmax(1)
    for k in KS:
        assert ours[f"recall@{k}"] == int(hit[:, :k].any(1).sum()) / 200
    gains = torch.where(hit.any(1), 1 / torch.log2(position + 2.0), torch.zeros(200))
    assert ours["ndcg@10"] == pytest.approx(gains.sum().item() / 200, abs=1e-6)  # float32 sums of <= 200 terms
