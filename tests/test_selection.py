"""Choosing learning rates on validation: ``lr_grid`` entries of a sweep expand into one run per
rate, and ``smartfed report`` picks each entry's rate by validation accuracy (last 3 rounds, mean
over seeds, ties to the lower rate), then shows test numbers of the chosen rate only."""

import json

import pytest

from smartfed.cli import main
from smartfed.config import ConfigError, validate
from smartfed.experiments.sweep_schema import SweepConfig
from smartfed.experiments import report
from smartfed.experiments.selection import extended_rate, grid_edge, grid_point, point_name, select_by_validation
from smartfed.experiments.sweep import grid_extensions, plan_runs, sweep_runs
from smartfed.federated.run_dir import METRICS_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_data(methods, *, tasks=None, base=None):
    return {"base": base or {}, "sweep": {"seeds": [0, 1], "tasks": tasks or {"skills": {}}, "methods": methods}}


@pytest.mark.parametrize("entry, message", [
    ({"lr_grid": "0.01"}, "sweep.methods.fedit.lr_grid: must be a list, got the string '0.01'"),
    ({"lr_grid": 0.01}, "sweep.methods.fedit.lr_grid: must be a list, got 0.01"),
    ({"lr_grid": None}, "sweep.methods.fedit.lr_grid: must be a list, got null"),
    ({"lr_grid": []}, "sweep.methods.fedit.lr_grid: must not be empty"),
    ({"lr_grid": [0.01, "3e-3"]}, "sweep.methods.fedit.lr_grid[1]: must be a number, got the string '3e-3' "
                                  "(YAML reads an exponent without a dot as a string: write 1.0e-2, not 1e-2)"),
    ({"lr_grid": [True]}, "sweep.methods.fedit.lr_grid[0]: must be a number, got True"),
    ({"lr_grid": [0.01, 0]}, "sweep.methods.fedit.lr_grid[1]: must be > 0, got 0"),
    ({"lr_grid": [-0.01]}, "sweep.methods.fedit.lr_grid[0]: must be > 0, got -0.01"),
    ({"lr_grid": [float("inf")]}, "sweep.methods.fedit.lr_grid[0]: must be finite, got inf"),
    ({"lr_grid": [0.01, 0.03, 0.010]}, "sweep.methods.fedit.lr_grid[2]: repeats lr_grid[0] (0.01)"),
    ({"lr_grid": [1, 1.0]}, "sweep.methods.fedit.lr_grid[1]: repeats lr_grid[0] (1)"),
    ({"lr_grid": [0.01], "federation": {"lr": 0.1}},
     "sweep.methods.fedit.federation.lr: cannot be set in an entry with lr_grid: each rate of the grid sets it"),
    ({"lr_grid": [0.01], "per_task": {"skills": {"federation": {"lr": 0.1}}}},
     "sweep.methods.fedit.per_task.skills.federation.lr: cannot be set in an entry with lr_grid: each rate of the "
     "grid sets it"),
])
def test_a_bad_lr_grid_is_a_one_line_config_error_naming_its_key(entry, message):
    with pytest.raises(ConfigError) as caught:
        validate(SweepConfig, sweep_data({"fedit": entry}), source="sweep.yaml")
    assert str(caught.value) == f"sweep.yaml: {message}"


def test_a_method_name_may_not_pass_for_a_grid_point():
    with pytest.raises(ConfigError) as caught:
        validate(SweepConfig, sweep_data({"fedit@lr=0.01": {}}))
    assert str(caught.value) == "sweep.methods.fedit@lr=0.01: must not contain '@lr=', which names the runs of an lr_grid"


def test_a_point_name_reads_back_as_its_rate():
    assert [point_name("fedit", lr) for lr in (0.003, 3.0e-3, 0.01, 1e-05, 1)] == [
        "fedit@lr=0.003", "fedit@lr=0.003", "fedit@lr=0.01", "fedit@lr=1e-05", "fedit@lr=1.0"]
    assert grid_point("smartfed_uniform_quota@lr=1e-05") == ("smartfed_uniform_quota", 1e-05)
    assert grid_point("smartfed_expert_space") is None


