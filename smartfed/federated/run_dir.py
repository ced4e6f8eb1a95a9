"""The run folder: which folders a run may write into, and durable writes of its files.

``prepare_run_dir`` is the guard ``smartfed train`` and ``smartfed sweep`` run before any
expensive work: a fresh run goes only into a missing or empty folder, or into a folder that holds
nothing but the files of an unfinished run of the very same config (``config.json`` equal to the
new one). Anything else, a user's ``notes.txt`` or ``config.json``, or a run of another config,
is refused with a :class:`RunDirError` naming the folder and what it holds; nothing in the folder
is read beyond ``config.json`` and nothing is written. With ``resume`` the folder is the run's
own; the config and the checkpoint are checked by ``smartfed.config.check_resume`` and
``smartfed.federated.checkpoint``.

The writers (``fsync_write``, ``append_jsonl``, ``write_jsonl``) fsync every file and, after a
rename or a new file, its folder, so that a crash or a power cut leaves either the old content or
the new one. Standard library only: the CLI checks the folder before it imports torch.
"""

import fnmatch
import json
import os
from pathlib import Path

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_STATE_FILE = "final_state.safetensors"
CLIENT_EVALUATION_FILE = "client_evaluation.json"
# Every name a run writes into its folder; a module that writes a new one adds it here, or the
# guard will take a crashed run of that module for a user's folder.
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    "resumes.jsonl",
    FINAL_STATE_FILE,
    CLIENT_EVALUATION_FILE,
    "text_task.json",
    "expert_usage.json",
    "checkpoint",
    "checkpoint.previous",
    ".checkpoint-*",
)
TEMPORARY_SUFFIX = ".tmp"


class RunDirError(ValueError):
    """A run folder that this run must not write into."""


def is_run_file(name: str) -> bool:
    """Whether a run writes an entry named ``name`` (or its temporary twin) into its folder."""
    if name.endswith(TEMPORARY_SUFFIX):
        name = name[: -len(TEMPORARY_SUFFIX)]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


def _normalized(data):
    # What json.loads gives back for ``data``: tuples become lists, int keys strings.
    return json.loads(json.dumps(data))


def _first_difference(saved, wanted, prefix=""):
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted)):
            where = f"{prefix}.{key}" if prefix else key
            if key not in saved or key not in wanted:
                return where, saved.get(key, "<absent>"), wanted.get(key, "<absent>")
            found = _first_difference(saved[key], wanted[key], where)
            if found is not None:
                return found
        return None
    return None if saved == wanted else (prefix or "<whole config>", saved, wanted)


def _read_run_config(path: Path, wanted: dict):
    """The run config in ``path`` when it is one of this schema (a JSON object with the same
    sections as ``wanted``), else None."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(saved, dict) or set(saved) != set(wanted):
        return None
    return saved


def prepare_run_dir(output_dir, config_dict: dict, *, resume: bool) -> Path:
    """Check that the run of ``config_dict`` (``smartfed.config.config_to_dict``) may write into
    ``output_dir``; returns the folder as a Path. Writes nothing.

    Raises :class:`RunDirError` for a path that is not a folder and, unless ``resume``, for a
    folder holding files no smartfed run writes, a run of another config, or run files without
    the ``config.json`` that says whose they are.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} is not a folder: give --output a new or empty folder")
    if resume or not folder.exists():
        return folder
    names = sorted(entry.name for entry in folder.iterdir())
    if not names:
        return folder
    wanted = _normalized(config_dict)
    saved = _read_run_config(folder / CONFIG_FILE, wanted) if CONFIG_FILE in names else None
    foreign = [name for name in names if not is_run_file(name) or (name == CONFIG_FILE and saved is None)]
    if foreign:
        raise RunDirError(f"{folder} holds files not written by a smartfed run ({', '.join(foreign)}): give "
                          "--output a new or empty folder; nothing in it was changed")
    if saved is None:
        raise RunDirError(f"{folder} holds run files ({', '.join(names)}) but no {CONFIG_FILE} saying which run "
                          "wrote them: give --output a new or empty folder; nothing in it was changed")
    difference = _first_difference(saved, wanted)
    if difference is not None:
        key, before, after = difference
        raise RunDirError(f"{folder} holds a run of another config ({CONFIG_FILE}: {key} is {before!r} there, "
                          f"{after!r} now): give --output a new or empty folder, or --resume that run with its "
                          "own config; nothing in it was changed")
    return folder


def fsync_dir(folder) -> None:
    """Make the entries of ``folder`` (new files, renames) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_write(path, data) -> Path:
    """Replace ``path`` with ``data`` (bytes, or str written as UTF-8) atomically and durably:
    written to ``<path>.tmp``, fsynced, renamed over ``path``, and the folder fsynced."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return path


def append_jsonl(path, record) -> None:
    """Append ``record`` as one JSON line to ``path``, durably."""
    path = Path(path)
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)


def write_jsonl(path, records) -> Path:
    """Replace ``path`` with ``records``, one JSON line each, atomically and durably."""
    return fsync_write(path, "".join(json.dumps(record) + "\n" for record in records))


def rebuild_metrics(path, history, completed_round: int) -> list:
    """Rewrite ``metrics.jsonl`` for a run resumed after round ``completed_round``, whose
    checkpoint holds ``history`` (the completed rounds' records); returns the records written.

    Kept from the file: every failure record (``"status": "failed"``) and the completed rounds up
    to ``completed_round``; a line cut short by a crash is dropped. Each completed round the file
    lacks is taken from ``history``. The records come out in round order, a round's failed
    attempts before its completion, whatever order the file had them in.
    """
    path = Path(path)
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                continue
            if record.get("status") == "failed" or record["round"] <= completed_round:
                kept.append(record)
    present = {record["round"] for record in kept if record.get("status") != "failed"}
    kept.extend(record for record in history if record["round"] not in present)
    kept.sort(key=lambda record: (record["round"], record.get("status") != "failed"))
    write_jsonl(path, kept)
    return kept
