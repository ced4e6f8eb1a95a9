"""The `smartfed` command line: help for every command without torch, one-line errors with exit
status 2 that name the key path, and --resume checked before anything is built."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from smartfed.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def run_cli(capsys, *argv):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from smartfed.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'flwr', 'pydantic') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_command_has_an_example_its_outputs_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: smartfed {command}" in text
    for heading in ("example:\n  smartfed " + command, "writes:", "exit status:\n  0"):
        assert heading in text


def test_top_level_help_describes_smartfed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.splitlines()[2].startswith("SmartFed: federated fine-tuning of LLMs")
    assert all(command in text for command in SUBCOMMANDS)


def write_config(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text() + text)
    return path


def one_line_error(capsys, *argv):
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err.strip()


@pytest.mark.parametrize("appended, expected", [
    ("roundz: 3\n", "roundz: unknown key"),
    ("baseline: {lora_rnk: 4}\n", "baseline.lora_rnk: unknown key; did you mean 'lora_rank'?"),
])
def test_a_typo_names_its_key_path(tmp_path, capsys, appended, expected):
    path = write_config(tmp_path, appended)
    assert one_line_error(capsys, "train", "--config", path, "--output", tmp_path / "run").startswith(
        f"smartfed train: {path}: {expected}")


def test_a_typo_inside_model_tiny_is_an_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("num_hidden_layers: 2", "num_hiden_layers: 2"))
    assert one_line_error(capsys, "train", "--config", path, "--output", tmp_path / "run").startswith(
        f"smartfed train: {path}: model.tiny.num_hiden_layers: not an argument of transformers' LlamaConfig")


def test_a_wrong_type_names_its_key_path(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("  lr: 0.01\n  client", '  lr: "1e-2"\n  client'))
    assert one_line_error(capsys, "train", "--config", path, "--output", tmp_path / "run").startswith(
        f"smartfed train: {path}: federation.lr: must be a number, got the string '1e-2'")


def test_infinity_where_a_finite_number_is_needed(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("alpha: 0.5", "alpha: .inf"))
    assert one_line_error(capsys, "train", "--config", path, "--output", tmp_path / "run") == (
        f"smartfed train: {path}: federation.alpha: must be finite, got inf")


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    path = write_config(tmp_path, "faults: {1: [\n")
    error = one_line_error(capsys, "train", "--config", path, "--output", tmp_path / "run")
    assert error.startswith(f"smartfed train: {path}: malformed YAML at line")


def test_an_unknown_set_path_is_named(capsys, tmp_path):
    assert one_line_error(capsys, "train", "--config", TINY, "--output", tmp_path / "run",
                          "--set", "federation.rouns=6").startswith(
        "smartfed train: --set federation.rouns=6: federation.rouns: unknown key; did you mean 'rounds'?")


def test_missing_pool_folders_name_the_command_that_builds_them(capsys, tmp_path):
    error = one_line_error(capsys, "train", "--config", TINY, "--output", tmp_path / "run",
                           "--set", f"pool.paths=[{tmp_path / 'nowhere'}]")
    assert error.endswith("build the public pool with `smartfed build-pool --config configs/public_pool.yaml`")


def test_bad_arguments_are_one_line(capsys):
    assert one_line_error(capsys, "train", "--output", "x") == (
        "smartfed train: the following arguments are required: --config (see smartfed train --help)")
    assert one_line_error(capsys, "train", "--config", TINY, "--output", "x", "--bogus").startswith(
        "smartfed: unrecognized arguments: --bogus")


def test_a_config_error_in_a_fresh_process_is_one_line_exit_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("federation: {alpha: .inf}\n")
    done = subprocess.run([sys.executable, "-m", "smartfed.cli", "train", "--config", str(path), "--output",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"smartfed train: {path}: federation.alpha: must be finite, got inf\n"



def test_an_unknown_flag_is_named_before_a_missing_one(capsys):
    assert one_line_error(capsys, "train", "--configs", TINY, "--output", "x") == (
        "smartfed train: unrecognized arguments: --configs (did you mean --config?) (see smartfed train --help)")


HEAVY = ("torch", "transformers", "flwr", "peft")


def fresh_cli(tmp_path, *argv):
    """(exit status, stderr, heavy modules imported) of ``smartfed ARGV`` in a fresh interpreter."""
    code = ("import sys; from smartfed.cli import main; status = main(sys.argv[1:]); "
            f"print([m for m in {HEAVY!r} if m in sys.modules]); sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=ROOT)
    return done.returncode, done.stderr, done.stdout.strip()


def tiny_run_folder(tmp_path):
    from smartfed.config import config_to_dict, load_config

    folder = tmp_path / "finished"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_dict(load_config(TINY))))
    return folder


@pytest.mark.parametrize("case", ["set", "yaml", "flag", "split"])
def test_input_errors_come_before_any_heavy_import(tmp_path, case):
    """The config (model.tiny included), the flags and the run folder are checked before torch,
    transformers or Flower load: that is what keeps these errors fast."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY.read_text().replace("  rounds: 4", "  roundz: 4"))
    argv = {
        "set": ["train", "--config", TINY, "--output", tmp_path / "r", "--set", "badkey=1"],
        "yaml": ["train", "--config", typo, "--output", tmp_path / "r"],
        "flag": ["train", "--configs", TINY, "--output", tmp_path / "r"],
        "split": ["evaluate", tiny_run_folder(tmp_path), "--split", "validation"],
    }[case]
    status, err, heavy = fresh_cli(tmp_path, *argv)
    assert status == 2 and len(err.splitlines()) == 1 and heavy == "[]", (err, heavy)
    assert {"set": "badkey: unknown key", "yaml": "federation.roundz: unknown key; did you mean 'rounds'?",
            "flag": "unrecognized arguments: --configs", "split": "--split: task 'synthetic' has no validation split"
            }[case] in err


