"""Full-ranking metrics on hand-computed cases."""

import math

import pytest
import torch

from fed_userllm.eval.ranking import add_sums, finalize, ranking_sums, target_ranks


def test_ranks_and_metrics_match_hand_computation():
    # ids 0..2 are reserved; real items 3..7
    scores = torch.tensor([[9.0, 9.0, 9.0, 0.1, 0.9, 0.5, 0.3, 0.2],   # target 4 is best -> rank 0
                           [0.0, 0.0, 0.0, 0.1, 0.9, 0.5, 0.3, 0.2],   # target 6: 4 and 5 ahead -> rank 2
                           [0.0, 0.0, 0.0, 0.1, 0.9, 0.5, 0.3, 0.2]])  # target 3 is worst -> rank 4
    ranks = target_ranks(scores, torch.tensor([4, 6, 3]))
    assert ranks.tolist() == [0.0, 2.0, 4.0]
    sums = ranking_sums(ranks)
    assert sums["recall@1"] == 1 and sums["recall@5"] == 3 and sums["recall@10"] == 3
    assert sums["ndcg@10"] == pytest.approx(1.0 + 1 / math.log2(4) + 1 / math.log2(6))
    means = finalize(sums)
    assert means["recall@1"] == pytest.approx(1 / 3) and means["n"] == 3


def test_ties_are_pessimistic_and_unknown_targets_miss():
    flat = torch.zeros(2, 10)
    ranks = target_ranks(flat, torch.tensor([5, 1]))  # all real items tie; target 1 is UNK
    assert ranks[0] == 6  # the 6 other real items count as ahead
    assert math.isinf(ranks[1])
    assert ranking_sums(ranks)["recall@10"] == 1


def test_mask_seen_removes_history_items_from_the_ranking():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.8, 0.1]])
    history = torch.tensor([[3, 4, 0, 0]])  # right-padded
    assert target_ranks(scores, torch.tensor([5])).item() == 2
    assert target_ranks(scores, torch.tensor([5]), history).item() == 0
    assert math.isinf(target_ranks(scores, torch.tensor([3]), history).item())  # a re-watch is a miss


def test_sums_add_across_clients_and_bad_shapes_are_refused():
    a, b = ranking_sums(torch.tensor([0.0])), ranking_sums(torch.tensor([20.0]))
    total = add_sums(add_sums({}, a), {**b, "fav_genre": 1.0})
    assert total["n"] == 2 and total["recall@1"] == 1 and total["fav_genre"] == 1
    with pytest.raises(ValueError, match="expected scores"):
        target_ranks(torch.zeros(3), torch.tensor([1]))
    with pytest.raises(ValueError, match="no evaluation examples"):
        finalize({})
