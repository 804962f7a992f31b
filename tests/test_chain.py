"""The whole chain as a user runs it: a tiny Flower run (popularity, pretrain and contextualize with a tiny LLM,
user-level DP) -> `fed-userllm export RUN_DIR` (.pte) -> `fed-userllm embed` with the ExecuTorch runtime ->
`fed-userllm serve --model RUN_DIR` over real HTTP -> a NextItem answer. Two users with different histories get
different answers. No flag names a dataset or a model folder: everything is read from the run directory."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from federation_fixtures import DATASET, MAX_LEN, PINNED, TINY_FEDERATION

from fed_userllm.cli import main
from fed_userllm.data import load_sequences
from fed_userllm.server.local_grid import run_local

TINY_RUN = {**TINY_FEDERATION, **PINNED, "phases": "popularity,pretrain,contextualize", "num-rounds": 2,
            "llm-rounds": 2, "llm-fraction-train": 0.5, "llm-local-steps": 3, "llm-batch-size": 4, "llm-lr": 0.01,
            "llm-eval-fraction": 0.25, "eval-every": 0, "dp": "user", "dp-seed": 7, "canaries": 0,
            "llm-server-lr": 0.5,  # FedAdam steps of ~eta: the cross-attention gates open within two rounds
            # the default public item features (genres and year here): the states a phone sends are [h ; item
            # features], wider than d-model, as in the default run
            "item-features": "public", "item-features-llm": ""}
USERS = (0, 7)


def write_history(path: Path, user: int) -> Path:
    """The user's events before their test target, as the movieId,rating,timestamp CSV a phone holds."""
    seq = load_sequences(DATASET, max_len=MAX_LEN)
    start, end = int(seq.offsets[user]), int(seq.target_index(np.array([user]), "test")[0])
    rows = [f"{seq.raw_item[i]},{seq.vocabs['rating'].decode(int(seq.features['rating'][i]))},{seq.timestamp[i]}"
            for i in range(start, end)]
    path.write_text("movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_cache")
def test_flower_run_exports_embeds_and_serves_next_item_answers(tmp_path, tiny_llm_dir):
    run_dir = run_local({**TINY_RUN, "llm": tiny_llm_dir, "run-dir": str(tmp_path / "runs" / "flower-tiny")})
    assert (tmp_path / "runs" / "latest").resolve() == run_dir

    artifact = tmp_path / "artifact"
    assert main(["export", str(run_dir), "--out", str(artifact), "--parity-users", "4", "--fixed-length"]) == 0
    users = {}
    for user in USERS:
        out = tmp_path / f"user{user}.json"
        history = write_history(tmp_path / f"history{user}.csv", user)
        assert main(["embed", "--artifact", str(artifact), "--history", str(history), "--out", str(out)]) == 0
        users[user] = json.loads(out.read_text())
    assert users[USERS[0]]["embeddings"] != users[USERS[1]]["embeddings"]

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "fed-userllm"), "serve", "--model",
                               str(tmp_path / "runs" / "latest"), "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.time() + 120
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, server.stdout.read()
                assert time.time() < deadline, "the server did not come up within 120 s"
                time.sleep(0.5)
            answers = {}
            for user, embedding in users.items():
                r = client.post("/v1/generate", json={"user": embedding, "task": "nextitem", "k": 5})
                assert r.status_code == 200, r.text
                answers[user] = [item["id"] for item in r.json()["items"]]
                assert len(answers[user]) == 5 and r.json()["text"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answers[USERS[0]] != answers[USERS[1]]