def test_an_internal_error_keeps_its_traceback_and_exits_1(monkeypatch, capsys):
    from smartfed.experiments import report

    def broken(args):
        raise KeyError("an invariant that failed")

    monkeypatch.setattr(report, "run", broken)
    status, out, err = run_cli(capsys, "report", "somewhere", "--output", "x")
    assert status == 1 and "Traceback" in err and "KeyError: 'an invariant that failed'" in err
    assert err.strip().splitlines()[-1] == "smartfed report: internal error (KeyError); please report it with the " \
                                           "traceback above"


def test_debug_shows_the_traceback_of_a_user_error(capsys, tmp_path):
    status, out, err = run_cli(capsys, "train", "--config", TINY, "--output", tmp_path / "r", "--set", "badkey=1",
                               "--debug")
    assert status == 2 and "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("smartfed train: --set badkey=1: badkey: unknown key")


def test_library_warnings_a_user_cannot_act_on_are_filtered():
    import logging
    import warnings

    from smartfed.cli import quiet_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn_explicit("old API", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="smartfed.x")
    assert [str(w.message) for w in caught] == ["ours"]
    record = logging.LogRecord("flwr", logging.WARNING, "config.py", 1, 'Recommended property "license" missing in '
                               "[project]", None, None)
    assert not all(f.filter(record) for f in logging.getLogger("flwr").filters)


def test_an_output_path_through_a_missing_folder_is_resolved_before_the_guard(tmp_path, capsys, monkeypatch):
    """`--output nothere/../userZ` names userZ: the folder guard sees the user's config.json there
    and refuses, leaving it byte-identical."""
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "userZ"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    error = one_line_error(capsys, "train", "--config", TINY, "--output", "nothere/../userZ")
    assert f"{user} holds files not written by a smartfed run" in error
    assert (user / "config.json").read_text() == '{"mine": true}' and sorted(p.name for p in user.iterdir()) == [
        "config.json"]

def test_sweep_validates_every_selected_run_before_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sweep's relative pool paths then name nothing, built or not
    error = one_line_error(capsys, "sweep", "--config", ROOT / "configs" / "paper_small.yaml", "--output",
                           tmp_path, "--seeds", "0", "--tasks", "bbc_news", "--methods", "smartfed")
    assert error.startswith("smartfed sweep: ") and "run bbc_news/smartfed/seed0: pool.paths[0]: " in error
    error = one_line_error(capsys, "sweep", "--config", ROOT / "configs" / "paper_small.yaml", "--output",
                           tmp_path, "--tasks", "imdb")
    assert error == "smartfed sweep: --tasks: ['imdb'] not in this sweep; it has ['bbc_news', 'skills']"