def test_an_lr_grid_entry_runs_once_per_rate_with_ablations_and_per_task_values():
    data = sweep_data({
        "fedit": {"lr_grid": [0.003, 0.01]},
        "uniform": {"method": "smartfed", "eeqa": {"enabled": False}, "lr_grid": [0.03],
                    "per_task": {"skills": {"pool": {"paths": ["a"]}}}},
        "linear_merge": {},
    }, tasks={"skills": {}, "bbc": {}}, base={"federation": {"rounds": 4, "lr": 0.5}})
    runs = {str(path): config for path, config in sweep_runs(data)}
    assert list(runs)[:4] == ["skills/fedit@lr=0.003/seed0", "skills/fedit@lr=0.01/seed0",
                              "skills/uniform@lr=0.03/seed0", "skills/linear_merge/seed0"]
    assert len(runs) == 2 * 2 * 4
    fedit = runs["bbc/fedit@lr=0.01/seed1"]
    assert (fedit["method"], fedit["label"], fedit["seed"]) == ("fedit", "fedit@lr=0.01", 1)
    assert fedit["federation"] == {"rounds": 4, "lr": 0.01}
    assert "lr_grid" not in fedit and "per_task" not in fedit
    uniform = runs["skills/uniform@lr=0.03/seed0"]
    assert (uniform["method"], uniform["label"]) == ("smartfed", "uniform@lr=0.03")
    assert uniform["federation"]["lr"] == 0.03 and uniform["eeqa"] == {"enabled": False}
    assert uniform["pool"] == {"paths": ["a"]} and "pool" not in runs["bbc/uniform@lr=0.03/seed0"]
    assert "label" not in runs["skills/linear_merge/seed0"]
    assert runs["skills/linear_merge/seed0"]["federation"]["lr"] == 0.5


@pytest.fixture
def text_sweep(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = {"model": {"tiny": None, "pretrained": str(model)}, "task": {"name": "skills_target"}}
    return sweep_data({"fedit": {"lr_grid": [0.003, 0.01]}, "linear_merge": {}}, base=base)


def test_the_methods_option_selects_a_whole_grid_or_one_rate(text_sweep, tmp_path):
    output = tmp_path / "runs"
    plan = plan_runs(text_sweep, output, seeds=[0], methods=["fedit"], source="sweep.yaml")
    assert [(str(relative), config.label, config.federation.lr) for relative, config, _, _ in plan] == [
        ("skills/fedit@lr=0.003/seed0", "fedit@lr=0.003", 0.003), ("skills/fedit@lr=0.01/seed0", "fedit@lr=0.01", 0.01)]
    plan = plan_runs(text_sweep, output, methods=["fedit@lr=0.01", "linear_merge"], source="sweep.yaml")
    assert [str(relative) for relative, *_ in plan] == [
        "skills/fedit@lr=0.01/seed0", "skills/linear_merge/seed0", "skills/fedit@lr=0.01/seed1",
        "skills/linear_merge/seed1"]
    with pytest.raises(ConfigError) as caught:
        plan_runs(text_sweep, output, methods=["fedit@lr=0.1"], source="sweep.yaml")
    assert str(caught.value) == ("--methods: ['fedit@lr=0.1'] not in this sweep; it has ['fedit', 'fedit@lr=0.003', "
                                 "'fedit@lr=0.01', 'linear_merge']")


def test_a_set_learning_rate_over_an_lr_grid_is_refused(text_sweep, tmp_path):
    with pytest.raises(ConfigError) as caught:
        plan_runs(text_sweep, tmp_path / "runs", overrides=["federation.lr=0.1"], source="sweep.yaml")
    assert str(caught.value) == ("--set federation.lr=0.1: federation.lr: would set the learning rate of every lr_grid "
                                 "run (e.g. skills/fedit@lr=0.003/seed0); change the sweep's lr_grid instead")
    plan = plan_runs(text_sweep, tmp_path / "runs", overrides=["federation.lr=0.1"], methods=["linear_merge"],
                     source="sweep.yaml")
    assert [config.federation.lr for _, config, _, _ in plan] == [0.1, 0.1]


# --------------------------------------------------------------------------- selection and report


def write_run(root, name, seed, *, test, val=None, method="fedit", label=None, lr=0.01, task="bbc_news"):
    """A finished run folder as smartfed sweep leaves it: config.json, text_task.json, metrics.jsonl."""
    folder = root / task / name / f"seed{seed}"
    folder.mkdir(parents=True)
    config = {"method": method, "seed": seed, "more": {"router": "expert_space"},
              "federation": {"lr": lr, "local_steps": 2}, **({"label": label} if label else {})}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "text_task.json").write_text(json.dumps({"name": task}))
    records = []
    for index, accuracy in enumerate(test):
        record = {"round": index + 1, "status": "completed", "accuracy": accuracy, "loss": 1.0,
                  "total_bytes_up": 100 * (index + 1), "total_bytes_down": 100 * (index + 1), "bytes_up": 100}
        if val is not None:
            record["val_accuracy"] = val[index]
        records.append(json.dumps(record))
    (folder / METRICS_FILE).write_text("\n".join(records) + "\n")
    return folder


