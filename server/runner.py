"""The ServerApp's phase runner: a resumable round loop with checkpoints, metrics, a privacy ledger and plots.

The run config's ``phases`` lists the phases to run, in order (`fed_userllm.server.phases`). All phases of a
run share the run directory, the clients, the strategy settings and ONE privacy ledger (its budget policy is
`fed_userllm.privacy.budget`), so epsilon keeps adding up across phases.

One round, in write-ahead order (nothing is released before it is charged):
  Poisson cohort -> clients train -> replies checked (`fed_userllm.server.replies`: a malformed or
  non-finite one is a failed client) -> aggregate (DP-FedAvg under user-level DP), checked finite ->
  ledger line -> (every ``eval-every`` rounds) sampled clients score their validation targets ->
  metrics.jsonl -> checkpoint.
A crash before the ledger line leaves no trace: the resumed run redoes the round with the same cohort and
noise. A crash after it (charged, not checkpointed) leaves a pending line holding the round's release digest
(`fed_userllm.privacy.release_digest`: a keyed hash of the released tensors, the cohort, who succeeded and
the attempt). The resumed run reuses that charge only if its redone round is bit-identical; any other
release (other clients succeeded, another attempt, a changed model) is charged again: over-, never
under-counted.

The server never loads user histories: it learns the partition count, the number of training windows and
the vocabulary sizes from one client (``query.describe``), and otherwise sees only model tensors and counts.

Run directory (`fed_userllm.rundir`): config.json, metrics.jsonl, checkpoint.pt (latest round),
privacy_ledger.jsonl and privacy_report.txt (DP runs), each phase's model folder, results.json (final test
metrics), *.png, canaries/ (user DP with canaries), and OPERATOR-PRIVATE.md, which says which of these files
the DP guarantee does not cover. `fed-userllm release` (`fed_userllm.server.release`) copies out what it covers.
"""

from __future__ import annotations

import datetime
import math
import secrets
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fed_userllm import streams
from fed_userllm.clients.task import get_arrays, set_arrays
from fed_userllm.eval.ranking import add_sums, finalize
from fed_userllm.privacy import (
    SAMPLE_LEVEL,
    USER_LEVEL,
    Canaries,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    audit,
    canary_seed,
    release_digest,
)
from fed_userllm.privacy.budget import Budget, Privacy, charged_after, ledger_key, open_ledger, resolve_privacy
from fed_userllm.rundir import OPERATOR_PRIVATE, RunDir, flower_settings
from fed_userllm.runtime import (
    atomic_write_bytes,
    set_threads,
)
from fed_userllm.server.phases import PHASES, Phase
from fed_userllm.server.plots import plot_run
from fed_userllm.server.release import OPERATOR_PRIVATE_TEXT
from fed_userllm.server.replies import required_metrics, train_reply_problem
from fed_userllm.server.strategy import (
    build_strategy,
    get_server_lr,
    load_strategy_state,
    server_lr,
    set_server_lr,
    strategy_state,
)
from fed_userllm.train.federated_config import KEYS, PHASE_NAMES, FederatedConfig, run_config_of

# Run-config keys that may differ when resuming (they do not change what is computed); not saved.
RESUMABLE = ("resume", "run-dir", "round-timeout", "max-in-flight", "threads", "device")
RETRIES = 2  # on-short-round="retry": fresh cohorts tried before the run stops
METRIC_ORDER = ("recall@1", "recall@5", "recall@10", "ndcg@10", "fav_genre", "n")
@dataclass(frozen=True)
class Federation:
    """What the server knows about the federation: node ids and the public metadata from ``describe``."""

    nodes: list[int]
    num_clients: int
    num_examples: int  # training windows of the whole federation (sample-level DP's unit)
    vocab_sizes: dict[str, int]


NO_EVALUATION = ("not run under dp='sample': the server is the adversary there, and exact hit counts would "
                 "reveal each client's held-out item; evaluate the released model on data you hold")


