"""``smartfed evaluate``: a finished 2-round tiny run re-scored from its final state gives the
run's own last accuracy, scores a changed evaluation setting, and refuses (exit 2, one line) a
missing or unfinished run, a --set that would change the trained model and a state that does not
match the model rebuilt from config.json."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smartfed.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir, one_torch_thread):
    output = tmp_path_factory.mktemp("evaluate") / "run"
    status = main(["train", "--config", str(TINY), "--output", str(output), "--set", "federation.rounds=2",
                   "--set", f"pool.cache_dir={cache_dir}", "--no-progress"])
    assert status == 0
    return output


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def run_cli(capsys, *argv):
    status = main(["evaluate", *(str(arg) for arg in argv), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(capsys, *argv):
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err.strip()


def last_metrics(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_the_final_state_scores_what_the_run_scored_last(finished_run, tmp_path, capsys):
    output = tmp_path / "evaluation.json"
    status, out, err = run_cli(capsys, finished_run, "--output", output)
    assert status == 0
    record = json.loads(output.read_text())
    last = last_metrics(finished_run)
    assert record["accuracy"] == last["accuracy"]
    assert record["loss"] == pytest.approx(last["loss"], rel=1e-5)
    assert record["examples"] == 128 and record["round"] == 2 and record["split"] == "test"
    state_file = finished_run / "final_state.safetensors"
    assert record["state_file"] == str(state_file)
    assert record["state_sha256"] == hashlib.sha256(state_file.read_bytes()).hexdigest()
    assert record["config"] == json.loads((finished_run / "config.json").read_text())
    assert record["seconds"] > 0
    assert out.startswith(f"{finished_run}: round 2 test loss {record['loss']:.4f} accuracy {last['accuracy']:.4f} "
                          "on 128 examples")


def test_every_item_is_recorded_and_the_items_make_up_the_accuracy(run_copy, tmp_path, capsys):
    status, _, _ = run_cli(capsys, run_copy)
    assert status == 0
    record = json.loads((run_copy / "evaluation.json").read_text())
    items = json.loads((run_copy / "evaluation_items.json").read_text())
    assert "items" not in record and items["metric"] == "correct" and items["split"] == "test"
    assert items["state_sha256"] == record["state_sha256"] and items["round"] == 2
    assert len(items["correct"]) == len(items["prediction"]) == len(items["margin"]) == record["examples"]
    assert sum(items["correct"]) / len(items["correct"]) == record["accuracy"]
    assert min(items["margin"]) >= 0 and set(items["correct"]) <= {0, 1}
    # With --output the items go beside the record.
    status, _, _ = run_cli(capsys, run_copy, "--output", tmp_path / "scored.json")
    assert status == 0
    assert json.loads((tmp_path / "scored.items.json").read_text())["correct"] == items["correct"]


def test_a_changed_evaluation_setting_scores_other_examples(run_copy, capsys):
    status, out, err = run_cli(capsys, run_copy, "--set", "task.eval_examples=64")
    assert status == 0
    record = json.loads((run_copy / "evaluation.json").read_text())
    assert record["examples"] == 64 and record["config"]["task"]["eval_examples"] == 64
    assert record["overrides"] == ["task.eval_examples=64"]


def test_a_run_that_kept_only_its_last_checkpoint_is_scored_from_it(run_copy, capsys):
    (run_copy / "final_state.safetensors").unlink()
    status, out, err = run_cli(capsys, run_copy)
    assert status == 0
    record = json.loads((run_copy / "evaluation.json").read_text())
    assert record["accuracy"] == last_metrics(run_copy)["accuracy"]
    assert record["state_file"] == str(run_copy / "checkpoint" / "tensors.safetensors")


def test_refuses_a_missing_run_folder(tmp_path, capsys):
    assert one_line_error(capsys, tmp_path / "nowhere") == (
        f"smartfed evaluate: RUN_DIR: {tmp_path / 'nowhere'} is not a folder")


def test_refuses_a_run_without_a_final_state(run_copy, capsys):
    (run_copy / "final_state.safetensors").unlink()
    shutil.rmtree(run_copy / "checkpoint")
    assert one_line_error(capsys, run_copy).endswith(
        f"{run_copy} holds no final state: it stopped at round 1 of 2 (continue it with smartfed train --resume)")
    shutil.rmtree(run_copy / "checkpoint.previous")
    assert one_line_error(capsys, run_copy).endswith(
        f"{run_copy} holds no final state (neither final_state.safetensors nor a checkpoint)")


def test_refuses_a_first_sweep_run_whose_config_names_no_task(tmp_path, capsys):
    """The first sweeps' config.json named no task.name; scoring one would score the synthetic task."""
    committed = Path(__file__).resolve().parent.parent / "benchmarks/results/experiment_paper_small/runs/skills/smartfed_v1/seed0"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "text_task.json"):
        shutil.copy(committed / name, run / name)
    assert "name" not in json.loads((run / "config.json").read_text())["task"]
    assert one_line_error(capsys, run) == (
        f"smartfed evaluate: {run / 'config.json'}: names no task.name (written before runs recorded it) while "
        "text_task.json beside it describes a text task; evaluate cannot rebuild that task from this config.json")


