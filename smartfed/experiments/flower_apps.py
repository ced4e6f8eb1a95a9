"""SmartFed as a Flower app: ``client_app`` (ClientApp) and ``server_app`` (ServerApp).

Flower starts these in fresh processes with nothing but a run config, so each builds its side of
the run from the SmartFed config (``smartfed.experiments.runs``) and hands it to the engine:

- ``server_app`` builds the run and drives its ``SmartFedStrategy`` over Flower's grid (the
  simulation engine's or a SuperLink's): the same strategy, round loop, checkpoints and
  ``metrics.jsonl`` as ``smartfed train``, which drives it over the in-process grid.
- ``client_app``: one SuperNode is one client; its node config names its data partition
  (``partition-id``, ``num-partitions``, set by Flower's simulation engine or by
  ``flower-supernode --node-config``) and optionally a torch ``device`` (default "cpu"). The
  setup query carries the run config as JSON; the node keeps it in ``context.state`` and
  answers every later message with the engine's client handlers (``FederatedClient``).

A deployment starts a fresh process per message, so the client is rebuilt per message there;
under the simulation engine a worker process keeps the last one (``_local_client``), which is safe
because every train and evaluate message carries the server's state and quotas in full.

The ServerApp's run config is ``smartfed.experiments.flower_settings.FlowerRunSettings`` (``[tool.flwr.app.config]``
of flower_app/pyproject.toml, ``flwr run --run-config``); docs/flower.md shows how to run it.
"""

import json

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from smartfed.config import check_resume, config_from_dict, record_resume
from smartfed.experiments.flower_settings import FlowerRunSettings
from smartfed.experiments.runs import build_trainer, federated_data, open_run
from smartfed.federated.client import (
    CONFIG_JSON,
    NUM_PARTITIONS,
    PARTITION_ID,
    FederatedClient,
    setup_config_json,
)

SETUP = "smartfed-setup"

client_app = ClientApp()

_cached = {}


def _local_client(config_json, device) -> FederatedClient:
    key = (config_json, device)
    if key not in _cached:
        _cached.clear()
        config = config_from_dict(json.loads(config_json))
        trainer, layout = build_trainer(config, device=device)
        _cached[key] = FederatedClient(trainer, federated_data(config, layout), config)
    return _cached[key]


def partition_of(context: Context, num_clients):
    """This node's client id, from its node config, checked against the run's clients."""
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


def _set_up_client(context: Context):
    """This node's client and partition, from the run config the setup query left in state."""
    if SETUP not in context.state.config_records:
        raise RuntimeError("this node got a train/evaluate message before the ServerApp's setup query")
    client = _local_client(context.state.config_records[SETUP][CONFIG_JSON], _device(context))
    return client, partition_of(context, client.config.federation.num_clients)


@client_app.query()
def setup(msg: Message, context: Context) -> Message:
    config_json = setup_config_json(msg.content)
    client = _local_client(config_json, _device(context))
    partition_id = partition_of(context, client.config.federation.num_clients)
    context.state[SETUP] = ConfigRecord({CONFIG_JSON: config_json})
    return client.setup(msg, partition_id)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    client, partition_id = _set_up_client(context)
    # The node's context keeps SecAgg+'s state between the protocol's stages.
    return client.train(msg, partition_id, context=context)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    client, partition_id = _set_up_client(context)
    return client.evaluate(msg, partition_id)


def serve(grid: Grid, settings: FlowerRunSettings):
    """All rounds of the configured run on the nodes behind ``grid``; returns the ``Run``."""
    config = settings.run_config()
    if config.faults:
        raise ValueError(
            "config 'faults' are injected by the in-process grid only (smartfed train); remove them for a Flower run"
        )
    # Compare the configs before building anything, as ``smartfed train --resume`` does.
    changes = check_resume(settings.output_dir, config) if settings.resume else {}
    run = open_run(
        config, settings.output_dir, resume=settings.resume, progress=False, timeout=settings.reply_timeout_s,
        client_evaluation=settings.client_evaluation,
    )
    record_resume(settings.output_dir, config, changes, at_round=run.state.round if settings.resume else None)
    run.strategy.start(grid, node_wait_s=settings.node_wait_s)
    return run


def build_server_app(**run_config) -> ServerApp:
    """A ServerApp whose run config starts from ``run_config`` (keys as in pyproject.toml, e.g.
    ``build_server_app(**{"output-dir": "runs/a"})``); what ``flwr run`` passes wins."""
    defaults = dict(run_config)
    FlowerRunSettings.from_run_config(defaults)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, FlowerRunSettings.from_run_config({**defaults, **context.run_config}))

    return app


server_app = build_server_app()
