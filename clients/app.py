"""The ClientApp: a device holding one partition of users (one user by default) and nothing else.

Handlers by message type (``<category>.<phase>``), so later phases add their own beside these:

- ``query.describe``: public federation metadata (partition count and vocabulary sizes), see `describe`;
- ``train.popularity``: the client's unit-norm vector of the items its users rated (the item-prior release);
- ``evaluate.popularity``: hit counts of the released popularity scores;
- ``train.pretrain``: train the received encoder on the client's own windows; reply with the new parameters
  and counts;
- ``evaluate.pretrain``: score the client's own validation or test targets; reply with hit counts;
- ``train.contextualize``: a few local steps of the User-LLM's trainable part (encoder + projection +
  cross-attention) on the client's own task examples, the LLM frozen and never sent; reply with exactly
  those tensors and counts (`fed_userllm.clients.contextualize`);
- ``evaluate.contextualize``: the task metrics (e.g. NextItem by constrained beam search) on the client's
  own validation or test targets; reply with hit counts.

Replies carry model tensors (an ArrayRecord of exactly the model's parameters) and one MetricRecord of
scalar counts and means. No item id, window, history or per-example value ever leaves the client.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_userllm.clients import contextualize
from fed_userllm.clients.config import FederatedConfig
from fed_userllm.clients.faults import inject_faults
from fed_userllm.clients.task import (
    build_model,
    client_users,
    evaluate_local,
    get_arrays,
    load_data,
    popularity_update,
    set_arrays,
    train_local,
)
from fed_userllm.data import Partitioner, UserSequences
from fed_userllm.models import Popularity, PopularityConfig
from fed_userllm.privacy import epsilon_from_history
from fed_userllm.runtime import resolve_device, set_threads

# Opacus reminds on every client that its RNG is not cryptographic and that hooks fire; both are known.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

app = ClientApp(mods=[inject_faults])  # fault-rate > 0 makes clients fail (tests, benchmarks)


class _Client:
    """The settings, data and partition of the client a message is addressed to."""

    def __init__(self, context: Context) -> None:
        self.cfg = FederatedConfig.from_run_config(dict(context.run_config))
        set_threads(self.cfg.threads)
        self.device = resolve_device(self.cfg.device)
        self.seq: UserSequences = load_data(self.cfg.dataset, self.cfg.max_len)
        if "partition-id" not in context.node_config:
            raise ValueError("node_config has no 'partition-id': start the SuperNode with "
                             "--node-config 'partition-id=<i> num-partitions=<n>'")
        self.partition_id = int(context.node_config["partition-id"])
        num_clients = Partitioner(self.seq.num_users, self.cfg.users_per_client).num_clients
        if not 0 <= self.partition_id < num_clients:
            raise ValueError(f"partition-id={self.partition_id}, but dataset={self.cfg.dataset!r} with "
                             f"users-per-client={self.cfg.users_per_client} has {num_clients} partitions "
                             f"(0..{num_clients - 1}); run with num-supernodes={num_clients}")
        self.users = client_users(self.cfg, self.seq, self.partition_id)

    def model(self, message: Message) -> torch.nn.Module:
        model = build_model(self.cfg, self.seq.vocab_sizes)
        set_arrays(model, message.content["arrays"])
        return model


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    """Federation metadata the server needs to build the model and check the node count.

    The number of partitions and the vocabulary sizes are the same on every client. The vocabularies come
    from the public catalog and the fixed rating buckets, never from events, so nothing private is released.
    """
    cfg = FederatedConfig.from_run_config(dict(context.run_config))
    seq = load_data(cfg.dataset, cfg.max_len)
    info = {"num-clients": Partitioner(seq.num_users, cfg.users_per_client).num_clients,
            **{f"vocab-{name}": size for name, size in seq.vocab_sizes.items()}}
    return Message(RecordDict({"federation": MetricRecord(info)}), reply_to=message)


@app.train("pretrain")
def train_pretrain(message: Message, context: Context) -> Message:
    """Local training of the user encoder; reply: parameters + {num-examples, train-loss, steps[, DP-SGD]}."""
    client = _Client(context)
    cfg, config = client.cfg, message.content["config"]
    model = client.model(message)
    seed = int(np.random.SeedSequence([cfg.seed, int(config["server-round"]), client.partition_id])
               .generate_state(1)[0])
    result = train_local(model, client.seq, client.users, cfg, seed, float(config["noise-multiplier"]),
                         client.device)
    metrics = {"num-examples": result.num_examples, "train-loss": result.loss, "steps": result.steps}
    if cfg.dp == "sample":
        metrics |= _account_dp_sgd(context, cfg, client.partition_id, float(config["noise-multiplier"]),
                                   result.sample_rate, result.steps, float(config["delta"]))
    content = RecordDict({"arrays": get_arrays(model), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


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
    update = popularity_update(client.seq, client.users, client.cfg.clip_norm)
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
    cfg, config = client.cfg.for_phase("contextualize"), message.content["config"]
    model = contextualize.shared_userllm(cfg, client.seq.vocab_sizes).model
    set_arrays(model, message.content["arrays"])
    seed = int(np.random.SeedSequence([cfg.seed, int(config["server-round"]), client.partition_id, 1])
               .generate_state(1)[0])
    loss, examples = contextualize.train_local(model, contextualize.client_task(cfg), client.users, cfg, seed)
    metrics = {"num-examples": examples, "train-loss": loss, "steps": cfg.local_steps}
    return Message(RecordDict({"arrays": get_arrays(model), "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate("contextualize")
def evaluate_contextualize(message: Message, context: Context) -> Message:
    """Task metric sums and ``n`` on the client's own ``split`` targets (constrained decoding, all titles)."""
    client = _Client(context)
    cfg = client.cfg.for_phase("contextualize")
    model = contextualize.shared_userllm(cfg, client.seq.vocab_sizes).model
    set_arrays(model, message.content["arrays"])
    sums = contextualize.evaluate_local(model, contextualize.client_task(cfg), client.users,
                                        str(message.content["config"]["split"]), cfg)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=message)


def _account_dp_sgd(context: Context, cfg: FederatedConfig, partition_id: int, noise_multiplier: float,
                    sample_rate: float, steps: int, delta: float) -> dict:
    """This client's DP-SGD epsilon over all its rounds so far (history kept in the node's local state).

    The server's ledger recomputes the same figure from the (sample rate, steps) reported here, keyed by
    partition-id, which also survives a resumed run (local state does not).
    """
    state = context.state.get("dp-sgd", ConfigRecord({"sigma": [], "q": [], "steps": []}))
    state["sigma"] = [*state["sigma"], noise_multiplier]
    state["q"] = [*state["q"], sample_rate]
    state["steps"] = [*state["steps"], steps]
    context.state["dp-sgd"] = state
    history = list(zip(state["sigma"], state["q"], state["steps"], strict=True))
    return {"partition-id": partition_id, "dp-sample-rate": sample_rate,
            "epsilon": epsilon_from_history(history, delta, cfg.accountant)}
