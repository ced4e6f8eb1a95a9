"""The SmartFed Flower ``ServerApp``: the in-process simulation's server, with Flower as transport.

``FlowerRounds`` is ``smartfed.federated.simulation.Simulation`` with one thing replaced: a round
attempt sends each sampled client's instructions to its SuperNode and decodes the replies instead
of training in-process. Sampling (seed, round, attempt), the update checks, the FedAvg weighted by
examples, the EEQA quota updates, the evaluation of the global model, ``metrics.jsonl``, the
checkpoints and ``--resume`` are the simulation's own code. Bytes up and down are Flower's
``count_bytes`` of the records each message carries.

Run config (``[tool.flwr.app.config]`` of flower_app/pyproject.toml, ``flwr run --run-config``;
every key has a default, since Flower's ``run_simulation`` passes an empty run config):

- ``config``: SmartFed YAML run configuration (configs/tiny.yaml); "" = the built-in defaults.
- ``overrides``: YAML mapping applied on top, e.g. ``"{federation: {rounds: 2}}"``.
- ``output-dir``: run directory (metrics.jsonl, checkpoint/, config.json, final_state.safetensors).
- ``resume``: continue from ``output-dir/checkpoint`` (same configuration but for the rounds).
- ``node-wait-s``: how long to wait for ``federation.num_clients`` SuperNodes to connect.
- ``reply-timeout-s``: how long a round waits for replies; a client that misses it is dropped.
- ``client-evaluation``: after the last round, every client evaluates the final state on its own
  partition (``client_evaluation.json``).
"""

import json
import time
from dataclasses import dataclass, fields
from logging import INFO, WARNING
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from smartfed.federated.config import config_from_dict, config_to_dict, load_config, with_overrides
from smartfed.federated.flower.client_app import (
    CONFIG_JSON,
    NUM_PARTITIONS,
    PARTITION_ID,
    POOL_FINGERPRINT,
    RUN_CONFIG,
)
from smartfed.federated.flower.messages import (
    NUM_EXAMPLES,
    content_to_result,
    evaluation_to_content,
    instructions_to_content,
    wire_size,
)
from smartfed.federated.server import client_instructions, sample_clients, screen_results
from smartfed.federated.simulation import Simulation
from smartfed.federated.task import ClientTrainer

