"""The run folder and its one writer, :class:`RunDir`.

Every file a run keeps is named here and written through a ``RunDir``: the run's config
(``config.json``), what each resume changed (``resumes.jsonl``), one line per round
(``metrics.jsonl``), the checkpoints (``checkpoint/``, ``checkpoint.previous/``, in the format of
``smartfed.federated.checkpoint``), the final state, the clients' own evaluation, and the files
other commands keep beside a run (the text task's splits, expert usage, an evaluation). The
strategy and the round driver compute; a ``RunDir`` records. Readers (``smartfed report``,
``evaluate``, ``expert-usage``) take the names and readers from here.

Two rules (docs/reliability.md):

- **Never touch a file the run did not write.** The folder's path is resolved (``..``, symlinks)
  before anything is checked, so ``nothere/../mine`` is ``mine``. A fresh run goes only into a
  missing or empty folder, or into one that holds nothing but the files of an unfinished run of
  the very same config (``config.json`` equal to the new one); anything else is refused with a
  :class:`RunDirError` naming the folder and what it holds, and nothing in it is read beyond
  ``config.json`` or written. ``RunDir.under_root`` keeps a Flower run's folder under the root the
  operator fixed on the server side.
- **Nothing is lost.** Every write is fsynced and, for a replaced or new file, renamed into place
  and the folder fsynced, so that a crash or a power cut leaves the old content or the new one.

Standard library only at import: the CLI checks the folder before it imports torch.
"""

import fnmatch
import json
import os
import warnings
from pathlib import Path

from smartfed.errors import SmartFedError
from smartfed.staging import pid_alive

CONFIG_FILE = "config.json"
RESUME_LOG = "resumes.jsonl"
METRICS_FILE = "metrics.jsonl"
FINAL_STATE_FILE = "final_state.safetensors"
CLIENT_EVALUATION_FILE = "client_evaluation.json"
TEXT_TASK_FILE = "text_task.json"
EXPERT_USAGE_FILE = "expert_usage.json"
EVALUATION_FILE = "evaluation.json"
CHECKPOINT_DIR = "checkpoint"
PREVIOUS_CHECKPOINT_DIR = "checkpoint.previous"
# Every name a run writes into its folder; a new file is added here, or the guard will take a
# crashed run that wrote it for a user's folder.
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    RESUME_LOG,
    FINAL_STATE_FILE,
    CLIENT_EVALUATION_FILE,
    TEXT_TASK_FILE,
    EXPERT_USAGE_FILE,
    EVALUATION_FILE,
    CHECKPOINT_DIR,
    PREVIOUS_CHECKPOINT_DIR,
    ".checkpoint-*",
)
TEMPORARY_SUFFIX = ".tmp"
# Where a Flower run's folders go: fixed by the operator on the server side, never by ``flwr run``.
OUTPUT_ROOT_ENV = "SMARTFED_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT = "~/smartfed-runs"


class RunDirError(SmartFedError, ValueError):
    """A run folder that this run must not write into."""


def output_root() -> Path:
    """The folder every ServerApp run writes under: ``$SMARTFED_OUTPUT_ROOT`` of the server side
    (the SuperLink's environment, or the process running the simulation), else ``~/smartfed-runs``."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or DEFAULT_OUTPUT_ROOT).expanduser()


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


def _read_json(path: Path):
    """The JSON value in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


# --------------------------------------------------------------------------- durable writes


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


# --------------------------------------------------------------------------- the run folder


