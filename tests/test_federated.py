"""The Flower app in-process: client replies, aggregation, DP-SGD accounting, resume, failures, bad configs.

`LocalGrid` is a real ``flwr.serverapp.Grid`` whose nodes run the real ClientApp in this process (one
Context per node, like the simulation engine keeps), so the ServerApp's round loop runs unchanged.
"""

import json
import logging
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_fixtures import PINNED, TINY_FEDERATION, USERS, crash_after_release_of_round_2
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fed_userllm.clients import client_app as client_app_module
from fed_userllm.clients.client_app import app as client_app
from fed_userllm.clients.task import get_arrays, initial_encoder, load_data, train_local
from fed_userllm.eval.evaluate import evaluation_sums
from fed_userllm.eval.ranking import finalize
from fed_userllm.models import load_pretrained
from fed_userllm.models.layers import DEFAULT_FEATURE_DIMS
from fed_userllm.privacy import LedgerError, PrivacyBudgetExceeded, audit, default_delta, epsilon_from_history
from fed_userllm.privacy.budget import resolve_privacy
from fed_userllm.server import runner
from fed_userllm.server import strategy as strategy_module
from fed_userllm.server.local_grid import FIRST_NODE, LocalGrid, app_defaults
from fed_userllm.server.phases import PHASES
from fed_userllm.server.runner import run
from fed_userllm.server.strategy import build_strategy, load_strategy_state, strategy_state
from fed_userllm.train.federated_config import PHASE_NAMES, FederatedConfig

DEFAULTS = app_defaults()
TINY = {**TINY_FEDERATION, **PINNED, "num-rounds": 2, "eval-every": 1, "eval-fraction": 0.5, "dp-seed": 7,
        "phases": "pretrain"}  # LLM phase: its own file


def run_config(tmp_path: Path, **overrides) -> dict:
    """The app's default run config with tiny settings and ``overrides`` (kebab-case keys via ``_``)."""
    return {**DEFAULTS, **TINY, "run-dir": str(tmp_path / "run"),
            **{k.replace("_", "-"): v for k, v in overrides.items()}}


class InProcessGrid(LocalGrid):
    """A `LocalGrid` that records what it sends; after ``crash_after`` train messages it raises (a crash);
    ``alter(message, reply)`` replaces replies (a client that misbehaves)."""

    def __init__(self, config: dict, num_nodes: int = USERS, crash_after: int | None = None,
                 alter: Callable[[Message, Message], Message] | None = None) -> None:
        super().__init__(config, num_nodes)
        self.crash_after = crash_after
        self.alter = alter
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.batches: list[int] = []  # messages per send_and_receive call

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        self.batches.append(len(messages))
        self.sent += messages
        trained = sum(m.metadata.message_type.startswith("train") for m in self.sent)
        if self.crash_after is not None and trained > self.crash_after:
            raise KeyboardInterrupt("server crashed mid-round")
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.alter is not None:
            sent = {m.metadata.message_id: m for m in messages}
            replies = [self.alter(sent[r.metadata.reply_to_message_id], r) for r in replies]
        self.replies += replies
        return replies


def call_client(config: dict, message_type: str, content: RecordDict, partition: int = 0,
                state: RecordDict | None = None) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    context = Context(run_id=1, node_id=5, node_config={"partition-id": partition, "num-partitions": USERS},
                      state=state if state is not None else RecordDict(), run_config=config)
    return client_app(Message(content, dst_node_id=5, message_type=message_type), context)


def global_model(config: dict) -> torch.nn.Module:
    cfg = FederatedConfig.from_run_config(config)
    return initial_encoder(cfg, load_data(cfg.data.dataset, cfg.data.max_len).vocab_sizes)


@pytest.mark.parametrize("seen_offset", [False, True])
def test_the_app_encoder_has_the_seen_offset_its_setting_says(tmp_path, seen_offset):
    model = global_model(run_config(tmp_path, seen_offset=seen_offset))
    assert model.config.seen_offset is seen_offset
    assert ("seen.weight" in get_arrays(model)) is seen_offset  # trained and exchanged like the other tensors


def train_content(model: torch.nn.Module, noise_multiplier: float = 0.0, delta: float = 1e-3) -> RecordDict:
    return RecordDict({"arrays": get_arrays(model), "config": ConfigRecord(
        {"server-round": 1, "noise-multiplier": noise_multiplier, "delta": delta})})


