"""The popularity phase: a (DP) release of how many users rated each item, which becomes the encoder's prior."""

import json
import math

import numpy as np
import pytest
import torch
from federation_fixtures import TINY_FEDERATION, USERS

from fed_userllm.clients.task import client_users, load_data, popularity_update
from fed_userllm.data import NUM_RESERVED
from fed_userllm.models import ARUserEncoder, Popularity
from fed_userllm.privacy import audit
from fed_userllm.server.local_grid import app_defaults, run_local
from fed_userllm.train.federated_config import FederatedConfig

TINY = {**TINY_FEDERATION, "num-rounds": 1, "lr": 0.5, "eval-every": 0, "dp-seed": 7, "phases": "popularity,pretrain",
        "popularity-rounds": 3, "item-features": "public", "item-features-llm": "",
        "canaries": 0}  # no canary: they bias a 40-item release


def config(tmp_path, **overrides) -> dict:
    return {**app_defaults(), **TINY, "run-dir": str(tmp_path / "run"),
            **{k.replace("_", "-"): v for k, v in overrides.items()}}


def test_a_users_vector_marks_the_distinct_items_they_rated_with_unit_norm(tmp_path):
    cfg = FederatedConfig.from_run_config(config(tmp_path))
    seq = load_data(cfg.data.dataset, cfg.data.max_len)
    users = client_users(cfg.data, seq, 3)
    update = popularity_update(seq, users, clip_norm=2.0)
    start, end = seq.train_ranges(users)
    rated = np.unique(seq.features["item"][start[0]:end[0]])
    assert set(np.flatnonzero(update)) == set(rated[rated >= NUM_RESERVED])
    np.testing.assert_allclose(np.linalg.norm(update), 2.0, rtol=1e-6)  # exactly C: clipping keeps all of it


def test_without_dp_the_release_is_the_exact_share_of_users_who_rated_each_item(tmp_path):
    run_dir = run_local(config(tmp_path, dp="none"))
    released = Popularity.from_pretrained(run_dir / "popularity").counts.detach().numpy()
    cfg = FederatedConfig.from_run_config(config(tmp_path))
    seq = load_data(cfg.data.dataset, cfg.data.max_len)
    expected = sum(popularity_update(seq, client_users(cfg.data, seq, c), cfg.dp.clip_norm)
                   for c in range(USERS)) / USERS
    np.testing.assert_allclose(released, expected, rtol=1e-5, atol=1e-7)  # averaged over 3 identical releases
    encoder = ARUserEncoder.from_pretrained(run_dir / "final")
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {"popularity", "pretrain"} and results["popularity"]["test"]["n"] == USERS
    # the encoder started from log(release): its bias still ranks the rated items above the never-rated ones
    bias = encoder.unembed["item"].bias.detach()
    assert bias[torch.from_numpy(expected > 0)].min() > bias[NUM_RESERVED:][torch.from_numpy(expected[NUM_RESERVED:]
                                                                                                == 0)].max()


def test_under_dp_every_release_is_charged_at_q_1_and_the_noise_averages(tmp_path):
    run_dir = run_local(config(tmp_path, dp="user", noise_multiplier=2.0))
    ledger = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    rounds = [e for e in ledger if e.get("phase")]
    assert [(e["phase"], e["sample_rate"]) for e in rounds][:3] == [("popularity", 1.0)] * 3
    assert rounds[3]["phase"] == "pretrain"
    assert audit(run_dir).ok
    cfg = FederatedConfig.from_run_config(config(tmp_path))
    seq = load_data(cfg.data.dataset, cfg.data.max_len)
    exact = sum(popularity_update(seq, client_users(cfg.data, seq, c), cfg.dp.clip_norm) for c in range(USERS)) / USERS
    released = Popularity.from_pretrained(run_dir / "popularity").counts.detach().numpy()
    error = (released - exact)[NUM_RESERVED:]
    expected_std = 2.0 * cfg.dp.clip_norm / (USERS * math.sqrt(3))  # sigma C / N per release, averaged over 3
    assert error.std() == pytest.approx(expected_std, rel=0.35)  # ~40 items: a loose bound on a sample std


def test_the_phase_order_and_model_are_checked(tmp_path):
    with pytest.raises(ValueError, match="popularity before pretrain"):
        FederatedConfig.from_run_config(config(tmp_path, phases="pretrain,popularity"))
    with pytest.raises(ValueError, match="model='ar'"):
        FederatedConfig.from_run_config(config(tmp_path, model="dual", item_features="learned"))
    with pytest.raises(ValueError, match="popularity-rounds"):
        FederatedConfig.from_run_config(config(tmp_path, popularity_rounds=0))
