"""The Flower app in-process: client replies, aggregation, DP-SGD accounting, resume, failures, bad configs.

`LocalGrid` is a real ``flwr.serverapp.Grid`` whose nodes run the real ClientApp in this process (one
Context per node, like the simulation engine keeps), so the ServerApp's round loop runs unchanged.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fed_userllm.clients.app import app as client_app
from fed_userllm.clients.config import PHASE_NAMES, FederatedConfig
from fed_userllm.clients.task import build_model, get_arrays, load_data
from fed_userllm.eval.evaluate import evaluation_sums
from fed_userllm.eval.ranking import finalize
from fed_userllm.models import load_pretrained
from fed_userllm.models.layers import DEFAULT_FEATURE_DIMS
from fed_userllm.privacy import LedgerError, audit
from fed_userllm.server import runner
from fed_userllm.server.local_grid import LocalGrid, app_defaults
from fed_userllm.server.runner import PHASES, run
from fed_userllm.server.strategy import build_strategy, load_strategy_state, strategy_state

DEFAULTS = app_defaults()
USERS = 12
TINY = {"dataset": f"synthetic:users={USERS},items=40,genres=4,events=12", "max-len": 8, "d-model": 16,
        "n-layers": 1, "n-heads": 2, "item-dim": 8, "num-rounds": 2, "batch-size": 4, "lr": 0.5,
        "eval-every": 1, "eval-fraction": 0.5, "dp-seed": 7, "phases": "pretrain"}  # LLM phase: its own file
# The values these tests were written for (the app's defaults are a DP recipe sized for 610 users).
TINY |= {"item-features": "learned", "local-steps": 0, "server-lr": 0.1, "server-tau": 0.001, "noise-multiplier": 1.0,
         "target-epsilon": 0.0, "fraction-train": 0.5}


def run_config(tmp_path: Path, **overrides) -> dict:
    """The app's default run config with tiny settings and ``overrides`` (kebab-case keys via ``_``)."""
    return {**DEFAULTS, **TINY, "run-dir": str(tmp_path / "run"),
            **{k.replace("_", "-"): v for k, v in overrides.items()}}


class InProcessGrid(LocalGrid):
    """A `LocalGrid` that records what it sends; after ``crash_after`` train messages it raises (a crash)."""

    def __init__(self, config: dict, num_nodes: int = USERS, crash_after: int | None = None) -> None:
        super().__init__(config, num_nodes)
        self.crash_after = crash_after
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
    return build_model(cfg, load_data(cfg.dataset, cfg.max_len).vocab_sizes)


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
    expected = {"num-examples", "train-loss", "steps"}
    if dp == "sample":
        expected |= {"partition-id", "dp-sample-rate", "epsilon"}
    assert set(metrics.keys()) == expected
    assert all(is_scalar(v) for v in metrics.values())  # no lists: nothing per window or per item
    seq = load_data(FederatedConfig.from_run_config(config).dataset, 8)
    assert metrics["num-examples"] == len(seq.windows(np.array([0])))
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
    seq = load_data(FederatedConfig.from_run_config(config).dataset, 8)
    assert dict(described) == {"num-clients": USERS, **{f"vocab-{k}": v for k, v in seq.vocab_sizes.items()}}


def test_client_rejects_a_partition_outside_the_data(tmp_path):
    with pytest.raises(ValueError, match=f"num-supernodes={USERS}"):
        call_client(run_config(tmp_path), "train.pretrain", train_content(global_model(run_config(tmp_path))),
                    partition=USERS)


def client_round(config: dict, q: float, dp: str, noise_multiplier: float = 0.0, clip_norm: float = math.inf,
                 strategy: str = "fedavg"):
    """One configured + aggregated training round of the real strategy over an InProcessGrid."""
    cfg = FederatedConfig.from_run_config({**config, "fraction-train": q, "dp": dp, "noise-multiplier": 1.0,
                                           "strategy": strategy})
    strategy = build_strategy(cfg, seed=3, noise_multiplier=noise_multiplier)
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


def test_fedavg_round_is_the_example_weighted_mean_of_client_models(tmp_path):
    arrays, replies, new = client_round(run_config(tmp_path), q=1.0, dp="none")
    assert len(replies) == USERS  # q = 1: everybody
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=float)
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
    strategy = build_strategy(cfg, seed=3, noise_multiplier=0.0)
    strategy.momentum_vector = [np.ones(2)]
    fresh = build_strategy(cfg, seed=3, noise_multiplier=0.0)
    load_strategy_state(fresh, strategy_state(strategy))
    assert np.array_equal(fresh.momentum_vector[0], np.ones(2))