def is_scalar(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.parametrize("dp", ["none", "user", "sample"])
def test_train_reply_holds_only_the_model_parameters_and_scalar_counts(tmp_path, dp):
    config = run_config(tmp_path, dp=dp)
    model = global_model(config)
    reply = call_client(config, "train.pretrain", train_content(model, noise_multiplier=1.0))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics"}
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    assert not content.config_records
    params = dict(model.named_parameters())
    arrays = content["arrays"]
    assert set(arrays.keys()) == set(params)  # exactly the parameters: the tied item table travels once
    assert "unembed.item.weight" not in arrays.keys()
    assert all(tuple(arrays[k].shape) == tuple(p.shape) for k, p in params.items())
    metrics = content["metrics"]
    # under DP-SGD the server is the adversary: only what its ledger needs, no loss or example count in the clear
    expected = {"partition-id", "dp-sample-rate", "steps"} if dp == "sample" else {"num-examples", "train-loss",
                                                                                   "steps"}
    assert set(metrics.keys()) == expected
    assert all(is_scalar(v) for v in metrics.values())  # no lists: nothing per window or per item
    seq = load_data(FederatedConfig.from_run_config(config).data.dataset, 8)
    windows = len(seq.windows(np.array([0])))
    if dp == "sample":
        assert metrics["dp-sample-rate"] == 1 / math.ceil(windows / 4) and metrics["partition-id"] == 0
    else:
        assert metrics["num-examples"] == windows
    assert not any(np.array_equal(arrays[k].numpy(), p.detach().numpy()) for k, p in params.items()
                   if p.requires_grad and k.startswith("embed.item"))  # it trained


def test_evaluate_and_describe_replies_are_aggregate_counts(tmp_path):
    config = run_config(tmp_path)
    model = global_model(config)
    config_record = ConfigRecord({"split": "test", "server-round": 1})
    content = RecordDict({"arrays": get_arrays(model), "config": config_record})
    reply = call_client(config, "evaluate.pretrain", content, partition=3)
    assert set(reply.content.keys()) == {"metrics"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) <= {"recall@1", "recall@5", "recall@10", "ndcg@10", "n", "fav_genre"}
    assert metrics["n"] == 1 and all(is_scalar(v) and 0 <= v <= 1 for v in metrics.values())
    described = call_client(config, "query.describe", RecordDict()).content["federation"]
    seq = load_data(FederatedConfig.from_run_config(config).data.dataset, 8)
    assert dict(described) == {"num-clients": USERS, "num-examples": len(seq.windows()),
                               **{f"vocab-{k}": v for k, v in seq.vocab_sizes.items()}}


def test_client_rejects_a_partition_outside_the_data(tmp_path):
    with pytest.raises(ValueError, match=f"num-supernodes={USERS}"):
        call_client(run_config(tmp_path), "train.pretrain", train_content(global_model(run_config(tmp_path))),
                    partition=USERS)


def client_round(config: dict, q: float, dp: str, noise_multiplier: float = 0.0, clip_norm: float = math.inf,
                 strategy: str = "fedavg"):
    """One configured + aggregated training round of the real strategy over an InProcessGrid."""
    cfg = FederatedConfig.from_run_config({**config, "fraction-train": q, "dp": dp, "noise-multiplier": 1.0,
                                           "strategy": strategy})
    strategy = build_strategy(cfg.pretrain, cfg.dp, seed=3, noise_multiplier=noise_multiplier)
    if dp == "user":
        strategy.clip_norm = clip_norm
    strategy.message_type = "train.pretrain"
    grid = InProcessGrid(config)
    arrays = get_arrays(global_model(config))
    train_config = ConfigRecord({"noise-multiplier": 0.0, "delta": 0.0})
    messages = strategy.configure_train(1, arrays, train_config, grid)
    replies = grid.send_and_receive(messages)
    new, _ = strategy.aggregate_train(1, replies)
    return arrays, replies, new


@pytest.mark.parametrize("dp", ["none", "sample"])
def test_fedavg_round_is_the_example_weighted_mean_of_client_models(tmp_path, dp):
    """Without DP weighted by example counts; under DP-SGD, which sends none, by the DP-SGD step counts."""
    arrays, replies, new = client_round(run_config(tmp_path, batch_size=1), q=1.0, dp=dp)
    assert len(replies) == USERS  # q = 1: everybody
    key = "steps" if dp == "sample" else "num-examples"
    weights = np.array([r.content["metrics"][key] for r in replies], dtype=float)
    assert len(set(weights)) > 1  # unequal client sizes, so weighting matters
    for key in arrays.keys():
        stacked = np.stack([r.content["arrays"][key].numpy() for r in replies])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_user_dp_round_without_noise_is_the_uniform_mean_over_the_expected_cohort(tmp_path):
    q = 0.5
    arrays, replies, new = client_round(run_config(tmp_path), q=q, dp="user", noise_multiplier=0.0)
    assert 0 < len(replies) < USERS and len(replies) != q * USERS  # the realised cohort is not q*N here
    for key in arrays.keys():
        base = arrays[key].numpy().astype(np.float64)
        deltas = sum(r.content["arrays"][key].numpy() - base for r in replies)
        np.testing.assert_allclose(new[key].numpy(), base + deltas / (q * USERS), rtol=1e-5, atol=1e-6)


def test_fedadam_takes_its_adam_step_on_the_dp_average(tmp_path):
    config = run_config(tmp_path)
    q, eta, tau = 0.5, config["server-lr"], config["server-tau"]
    arrays, replies, new = client_round(config, q=q, dp="user", strategy="fedadam")
    eta_norm = eta * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)  # Adam's bias correction in round 1
    for key in arrays.keys():
        base = arrays[key].numpy().astype(np.float64)
        average = sum(r.content["arrays"][key].numpy() - base for r in replies) / (q * USERS)
        m, v = 0.1 * average, 0.01 * average ** 2  # first moments after one step (beta1=0.9, beta2=0.99)
        np.testing.assert_allclose(new[key].numpy(), base + eta_norm * m / (np.sqrt(v) + tau), rtol=1e-4,
                                   atol=1e-6)


