"""Fault injection: a Flower mod that makes sampled clients fail, for failure-tolerance tests and benchmarks.

With ``fault-rate`` p > 0, each ``train.*`` message fails with probability p, decided by a generator seeded
from (seed, round, partition), so a rerun or a resumed run fails the same clients:

- ``fault-kind="error"``: the client trains, then crashes before its reply leaves (the server receives an
  error reply, as from any ClientApp exception);
- ``fault-kind="hang"``: the client trains, then answers only after ``round-timeout`` seconds, too late for
  its round (the server stops waiting at the deadline, as for a device that went away).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fed_userllm import streams
from fed_userllm.train.federated_config import FederatedConfig


class InjectedFault(RuntimeError):
    """The failure ``fault-rate`` asked for."""


def inject_faults(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass ``message`` on; then fail the reply as configured (only ``train.*`` messages fail)."""
    reply = call_next(message, context)
    if not message.metadata.message_type.startswith("train"):
        return reply
    cfg = FederatedConfig.from_run_config(dict(context.run_config))
    if not cfg.faults.fault_rate:
        return reply
    server_round = int(message.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    draw = np.random.default_rng([cfg.runtime.seed, server_round, partition, streams.FAULTS]).random()
    if draw >= cfg.faults.fault_rate:
        return reply
    if cfg.faults.fault_kind == "error":
        raise InjectedFault(f"injected fault: client {partition} crashed in round {server_round}")
    time.sleep(cfg.faults.round_timeout)
    return reply