def write_point(root, family, lr, seed, *, test, val, task="bbc_news"):
    return write_run(root, point_name(family, lr), seed, test=test, val=val, label=point_name(family, lr), lr=lr,
                     task=task)


@pytest.fixture
def grid_root(tmp_path):
    """FedIT at three rates, two seeds. On test, 0.1 is best; on validation over the last 3 of 5
    rounds, 0.01 is (0.001 leads on validation only in its first rounds)."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_point(root, "fedit", 0.001, seed, test=[0.5, 0.5, 0.5, 0.5, 0.5],
                    val=[0.9, 0.9, 0.6, 0.6, 0.6])
        write_point(root, "fedit", 0.01, seed, test=[0.6, 0.6, 0.6, 0.6, (0.7, 0.72)[seed]],
                    val=[0.5, 0.6, 0.7, 0.7, (0.7, 0.72)[seed]])
        write_point(root, "fedit", 0.1, seed, test=[0.9, 0.95, 0.95, 0.95, 0.987],
                    val=[0.5, 0.6, 0.65, 0.66, 0.67])
        write_run(root, "smartfed", seed, test=[0.69, 0.72, 0.72, 0.72, 0.72], val=[0.5] * 5, method="smartfed")
    return root


def test_selection_chooses_by_validation_over_the_last_rounds_not_by_test(grid_root):
    [selection] = select_by_validation(report.find_runs([grid_root]))
    assert (selection.task, selection.family, selection.chosen.lr) == ("bbc_news", "fedit", 0.01)
    assert [candidate.lr for candidate in selection.candidates] == [0.001, 0.01, 0.1]
    assert [[run.seed for run in candidate.runs] for candidate in selection.candidates] == [[0, 1]] * 3
    assert selection.chosen.scores == pytest.approx([0.7, 0.7 + 0.02 / 3])
    assert selection.candidates[2].mean == pytest.approx(0.66)
    assert selection.candidates[0].mean == pytest.approx(0.6) and selection.candidates[0].std == 0.0


def test_the_report_shows_test_numbers_of_the_chosen_rate_only(grid_root, tmp_path):
    output = tmp_path / "report"
    text = report.write_report([grid_root], output).read_text()
    record = json.loads((output / "selection.json").read_text())
    [chosen] = record["selections"]
    assert (chosen["task"], chosen["method"], chosen["chosen_lr"], chosen["chosen_run"]) == (
        "bbc_news", "fedit", 0.01, "fedit@lr=0.01")
    assert [(c["lr"], c["chosen"], c["seeds"]) for c in chosen["candidates"]] == [
        (0.001, False, [0, 1]), (0.01, True, [0, 1]), (0.1, False, [0, 1])]
    assert chosen["candidates"][2]["val_accuracy_mean"] == pytest.approx(0.66)
    assert "last 3 evaluated rounds" in record["rule"] and record["last_rounds"] == 3
    table = (output / "selection.md").read_text()
    assert "| bbc_news | fedit | 0.01 | 0, 1 | 0.703 ± 0.005 | 0.700 / 0.707 | **chosen**, runs seeds 0, 1 |" in table
    assert "| bbc_news | fedit | 0.1 | 0, 1 | 0.660 ± 0.000 | 0.660 / 0.660 |  |" in table
    assert table in text
    # Headline: the chosen rate under the family's name, and FedIT's target reference is that rate.
    assert "| bbc_news | fedit | 0.01 | 2 | 0.710 ± 0.014 |" in text
    assert "| bbc_news | smartfed_expert_space | - | 2 | 0.720 ± 0.000 |" in text
    checks = {c["seed"]: c for c in json.loads((output / "summary.json").read_text())["target_checks"]}
    assert checks[0]["fedit_final_accuracy"] == 0.7 and checks[0]["reached_round"] == 2
    assert checks[1]["fedit_final_accuracy"] == 0.72 and checks[1]["reached_round"] == 2
    # Nothing of the rates not chosen reaches a table of test numbers.
    assert "0.987" not in text and "0.950" not in text and "@lr=" not in text.split("## Runs")[1]
    summary = json.loads((output / "summary.json").read_text())
    assert sorted((r["method"], r["chosen_lr"], r["seed"]) for r in summary["runs"]) == [
        ("fedit", 0.01, 0), ("fedit", 0.01, 1), ("smartfed_expert_space", None, 0),
        ("smartfed_expert_space", None, 1)]
    assert (output / "validation_accuracy_chosen.png").read_bytes()[:8] == PNG_MAGIC
    assert "![validation_accuracy_chosen.png](validation_accuracy_chosen.png)" in text


def test_a_tie_on_validation_goes_to_the_lower_rate(tmp_path):
    for lr in (0.03, 0.01):
        write_point(tmp_path, "fedit", lr, 0, test=[0.5 + lr] * 4, val=[0.1, 0.2, 0.6, 0.4])
    [selection] = select_by_validation(report.find_runs([tmp_path]))
    assert selection.chosen.lr == 0.01


def test_selection_refuses_runs_without_validation_numbers(tmp_path, capsys):
    write_point(tmp_path, "fedit", 0.01, 0, test=[0.5, 0.6], val=[0.5, 0.6])
    missing = write_point(tmp_path, "fedit", 0.03, 0, test=[0.5, 0.6], val=None)
    status = main(["report", str(tmp_path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert err == (f"smartfed report: {missing} has no val_accuracy in its metrics: choosing a learning rate on "
                   f"validation needs a sweep run with task.validation_fraction > 0\n")
    assert not (tmp_path / "out").exists()


def test_selection_refuses_rates_without_a_common_seed_or_on_other_rounds(tmp_path):
    write_point(tmp_path / "seeds", "fedit", 0.01, 1, test=[0.5], val=[0.5])
    write_point(tmp_path / "seeds", "fedit", 0.01, 2, test=[0.5], val=[0.5])
    write_point(tmp_path / "seeds", "fedit", 0.1, 0, test=[0.5], val=[0.9])
    with pytest.raises(ValueError, match=r"^bbc_news: the rates of fedit share no seed \(lr 0\.01: seeds "
                                         r"\[1, 2\]; lr 0\.1: seeds \[0\]\)"):
        select_by_validation(report.find_runs([tmp_path / "seeds"]))
    write_point(tmp_path / "rounds", "fedit", 0.01, 0, test=[0.5, 0.5], val=[0.5, 0.5])
    write_point(tmp_path / "rounds", "fedit", 0.1, 0, test=[0.5], val=[0.9])
    with pytest.raises(ValueError, match=r"^bbc_news: the runs of fedit end at different rounds \(lr 0\.01: \[2\]; "
                                         r"lr 0\.1: \[1\]\)"):
        select_by_validation(report.find_runs([tmp_path / "rounds"]))


def test_selection_refuses_a_method_both_on_a_grid_and_off_it(tmp_path):
    write_point(tmp_path, "fedit", 0.01, 0, test=[0.5], val=[0.5])
    write_run(tmp_path, "fedit", 0, test=[0.5], val=[0.5])
    with pytest.raises(ValueError, match=r"^bbc_news: runs of fedit both with and without an lr_grid"):
        select_by_validation(report.find_runs([tmp_path]))


def test_a_report_without_grid_runs_writes_no_selection(tmp_path):
    write_run(tmp_path / "runs", "fedit", 0, test=[0.5, 0.6])
    text = report.write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert not (tmp_path / "out" / "selection.json").exists() and "chosen on validation" not in text
    assert "| run | task | method | seed | rounds | final acc | best acc |" in text


def test_rates_are_compared_on_the_seeds_they_all_ran_and_the_chosen_one_reports_all_its_seeds(tmp_path):
    """The protocol of configs/protocol_small.yaml: the whole grid on seed 0, the chosen rate alone
    on seeds 1 and 2. A rate's extra seed, however good on validation, takes no part in the choice."""
    write_point(tmp_path, "fedit", 0.01, 0, test=[0.4, 0.5], val=[0.6, 0.6])
    write_point(tmp_path, "fedit", 0.1, 0, test=[0.9, 0.9], val=[0.5, 0.5])
    write_point(tmp_path, "fedit", 0.1, 3, test=[0.9, 0.9], val=[1.0, 1.0])
    for seed in (1, 2):
        write_point(tmp_path, "fedit", 0.01, seed, test=[0.5, 0.6 + seed / 10], val=[0.1, 0.1])
    [selection] = select_by_validation(report.find_runs([tmp_path]))
    assert selection.chosen.lr == 0.01 and selection.selection_seeds == (0,)
    assert [candidate.scores for candidate in selection.candidates] == [[0.6], [0.5]]
    assert [run.seed for run in selection.chosen.runs] == [0, 1, 2]
    text = report.write_report([tmp_path], tmp_path / "out").read_text()
    assert "| bbc_news | fedit | 0.01 | 0 | 0.600 ± 0.000 | 0.600 | **chosen**, runs seeds 0, 1, 2 |" in text
    assert "| bbc_news | fedit | 0.01 | 3 | 0.667 ± 0.153 |" in text
    record = json.loads((tmp_path / "out" / "selection.json").read_text())["selections"][0]
    assert (record["selection_seeds"], record["chosen_seeds"]) == ([0], [0, 1, 2])
    assert [c["seeds"] for c in record["candidates"]] == [[0], [0]]