@pytest.mark.parametrize("assignment", ["method=fedit", "more.router=expert_space", "pool.rank=8", "seed=1"])
def test_refuses_a_change_to_what_the_state_was_trained_with(finished_run, capsys, assignment):
    key = assignment.partition("=")[0]
    assert one_line_error(capsys, finished_run, "--set", assignment).startswith(
        f"smartfed evaluate: --set {assignment}: {key}: the final state was trained with this setting")


def test_refuses_a_config_json_changed_after_the_run(run_copy, capsys):
    path = run_copy / "config.json"
    config = json.loads(path.read_text())
    config["more"]["router"] = "expert_space"
    path.write_text(json.dumps(config))
    error = one_line_error(capsys, run_copy)
    assert error.startswith(f"smartfed evaluate: {run_copy / 'final_state.safetensors'}: was trained with config "
                            "fingerprint ")
    assert "method, router form, pool or training settings differ" in error


@pytest.mark.parametrize("field, expected", [
    ("pool_fingerprint", "was trained on pool 0000000000000000, not on the pool rebuilt from the run's config.json"),
    ("method", "holds a 'fedit' state, but the run's config.json says method 'smartfed'"),
])
def test_refuses_a_state_that_does_not_match_the_rebuilt_model(run_copy, capsys, field, expected):
    path = run_copy / "final_state.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    metadata[field] = "0" * 64 if field == "pool_fingerprint" else "fedit"
    save_file(load_file(str(path)), str(path), metadata=metadata)
    assert one_line_error(capsys, run_copy).startswith(f"smartfed evaluate: {path}: {expected}")


def test_refuses_a_validation_split_the_task_does_not_have(finished_run, capsys):
    assert one_line_error(capsys, finished_run, "--split", "validation") == (
        "smartfed evaluate: --split: task 'synthetic' has no validation split to score (the run's "
        "task.validation_fraction is 0)")


def test_a_state_recorded_with_a_legacy_fingerprint_still_scores(run_copy, capsys):
    """A run recorded before the fingerprint's schema version carries the bare hash of its
    config.json minus the resumable keys; it still verifies, and only against that config."""
    from smartfed.config import legacy_fingerprints

    path = run_copy / "final_state.safetensors"
    saved = json.loads((run_copy / "config.json").read_text())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    metadata["config_fingerprint"] = sorted(legacy_fingerprints(saved))[0]
    save_file(load_file(str(path)), str(path), metadata=metadata)
    status, out, err = run_cli(capsys, run_copy)
    assert status == 0 and err == ""
    saved["federation"]["lr"] = 0.5
    (run_copy / "config.json").write_text(json.dumps(saved))
    assert "was trained with config fingerprint" in one_line_error(capsys, run_copy)
