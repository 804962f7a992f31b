"""`flwr run simulations/movielens --stream` end to end on a tiny synthetic federation: pretrain, then the
contextualize phase with a tiny random LLM.

The run gets its own FLWR_HOME and SuperLink ports, so it never touches a SuperLink the user runs. `flwr run`
starts a local SuperLink (flower-superlink + flower-superexec) that outlives it; the test stops exactly those
processes: the SuperLink is found by its command line, which holds this test's private FLWR_HOME, and its
process tree is terminated by PID.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from llm_fixtures import save_tiny_llm

from fed_userllm.models import load_pretrained
from fed_userllm.privacy import audit

APP = Path(__file__).parents[1] / "simulations" / "movielens"
USERS = 12
TINY = (f"dataset='synthetic:users={USERS},items=40,genres=4,events=12' max-len=8 d-model=16 n-layers=1 "
        "item-dim=8 num-rounds=2 batch-size=4 eval-every=1 eval-fraction=0.5 dp='user' fraction-train=0.5 "
        "phases='pretrain,contextualize' llm-rounds=1 llm-fraction-train=0.5 llm-local-steps=2 llm-batch-size=2 "
        "llm-eval-fraction=0.25"
        " item-features='learned' local-steps=0 server-lr=0.1 server-tau=0.001 noise-multiplier=1.0 target-epsilon=0.0"
        " lr=0.5 llm-objective='lm' llm-user-tokens='events'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_superlink(flwr_home: Path) -> list[int]:
    """Terminate the SuperLink started under ``flwr_home`` and all its descendants; return their PIDs."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(str(flwr_home) in arg for arg in (p.info["cmdline"] or []))]
    procs = roots + [c for p in roots for c in p.children(recursive=True)]
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        proc.kill()
    return [p.pid for p in procs]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_flwr_run_trains_evaluates_and_writes_the_run_directory(tmp_path):
    flwr = Path(sys.executable).with_name("flwr")
    if not flwr.exists():
        pytest.skip(f"{flwr} is not installed")
    home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    llm = save_tiny_llm(tmp_path / "llm")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # flwr starts flower-superlink
    command = [str(flwr), "run", str(APP), "--stream", "--run-config", f"{TINY} llm='{llm}' run-dir='{run_dir}'",
               "--federation-config", f"num-supernodes={USERS} client-resources-num-cpus=1"]
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    finally:
        stopped = stop_superlink(home)
    log = done.stdout + done.stderr
    assert stopped, "the local SuperLink of this test was not found"
    assert "fed-userllm: finished" in log, log[-4000:]
    assert "[pretrain] round 2/2" in log and "[contextualize] round 1/1" in log and "privacy_report.txt" in log
    assert "the frozen LLM" in log and "never sent" in log

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"]) for r in records] == [("pretrain", 1), ("pretrain", 2), ("contextualize", 1)]
    assert all(r["epsilon"] > 0 and r["bytes_sent"] > 0 and "val_recall@10" in r for r in records)
    assert records[0]["epsilon"] < records[1]["epsilon"] < records[2]["epsilon"]  # one ledger for both phases
    assert records[2]["llm_bytes"] > 0
    model = load_pretrained(run_dir / "final")
    assert model.config.vocab_sizes == json.loads((run_dir / "config.json").read_text())["vocab_sizes"]
    report = audit(run_dir)
    assert report.ok and [r.phase for r in report.rounds] == ["pretrain", "pretrain", "contextualize"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["pretrain"]["test"]["n"] == USERS and results["contextualize"]["test"]["n"] == USERS // 4
    assert (run_dir / "userllm" / "userllm_config.json").is_file()
    assert not [pid for pid in stopped if running(pid)]
