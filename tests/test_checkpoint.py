"""Nothing is lost (docs/reliability.md): checkpoints are fsynced, hashed, verified on load, the
previous one is kept until the next is verified and taken with a warning when the latest is
damaged; the run-folder guard refuses a folder that is not a run of this config; run files are
written durably and metrics.jsonl is rebuilt in round order."""

import hashlib
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from smartfed.federated import checkpoint as checkpoint_module
from smartfed.federated.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    CheckpointError,
    capture_rng_states,
    find_checkpoint,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from smartfed.federated.run_dir import (
    RunDir,
    RunDirError,
    append_jsonl,
    fsync_write,
    rebuild_metrics,
    write_jsonl,
)
from smartfed.staging import MARKER, MARKER_KIND, make_staging

ROOT = Path(__file__).resolve().parent.parent
LATEST, PREVIOUS = "checkpoint", "checkpoint.previous"


def make_checkpoint(round_index, seed=0):
    generator = torch.Generator().manual_seed(seed + round_index)
    state = {
        "layers.0.q_proj.router_weight": torch.randn(4, 8, generator=generator),
        "layers.0.q_proj.router_bias": torch.randn(4, generator=generator).to(torch.bfloat16),
        "layers.0.v_proj.router_weight": torch.randn(4, 4, generator=generator).to(torch.float16),
    }
    return Checkpoint(
        round=round_index, global_state=state, quotas={"layers.0.q_proj": round_index},
        history=[{"round": r, "loss": 1.0 / r, "status": "completed"} for r in range(1, round_index + 1)],
        config_fingerprint="cfg", extra={"seed": 3, "importance_ema": {"layers.0.q_proj": 0.25}},
    )


def assert_same(loaded, expected):
    assert (loaded.round, loaded.quotas, loaded.history, loaded.config_fingerprint, loaded.extra) == (
        expected.round, expected.quotas, expected.history, expected.config_fingerprint, expected.extra)
    assert sorted(loaded.global_state) == sorted(expected.global_state)
    for name, tensor in expected.global_state.items():
        assert loaded.global_state[name].dtype == tensor.dtype and torch.equal(loaded.global_state[name], tensor)


@pytest.fixture
def two_rounds(tmp_path):
    """A run folder checkpointed after rounds 1 and 2: ``checkpoint`` (round 2) and
    ``checkpoint.previous`` (round 1)."""
    first, second = make_checkpoint(1), make_checkpoint(2)
    save_checkpoint(tmp_path, first)
    save_checkpoint(tmp_path, second)
    return tmp_path, first, second


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- format and round trip


def test_round_trip_is_bit_identical_and_restores_every_rng(tmp_path):
    checkpoint = make_checkpoint(3)
    checkpoint.quotas = {7: 2}  # int keys come back as JSON gives them, and the self-hash still agrees
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    checkpoint.rng = capture_rng_states()
    expected_draws = (torch.rand(3), random.random(), np.random.rand())
    save_checkpoint(tmp_path, checkpoint)
    loaded = load_checkpoint(tmp_path)
    assert loaded.quotas == {"7": 2}
    loaded.quotas = {7: 2}
    assert_same(loaded, checkpoint)
    restore_rng_states(loaded.rng)
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_state_json_records_the_sha256_of_every_file_and_of_itself(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(1))
    folder = tmp_path / CHECKPOINT_DIR
    state = json.loads((folder / "state.json").read_text())
    tensors = (folder / "tensors.safetensors").read_bytes()
    assert state["files"] == {"tensors.safetensors": {"bytes": len(tensors),
                                                      "sha256": hashlib.sha256(tensors).hexdigest()}}
    claimed = state.pop("state_sha256")
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    assert claimed == hashlib.sha256(canonical).hexdigest()
    assert (state["format"], state["version"], state["round"]) == ("smartfed-checkpoint", 2, 1)
    assert set(state["rng"]) == {"python", "numpy"} and "fresh AdamW" in state["optimizer"]


def test_every_file_and_folder_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(tmp_path, make_checkpoint(1))
    names = [Path(path).name for path in synced]
    staging = [name for name in names if name.startswith(".checkpoint-")]
    assert "tensors.safetensors.tmp" in names and "state.json.tmp" in names
    assert staging and str(tmp_path) in synced  # the staging folder, and the run folder after the renames
    assert synced[-1] == str(tmp_path)


