"""The data keys from the command line: ``smartfed train`` runs a file task end to end,
``smartfed evaluate`` and ``smartfed report`` show its instruction scores, ``smartfed partition``
prints each client's size and label histogram and writes the plot, and every bad input of the
issue's list (in the data files or in the config) is one line on stderr, exit status 2, with no
run folder written."""

import json
from pathlib import Path

import pytest
import yaml
from test_file_tasks import BAD_INPUTS, _bad
from tiny_data import build_tokenizer, classification_rows, instruction_rows, save_tiny_model, write_rows

from smartfed.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random Llama folders: one whose tokenizer has a chat template, one without."""
    root = tmp_path_factory.mktemp("models")
    return {"chat": save_tiny_model(root / "chat", "llama", tokenizer=build_tokenizer(chat=True)),
            "plain": save_tiny_model(root / "plain", "llama", tokenizer=build_tokenizer())}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SMARTFED_CACHE", str(tmp_path_factory.getbasetemp() / "smartfed_cache"))


def run_config(model, data, tmp_path, **federation):
    """A small run config file of the file task ``data`` (a task.data mapping) on ``model``."""
    config = {
        "model": {"tiny": None, "pretrained": str(model)},
        "pool": {"cache_dir": str(tmp_path.parent / "pools"), "train_steps": 3, "batch_size": 8},
        "more": {"top_k": 2, "router_dim": 4},
        "federation": {"num_clients": 3, "rounds": 2, "min_clients": 2, "local_steps": 2, "batch_size": 4,
                       "min_examples_per_client": 2, **federation},
        "task": {"data": data},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def smartfed(capsys, *argv):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def headline_like_files(tmp_path_factory):
    """Three clients' instruction rows in one file with their ``client`` column, and a held-out file."""
    root = tmp_path_factory.mktemp("files")
    rows = [dict(row, client=f"c{index % 3}") for index, row in enumerate(instruction_rows(36))]
    return {"train": write_rows(root / "all_clients.jsonl", rows),
            "eval": write_rows(root / "eval.jsonl", instruction_rows(8))}


