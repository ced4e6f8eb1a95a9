"""The Flower apps (smartfed.federated.flower) against the in-process simulation.

- Message translation: tensors, instructions and results survive the Flower records exactly as
  they survive the in-process wire format (fp32 and bf16), and bad input is refused by name.
- The ServerApp's helpers against a scripted grid: SuperNodes mapped to clients by partition,
  bad nodes refused; missing, unreadable and failed replies dropped with their reasons.
- Flower's simulation engine (2 virtual SuperNodes, 2 rounds) and a real deployment on loopback
  (a SuperLink and two SuperNodes started here, each with its own FLWR_HOME and free ports,
  driven by ``flwr run``) both end on the same aggregated routers as
  ``smartfed.federated.simulation.run_simulation`` with the same configuration and seeds;
  clients that fail under the simulation engine are dropped and the round fails as in-process.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from smartfed.federated.flower import client_app, messages  # noqa: E402
from smartfed.federated.flower.server_app import (  # noqa: E402
    CLIENT_EVALUATION_FILE,
    FINAL_STATE_FILE,
    FlowerRounds,
    ServerSettings,
    build_server_app,
    connect_clients,
)
from smartfed.federated.protocol import ClientInstructions, ClientResult  # noqa: E402
from smartfed.federated.serialization import decode_payload, encode_payload  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "flower_app"
BIN = Path(sys.executable).parent
ROUNDS = 2
NUM_CLIENTS = 2


def random_state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.router_weight": torch.randn(12, 32, generator=generator),
        "model.layers.0.self_attn.q_proj.router_bias": torch.randn(12, generator=generator),
        "model.layers.1.self_attn.v_proj.router_weight": torch.randn(12, 32, generator=generator) * 1e-3,
    }


@pytest.mark.parametrize("wire_dtype", ["fp32", "bf16"])
def test_state_round_trip_matches_in_process_wire_format(wire_dtype):
    state = random_state()
    received = messages.record_to_state(messages.state_to_record(state, wire_dtype))
    expected, _ = decode_payload(encode_payload(state, {}, wire_dtype).data)
    assert list(received) == list(state)
    for name in state:
        assert received[name].dtype == torch.float32
        assert torch.equal(received[name], expected[name]), name
    if wire_dtype == "fp32":
        assert all(torch.equal(received[name], state[name]) for name in state)


def test_state_record_refuses_bad_input():
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        messages.state_to_record(random_state(), "fp16")
    with pytest.raises(TypeError, match="tensor 'ids' must be a floating torch.Tensor"):
        messages.state_to_record({"ids": torch.arange(3)}, "fp32")
    record = ArrayRecord({"w": Array(dtype="float16", shape=(2,), stype="raw-little-endian", data=b"\0" * 4)})
    with pytest.raises(ValueError, match="tensor 'w': expected stype"):
        messages.record_to_state(record)


def test_instructions_and_results_round_trip():
    instructions = ClientInstructions(
        round=3, state=random_state(1), quotas={"model.layers.0.self_attn.q_proj": 5, "model.layers.1.self_attn.v_proj": 3},
        local_steps=4, batch_size=8, lr=0.02, weight_decay=0.1, fedprox_mu=0.01, seed=(1 << 62) + 12345,
    )
    received = messages.content_to_instructions(messages.instructions_to_content(instructions, "fp32"))
    assert received.settings() == instructions.settings()
    assert all(torch.equal(received.state[k], instructions.state[k]) for k in instructions.state)

    without_quotas = ClientInstructions(round=1, state=random_state(2), quotas=None, local_steps=1, batch_size=2, lr=0.1)
    assert messages.content_to_instructions(messages.instructions_to_content(without_quotas, "bf16")).quotas is None

    importance = {"estimator": "cosine", "sums": {"a.q_proj": 1.25, "b.v_proj": 0.5}, "counts": {"a.q_proj": 96, "b.v_proj": 96}}
    metrics = {"loss": 1.5, "compute_s": 0.25, "peak_memory_bytes": 4096, "peak_memory_source": "ru_maxrss_delta", "tokens": 96}
    result = ClientResult(state=random_state(3), num_examples=37, importance=importance, metrics=metrics)
    back = messages.content_to_result(messages.result_to_content(result, "fp32"))
    assert back.num_examples == 37
    assert back.importance == importance
    assert back.metrics == metrics
    assert all(torch.equal(back.state[k], result.state[k]) for k in result.state)
    assert messages.content_to_result(messages.result_to_content(
        ClientResult(state=random_state(4), num_examples=5), "fp32")).importance is None


def test_wire_size_counts_tensors_and_metadata():
    state = random_state()
    content = messages.instructions_to_content(
        ClientInstructions(round=1, state=state, quotas={"m": 2}, local_steps=1, batch_size=2, lr=0.1), "fp32"
    )
    size = messages.wire_size(content)
    tensor_elements = sum(t.numel() for t in state.values())
    assert size.tensor_bytes >= 4 * tensor_elements
    assert size.meta_bytes > 0
    assert size.num_bytes == size.tensor_bytes + size.meta_bytes
    bf16 = messages.wire_size(messages.instructions_to_content(
        ClientInstructions(round=1, state=state, quotas=None, local_steps=1, batch_size=2, lr=0.1), "bf16"))
    assert 2 * tensor_elements <= bf16.tensor_bytes < size.tensor_bytes


def test_malformed_messages_are_refused_by_name():
    with pytest.raises(ValueError, match="a train message needs the record 'instructions'"):
        messages.content_to_instructions(RecordDict({"state": messages.state_to_record(random_state(), "fp32")}))
    with pytest.raises(ValueError, match="a train reply needs the record 'metrics'"):
        messages.content_to_result(RecordDict({"state": messages.state_to_record(random_state(), "fp32")}))
    with pytest.raises(ValueError, match="an evaluate message needs the record 'state'"):
        messages.content_to_evaluation(RecordDict())


def test_server_settings_defaults_and_errors():
    defaults = ServerSettings.from_run_config({})
    assert defaults == ServerSettings()
    assert ServerSettings.from_run_config({"node-wait-s": 5, "resume": True}).node_wait_s == 5.0
    with pytest.raises(ValueError, match=r"unknown run config key\(s\) \['rounds'\]"):
        ServerSettings.from_run_config({"rounds": 3})
    with pytest.raises(ValueError, match="run config 'resume' must be a bool, got 'yes'"):
        ServerSettings.from_run_config({"resume": "yes"})
    with pytest.raises(ValueError, match="run config 'reply-timeout-s' must be > 0"):
        ServerSettings.from_run_config({"reply-timeout-s": 0})
    with pytest.raises(ValueError, match="run config 'overrides' must be a YAML mapping"):
        ServerSettings(overrides="[1, 2]").run_config()
    config = ServerSettings(overrides="{federation: {rounds: 7}}").run_config()
    assert config.federation.rounds == 7


def _context(node_config, state=None):
    return Context(run_id=1, node_id=7, node_config=node_config, state=state or RecordDict(), run_config={})


def test_client_refuses_bad_node_config_and_missing_setup():
    with pytest.raises(ValueError, match=r"node config needs \['partition-id', 'num-partitions'\]"):
        client_app._partition(_context({}), 4)
    with pytest.raises(ValueError, match="num-partitions=2 differs from the run's federation.num_clients=4"):
        client_app._partition(_context({"partition-id": 0, "num-partitions": 2}), 4)
    with pytest.raises(ValueError, match=r"partition-id must lie in \[0, 4\), got 4"):
        client_app._partition(_context({"partition-id": 4, "num-partitions": 4}), 4)
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN,
    )
    message = Message(RecordDict({"x": ConfigRecord({"a": 1})}), metadata=metadata)
    with pytest.raises(RuntimeError, match="before the ServerApp's setup query"):
        client_app.train(message, _context({"partition-id": 0, "num-partitions": 2}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small run configuration on disk and the in-process simulation's result for it.

    Every process of these tests trains with one torch thread (here ``set_num_threads``, Ray's
    actors through ``num_cpus=1``, the deployment through ``OMP_NUM_THREADS``): AdamW divides by
    the root of the squared gradients, so the last-bit differences of another reduction order
    grow past fp32 tolerance within a few steps; with equal threads the results are bitwise equal.
    The pool is trained once into ``pools/`` and read from there by every Flower process."""
    import yaml

    from smartfed.federated.config import config_to_dict, load_config, with_overrides
    from smartfed.federated.simulation import run_simulation

    root = tmp_path_factory.mktemp("flower")
    config = with_overrides(
        load_config(REPO / "configs" / "tiny.yaml"),
        task={"train_examples": 192, "eval_examples": 48},
        pool={"cache_dir": str(root / "pools"), "train_steps": 10},
        federation={"num_clients": NUM_CLIENTS, "rounds": ROUNDS, "local_steps": 3, "min_examples_per_client": 8},
    )
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = run_simulation(config, root / "in_process", progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "config_path": config_path, "outcome": outcome}


