"""The fault harness is a grid wrapper (smartfed.federated.faults), not part of the transport:
it works over any Grid, gives an attack every honest update of the round before the strategy sees
any, and hostile replies (another dtype, an unbounded int metric) drop that client, never the run."""

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType

from smartfed.config import load_config, with_overrides
from smartfed.experiments.runs import in_process_grid, open_run
from smartfed.federated import attacks, messages
from smartfed.federated.client import FederatedClient
from smartfed.federated.faults import FaultInjectingGrid
from smartfed.federated.grid import InProcessGrid
from smartfed.federated.grid_wrappers import GridWrapper, PollingGrid
from smartfed.federated.robust import update_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAULTS = {1: {0: "raise", 1: "nan"}, 2: {2: "shape", 3: "timeout"}, 3: {0: "poison", 1: "malformed"}}


def tiny(cache_dir, rounds=3, **overrides):
    return with_overrides(load_config("configs/tiny.yaml"), pool={"cache_dir": str(cache_dir)},
                          federation={"rounds": rounds, "min_clients": 1}, **overrides)


def timeless(reason):
    return re.sub(r"\d+\.\d+ s after", "T s after", reason)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_fault_wrapper_works_over_another_grid_exactly_as_over_the_in_process_one(cache_dir, tmp_path):
    config = tiny(cache_dir, faults=FAULTS)
    reference = open_run(config, tmp_path / "in_process", progress=False)
    reference.start_in_process()
    assert isinstance(in_process_grid(reference), FaultInjectingGrid)

    run = open_run(config, tmp_path / "polled", progress=False)
    clients = InProcessGrid(FederatedClient(run.trainer, run.data, config), 4)
    # PollingGrid talks to the grid inside only through push_messages / pull_messages.
    with FaultInjectingGrid(PollingGrid(clients, poll_s=0.01), config.faults, wire_dtype="fp32") as grid:
        run.start(grid)
    for expected, got in zip(records(tmp_path / "in_process"), records(tmp_path / "polled")):
        assert got["clients_used"] == expected["clients_used"]
        assert [(d["client"], timeless(d["reason"])) for d in got["clients_dropped"]] == [
            (d["client"], timeless(d["reason"])) for d in expected["clients_dropped"]]
        assert got["clients_flagged"] == expected["clients_flagged"] and got["accuracy"] == expected["accuracy"]
    for name, tensor in reference.state.global_state.items():
        assert torch.equal(run.state.global_state[name], tensor), name


def test_an_attack_sees_every_honest_update_before_the_strategy(cache_dir, tmp_path, monkeypatch):
    seen = []

    def honest_mean(byzantine, honest, reference, param, rng):
        assert isinstance(rng, np.random.Generator)
        seen.append((sorted(byzantine), sorted(honest), param))
        mean = {name: torch.stack([state[name] for state in honest.values()]).mean(dim=0) for name in reference}
        shift = {name: reference[name] + param * (mean[name] - reference[name]) for name in reference}
        return {client: shift for client in byzantine}

    monkeypatch.setitem(attacks.ATTACKS, "honest_mean", honest_mean)
    config = tiny(cache_dir)
    run = open_run(config, tmp_path, progress=False)
    replies = []
    with FaultInjectingGrid(in_process_grid(run), {1: {0: "honest_mean:2", 2: "honest_mean:2"}}, seed=3) as grid:
        send_and_receive = grid.inner.send_and_receive

        def recording(messages_sent, *, timeout=None):
            answered = list(send_and_receive(messages_sent, timeout=timeout))
            if messages_sent and messages_sent[0].metadata.message_type == MessageType.TRAIN:
                replies.append({r.metadata.src_node_id: messages.content_to_result(r.content).state
                                for r in answered})
            return answered

        grid.inner.send_and_receive = recording
        initial = {name: tensor.clone() for name, tensor in run.state.global_state.items()}
        run.start(grid, stop_after_round=1)
    assert seen == [([0, 2], [1, 3], 2.0)]
    honest = [replies[0][node] for node in sorted(replies[0]) if node - 1000 in (1, 3)]
    mean = {name: torch.stack([state[name] for state in honest]).mean(dim=0) for name in initial}
    expected_norm = 2.0 * update_norm(mean, initial)
    record = records(tmp_path)[0]
    assert record["update_norms"]["0"] == pytest.approx(expected_norm, rel=1e-5)
    assert record["update_norms"]["2"] == pytest.approx(expected_norm, rel=1e-5)
    with pytest.raises(ValueError, match=r"unknown fault kinds \['no_such_attack'\]"):
        FaultInjectingGrid(grid, {1: {0: "no_such_attack"}})


class HostileReplies(GridWrapper):
    """Round 1: client 1 answers in float64, client 2 with an int metric of 10**400."""

    def send_and_receive(self, messages_sent, *, timeout=None):
        answered = list(self.inner.send_and_receive(messages_sent, timeout=timeout))
        for reply in answered:
            if reply.metadata.message_type != MessageType.TRAIN or not reply.metadata.group_id.startswith("1."):
                continue
            client = reply.metadata.src_node_id - 1000
            if client == 1:
                state = messages.record_to_state(reply.content.array_records["state"])
                reply.content["state"] = ArrayRecord({n: Array(t.double().numpy()) for n, t in state.items()})
            elif client == 2:
                reply.content.metric_records["metrics"]["loss"] = 10**400
        return answered


def test_a_reply_in_another_dtype_or_with_an_unbounded_int_drops_that_client_only(cache_dir, tmp_path):
    config = tiny(cache_dir, rounds=2)
    run = open_run(config, tmp_path, progress=False)
    with HostileReplies(in_process_grid(run)) as grid:
        run.start(grid)
    first, second = records(tmp_path)
    assert [r["status"] for r in (first, second)] == ["completed", "completed"]
    reasons = {d["client"]: d["reason"] for d in first["clients_dropped"]}
    assert first["clients_used"] == [0, 3] and second["clients_used"] == [0, 1, 2, 3]
    assert reasons[1].startswith("undecodable reply: ValueError: tensor ") and "wire dtype is fp32" in reasons[1]
    assert reasons[1].endswith("with dtype 'float64'")
    assert reasons[2] == "metric 'loss' must be a finite number >= 0, got int <an int of 1329 bits>"