def test_fedavgm_takes_a_server_sgd_step_on_the_dp_average_and_keeps_its_momentum(tmp_path):
    """Server SGD with momentum: round 1 moves by lr x the DP average; the momentum buffer is that average and
    survives a resume (strategy_state / load_strategy_state)."""
    config = run_config(tmp_path, server_lr=3.0)
    q = 0.5
    arrays, replies, new = client_round(config, q=q, dp="user", strategy="fedavgm")
    cfg = FederatedConfig.from_run_config({**config, "strategy": "fedavgm"})
    for key in arrays.keys():
        base = arrays[key].numpy().astype(np.float64)
        average = sum(r.content["arrays"][key].numpy() - base for r in replies) / (q * USERS)
        np.testing.assert_allclose(new[key].numpy(), base + 3.0 * average, rtol=1e-4, atol=1e-6)
    strategy = build_strategy(cfg.pretrain, cfg.dp, seed=3, noise_multiplier=0.0)
    strategy.momentum_vector = [np.ones(2)]
    fresh = build_strategy(cfg.pretrain, cfg.dp, seed=3, noise_multiplier=0.0)
    load_strategy_state(fresh, strategy_state(strategy))
    assert np.array_equal(fresh.momentum_vector[0], np.ones(2))


def test_fedadam_tau_is_the_configured_adaptivity_floor(tmp_path):
    cfg = FederatedConfig.from_run_config({**run_config(tmp_path), "strategy": "fedadam", "server-tau": 0.05})
    assert build_strategy(cfg.pretrain, cfg.dp, seed=3, noise_multiplier=0.0).tau == 0.05
    with pytest.raises(ValueError, match="server-tau"):
        FederatedConfig.from_run_config({**run_config(tmp_path), "server-tau": 0.0})


def test_poisson_cohorts_are_seeded_and_vary_in_size(tmp_path):
    config = run_config(tmp_path)
    cfg = FederatedConfig.from_run_config({**config, "fraction-train": 0.5})
    grid = InProcessGrid(config)

    def cohorts(seed: int) -> list[list[int]]:
        strategy = build_strategy(cfg.pretrain, cfg.dp, seed, 1.0)
        rounds = [strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid) for r in range(1, 6)]
        return [sorted(m.metadata.dst_node_id for m in messages) for messages in rounds]

    assert cohorts(1) == cohorts(1) != cohorts(2)
    assert len({len(c) for c in cohorts(1)}) > 1


def test_a_sample_level_client_refuses_a_round_past_its_budget_before_training(tmp_path, monkeypatch):
    sigma, delta, partition = 1.0, 1e-3, 2
    config = run_config(tmp_path, dp="sample", local_steps=2)
    cfg = FederatedConfig.from_run_config(config)
    seq = load_data(cfg.data.dataset, cfg.data.max_len)
    q = 1 / math.ceil(len(seq.windows(np.array([partition]))) / cfg.pretrain.batch_size)
    one, two = (epsilon_from_history([(sigma, q, 2 * r)], delta) for r in (1, 2))
    config = {**config, "target-epsilon": (one + two) / 2}  # the first round fits, the second does not
    trained = []
    monkeypatch.setattr(client_app_module, "train_local", lambda *a, **k: trained.append(1) or train_local(*a, **k))
    state = RecordDict()  # the node's local state: its own DP-SGD history
    model = global_model(config)
    reply = call_client(config, "train.pretrain", train_content(model, sigma, delta), partition, state)
    assert reply.content["metrics"]["steps"] == 2 and reply.content["metrics"]["dp-sample-rate"] == q
    assert len(trained) == 1 and list(state["dp-sgd"]["steps"]) == [2]
    with pytest.raises(PrivacyBudgetExceeded, match=f"client {partition} refuses round 2: .* > target-epsilon"):
        call_client(config, "train.pretrain", train_content(model, sigma, delta), partition, state)
    assert len(trained) == 1 and list(state["dp-sgd"]["steps"]) == [2]  # refused before training


