"""The SmartFed Flower ``ClientApp``: message translation around ``smartfed.federated.task``.

One SuperNode is one client of the federation: its node config names its data partition
(``partition-id``, ``num-partitions``, set by Flower's simulation engine or by
``flower-supernode --node-config``) and optionally a torch ``device`` (default "cpu").

- query (once per run, from the ServerApp): carries the run configuration as JSON. The client
  builds its trainer, checks the partitioning, keeps the configuration in ``context.state`` for
  the later messages and answers its partition and pool fingerprint.
- train: ``ClientTrainer.train`` on the local partition, exactly as in the in-process simulation.
- evaluate: loss and accuracy of the received state on the local partition.

A deployment starts a fresh process per message, so the trainer is rebuilt per message there;
under the simulation engine a worker process keeps the last trainer (``_local_client``), which
is safe because ``train`` and ``evaluate`` load the server's state and quotas in full each time.
"""

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from smartfed.federated.config import config_from_dict
from smartfed.federated.data import federated_data
from smartfed.federated.flower.messages import (
    NUM_EXAMPLES,
    content_to_evaluation,
    content_to_instructions,
    result_to_content,
)
from smartfed.federated.task import ClientTrainer

RUN_CONFIG = "run-config"
CONFIG_JSON = "json"
SETUP = "smartfed-setup"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
POOL_FINGERPRINT = "pool-fingerprint"

app = ClientApp()

_cached = {}


class LocalClient:
    """The trainer and this node's examples for one run configuration."""

    def __init__(self, config, device):
        self.config = config
        self.trainer = ClientTrainer(config, device=device)
        self.data = federated_data(config, self.trainer.layout)


def _local_client(config_json, device) -> LocalClient:
    key = (config_json, device)
    if key not in _cached:
        _cached.clear()
        _cached[key] = LocalClient(config_from_dict(json.loads(config_json)), device)
    return _cached[key]


def _partition(context: Context, num_clients):
    node_config = context.node_config
    missing = [key for key in (PARTITION_ID, NUM_PARTITIONS) if key not in node_config]
    if missing:
        raise ValueError(
            f"node config needs {missing}: start the SuperNode with "
            f"--node-config 'partition-id=I num-partitions={num_clients}'"
        )
    partition_id, num_partitions = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    if num_partitions != num_clients:
        raise ValueError(
            f"node config num-partitions={num_partitions} differs from the run's "
            f"federation.num_clients={num_clients}"
        )
    if not 0 <= partition_id < num_clients:
        raise ValueError(f"node config partition-id must lie in [0, {num_clients}), got {partition_id}")
    return partition_id


def _device(context: Context):
    return str(context.node_config.get("device", "cpu"))


def _setup_client(context: Context):
    """This node's ``LocalClient`` and partition, from the configuration the query left in state."""
    if SETUP not in context.state.config_records:
        raise RuntimeError("this node got a train/evaluate message before the ServerApp's setup query")
    client = _local_client(context.state.config_records[SETUP][CONFIG_JSON], _device(context))
    return client, _partition(context, client.config.federation.num_clients)


@app.query()
def setup(msg: Message, context: Context) -> Message:
    config_json = msg.content.config_records[RUN_CONFIG][CONFIG_JSON]
    client = _local_client(config_json, _device(context))
    partition_id = _partition(context, client.config.federation.num_clients)
    context.state[SETUP] = ConfigRecord({CONFIG_JSON: config_json})
    reply = RecordDict({
        "node": MetricRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: client.config.federation.num_clients}),
        "pool": ConfigRecord({POOL_FINGERPRINT: client.trainer.pool.fingerprint}),
    })
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client, partition_id = _setup_client(context)
    config = client.config
    result = client.trainer.train(
        content_to_instructions(msg.content), client.data.clients[partition_id],
        time_limit_s=config.federation.client_timeout_s,
    )
    return Message(result_to_content(result, config.communication.wire_dtype), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client, partition_id = _setup_client(context)
    state, quotas = content_to_evaluation(msg.content)
    scores = client.trainer.evaluate(
        state, quotas, client.data.clients[partition_id], batch_size=client.config.federation.eval_batch_size
    )
    metrics = MetricRecord({NUM_EXAMPLES: scores["num_examples"], "loss": scores["loss"], "accuracy": scores["accuracy"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