FINAL_STATE_FILE = "final_state.safetensors"
CLIENT_EVALUATION_FILE = "client_evaluation.json"


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's run config, with its defaults."""

    config: str = ""
    overrides: str = ""
    output_dir: str = "smartfed-flower-run"
    resume: bool = False
    node_wait_s: float = 120.0
    reply_timeout_s: float = 3600.0
    client_evaluation: bool = False

    @classmethod
    def from_run_config(cls, run_config) -> "ServerSettings":
        values = {}
        known = {field.name.replace("_", "-"): field for field in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; expected some of {sorted(known)}")
        for key, value in run_config.items():
            field = known[key]
            expected = (int, float) if field.type is float else field.type
            if not isinstance(value, expected) or (field.type is not bool and isinstance(value, bool)):
                raise ValueError(f"run config {key!r} must be a {field.type.__name__}, got {value!r}")
            values[field.name] = field.type(value)
        for key in ("node_wait_s", "reply_timeout_s"):
            if values.get(key, 1.0) <= 0:
                raise ValueError(f"run config {key.replace('_', '-')!r} must be > 0, got {values[key]!r}")
        return cls(**values)

    def run_config(self):
        """The smartfed RunConfig: ``config`` (or the defaults) with ``overrides`` applied."""
        config = load_config(self.config) if self.config else config_from_dict({})
        if not self.overrides:
            return config
        overrides = yaml.safe_load(self.overrides)
        if not isinstance(overrides, dict):
            raise ValueError(f"run config 'overrides' must be a YAML mapping, got {self.overrides!r}")
        return with_overrides(config, **overrides)


def connect_clients(grid: Grid, config, pool_fingerprint, *, wait_s):
    """Wait for ``federation.num_clients`` SuperNodes, send each the run configuration and
    return {client id (partition-id): node id}. Every node must hold a distinct partition and
    the same pool as the server."""
    num_clients = config.federation.num_clients
    deadline = time.monotonic() + wait_s
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(node_ids)} SuperNode(s) connected after {wait_s} s, federation.num_clients needs {num_clients}"
            )
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
    content = RecordDict({RUN_CONFIG: ConfigRecord({CONFIG_JSON: json.dumps(config_to_dict(config))})})
    replies = list(grid.send_and_receive(
        [Message(content, node_id, MessageType.QUERY) for node_id in node_ids], timeout=wait_s
    ))
    clients, problems = {}, []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "SmartFed setup: node %d failed: %s", node_id, reply.error.reason)
            problems.append(f"node {node_id}: {_last_line(reply.error.reason)}")
            continue
        partition_id = int(reply.content.metric_records["node"][PARTITION_ID])
        fingerprint = reply.content.config_records["pool"][POOL_FINGERPRINT]
        if fingerprint != pool_fingerprint:
            problems.append(f"node {node_id}: pool fingerprint {fingerprint[:16]} differs from the server's {pool_fingerprint[:16]}")
        elif partition_id in clients:
            problems.append(f"nodes {clients[partition_id]} and {node_id} both hold partition-id {partition_id}")
        else:
            clients[partition_id] = node_id
    missing = sorted(set(range(num_clients)) - set(clients))
    if problems or missing:
        raise RuntimeError(
            f"cannot map federation.num_clients={num_clients} clients onto SuperNodes {node_ids}: "
            f"{'; '.join(problems) or 'no problem reported'}; partitions without a node: {missing} "
            f"({len(replies)} of {len(node_ids)} nodes replied; each needs --node-config "
            f"'{PARTITION_ID}=I {NUM_PARTITIONS}={num_clients}')"
        )
    return clients