def write_smartfed_point(root, family, lr, seed, *, test, val, router, task="bbc_news"):
    folder = write_point(root, family, lr, seed, test=test, val=val, task=task)
    config = json.loads((folder / "config.json").read_text())
    config.update(method="smartfed", more={"router": router})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_smartfed_form_is_chosen_on_validation_and_the_target_verdict_counts_its_pairs(tmp_path):
    for seed in (0, 1):
        write_point(tmp_path, "fedit", 0.001, seed, test=[0.3, 0.5, 0.6], val=[0.5] * 3)
        # The linear router is best on test but not on validation: the projected form is chosen.
        write_smartfed_point(tmp_path, "linear", 0.01, seed, test=[0.9, 0.9, 0.9], val=[0.6] * 3, router="linear")
        write_smartfed_point(tmp_path, "projected", 0.01, seed, test=[(0.7, 0.5)[seed], 0.55, 0.8],
                             val=[0.7] * 3, router="projected")
    write_smartfed_point(tmp_path, "projected", 0.1, 0, test=[0.1] * 3, val=[0.1] * 3, router="projected")
    output = tmp_path / "out"
    text = report.write_report([tmp_path], output).read_text()
    record = json.loads((output / "selection.json").read_text())
    [configuration] = record["configurations"]
    assert (configuration["chosen"], configuration["chosen_lr"], configuration["seeds"]) == ("projected", 0.01, [0])
    assert configuration["val_accuracy_by_entry"] == {"linear": pytest.approx(0.6), "projected": pytest.approx(0.7)}
    assert "| bbc_news | smartfed | 0 | linear 0.600, **projected** 0.700 | projected (lr 0.01) |" in text
    assert ("The configuration chosen on validation per task (bbc_news: projected) meets the target in 1 of 2 "
            "(task, seed) pairs.") in text
    assert "- bbc_news seed 1 (projected): reaches it at round 3, after a third of FedIT's 3 rounds" in text
    summary = json.loads((output / "summary.json").read_text())
    assert summary["chosen_configuration_checks"] == {"bbc_news": {"entry": "projected", "met": 1, "pairs": 2}}
    assert (output / "accuracy_vs_bytes_mean.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- grid edges


@pytest.mark.parametrize("rates, chosen, edge, extension", [
    ([0.001, 0.003, 0.01], 0.003, None, None),
    ([0.001, 0.003, 0.01], 0.001, "lowest", 0.0003),
    ([0.001, 0.003, 0.01], 0.01, "highest", 0.03),
    ([0.01, 0.03, 0.1], 0.1, "highest", 0.3),
    ([0.01, 0.1], 0.01, "lowest", 0.001),
    ([0.02], 0.02, "only", 0.2),
])
def test_a_choice_at_a_grid_edge_is_flagged_with_the_next_rate_beyond_it(rates, chosen, edge, extension):
    assert grid_edge(rates, chosen) == edge
    assert extended_rate(rates, chosen) == (None if extension is None else pytest.approx(extension))
    if extension is not None:
        assert extended_rate(rates, chosen) not in rates


def test_the_report_marks_edges_and_single_seed_choices_and_interior_ones(grid_root, tmp_path):
    # grid_root: FedIT's 0.01 is interior of [0.001, 0.01, 0.1], chosen on seeds 0 and 1.
    text = report.write_report([grid_root], tmp_path / "interior").read_text()
    assert "| **chosen**, runs seeds 0, 1 | interior |" in text and "choices are flagged" not in text
    for lr, val in ((0.001, [0.7, 0.7]), (0.01, [0.6, 0.6])):
        write_point(tmp_path / "edge", "fedit", lr, 0, test=[0.5, 0.5], val=val)
    text = report.write_report([tmp_path / "edge"], tmp_path / "out").read_text()
    assert "| **chosen**, runs seeds 0 | **edge** (lowest): extend with 0.0001; chosen on 1 seed(s) |" in text
    assert "1 of 1 choices are flagged" in text
    [record] = json.loads((tmp_path / "out" / "selection.json").read_text())["selections"]
    assert (record["edge"], record["extend_with"], record["enough_seeds"]) == ("lowest", 0.0001, False)


def test_extend_grids_runs_the_named_rate_for_that_task_and_entry_only(text_sweep, tmp_path):
    text_sweep["sweep"]["tasks"] = {"skills": {}, "bbc": {}}
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"selections": [
        {"task": "skills", "method": "fedit", "extend_with": 0.001},
        {"task": "bbc", "method": "fedit", "extend_with": None}]}))
    extra = grid_extensions(selection)
    assert extra == {("skills", "fedit"): [0.001]}
    plan = plan_runs(text_sweep, tmp_path / "runs", seeds=[0], methods=["fedit"], source="sweep.yaml",
                     extra_rates=extra)
    assert [str(relative) for relative, *_ in plan] == [
        "skills/fedit@lr=0.003/seed0", "skills/fedit@lr=0.01/seed0", "skills/fedit@lr=0.001/seed0",
        "bbc/fedit@lr=0.003/seed0", "bbc/fedit@lr=0.01/seed0"]
    assert plan[2][1].federation.lr == 0.001 and plan[2][1].label == "fedit@lr=0.001"
    selection.write_text("not json")
    with pytest.raises(ConfigError, match="--extend-grids: is not a selection.json of smartfed report"):
        grid_extensions(selection)