class RunDir:
    """The run folder ``folder``, resolved (``..`` and symlinks) before anything is checked."""

    def __init__(self, folder):
        self.folder = Path(os.path.realpath(os.fspath(folder)))

    @classmethod
    def under_root(cls, root, relative) -> "RunDir":
        """The run folder ``relative`` under ``root`` (the output root the operator fixed on the
        server side); an absolute ``relative``, or one that leads out of ``root`` (``..``, a
        symlink), is refused with a RunDirError."""
        if os.path.isabs(relative):
            raise RunDirError(f"output-dir {relative!r} is an absolute path: it must be relative to the output "
                              f"root {root} that the server side fixed")
        base = Path(os.path.realpath(os.fspath(root)))
        run_dir = cls(base / relative)
        if run_dir.folder == base or base not in run_dir.folder.parents:
            raise RunDirError(f"output-dir {relative!r} leads to {run_dir.folder}, outside the output root {base} "
                              "that the server side fixed: give a folder below it")
        return run_dir

    def __repr__(self):
        return f"RunDir({str(self.folder)!r})"

    def path(self, name) -> Path:
        """The path of the run file ``name`` (one of ``RUN_FILES``)."""
        if not is_run_file(name):
            raise ValueError(f"{name!r} is not a file a run writes; run files: {', '.join(RUN_FILES)}")
        return self.folder / name

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS_FILE

    @property
    def final_state_path(self) -> Path:
        return self.folder / FINAL_STATE_FILE

    # --- the guard ----------------------------------------------------------------------------

    def check_writable(self, config_dict: dict, *, resume: bool) -> Path:
        """Check that the run of ``config_dict`` (``smartfed.config.config_to_dict``) may write
        here; returns the folder. Writes nothing.

        Raises :class:`RunDirError` for a path that is not a folder and, unless ``resume``, for a
        folder holding files no smartfed run writes, a run of another config, or run files without
        the ``config.json`` that says whose they are."""
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{folder} is not a folder: give --output a new or empty folder")
        if resume or not folder.exists():
            return folder
        names = sorted(entry.name for entry in folder.iterdir())
        if not names:
            return folder
        wanted = _normalized(config_dict)
        saved = self._saved_config(wanted) if CONFIG_FILE in names else None
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

    def _saved_config(self, wanted: dict):
        """The run config recorded here when it is one of this schema (a JSON object with the
        same sections as ``wanted``), else None."""
        saved = _read_json(self.config_path)
        if not isinstance(saved, dict) or set(saved) != set(wanted):
            return None
        return saved

    # --- the config and its resumes -----------------------------------------------------------

    def read_config(self) -> dict:
        """The run's recorded config as a mapping; RunDirError when there is none to read."""
        if not self.config_path.is_file():
            raise RunDirError(f"{self.folder} is not a run folder ({CONFIG_FILE} is missing)")
        saved = _read_json(self.config_path)
        if not isinstance(saved, dict):
            raise RunDirError(f"{self.config_path}: not a JSON object")
        return saved

    def write_config(self, config_dict: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fsync_write(self.config_path, json.dumps(config_dict, indent=1))

    def check_resume(self, config) -> dict:
        """Compare ``config`` with the recorded one before a resume (reads only ``config.json``);
        returns the resumable changes ``{key: (old, new)}``; a ConfigError names the first key
        that may not change (``smartfed.config.resume_changes``)."""
        from smartfed.config import ConfigError, resume_changes

        if not self.config_path.is_file():
            raise ConfigError(f"{self.folder} holds no run to continue ({CONFIG_FILE} is missing)", key="--resume")
        try:
            saved = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise ConfigError(f"cannot read the configuration of the run to continue: {error}",
                              source=self.config_path) from None
        return resume_changes(saved, config, source=self.config_path)

    def record_resume(self, config, changes: dict, *, at_round=None) -> None:
        """Make ``config.json`` describe the run as it continues and log what changed in
        ``resumes.jsonl`` (one line per resume that changed something)."""
        if not changes:
            return
        from smartfed.config import config_to_dict

        self.write_config(config_to_dict(config))
        entry = {"at_round": at_round, "changes": {key: list(pair) for key, pair in changes.items()}}
        append_jsonl(self.folder / RESUME_LOG, entry)

    # --- checkpoints --------------------------------------------------------------------------

    def completed_round(self):
        """The last round checkpointed here, or None when the folder holds no checkpoint."""
        from smartfed.federated.checkpoint import find_checkpoint, verify_checkpoint

        directory = find_checkpoint(self.folder)
        return None if directory is None else verify_checkpoint(directory).round

    def start_fresh(self, config_dict: dict) -> None:
        """Make this the folder of a fresh run: refused (FileExistsError) when it holds a
        checkpoint; records ``config.json``; the metrics of an earlier attempt of this very run
        (the guard let nothing else through) are cleared."""
        from smartfed.federated.checkpoint import find_checkpoint

        if find_checkpoint(self.folder) is not None:
            raise FileExistsError(f"output directory {self.folder} already holds a checkpoint: pass --resume to "
                                  "continue it or choose another --output")
        self.write_config(config_dict)
        if self.metrics_path.exists():
            self.metrics_path.unlink()
            fsync_dir(self.folder)

    def resume_checkpoint(self, *, config, pool_fingerprint, torch_threads):
        """The verified checkpoint to continue from, after the resume rules: made with ``config``
        (its fingerprint, or a legacy one that the run's ``config.json`` reproduces) and on the pool
        ``pool_fingerprint``; warns when it was written with another torch thread count (the
        routers will not be bit-identical)."""
        from smartfed.config import config_fingerprint, fingerprint_matches
        from smartfed.federated.checkpoint import load_checkpoint

        try:
            checkpoint = load_checkpoint(self.folder)
        except FileNotFoundError:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.folder} to continue from") from None
        saved = self.read_config() if self.config_path.is_file() else None
        if not fingerprint_matches(checkpoint.config_fingerprint, config, saved):
            raise RunDirError(f"--resume: the checkpoint in {self.folder} was made with another configuration "
                              f"(fingerprint {checkpoint.config_fingerprint}, now {config_fingerprint(config)})")
        saved_pool = checkpoint.extra.get("pool_fingerprint")
        if saved_pool != pool_fingerprint:
            raise RunDirError(f"--resume: the checkpoint in {self.folder} was trained on pool {str(saved_pool)[:16]}, "
                             f"not on the pool now loaded ({pool_fingerprint[:16]}); its routers index other experts")
        saved_threads = checkpoint.extra.get("torch_threads")
        if saved_threads != torch_threads:
            warnings.warn(
                f"--resume: the checkpoint was written with {saved_threads} torch threads, this process uses "
                f"{torch_threads}; CPU reductions split differently, so the routers will not be bit-identical to an "
                "uninterrupted run (set torch.set_num_threads to match)",
                stacklevel=3,
            )
        return checkpoint

    def save_checkpoint(self, checkpoint) -> Path:
        from smartfed.federated.checkpoint import save_checkpoint

        return save_checkpoint(self.folder, checkpoint)

    def read_checkpoint(self):
        """(folder, Checkpoint) of the newest intact checkpoint for a reader of the run (a
        version-1 checkpoint of the committed runs included, with a warning), or None."""
        from smartfed.federated.checkpoint import read_checkpoint

        return read_checkpoint(self.folder)

    # --- metrics, final state and the other records -------------------------------------------

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def rebuild_metrics(self, history, completed_round: int) -> list:
        return rebuild_metrics(self.metrics_path, history, completed_round)

    def read_metrics(self) -> list:
        """The records of ``metrics.jsonl`` (a line cut short by a crash is skipped)."""
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def write_final_state(self, state: dict, metadata: dict) -> Path:
        """The final global state (``final_state.safetensors``) with string ``metadata``."""
        import safetensors.torch

        data = safetensors.torch.save({name: tensor.contiguous() for name, tensor in state.items()}, metadata=metadata)
        return fsync_write(self.final_state_path, data)

    def read_final_state(self):
        """(tensors, metadata) of ``final_state.safetensors``, or None when the run wrote none;
        a RunDirError for a file that is not a readable safetensors file."""
        import safetensors
        import safetensors.torch

        if not self.final_state_path.is_file():
            return None
        data = self.final_state_path.read_bytes()
        try:
            tensors = safetensors.torch.load(data)
            with safetensors.safe_open(str(self.final_state_path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except safetensors.SafetensorError as error:
            raise RunDirError(f"{self.final_state_path}: not a readable safetensors file ({error})") from None
        return tensors, metadata

    def write_json(self, name: str, data) -> Path:
        """One of the run's JSON records (``client_evaluation.json``, ``text_task.json``,
        ``expert_usage.json``, ``evaluation.json``), replaced durably."""
        return fsync_write(self.path(name), json.dumps(data, indent=1))