# --------------------------------------------------------------------------- --resume


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A run folder of configs/tiny.yaml with 2 rounds checkpointed; building the run is
    replaced by a stub that records its calls (so nothing expensive runs)."""
    import torch

    from smartfed.config import config_fingerprint, config_to_dict, load_config
    from smartfed.experiments import runs
    from smartfed.federated.checkpoint import Checkpoint, save_checkpoint

    config = load_config(TINY, ["federation.rounds=2"])
    output = tmp_path / "run"
    history = [{"round": r, "loss": 1.0, "accuracy": 0.5, "total_bytes_up": 1, "total_bytes_down": 1} for r in (1, 2)]
    save_checkpoint(output, Checkpoint(round=2, global_state={"w": torch.zeros(1)}, quotas={}, history=history,
                                       config_fingerprint=config_fingerprint(config), extra={}))
    (output / "config.json").write_text(json.dumps(config_to_dict(config)))
    opened = []

    def open_run(config, output_dir, **kwargs):
        opened.append(config)
        return SimpleNamespace(state=SimpleNamespace(round=2), history=history, start_in_process=lambda **_: None)

    monkeypatch.setattr(runs, "open_run", open_run)
    return output, opened


def test_resume_refuses_a_changed_config_before_building_anything(finished_run, capsys):
    output, opened = finished_run
    error = one_line_error(capsys, "train", "--config", TINY, "--output", output, "--resume",
                           "--set", "federation.rounds=2", "--set", "federation.lr=0.5")
    assert error.startswith(
        f"smartfed train: {output / 'config.json'}: federation.lr: is 0.5 now but 0.01 in the run already there")
    assert opened == []


def test_resume_refuses_fewer_rounds_than_completed(finished_run, capsys):
    output, opened = finished_run
    error = one_line_error(capsys, "train", "--config", TINY, "--output", output, "--resume",
                           "--set", "federation.rounds=1")
    assert error.startswith(f"smartfed train: {output / 'config.json'}: federation.rounds: is 1 but the run being "
                            "resumed has completed 2 rounds")
    assert opened == []


def test_resume_with_more_rounds_records_the_extension(finished_run, capsys):
    output, opened = finished_run
    status, out, err = run_cli(capsys, "train", "--config", TINY, "--output", output, "--resume", "--no-progress")
    assert status == 0 and err == "" and [c.federation.rounds for c in opened] == [4]
    assert json.loads((output / "config.json").read_text())["federation"]["rounds"] == 4
    assert json.loads((output / "resumes.jsonl").read_text()) == {
        "at_round": 2, "changes": {"federation.rounds": [2, 4]}}


def test_a_fresh_run_refuses_a_folder_holding_one(finished_run, capsys):
    output, opened = finished_run
    error = one_line_error(capsys, "train", "--config", TINY, "--output", output, "--set", "federation.rounds=2")
    assert error == (f"smartfed train: --output: {output} already holds a run (round 2 checkpointed): pass --resume "
                     "to continue it or choose another --output")
    assert opened == []


def test_inspect_forwards_its_arguments_and_reports_a_mistake_in_one_line(capsys):
    assert one_line_error(capsys, "inspect", "--arch", "sm_70").startswith(
        "smartfed inspect: argument --arch: invalid choice: 'sm_70'")


def test_sweep_plans_check_every_run_folder_and_continue_interrupted_runs(tmp_path):
    import torch

    from smartfed.config import ConfigError, config_fingerprint, config_to_dict
    from smartfed.experiments.sweep import plan_runs
    from smartfed.federated.checkpoint import Checkpoint, save_checkpoint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = {"model": {"tiny": None, "pretrained": str(model)}, "task": {"name": "skills_target"},
            "federation": {"rounds": 2}}
    output = tmp_path / "runs"
    [(relative, config, done, changes)] = plan_runs(data, output, source="run.yaml")
    assert (str(relative), done, changes) == (".", None, {})
    save_checkpoint(output, Checkpoint(round=1, global_state={"w": torch.zeros(1)}, quotas={}, history=[],
                                       config_fingerprint=config_fingerprint(config)))
    (output / "config.json").write_text(json.dumps(config_to_dict(config)))
    [(_, _, done, changes)] = plan_runs(data, output, overrides=["federation.rounds=3"], source="run.yaml")
    assert done == 1 and changes == {"federation.rounds": (2, 3)}
    with pytest.raises(ConfigError, match=r"config.json: seed: is 1 now but 0 in the run already there"):
        plan_runs(data, output, overrides=["seed=1"], source="run.yaml")
    save_checkpoint(output, Checkpoint(round=2, global_state={"w": torch.zeros(1)}, quotas={}, history=[],
                                       config_fingerprint=config_fingerprint(config)))
    [(_, _, done, changes)] = plan_runs(data, output, source="run.yaml")
    assert (done, changes) == (2, {})
    with pytest.raises(ConfigError, match=r"config.json: seed: is 1 now but 0 in the run already there"):
        plan_runs(data, output, overrides=["seed=1"], source="run.yaml")


def test_sweep_refuses_to_start_a_fresh_run_in_a_folder_of_user_files(tmp_path):
    from smartfed.experiments.sweep import plan_runs
    from smartfed.federated.run_dir import RunDirError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = {"model": {"tiny": None, "pretrained": str(model)}, "task": {"name": "skills_target"}}
    output = tmp_path / "runs"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt"):
        plan_runs(data, output, source="run.yaml")
    assert (output / "notes.txt").read_text() == "mine"