# --------------------------------------------------------------------------- the previous checkpoint


def test_the_previous_checkpoint_is_kept_until_the_next_is_written(two_rounds):
    output, first, second = two_rounds
    assert sorted(p.name for p in output.iterdir()) == [LATEST, PREVIOUS]
    assert_same(checkpoint_module.verify_checkpoint(output / PREVIOUS), first)
    assert_same(load_checkpoint(output), second)
    third = make_checkpoint(3)
    save_checkpoint(output, third)
    assert sorted(p.name for p in output.iterdir()) == [LATEST, PREVIOUS]
    assert_same(checkpoint_module.verify_checkpoint(output / PREVIOUS), second)
    assert_same(load_checkpoint(output), third)


def test_a_save_that_does_not_verify_changes_nothing(two_rounds, monkeypatch):
    output, first, second = two_rounds
    real_write = checkpoint_module.fsync_write

    def short_write(path, data):
        if Path(path).name == "tensors.safetensors":
            data = data[:-1]
        return real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "fsync_write", short_write)
    with pytest.raises(CheckpointError, match=r"\.checkpoint-.*tensors.safetensors: truncated or damaged"):
        save_checkpoint(output, make_checkpoint(3))
    assert sorted(p.name for p in output.iterdir()) == [LATEST, PREVIOUS]
    assert_same(load_checkpoint(output), second)


