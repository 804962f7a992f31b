"""The Flower app on the Deployment Engine: a real loopback SuperLink with 3 SuperNodes, one partition each.

Every process the deployment starts (SuperLink, SuperNodes, their SuperExecs, ServerApp and ClientApps) must be
gone afterwards; the tests check it by PID.
"""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from fed_userllm.deploy import LocalDeployment, free_port, make_supernode_keys

NODES = 3
TINY = (f"dataset='synthetic:users={NODES},items=40,genres=4,events=12' max-len=8 d-model=16 n-layers=1 "
        "item-dim=8 batch-size=4 eval-fraction=1.0 dp='user' fraction-train=1.0 phases='pretrain'"
        " item-features='learned' local-steps=0 server-lr=0.1 server-tau=0.001 noise-multiplier=1.0"
        " target-epsilon=0.0 lr=0.5")
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "flower-supernode").exists(), reason="flwr is not installed")


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_rounds_on_a_superlink_with_three_supernodes(tmp_path):
    with LocalDeployment(NODES, tmp_path / "deploy") as deployment:
        started = [p.pid for p in deployment.processes]
        assert len(started) == 1 + NODES
        run_dir = deployment.run(f"{TINY} num-rounds=2 eval-every=0", run_dir=tmp_path / "run", timeout=400)

    records = read_records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    # q = 1: every SuperNode trains in every round, and all of them reply
    assert all(r["clients_sampled"] == NODES and r["clients_succeeded"] == NODES for r in records)
    assert all(r["bytes_sent"] > 0 and r["epsilon"] > 0 for r in records)
    test = json.loads((run_dir / "results.json").read_text())["pretrain"]["test"]
    assert test["n"] == NODES and 0 <= test["recall@10"] <= 1
    # every process started, and every descendant (SuperExecs, ServerApp, ClientApps) is gone
    assert set(started) <= set(deployment.stopped_pids) and len(deployment.stopped_pids) > len(started)
    assert not [pid for pid in deployment.stopped_pids if running(pid)]
    assert deployment.processes == []
    logs = {p.name for p in (tmp_path / "deploy" / "logs").iterdir()}
    assert {"superlink.log", "supernode-0.log", "supernode-2.log"} <= logs


def _reader(proc: subprocess.Popen) -> tuple[queue.Queue, threading.Thread]:
    """The process's stdout, line by line, without blocking the test."""
    lines: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    thread.start()
    return lines, thread


def _wait_for(lines: queue.Queue, text: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no {text!r} within {timeout}s:\n{''.join(seen)[-3000:]}") from None


@pytest.mark.slow
def test_cli_tls_and_supernode_auth_keep_running_until_sigterm(tmp_path):
    """`fed-userllm deploy --auth --keep-running`: TLS, registered SuperNodes only, runs from outside, SIGTERM."""
    workdir = tmp_path / "deploy"
    cli = subprocess.Popen([str(BIN / "fed-userllm"), "deploy", "--supernodes", str(NODES), "--auth",
                            "--keep-running", "--workdir", str(workdir)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines, reader = _reader(cli)
    seen: list[str] = []
    intruder = None
    try:
        _wait_for(lines, "Stop it", seen, timeout=150)
        output = "".join(seen)
        assert "TLS, SuperNode auth" in output and f"{NODES} SuperNodes online" in output
        config = tomllib.loads((workdir / "flwr-home" / "config.toml").read_text())["superlink"]["local-deployment"]
        assert config["root-certificates"] == str(workdir / "certs" / "ca.crt") and "insecure" not in config
        # a SuperNode whose key was never registered is refused and gives up
        private, _ = make_supernode_keys(tmp_path / "intruder", 0)
        with (tmp_path / "intruder.log").open("w") as log:
            intruder = subprocess.Popen([str(BIN / "flower-supernode"), "--superlink", config["address"],
                                         "--port", str(free_port()), "--root-certificates",
                                         config["root-certificates"], "--auth-supernode-private-key", str(private)],
                                        stdout=log, stderr=subprocess.STDOUT,  # it starts flower-superexec
                                        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
            assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
        # the printed command submits a run to the running federation
        flwr_home, *command = shlex.split(next(line for line in seen if line.strip().startswith("FLWR_HOME=")))
        run_dir = tmp_path / "run"
        done = subprocess.run([*command, "--run-config", f"{TINY} num-rounds=1 eval-every=0 run-dir='{run_dir}'"],
                              env={**os.environ, "FLWR_HOME": flwr_home.removeprefix("FLWR_HOME=")},
                              capture_output=True, text=True, timeout=240)
        assert "fed-userllm: finished" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
        assert [r["clients_succeeded"] for r in read_records(run_dir)] == [NODES]
        assert json.loads((run_dir / "results.json").read_text())["pretrain"]["test"]["n"] == NODES
    finally:
        if intruder and intruder.poll() is None:
            tree = [psutil.Process(intruder.pid), *psutil.Process(intruder.pid).children(recursive=True)]
            for proc in tree:
                proc.kill()
            psutil.wait_procs(tree, timeout=10)
        cli.send_signal(signal.SIGTERM)
        cli.wait(timeout=60)
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    started = [int(pid) for pid in re.findall(r"deploy: Super.*\(pid (\d+)", output)]
    stopped = [int(pid) for pid in re.search(r"processes \(pids ([\d, ]+)\)", output)[1].split(", ")]
    assert len(started) == 1 + NODES and set(started) <= set(stopped), output[-3000:]
    assert not [pid for pid in stopped if running(pid)]
