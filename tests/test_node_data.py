"""Each client's own data (issue 21 item 4): ``task.data.train`` null, every SuperNode reads only
the file its node config names (``data-path``), the server only its own held-out file.

- A node builds its client from its own file alone and declares its example count at setup; a
  missing ``data-path`` is one line naming the node config key.
- The server weights a client by the count its node declared, capped at
  ``robustness.max_claimed_examples``: a node claiming 10**9 examples moves the global state by
  exactly its capped share, and no further.
- A node whose setup fails (its file is missing) is screened: the run goes on without it, each of
  its rounds records why. Without a held-out file of its own, the server takes the clients' scores
  of their own held-out examples as the round's.
- A loopback deployment (TLS, authenticated SuperNodes): three SuperNodes each given its own file
  and a fourth whose file does not exist. The run completes on the three; a ``sys.addaudithook``
  audit of every process shows that the ServerApp never opens a client's file and that each
  SuperNode's client opens its own file and no other.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict
from tiny_data import build_tokenizer, instruction_rows, save_tiny_model, write_rows

from smartfed.data_errors import DatasetError
from smartfed.experiments.open_audit import AUDIT_ENV
from smartfed.federated import client as protocol, messages
from smartfed.federated.protocol import ClientResult

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "flower_app"
CLIENTS = 4  # three with their own file, the fourth's file is missing
ROWS_PER_CLIENT = 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def client_rows(client_id):
    rows = instruction_rows(ROWS_PER_CLIENT + client_id)  # sizes differ, so counts tell clients apart
    return [dict(row, source=f"client{client_id}-{index}") for index, row in enumerate(rows)]


@pytest.fixture(scope="module")
def federation_files(tmp_path_factory):
    """A tiny random Llama folder with a chat tokenizer, each client's file, the server's held-out
    file, the run config (no client path in it) with its pool trained once, and the caches."""
    from smartfed.config import config_from_dict, config_to_dict
    from smartfed.experiments.assets import build_tiny_pool

    root = tmp_path_factory.mktemp("node_data")
    model = save_tiny_model(root / "model", "llama", tokenizer=build_tokenizer(chat=True))
    files = {client_id: write_rows(root / "clients" / f"client_{client_id}.jsonl", client_rows(client_id))
             for client_id in range(CLIENTS - 1)}
    files[CLIENTS - 1] = root / "clients" / "missing.jsonl"
    server_eval = write_rows(root / "server" / "eval.jsonl", instruction_rows(6))
    config = config_from_dict({
        "seed": 1, "model": {"tiny": None, "pretrained": str(model)},
        "pool": {"cache_dir": str(root / "pools"), "train_steps": 3, "batch_size": 8},
        "more": {"top_k": 2, "router_dim": 4},
        "federation": {"num_clients": CLIENTS, "rounds": 2, "min_clients": 3, "local_steps": 2, "batch_size": 4,
                       "max_retries": 0},
        "robustness": {"max_claimed_examples": 100},
        "task": {"data": {"shape": "instruction", "eval": str(server_eval), "max_length": 32,
                          "generation": {"every_rounds": 2, "max_new_tokens": 3, "batch_size": 4}}},
    })
    build_tiny_pool(config, progress=False)
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config)))
    return {"root": root, "config": config, "config_path": config_path, "files": files, "server_eval": server_eval,
            "cache": root / "cache"}


@pytest.fixture
def private_cache(federation_files, monkeypatch):
    monkeypatch.setenv("SMARTFED_CACHE", str(federation_files["cache"]))


def node_client(config, client_id, path):
    from smartfed.experiments.runs import build_client

    return build_client(config, client_id=client_id, node_config={"data-path": str(path)})


def test_a_node_builds_its_client_from_its_own_file_and_declares_its_count(federation_files, private_cache):
    config, files = federation_files["config"], federation_files["files"]
    node = node_client(config, 1, files[1])
    assert list(node.data.clients) == [1]
    train, held_out = node.data.clients[1], node.data.held_out[1]
    responses = {row["response"] for row in client_rows(1)}
    assert len(train) + len(held_out) == ROWS_PER_CLIENT + 1 and len(held_out) == round(0.2 * (ROWS_PER_CLIENT + 1))
    assert set(held_out.references) <= responses and held_out.generation is None
    assert node.data.evaluation is None and node.data.partitions is None
    from flwr.app import Message, MessageType

    from smartfed.federated.flower_compat import set_task_identity

    set_task_identity(run_id=1, node_id=1)
    reply = node.setup(Message(protocol.setup_content("{}"), 7, MessageType.QUERY), 1)
    assert reply.content.metric_records[protocol.NODE][messages.NUM_EXAMPLES] == len(train)


def test_an_honest_node_declares_and_reports_its_count_capped(federation_files, private_cache):
    """Above ``robustness.max_claimed_examples`` an honest node declares the cap, at setup and in
    each train reply, so the server (which weights by the cap anyway) never flags it."""
    from flwr.app import Message, MessageType

    from smartfed.config import with_overrides
    from smartfed.federated.flower_compat import set_task_identity

    cap = 3
    config = with_overrides(federation_files["config"], robustness={"max_claimed_examples": cap})
    node = node_client(config, 1, federation_files["files"][1])
    assert len(node.data.clients[1]) > cap
    set_task_identity(run_id=1, node_id=1)
    reply = node.setup(Message(protocol.setup_content("{}"), 7, MessageType.QUERY), 1)
    assert reply.content.metric_records[protocol.NODE][messages.NUM_EXAMPLES] == cap
    assert node.claimed(len(node.data.clients[1])) == cap and node.claimed(cap - 1) == cap - 1


def test_a_node_without_its_file_fails_in_one_line(federation_files, private_cache):
    config, files = federation_files["config"], federation_files["files"]
    with pytest.raises(DatasetError, match=rf"^node config data-path: {files[CLIENTS - 1]} does not exist$"):
        node_client(config, CLIENTS - 1, files[CLIENTS - 1])
    from smartfed.experiments.runs import build_client

    with pytest.raises(DatasetError, match=r"^node config data-path: missing; .* --node-config \"partition-id=I "):
        build_client(config, client_id=0, node_config={})


class ScriptedNodes:
    """A grid of nodes 10.. that answer the setup query with ``declared`` example counts and each
    train message with ``states[client]`` claiming ``claims[client]`` examples."""

    def __init__(self, declared, states, claims):
        self.declared, self.states, self.claims = declared, states, claims

    def get_node_ids(self):
        return [10 + client for client in self.declared]

    def send_and_receive(self, sent, *, timeout=None):
        from flwr.app import Message, MessageType

        replies = []
        for message in sent:
            client_id = message.metadata.dst_node_id - 10
            if message.metadata.message_type == MessageType.QUERY:
                content = RecordDict({
                    protocol.NODE: MetricRecord({protocol.PARTITION_ID: client_id, protocol.NUM_PARTITIONS: 3,
                                                 messages.NUM_EXAMPLES: self.declared[client_id]}),
                    protocol.POOL: ConfigRecord({protocol.POOL_FINGERPRINT: self.fingerprint}),
                })
            else:
                metrics = {"loss": 1.0, "compute_s": 0.1, "active_flops": 10, "peak_memory_bytes": 1,
                           "peak_memory_source": "test"}
                content = messages.result_to_content(ClientResult(
                    state=self.states[client_id], num_examples=self.claims[client_id], metrics=metrics), "fp32")
            replies.append(Message(content, reply_to=message))
        return replies


def test_a_client_claiming_a_billion_examples_moves_the_model_by_its_capped_share_only(federation_files, tmp_path,
                                                                                        private_cache):
    from smartfed.config import with_overrides
    from smartfed.experiments.runs import open_run
    from smartfed.federated.flower_compat import set_task_identity
    from smartfed.federated.strategy import ATTEMPT

    set_task_identity(run_id=1, node_id=1)
    config = with_overrides(federation_files["config"], federation={"num_clients": 3, "min_clients": 3},
                            robustness={"norm_bound": {"mode": "none"}, "max_claimed_examples": 100})
    strategy = open_run(config, tmp_path / "run", progress=False, timeout=5.0).strategy
    state = strategy.trainer.initial_state()
    generator = torch.Generator().manual_seed(5)
    honest = [{name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator) for name, tensor in state.items()}
              for _ in range(2)]
    liar = {name: tensor + 10.0 * torch.randn(tensor.shape, generator=generator) for name, tensor in state.items()}
    grid = ScriptedNodes(declared={0: 30, 1: 50, 2: 10**9}, states={0: honest[0], 1: honest[1], 2: liar},
                         claims={0: 30, 1: 50, 2: 10**9})
    grid.fingerprint = strategy.trainer.pool_fingerprint
    strategy.connect(grid, wait_s=5)
    assert strategy.partition_sizes == {0: 30, 1: 50, 2: 100}
    sent = strategy.configure_train(1, messages.state_to_record(state, "fp32"), ConfigRecord({ATTEMPT: 0}), grid)
    arrays, train_metrics = strategy.aggregate_train(1, grid.send_and_receive(sent))
    new = messages.record_to_state(arrays)
    share = 100 / (30 + 50 + 100)
    for name in state:
        expected = (30 * honest[0][name].double() + 50 * honest[1][name].double() + 100 * liar[name].double()) / 180
        torch.testing.assert_close(new[name].double(), expected, rtol=1e-5, atol=1e-5)
        # The liar's pull on the model is its capped share of its update, nothing more.
        liar_pull = (new[name].double() - state[name].double()).norm()
        bound = share * (liar[name] - state[name]).double().norm() + (honest[0][name] - state[name]).double().norm() \
            + (honest[1][name] - state[name]).double().norm()
        assert liar_pull <= bound
    assert train_metrics["num-examples"] == 180
    assert any("claimed 1000000000 examples" in flag["reason"] for flag in strategy.round_progress.flagged)


class NodesInProcess:
    """The in-process grid's client of several nodes, each built from its own files; a node
    without its file fails every message, as its SuperNode's ClientApp would."""

    def __init__(self, config, files):
        self.nodes = {}
        for client_id, path in files.items():
            try:
                self.nodes[client_id] = node_client(config, client_id, path)
            except DatasetError as error:
                self.nodes[client_id] = error

    def handle(self, msg, partition_id):
        node = self.nodes[partition_id]
        if isinstance(node, Exception):
            raise node
        return node.handle(msg, partition_id)