def test_sample_level_delta_comes_from_the_training_windows_and_user_level_delta_from_the_clients(tmp_path):
    for dp, units in (("sample", 1_000_000), ("user", 1_000)):
        cfg = FederatedConfig.from_run_config(run_config(tmp_path, dp=dp))
        assert resolve_privacy(cfg, num_clients=1_000, num_examples=1_000_000).delta == default_delta(units)
    assert default_delta(1_000_000) == pytest.approx(1e-6 ** 1.1) and default_delta(1_000) == 1e-5


def test_a_sample_level_run_sends_no_evaluation_nor_loss_or_example_counts(tmp_path):
    config = run_config(tmp_path, dp="sample", eval_every=1, fraction_train=1.0, num_rounds=1)
    grid = InProcessGrid(config)
    run_dir = run(grid, FederatedConfig.from_run_config(config))
    assert {m.metadata.message_type for m in grid.sent} == {"query.describe", "train.pretrain"}
    results = json.loads((run_dir / "results.json").read_text())["pretrain"]
    assert results["test"] is None and "not run under dp='sample'" in results["privacy"]
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not {"train_loss", "num_examples"} & set(record) and not any(k.startswith("val_") for k in record)
    seq = load_data(FederatedConfig.from_run_config(config).data.dataset, 8)
    assert json.loads((run_dir / "config.json").read_text())["privacy"]["delta"] == default_delta(len(seq.windows()))
    assert audit(run_dir).ok


def ledger_rounds(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "privacy_ledger.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("time", "hash")} for line in lines[1:]]


def test_resume_after_an_interrupted_round_matches_an_uninterrupted_run(tmp_path):
    common = {"dp": "user", "fraction-train": 0.5, "num-rounds": 3, "eval-every": 2}
    whole = run_config(tmp_path / "whole", **common)
    run(InProcessGrid(whole), FederatedConfig.from_run_config(whole))

    broken = run_config(tmp_path / "broken", **common)
    grid = InProcessGrid(broken, crash_after=8)  # dies during round 2 (round 1 sends ~6 train messages)
    with pytest.raises(KeyboardInterrupt):
        run(grid, FederatedConfig.from_run_config(broken))
    run_dir = Path(broken["run-dir"])
    assert 1 <= len(ledger_rounds(run_dir)) < 3 and not (run_dir / "final").exists()
    resumed = {**broken, "resume": True}
    run(InProcessGrid(resumed), FederatedConfig.from_run_config(resumed))

    assert ledger_rounds(run_dir) == ledger_rounds(Path(whole["run-dir"]))
    spent = [r["epsilon"] for r in ledger_rounds(run_dir)]
    assert spent == sorted(spent) and len(spent) == 3
    a = load_file(run_dir / "final" / "model.safetensors")
    b = load_file(Path(whole["run-dir"]) / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert audit(run_dir).ok


def test_a_round_charged_but_not_checkpointed_is_not_charged_again_on_resume(tmp_path, monkeypatch):
    common = {"dp": "user", "fraction-train": 0.5, "num-rounds": 3}
    whole = run_config(tmp_path / "whole", **common)
    run(InProcessGrid(whole), FederatedConfig.from_run_config(whole))

    broken = run_config(tmp_path / "broken", **common)
    undo = crash_after_release_of_round_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(InProcessGrid(broken), FederatedConfig.from_run_config(broken))
    undo()
    run_dir = Path(broken["run-dir"])
    assert len(ledger_rounds(run_dir)) == 2  # round 2 charged, its checkpoint never written
    resumed = {**broken, "resume": True}
    run(InProcessGrid(resumed), FederatedConfig.from_run_config(resumed))
    assert ledger_rounds(run_dir) == ledger_rounds(Path(whole["run-dir"]))  # 3 rounds, none twice
    assert audit(run_dir).ok


def test_a_redone_round_that_releases_something_else_is_charged_again(tmp_path, monkeypatch):
    """Crash between the release of round 2 and its checkpoint; on resume another client fails in round 2
    (as many successes as before, other ones), so the redone round is a different release: charged again."""
    config = run_config(tmp_path, dp="user", fraction_train=1.0, num_rounds=3, eval_every=0)
    sigma, q = config["noise-multiplier"], 1.0

    def fails_in_round_2(node: int) -> Callable[[Message, Message], Message]:
        def alter(message: Message, reply: Message) -> Message:
            if message.metadata.dst_node_id == node and message.metadata.group_id == "2":
                return Message(Error(code=1, reason="device went away"), reply_to=message)
            return reply
        return alter

    undo = crash_after_release_of_round_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(InProcessGrid(config, alter=fails_in_round_2(FIRST_NODE)), FederatedConfig.from_run_config(config))
    undo()
    run_dir = Path(config["run-dir"])
    charged = ledger_rounds(run_dir)
    assert len(charged) == 2

    resumed = {**config, "resume": True}
    run(InProcessGrid(resumed, alter=fails_in_round_2(FIRST_NODE + 7)), FederatedConfig.from_run_config(resumed))
    rounds = ledger_rounds(run_dir)
    assert rounds[:2] == charged  # the orphaned charge stays, and the redone round 2 is charged on top of it
    assert len(rounds) == 4
    delta = json.loads((run_dir / "config.json").read_text())["privacy"]["delta"]
    assert [r["epsilon"] for r in rounds] == pytest.approx([epsilon_from_history([(sigma, q, n)], delta)
                                                          for n in (1, 2, 3, 4)], rel=1e-12)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["clients_succeeded"]) for m in metrics] == [(1, USERS), (2, USERS - 1), (3, USERS)]
    assert audit(run_dir).ok
    assert rounds[2]["release"] != charged[1]["release"] and len({r["release"] for r in rounds}) == 4


