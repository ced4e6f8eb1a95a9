"""The default model folder made from a GGUF file: once, under a lock, never over a user's folder."""

import shutil
import threading
import time

import pytest

from smartfed import models


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "model.Q4_1.gguf"
    path.write_bytes(b"GGUF" + bytes(range(60)))
    return path


@pytest.fixture
def conversions(monkeypatch):
    """Each conversion writes a config.json and the marker, slowly enough for callers to overlap."""
    made = []

    def convert(gguf_path, target_dir, source):
        made.append(target_dir)
        time.sleep(0.3)
        staging = target_dir.with_name(target_dir.name + ".staging")
        staging.mkdir()
        (staging / "config.json").write_text(f'{{"made": {len(made)}}}')
        (staging / models.COMPLETE_MARKER).write_text(source + "\n")
        if target_dir.exists():
            shutil.rmtree(target_dir)
        staging.replace(target_dir)

    monkeypatch.setattr(models, "_convert", convert)
    return made


def test_callers_starting_together_convert_once(gguf_file, conversions, tmp_path):
    target = tmp_path / "models" / "smollm2"
    results, errors = [], []

    def call():
        try:
            results.append(models.materialize_gguf(gguf_file, target))
        except Exception as error:  # collected: the assertion below names it
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [target] * 3
    assert len(conversions) == 1
    assert (target / "config.json").read_text() == '{"made": 1}'


def test_a_finished_folder_is_reused_and_another_gguf_file_reconverts(gguf_file, conversions, tmp_path):
    target = tmp_path / "models" / "smollm2"
    models.materialize_gguf(gguf_file, target)
    models.materialize_gguf(gguf_file, target)
    assert len(conversions) == 1
    gguf_file.write_bytes(gguf_file.read_bytes() + b"more")
    models.materialize_gguf(gguf_file, target)
    assert len(conversions) == 2


def test_a_users_folder_without_the_marker_is_left_alone(gguf_file, conversions, tmp_path):
    target = tmp_path / "models" / "smollm2"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by smartfed"):
        models.materialize_gguf(gguf_file, target)
    assert conversions == []
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "mine"
