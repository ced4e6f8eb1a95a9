import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from flwr.app import MessageType

from smartfed.config import ConfigError, config_from_dict, load_config, with_overrides
from smartfed.experiments import train
from smartfed.experiments.runs import build_trainer, federated_data, in_process_grid, open_run, run_in_process
from smartfed.federated.checkpoint import load_checkpoint
from smartfed.federated.messages import wire_size
from smartfed.federated.strategy import RoundFailed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(cache_dir, **overrides):
    config = config_from_dict({
        "seed": 3,
        "task": {"train_examples": 128, "eval_examples": 32, "seq_len": 8},
        "pool": {"cache_dir": str(cache_dir), "train_steps": 5, "batch_size": 16},
        "more": {"top_k": 4},
        "eeqa": {"every_rounds": 2, "tau": 4.0, "client_budgets": {1: 0.5}},
        "federation": {
            "num_clients": 4, "rounds": 4, "min_clients": 2, "local_steps": 2, "batch_size": 8,
            "min_examples_per_client": 4, "max_retries": 1,
        },
    })
    return with_overrides(config, **overrides) if overrides else config


def read_metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    outcome = run_in_process(tiny_config(cache_dir), output, progress=False)
    return outcome, output


def assert_same_routers(first, second):
    assert sorted(first) == sorted(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_uninterrupted_run_logs_every_round(uninterrupted):
    outcome, output = uninterrupted
    records = read_metrics(output)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["status"] == "completed" and record["clients_used"] == [0, 1, 2, 3]
        assert record["bytes_up"] > record["tensor_bytes_up"] > 0 and record["bytes_down"] > 0
        assert 0.0 <= record["accuracy"] <= 1.0 and record["loss"] > 0
        assert set(record["client_active_flops"]) == {"0", "1", "2", "3"}
    # EEQA reallocated after round 2 from measured importance; the budget stays 4 * top_k.
    assert sum(outcome.state.quotas.values()) == 16
    assert len(outcome.state.quota_history) >= 2 and outcome.state.quota_history[1][0] == 3
    assert records[2]["quotas"] == outcome.state.quota_history[1][1] != records[0]["quotas"]
    assert load_checkpoint(output).round == 4


def test_resume_after_stop_is_bit_identical(uninterrupted, cache_dir, tmp_path):
    outcome, reference_dir = uninterrupted
    stopped = run_in_process(tiny_config(cache_dir), tmp_path, stop_after_round=2, progress=False)
    assert stopped.state.round == 2 and [r["round"] for r in read_metrics(tmp_path)] == [1, 2]
    resumed = run_in_process(tiny_config(cache_dir), tmp_path, resume=True, progress=False)
    assert resumed.state.round == 4
    assert_same_routers(resumed.state.global_state, outcome.state.global_state)
    assert resumed.state.quotas == outcome.state.quotas
    assert resumed.state.importance_ema == outcome.state.importance_ema
    assert_same_routers(load_checkpoint(tmp_path).global_state, load_checkpoint(reference_dir).global_state)
    records, reference = read_metrics(tmp_path), read_metrics(reference_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert [(r["loss"], r["accuracy"], r["tensor_bytes_up"]) for r in records] == [
        (r["loss"], r["accuracy"], r["tensor_bytes_up"]) for r in reference
    ]


def test_resume_refuses_a_changed_config_and_a_fresh_start_over_a_checkpoint(uninterrupted, cache_dir):
    _, output = uninterrupted
    with pytest.raises(ValueError, match="made with another configuration"):
        open_run(tiny_config(cache_dir, federation={"lr": 0.5}), output, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        open_run(tiny_config(cache_dir), output, progress=False)


def test_each_fault_is_dropped_with_its_reason(cache_dir, tmp_path):
    faults = {2: {0: "raise", 1: "nan", 2: "shape"}, 3: {3: "timeout"}}
    config = tiny_config(cache_dir, federation={"min_clients": 1, "rounds": 3}, faults=faults)
    run_in_process(config, tmp_path, progress=False)
    records = read_metrics(tmp_path)
    assert [r["status"] for r in records] == ["completed"] * 3
    assert records[0]["clients_dropped"] == []
    round_two = {d["client"]: d["reason"] for d in records[1]["clients_dropped"]}
    assert records[1]["clients_used"] == [3]
    # The in-process grid reports a client's exception as Flower's runtime does: an error reply.
    assert round_two[0].startswith("client error 2: ") and "InjectedFault" in round_two[0]
    assert "injected fault: client raised before training" in round_two[0]
    assert "non-finite values in" in round_two[1]
    assert "wrong shape for" in round_two[2]
    round_three = {d["client"]: d["reason"] for d in records[2]["clients_dropped"]}
    assert records[2]["clients_used"] == [0, 1, 2]
    assert "timeout: " in round_three[3] and "after 1 of 2 local steps" in round_three[3]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path).global_state.values())


def test_round_below_minimum_retries_then_stops_with_checkpoint_intact(uninterrupted, cache_dir, tmp_path):
    outcome, _ = uninterrupted
    broken = {3: {0: "raise", 1: "nan", 2: "raise", 3: "timeout"}}
    config = tiny_config(cache_dir, federation={"max_retries": 2}, faults=broken)
    with pytest.raises(RoundFailed, match="round 3: fewer than min_clients=2 valid updates after 3 attempt"):
        run_in_process(config, tmp_path, progress=False)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 2
    records = read_metrics(tmp_path)
    assert [(r["round"], r["status"]) for r in records] == [(1, "completed"), (2, "completed"), (3, "failed")]
    assert records[-1]["attempts"] == 3 and len(records[-1]["clients_dropped"]) == 12
    # Nothing a finished round produced is lost: resuming (fault gone) ends where an
    # uninterrupted run ends.
    resumed = run_in_process(tiny_config(cache_dir, federation={"max_retries": 2}), tmp_path, resume=True, progress=False)
    assert_same_routers(resumed.state.global_state, outcome.state.global_state)
    assert [(r["round"], r["status"]) for r in read_metrics(tmp_path)][-2:] == [(3, "completed"), (4, "completed")]


def _round_bytes(config, output):
    """Run one round while recording the size of every train message and reply on the grid."""
    run = open_run(config, output, progress=False)
    grid = in_process_grid(run)
    sizes = {"up": [], "down": []}
    send_and_receive = grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        replies = list(send_and_receive(messages, timeout=timeout))
        if messages[0].metadata.message_type == MessageType.TRAIN:
            sizes["down"].extend(wire_size(m.content).num_bytes for m in messages)
            sizes["up"].extend(wire_size(r.content).num_bytes for r in replies)
        return replies

    grid.send_and_receive = recording
    run.start(grid, stop_after_round=1)
    return read_metrics(output)[0], sizes, run.trainer.initial_state()


def test_bytes_counted_are_the_messages_on_the_grid(cache_dir, tmp_path):
    results = {}
    for wire_dtype, router in (("fp32", "linear"), ("bf16", "linear"), ("fp32", "expert_space")):
        config = tiny_config(cache_dir, communication={"wire_dtype": wire_dtype}, more={"router": router})
        record, sizes, state = _round_bytes(config, tmp_path / f"{wire_dtype}-{router}")
        assert len(sizes["up"]) == len(sizes["down"]) == 4
        assert record["bytes_up"] == sum(sizes["up"]) and record["bytes_down"] == sum(sizes["down"])
        results[wire_dtype, router] = record, state
    (fp32, state), (bf16, _) = results["fp32", "linear"], results["bf16", "linear"]
    # 4 clients x 4 modules x (12 x 32 weight + 12 bias) values: 4 bytes each in fp32 (plus a
    # .npy header per tensor), 2 in bf16 (raw), plus the tensor names.
    values = 4 * 4 * (12 * 32 + 12)
    names = 4 * sum(len(name) for name in state)
    assert sum(t.numel() for t in state.values()) * 4 == values
    assert bf16["tensor_bytes_up"] == values * 2 + names
    assert 0 < fp32["tensor_bytes_up"] - values * 4 - names <= 4 * len(state) * 128
    # The expert-space router is [N, N] instead of [N, d_in]: 12 x 12 instead of 12 x 32 values
    # per module, under the same names and headers.
    expert_space, _ = results["fp32", "expert_space"]
    assert fp32["tensor_bytes_up"] - expert_space["tensor_bytes_up"] == 4 * 4 * 12 * (32 - 12) * 4


def test_flower_strategies_aggregate_the_screened_updates(cache_dir, tmp_path):
    import numpy as np
    from flwr.serverapp.strategy import FedMedian

    from smartfed.federated.messages import content_to_result
    from smartfed.federated.robust import flower_aggregator

    run = open_run(tiny_config(cache_dir), tmp_path, progress=False, aggregate=flower_aggregator(FedMedian()))
    grid = in_process_grid(run)
    updates = []
    send_and_receive = grid.send_and_receive

    def recording(messages, *, timeout=None):
        replies = list(send_and_receive(messages, timeout=timeout))
        updates.extend(content_to_result(r.content).state for r in replies if r.metadata.message_type == MessageType.TRAIN)
        return replies

    grid.send_and_receive = recording
    run.start(grid, stop_after_round=1)
    assert len(updates) == 4
    for name, tensor in run.state.global_state.items():
        median = np.median(np.stack([update[name].numpy() for update in updates]), axis=0)
        assert torch.equal(tensor, torch.from_numpy(median)), name


def test_resume_with_another_thread_count_warns(uninterrupted, cache_dir, tmp_path):
    run_in_process(tiny_config(cache_dir), tmp_path, stop_after_round=1, progress=False)
    torch.set_num_threads(2)
    try:
        with pytest.warns(UserWarning, match="written with 1 torch threads, this process uses 2"):
            open_run(tiny_config(cache_dir), tmp_path, resume=True, progress=False)
    finally:
        torch.set_num_threads(1)


def test_fedprox_keeps_the_client_closer_to_the_global_state(cache_dir):
    from smartfed.federated.server import client_instructions, server_state_for

    config = tiny_config(cache_dir, federation={"local_steps": 6, "lr": 0.05})
    trainer, layout = build_trainer(config)
    examples = federated_data(config, layout).clients[0]
    state = server_state_for(config, trainer.initial_state(), trainer.max_per_matrix(), uses_quotas=True)
    start = client_instructions(state, 0, 1, config)

    def drift(mu):
        start.fedprox_mu = mu
        trained = trainer.train(start, examples).state
        return sum(float((trained[k] - start.state[k]).pow(2).sum()) for k in trained)

    assert drift(100.0) < 0.5 * drift(0.0)


def test_train_command_runs_tiny_yaml_end_to_end(cache_dir, tmp_path, capsys):
    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny.yaml").read_text())
    data["pool"]["cache_dir"] = str(cache_dir)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(data))
    assert load_config(config_path).federation.rounds == 4
    parser = argparse.ArgumentParser()
    train.configure_parser(parser)
    output = tmp_path / "run"
    assert train.run(parser.parse_args(["--config", str(config_path), "--output", str(output), "--no-progress"])) == 0
    assert [r["round"] for r in read_metrics(output)] == [1, 2, 3, 4]
    assert "round 4/4" in capsys.readouterr().out
    again = parser.parse_args(["--config", str(config_path), "--output", str(tmp_path / "none"), "--resume", "--no-progress"])
    with pytest.raises(ConfigError, match="no checkpoint under"):
        train.run(again)
    split = tmp_path / "split"
    common = ["--config", str(config_path), "--output", str(split), "--no-progress"]
    assert train.run(parser.parse_args(common + ["--stop-after-round", "2"])) == 0
    assert load_checkpoint(split).round == 2
    assert train.run(parser.parse_args(common + ["--resume"])) == 0
    assert_same_routers(load_checkpoint(split).global_state, load_checkpoint(output).global_state)
    data["faults"] = {1: {client: "raise" for client in range(4)}}
    config_path.write_text(yaml.safe_dump(data))
    failing = parser.parse_args(["--config", str(config_path), "--output", str(tmp_path / "failing"), "--no-progress"])
    assert train.run(failing) == 3
    assert "round 1: fewer than min_clients=2 valid updates" in capsys.readouterr().err


def test_without_eeqa_no_quotas_and_no_statistics_travel(cache_dir, tmp_path):
    with_eeqa = run_in_process(tiny_config(cache_dir, federation={"rounds": 1}), tmp_path / "on", progress=False)
    config = tiny_config(cache_dir, federation={"rounds": 1}, eeqa={"enabled": False, "client_budgets": {}})
    without = run_in_process(config, tmp_path / "off", progress=False)
    on, off = with_eeqa.history[0], without.history[0]
    assert off["quotas"] is None and without.state.importance_ema is None
    assert off["tensor_bytes_up"] == on["tensor_bytes_up"] and off["meta_bytes_up"] < on["meta_bytes_up"]


def test_resume_restores_metrics_lines_lost_in_a_crash(cache_dir, tmp_path):
    config = tiny_config(cache_dir, federation={"rounds": 2})
    run_in_process(config, tmp_path, progress=False)
    first_line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    (tmp_path / "metrics.jsonl").write_text(first_line + "\n" + '{"round": 2, "stat')
    open_run(config, tmp_path, resume=True, progress=False)
    records = read_metrics(tmp_path)
    assert [r["round"] for r in records] == [1, 2]
    assert records[1] == load_checkpoint(tmp_path).history[1]