@pytest.mark.slow
def test_killing_the_server_process_and_resuming_equals_an_uninterrupted_run(tmp_path):
    common = {"dp": "user", "fraction-train": 0.5, "num-rounds": 8, "eval-every": 0}
    whole = run_config(tmp_path / "whole", **common)
    run(InProcessGrid(whole), FederatedConfig.from_run_config(whole))

    killed = run_config(tmp_path / "killed", **common)
    run_dir = Path(killed["run-dir"])
    code = ("import json; from fed_userllm.server.local_grid import run_local; "
            f"run_local(json.loads({json.dumps(killed)!r}))")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() and server.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)  # mid-run: anywhere between two rounds' metrics lines
    finally:
        server.kill()
        server.wait()
    assert not (run_dir / "results.json").exists(), "the server finished before it was killed"
    resumed = {**killed, "resume": True}
    run(InProcessGrid(resumed), FederatedConfig.from_run_config(resumed))

    assert ledger_rounds(run_dir) == ledger_rounds(Path(whole["run-dir"]))
    a = load_file(run_dir / "final" / "model.safetensors")
    b = load_file(Path(whole["run-dir"]) / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert audit(run_dir).ok


def test_failed_clients_are_recorded_and_only_successful_ones_count(tmp_path):
    config = run_config(tmp_path, dp="none", fraction_train=1.0, num_rounds=2, fault_rate=0.3,
                        max_failure_fraction=0.6)
    grid = InProcessGrid(config)
    run(grid, FederatedConfig.from_run_config(config))
    records = [json.loads(line) for line in (Path(config["run-dir"]) / "metrics.jsonl").read_text().splitlines()]
    cfg = FederatedConfig.from_run_config(config)
    seq = load_data(cfg.data.dataset, cfg.data.max_len)
    for record in records:
        replies = [r for r in grid.replies if r.metadata.group_id == str(record["round"])]
        failed = [r for r in replies if r.has_error()]
        assert record["clients_failed"] == len(failed) > 0 and record["attempts"] == 1
        assert record["clients_succeeded"] == len(replies) - len(failed) == record["clients_sampled"] - len(failed)
        assert all("injected fault" in r.error.reason for r in failed)
        succeeded = [int(r.content["metrics"]["num-examples"]) for r in replies if not r.has_error()]
        assert record["num_examples"] == sum(succeeded) < len(seq.windows(np.arange(USERS)))


def _tamper(case: str, dp: str) -> Callable[[dict, dict], str]:
    """Changes one client's reply (its arrays and metrics, in place) as ``case`` says; returns the expected reason."""
    first = "embed.item.weight"

    def tamper(arrays: dict, metrics: dict) -> str:
        if case in ("nan", "inf"):
            arrays[first] = arrays[first].copy()
            arrays[first].flat[3] = np.nan if case == "nan" else -np.inf
            return f"tensor '{first}' holds 1 NaN or infinite values"
        if case == "missing-tensor":
            del arrays[first]
            return f"missing \\['{first}'\\]"
        if case == "extra-tensor":
            arrays["backdoor"] = np.ones(3, np.float32)
            return "unexpected \\['backdoor'\\]"
        if case == "shape":
            arrays[first] = arrays[first][:-1]
            return f"tensor '{first}' is float32 \\({arrays[first].shape[0]}, "
        if case == "dtype":
            arrays[first] = arrays[first].astype(np.float64)
            return f"tensor '{first}' is float64"
        if case == "missing-metric":
            key = "dp-sample-rate" if dp == "sample" else "num-examples"
            del metrics[key]
            return f"metric '{key}' is missing"
        arrays[first] = arrays[first] + 1e5  # case "absurd-norm"
        return "update norm .* > max-update-norm=1000"

    return tamper


def _misbehaving_client(tamper: Callable[[dict, dict], str] | None, reasons: list[str]):
    """A grid hook: partition 0's training replies are tampered with (or, with None, become plain errors)."""
    def alter(message: Message, reply: Message) -> Message:
        if message.metadata.dst_node_id != FIRST_NODE or not message.metadata.message_type.startswith("train"):
            return reply
        if tamper is None:
            return Message(Error(code=1, reason="device went away"), reply_to=message)
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        metrics = dict(reply.content["metrics"])
        reasons.append(tamper(arrays, metrics))
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                   "metrics": MetricRecord(metrics)}), reply_to=message)
    return alter


