"""The ClientApp: a device holding one partition of users (one user by default) and nothing else.

Handlers by message type (``<category>.<phase>``), so later phases add their own beside these:

- ``query.describe``: public federation metadata (partition count and vocabulary sizes), see `describe`;
- ``train.popularity``: the client's unit-norm vector of the items its users rated (the item-prior release);
- ``evaluate.popularity``: hit counts of the released popularity scores;
- ``train.pretrain``: train the received encoder on the client's own windows; reply with the new parameters
  and counts (under DP-SGD only what the accounting needs, and an error instead of a round that would take
  the client past ``target-epsilon``);
- ``evaluate.pretrain``: score the client's own validation or test targets; reply with hit counts;
- ``train.contextualize``: a few local steps of the User-LLM's trainable part (encoder + projection +
  cross-attention) on the client's own task examples, the LLM frozen and never sent; reply with exactly
  those tensors and counts (`fed_userllm.clients.contextualize`);
- ``evaluate.contextualize``: the task metrics (e.g. NextItem by constrained beam search) on the client's
  own validation or test targets; reply with hit counts.

Replies carry model tensors (an ArrayRecord of exactly the model's parameters) and one MetricRecord of
scalar counts and means. No item id, window, history or per-example value ever leaves the client. Under
``dp='sample'`` the server is the adversary: a training reply carries the model and the client's DP-SGD
(sample rate, steps) only, and the server runs no federated evaluation (exact hits would reveal each
client's held-out item).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_userllm import streams
from fed_userllm.clients import contextualize
from fed_userllm.clients.faults import inject_faults
from fed_userllm.clients.task import (
    client_users,
    evaluate_local,
    get_arrays,
    initial_encoder,
    load_data,
    local_plan,
    popularity_update,
    set_arrays,
    train_local,
)
from fed_userllm.data import Partitioner, UserSequences
from fed_userllm.models import Popularity, PopularityConfig
from fed_userllm.privacy import PrivacyBudgetExceeded, epsilon_from_history
from fed_userllm.runtime import resolve_device, set_threads
from fed_userllm.train.federated_config import FederatedConfig

# Opacus reminds on every client that its RNG is not cryptographic and that hooks fire; both are known.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

app = ClientApp(mods=[inject_faults])  # fault-rate > 0 makes clients fail (tests, benchmarks)


class _Client:
    """The settings, data and partition of the client a message is addressed to."""

    def __init__(self, context: Context) -> None:
        self.cfg = FederatedConfig.from_run_config(dict(context.run_config))
        data = self.cfg.data
        set_threads(self.cfg.runtime.threads)
        self.device = resolve_device(self.cfg.runtime.device)
        self.seq: UserSequences = load_data(data.dataset, data.max_len)
        if "partition-id" not in context.node_config:
            raise ValueError("node_config has no 'partition-id': start the SuperNode with "
                             "--node-config 'partition-id=<i> num-partitions=<n>'")
        self.partition_id = int(context.node_config["partition-id"])
        num_clients = Partitioner(self.seq.num_users, data.users_per_client).num_clients
        if not 0 <= self.partition_id < num_clients:
            raise ValueError(f"partition-id={self.partition_id}, but dataset={data.dataset!r} with "
                             f"users-per-client={data.users_per_client} has {num_clients} partitions "
                             f"(0..{num_clients - 1}); run with num-supernodes={num_clients}")
        self.users = client_users(data, self.seq, self.partition_id)

    def model(self, message: Message) -> torch.nn.Module:
        model = initial_encoder(self.cfg, self.seq.vocab_sizes)
        set_arrays(model, message.content["arrays"])
        return model


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    """Federation metadata the server needs to build the model and check the node count.

    The number of partitions and the vocabulary sizes are the same on every client. The vocabularies come
    from the public catalog and the fixed rating buckets, never from events, so nothing private is released.
    ``num-examples`` (training windows of the whole federation, sample-level DP's delta) is treated as public
    like the number of clients.
    """
    data = FederatedConfig.from_run_config(dict(context.run_config)).data
    seq = load_data(data.dataset, data.max_len)
    info = {"num-clients": Partitioner(seq.num_users, data.users_per_client).num_clients,
            "num-examples": len(seq.windows()),
            **{f"vocab-{name}": size for name, size in seq.vocab_sizes.items()}}
    return Message(RecordDict({"federation": MetricRecord(info)}), reply_to=message)


@app.train("pretrain")
def train_pretrain(message: Message, context: Context) -> Message:
    """Local training of the user encoder; reply: parameters + {num-examples, train-loss, steps}, or under
    DP-SGD parameters + {partition-id, dp-sample-rate, steps} (what the ledger needs, nothing else)."""
    client = _Client(context)
    cfg, config = client.cfg, message.content["config"]
    model = client.model(message)
    seed = int(np.random.SeedSequence([cfg.runtime.seed, int(config["server-round"]), client.partition_id])
               .generate_state(1)[0])
    sigma, delta = float(config["noise-multiplier"]), float(config["delta"])
    history = _dp_sgd_history(context, cfg, client, sigma, delta) if cfg.dp.mode == "sample" else None
    result = train_local(model, client.seq, client.users, cfg.pretrain, cfg.dp, seed, sigma, client.device)
    if history is None:
        metrics = {"num-examples": result.num_examples, "train-loss": result.loss, "steps": result.steps}
    else:
        if (result.sample_rate, result.steps) != history[-1][1:]:
            raise RuntimeError(f"DP-SGD took {result.steps} steps at rate {result.sample_rate}, planned "
                               f"{history[-1][2]} at {history[-1][1]}: the budget check did not see this round")
        context.state["dp-sgd"] = ConfigRecord({"sigma": [h[0] for h in history], "q": [h[1] for h in history],
                                                "steps": [h[2] for h in history]})
        metrics = {"partition-id": client.partition_id, "dp-sample-rate": result.sample_rate, "steps": result.steps}
    return Message(RecordDict({"arrays": get_arrays(model), "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate("pretrain")
def evaluate_pretrain(message: Message, context: Context) -> Message:
    """Hit counts on the client's own ``split`` targets (recall@1/5/10, ndcg@10, fav_genre sums and n)."""
    client = _Client(context)
    split = str(message.content["config"]["split"])
    sums = evaluate_local(client.model(message), client.seq, client.users, split, client.device)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=message)