def assert_same_run(output_dir, outcome):
    from safetensors.torch import load_file

    final = load_file(str(output_dir / FINAL_STATE_FILE))
    expected = outcome.state.global_state
    assert sorted(final) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert all(r["status"] == "completed" and r["clients_used"] == list(range(NUM_CLIENTS)) for r in records)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    for record, expected_record in zip(records, outcome.history):
        assert record["quotas"] == expected_record["quotas"]
        assert record["accuracy"] == pytest.approx(expected_record["accuracy"], abs=1e-9)
        assert record["loss"] == pytest.approx(expected_record["loss"], rel=1e-5)


@pytest.fixture
def task_identity(monkeypatch):
    """Outside a Flower runtime nobody sets the identity that ``Message(...)`` stamps on new
    messages; the tests that drive the ServerApp's helpers with a scripted grid set one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class ScriptedGrid:
    """Stands in for a Flower Grid: fixed node ids, and for each sent message the reply that
    ``answer(message)`` makes (a RecordDict, an Error, or None for no reply)."""

    def __init__(self, node_ids, answer):
        self.node_ids = list(node_ids)
        self.answer = answer
        self.sent = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            answer = self.answer(message)
            if answer is not None:
                replies.append(Message(answer, reply_to=message))
        return replies


def _setup_reply(partition_id, fingerprint):
    return RecordDict({
        "node": MetricRecord({client_app.PARTITION_ID: partition_id, client_app.NUM_PARTITIONS: 2}),
        "pool": ConfigRecord({client_app.POOL_FINGERPRINT: fingerprint}),
    })


def test_connect_clients_maps_partitions_and_refuses_bad_nodes(task_identity):
    from smartfed.federated.config import config_from_dict

    config = config_from_dict({"federation": {"num_clients": 2}})
    answers = {11: _setup_reply(1, "f" * 64), 12: _setup_reply(0, "f" * 64)}
    grid = ScriptedGrid([11, 12], lambda m: answers[m.metadata.dst_node_id])
    assert connect_clients(grid, config, "f" * 64, wait_s=5) == {0: 12, 1: 11}
    sent = json.loads(grid.sent[0].content.config_records[client_app.RUN_CONFIG][client_app.CONFIG_JSON])
    assert sent["federation"]["num_clients"] == 2
    assert all(m.metadata.message_type == MessageType.QUERY for m in grid.sent)

    answers = {
        11: _setup_reply(0, "f" * 64),
        12: _setup_reply(0, "f" * 64),
        13: Error(code=0, reason="Traceback (most recent call last):\nValueError: node config needs ['partition-id']"),
        14: _setup_reply(1, "e" * 64),
    }
    grid = ScriptedGrid([11, 12, 13, 14], lambda m: answers[m.metadata.dst_node_id])
    with pytest.raises(RuntimeError, match=r"(?s)nodes 11 and 12 both hold partition-id 0.*node 13: ValueError: "
                       r"node config needs.*node 14: pool fingerprint e{16} differs.*partitions without a node: \[1\]"):
        connect_clients(grid, config, "f" * 64, wait_s=5)
    with pytest.raises(TimeoutError, match="1 SuperNode\\(s\\) connected after 0.2 s, federation.num_clients needs 2"):
        connect_clients(ScriptedGrid([11], None), config, "f" * 64, wait_s=0.2)


def test_round_attempt_drops_missing_broken_and_failed_replies(reference, task_identity, tmp_path):
    from smartfed.federated.accounting import RoundAccounting
    from smartfed.federated.config import load_config, with_overrides
    from smartfed.federated.task import ClientTrainer

    config = with_overrides(load_config(reference["config_path"]), federation={"num_clients": 4})
    trainer = ClientTrainer(config)
    state = trainer.initial_state()
    metrics = {"loss": 1.0, "compute_s": 0.5, "active_flops": 1000, "peak_memory_bytes": 0, "peak_memory_source": "test"}
    good = {name: tensor + 0.5 for name, tensor in state.items()}
    answers = {
        10: messages.result_to_content(ClientResult(state=good, num_examples=9, metrics=metrics), "fp32"),
        11: None,
        12: RecordDict({"state": messages.state_to_record(good, "fp32")}),
        13: Error(code=2, reason="Traceback (most recent call last):\nRuntimeError: out of memory\n"),
    }
    grid = ScriptedGrid([10, 11, 12, 13], lambda m: answers[m.metadata.dst_node_id])
    rounds = FlowerRounds(
        config, tmp_path / "run", grid=grid, clients={0: 10, 1: 11, 2: 12, 3: 13}, reply_timeout_s=5.0,
        resume=False, trainer=trainer,
    )
    accounting = RoundAccounting()
    sampled, valid, dropped = rounds._attempt(1, 0, accounting)
    assert sampled == [0, 1, 2, 3]
    assert list(valid) == [0]
    assert valid[0].num_examples == 9
    assert all(torch.equal(valid[0].state[name], good[name]) for name in good)
    assert [(d["client"], d["attempt"]) for d in dropped] == [(1, 0), (2, 0), (3, 0)]
    assert dropped[0]["reason"] == "no reply within 5.0 s"
    assert dropped[1]["reason"].startswith("undecodable reply: ValueError: a train reply needs the record 'metrics'")
    assert dropped[2]["reason"] == "client error 2: RuntimeError: out of memory"
    instructions = messages.content_to_instructions(grid.sent[0].content)
    assert instructions.round == 1 and instructions.quotas == rounds.state.quotas
    assert accounting.bytes_down == sum(messages.wire_size(m.content).num_bytes for m in grid.sent)
    assert accounting.bytes_up == sum(messages.wire_size(answers[n]).num_bytes for n in (10, 12))
    assert accounting.client_compute_s == {"0": 0.5}


def test_simulation_engine_matches_in_process(reference):
    from flwr.simulation import run_simulation

    output_dir = reference["root"] / "simulation_engine"
    server_app = build_server_app(**{
        "config": str(reference["config_path"]), "output-dir": str(output_dir), "client-evaluation": True,
    })
    run_simulation(
        server_app=server_app, client_app=client_app.app, num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert_same_run(output_dir, reference["outcome"])
    scores = json.loads((output_dir / CLIENT_EVALUATION_FILE).read_text())
    assert scores["errors"] == {}
    assert sorted(scores["clients"]) == [str(c) for c in range(NUM_CLIENTS)]
    sizes = [len(part) for part in _partitions(reference)]
    assert [scores["clients"][str(c)]["num-examples"] for c in range(NUM_CLIENTS)] == sizes
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_simulation_engine_drops_failing_clients(reference):
    """Clients that raise (here: past a 1 microsecond time limit) come back as Flower error
    replies; the ServerApp drops them with the reason and fails the round like the simulation."""
    import yaml
    from flwr.simulation import run_simulation

    from smartfed.federated.config import config_to_dict, load_config, with_overrides
    from smartfed.federated.simulation import RoundFailed

    config = with_overrides(load_config(reference["config_path"]), federation={"client_timeout_s": 1e-6, "max_retries": 0})
    config_path = reference["root"] / "timeout.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config)))
    output_dir = reference["root"] / "simulation_engine_timeout"
    server_app = build_server_app(**{"config": str(config_path), "output-dir": str(output_dir)})
    with pytest.raises(RoundFailed, match="round 1: fewer than min_clients=2 valid updates after 1 attempt"):
        run_simulation(
            server_app=server_app, client_app=client_app.app, num_supernodes=NUM_CLIENTS,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    (record,) = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["status"] == "failed"
    assert [d["client"] for d in record["clients_dropped"]] == list(range(NUM_CLIENTS))
    for dropped in record["clients_dropped"]:
        assert dropped["reason"].startswith("client error")
        assert re.search(r"timeout: .* exceeds the 1e-06 s limit", dropped["reason"]), dropped["reason"]
    assert not (output_dir / "checkpoint").exists()


def _partitions(reference):
    from smartfed.federated.assets import task_layout
    from smartfed.federated.config import load_config
    from smartfed.federated.data import federated_data

    config = load_config(reference["config_path"])
    return federated_data(config, task_layout(config)).partitions


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, each in its own process group and FLWR_HOME."""

    def __init__(self, root):
        self.root = root
        self.processes = []  # (name, Popen, log path); SuperLink first
        self.port = _free_port()
        self.cli_env = self.env("cli")
        (Path(self.cli_env["FLWR_HOME"]) / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def start(self, num_nodes):
        link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--database", str(self.root / "superlink.db")]
        self._start("superlink", link)
        self._wait_for_superlink()
        for index in range(num_nodes):
            node = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(_free_port()),
                    "--node-config", f"partition-id={index} num-partitions={num_nodes}"]
            self._start(f"supernode{index}", node)

    def env(self, name):
        home = self.root / f"flwr_home_{name}"
        home.mkdir(exist_ok=True)
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return dict(
            os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONPATH=python_path, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def _start(self, name, command):
        log_path = self.root / f"{name}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [str(BIN / command[0]), *command[1:]], env=self.env(name), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append((name, process, log_path))

    def _wait_for_superlink(self, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.processes[0][1].poll() is not None:
                    raise RuntimeError(f"SuperLink not listening on port {self.port}:\n{self.logs()}")
                time.sleep(0.2)

    def flwr(self, *args, timeout_s=60):
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.cli_env, capture_output=True, text=True, timeout=timeout_s,
        )

    def logs(self, tail=3000):
        return "\n".join(f"--- {name}:\n{path.read_text()[-tail:]}" for name, _, path in self.processes)

    def stop(self):
        """SuperNodes first, then the SuperLink: each process group (a node or link and the app
        processes it started) gets SIGTERM, SIGKILL after 15 s, then SIGKILL for any member that
        outlived its leader."""
        nodes = [process for name, process, _ in self.processes if name != "superlink"]
        links = [process for name, process, _ in self.processes if name == "superlink"]
        for group in (nodes, links):
            for process in group:
                _signal_group(process, signal.SIGTERM)
            for process in group:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _signal_group(process, signal.SIGKILL)
                    process.wait(timeout=15)
                _signal_group(process, signal.SIGKILL)


def _signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


@pytest.fixture
def loopback_federation(reference):
    root = reference["root"] / "deployment"
    root.mkdir()
    federation = LoopbackFederation(root)
    try:
        federation.start(NUM_CLIENTS)
        yield federation
    finally:
        federation.stop()


def test_deployment_on_loopback_matches_in_process(reference, loopback_federation):
    federation = loopback_federation
    output_dir = reference["root"] / "deployment_run"
    run_config = f"config='{reference['config_path']}' output-dir='{output_dir}' node-wait-s=60.0"
    launched = federation.flwr("run", str(APP_DIR), "loopback", "--stream", "--run-config", run_config, timeout_s=300)
    report = f"flwr run:\n{launched.stdout[-4000:]}\n{launched.stderr[-2000:]}\n{federation.logs()}"
    run_id = re.search(r"Successfully started run (\d+)", launched.stdout)
    assert run_id is not None, report
    listed = federation.flwr("ls", "loopback", "--run-id", run_id.group(1), "--format", "json")
    statuses = [run["status"] for run in json.loads(listed.stdout).get("runs", [])]
    assert statuses == ["finished:completed"], f"flwr ls: {listed.stdout}\n{report}"
    assert_same_run(output_dir, reference["outcome"])
