"""Checks on a client's training reply before it is aggregated: a reply the server cannot safely use is a failure.

A diverging client (NaN or inf after local training) or a hostile one (other tensors, shapes or dtypes, a
huge update, missing counts) must not reach the aggregate: a NaN update has a NaN norm, which no clipping
bounds, and under plain FedAvg one huge update moves the model anywhere. Such a reply is treated exactly like
a client that crashed: counted as failed, logged with the reason, never aggregated.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from fed_userllm.privacy import l2_norm

REPLY_RECORDS = {"arrays", "metrics"}


def _integer(value: float) -> bool:
    return value >= 0 and float(value).is_integer()


# What the server reads from a training reply's metrics, and the values it accepts.
METRIC_CHECKS = {
    "num-examples": (lambda v: v > 0, "a count > 0"),
    "steps": (_integer, "an integer >= 0"),
    "partition-id": (_integer, "an integer >= 0"),
    "dp-sample-rate": (lambda v: 0 < v <= 1, "a sampling rate in (0, 1]"),
}


def required_metrics(dp: str) -> tuple[str, ...]:
    """The metrics the server needs from a training reply under ``dp``: FedAvg's weights and the step counts,
    or under DP-SGD only what the accounting needs (the server is the adversary there)."""
    return ("partition-id", "dp-sample-rate", "steps") if dp == "sample" else ("num-examples", "steps")


def train_reply_problem(reply: Message, sent: ArrayRecord, required: tuple[str, ...],
                        max_update_norm: float) -> str | None:
    """Why the training ``reply`` must not be aggregated with the model ``sent`` to the client, or None.

    The reply must hold exactly the records ``arrays`` and ``metrics``; ``arrays`` exactly the sent tensors,
    with their shapes and dtypes and only finite values; ``metrics`` the ``required`` keys with valid values
    and only finite numbers; and the update (reply - sent) an L2 norm of at most ``max_update_norm``.
    """
    content = reply.content
    if set(content.keys()) != REPLY_RECORDS:
        return f"records {sorted(content.keys())}, expected {sorted(REPLY_RECORDS)}"
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "'arrays' must be an ArrayRecord and 'metrics' a MetricRecord"
    arrays, metrics = content["arrays"], content["metrics"]
    if set(arrays.keys()) != set(sent.keys()):
        return (f"tensors do not match the model: missing {sorted(set(sent.keys()) - set(arrays.keys()))}, "
                f"unexpected {sorted(set(arrays.keys()) - set(sent.keys()))}")
    local = {}
    for name, expected in sent.items():
        got = arrays[name]
        if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
            return (f"tensor {name!r} is {got.dtype} {tuple(got.shape)}, expected {expected.dtype} "
                    f"{tuple(expected.shape)}")
        try:
            local[name] = got.numpy()
        except (ValueError, TypeError) as err:
            return f"tensor {name!r} cannot be read: {err}"
        if not np.isfinite(local[name]).all():
            return f"tensor {name!r} holds {int((~np.isfinite(local[name])).sum())} NaN or infinite values"
    for key, value in metrics.items():
        values = np.asarray(value)
        if values.dtype.kind not in "iuf" or not np.isfinite(values).all():
            return f"metric {key!r} = {value!r} is not a finite number"
    for key in required:
        if key not in metrics:
            return f"metric {key!r} is missing"
        ok, expected = METRIC_CHECKS[key]
        if not ok(metrics[key]):
            return f"metric {key!r} = {metrics[key]!r}, expected {expected}"
    norm = l2_norm([local[name].astype(np.float64) - sent[name].numpy() for name in sent.keys()])
    if norm > max_update_norm:
        return f"update norm {norm:.4g} > max-update-norm={max_update_norm:g}"
    return None
