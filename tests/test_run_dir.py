"""No file a run did not write is ever changed or deleted (issue 23 item 2), and every run folder
committed under benchmarks/results still reads (issue 20 item 4).

- Paths are resolved before any check: ``--output nothere/../userZ`` is ``userZ``, a symlink is its
  target; a user's folder reached either way is refused and left byte-identical.
- A Flower run's folder lies under the output root the server side fixed: an absolute
  ``output-dir``, or one that leads out of the root (``..``, a symlink), is refused; inside the
  root the guard of ``smartfed train`` applies.
- Every committed checkpoint (version 1, written before hashes) and final state is read by
  ``RunDir``'s readers.
"""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from smartfed.experiments.flower_settings import FlowerRunSettings
from smartfed.federated.run_dir import RunDir, RunDirError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
USER_FILES = {"config.json": b'{"learning_rate": 3}\n', "notes.txt": b"my notes\n", "metrics.jsonl": b"{}\n"}


def user_folder(path):
    path.mkdir(parents=True)
    for name, data in USER_FILES.items():
        (path / name).write_bytes(data)
    return path


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_train_resolves_dot_dot_before_the_guard_and_leaves_the_users_files(tmp_path, capsys, monkeypatch):
    from smartfed.cli import main

    user = user_folder(tmp_path / "userZ")
    monkeypatch.chdir(tmp_path)
    status = main(["train", "--config", str(TINY), "--output", "nothere/../userZ", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert f"{user} holds files not written by a smartfed run (config.json, notes.txt)" in err
    assert contents(user) == USER_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userZ"]


def test_a_symlink_to_a_users_folder_is_refused(tmp_path):
    user = user_folder(tmp_path / "mine")
    (tmp_path / "link").symlink_to(user, target_is_directory=True)
    with pytest.raises(RunDirError, match=rf"^{user} holds files not written by a smartfed run"):
        RunDir(tmp_path / "link").check_writable({"seed": 0}, resume=False)
    assert contents(user) == USER_FILES


@pytest.mark.parametrize("relative, problem", [
    ("/abs/userdir", "is an absolute path"),
    ("../outside", "outside the output root"),
    ("runs/../../outside", "outside the output root"),
    (".", "outside the output root"),
    ("escape/run", "outside the output root"),  # escape -> a symlink out of the root
])
def test_a_flower_output_dir_stays_under_the_servers_root(tmp_path, relative, problem):
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(RunDirError, match=problem):
        RunDir.under_root(root, relative)
    assert RunDir.under_root(root, "a/../b/run").folder == root / "b" / "run"


@pytest.mark.parametrize("output_dir", ["mine", "/ABSOLUTE", "../mine"])
def test_the_server_app_refuses_a_users_folder_before_building_anything(tmp_path, monkeypatch, output_dir):
    from smartfed.experiments import flower_apps, runs

    monkeypatch.setattr(runs, "open_run", lambda *args, **kwargs: pytest.fail("the run was built"))
    root = tmp_path / "root"
    user = user_folder(root / "mine")
    outside = user_folder(tmp_path / "mine")
    output_dir = output_dir.replace("/ABSOLUTE", str(user))
    settings = FlowerRunSettings.from_run_config({"config": str(TINY), "output-dir": output_dir})
    with pytest.raises(RunDirError):
        flower_apps.serve(None, settings, root=root)
    assert contents(user) == USER_FILES and contents(outside) == USER_FILES


def test_the_server_apps_root_comes_from_the_server_side(tmp_path, monkeypatch):
    from smartfed.federated.run_dir import output_root

    monkeypatch.setenv("SMARTFED_OUTPUT_ROOT", str(tmp_path / "runs"))
    assert output_root() == tmp_path / "runs"
    monkeypatch.delenv("SMARTFED_OUTPUT_ROOT")
    assert output_root() == Path.home() / "smartfed-runs"


def test_only_run_files_can_be_named_and_their_json_is_written_durably(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.folder.mkdir()
    with pytest.raises(ValueError, match="'notes.txt' is not a file a run writes"):
        run_dir.write_json("notes.txt", {})
    run_dir.write_json("expert_usage.json", {"selections": {}})
    assert json.loads((run_dir.folder / "expert_usage.json").read_text()) == {"selections": {}}
    assert sorted(os.listdir(run_dir.folder)) == ["expert_usage.json"]


def committed_runs():
    results = ROOT / "benchmarks" / "results"
    folders = {path.parent.parent for path in results.rglob("checkpoint/state.json")}
    folders |= {path.parent for path in results.rglob("final_state.safetensors")}
    return sorted(folders)


@pytest.mark.parametrize("folder", committed_runs(), ids=lambda p: str(p.relative_to(ROOT / "benchmarks" / "results")))
def test_every_committed_checkpoint_and_final_state_reads(folder):
    run_dir = RunDir(folder)
    config = run_dir.read_config()
    rounds = config["federation"]["rounds"]
    assert [r["round"] for r in run_dir.read_metrics() if r["status"] == "completed"] == list(range(1, rounds + 1))
    names = None
    if (folder / "checkpoint").is_dir():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, checkpoint = run_dir.read_checkpoint()
        assert any("version-1 checkpoint" in str(w.message) for w in caught)
        assert checkpoint.round == rounds and len(checkpoint.history) == rounds
        assert checkpoint.extra["pool_fingerprint"] and checkpoint.rng["torch"].dtype == torch.uint8
        assert all(torch.isfinite(t).all() for t in checkpoint.global_state.values())
        names = sorted(checkpoint.global_state)
    final = run_dir.read_final_state()
    if final is not None:
        tensors, metadata = final
        assert {"method", "round", "pool_fingerprint", "config_fingerprint", "quotas"} <= set(metadata)
        assert int(metadata["round"]) == rounds and metadata["method"] == config["method"]
        assert all(torch.isfinite(t).all() for t in tensors.values())
        assert names is None or sorted(tensors) == names
    assert names is not None or final is not None