def run(grid: Grid, cfg: FederatedConfig) -> Path:
    """Run every phase of ``cfg`` (or resume them) and return the run directory."""
    set_threads(cfg.runtime.threads)
    run = resolve_run_dir(cfg)
    run_dir = run.path
    federation = describe_federation(grid, cfg)
    privacy = resolve_privacy(cfg, federation.num_clients, federation.num_examples)
    write_or_check_config(run, cfg, federation, privacy)
    atomic_write_bytes(run / OPERATOR_PRIVATE, OPERATOR_PRIVATE_TEXT.encode())
    ckpt = run.load_checkpoint(weights_only=False)
    ledger = open_ledger(run_dir, cfg, federation.num_clients, privacy, ckpt.get("ledger_head"))
    state = RunState(grid, cfg, run_dir, federation,
                     Budget(privacy, ledger, charged_after(ledger, ckpt.get("ledger_head"))),
                     cfg.dp.seed or ckpt.get("dp_seed") or secrets.randbits(63), ckpt.get("completed", []))
    log(INFO, "fed-userllm: run directory %s (%s)", run_dir, "resumed" if ckpt else "new")
    if not ckpt:
        state.checkpoint({})  # the secret seed first, so even a crash in round 1 is redone identically
    log(INFO, "fed-userllm: %d clients, dp=%s, noise multiplier %.4g, delta %s, phases %s",
        federation.num_clients, cfg.dp.mode, privacy.noise_multiplier, privacy.delta,
        ", ".join(f"{name} (q={cfg.phase(name).fraction_train:g}, {cfg.phase(name).strategy})"
                  for name in cfg.phases))
    results = {name: state.run_phase(PHASES[name], ckpt) for name in cfg.phases
               if name not in state.completed}
    run.save_checkpoint({k: v for k, v in run.load_checkpoint(weights_only=False).items()
                         if k != "dp_seed"})  # done: the secret seed is no longer needed, drop it
    plots = plot_run(run) if run.metrics.exists() else []
    log(INFO, "fed-userllm: finished. Run directory: %s", run_dir)
    log(INFO, "fed-userllm:   metrics  %s (plots: %s)", run.metrics, ", ".join(p.name for p in plots))
    for name, test in results.items():
        log(INFO, "fed-userllm:   results  %s [%s, test] %s (operator-private)", run.results, name,
            _fmt(test) if test is not None else NO_EVALUATION)
    for name in cfg.phases:
        log(INFO, "fed-userllm:   model    %s [%s]", run / PHASES[name].output, name)
    if state.ledger is not None:
        report = run.privacy_report
        atomic_write_bytes(report, (audit(run_dir).to_text() + "\n").encode())
        log(INFO, "fed-userllm:   privacy  %s (ledger %s): epsilon %.4g at delta %.3g", report,
            state.ledger.path, state.ledger.epsilon, privacy.delta)
        log(INFO, "fed-userllm:   public   `fed-userllm release %s --out DIR` writes what the epsilon covers; the "
            "rest of the run directory is operator-private (%s)", run_dir, OPERATOR_PRIVATE)
    return run_dir