def test_a_node_without_its_file_is_screened_and_the_clients_score_the_rounds(federation_files, tmp_path,
                                                                               private_cache):
    from smartfed.config import with_overrides
    from smartfed.experiments.runs import open_run
    from smartfed.federated.grid import InProcessGrid

    config = with_overrides(federation_files["config"], task={"data": {
        **federation_files["config"].task.data.model_dump(), "eval": None}})
    run = open_run(config, tmp_path / "run", progress=False)
    assert run.data.evaluation is None
    with InProcessGrid(NodesInProcess(config, federation_files["files"]), CLIENTS) as grid:
        run.start(grid)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["completed", "completed"]
    for record in records:
        assert record["clients_used"] == [0, 1, 2] and record["scored_by"] == "clients"
        (dropped,) = record["clients_dropped"]
        assert dropped["client"] == 3 and "no node holds this partition" in dropped["reason"]
        assert "missing.jsonl does not exist" in dropped["reason"]
        scores = record["client_scores"]  # only mapped clients are asked
        assert sorted(scores) == ["0", "1", "2"] and record["client_evaluation_errors"] == {}
        total = sum(s["num-examples"] for s in scores.values())
        assert record["loss"] == pytest.approx(sum(s["loss"] * s["num-examples"] for s in scores.values()) / total)
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
        assert "exact_match" not in record  # clients score their own held-out examples without generating


