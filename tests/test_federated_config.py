"""The federated run's nested settings: each run-config key reaches exactly its nested field(s), each phase has its
own settings, bad keys and values are named, and a run directory's saved settings are read in either form."""

import json
from dataclasses import replace

import pytest

from fed_userllm.server.local_grid import app_defaults
from fed_userllm.server.runner import RESUMABLE, resolve_run_dir
from fed_userllm.train.federated_config import (
    KEYS,
    FederatedConfig,
    PhaseSettings,
    popularity_choices,
    run_config_of,
    saved_settings,
)

BASE = {**app_defaults(), "dataset": "synthetic:users=12,items=40", "phases": "pretrain", "item-features": "learned",
        "llm-objective": "lm"}
# another valid value for each string key (numbers and booleans are changed generically, see `other_value`)
OTHER = {"phases": "popularity,pretrain", "dataset": "synthetic:users=5,items=9", "model": "dual",
         "item-features": "public", "item-features-llm": "", "encoder": "/some/encoder", "llm": "other/llm",
         "llm-task": "favgenre", "llm-integration": "softprompt", "llm-objective": "catalog",
         "llm-user-tokens": "events", "strategy": "fedavg", "server-lr-schedule": "cosine", "dp": "none",
         "accountant": "prv", "device": "cpu", "run-dir": "/tmp/run", "on-short-round": "skip", "fault-kind": "hang"}


def other_value(key: str):
    value = BASE[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2  # keeps d-model a multiple of n-heads
    if isinstance(value, float):
        return value / 2 if value else 0.5
    return OTHER[key]


def leaves(nested: dict, prefix: str = "") -> dict:
    """{"part.field": value} of nested settings (``phases`` as itself)."""
    out = {}
    for name, value in nested.items():
        if isinstance(value, dict):
            out |= leaves(value, f"{name}.")
        else:
            out[prefix + name] = value
    return out


@pytest.mark.parametrize("key", sorted(KEYS))
def test_each_key_reaches_exactly_its_nested_fields(key):
    value = other_value(key)
    base, changed = (leaves(FederatedConfig.from_run_config(c).to_dict()) for c in (BASE, {**BASE, key: value}))
    differ = {path for path in base if base[path] != changed[path]}
    expected = set(KEYS[key]) | ({"popularity.server_lr"} if key == "popularity-rounds" else set())
    assert differ == expected
    parsed = value.split(",") if key == "phases" else value
    assert all(changed[path] == parsed for path in KEYS[key])


def test_the_run_config_round_trips_through_the_nested_settings():
    assert run_config_of(FederatedConfig.from_run_config(BASE).to_dict()) == BASE


def test_each_phase_has_its_own_settings():
    cfg = FederatedConfig.from_run_config({**BASE, "num-rounds": 6, "llm-rounds": 2, "popularity-rounds": 4,
                                           "fraction-train": 1.0, "llm-fraction-train": 0.05, "lr": 1.0,
                                           "llm-lr": 0.001, "server-lr": 0.02, "llm-server-lr": 0.003,
                                           "test-fraction": 0.75, "llm-eval-fraction": 0.25, "eval-fraction": 0.5,
                                           "local-steps": 1, "llm-local-steps": 4, "strategy": "fedadam"})
    pretrain, contextualize, popularity = (cfg.phase(name) for name in ("pretrain", "contextualize", "popularity"))
    assert (pretrain.rounds, pretrain.fraction_train, pretrain.lr, pretrain.server_lr, pretrain.local_steps,
            pretrain.eval_fraction, pretrain.test_fraction) == (6, 1.0, 1.0, 0.02, 1, 0.5, 0.75)
    assert (contextualize.rounds, contextualize.fraction_train, contextualize.lr, contextualize.server_lr,
            contextualize.local_steps, contextualize.eval_fraction, contextualize.test_fraction) == (
        2, 0.05, 0.001, 0.003, 4, 0.25, 0.25)
    assert contextualize.local_epochs is None and contextualize.strategy == pretrain.strategy == "fedadam"
    # the popularity phase averages its releases whatever the pretrain phase's optimiser
    assert (popularity.rounds, popularity.test_fraction) == (4, 0.75)
    assert {k: getattr(popularity, k) for k in popularity_choices(4)} == popularity_choices(4)
    assert popularity.server_lr == 0.25 and popularity.lr is None and popularity.eval_every == 0
    with pytest.raises(ValueError, match="phase 'finetune'"):
        cfg.phase("finetune")


@pytest.mark.parametrize("key,value,expected", [
    ("num-rounds", 0, "an integer >= 1"), ("llm-rounds", 0, "an integer >= 1"),
    ("popularity-rounds", -1, "an integer >= 1"), ("llm-batch-size", 0, "an integer >= 1"),
    ("llm-eval-fraction", 1.5, "a share of clients"), ("server-tau", -1.0, "a finite number > 0"),
    ("llm-server-lr", float("inf"), "a finite number > 0"), ("dp-seed", -1, "an integer >= 0"),
    ("max-in-flight", -1, "an integer >= 0"), ("encoder", 3, "a str"), ("llm-xattn-ffn", 1, "a bool"),
])
def test_a_bad_value_of_a_nested_field_names_its_key(key, value, expected):
    with pytest.raises(ValueError, match=f"^{key}={value!r}: expected {expected}"):
        FederatedConfig.from_run_config({**BASE, key: value})


def test_settings_built_in_code_name_their_field():
    phase = FederatedConfig.from_run_config(BASE).pretrain
    with pytest.raises(ValueError, match="^fraction_train=0: expected a client sampling rate"):
        replace(phase, fraction_train=0)
    with pytest.raises(ValueError, match="^local_steps=0: expected an integer >= 1"):
        replace(phase, local_epochs=None, local_steps=0)  # a phase without epochs runs a number of steps
    assert isinstance(replace(phase, rounds=3), PhaseSettings)


def test_unknown_and_missing_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown run-config keys \['llm-local-epochs'\]"):
        FederatedConfig.from_run_config({**BASE, "llm-local-epochs": 2})
    with pytest.raises(ValueError, match=r"missing \['popularity-rounds'\]"):
        FederatedConfig.from_run_config({k: v for k, v in BASE.items() if k != "popularity-rounds"})


def test_saved_flat_settings_of_earlier_runs_read_as_the_nested_form():
    nested = FederatedConfig.from_run_config(BASE).to_dict()
    flat = {k.replace("-", "_"): v for k, v in BASE.items()}
    assert saved_settings(flat) == nested
    assert saved_settings(nested) == nested


def test_a_run_saved_before_the_seen_offset_reads_without_it_and_resumes_only_so(tmp_path):
    config = {**BASE, "run-dir": str(tmp_path / "run")}
    settings = FederatedConfig.from_run_config(config).to_dict()
    del settings["encoder"]["seen_offset"]
    assert saved_settings(settings)["encoder"]["seen_offset"] is False
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"settings": settings}))
    with pytest.raises(ValueError, match="seen-offset"):
        resolve_run_dir(FederatedConfig.from_run_config({**config, "resume": True, "seen-offset": True}))
    resumed = FederatedConfig.from_run_config({**config, "resume": True, "seen-offset": False})
    assert resolve_run_dir(resumed).path == (tmp_path / "run").resolve()