@dataclass
class RunState:
    """What the phases of one run share: the grid, settings, run directory, federation and privacy ledger."""

    grid: Grid
    cfg: FederatedConfig
    run_dir: Path
    federation: Federation
    budget: Budget
    dp_seed: int  # secret: seeds the Poisson cohorts and the DP noise; kept in the checkpoint only
    completed: list[str]  # phases finished in this run directory

    @property
    def privacy(self) -> Privacy:
        return self.budget.privacy

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self.budget.ledger

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def federated_evaluation(self) -> bool:
        """Clients score their held-out targets for the server, except under DP-SGD (the server is the adversary)."""
        return self.cfg.dp.mode != "sample"

    def run_phase(self, phase: Phase, ckpt: dict) -> dict[str, float] | None:
        """Train ``phase`` for its rounds (continuing a checkpoint of it); return test metrics (None without
        federated evaluation)."""
        cfg, settings = self.cfg, self.cfg.phase(phase.name)
        model = phase.initial_model(cfg, self.federation.vocab_sizes, self.run_dir)
        arrays = get_arrays(model)
        sizes = _exchange_sizes(phase, cfg, model, arrays, len(self.federation.nodes))
        strategy = build_strategy(settings, cfg.dp, _phase_seed(self.dp_seed, phase.name),
                                  self.privacy.noise_multiplier)
        strategy.message_type = phase.train_type
        initial = {k: v.numpy() for k, v in arrays.items()}
        canaries = None
        if cfg.dp.canaries and self.privacy.mechanism == USER_LEVEL:
            canaries = Canaries.for_arrays(canary_seed(self.dp_seed, phase.name), cfg.dp.canaries, initial,
                                           cfg.dp.clip_norm, settings.fraction_train)
            strategy.canaries = canaries
        done = 0
        if ckpt.get("phase") == phase.name:
            arrays = ArrayRecord({k: Array(v) for k, v in ckpt["arrays"].items()})
            load_strategy_state(strategy, ckpt["strategy"])
            done = ckpt["round"]
            log(INFO, "fed-userllm: resuming phase %s after round %d", phase.name, done)
        self.run.keep_metrics(lambda r: r["phase"] != phase.name or r["round"] <= done)
        eval_nodes = (_sample_nodes(self.federation.nodes, settings.eval_fraction, cfg.runtime.seed,
                                    streams.VALIDATION_CLIENTS) if settings.eval_every else [])
        seconds: list[float] = []  # of this phase's rounds run by this process (for the ETA)
        for rnd in range(done + 1, settings.rounds + 1):
            if self.ledger is not None and self.ledger.rounds_remaining(settings.fraction_train) == 0:
                log(WARNING, "fed-userllm: stopping before round %d: target-epsilon=%s is spent", rnd,
                    cfg.dp.target_epsilon)
                break
            began = time.time()
            set_server_lr(strategy, server_lr(settings, rnd))
            outcome = self.train_round(phase, strategy, arrays, rnd)
            if outcome is None:
                break
            arrays, record = outcome
            lr = get_server_lr(strategy)
            record |= sizes | ({"server_lr": lr} if lr is not None else {})
            if settings.eval_every and rnd % settings.eval_every == 0 and self.federated_evaluation:
                eval_began = time.time()
                val, (sent, received) = self.evaluate(phase, arrays, eval_nodes, "val", rnd)
                record["eval_seconds"] = time.time() - eval_began
                record |= {f"val_{k}": v for k, v in val.items()}
                record["bytes_sent"] += sent
                record["bytes_received"] += received
            record["round_seconds"] = time.time() - began
            self.run.append_metrics(record)
            self.checkpoint({"phase": phase.name, "round": rnd, "strategy": strategy_state(strategy),
                             "arrays": {k: v.numpy() for k, v in arrays.items()}})
            seconds.append(record["round_seconds"])
            log(INFO, "fed-userllm: %s", progress_line(phase.name, rnd, settings.rounds, record,
                                                       float(np.mean(seconds))))
        set_arrays(model, arrays)
        model.save_pretrained(self.run_dir / phase.output)
        if canaries is not None:
            canaries.save(self.run_dir, phase.name, initial, {k: v.numpy() for k, v in arrays.items()})
        test = None
        if self.federated_evaluation:
            test_nodes = _sample_nodes(self.federation.nodes, settings.test_fraction, cfg.runtime.seed,
                                       streams.TEST_CLIENTS)
            test, _ = self.evaluate(phase, arrays, test_nodes, "test", settings.rounds)
            log(INFO, "fed-userllm: [%s] final test over %d users (operator-private, not covered by DP): %s",
                phase.name, int(test["n"]), _fmt(test))
        else:
            log(WARNING, "fed-userllm: [%s] federated evaluation %s", phase.name, NO_EVALUATION)
        privacy = ("operator-private: exact federated evaluation, not covered by the DP guarantee"
                   if test is not None else NO_EVALUATION)
        self.run.write_results(self.run.read_results() | {phase.name: {"test": test, "privacy": privacy}})
        self.completed.append(phase.name)
        self.checkpoint(self.run.load_checkpoint(weights_only=False))
        return test

    def train_round(self, phase: Phase, strategy, arrays: ArrayRecord,
                    rnd: int) -> tuple[ArrayRecord, dict] | None:
        """One training round, charged to the ledger before release; None if the budget refuses it.

        A short round (more failed clients than ``max-failure-fraction`` of the cohort) releases nothing:
        it is retried with a fresh cohort, skipped (the model stays as it is) or stops the run, as
        ``on-short-round`` says. Failures never change the DP average's denominator (the expected cohort),
        so the accounting holds whoever drops out, provided failures do not depend on the data.
        """
        dp, faults = self.cfg.dp, self.cfg.faults
        dp_sgd_sigma = self.privacy.noise_multiplier if dp.mode == "sample" else 0.0
        train_config = ConfigRecord({"noise-multiplier": dp_sgd_sigma, "delta": self.privacy.delta or 0.0})
        for attempt in range(RETRIES + 1):
            strategy.attempt = attempt
            messages = list(strategy.configure_train(rnd, arrays, train_config, self.grid))
            replies = sorted(self.exchange(messages), key=lambda m: m.metadata.src_node_id)  # fixed sum order
            ok = []
            for r in replies:
                problem = r.error.reason if r.has_error() else train_reply_problem(
                    r, arrays, required_metrics(dp.mode), dp.max_update_norm)
                if problem is None:
                    ok.append(r)
                else:
                    log(WARNING, "fed-userllm: round %d: node %d failed: %s", rnd, r.metadata.src_node_id, problem)
            record = {"phase": phase.name, "round": rnd, "clients_sampled": len(messages),
                      "clients_succeeded": len(ok), "clients_failed": len(messages) - len(ok),
                      "attempts": attempt + 1, **_train_metrics(ok)}
            if len(messages) - len(ok) <= faults.max_failure_fraction * len(messages):
                break
            policy = faults.on_short_round
            log(WARNING, "fed-userllm: round %d attempt %d is short: %d of %d sampled clients failed (> "
                "max-failure-fraction=%s); on-short-round=%s", rnd, attempt + 1, len(messages) - len(ok),
                len(messages), faults.max_failure_fraction, policy)
            if policy == "skip":
                return arrays, record | {"skipped": True}
            if policy == "stop" or attempt == RETRIES:
                raise RuntimeError(f"round {rnd}: {len(messages) - len(ok)} of {len(messages)} sampled clients "
                                   f"failed in attempt {attempt + 1} (max-failure-fraction="
                                   f"{faults.max_failure_fraction}, on-short-round={policy}); stopping. The "
                                   "last checkpoint is intact: fix the clients and resume")
        new_arrays, _ = strategy.aggregate_train(rnd, ok)
        released = arrays if new_arrays is None else _cast_like(new_arrays, arrays)
        if not all(np.isfinite(a.numpy()).all() for a in released.values()):
            raise RuntimeError(f"round {rnd}: the aggregated model holds NaN or infinite values although every "
                               "aggregated reply was finite; nothing of this round was charged or released. The "
                               "last checkpoint is intact")
        if self.ledger is not None:
            digest = release_digest(
                ledger_key(self.dp_seed), {k: v.numpy() for k, v in released.items()}, phase=phase.name,
                round=rnd, attempt=attempt, cohort=sorted(m.metadata.dst_node_id for m in messages),
                succeeded=[r.metadata.src_node_id for r in ok])
            try:
                record |= self.budget.charge(phase.name, strategy.fraction_train, digest, _client_steps(ok)
                                             if self.privacy.mechanism == SAMPLE_LEVEL else None)
            except PrivacyBudgetExceeded as err:
                log(WARNING, "fed-userllm: round %d is not released: %s", rnd, err)
                return None
        if (stats := getattr(strategy, "last_stats", None)) is not None:
            record |= {"update_norm_mean": float(np.mean(stats.update_norms or [0.0])),
                       "fraction_clipped": stats.fraction_clipped, "noise_std": stats.noise_std,
                       "canaries_inserted": strategy.last_canaries}
        record |= {"bytes_sent": sum(_payload_bytes(m.content) for m in messages),
                   "bytes_received": sum(_payload_bytes(r.content) for r in ok)}
        return released, record

    def evaluate(self, phase: Phase, arrays: ArrayRecord, nodes: list[int], split: str,
                 rnd: int) -> tuple[dict[str, float], tuple[int, int]]:
        """Clients score their own ``split`` targets; the server adds up their hit counts into means."""
        config = ConfigRecord({"split": split, "server-round": rnd})
        content = RecordDict({"arrays": arrays, "config": config})
        messages = [Message(content, dst_node_id=n, message_type=phase.evaluate_type,
                            group_id=f"{rnd}-{split}") for n in nodes]
        replies = [r for r in self.exchange(messages) if not r.has_error()]
        if not replies:
            raise RuntimeError(f"no client answered the {split} evaluation of round {rnd}")
        sums: dict[str, float] = {}
        for reply in replies:
            sums = add_sums(sums, dict(reply.content["metrics"]))
        means = dict(sorted(finalize(sums).items(), key=lambda kv: _metric_rank(kv[0])))
        return means, (sum(_payload_bytes(m.content) for m in messages),
                       sum(_payload_bytes(r.content) for r in replies))

    def exchange(self, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and collect the replies, at most ``max-in-flight`` outstanding at a time.

        Flower's simulation engine scans every pending message for every node several times a second
        (O(nodes x pending) under one lock), so hundreds of messages in flight across hundreds of nodes keep
        the server process busy and starve the client workers; small batches keep the scan cheap.
        ``round-timeout`` bounds the whole exchange; replies that miss it count as failures.
        """
        step = self.cfg.faults.max_in_flight or len(messages) or 1
        deadline = time.time() + self.cfg.faults.round_timeout
        replies: list[Message] = []
        for i in range(0, len(messages), step):
            remaining = max(0.0, deadline - time.time())
            replies += self.grid.send_and_receive(messages[i:i + step], timeout=remaining)
        return replies

    def checkpoint(self, ckpt: dict) -> None:
        """Atomically replace checkpoint.pt; it also carries the secret seed and the ledger's head hash."""
        self.run.save_checkpoint({**ckpt, "dp_seed": self.dp_seed, "completed": list(self.completed),
                                  "ledger_head": self.ledger.head_hash if self.ledger is not None else None})


def resolve_run_dir(cfg: FederatedConfig) -> RunDir:
    """``run-dir`` (default runs/flower-<timestamp> under the working directory); refuse to mix runs."""
    runtime = cfg.runtime
    if not runtime.run_dir and runtime.resume:
        raise ValueError("resume=true needs run-dir=<the run directory to continue>")
    run = RunDir(Path(runtime.run_dir or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve())
    run.check_resume(run_config_of(_settings(cfg)), runtime.resume,
                     read_saved=lambda config: run_config_of(flower_settings(config)), resume_flag="resume=true",
                     out_flag="run-dir", require_run=True)
    return run  # created with config.json, once the federation checks out


def describe_federation(grid: Grid, cfg: FederatedConfig) -> Federation:
    """Node ids, and the partition count and vocabulary sizes from one client; fail if the counts differ."""
    timeout, data = cfg.faults.round_timeout, cfg.data
    deadline = time.time() + timeout
    while not (nodes := sorted(grid.get_node_ids())):
        if time.time() > deadline:
            raise RuntimeError(f"no SuperNode connected within round-timeout={timeout}s")
        time.sleep(1)
    query = Message(RecordDict(), dst_node_id=nodes[0], message_type="query.describe")
    replies = list(grid.send_and_receive([query], timeout=timeout))
    reply = replies[0] if replies else None
    if reply is None or reply.has_error():
        reason = "no reply" if reply is None else reply.error.reason
        raise RuntimeError(f"client {nodes[0]} could not describe dataset={data.dataset!r}: {reason}")
    info = reply.content["federation"]
    num_clients = int(info["num-clients"])
    if len(nodes) != num_clients:
        raise RuntimeError(
            f"the federation has {len(nodes)} SuperNodes but dataset={data.dataset!r} with users-per-client="
            f"{data.users_per_client} defines {num_clients} clients (one SuperNode per partition). Start with "
            f"`flwr run simulations/movielens --stream --federation-config \"num-supernodes={num_clients}\"`")
    vocab_sizes = {k.removeprefix("vocab-"): int(v) for k, v in info.items() if k.startswith("vocab-")}
    return Federation(nodes, num_clients, int(info["num-examples"]), vocab_sizes)


def _settings(cfg: FederatedConfig) -> dict:
    """The nested settings a resumed run must keep (all but `RESUMABLE`): what config.json saves."""
    settings = cfg.to_dict()
    for key in RESUMABLE:
        for path in KEYS[key]:
            part, name = path.split(".")
            del settings[part][name]
    return settings


def write_or_check_config(run: RunDir, cfg: FederatedConfig, federation: Federation, privacy: Privacy) -> None:
    """Write config.json for a new run (and point ``latest`` at it), or on resume check that the federation
    is the same (`resolve_run_dir` checked the settings)."""
    if run.exists():
        if run.read_config()["num_clients"] != federation.num_clients:
            raise ValueError(f"{run.config} was written for {run.read_config()['num_clients']} clients, the "
                             f"federation has {federation.num_clients}: a resumed run must use the same clients")
        return
    resolved = {"mechanism": privacy.mechanism, "noise_multiplier": privacy.noise_multiplier,
                "delta": privacy.delta, "max_rounds_within_budget": privacy.max_rounds}
    run.write_config({"settings": _settings(cfg), "num_clients": federation.num_clients,
                      "vocab_sizes": federation.vocab_sizes, "privacy": resolved})
    run.mark_latest()


def _phase_seed(dp_seed: int, phase: str) -> int:
    """The secret seed of a phase's cohorts and noise: the accountant composes the rounds of all phases as
    independent mechanisms, so round r of one phase must not reuse round r's draws of another."""
    index = PHASE_NAMES.index(phase)
    return dp_seed if index == 0 else int(np.random.SeedSequence([dp_seed, index]).generate_state(1, np.uint64)[0] >> 1)


def _exchange_sizes(phase: Phase, cfg: FederatedConfig, model: torch.nn.Module, arrays: ArrayRecord,
                    num_clients: int) -> dict:
    """For a phase with a frozen part (the LLM): bytes of one copy of the exchanged tensors and of the frozen
    parameters, which are never sent (logged once, recorded every round); {} otherwise."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    if not frozen:
        return {}
    exchanged, settings = arrays.count_bytes(), cfg.phase(phase.name)
    log(INFO, "fed-userllm: [%s] clients train and exchange %d tensors (%s parameters, %.2f MB per copy: "
        "encoder + projection%s); the frozen LLM %s (%.1f MB) is never sent: each copy is %.2f%% of it",
        phase.name, len(arrays), f"{sum(a.numpy().size for a in arrays.values()):,}", exchanged / 1e6,
        " + cross-attention" if cfg.llm.integration == "xattn" else " + task prompt", cfg.llm.model, frozen / 1e6,
        100 * exchanged / frozen)
    log(INFO, "fed-userllm: [%s] %d rounds at q=%g (~%.3g clients each), %d local steps of %d examples; "
        "validation and final test each on a fixed sample of %d of the %d clients (llm-eval-fraction=%g; %s)",
        phase.name, settings.rounds, settings.fraction_train, settings.fraction_train * num_clients,
        settings.local_steps, settings.batch_size, sample_size(num_clients, settings.test_fraction), num_clients,
        settings.test_fraction,
        "exact ranking of every title" if cfg.llm.objective == "catalog"
        else "constrained beam search over every title, slow on CPU")
    return {"update_bytes": exchanged, "llm_bytes": frozen}


def progress_line(phase: str, rnd: int, total: int, record: dict, seconds_per_round: float) -> str:
    """The round's one readable log line: epsilon so far, training loss, validation Recall@10 when evaluated,
    the round's seconds and the phase's ETA. Every figure of the round is in metrics.jsonl."""
    parts = [f"[{phase}] round {rnd}/{total}"]
    if "epsilon" in record:
        parts.append(f"epsilon {record['epsilon']:.3g}")
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.4g}")
    if "val_recall@10" in record:
        parts.append(f"val recall@10 {record['val_recall@10']:.4f}")
    if record.get("skipped"):
        parts.append("skipped (short round)")
    eta = datetime.timedelta(seconds=round(seconds_per_round * (total - rnd)))
    return "  ".join([*parts, f"{record['round_seconds']:.1f} s", f"ETA {eta}"])


def _client_steps(ok: list[Message]) -> dict[str, tuple[float, int]]:
    """What a DP-SGD round's ledger line records of each client: {partition id: (its sample rate, steps)}."""
    metrics = [r.content["metrics"] for r in ok]
    return {str(int(m["partition-id"])): (float(m["dp-sample-rate"]), int(m["steps"])) for m in metrics}


def _train_metrics(ok: list[Message]) -> dict:
    """The total of local steps and, where the replies carry them (not under DP-SGD), of local examples and the
    example-weighted mean client training loss."""
    metrics = [r.content["metrics"] for r in ok]
    record = {"local_steps": int(sum(m["steps"] for m in metrics))}
    if all("num-examples" in m for m in metrics):
        n = np.array([m["num-examples"] for m in metrics], dtype=float)
        record["num_examples"] = int(n.sum())
        if metrics and all("train-loss" in m for m in metrics):
            record["train_loss"] = float(np.average([m["train-loss"] for m in metrics], weights=n))
    return record


def sample_size(num_nodes: int, fraction: float) -> int:
    """How many nodes `_sample_nodes` draws: ``fraction`` of them, at least one (all of them at 1)."""
    return num_nodes if fraction >= 1 else max(1, round(fraction * num_nodes))


def _sample_nodes(nodes: list[int], fraction: float, seed: int, stream: int) -> list[int]:
    """A fixed, seeded sample of ``fraction`` of the nodes (all of them at 1) for an evaluation."""
    if fraction >= 1:
        return nodes
    k = sample_size(len(nodes), fraction)
    chosen = np.random.default_rng([seed, stream]).choice(len(nodes), size=k, replace=False)
    return [nodes[i] for i in sorted(chosen)]  # index, never numpy-convert: node ids are unsigned 64-bit


def _cast_like(new: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``new`` in the dtypes of ``reference``: FedAdam steps in float64, clients need float32."""
    return ArrayRecord({k: Array(v.numpy().astype(reference[k].numpy().dtype, copy=False))
                        for k, v in new.items()})


def _metric_rank(name: str) -> tuple[int, str]:
    """Recall@1/5/10, NDCG@10, FavGenre, n first (log order), then anything else by name."""
    return (METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER), name)


def _payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (array data plus metric/config values)."""
    return sum(record.count_bytes() for record in content.values())


def _fmt(values: dict) -> str:
    keep = {k: v for k, v in values.items() if k not in ("phase", "round") and not isinstance(v, dict)}
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
                    for k, v in keep.items())