def _last_line(reason):
    """The last non-empty line of a Flower error reason (a whole traceback, ending on the
    exception's message); the full text goes to the log."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


class FlowerRounds(Simulation):
    """``Simulation`` whose clients are SuperNodes reached through ``grid``."""

    def __init__(self, config, output_dir, *, grid, clients, reply_timeout_s, resume, trainer):
        super().__init__(config, output_dir, resume=resume, progress=False, trainer=trainer)
        self.grid = grid
        self.clients = clients
        self.reply_timeout_s = reply_timeout_s

    def _attempt(self, round_index, attempt, accounting):
        config, fed = self.config, self.config.federation
        wire_dtype = config.communication.wire_dtype
        sampled = sample_clients(
            fed.num_clients, fraction=fed.fraction, min_clients=fed.min_clients, seed=config.seed,
            round_index=round_index, attempt=attempt,
        )
        messages = []
        for client_id in sampled:
            content = instructions_to_content(
                client_instructions(self.state, client_id, round_index, config), wire_dtype
            )
            accounting.add_download(wire_size(content))
            messages.append(Message(
                content, self.clients[client_id], MessageType.TRAIN, group_id=f"{round_index}.{attempt}"
            ))
        node_to_client = {self.clients[c]: c for c in sampled}
        replies = {
            node_to_client[reply.metadata.src_node_id]: reply
            for reply in self.grid.send_and_receive(messages, timeout=self.reply_timeout_s)
        }
        received, dropped = {}, []
        for client_id in sampled:
            reply = replies.get(client_id)
            if reply is None:
                dropped.append({"client": client_id, "reason": f"no reply within {self.reply_timeout_s} s"})
            elif reply.has_error():
                log(WARNING, "SmartFed round %d: client %d failed: %s", round_index, client_id, reply.error.reason)
                dropped.append({"client": client_id, "reason": f"client error {reply.error.code}: {_last_line(reply.error.reason)}"})
            else:
                accounting.add_upload(wire_size(reply.content))
                try:
                    received[client_id] = content_to_result(reply.content)
                except Exception as error:  # a reply the server cannot read is the client's fault
                    dropped.append({"client": client_id, "reason": f"undecodable reply: {type(error).__name__}: {error}"})
        valid, rejected = screen_results(self.state, received)
        dropped = sorted(dropped + rejected, key=lambda record: record["client"])
        for client_id, result in valid.items():
            metrics = result.metrics
            accounting.add_client(client_id, metrics["compute_s"], metrics["active_flops"], metrics["peak_memory_bytes"])
        return sampled, valid, [dict(record, attempt=attempt) for record in dropped]


def evaluate_on_clients(grid: Grid, clients, state, quotas, wire_dtype, *, timeout):
    """Each client's loss and accuracy of ``state`` on its own partition, plus their
    example-weighted means."""
    messages = [
        Message(evaluation_to_content(state, quotas, wire_dtype), node_id, MessageType.EVALUATE)
        for node_id in clients.values()
    ]
    node_to_client = {node_id: client_id for client_id, node_id in clients.items()}
    per_client, errors = {}, {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        client_id = node_to_client[reply.metadata.src_node_id]
        if reply.has_error():
            errors[str(client_id)] = _last_line(reply.error.reason)
        else:
            per_client[str(client_id)] = dict(reply.content.metric_records["metrics"])
    total = sum(m[NUM_EXAMPLES] for m in per_client.values())
    means = {
        key: sum(m[key] * m[NUM_EXAMPLES] for m in per_client.values()) / total for key in ("loss", "accuracy")
    } if total else {}
    return {"clients": per_client, "errors": errors, **means}


def run_server(grid: Grid, settings: ServerSettings):
    """All rounds of the configured run on the SuperNodes behind ``grid``, then
    ``final_state.safetensors`` (and with ``client-evaluation`` the clients' scores) in the output
    directory; returns the ``FlowerRounds`` (its ``state`` and ``history``)."""
    config = settings.run_config()
    if config.faults:
        raise ValueError(
            "config 'faults' are injected by the in-process simulation only (smartfed train); "
            "remove them for a Flower run"
        )
    output_dir = Path(settings.output_dir)
    trainer = ClientTrainer(config)
    clients = connect_clients(grid, config, trainer.pool.fingerprint, wait_s=settings.node_wait_s)
    log(INFO, "SmartFed: clients on SuperNodes %s", clients)
    rounds = FlowerRounds(
        config, output_dir, grid=grid, clients=clients, reply_timeout_s=settings.reply_timeout_s,
        resume=settings.resume, trainer=trainer,
    )
    for round_index in range(rounds.state.round + 1, config.federation.rounds + 1):
        record = rounds.run_round(round_index)
        log(
            INFO, "SmartFed round %d/%d: loss %.4f accuracy %.4f bytes up %d down %d dropped %d",
            round_index, config.federation.rounds, record["loss"], record["accuracy"],
            record["bytes_up"], record["bytes_down"], len(record["clients_dropped"]),
        )
    save_file(
        {name: tensor.contiguous() for name, tensor in rounds.state.global_state.items()},
        str(output_dir / FINAL_STATE_FILE),
        metadata={"method": config.method, "round": str(rounds.state.round), "pool_fingerprint": trainer.pool.fingerprint},
    )
    if settings.client_evaluation:
        scores = evaluate_on_clients(
            grid, clients, rounds.state.global_state, rounds.state.quotas, config.communication.wire_dtype,
            timeout=settings.reply_timeout_s,
        )
        (output_dir / CLIENT_EVALUATION_FILE).write_text(json.dumps(scores, indent=1))
        log(INFO, "SmartFed client evaluation: %s", {k: v for k, v in scores.items() if k != "clients"})
    return rounds


def build_server_app(**run_config) -> ServerApp:
    """A ServerApp whose run config starts from ``run_config`` (keys as in pyproject.toml, e.g.
    ``build_server_app(**{"output-dir": "runs/a"})``); what ``flwr run`` passes wins."""
    defaults = ServerSettings.from_run_config(run_config)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        merged = {**{k.replace("_", "-"): v for k, v in vars(defaults).items()}, **context.run_config}
        run_server(grid, ServerSettings.from_run_config(merged))

    return server_app


app = build_server_app()
