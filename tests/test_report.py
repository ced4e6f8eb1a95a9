"""smartfed report: tables, the docs/design.md §8 target check and plots from metrics.jsonl files."""

import json

import pytest

from smartfed.cli import main
from smartfed.experiments import report
from smartfed.federated.run_dir import EVALUATION_ITEMS_FILE, EXPERT_USAGE_FILE, METRICS_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, name, *, method, seed, accuracies, bytes_per_round, router="expert_space", quotas=None,
              task="bbc_news", federation=None, baselines=None):
    folder = root / name
    folder.mkdir(parents=True)
    config = {"method": method, "seed": seed, "more": {"router": router},
              "federation": {"local_steps": 2, **(federation or {})}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "text_task.json").write_text(json.dumps({"name": task, **({"baselines": baselines} if baselines else {})}))
    lines = []
    for index, accuracy in enumerate(accuracies, start=1):
        record = {"round": index, "status": "completed", "accuracy": accuracy, "loss": None if accuracy is None else 1.0 - accuracy,
                  "total_bytes_up": index * bytes_per_round, "total_bytes_down": index * bytes_per_round,
                  "bytes_up": bytes_per_round, "wall_s": 2.0, "client_compute_s": {"0": 1.0 * index, "1": 3.0}}
        if quotas is not None:
            record["quotas"] = {module: k + index % 2 for module, k in quotas.items()}
        lines.append(json.dumps(record))
    lines.insert(1, json.dumps({"round": 2, "status": "failed", "bytes_up": 5}))
    (folder / METRICS_FILE).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def runs_root(tmp_path):
    quotas = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 4}
    write_run(tmp_path, "fedit_s0", method="fedit", seed=0, accuracies=[0.3, 0.5, 0.6, 0.7, 0.75, 0.8],
              bytes_per_round=1000)
    write_run(tmp_path, "smartfed_s0", method="smartfed", seed=0, accuracies=[0.6, 0.82, 0.85, 0.86, 0.86, 0.87],
              bytes_per_round=100, quotas=quotas)
    write_run(tmp_path, "fedit_s1", method="fedit", seed=1, accuracies=[0.4, 0.6, 0.7, 0.8, 0.85, 0.9],
              bytes_per_round=1000)
    write_run(tmp_path, "smartfed_s1", method="smartfed", seed=1, accuracies=[0.5, 0.6, 0.7, 0.8, 0.85, 0.88],
              bytes_per_round=100, quotas=quotas)
    return tmp_path


def test_target_check_against_fedit(runs_root):
    checks = {c["seed"]: c for c in report.target_checks(report.find_runs([runs_root]))}
    assert checks[0]["reached_round"] == 2 and checks[0]["reached_bytes"] == 400
    assert checks[0]["fedit_bytes"] == 12000 and checks[0]["rounds_ok"] and checks[0]["bytes_ok"]
    assert checks[1]["reached_round"] is None and not checks[1]["rounds_ok"]
    assert checks[0]["method"] == "smartfed_expert_space"


def test_the_target_check_says_whether_the_accuracy_at_a_third_of_the_rounds_is_beyond_noise(tmp_path):
    """The accuracy at the last test round within a third of FedIT's rounds minus FedIT's final,
    with the unpaired normal interval over the test items: a gap of 0.1 is noise over 50 items
    and beyond it over 2,000; a round the test split skipped (null accuracy) is not a test round."""
    for items in (50, 2000):
        root = tmp_path / str(items)
        for name, method, accuracies in (("fedit", "fedit", [0.3, 0.5, 0.6, 0.7, 0.75, 0.8]),
                                         ("smartfed", "smartfed", [0.85, 0.9, None, 0.7, None, 0.95])):
            folder = write_run(root, name, method=method, seed=0, accuracies=accuracies, bytes_per_round=10)
            (folder / "text_task.json").write_text(json.dumps({"name": "bbc_news", "eval_examples": items}))
        (check,) = report.target_checks(report.find_runs([root]))
        difference = check["difference_at_third"]
        assert check["third_round"] == 2 and difference["mean"] == pytest.approx(0.1)
        half_width = 1.959964 * ((0.9 * 0.1 + 0.8 * 0.2) / items) ** 0.5
        assert difference["low"] == pytest.approx(0.1 - half_width, rel=1e-5)
        assert difference["high"] == pytest.approx(0.1 + half_width, rel=1e-5)
        assert check["at_third"] == ("above FedIT's final" if items == 2000 else "no conclusion")
        assert check["interval"] == "unpaired"