def test_extend_grids_finds_a_file_task_by_its_sweep_folder(text_sweep, tmp_path):
    # A report names a task from files by its train file ("bbc_topic/train"); the sweep by its key.
    text_sweep["sweep"]["tasks"] = {"bbc_topic": {}}
    paths = [f"results/runs/bbc_topic/fedit@lr=0.003/seed{seed}" for seed in (0, 1)]
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"selections": [{"task": "bbc_topic/train", "method": "fedit", "extend_with": 0.001,
                                                     "candidates": [{"lr": 0.003, "paths": paths}]}]}))
    extra = grid_extensions(selection)
    assert extra == {("bbc_topic", "fedit"): [0.003, 0.001]}
    plan = plan_runs(text_sweep, tmp_path / "runs", seeds=[0], methods=["fedit@lr=0.001"], source="sweep.yaml",
                     extra_rates=extra)
    assert [str(relative) for relative, *_ in plan] == ["bbc_topic/fedit@lr=0.001/seed0"]
    with pytest.raises(ConfigError) as caught:
        plan_runs(text_sweep, tmp_path / "runs", source="sweep.yaml", extra_rates={("bbc_topic/train", "fedit"): [0.001]})
    assert str(caught.value) == ("sweep.yaml: --extend-grids: names task(s) ['bbc_topic/train'] that this sweep does "
                                 "not have; it has ['bbc_topic']")