@pytest.fixture(scope="module")
def finished_file_run(tmp_path_factory, models, headline_like_files):
    """One finished run of an instruction file task, shared by the tests that read it (a module
    fixture cannot take capsys: its output is captured here)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("file_run")
    data = {"shape": "instruction", "train": str(headline_like_files["train"]),
            "eval": str(headline_like_files["eval"]), "partition_column": "client", "max_length": 32,
            "generation": {"every_rounds": 2, "max_new_tokens": 3, "batch_size": 4}}
    config = run_config(models["chat"], data, root, partition="natural")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["train", "--config", str(config), "--output", str(root / "headlines_run"), "--no-progress"])
    return {"status": status, "out": out.getvalue(), "err": err.getvalue(), "run": root / "headlines_run",
            "config": config}


def test_train_runs_an_instruction_file_task_split_by_its_client_column(finished_file_run):
    assert finished_file_run["status"] == 0, finished_file_run["err"][-3000:]
    run = finished_file_run["run"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(r["clients_used"] == [0, 1, 2] for r in records)
    assert "perplexity" in records[0] and "exact_match" not in records[0]
    assert {"perplexity", "exact_match", "f1", "rouge_l"} <= set(records[1])
    summary = json.loads((run / "text_task.json").read_text())
    assert summary["name"] == f"{finished_file_run['config'].parent.parent.name}/all_clients" or \
        summary["name"].endswith("/all_clients")
    assert [c["examples"] for c in summary["partition"]["clients"]] == [12, 12, 12]
    lines = finished_file_run["out"].strip().splitlines()
    assert lines[0].startswith("task ") and "36 training examples over 3 clients [12, 12, 12], 8 held out" in lines[0]
    last = records[-1]
    assert lines[-1].startswith(f"smartfed: round 2/2 loss {last['loss']:.4f} accuracy {last['accuracy']:.4f} "
                                f"perplexity {last['perplexity']:.4f} exact_match {last['exact_match']:.4f} "
                                f"f1 {last['f1']:.4f} rouge_l {last['rouge_l']:.4f} bytes up ")


def test_evaluate_and_report_show_the_instruction_scores(finished_file_run, tmp_path, capsys):
    run = finished_file_run["run"]
    status, out, err = smartfed(capsys, "evaluate", run, "--output", tmp_path / "evaluation.json")
    assert status == 0, err
    record = json.loads((tmp_path / "evaluation.json").read_text())
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("loss", "perplexity"):
        assert record[key] == pytest.approx(last[key], rel=1e-5)
    # A standalone evaluation generates (generation.every_rounds is not 0), as the last round did.
    assert {key: record[key] for key in ("exact_match", "f1", "rouge_l")} == \
        {key: last[key] for key in ("exact_match", "f1", "rouge_l")}
    assert f"perplexity {record['perplexity']:.4f} exact_match {record['exact_match']:.4f}" in out

    status, out, err = smartfed(capsys, "report", run, "--output", tmp_path / "report")
    assert status == 0, err
    report = (tmp_path / "report" / "report.md").read_text()
    section = report[report.index("## Instruction scores"):]
    row = next(line for line in section.splitlines() if line.startswith(f"| {run.name} |"))
    scores = f"{last['exact_match']:.3f} | {last['f1']:.3f} | {last['rouge_l']:.3f}"
    assert f"| {last['perplexity']:.2f} | 2 | {scores} |" in row
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["runs"][0]["instruction_scores"]["rouge_l"] == last["rouge_l"]


def test_partition_prints_each_clients_size_and_label_histogram_and_plots_it(models, tmp_path, capsys):
    rows = classification_rows(30)
    data = {"shape": "classification", "train": str(write_rows(tmp_path / "reviews.csv", rows)),
            "labels": ["sports", "business", "politics"], "partition_column": "source"}
    config = run_config(models["plain"], data, tmp_path, num_clients=2, partition="natural")
    status, out, err = smartfed(capsys, "partition", "--config", config, "--plot", tmp_path / "split.png",
                                "--json", tmp_path / "split.json")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "24 training examples over 2 clients, partition natural, seed 0"
    assert lines[1].split() == ["client", "examples", "sports", "business", "politics", "tokens", "min/median/max"]
    summary = json.loads((tmp_path / "split.json").read_text())
    sizes = [client["examples"] for client in summary["clients"]]
    assert sum(sizes) == 24 and [int(line.split()[1]) for line in lines[2:4]] == sizes
    for line, client in zip(lines[2:4], summary["clients"]):
        assert [int(cell) for cell in line.split()[2:5]] == [client["labels"][name] for name in summary["labels"]]
    assert (tmp_path / "split.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Another partition of the same file: IID over three clients, sizes within one of each other.
    status, out, err = smartfed(capsys, "partition", "--config", config, "--set", "federation.partition=iid",
                                "--set", "federation.num_clients=3")
    assert status == 0, err
    sizes = [int(line.split()[1]) for line in out.splitlines()[2:5]]
    assert sorted(sizes) == [8, 8, 8]


def assert_one_line_and_nothing_written(status, err, output, expected):
    assert status == 2
    assert err.count("\n") == 1 and expected in err, err
    assert not output.exists()


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_every_bad_data_input_is_one_line_exit_2_and_no_run_folder(models, tmp_path, capsys, case):
    data, tokenizer, expected = _bad(tmp_path, case, "plain", "chat")
    config = run_config(models[tokenizer], data.model_dump(), tmp_path)
    status, _, err = smartfed(capsys, "train", "--config", config, "--output", tmp_path / "run")
    assert err.startswith("smartfed train: ")
    assert_one_line_and_nothing_written(status, err, tmp_path / "run", expected)


def test_a_client_left_without_examples_is_one_line_exit_2(models, tmp_path, capsys):
    rows = [dict(row, source="only") for row in instruction_rows(12)]
    data = {"shape": "instruction", "train": str(write_rows(tmp_path / "one_source.jsonl", rows)),
            "partition_column": "source"}
    config = run_config(models["plain"], data, tmp_path, num_clients=2, partition="natural")
    status, _, err = smartfed(capsys, "train", "--config", config, "--output", tmp_path / "run")
    assert_one_line_and_nothing_written(status, err, tmp_path / "run",
                                        "task.data.partition_column has 1 distinct values ['only'], but "
                                        "federation.num_clients is 2")
    config = run_config(models["plain"], {**data, "partition_column": None}, tmp_path, num_clients=3, partition="iid",
                        min_examples_per_client=4)
    status, _, err = smartfed(capsys, "train", "--config", config, "--output", tmp_path / "run")
    assert_one_line_and_nothing_written(status, err, tmp_path / "run",
                                        "has 3 examples, fewer than 4 after the iid partition of 10 examples")


CONFIG_ERRORS = [
    ({"shape": "instruction", "train": "x.jsonl", "prompt_colum": "q"}, {},
     "task.data.prompt_colum: unknown key; did you mean 'prompt_column'?"),
    ({"train": "x.jsonl"}, {}, "task.data.shape: is required: one of the shapes classification, instruction"),
    ({"shape": "dialogue", "train": "x.jsonl"}, {},
     "task.data.shape: must be one of 'classification', 'instruction', got 'dialogue'"),
    ({"shape": "classification", "train": "x.csv", "labels": ["a"]}, {},
     "task.data.labels: must hold at least 2 items, got 1"),
    ({"shape": "classification", "train": "x.csv", "labels": ["a", "b"], "prompt_template": "no field"}, {},
     "task.data.prompt_template: must hold {text} exactly once"),
    ({"shape": "instruction", "train": "x.jsonl", "max_length": "64"}, {},
     "task.data.max_length: must be an integer, got the string '64'"),
    ({"shape": "instruction", "train": "x.jsonl"}, {"partition": "natural"},
     "federation.partition: 'natural' needs task.data.partition_column"),
    ({"shape": "instruction"}, {},
     "task.data.train: is null: each client then reads its own data on its SuperNode"),
]


@pytest.mark.parametrize("data, federation, expected", CONFIG_ERRORS)
def test_config_errors_of_the_data_keys_are_one_line(models, tmp_path, capsys, data, federation, expected):
    config = run_config(models["plain"], data, tmp_path, **federation)
    status, _, err = smartfed(capsys, "train", "--config", config, "--output", tmp_path / "run")
    assert err.startswith(f"smartfed train: {config}: ")
    assert_one_line_and_nothing_written(status, err, tmp_path / "run", expected)


def test_a_file_task_needs_a_model_folder_no_other_task_and_no_root_set(tmp_path, capsys):
    data = {"shape": "instruction", "train": "x.jsonl"}
    for extra, expected in ((None, "model.pretrained: task.data is tokenized by the model's tokenizer"),
                            ({"name": "bbc_news"}, "task.data: reads the task from files, but task.name"),
                            ({}, "robustness.root_examples: must be 0 with task.data")):
        config = {"task": {"data": data, **(extra or {})}}
        if extra is not None:
            config["model"] = {"tiny": None, "pretrained": str(tmp_path)}
        if extra == {}:
            config["robustness"] = {"aggregator": "filtered_mean_root", "root_examples": 10}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        status, _, err = smartfed(capsys, "train", "--config", path, "--output", tmp_path / "run")
        assert_one_line_and_nothing_written(status, err, tmp_path / "run", expected)


def test_federation_gives_each_supernode_its_own_data_path(tmp_path, capsys):
    from smartfed.config import ConfigError
    from smartfed.experiments.federation import node_data_paths
    from smartfed.experiments.local_federation import node_config

    paths = node_data_paths(["0=~/a.jsonl", f"2={tmp_path}/../c.jsonl"], 3)
    assert paths == {0: Path("~/a.jsonl").expanduser(), 2: tmp_path.parent / "c.jsonl"}
    assert node_config(2, 3, paths[2]) == f"partition-id=2 num-partitions=3 data-path='{tmp_path.parent / 'c.jsonl'}'"
    assert node_config(1, 3) == "partition-id=1 num-partitions=3"
    for items, expected in ((["3=/a"], "node 3 is not one of the 3 SuperNodes"), (["x=/a"], "expected I=PATH"),
                            (["0=/a", "0=/b"], "node 0 is given twice"), (["1=/it's"], "single quote")):
        with pytest.raises(ConfigError, match=expected):
            node_data_paths(items, 3)
    status, _, err = smartfed(capsys, "federation", "--dir", tmp_path / "fed", "--node-data", "5=/a")
    assert status == 2 and err.count("\n") == 1 and "--node-data: node 5 is not one of the 2 SuperNodes" in err
    assert not (tmp_path / "fed").exists()


def test_bench_step_writes_its_record_and_table(tmp_path, capsys):
    status, out, err = smartfed(capsys, "bench-step", "--layers", "1", "--rounds", "1", "--batch-size", "2",
                                "--active-rank", "2", "--output", tmp_path / "step")
    assert status == 0, err
    record = json.loads((tmp_path / "step.json").read_text())
    assert [row["method"] for row in record["rows"]] == ["fedit", "smartfed[expert_space]", "smartfed[linear]"]
    assert record["shape"]["num_hidden_layers"] == 1 and record["shape"]["hidden_size"] == 576
    assert all(row["peak_memory_bytes"] > 0 for row in record["rows"])
    table = (tmp_path / "step.md").read_text()
    assert "load average" in table and table.count("| smartfed[") == 2
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'step.json'} and {tmp_path / 'step.md'}"
    status, _, err = smartfed(capsys, "bench-step", "--layer", "x")
    assert status == 2 and err.count("\n") == 1