def test_the_accuracy_at_a_third_is_compared_item_by_item_when_both_rounds_recorded_their_items(tmp_path):
    """Rounds that recorded ``test_correct`` are compared by a paired bootstrap over the items:
    40 items, the run right on 4 more of them than FedIT and on the same others."""
    fedit_items, run_items = "1" * 20 + "0" * 20, "1" * 24 + "0" * 16
    for name, method, accuracies, items, at in (("fedit", "fedit", [0.3, 0.4, 0.5], fedit_items, 3),
                                                ("smartfed", "smartfed", [0.6, 0.6, 0.6], run_items, 1)):
        folder = write_run(tmp_path, name, method=method, seed=0, accuracies=accuracies, bytes_per_round=10)
        (folder / "text_task.json").write_text(json.dumps({"name": "bbc_news", "eval_examples": 40}))
        records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
        for record in records:
            if record["round"] == at and record["status"] == "completed":
                record["test_correct"] = items
        (folder / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))
    (check,) = report.target_checks(report.find_runs([tmp_path]))
    assert check["interval"] == "paired" and check["third_round"] == 1
    difference = check["difference_at_third"]
    assert difference["mean"] == pytest.approx(0.1) and difference["items"] == 40
    assert 0 < difference["low"] < 0.1 < difference["high"] <= 0.2
    assert check["at_third"] == "above FedIT's final"


@pytest.mark.parametrize("rescored_round, interval", [(3, "paired"), (2, "unpaired")])
def test_fedits_final_items_may_come_from_the_rescore_of_its_final_state(tmp_path, rescored_round, interval):
    """A FedIT run that predates per-round item results is paired through ``evaluation_items.json``
    (``smartfed evaluate`` on its final state) when that scored its last round, and only then."""
    for name, method, accuracies in (("fedit", "fedit", [0.3, 0.4, 0.5]), ("smartfed", "smartfed", [0.6, 0.6, 0.6])):
        folder = write_run(tmp_path, name, method=method, seed=0, accuracies=accuracies, bytes_per_round=10)
        (folder / "text_task.json").write_text(json.dumps({"name": "bbc_news", "eval_examples": 40}))
        records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
        if method == "smartfed":
            records[0]["test_correct"] = "1" * 24 + "0" * 16
            (folder / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))
        else:
            rescore = {"split": "test", "round": rescored_round, "metric": "correct", "correct": [1] * 20 + [0] * 20}
            (folder / EVALUATION_ITEMS_FILE).write_text(json.dumps(rescore))
    (check,) = report.target_checks(report.find_runs([tmp_path]))
    assert check["interval"] == interval and check["difference_at_third"]["mean"] == pytest.approx(0.1)
    if interval == "paired":
        assert check["difference_at_third"]["items"] == 40 and check["at_third"] == "above FedIT's final"


def test_failed_rounds_are_skipped(runs_root):
    run = report.load_run(runs_root / "fedit_s0" / METRICS_FILE)
    assert run.rounds == [1, 2, 3, 4, 5, 6] and run.cumulative_bytes[-1] == 12000
    assert (run.task, run.method, run.seed) == ("bbc_news", "fedit", 0)


def test_write_report_tables_and_plots(runs_root, tmp_path):
    output = tmp_path / "out"
    path = report.write_report([runs_root], output)
    text = path.read_text()
    assert "| bbc_news | fedit | 2 | 0.850 ± 0.071 |" in text
    assert "| bbc_news | 0 | smartfed_expert_space | 0.800 | 6 | 0.012 | 2 | 0.000 | yes |" in text
    assert "| bbc_news | 1 | smartfed_expert_space | 0.900 | 6 | 0.012 | not reached | - | no |" in text
    assert "| bbc_news | smartfed_expert_space | 2 | 0.875 ± 0.007 | 0.875 | 0.001 | 0.000 | 2 / - | 0.000 | 1.50 |" in text
    plots = sorted(p.name for p in output.glob("*.png"))
    assert plots == sorted(["accuracy_vs_round.png", "accuracy_vs_bytes.png", "accuracy_vs_bytes_mean.png",
                            "quotas_bbc_news_smartfed_expert_space_seed0_smartfed_s0.png",
                            "quotas_bbc_news_smartfed_expert_space_seed1_smartfed_s1.png"])
    assert all((output / name).read_bytes()[:8] == PNG_MAGIC for name in plots)
    assert all(f"![{name}]({name})" in text for name in plots)
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["runs"]) == 4 and len(summary["target_checks"]) == 2


def test_a_label_names_an_ablation_in_every_table(runs_root, tmp_path):
    folder = write_run(runs_root, "uniform_s0", method="smartfed", seed=0, accuracies=[0.5, 0.7, 0.81],
                       bytes_per_round=100)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "label": "smartfed_uniform_quota"}))
    runs = report.find_runs([runs_root])
    assert sorted({run.method for run in runs}) == ["fedit", "smartfed_expert_space", "smartfed_uniform_quota"]
    checks = [c for c in report.target_checks(runs) if c["method"] == "smartfed_uniform_quota"]
    assert [(c["seed"], c["reached_round"]) for c in checks] == [(0, 3)]
    text = report.markdown_report(runs, [])
    assert "| bbc_news | smartfed_uniform_quota | 1 | 0.810 ± 0.000 | 0.810 | 0.001 | 0.000 | 3 | 0.001 |" in text


