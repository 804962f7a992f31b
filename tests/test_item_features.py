"""Public item features: a deterministic function of the catalog, never of ratings; frozen, saved, never sent."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from federation_fixtures import TINY_FEDERATION
from llm_fixtures import save_tiny_llm

from fed_userllm.clients.task import get_arrays, initial_encoder, load_data
from fed_userllm.data import NUM_RESERVED, Catalog, load_catalog, synthetic_movielens
from fed_userllm.data import item_features as features_module
from fed_userllm.data.item_features import (
    ItemFeatureSpec,
    catalog_features,
    public_item_features,
    release_year,
)
from fed_userllm.data.sequences import public_vocabularies
from fed_userllm.models import ARUserEncoder, build_encoder
from fed_userllm.server.local_grid import app_defaults, run_local
from fed_userllm.train.federated_config import FederatedConfig
from fed_userllm.train.pretrain_config import PretrainConfig

CATALOG = Catalog({1: "Heat (1995)", 2: "Amélie (2001)", 3: "Nameless", 5: "Seven (a.k.a. Se7en) (1995)",
                   8: "Jaws (1975)"},
                  {1: ("Action", "Crime"), 2: ("Comedy",), 3: (), 5: ("Crime", "Thriller"), 8: ("Thriller",)})

SIZES_8_16 = PretrainConfig(model="ar", max_len=8, d_model=16, n_layers=1, n_heads=2, dropout=0.0, item_dim=8)


def test_release_year_is_read_from_the_title():
    assert release_year("Heat (1995)") == 1995
    assert release_year("Seven (a.k.a. Se7en) (1995)") == 1995
    assert release_year("Big Bang Theory, The (2007-)") == 2007
    assert release_year("Nameless") is None


def test_catalog_block_holds_genres_and_year_and_zero_reserved_rows():
    items = public_vocabularies(CATALOG)["item"]
    table = catalog_features(CATALOG, items)
    assert table.shape[0] == len(items) == NUM_RESERVED + 5
    assert not table[:NUM_RESERVED].any()
    genres = table[NUM_RESERVED:, :4]  # Action, Comedy, Crime, Thriller (standardized, same order)
    assert (genres[:, 0] > 0).tolist() == [True, False, False, False, False]  # only Heat is Action
    assert (genres[:, 2] > 0).tolist() == [True, False, False, True, False]  # Heat and Seven are Crime
    # the same year gives the same year block; Jaws (1975) differs from Heat (1995)
    heat, seven, jaws = (table[NUM_RESERVED + items.tokens.index(i), 4:] for i in (1, 5, 8))
    np.testing.assert_array_equal(heat, seven)
    assert not np.array_equal(heat, jaws)
    # blocks are standardized and scaled to unit mean squared norm over the real items
    np.testing.assert_allclose((genres ** 2).sum(1).mean(), 1.0, rtol=1e-9)


def test_features_are_a_deterministic_function_of_the_catalog_alone(isolated_cache, tmp_path):
    """The same catalog gives bit-identical tables, whatever the ratings; the LLM part is computed once."""
    interactions, catalog = synthetic_movielens(num_users=30, num_items=25, num_genres=4, seed=1)
    llm = save_tiny_llm(tmp_path / "llm", catalog.titles.values())
    spec = ItemFeatureSpec(llm=llm, llm_layers=2, title_dim=4)
    items = public_vocabularies(catalog)["item"]
    first = public_item_features(catalog, items, spec)
    assert first.dtype == np.float32 and first.shape == (len(items), first.shape[1])
    assert not first[:NUM_RESERVED].any() and np.isfinite(first).all()
    calls = []
    original = features_module._llm_title_states
    features_module._llm_title_states = lambda *a: calls.append(a) or original(*a)
    try:
        again = public_item_features(catalog, items, spec)  # from the disk cache: the LLM does not run
        assert calls == []
        np.testing.assert_array_equal(first, again)
        renamed = Catalog({**catalog.titles, 1: "A New Title (1999)"}, catalog.genres)
        changed = public_item_features(renamed, items, spec)  # another catalog: recomputed
        assert len(calls) == 1 and not np.array_equal(changed, first)
    finally:
        features_module._llm_title_states = original


def test_public_encoder_trains_projections_not_a_table_and_saves_its_features(tmp_path):
    catalog = synthetic_movielens(num_users=20, num_items=30, num_genres=4, seed=2)[1]
    vocabs = public_vocabularies(catalog)
    table = catalog_features(catalog, vocabs["item"]).astype(np.float32)
    sizes = {k: len(v) for k, v in vocabs.items()}
    model = build_encoder(SIZES_8_16, sizes, SIZES_8_16.max_len, table)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert not any("features" in n for n in trainable)
    assert trainable["embed.item.proj.weight"] == table.shape[1] * 8
    assert trainable["unembed.item.bias"] == sizes["item"]  # the learned per-item bias (popularity)
    # nothing trainable is a per-item table: the item-sized tensors are the frozen features and one bias
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.shape[0] == sizes["item"]] == [
        "unembed.item.bias"]
    assert model.embed["item"].features is model.unembed["item"].features  # one frozen table
    np.testing.assert_array_equal(model.embed["item"].features.numpy(), table)
    # scores are q . f_j + b_j in the public feature space: the next-item vector lives there
    with torch.no_grad():
        model.heads["item"].weight.normal_()
    batch = {"item": torch.tensor([[4, 9, 5]]), "genre": torch.tensor([[3, 4, 5]]),
             "rating": torch.tensor([[3, 4, 5]]), "mask": torch.ones(1, 3, dtype=torch.bool)}
    h = model.encode(batch)
    q = model.next_item_vectors(h, batch["mask"])[:, 0]
    assert q.shape == (1, table.shape[1]) == (1, model.next_item_dim)
    torch.testing.assert_close(model.score_items(batch), q @ torch.from_numpy(table).T + model.unembed["item"].bias)
    model.save_pretrained(tmp_path / "m")
    loaded = ARUserEncoder.from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(loaded.embed["item"].features.numpy(), table)
    assert loaded.embed["item"].features is loaded.unembed["item"].features
    torch.testing.assert_close(loaded.score_items(batch), model.eval().score_items(batch))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["item_features"] == "public"
    with pytest.raises(ValueError, match="item_features has shape"):
        build_encoder(SIZES_8_16, sizes, SIZES_8_16.max_len, table[:, :3].T)
    with pytest.raises(ValueError, match="AR encoder"):
        build_encoder(replace(SIZES_8_16, model="dual"), sizes, SIZES_8_16.max_len, table)


TINY = {**TINY_FEDERATION, "lr": 0.5, "dp-seed": 7, "phases": "pretrain", "item-features": "public",
        "item-features-llm": ""}


def test_the_federation_exchanges_exactly_the_trainable_tensors(tmp_path, isolated_cache):
    config = {**app_defaults(), **TINY, "run-dir": str(tmp_path / "run"), "num-rounds": 1, "eval-every": 1}
    cfg = FederatedConfig.from_run_config(config)
    data = cfg.data
    model = initial_encoder(cfg, load_data(data.dataset, data.max_len).vocab_sizes)
    arrays = get_arrays(model)
    assert set(arrays.keys()) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("features" in k for k in arrays.keys())
    catalog = load_catalog(data.dataset)  # the server reads the public catalog only, the same one
    assert catalog.titles == load_data(data.dataset, data.max_len).catalog.titles
    run_dir = run_local(config)
    saved = ARUserEncoder.from_pretrained(run_dir / "final")
    np.testing.assert_array_equal(saved.embed["item"].features.numpy(), model.embed["item"].features.numpy())
    assert json.loads((run_dir / "results.json").read_text())["pretrain"]["test"]["n"] == 12
    with pytest.raises(ValueError, match="item-features='nope'"):
        FederatedConfig.from_run_config({**config, "item-features": "nope"})
    with pytest.raises(ValueError, match="item-features"):
        FederatedConfig.from_run_config({**config, "model": "dual"})
