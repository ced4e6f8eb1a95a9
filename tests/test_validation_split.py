"""``task.validation_fraction``: a seeded, label-stratified share of the training examples held out
before the client split (never from the test split), scored by the server every round
(``val_loss`` / ``val_accuracy``) and by ``smartfed evaluate --split validation``; at 0 a run is
the run it was before the field existed."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smartfed.cli import main
from smartfed.config import ConfigError, config_fingerprint, config_from_dict
from smartfed.experiments.assets import task_layout
from smartfed.experiments.report import load_run, markdown_report
from smartfed.experiments.runs import federated_data
from smartfed.experiments.selection import validation_score
from smartfed.federated.data import Examples
from smartfed.tasks.text_task import TextTask

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ("task.train_examples=128", "task.eval_examples=32", "federation.rounds=2", "federation.local_steps=2",
         "federation.min_examples_per_client=4", "pool.train_steps=5")
# Measured durations and memory differ between two runs of one config; everything else must not.
UNTIMED = ("wall_s", "client_compute_s", "client_peak_memory_bytes")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(cache_dir, *overrides):
    return config_from_dict({}, (*SMALL, f"pool.cache_dir={cache_dir}", *overrides))


def rows(examples):
    return [tuple(row) for row in examples.input_ids.tolist()]


def train_run(output, cache_dir, *overrides):
    assignments = [item for assignment in (*SMALL, f"pool.cache_dir={cache_dir}", *overrides)
                   for item in ("--set", assignment)]
    assert main(["train", "--config", str(TINY), "--output", str(output), *assignments, "--no-progress"]) == 0
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def untimed(records):
    return [{key: value for key, value in record.items() if key not in UNTIMED} for record in records]


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("validation") / "run"
    return output, train_run(output, cache_dir, "task.validation_fraction=0.25")


def test_the_split_is_disjoint_from_clients_and_test_and_sized_by_the_fraction(cache_dir):
    config = small_config(cache_dir, "task.validation_fraction=0.25")
    layout = task_layout(config)
    data = federated_data(config, layout)
    whole = federated_data(small_config(cache_dir), layout)
    validation = set(rows(data.validation))
    assert len(data.validation) == 32 and sum(len(client) for client in data.clients) == 96
    for client in data.clients:
        assert validation.isdisjoint(rows(client))
    assert validation.isdisjoint(rows(data.evaluation))
    assert rows(data.evaluation) == rows(whole.evaluation)
    train = sorted(row for client in whole.clients for row in rows(client))
    assert sorted(rows(data.validation) + [row for client in data.clients for row in rows(client)]) == train
    labels = [row for client in whole.clients for row in client.labels.tolist()]
    for label in set(labels):
        share = 0.25 * labels.count(label)
        assert math.floor(share) - 1 <= int((data.validation.labels == label).sum()) <= math.ceil(share) + 1
    again = federated_data(config, layout)
    assert rows(again.validation) == rows(data.validation)


def test_a_text_task_holds_out_its_training_examples_only():
    config = config_from_dict({"task": {"name": "bbc_news", "validation_fraction": 0.1},
                               "model": {"tiny": None, "pretrained": "unused"}})
    task = TextTask(
        name="bbc_news", label_words=(" a", " b"), label_token_ids=(1, 2),
        train_input_ids=torch.arange(200 * 3).reshape(200, 3), train_labels=torch.arange(200) % 2,
        eval_input_ids=-torch.arange(1, 41 * 3 + 1).reshape(41, 3), eval_labels=torch.arange(41) % 2,
    )
    data = federated_data(config, task)
    assert len(data.validation) == 20 and sum(len(client) for client in data.clients) == 180
    assert (data.validation.labels == 0).sum() == 10 and (data.validation.input_ids >= 0).all()
    assert rows(data.evaluation) == rows(Examples(task.eval_input_ids, task.eval_labels))
    clients = {row for client in data.clients for row in rows(client)}
    assert clients.isdisjoint(rows(data.validation)) and len(clients) == 180


def test_a_fraction_of_zero_is_the_run_without_the_field(validated_run, tmp_path, cache_dir):
    omitted = train_run(tmp_path / "omitted", cache_dir)
    zero = train_run(tmp_path / "zero", cache_dir, "task.validation_fraction=0.0")
    assert untimed(zero) == untimed(omitted)
    assert not any(key.startswith("val_") for record in zero for key in record)
    assert config_fingerprint(small_config(cache_dir, "task.validation_fraction=0.0")) == config_fingerprint(
        small_config(cache_dir))
    _, records = validated_run
    assert all(0 <= record["val_accuracy"] <= 1 and record["val_loss"] > 0 for record in records)


def test_evaluate_rescores_the_validation_split_of_the_run(validated_run, tmp_path, capsys):
    run_dir, records = validated_run
    output = tmp_path / "evaluation.json"
    assert main(["evaluate", str(run_dir), "--split", "validation", "--output", str(output), "--no-progress"]) == 0
    capsys.readouterr()
    record = json.loads(output.read_text())
    assert record["split"] == "validation" and record["examples"] == 32
    assert record["accuracy"] == records[-1]["val_accuracy"]
    assert record["loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)


def test_evaluate_refuses_another_fraction(validated_run, capsys):
    run_dir, _ = validated_run
    status = main(["evaluate", str(run_dir), "--split", "validation", "--set", "task.validation_fraction=0.1",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith("smartfed evaluate: --set task.validation_fraction=0.1: task.validation_fraction: ")


def test_the_report_shows_the_final_validation_accuracy(validated_run):
    run_dir, records = validated_run
    table = markdown_report([load_run(run_dir / "metrics.jsonl")], [])
    assert "| final acc | final val acc | best acc |" in table
    assert f"| {records[-1]['accuracy']:.3f} | {records[-1]['val_accuracy']:.3f} |" in table


def test_a_round_the_test_split_skips_trains_the_same_and_keeps_its_validation_score(validated_run, tmp_path,
                                                                                     cache_dir):
    """``federation.test_every_rounds``: the test split is scored at rounds divisible by it and at the
    last; validation every round. Training is unchanged, and the report and the rate selection read
    the validation scores of the skipped rounds too."""
    every_round_dir, every_round = validated_run
    sparse = train_run(tmp_path / "sparse", cache_dir, "task.validation_fraction=0.25",
                       "federation.test_every_rounds=5")
    assert sparse[0]["accuracy"] is None and sparse[0]["loss"] is None
    assert sparse[-1]["round"] == 2 and sparse[-1]["accuracy"] == every_round[-1]["accuracy"]
    # A test round records each test item's result; the others none.
    assert "test_correct" not in sparse[0] and sparse[-1]["test_correct"] == every_round[-1]["test_correct"]
    assert len(sparse[-1]["test_correct"]) == 32
    assert sparse[-1]["test_correct"].count("1") / 32 == sparse[-1]["accuracy"]
    scored = ("val_accuracy", "val_loss", "train_loss", "total_bytes_up", "total_bytes_down")
    assert [[record[key] for key in scored] for record in sparse] == [[record[key] for key in scored]
                                                                      for record in every_round]
    trained = load_file(every_round_dir / "final_state.safetensors")
    assert torch.equal(torch.cat([t.flatten() for t in trained.values()]),
                       torch.cat([t.flatten() for t in load_file(tmp_path / "sparse" / "final_state.safetensors").values()]))
    run = load_run(tmp_path / "sparse" / "metrics.jsonl")
    assert run.rounds == [2] and [record["round"] for record in run.validation_records] == [1, 2]
    # The time and client compute of the round without a test score count all the same.
    assert run.wall_seconds == sparse[0]["wall_s"] + sparse[1]["wall_s"]
    assert len(run.client_step_seconds) == sum(len(record["client_compute_s"]) for record in sparse) > 4
    assert validation_score(run) == validation_score(load_run(every_round_dir / "metrics.jsonl"))


@pytest.mark.parametrize("value, message", [
    (0.5, "must be < 0.5, got 0.5"),
    (-0.1, "must be >= 0, got -0.1"),
    ("0.1", "must be a number, got the string '0.1' (remove the quotes)"),
    (float("inf"), "must be finite, got inf"),
])
def test_a_bad_fraction_is_a_one_line_config_error(value, message):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"task": {"validation_fraction": value}})
    assert str(caught.value) == f"task.validation_fraction: {message}"