def test_extend_grids_keeps_a_rate_an_earlier_extension_ran(text_sweep, tmp_path):
    # 0.001 ran after an earlier report named it and won; the next report names no extension, yet its
    # choice must still run on another seed.
    text_sweep["sweep"]["tasks"] = {"bbc_topic": {}}
    candidates = [{"lr": lr, "paths": [f"results/runs/bbc_topic/fedit@lr={lr}/seed0"]} for lr in (0.003, 0.001, 0.0003)]
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"selections": [{"task": "bbc_topic/train", "method": "fedit", "chosen_lr": 0.001,
                                                     "extend_with": None, "candidates": candidates}]}))
    extra = grid_extensions(selection)
    assert extra == {("bbc_topic", "fedit"): [0.0003, 0.001, 0.003]}
    plan = plan_runs(text_sweep, tmp_path / "runs", seeds=[1], methods=["fedit"], source="sweep.yaml",
                     extra_rates=extra)
    assert [str(relative) for relative, *_ in plan] == [
        "bbc_topic/fedit@lr=0.003/seed1", "bbc_topic/fedit@lr=0.01/seed1", "bbc_topic/fedit@lr=0.0003/seed1",
        "bbc_topic/fedit@lr=0.001/seed1"]
    with pytest.raises(ConfigError, match=r"--methods: \['fedit@lr=0.0001'\] not in this sweep"):
        plan_runs(text_sweep, tmp_path / "runs", seeds=[1], methods=["fedit@lr=0.0001"], source="sweep.yaml",
                  extra_rates=extra)