def test_supernodes_read_only_their_own_files_and_the_server_none(federation_files, tmp_path):
    """The loopback deployment of docs/flower.md with each client's own file (smartfed federation
    --node-data), every process auditing its opens."""
    from smartfed.experiments.federation_keys import make_federation_keys
    from smartfed.experiments.local_federation import LocalFederation

    files = federation_files["files"]
    audit = tmp_path / "audit"
    audit.mkdir()
    env = {"OMP_NUM_THREADS": "1", AUDIT_ENV: str(audit), "SMARTFED_CACHE": str(federation_files["cache"])}
    keys = make_federation_keys(tmp_path / "keys", CLIENTS)
    with LocalFederation(tmp_path / "federation", keys, env=env) as federation:
        federation.start(CLIENTS, node_data=files)
        run_config = (f"config='{federation_files['config_path']}' output-dir='own_data' node-wait-s=60.0 "
                      f"reply-timeout-s=300.0 {federation.nodes_run_config()}")
        run_id, status, output = federation.run_app(APP_DIR, run_config, timeout_s=600)
        logs = federation.logs()
    assert status == "finished:completed", f"run {run_id}: {status}\n{output[-4000:]}\n{logs}"
    run_dir = federation.output_root / "own_data"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert all(r["clients_used"] == [0, 1, 2] for r in records)
    for record in records:
        (dropped,) = record["clients_dropped"]
        assert dropped["client"] == 3 and "missing.jsonl does not exist" in dropped["reason"]
    assert {"perplexity", "exact_match", "f1", "rouge_l"} <= set(records[-1])  # the server's own held-out file
    assert str(files[0].parent) not in (run_dir / "config.json").read_text()  # the run config names no client file

    client_files = {str(path.resolve()) for path in files.values()}
    opened = {path.name: set(path.read_text().splitlines()) for path in audit.iterdir()}
    server = [paths for name, paths in opened.items() if name.startswith("serverapp-")]
    assert server and str(federation_files["server_eval"].resolve()) in set().union(*server)
    assert not client_files & set().union(*server)
    workers = [paths & client_files for name, paths in opened.items() if name.startswith("client-worker-")]
    assert sorted(len(paths) for paths in workers) == [0, 1, 1, 1]  # the fourth node's file is not there to open
    assert set().union(*workers) == {str(files[c].resolve()) for c in range(CLIENTS - 1)}