@pytest.mark.parametrize("damage, file, problem", [
    (truncate, "tensors.safetensors", "truncated or damaged, [0-9]+ bytes where state.json records [0-9]+"),
    (flip_last_byte, "tensors.safetensors", "damaged, sha256 [0-9a-f]{16} where state.json records"),
    (truncate, "state.json", "not valid JSON, truncated or damaged"),
    (lambda path: path.write_text(path.read_text().replace('"round": 2', '"round": 3')), "state.json",
     "damaged, its content hashes to sha256"),
    (lambda path: path.unlink(), "tensors.safetensors", "missing"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(two_rounds, damage, file, problem):
    output, first, _ = two_rounds
    damage(output / LATEST / file)
    message = (rf"{output / LATEST / file}: {problem}.*; falling back to the previous checkpoint .*{PREVIOUS} "
               r"\(round 1\)")
    with pytest.warns(UserWarning, match=message):
        assert find_checkpoint(output) == output / PREVIOUS
    with pytest.warns(UserWarning, match=message):
        assert_same(load_checkpoint(output), first)


def test_both_checkpoints_damaged_is_an_error_naming_both_files(two_rounds):
    output, _, _ = two_rounds
    truncate(output / LATEST / "tensors.safetensors")
    truncate(output / PREVIOUS / "state.json")
    pattern = (rf"no intact checkpoint under {output}: {output / LATEST / 'tensors.safetensors'}: truncated or "
               rf"damaged.*; {output / PREVIOUS / 'state.json'}: not valid JSON")
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(output)
    with pytest.raises(CheckpointError, match=pattern):
        find_checkpoint(output)


def test_a_checkpoint_without_hashes_is_refused(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(1))
    state_path = tmp_path / LATEST / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("format", "version", "state_sha256", "files"):
        del state[key]
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"state.json: expected a 'smartfed-checkpoint' state of version 2 "
                                              r"\(format, version\), found \(None, None\)"):
        load_checkpoint(tmp_path)


def test_saving_over_a_damaged_latest_keeps_the_intact_previous(two_rounds):
    output, first, _ = two_rounds
    flip_last_byte(output / LATEST / "tensors.safetensors")
    redo = make_checkpoint(2, seed=1)
    with pytest.warns(UserWarning, match=r"tensors.safetensors: damaged.*; replacing it and keeping .*previous"):
        save_checkpoint(output, redo)
    assert_same(checkpoint_module.verify_checkpoint(output / PREVIOUS), first)
    assert_same(load_checkpoint(output), redo)


def test_a_crash_between_the_renames_resumes_from_the_previous_without_a_warning(tmp_path):
    checkpoint = make_checkpoint(3)
    save_checkpoint(tmp_path, checkpoint)
    (tmp_path / LATEST).rename(tmp_path / PREVIOUS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(tmp_path) == tmp_path / PREVIOUS
        assert_same(load_checkpoint(tmp_path), checkpoint)
    assert find_checkpoint(tmp_path / "elsewhere") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        load_checkpoint(tmp_path / "elsewhere")


def test_staging_folders_left_by_a_crash_are_removed_by_the_next_save_or_load(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(1))
    dead = make_staging(tmp_path, ".checkpoint-")
    live = make_staging(tmp_path, ".checkpoint-")  # another process still saving: left alone
    (dead / MARKER).write_text(json.dumps({"kind": MARKER_KIND, "pid": 999_999_999}))
    (live / MARKER).write_text(json.dumps({"kind": MARKER_KIND, "pid": os.getppid()}))
    unmarked = tmp_path / ".checkpoint-999999999-not-ours"  # a staging name, but no marker: not ours
    unmarked.mkdir()
    for folder in (dead, live, unmarked):
        (folder / "tensors.safetensors").write_bytes(b"partial")
    load_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, live.name, unmarked.name])
    assert (unmarked / "tensors.safetensors").read_bytes() == b"partial"
    make_staging(tmp_path, ".checkpoint-")  # this process's own leftover
    save_checkpoint(tmp_path, make_checkpoint(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST, PREVIOUS, live.name, unmarked.name])
    assert not (tmp_path / LATEST / MARKER).exists()


# --------------------------------------------------------------------------- the run folder


CONFIG = {"seed": 0, "federation": {"rounds": 2, "lr": 0.01}, "faults": {1: {0: "nan"}}}


def test_a_missing_or_empty_folder_takes_a_fresh_run(tmp_path):
    assert RunDir(tmp_path / "new").check_writable(CONFIG, resume=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").check_writable(CONFIG, resume=False)


def test_a_users_folder_is_refused_and_left_byte_identical(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    files = {"notes.txt": b"my notes\n", "config.json": b'{"learning_rate": 3}\n', "metrics.jsonl": b"{}\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(RunDirError, match=rf"^{folder} holds files not written by a smartfed run "
                                          r"\(config.json, notes.txt\): give --output a new or empty folder"):
        RunDir(folder).check_writable(CONFIG, resume=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_a_run_of_another_config_is_refused_and_one_of_this_config_taken(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    for name in ("metrics.jsonl", "metrics.jsonl.tmp", "resumes.jsonl"):
        (folder / name).write_text("")
    (folder / ".checkpoint-123-abc").mkdir()
    RunDir(folder).check_writable(CONFIG, resume=False)
    other = {**CONFIG, "federation": {"rounds": 2, "lr": 0.5}}
    with pytest.raises(RunDirError, match=rf"^{folder} holds a run of another config \(config.json: federation.lr "
                                          r"is 0.01 there, 0.5 now\)"):
        RunDir(folder).check_writable(other, resume=False)
    RunDir(folder).check_writable(other, resume=True)  # the config is compared by check_resume


def test_run_files_without_their_config_and_a_file_as_folder_are_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match=rf"^{folder} holds run files \(metrics.jsonl\) but no config.json"):
        RunDir(folder).check_writable(CONFIG, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="file is not a folder"):
        RunDir(tmp_path / "file").check_writable(CONFIG, resume=True)


def test_smartfed_train_refuses_a_users_folder_with_exit_2_before_building_anything(tmp_path, capsys, monkeypatch):
    from smartfed.cli import main
    from smartfed.experiments import runs

    monkeypatch.setattr(runs, "open_run", lambda *args, **kwargs: pytest.fail("the run was built"))
    folder = tmp_path / "mine"
    folder.mkdir()
    files = {"notes.txt": b"keep me", "config.json": b'{"lr": 1}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    status = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--output", str(folder)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert "holds files not written by a smartfed run (config.json, notes.txt)" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


# --------------------------------------------------------------------------- durable run files


def test_fsync_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "final_state.safetensors"
    fsync_write(path, b"old")
    fsync_write(path, "new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_metrics_are_rebuilt_in_round_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 2, "status": "completed", "loss": 0.5})
    append_jsonl(path, {"round": 1, "status": "completed", "loss": 0.9})
    append_jsonl(path, {"round": 2, "status": "failed", "attempt": 0})
    append_jsonl(path, {"round": 3, "status": "completed", "loss": 0.1})  # after the checkpoint: done again
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"round": 4, "sta')  # cut short by a crash
    history = [{"round": r, "status": "completed", "loss": 1.0 / r} for r in (1, 2)]
    written = rebuild_metrics(path, history, completed_round=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == written == [
        {"round": 1, "status": "completed", "loss": 0.9},
        {"round": 2, "status": "failed", "attempt": 0},
        {"round": 2, "status": "completed", "loss": 0.5},
    ]
    path.unlink()
    assert rebuild_metrics(path, history, completed_round=2) == history
    write_jsonl(path, [])
    assert path.read_text() == ""


# --------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_over_damaged_checkpoints_ends_like_an_uninterrupted_run(cache_dir, tmp_path, capsys):
    """``smartfed train --resume`` after the latest checkpoint was truncated, then after it had a
    byte flipped: each time it warns, redoes the lost round from the previous checkpoint, and the
    run ends with routers bit-identical to a run never interrupted."""
    from smartfed.cli import main

    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--no-progress", "--set", f"pool.cache_dir={cache_dir}",
              "--set", "task.train_examples=128", "--set", "task.eval_examples=32", "--set", "federation.local_steps=2"]
    reference, damaged = tmp_path / "reference", tmp_path / "damaged"
    assert main(["train", "--output", str(reference)] + common) == 0
    assert main(["train", "--output", str(damaged), "--stop-after-round", "2"] + common) == 0
    truncate(damaged / LATEST / "tensors.safetensors")
    with pytest.warns(UserWarning, match=r"tensors.safetensors: truncated or damaged.*falling back to the previous "
                                         r"checkpoint .*\(round 1\)"):
        assert main(["train", "--output", str(damaged), "--resume", "--stop-after-round", "3"] + common) == 0
    assert load_checkpoint(damaged).round == 3
    flip_last_byte(damaged / LATEST / "tensors.safetensors")
    with pytest.warns(UserWarning, match=r"tensors.safetensors: damaged, sha256.*\(round 2\)"):
        assert main(["train", "--output", str(damaged), "--resume"] + common) == 0
    capsys.readouterr()
    final, expected = load_checkpoint(damaged), load_checkpoint(reference)
    assert final.round == expected.round == 4
    for name, tensor in expected.global_state.items():
        assert torch.equal(final.global_state[name], tensor), name
    rounds = [json.loads(line)["round"] for line in (damaged / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_pool_cache_build_removes_crashed_staging_and_leaves_none_of_its_own(tmp_path, monkeypatch):
    from smartfed.config import config_from_dict
    from smartfed.experiments import assets

    config = config_from_dict({"pool": {"cache_dir": str(tmp_path), "train_steps": 2, "batch_size": 8}})
    from smartfed.staging import MARKER, MARKER_KIND

    crashed = tmp_path / f"{assets.POOL_STAGING_PREFIX}crashed"
    (crashed / "source_0").mkdir(parents=True)
    (crashed / MARKER).write_text(json.dumps({"kind": MARKER_KIND, "pid": 2**31 - 1}))

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(assets, "_train_source_adapter", fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            assets.build_tiny_pool(config, progress=False)
    assert not list(tmp_path.glob(assets.POOL_STAGING_PREFIX + "*"))
    paths = assets.build_tiny_pool(config, progress=False)
    assert all((path / "adapter_config.json").is_file() for path in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[0].parent.name]


# --------------------------------------------------------------------------- forged files


def rehash(state_path, change):
    """Apply ``change`` to a state.json and record its new self-hash, as a forger would."""
    meta = json.loads(state_path.read_text())
    meta.pop("state_sha256")
    change(meta)
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    meta["state_sha256"] = hashlib.sha256(canonical).hexdigest()
    state_path.write_text(json.dumps(meta))


def _set(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


@pytest.mark.parametrize("change, problem", [
    (_set(["round"], "2"), "'round' must be an int >= 0"),
    (_set(["round"], True), "'round' must be an int >= 0"),
    (_set(["quotas"], [1, 2]), "'quotas' must be null or a mapping"),
    (_set(["quotas"], {"m": "2"}), "'quotas' must be null or a mapping"),
    (_set(["history"], [{"loss": 1.0}]), "'history' must be a list of round records"),
    (_set(["history"], "all"), "'history' must be a list of round records"),
    (lambda meta: meta.pop("config_fingerprint"), "'config_fingerprint' must be a string"),
    (_set(["extra"], []), "'extra' must be a mapping"),
    (lambda meta: meta.pop("rng"), "'rng.python' must be python's random state"),
    (lambda meta: meta["rng"]["python"][1].pop(), "'rng.python' must be python's random state"),
    (_set(["rng", "numpy", 1, 0], 2**40), "'rng.numpy' must be numpy's MT19937 state"),
    (_set(["rng", "numpy", 2], 10**6), "'rng.numpy' must be numpy's MT19937 state"),
    (_set(["files"], "none"), "records no sha256 for tensors.safetensors"),
    (_set(["files", "tensors.safetensors", "bytes"], [1]), "truncated or damaged"),
])
def test_a_forged_state_with_its_self_hash_recomputed_is_refused_in_one_line(tmp_path, change, problem):
    save_checkpoint(tmp_path, make_checkpoint(1))
    rehash(tmp_path / LATEST / "state.json", change)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    assert problem in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_a_forged_torch_rng_state_is_refused(tmp_path):
    import safetensors.torch

    save_checkpoint(tmp_path, make_checkpoint(1))
    tensors_path = tmp_path / LATEST / "tensors.safetensors"
    tensors = safetensors.torch.load(tensors_path.read_bytes())
    tensors["rng/torch"] = torch.zeros(7, dtype=torch.float32)
    data = safetensors.torch.save(tensors)
    tensors_path.write_bytes(data)
    rehash(tmp_path / LATEST / "state.json",
           _set(["files", "tensors.safetensors"], {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(CheckpointError, match=r"'rng/torch' must be a torch.uint8 tensor of shape \(5056,\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.extra.pop("seed"), r"'extra' lacks \['seed'\]"),
    (lambda c: c.extra.update(seed="3"), "'extra.seed' must be an int >= 0"),
    (lambda c: c.extra.update(importance_ema={"m": "hot"}), "'extra.importance_ema' must be null or map"),
    (lambda c: c.extra.update(quota_history={"1": 2}), "'extra.quota_history' must be a list"),
    (lambda c: c.global_state.update(w=torch.zeros(3)), r"w is torch.float32 \(3,\), the model's is torch.float32 \(2,\)"),
    (lambda c: c.global_state.update(v=torch.zeros(2)), r"tensor names differ \(missing \[\], unexpected \['v'\]\)"),
    (lambda c: setattr(c, "quotas", {"m": 9}), "'quotas' must give each module"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_in_one_line(change, problem):
    from smartfed.federated.server import ServerState

    checkpoint = Checkpoint(
        round=1, global_state={"w": torch.zeros(2)}, quotas={"m": 2}, history=[], config_fingerprint="cfg",
        extra={"seed": 3, "max_per_matrix": {"m": 4}, "total_budget": 2, "importance_ema": None, "quota_history": []},
    )
    assert ServerState.from_checkpoint(checkpoint, reference={"w": torch.ones(2)}).round == 1
    change(checkpoint)
    with pytest.raises(CheckpointError, match=problem):
        ServerState.from_checkpoint(checkpoint, reference={"w": torch.ones(2)})


def test_a_version_1_checkpoint_is_read_for_a_reader_and_refused_for_a_resume(tmp_path):
    from smartfed.federated.checkpoint import read_checkpoint

    checkpoint = make_checkpoint(2)
    save_checkpoint(tmp_path, checkpoint)
    state_path = tmp_path / LATEST / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("format", "version", "state_sha256", "files"):
        del state[key]
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="a version-1 checkpoint: it can be read, not resumed"):
        load_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="version-1 checkpoint.*read without verification"):
        folder, read = read_checkpoint(tmp_path)
    assert folder == tmp_path / LATEST
    assert_same(read, checkpoint)