@pytest.mark.parametrize("flat", [False, True])
def test_a_run_resumes_with_the_same_settings_saved_in_either_form(tmp_path, flat):
    config = {**BASE, "run-dir": str(tmp_path / "run")}
    settings = FederatedConfig.from_run_config(config).to_dict()
    if flat:
        settings = {k.replace("-", "_"): v for k, v in config.items() if k not in RESUMABLE}
    for path in (p for key in RESUMABLE for p in KEYS[key] if not flat):
        part, name = path.split(".")
        del settings[part][name]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"settings": settings}))
    resumed = {**config, "resume": True, "threads": 2, "round-timeout": 5.0}  # may change on resume
    assert resolve_run_dir(FederatedConfig.from_run_config(resumed)).path == (tmp_path / "run").resolve()
    with pytest.raises(ValueError, match=r"other settings \{'llm-lr': \(0.001, 0.002\)\}"):
        resolve_run_dir(FederatedConfig.from_run_config({**resumed, "llm-lr": 0.002}))


def test_sample_level_dp_refuses_the_popularity_phase():
    # its clients send their rated items to the server, which DP-SGD on the clients does not trust
    with pytest.raises(ValueError, match=r"^dp='sample': expected 'user' or 'none' when phases includes popularity"):
        FederatedConfig.from_run_config({**BASE, "phases": "popularity,pretrain", "dp": "sample"})
    assert FederatedConfig.from_run_config({**BASE, "phases": "popularity,pretrain", "dp": "user"}).dp.mode == "user"
