"""The release boundary: `fed-userllm release` copies out of a finished DP run only what its (epsilon, delta)
covers, refuses anything else, and the run directory says what is operator-private. Noise seeds never leave.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from federation_fixtures import TINY_FEDERATION, USERS, crash_after_release_of_round_2
from safetensors.torch import load_file, save_file

from fed_userllm.cli import main
from fed_userllm.rundir import LEDGER, OPERATOR_PRIVATE
from fed_userllm.server import release as release_module
from fed_userllm.server import runner
from fed_userllm.server.local_grid import LocalGrid, app_defaults
from fed_userllm.server.runner import run
from fed_userllm.train.federated_config import FederatedConfig

SEED = 7_123_456_789_012_345_678  # the "secret" DP seed the OS would have drawn
TINY = {**TINY_FEDERATION, "num-rounds": 2, "eval-every": 1, "phases": "pretrain", "dp": "user", "dp-seed": 0,
        "canaries": 4}


def finished_run(tmp_path: Path, monkeypatch, **overrides) -> Path:
    """A finished tiny DP run whose secret seed is SEED."""
    monkeypatch.setattr(runner.secrets, "randbits", lambda bits: SEED)
    config = {**app_defaults(), **TINY, "run-dir": str(tmp_path / "run"),
              **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return run(LocalGrid(config, USERS), FederatedConfig.from_run_config(config))


def release_cli(run_dir: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["release", str(run_dir), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_release_holds_exactly_the_models_public_config_ledger_and_audit(tmp_path, monkeypatch, capsys):
    run_dir = finished_run(tmp_path, monkeypatch)
    out = tmp_path / "public"
    code, printed = release_cli(run_dir, out, capsys)
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["final", "config.json", LEDGER, "privacy_audit.json", "privacy_audit.txt", "RELEASE.md"])
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".public")] == []  # no staging folder left
    released, trained = (load_file(d / "final" / "model.safetensors") for d in (out, run_dir))
    assert released.keys() == trained.keys() and all(torch.equal(released[k], trained[k]) for k in released)
    assert (out / LEDGER).read_bytes() == (run_dir / LEDGER).read_bytes()
    public, private = json.loads((out / "config.json").read_text()), json.loads((run_dir / "config.json").read_text())
    assert "seed" not in public["settings"]["dp"] and "seed" in private["settings"]["dp"]
    without_seed = {k: v for k, v in private["settings"]["dp"].items() if k != "seed"}
    assert public == {**private, "settings": {**private["settings"], "dp": without_seed}}
    assert json.loads((out / "privacy_audit.json").read_text())["ok"] is True
    readme = (out / "RELEASE.md").read_text()
    assert "delta = 1e-05" in readme and "final/" in readme and OPERATOR_PRIVATE in readme

    # the noise seed is in no released file, and the finished run's checkpoint no longer holds it
    for path in out.rglob("*"):
        if path.is_file():
            assert str(SEED).encode() not in path.read_bytes(), path
    assert "dp_seed" not in torch.load(run_dir / "checkpoint.pt", weights_only=False)

    # everything the release leaves behind is listed as operator-private in the run directory
    listed = (run_dir / OPERATOR_PRIVATE).read_text()
    left = {p.name for p in run_dir.iterdir()} - {"final", LEDGER, "privacy_report.txt", OPERATOR_PRIVATE}
    assert left == {"config.json", "metrics.jsonl", "results.json", "checkpoint.pt", "metrics.png", "epsilon.png",
                    "canaries"}
    assert all(name in listed for name in left)
    results = json.loads((run_dir / "results.json").read_text())["pretrain"]
    assert results["privacy"].startswith("operator-private") and results["test"]["n"] == USERS


def test_release_refuses_an_unfinished_run_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner.secrets, "randbits", lambda bits: SEED)
    config = {**app_defaults(), **TINY, "run-dir": str(tmp_path / "run")}
    crash_after_release_of_round_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(LocalGrid(config, USERS), FederatedConfig.from_run_config(config))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["dp_seed"] == SEED  # for resume
    code, printed = release_cli(tmp_path / "run", tmp_path / "public", capsys)
    assert code == 2 and "has not finished" in printed and "resume" in printed
    assert not (tmp_path / "public").exists()


@pytest.mark.parametrize("problem", ["audit", "non-finite", "no-dp", "fixed-seed", "out-exists"])
def test_release_refuses_what_the_guarantee_does_not_cover(tmp_path, monkeypatch, capsys, problem):
    overrides = {"dp": "none"} if problem == "no-dp" else {"dp_seed": 5} if problem == "fixed-seed" else {}
    run_dir = finished_run(tmp_path, monkeypatch, **overrides)
    out = tmp_path / "public"
    if problem == "audit":  # a round's epsilon halved: the chain breaks and the recomputation disagrees
        lines = (run_dir / LEDGER).read_text().splitlines()
        round_1 = json.loads(lines[1])
        round_1["epsilon"] /= 2
        (run_dir / LEDGER).write_text("\n".join([lines[0], json.dumps(round_1), *lines[2:]]) + "\n")
    if problem == "non-finite":
        tensors = load_file(run_dir / "final" / "model.safetensors")
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, run_dir / "final" / "model.safetensors")
    if problem == "out-exists":
        out.mkdir()
    code, printed = release_cli(run_dir, out, capsys)
    expected = {"audit": "privacy audit .* fails", "non-finite": "NaN or infinite", "no-dp": "dp='none'",
                "fixed-seed": "fixed dp-seed=5", "out-exists": "already exists"}[problem]
    assert code == 2 and re.search(expected, printed), printed
    assert problem == "out-exists" or not out.exists()


def test_an_interrupted_release_leaves_no_folder(tmp_path, monkeypatch, capsys):
    run_dir = finished_run(tmp_path, monkeypatch)

    real_write = release_module.atomic_write_bytes

    def disk_full(*args, **kwargs):  # after the model folders and the config were copied
        raise OSError("disk full")

    monkeypatch.setattr(release_module, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError, match="disk full"):
        release_module.release(run_dir, tmp_path / "public")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run"]  # neither the release nor its staging
    monkeypatch.setattr(release_module, "atomic_write_bytes", real_write)
    assert (release_module.release(run_dir, tmp_path / "public") / "RELEASE.md").is_file()
