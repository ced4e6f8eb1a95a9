"""SmartFed as a Flower app: ``client_app`` (ClientApp) and ``server_app`` (ServerApp).

Flower starts these in fresh processes with nothing but a run config, so each builds its side of
the run from the SmartFed config (``smartfed.experiments.runs``) and hands it to the engine:

- ``server_app`` builds the run in a folder under the output root the operator fixed on the
  server side (``$SMARTFED_OUTPUT_ROOT``, default ``~/smartfed-runs``; ``output-dir`` of the run
  config is relative to it, the folder guard of ``smartfed train`` applies) and drives its
  ``SmartFedStrategy`` over Flower's grid (the simulation engine's or a SuperLink's) with the same
  round driver, checkpoints and ``metrics.jsonl`` as ``smartfed train``. It pulls replies every
  0.2 s and logs each as it arrives (``PollingGrid``), so ``flwr run --stream`` shows a round's
  progress; with ``nodes`` only the listed SuperNodes take part; ``faults`` wrap the grid as
  in-process (``FaultInjectingGrid``).
- ``client_app``: one SuperNode is one client; its node config names its data partition
  (``partition-id``, ``num-partitions``, set by Flower's simulation engine or by
  ``flower-supernode --node-config``), where the run's clients hold their own data
  (``task.data.train`` null) its own files (``data-path``, optional ``eval-path``: read on the
  node, never sent to the server), and optionally a torch ``device`` (default "cpu"). The
  setup query carries the run config as JSON; the node keeps it in ``context.state`` and answers
  every later message with the engine's client handlers (``FederatedClient``). Where the process
  lives on (the simulation engine's actors) it keeps the client itself; where every message has a
  fresh process (a deployment) it hands the message to the node's persistent worker
  (``smartfed.experiments.client_worker``), which keeps the model between messages.

This module imports no torch (nor pydantic): a deployment's ClientApp process only forwards.
The ServerApp's run config is ``smartfed.experiments.flower_settings.FlowerRunSettings`` (``[tool.flwr.app.config]``
of flower_app/pyproject.toml, ``flwr run --run-config``); docs/flower.md shows how to run it.
"""

import json

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from smartfed.experiments.client_worker import WorkerError, forward
from smartfed.experiments.open_audit import audit_opens
from smartfed.federated.flower_compat import clientapp_runs_per_message, recorddict_from_bytes, recorddict_to_bytes
from smartfed.federated.protocol import (
    CONFIG_JSON, DATA_PATH, EVAL_PATH, NUM_PARTITIONS, PARTITION_ID, setup_config_json,
)
from smartfed.federated.run_dir import RunDir, output_root

SETUP = "smartfed-setup"

client_app = ClientApp()

_cached = {}


def _local_client(config_json, device, partition_id, node_data):
    """This process's client of the run ``config_json``, built once (the last run's is dropped)."""
    key = (config_json, device, partition_id, json.dumps(node_data, sort_keys=True))
    if key not in _cached:
        from smartfed.config import config_from_dict
        from smartfed.experiments.runs import build_client

        _cached.clear()
        _cached[key] = build_client(config_from_dict(json.loads(config_json)), device=device, client_id=partition_id,
                                    node_config=node_data)
    return _cached[key]


def node_data(context: Context) -> dict:
    """The data files this node's node config names (``data-path``, ``eval-path``): a client that
    holds its own data reads them, and only them."""
    return {key: context.node_config[key] for key in (DATA_PATH, EVAL_PATH) if key in context.node_config}


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


def _answer(msg: Message, context: Context, config_json: str) -> Message:
    """This node's reply to ``msg`` for the run ``config_json``."""
    num_clients = json.loads(config_json)["federation"]["num_clients"]
    partition_id = partition_of(context, num_clients)
    if clientapp_runs_per_message():
        header, payload = forward(recorddict_to_bytes(msg.content), {
            "run_id": context.run_id, "node_id": context.node_id, "partition_id": partition_id,
            "device": _device(context), "message_type": msg.metadata.message_type,
            "group_id": msg.metadata.group_id, "config_json": config_json, "node_data": node_data(context),
        })
        if "error" in header:
            raise WorkerError(header["error"])
        return Message(recorddict_from_bytes(payload), reply_to=msg)
    client = _local_client(config_json, _device(context), partition_id, node_data(context))
    if msg.metadata.message_type == MessageType.TRAIN:
        # The node's context keeps SecAgg+'s state between the protocol's stages.
        return client.train(msg, partition_id, context=context)
    return client.handle(msg, partition_id)


def _setup_json(context: Context) -> str:
    """The run config the setup query left in this node's state."""
    if SETUP not in context.state.config_records:
        raise RuntimeError("this node got a train/evaluate message before the ServerApp's setup query")
    return context.state.config_records[SETUP][CONFIG_JSON]


@client_app.query()
def setup(msg: Message, context: Context) -> Message:
    config_json = setup_config_json(msg.content)
    context.state[SETUP] = ConfigRecord({CONFIG_JSON: config_json})
    return _answer(msg, context, config_json)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _setup_json(context))


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _setup_json(context))


def serve(grid: Grid, settings, *, root=None):
    """All rounds of the run of ``settings`` (``smartfed.experiments.flower_settings.FlowerRunSettings``) on the nodes
    behind ``grid``, in ``output-dir`` under ``root`` (default ``output_root()``); returns the ``Run``."""
    from smartfed.config import config_to_dict
    from smartfed.experiments.runs import open_run
    from smartfed.federated.faults import FaultInjectingGrid
    from smartfed.federated.grid_wrappers import PollingGrid

    config = settings.run_config()
    run_dir = RunDir.under_root(output_root() if root is None else root, settings.output_dir)
    # Every check that reads only files comes before anything is built, as in ``smartfed train``.
    if settings.resume:
        changes = run_dir.check_resume(config)
    else:
        run_dir.check_writable(config_to_dict(config), resume=False)
    run = open_run(config, run_dir, resume=settings.resume, progress=False, timeout=settings.reply_timeout_s,
                   client_evaluation=settings.client_evaluation)
    if settings.resume:
        run_dir.record_resume(config, changes, at_round=run.state.round)
    grid = PollingGrid(grid)
    fed = config.federation
    if config.faults:
        grid = FaultInjectingGrid(grid, config.faults, client_timeout_s=fed.client_timeout_s,
                                  wire_dtype=config.communication.wire_dtype, seed=config.seed)
    run.start(grid, node_wait_s=settings.node_wait_s, listed=settings.nodes)
    return run


def _settings(run_config):
    from smartfed.experiments.flower_settings import FlowerRunSettings

    return FlowerRunSettings.from_run_config(run_config)


def build_server_app(*, output_root=None, **run_config) -> ServerApp:
    """A ServerApp whose runs write under ``output_root`` (default: ``$SMARTFED_OUTPUT_ROOT``,
    read when a run starts) and whose run config starts from ``run_config`` (keys as in
    pyproject.toml, e.g. ``build_server_app(output_root="/srv/runs", **{"output-dir": "a"})``);
    what ``flwr run`` passes wins."""
    defaults = dict(run_config)
    if defaults:
        _settings(defaults)  # a mistake in the caller's defaults fails here, not at the first run
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        audit_opens("serverapp")
        serve(grid, _settings({**defaults, **context.run_config}), root=output_root)

    return app


server_app = build_server_app()
