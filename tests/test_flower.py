"""The Flower apps (smartfed.experiments.flower_apps) and the strategy over Flower's grids,
against the in-process engine.

- The ClientApp refuses a bad node config and messages before the setup query.
- The strategy against a scripted grid: nodes mapped to clients by partition, bad nodes refused;
  missing, unreadable and failed replies dropped with their reasons, every byte counted.
- Flower's simulation engine (2 virtual SuperNodes, 2 rounds) and a real deployment on loopback
  (a SuperLink with TLS and SuperNode authentication and two registered SuperNodes, started by
  ``smartfed.experiments.local_federation``, driven by ``flwr run``) both end on exactly the
  routers (max difference 0.0) of ``smartfed.experiments.runs.run_in_process`` with the same
  configuration and seeds: the same ``SmartFedStrategy`` over another grid; clients that fail
  under the simulation engine are dropped and the round fails as in-process.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from smartfed.experiments import flower_apps
from smartfed.experiments.federation_keys import make_federation_keys
from smartfed.experiments.local_federation import LocalFederation
from smartfed.federated import client, messages
from smartfed.federated.protocol import ClientResult
from smartfed.federated.run_dir import CLIENT_EVALUATION_FILE, FINAL_STATE_FILE
from smartfed.federated.strategy import ATTEMPT, RoundFailed

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "flower_app"
ROUNDS = 2
NUM_CLIENTS = 2


def _context(node_config, state=None):
    return Context(run_id=1, node_id=7, node_config=node_config, state=state or RecordDict(), run_config={})


def test_client_refuses_bad_node_config_and_missing_setup():
    with pytest.raises(ValueError, match=r"node config needs \['partition-id', 'num-partitions'\]"):
        flower_apps.partition_of(_context({}), 4)
    with pytest.raises(ValueError, match="num-partitions=2 differs from the run's federation.num_clients=4"):
        flower_apps.partition_of(_context({"partition-id": 0, "num-partitions": 2}), 4)
    with pytest.raises(ValueError, match=r"partition-id must lie in \[0, 4\), got 4"):
        flower_apps.partition_of(_context({"partition-id": 4, "num-partitions": 4}), 4)
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN,
    )
    message = Message(RecordDict({"x": ConfigRecord({"a": 1})}), metadata=metadata)
    with pytest.raises(RuntimeError, match="before the ServerApp's setup query"):
        flower_apps.train(message, _context({"partition-id": 0, "num-partitions": 2}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small run configuration on disk and the in-process engine's result for it.

    Every process of these tests trains with one torch thread (here ``set_num_threads``, Ray's
    actors through ``num_cpus=1``, the deployment through ``OMP_NUM_THREADS``): AdamW divides by
    the root of the squared gradients, so the last-bit differences of another reduction order
    grow past fp32 tolerance within a few steps; with equal threads the results are bitwise equal.
    The pool is trained once into ``pools/`` and read from there by every Flower process."""
    import yaml

    from smartfed.config import config_to_dict, load_config, with_overrides
    from smartfed.experiments.runs import run_in_process

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
        outcome = run_in_process(config, root / "in_process", progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "config_path": config_path, "outcome": outcome}


def assert_same_run(output_dir, outcome):
    from safetensors.torch import load_file

    final = load_file(str(output_dir / FINAL_STATE_FILE))
    expected = outcome.state.global_state
    assert sorted(final) == sorted(expected)
    assert max(float((final[name] - tensor).abs().max()) for name, tensor in expected.items()) == 0.0
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert all(r["status"] == "completed" and r["clients_used"] == list(range(NUM_CLIENTS)) for r in records)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    for record, expected_record in zip(records, outcome.history):
        assert record["quotas"] == expected_record["quotas"]
        assert record["accuracy"] == expected_record["accuracy"]
        # The ServerApp evaluates with its process's torch threads: the loss may differ in the last bits.
        assert record["loss"] == pytest.approx(expected_record["loss"], rel=1e-6)
        assert (record["bytes_up"], record["bytes_down"]) == (expected_record["bytes_up"], expected_record["bytes_down"])