@app.train("popularity")
def train_popularity(message: Message, context: Context) -> Message:
    """The client's unit-norm vector of the items its users rated, added to the received counts; every user
    weighs the same (``num-examples`` 1), with or without DP."""
    client = _Client(context)
    counts = message.content["arrays"]
    if list(counts.keys()) != ["counts"]:
        raise ValueError(f"train.popularity expects arrays ['counts'], got {list(counts.keys())}")
    update = popularity_update(client.seq, client.users, client.cfg.dp.clip_norm)
    arrays = ArrayRecord({"counts": Array(counts["counts"].numpy() + update)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1, "steps": 0})}),
                   reply_to=message)


@app.evaluate("popularity")
def evaluate_popularity(message: Message, context: Context) -> Message:
    """Hit counts of the released popularity scores on the client's own ``split`` targets."""
    client = _Client(context)
    model = Popularity(PopularityConfig(client.seq.vocab_sizes))
    model.counts.requires_grad_(True)
    set_arrays(model, message.content["arrays"])
    sums = evaluate_local(model, client.seq, client.users, str(message.content["config"]["split"]), client.device)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=message)


@app.train("contextualize")
def train_contextualize(message: Message, context: Context) -> Message:
    """Local steps on the client's own task examples; reply: the trainable tensors + {num-examples,
    train-loss, steps}."""
    client = _Client(context)
    cfg, config = client.cfg, message.content["config"]
    model = contextualize.shared_userllm(cfg, client.seq.vocab_sizes).model
    set_arrays(model, message.content["arrays"])
    seed = int(np.random.SeedSequence([cfg.runtime.seed, int(config["server-round"]), client.partition_id,
                                       streams.LLM_TRAINING])
               .generate_state(1)[0])
    loss, examples = contextualize.train_local(model, contextualize.client_task(cfg), client.users, cfg, seed)
    metrics = {"num-examples": examples, "train-loss": loss, "steps": cfg.contextualize.local_steps}
    return Message(RecordDict({"arrays": get_arrays(model), "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate("contextualize")
def evaluate_contextualize(message: Message, context: Context) -> Message:
    """Task metric sums and ``n`` on the client's own ``split`` targets (constrained decoding, all titles)."""
    client = _Client(context)
    cfg = client.cfg
    model = contextualize.shared_userllm(cfg, client.seq.vocab_sizes).model
    set_arrays(model, message.content["arrays"])
    sums = contextualize.evaluate_local(model, contextualize.client_task(cfg), client.users,
                                        str(message.content["config"]["split"]), cfg)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=message)


def _dp_sgd_history(context: Context, cfg: FederatedConfig, client: _Client, noise_multiplier: float,
                    delta: float) -> list[tuple[float, float, int]]:
    """This client's DP-SGD history [(sigma, q, steps), ...] including the round it is about to train, checked
    against ``target-epsilon`` before it trains: a round that would exceed it raises instead (an error reply,
    so nothing trained past the budget ever leaves the device).

    The history lives in the node's local state (the client's own ledger for this run); the server's ledger
    recomputes the same figures from the (sample rate, steps) the replies carry, keyed by partition-id.
    """
    state = context.state.get("dp-sgd", ConfigRecord({"sigma": [], "q": [], "steps": []}))
    history = list(zip(state["sigma"], state["q"], state["steps"], strict=True))
    sample_rate, steps = local_plan(len(client.seq.windows(client.users)), cfg.pretrain)
    history.append((noise_multiplier, sample_rate, steps))
    if cfg.dp.target_epsilon:
        spent = epsilon_from_history(history, delta, cfg.dp.accountant)
        if spent > cfg.dp.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"client {client.partition_id} refuses round {len(history)}: its DP-SGD epsilon would reach "
                f"{spent:.4g} > target-epsilon={cfg.dp.target_epsilon} (delta={delta:.3g})")
    return history
