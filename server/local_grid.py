"""A Flower ``Grid`` whose nodes run the ClientApp in this process: the federation as function calls.

The ServerApp's round loop (`server.runner.run`), the strategies, the privacy ledger and the ClientApp's
handlers run unchanged; only the transport differs. Flower's simulation engine runs a SuperLink and one
SuperNode per client, and polls every pending message for every node, so its cost grows with the population;
here a round costs what its cohort costs, and a node's `Context` is created when the node is first addressed.
That is what benchmarks need (100,000 clients in one process within a few GiB) and what tests need (fast,
deterministic). `flwr run simulations/movielens` remains the way to run the app; this grid never replaces it.

    run_dir = run_local({"num-rounds": 5, "dp": "none"})   # the app's defaults + overrides
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fed_userllm.clients.client_app import app as client_app
from fed_userllm.clients.task import load_data
from fed_userllm.data import Partitioner
from fed_userllm.server.runner import run
from fed_userllm.train.federated_config import FederatedConfig

APP = Path(__file__).resolve().parents[1] / "simulations" / "movielens"
FIRST_NODE = 1 << 63  # Flower node ids are random unsigned 64-bit integers; these are too, and ordered


def app_defaults(app_dir: Path = APP) -> dict:
    """The run config of the Flower app's pyproject (``[tool.flwr.app.config]``)."""
    return tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


class LocalGrid(Grid):
    """``num_nodes`` nodes; node ``FIRST_NODE + 7 i`` holds partition ``i``.

    A ClientApp exception becomes an error reply, as in Flower's engines, so the server's failure handling
    is exercised as it would be in a deployment.
    """

    def __init__(self, run_config: dict, num_nodes: int) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.run_config = run_config
        self.num_nodes = num_nodes
        self.contexts: dict[int, Context] = {}
        self._replies: dict[str, tuple[Message, float]] = {}  # message id -> (reply, seconds taken)
        self._run = None

    def set_run(self, run) -> None:  # noqa: ANN001 (flwr's Run)
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [FIRST_NODE + 7 * i for i in range(self.num_nodes)]

    def context(self, node_id: int) -> Context:
        """The node's Context (its ``state`` persists across rounds, as on a SuperNode)."""
        if node_id not in self.contexts:
            partition = (node_id - FIRST_NODE) // 7
            self.contexts[node_id] = Context(
                run_id=1, node_id=node_id, state=RecordDict(), run_config=self.run_config,
                node_config={"partition-id": partition, "num-partitions": self.num_nodes})
        return self.contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; keep the reply (and how long the node took) for pulling."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's InMemoryGrid does
            began = time.monotonic()
            try:
                reply = client_app(message, self.context(message.metadata.dst_node_id))
            except Exception as err:  # noqa: BLE001 (what Flower's engines do with a failing ClientApp)
                reply = Message(Error(code=1, reason=repr(err)), reply_to=message)
            self._replies[message.metadata.message_id] = (reply, time.monotonic() - began)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that have not been pulled yet."""
        return [self._replies.pop(i)[0] for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then pull. A node gets the whole ``timeout`` (nodes run in parallel in a real federation);
        a reply that took longer is lost, as it would be after the server's deadline."""
        ids = self.push_messages(messages)
        late = {i for i in ids if timeout is not None and self._replies[i][1] > timeout}
        for i in late:
            del self._replies[i]
        return list(self.pull_messages(i for i in ids if i not in late))

def run_local(overrides: dict, app_dir: Path = APP) -> Path:
    """Run the Flower app's ServerApp over a `LocalGrid` of one node per partition; return the run dir."""
    config = {**app_defaults(app_dir), **overrides}
    cfg = FederatedConfig.from_run_config(config)
    data = cfg.data
    seq = load_data(data.dataset, data.max_len)
    num_nodes = Partitioner(seq.num_users, data.users_per_client, data.partition_seed).num_clients
    return run(LocalGrid(config, num_nodes), cfg)