@pytest.fixture
def task_identity():
    """Outside a Flower runtime nobody sets the identity that ``Message(...)`` stamps on new
    messages; the tests that drive the ServerApp's helpers with a scripted grid set one."""
    from smartfed.federated.flower_compat import set_task_identity

    set_task_identity(run_id=1, node_id=1)


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
        client.NODE: MetricRecord({client.PARTITION_ID: partition_id, client.NUM_PARTITIONS: 2}),
        client.POOL: ConfigRecord({client.POOL_FINGERPRINT: fingerprint}),
    })


def _strategy(reference, output_dir, **federation):
    from smartfed.config import load_config, with_overrides
    from smartfed.experiments.runs import open_run

    config = with_overrides(load_config(reference["config_path"]), federation=federation)
    return open_run(config, output_dir, progress=False, timeout=5.0).strategy


def test_connect_maps_partitions_and_refuses_bad_nodes(reference, task_identity, tmp_path):
    strategy = _strategy(reference, tmp_path / "run")
    pool = strategy.trainer.pool_fingerprint
    answers = {11: _setup_reply(1, pool), 12: _setup_reply(0, pool)}
    grid = ScriptedGrid([11, 12], lambda m: answers[m.metadata.dst_node_id])
    assert strategy.connect(grid, wait_s=5) == {0: 12, 1: 11}
    sent = json.loads(client.setup_config_json(grid.sent[0].content))
    assert sent["federation"]["num_clients"] == 2
    assert all(m.metadata.message_type == MessageType.QUERY for m in grid.sent)

    answers = {
        11: _setup_reply(0, pool),
        12: _setup_reply(0, pool),
        13: Error(code=0, reason="Traceback (most recent call last):\nValueError: node config needs ['partition-id']"),
        14: _setup_reply(1, "e" * 64),
    }
    grid = ScriptedGrid([11, 12, 13, 14], lambda m: answers[m.metadata.dst_node_id])
    with pytest.raises(RuntimeError, match=r"(?s)nodes 11 and 12 both hold partition-id 0.*node 13: ValueError: "
                       r"node config needs.*node 14: pool fingerprint e{16} differs.*partitions without a node: \[1\]"):
        strategy.connect(grid, wait_s=5)
    with pytest.raises(TimeoutError, match="1 SuperNode\\(s\\) connected after 0.2 s, federation.num_clients needs 2"):
        strategy.connect(ScriptedGrid([11], None), wait_s=0.2)


def test_connect_takes_only_the_listed_nodes(reference, task_identity, tmp_path):
    """A registered stranger (node 99) claiming a taken partition is ignored when the run lists
    its nodes: it is never sent the setup query and cannot contest partition 0."""
    strategy = _strategy(reference, tmp_path / "run")
    pool = strategy.trainer.pool_fingerprint
    answers = {11: _setup_reply(1, pool), 12: _setup_reply(0, pool), 99: _setup_reply(0, pool)}
    grid = ScriptedGrid([11, 12, 99], lambda m: answers[m.metadata.dst_node_id])
    assert strategy.connect(grid, wait_s=5, listed=(11, 12)) == {0: 12, 1: 11}
    assert strategy.contested == {} and sorted(m.metadata.dst_node_id for m in grid.sent) == [11, 12]
    with pytest.raises(TimeoutError, match=r"1 SuperNode\(s\) of the listed nodes \[11, 12\] connected after 0.2 s"):
        strategy.connect(ScriptedGrid([11, 99], None), wait_s=0.2, listed=(11, 12))
    with pytest.raises(RuntimeError, match="nodes 12 and 99 both hold partition-id 0"):
        strategy.connect(ScriptedGrid([11, 12, 99], lambda m: answers[m.metadata.dst_node_id]), wait_s=5)