def test_expert_usage_plot_when_recorded(tmp_path):
    folder = write_run(tmp_path / "runs", "smartfed", method="smartfed", seed=0, accuracies=[0.5, 0.6],
                       bytes_per_round=10)
    lines = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    for line in lines:
        line["expert_usage"] = {"arithmetic": 3, "next_letter": 1}
    (folder / METRICS_FILE).write_text("\n".join(json.dumps(line) for line in lines))
    report.write_report([folder], tmp_path / "out")
    assert (tmp_path / "out" / "expert_usage_bbc_news_smartfed_expert_space_seed0_smartfed.png").is_file()


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(report.ReportError, match="no metrics.jsonl under"):
        report.find_runs([tmp_path])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / METRICS_FILE).write_text('{"round": 1, "accuracy": 0.5}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not JSON"):
        report.load_run(bad / METRICS_FILE)
    assert main(["report", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartfed report: ") and "does not exist" in err and len(err.splitlines()) == 1


def test_expert_usage_table_from_usage_file(runs_root, tmp_path):
    usage = {"round": 6, "prompts": 44, "selections": {"arithmetic": 0.5, "next_letter": 0.5},
             "gate_mass": {"arithmetic": 0.75, "next_letter": 0.25}}
    (runs_root / "smartfed_s0" / EXPERT_USAGE_FILE).write_text(json.dumps(usage))
    text = report.write_report([runs_root], tmp_path / "out").read_text()
    assert ("| bbc_news | smartfed_expert_space | 0 | 6 | 44 | arithmetic 0.50, next_letter 0.50 | "
            "arithmetic 0.75, next_letter 0.25 |") in text


def test_runs_of_different_configurations_are_never_averaged(tmp_path, capsys):
    write_run(tmp_path, "a", method="fedit", seed=0, accuracies=[0.5, 0.6], bytes_per_round=10)
    write_run(tmp_path, "b", method="fedit", seed=0, accuracies=[0.5, 0.6, 0.7], bytes_per_round=10,
              federation={"num_clients": 8})
    write_run(tmp_path, "c", method="fedit", seed=1, accuracies=[0.4, 0.6, 0.9], bytes_per_round=10,
              federation={"num_clients": 8})
    runs = report.separate_configurations(report.find_runs([tmp_path]))
    assert sorted((run.path.name, run.method) for run in runs) == [
        ("a", "fedit [federation.num_clients=4]"), ("b", "fedit [federation.num_clients=8]"),
        ("c", "fedit [federation.num_clients=8]")]
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out == (f"smartfed report: wrote {tmp_path / 'out' / 'report.md'}, {tmp_path / 'out' / 'summary.json'} "
                   f"and 3 plots into {tmp_path / 'out'}\n")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| bbc_news | fedit [federation.num_clients=8] | 2 | 0.800 ± 0.141 |" in text
    assert "| bbc_news | fedit [federation.num_clients=4] | 1 | 0.600 ± 0.000 |" in text


def test_seeds_of_one_configuration_stay_together(runs_root):
    runs = report.separate_configurations(report.find_runs([runs_root]))
    assert sorted({run.method for run in runs}) == ["fedit", "smartfed_expert_space"]


def test_baselines_stand_beside_each_run_and_the_loss_is_explained(tmp_path):
    write_run(tmp_path, "recorded", method="fedit", seed=0, accuracies=[0.5, 0.6], bytes_per_round=10,
              baselines={"base_accuracy": 0.45, "majority_accuracy": 0.25, "eval_examples": 200})
    write_run(tmp_path, "other_task", method="fedit", seed=0, accuracies=[0.3, 0.4], bytes_per_round=10,
              task="skills_target")
    table = tmp_path / "zero_shot.json"
    table.write_text(json.dumps({"skills_target {}": {"accuracy": 0.227, "majority_class_share": 0.136}}))
    text = report.write_report([tmp_path], tmp_path / "out", baselines=table).read_text()
    assert report.LOSS_NOTE in text and report.BASELINES_NOTE in text
    assert "| recorded | bbc_news | fedit | 0 | 2 | 0.600 | 0.450 | 0.250 |" in text
    assert "| other_task | skills_target | fedit | 0 | 2 | 0.400 | 0.227 | 0.136 |" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {run["task"]: run["baselines"]["base_accuracy"] for run in summary["runs"]} == {
        "bbc_news": 0.45, "skills_target": 0.227}


def test_reports_without_baselines_keep_their_columns(runs_root, tmp_path):
    text = report.write_report([runs_root], tmp_path / "out").read_text()
    assert "base model acc" not in text and report.LOSS_NOTE in text