def _final_arrays(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def plain_failure_models(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Final models of one-round runs in which partition 0 fails outright (user DP and no DP, seeded)."""
    models = {}
    for dp in ("none", "user"):
        config = run_config(tmp_path_factory.mktemp(dp), dp=dp, fraction_train=1.0, num_rounds=1, eval_every=0)
        run(InProcessGrid(config, alter=_misbehaving_client(None, [])), FederatedConfig.from_run_config(config))
        models[dp] = _final_arrays(Path(config["run-dir"]))
    return models


@pytest.mark.parametrize("dp", ["none", "user", "sample"])
@pytest.mark.parametrize("case", ["nan", "inf", "missing-tensor", "extra-tensor", "shape", "dtype", "missing-metric",
                                  "absurd-norm"])
def test_a_malformed_or_non_finite_reply_is_a_failed_client_never_aggregated(tmp_path, caplog, plain_failure_models,
                                                                           case, dp):
    config = run_config(tmp_path, dp=dp, fraction_train=1.0, num_rounds=1, eval_every=0)
    reasons = []
    run_dir = run(InProcessGrid(config, alter=_misbehaving_client(_tamper(case, dp), reasons)),
                  FederatedConfig.from_run_config(config))
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (record["clients_sampled"], record["clients_succeeded"], record["clients_failed"]) == (USERS, USERS - 1, 1)
    (reason,) = reasons
    assert any(re.search(f"node {FIRST_NODE} failed: .*{reason}", r.getMessage()) for r in caplog.records), reason
    final = _final_arrays(run_dir)
    assert all(torch.isfinite(t).all() for t in final.values())
    if dp != "sample":  # DP-SGD draws its noise from the OS: no bit-identical reference run
        reference = plain_failure_models[dp]  # the tampered reply had exactly the influence of no reply
        assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    if dp != "none":
        assert audit(run_dir).ok and len(audit(run_dir).rounds) == 1


def test_a_non_finite_aggregate_is_neither_charged_nor_released(tmp_path, monkeypatch):
    real = strategy_module.aggregate_dp_fedavg

    def overflowing(*args, **kwargs):
        new, stats = real(*args, **kwargs)
        new[0] = np.full_like(new[0], np.inf)
        return new, stats

    monkeypatch.setattr(strategy_module, "aggregate_dp_fedavg", overflowing)
    config = run_config(tmp_path, dp="user", num_rounds=1)
    with pytest.raises(RuntimeError, match="round 1: the aggregated model holds NaN or infinite values"):
        run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    run_dir = Path(config["run-dir"])
    assert ledger_rounds(run_dir) == [] and not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "final").exists()


def test_clients_that_answer_after_the_deadline_are_failures(tmp_path):
    config = run_config(tmp_path, dp="none", fraction_train=1.0, num_rounds=1, eval_every=0, fault_rate=0.25,
                        fault_kind="hang", round_timeout=1.0, max_failure_fraction=0.6)
    run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    (record,) = [json.loads(line) for line in (Path(config["run-dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert record["clients_failed"] > 0 and record["clients_succeeded"] == USERS - record["clients_failed"]


@pytest.mark.parametrize("policy", ["skip", "stop", "retry"])
def test_a_round_with_too_many_failures_is_skipped_retried_or_stops(tmp_path, policy):
    config = run_config(tmp_path, dp="user", fraction_train=1.0, num_rounds=1, eval_every=0, fault_rate=0.9,
                        max_failure_fraction=0.2, on_short_round=policy)
    grid = InProcessGrid(config)
    if policy == "skip":
        run(grid, FederatedConfig.from_run_config(config))
        (record,) = [json.loads(line) for line in (Path(config["run-dir"]) / "metrics.jsonl").read_text()
                     .splitlines()]
        assert record["skipped"] and "epsilon" not in record  # nothing released, nothing charged
        final = load_pretrained(Path(config["run-dir"]) / "final")
        start = global_model(config)
        assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), start.state_dict().values(),
                                                     strict=True))
        return
    with pytest.raises(RuntimeError, match=f"on-short-round={policy}"):
        run(grid, FederatedConfig.from_run_config(config))
    attempts = 3 if policy == "retry" else 1
    assert sum(m.metadata.message_type.startswith("train") for m in grid.sent) == attempts * USERS
    assert ledger_rounds(Path(config["run-dir"])) == []  # no round released


def test_rounds_beyond_a_fixed_noise_budget_fail_before_training(tmp_path):
    config = run_config(tmp_path, dp="user", noise_multiplier=0.5, target_epsilon=1.0, num_rounds=50)
    with pytest.raises(ValueError, match="num-rounds=50 .* exceeds the privacy budget"):
        run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    assert not (Path(config["run-dir"]) / "metrics.jsonl").exists()


def test_resume_refuses_a_ledger_that_lost_charged_rounds(tmp_path):
    config = run_config(tmp_path, dp="user", fraction_train=1.0, num_rounds=3)
    with pytest.raises(KeyboardInterrupt):
        run(InProcessGrid(config, crash_after=USERS + 2), FederatedConfig.from_run_config(config))
    ledger = Path(config["run-dir"]) / "privacy_ledger.jsonl"
    header = ledger.read_text().splitlines(keepends=True)[0]
    ledger.write_text(header)  # a valid chain, but round 1 (in the checkpoint) is gone
    resumed = {**config, "resume": True}
    with pytest.raises(LedgerError, match="truncated or replaced"):
        run(InProcessGrid(resumed), FederatedConfig.from_run_config(resumed))


def test_run_directory_holds_config_metrics_checkpoint_model_ledger_and_plots(tmp_path):
    config = run_config(tmp_path, dp="user", strategy="fedadam", noise_multiplier=0.0, target_epsilon=20.0,
                        server_lr_schedule="cosine")
    run_dir = run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["num_clients"] == USERS and saved["settings"]["pretrain"]["strategy"] == "fedadam"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    eta = config["server-lr"]
    assert [r["server_lr"] for r in records] == pytest.approx([eta, eta / 2])  # cosine over 2 rounds
    for record in records:
        assert {"train_loss", "epsilon", "delta", "round_seconds", "bytes_sent", "bytes_received",
                "val_recall@10", "val_ndcg@10", "clients_sampled"} <= set(record)
        assert record["bytes_sent"] > 0 and record["epsilon"] <= 20.0
    assert saved["privacy"]["noise_multiplier"] > 0  # calibrated to the target
    assert records[-1]["epsilon"] == pytest.approx(20.0, rel=0.05)  # all planned rounds spend ~ the budget
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert "dp_seed" not in ckpt  # the run is complete: the secret seed is gone
    assert {v.dtype for v in ckpt["arrays"].values()} == {np.dtype(np.float32)}  # not FedAdam's float64
    model = load_pretrained(run_dir / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    results = json.loads((run_dir / "results.json").read_text())["pretrain"]["test"]
    seq = load_data(FederatedConfig.from_run_config(config).data.dataset, 8)
    central = finalize(evaluation_sums(model, seq, "test"))  # what a server holding all histories would get
    assert results == pytest.approx(central) and results["n"] == USERS
    report = audit(run_dir)
    assert report.ok and len(report.rounds) == 2
    assert (run_dir / "metrics.png").stat().st_size > 0 and (run_dir / "epsilon.png").stat().st_size > 0
    assert "Result: OK" in (run_dir / "privacy_report.txt").read_text()


def test_a_finished_run_directory_is_not_overwritten(tmp_path):
    config = run_config(tmp_path, dp="none", num_rounds=1, eval_every=0)
    run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    with pytest.raises(FileExistsError, match="resume=true"):
        run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    changed = {**config, "resume": True, "lr": 0.1}
    with pytest.raises(ValueError, match="'lr'"):
        run(InProcessGrid(changed), FederatedConfig.from_run_config(changed))


def test_every_configurable_phase_has_a_runner_phase_and_client_handlers():
    assert set(PHASES) == set(PHASE_NAMES)
    for phase in PHASES.values():
        for message_type in (phase.train_type, phase.evaluate_type):
            category, action = message_type.split(".")
            assert f"{category}.{action}" in client_app._registered_funcs


def test_messages_go_out_in_batches_of_max_in_flight(tmp_path):
    config = run_config(tmp_path, dp="none", fraction_train=1.0, num_rounds=1, eval_every=1,
                        eval_fraction=1.0, max_in_flight=5)
    grid = InProcessGrid(config)
    run(grid, FederatedConfig.from_run_config(config))
    assert grid.batches == [1] + [5, 5, 2] * 3  # describe, then train, validation and test of 12 clients
    metrics = (Path(config["run-dir"]) / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[0])["clients_succeeded"] == USERS


def test_local_grid_push_then_pull_returns_each_reply_once(tmp_path):
    config = run_config(tmp_path)
    grid = LocalGrid(config, USERS)
    nodes = grid.get_node_ids()[:3]
    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query.describe")
                                   for n in nodes]))
    assert len(set(ids)) == 3
    replies = list(grid.pull_messages(ids))
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(nodes)
    assert all(int(r.content["federation"]["num-clients"]) == USERS for r in replies)
    assert list(grid.pull_messages(ids)) == []  # pulled once


def test_server_refuses_a_federation_with_the_wrong_number_of_nodes(tmp_path):
    config = run_config(tmp_path)
    with pytest.raises(RuntimeError, match=f'num-supernodes={USERS}'):
        run(InProcessGrid(config, num_nodes=2), FederatedConfig.from_run_config(config))
    assert not Path(config["run-dir"]).exists()  # nothing trained, nothing written


@pytest.mark.parametrize("key,value", [
    ("fraction-train", 1.5), ("fraction-train", 0.0), ("noise-multiplier", -1.0), ("clip-norm", 0.0),
    ("strategy", "fedsgd"), ("dp", "both"), ("dataset", "no-such-dataset"), ("model", "gpt"),
    ("phases", "pretrain,finetune"), ("accountant", "gdp"), ("num-rounds", 0), ("lr", "fast"),
    ("target-delta", 1.0), ("d-model", 31), ("fault-rate", 1.0), ("fault-kind", "slow"),
    ("max-failure-fraction", 1.0), ("on-short-round", "ignore"), ("test-fraction", 0.0),
])
def test_bad_settings_fail_fast_naming_the_setting(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"^{key}="):
        FederatedConfig.from_run_config(run_config(tmp_path, **{key: value}))


def test_unknown_and_missing_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="learning-rate"):
        FederatedConfig.from_run_config({**run_config(tmp_path), "learning-rate": 0.1})
    config = run_config(tmp_path)
    del config["clip-norm"]
    with pytest.raises(ValueError, match="clip-norm"):
        FederatedConfig.from_run_config(config)


def test_user_dp_needs_noise_or_a_target(tmp_path):
    with pytest.raises(ValueError, match="^noise-multiplier="):
        FederatedConfig.from_run_config(run_config(tmp_path, dp="user", noise_multiplier=0.0))
    config = run_config(tmp_path, dp="user", noise_multiplier=0.0, target_epsilon=5.0)
    cfg = FederatedConfig.from_run_config(config)
    assert cfg.dp.target_epsilon == 5.0


@pytest.mark.parametrize("model", ["ar", "dual", "bert4rec"])
def test_every_encoder_builds_with_the_configured_item_width(tmp_path, model):
    encoder = global_model(run_config(tmp_path, model=model, item_dim=8))
    assert encoder.config.feature_dims["item"] == 8
    assert all(dim == DEFAULT_FEATURE_DIMS[f] for f, dim in encoder.config.feature_dims.items() if f != "item")


def test_each_round_logs_one_readable_progress_line(tmp_path, caplog):
    config = run_config(tmp_path, dp="user", num_rounds=2, eval_every=1)
    with caplog.at_level(logging.INFO):
        run_dir = run(InProcessGrid(config), FederatedConfig.from_run_config(config))
    lines = [r.getMessage() for r in caplog.records if "] round " in r.getMessage()]
    line = (r"fed-userllm: \[pretrain\] round {}/2  epsilon [\d.]+  loss [\d.]+  val recall@10 [\d.]+  [\d.]+ s  "
            r"ETA \S+$")
    assert len(lines) == 2 and all(re.match(line.format(i + 1), text) for i, text in enumerate(lines)), lines
    assert lines[-1].endswith("ETA 0:00:00")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"update_norm_mean", "bytes_sent", "clients_sampled"} <= set(records[0])  # the details stay there


def test_the_progress_line_says_phase_round_epsilon_loss_seconds_and_eta():
    record = {"round": 2, "epsilon": 1.23456, "train_loss": 3.21098, "round_seconds": 10.04, "val_recall@10": 0.25,
              "bytes_sent": 123, "local_steps": 8}
    assert runner.progress_line("pretrain", 2, 5, record, 12.0) == (
        "[pretrain] round 2/5  epsilon 1.23  loss 3.211  val recall@10 0.2500  10.0 s  ETA 0:00:36")
    assert runner.progress_line("popularity", 4, 4, {"round_seconds": 1.0, "skipped": True}, 1.0) == (
        "[popularity] round 4/4  skipped (short round)  1.0 s  ETA 0:00:00")