def test_fedadam_tau_is_the_configured_adaptivity_floor(tmp_path):
    cfg = FederatedConfig.from_run_config({**run_config(tmp_path), "strategy": "fedadam", "server-tau": 0.05})
    assert build_strategy(cfg, seed=3, noise_multiplier=0.0).tau == 0.05
    with pytest.raises(ValueError, match="server-tau"):
        FederatedConfig.from_run_config({**run_config(tmp_path), "server-tau": 0.0})


def test_poisson_cohorts_are_seeded_and_vary_in_size(tmp_path):
    config = run_config(tmp_path)
    cfg = FederatedConfig.from_run_config({**config, "fraction-train": 0.5})
    grid = InProcessGrid(config)

    def cohorts(seed: int) -> list[list[int]]:
        strategy = build_strategy(cfg, seed, 1.0)
        rounds = [strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid) for r in range(1, 6)]
        return [sorted(m.metadata.dst_node_id for m in messages) for messages in rounds]

    assert cohorts(1) == cohorts(1) != cohorts(2)
    assert len({len(c) for c in cohorts(1)}) > 1


def test_sample_level_dp_reports_finite_epsilon_growing_with_steps(tmp_path):
    model = global_model(run_config(tmp_path))
    eps = {}
    for steps in (1, 4):
        config = run_config(tmp_path, dp="sample", local_steps=steps)
        reply = call_client(config, "train.pretrain", train_content(model, noise_multiplier=1.0), partition=2)
        eps[steps] = reply.content["metrics"]["epsilon"]
        assert reply.content["metrics"]["steps"] == steps
    assert 0 < eps[1] < eps[4] < math.inf
    state = RecordDict()  # the node's local state: a second round adds to the same history
    config = run_config(tmp_path, dp="sample", local_steps=1)
    first, second = (call_client(config, "train.pretrain", train_content(model, 1.0), 2, state)
                     .content["metrics"]["epsilon"] for _ in range(2))
    assert first == pytest.approx(eps[1]) and second > first


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
    real_append = runner.append_jsonl

    def crash_at_round_2(path, record):  # metrics are written after the ledger line, before the checkpoint
        if record.get("round") == 2:
            raise KeyboardInterrupt("server killed between the ledger line and the checkpoint")
        real_append(path, record)

    monkeypatch.setattr(runner, "append_jsonl", crash_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(InProcessGrid(broken), FederatedConfig.from_run_config(broken))
    monkeypatch.setattr(runner, "append_jsonl", real_append)
    run_dir = Path(broken["run-dir"])
    assert len(ledger_rounds(run_dir)) == 2  # round 2 charged, its checkpoint never written
    resumed = {**broken, "resume": True}
    run(InProcessGrid(resumed), FederatedConfig.from_run_config(resumed))
    assert ledger_rounds(run_dir) == ledger_rounds(Path(whole["run-dir"]))  # 3 rounds, none twice
    assert audit(run_dir).ok


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
    seq = load_data(cfg.dataset, cfg.max_len)
    for record in records:
        replies = [r for r in grid.replies if r.metadata.group_id == str(record["round"])]
        failed = [r for r in replies if r.has_error()]
        assert record["clients_failed"] == len(failed) > 0 and record["attempts"] == 1
        assert record["clients_succeeded"] == len(replies) - len(failed) == record["clients_sampled"] - len(failed)
        assert all("injected fault" in r.error.reason for r in failed)
        succeeded = [int(r.content["metrics"]["num-examples"]) for r in replies if not r.has_error()]
        assert record["num_examples"] == sum(succeeded) < len(seq.windows(np.arange(USERS)))


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
    assert saved["num_clients"] == USERS and saved["settings"]["strategy"] == "fedadam"
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
    seq = load_data(FederatedConfig.from_run_config(config).dataset, 8)
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
    assert cfg.target_epsilon == 5.0


@pytest.mark.parametrize("model", ["ar", "dual", "bert4rec"])
def test_every_encoder_builds_with_the_configured_item_width(tmp_path, model):
    encoder = global_model(run_config(tmp_path, model=model, item_dim=8))
    assert encoder.config.feature_dims["item"] == 8
    assert all(dim == DEFAULT_FEATURE_DIMS[f] for f, dim in encoder.config.feature_dims.items() if f != "item")