def test_train_round_drops_missing_broken_and_failed_replies(reference, task_identity, tmp_path):
    strategy = _strategy(reference, tmp_path / "run", num_clients=4)
    state = strategy.trainer.initial_state()
    metrics = {"loss": 1.0, "compute_s": 0.5, "active_flops": 1000, "peak_memory_bytes": 0, "peak_memory_source": "test"}
    good = {name: tensor + 0.5 for name, tensor in state.items()}
    answers = {
        10: messages.result_to_content(ClientResult(state=good, num_examples=9, metrics=metrics), "fp32"),
        11: None,
        12: RecordDict({"state": messages.state_to_record(good, "fp32")}),
        13: Error(code=2, reason="Traceback (most recent call last):\nRuntimeError: out of memory\n"),
    }
    grid = ScriptedGrid([10, 11, 12, 13], lambda m: answers[m.metadata.dst_node_id])
    strategy.clients = {0: 10, 1: 11, 2: 12, 3: 13}
    arrays = messages.state_to_record(state, "fp32")
    sent = strategy.configure_train(1, arrays, ConfigRecord({ATTEMPT: 0}), grid)
    # One valid update of the two that min_clients needs: no aggregate, the state stays put.
    assert strategy.aggregate_train(1, grid.send_and_receive(sent, timeout=strategy.timeout)) == (None, None)
    assert strategy.state.round == 0
    assert all(torch.equal(strategy.state.global_state[name], state[name]) for name in state)
    progress = strategy.round_progress
    assert progress.sampled == [[0, 1, 2, 3]]
    assert [(d["client"], d["attempt"]) for d in progress.dropped] == [(1, 0), (2, 0), (3, 0)]
    assert progress.dropped[0]["reason"] == "no reply within 5.0 s"
    assert progress.dropped[1]["reason"].startswith("undecodable reply: ValueError: a train reply needs the record 'metrics'")
    assert progress.dropped[2]["reason"] == "client error 2: RuntimeError: out of memory"
    instructions = messages.content_to_instructions(grid.sent[0].content)
    assert instructions.round == 1 and instructions.quotas == strategy.state.quotas
    accounting = progress.accounting
    assert accounting.bytes_down == sum(messages.wire_size(m.content).num_bytes for m in grid.sent)
    assert accounting.bytes_up == sum(messages.wire_size(answers[n]).num_bytes for n in (10, 12))
    assert accounting.client_compute_s == {"0": 0.5}

    # The retry (attempt 1) samples afresh; two good replies close the round.
    answers.update({11: answers[10], 13: answers[10]})
    sent = strategy.configure_train(1, arrays, ConfigRecord({ATTEMPT: 1}), grid)
    arrays, train_metrics = strategy.aggregate_train(1, grid.send_and_receive(sent, timeout=strategy.timeout))
    assert strategy.state.round == 1 and len(progress.sampled) == 2
    assert all(torch.equal(messages.record_to_state(arrays)[name], good[name]) for name in good)
    # Each client weighs the examples of the partition the server assigned it, not its claim of 9.
    assert train_metrics["num-examples"] == sum(strategy.partition_sizes[c] for c in progress.valid)
    assert all("claimed 9 examples" in flag["reason"] for flag in progress.flagged)


@pytest.fixture
def ray_at_our_priority(monkeypatch):
    """Ray starts its workers at nice 15: beside other work (a load of 8 on 2 cores) the virtual
    clients then starve and the setup query times out. They run at this process's priority."""
    monkeypatch.setenv("RAY_worker_niceness", str(os.nice(0)))


