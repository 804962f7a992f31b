"""Run directories: the kinds told apart, the resume check, `latest`, metrics truncation, and the loaders that
find an encoder or a User-LLM in any run kind or model folder, with the dataset read from the run's config."""

import json
from dataclasses import asdict

import pytest

from fed_userllm.cli import main
from fed_userllm.models import ARUserEncoder, ARUserEncoderConfig
from fed_userllm.rundir import (
    CONTEXTUALIZE,
    FLOWER,
    PRETRAIN,
    EncoderSource,
    RunDir,
    find_encoder,
    find_userllm,
    list_runs,
)
from fed_userllm.server.local_grid import app_defaults
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.federated_config import FederatedConfig
from fed_userllm.train.pretrain_config import PretrainConfig

DATA = "synthetic:users=12,items=20"
FLOWER_RUN_CONFIG = {**app_defaults(), "dataset": DATA, "max-len": 6, "phases": "pretrain,contextualize",
                     "llm-objective": "lm", "llm-user-tokens": "events", "llm-task": "favgenre"}


def encoder(folder):
    model = ARUserEncoder(ARUserEncoderConfig(vocab_sizes={"item": 23, "genre": 7, "rating": 8}, d_model=16,
                                              n_layers=1, n_heads=2, max_len=9))
    model.save_pretrained(folder)
    return folder


def pretrain_run(path):
    run = RunDir(path)
    run.write_config(asdict(PretrainConfig(dataset=DATA, max_len=8)))
    encoder(path / "best")
    return run


def flower_run(path, with_userllm=False, flat=False):
    """A Flower run directory; ``flat``: its settings as versions before the nested settings saved them."""
    run = RunDir(path)
    settings = ({k.replace("-", "_"): v for k, v in FLOWER_RUN_CONFIG.items()} if flat
                else FederatedConfig.from_run_config(FLOWER_RUN_CONFIG).to_dict())
    run.write_config({"settings": settings, "num_clients": 12})
    encoder(path / "final")
    if with_userllm:
        encoder(path / "userllm" / "encoder")
    return run


def test_each_run_kind_is_recognised_and_its_encoder_found_with_its_dataset(tmp_path):
    pre, fl = pretrain_run(tmp_path / "pre"), flower_run(tmp_path / "fl")
    assert (pre.kind, fl.kind) == (PRETRAIN, FLOWER)
    assert find_encoder(pre.path) == EncoderSource(pre / "best", DATA, 8)
    assert (find_encoder(fl.path).folder, find_encoder(fl.path).dataset) == (fl / "final", DATA)
    assert find_encoder(fl / "final").dataset == DATA  # a model folder inside a run: the run's config is read
    fl_llm = flower_run(tmp_path / "fl2", with_userllm=True)
    assert find_encoder(fl_llm.path).folder == fl_llm / "userllm" / "encoder"  # the encoder the User-LLM reads
    ctx = RunDir(tmp_path / "ctx")
    ctx.write_config(asdict(ContextualizeConfig(encoder=str(pre.path))))
    assert ctx.kind == CONTEXTUALIZE
    assert find_encoder(ctx.path) == find_encoder(pre.path)  # not trained yet: the encoder it starts from
    bare = encoder(tmp_path / "bare")
    assert (find_encoder(bare).dataset, find_encoder(bare).max_len) == (None, None)
    with pytest.raises(FileNotFoundError, match="no trained model"):
        find_encoder(tmp_path / "nothing")


def test_a_flower_run_is_read_as_contextualize_settings(tmp_path):
    fl = flower_run(tmp_path / "fl")
    (fl / "userllm").mkdir()
    source = find_userllm(fl / "userllm")
    assert source.folder == fl / "userllm" and source.run.path == fl.path.resolve()
    config = ContextualizeConfig.from_dict(source.config)
    assert (config.dataset, config.history_len, config.task, config.encoder) == (DATA, 6, "favgenre", str(fl.path))
    with pytest.raises(FileNotFoundError, match="expected a contextualize or Flower run"):
        find_userllm(pretrain_run(tmp_path / "pre").path)
    with pytest.raises(FileNotFoundError, match="no trained User-LLM"):
        find_userllm(flower_run(tmp_path / "unfinished").path)


def test_a_flower_run_saved_with_flat_settings_is_read_as_the_nested_one(tmp_path):
    flat, nested = (flower_run(tmp_path / name, with_userllm=True, flat=name == "flat") for name in ("flat", "new"))
    assert "data" in nested.read_config()["settings"] and "max_len" in flat.read_config()["settings"]
    assert find_encoder(flat.path).dataset == find_encoder(nested.path).dataset == DATA
    assert find_encoder(flat.path).max_len == find_encoder(nested.path).max_len == 6
    configs = [find_userllm(run.path).config for run in (flat, nested)]
    assert configs[0] == {**configs[1], "encoder": str(flat.path)}


def test_resume_check_latest_link_and_metrics_truncation(tmp_path):
    run, config = RunDir(tmp_path / "runs" / "a"), PretrainConfig(dataset=DATA)
    assert not run.check_resume(config, resume=False)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        run.check_resume(config, resume=True, require_run=True)
    run.write_config(asdict(config))
    run.mark_latest()
    with pytest.raises(FileExistsError, match="set --resume to continue it"):
        run.check_resume(config, resume=False)
    assert run.check_resume(config, resume=True)
    with pytest.raises(ValueError, match=r"'epochs': \(20, 3\)"):
        run.check_resume(PretrainConfig(dataset=DATA, epochs=3), resume=True)
    other = RunDir(tmp_path / "runs" / "b")
    other.write_config({"settings": {"dataset": DATA}})
    other.mark_latest()
    assert (tmp_path / "runs" / "latest").resolve() == other.path.resolve()
    assert [(r.path.name, kind) for r, kind in list_runs(tmp_path / "runs")] == [("b", FLOWER), ("a", PRETRAIN)]
    for step in (10, 20, 30):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    run.keep_metrics(lambda record: record["step"] <= 20)
    assert [r["step"] for r in run.read_metrics()] == [10, 20]
    assert run.load_checkpoint() == {}
    run.save_checkpoint({"step": 20})
    assert run.load_checkpoint() == {"step": 20}


def test_runs_command_lists_runs_newest_first(tmp_path, capsys):
    pretrain_run(tmp_path / "runs" / "pre").mark_latest()
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [PRETRAIN, str(tmp_path / "runs" / "pre")]
    assert out[-1] == f"latest: {(tmp_path / 'runs' / 'pre').resolve()}"
    assert json.loads((tmp_path / "runs" / "pre" / "config.json").read_text())["dataset"] == DATA