def test_simulation_engine_matches_in_process(reference, ray_at_our_priority):
    pytest.importorskip("ray", reason="Flower's simulation engine needs the flower extra (flwr[simulation])")
    from flwr.simulation import run_simulation

    output_dir = reference["root"] / "simulation_engine"
    server_app = flower_apps.build_server_app(output_root=reference["root"], **{
        "config": str(reference["config_path"]), "output-dir": output_dir.name, "client-evaluation": True,
    })
    run_simulation(
        server_app=server_app, client_app=flower_apps.client_app, num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert_same_run(output_dir, reference["outcome"])
    scores = json.loads((output_dir / CLIENT_EVALUATION_FILE).read_text())
    assert scores["errors"] == {}
    assert sorted(scores["clients"]) == [str(c) for c in range(NUM_CLIENTS)]
    sizes = [len(part) for part in _partitions(reference)]
    assert [scores["clients"][str(c)]["num-examples"] for c in range(NUM_CLIENTS)] == sizes
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_simulation_engine_runs_secagg_plus(reference, ray_at_our_priority):
    """SecAgg+ through Flower's simulation engine: each SuperNode's context keeps the protocol's
    state between its stages; the sums match the in-process run's plain FedAvg within the
    quantization of the protocol."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs the flower extra (flwr[simulation])")
    import yaml
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file

    from smartfed.config import config_to_dict, load_config, with_overrides

    config = with_overrides(load_config(reference["config_path"]), privacy={"secagg": {"enabled": True}},
                            robustness={"norm_bound": {"mode": "none"}})
    config_path = reference["root"] / "secagg.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config)))
    output_dir = reference["root"] / "simulation_engine_secagg"
    server_app = flower_apps.build_server_app(output_root=reference["root"],
                                              **{"config": str(config_path), "output-dir": output_dir.name})
    run_simulation(
        server_app=server_app, client_app=flower_apps.client_app, num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["completed"] * ROUNDS
    assert all(r["clients_used"] == list(range(NUM_CLIENTS)) and r["privacy"]["clients"] == NUM_CLIENTS for r in records)
    final = load_file(str(output_dir / FINAL_STATE_FILE))
    expected = reference["outcome"].state.global_state
    assert max(float((final[name] - tensor).abs().max()) for name, tensor in expected.items()) < 1e-3


def test_simulation_engine_drops_failing_clients(reference, ray_at_our_priority):
    """Clients that raise (here: past a 1 microsecond time limit) come back as Flower error
    replies; the ServerApp drops them with the reason and fails the round like the simulation."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs the flower extra (flwr[simulation])")
    import yaml
    from flwr.simulation import run_simulation

    from smartfed.config import config_to_dict, load_config, with_overrides

    config = with_overrides(load_config(reference["config_path"]), federation={"client_timeout_s": 1e-6, "max_retries": 0})
    config_path = reference["root"] / "timeout.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config)))
    output_dir = reference["root"] / "simulation_engine_timeout"
    server_app = flower_apps.build_server_app(output_root=reference["root"],
                                              **{"config": str(config_path), "output-dir": output_dir.name})
    with pytest.raises(RoundFailed, match="round 1: fewer than min_clients=2 valid updates after 1 attempt"):
        run_simulation(
            server_app=server_app, client_app=flower_apps.client_app, num_supernodes=NUM_CLIENTS,
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
    from smartfed.config import load_config
    from smartfed.experiments.assets import task_layout
    from smartfed.experiments.runs import federated_data

    config = load_config(reference["config_path"])
    return federated_data(config, task_layout(config)).partitions


@pytest.fixture
def loopback_federation(reference):
    """A SuperLink with TLS and SuperNode authentication and two registered SuperNodes on
    127.0.0.1 (docs/flower.md), each process with one torch thread; and a third SuperNode whose
    own key someone else registered, claiming partition 0."""
    root = reference["root"] / "deployment"
    keys = make_federation_keys(root / "keys", NUM_CLIENTS + 1)
    with LocalFederation(root / "federation", keys, env={"OMP_NUM_THREADS": "1"}) as federation:
        federation.start(NUM_CLIENTS)
        federation.register(NUM_CLIENTS)
        federation.start_supernode(NUM_CLIENTS, f"partition-id=0 num-partitions={NUM_CLIENTS}", name="outsider")
        federation.wait_for_online(NUM_CLIENTS + 1)
        yield federation


def test_deployment_on_loopback_matches_in_process(reference, loopback_federation):
    """The run lists its nodes: the outsider's claim on partition 0 is ignored, not fatal."""
    federation = loopback_federation
    output_dir = federation.output_root / "deployment_run"
    run_config = (f"config='{reference['config_path']}' output-dir='{output_dir.name}' node-wait-s=60.0 "
                  f"{federation.nodes_run_config()}")
    run_id, status, output = federation.run_app(APP_DIR, run_config, timeout_s=300)
    assert status == "finished:completed", f"run {run_id}: {status}\n{output[-4000:]}\n{federation.logs()}"
    assert_same_run(output_dir, reference["outcome"])
