"""``DIR/checkpoint/``: everything needed to continue a run exactly, written durably and verified.

Layout: ``tensors.safetensors`` (global trainable state under ``state/``, the torch RNG state)
and ``state.json`` (round, quotas, metrics so far, python and numpy RNG states, config
fingerprint, server bookkeeping such as the importance EMA). Client optimizers are fresh AdamW
instances per client per round (the usual FL choice), so no optimizer state lives between
rounds; the checkpoint records that choice under ``optimizer``.

Integrity: ``state.json`` records the size and sha256 of ``tensors.safetensors`` under ``files``
and, under ``state_sha256``, the sha256 of its own canonical JSON (sorted keys, no spaces)
without that field. Loading checks both before it parses a tensor.

Durability: a new checkpoint is written into a staging sibling ``.checkpoint-<pid>-*``, marked as
this project's by smartfed.staging (every file fsynced), read back and verified, and only then swapped in: the current checkpoint becomes
``checkpoint.previous`` (the one before it is discarded) and the staging folder becomes
``checkpoint``, the run folder fsynced after the renames. So at every instant the run folder holds
at least one verified checkpoint, and normally two. Loading takes ``checkpoint`` and falls back to
``checkpoint.previous``, with a warning naming the file and the problem, when the latest is
missing or damaged; when both are damaged it raises :class:`CheckpointError` naming both. A
staging folder left by a crash (recognised by its marker, never by its name) is removed by the
next save or load.

Hostile files: after the hashes (which anyone who can write the folder can recompute), every field
of ``state.json`` is checked for its type and range before it is used, and the torch RNG tensor for
its dtype and size, so a forged file is refused with one :class:`CheckpointError` line, never a
``KeyError`` or ``TypeError`` later.

Version 1 (written before hashes were recorded; the committed runs under ``benchmarks/results``)
cannot be verified: ``load_checkpoint`` (what a resume uses) refuses it, and ``read_checkpoint``
(what a reader of a finished run uses) reads it with a warning, its fields checked as above.
"""

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from smartfed.errors import SmartFedError
from smartfed.federated.run_dir import fsync_dir, fsync_write
from smartfed.staging import finish_staging, make_staging, remove_stale_staging

CHECKPOINT_DIR = "checkpoint"
PREVIOUS_DIR = "checkpoint.previous"
STAGING_PREFIX = ".checkpoint-"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = "smartfed-checkpoint"
CHECKPOINT_VERSION = 2
# Version 1 has neither format, version, file hashes nor a self-hash; these are its fields.
VERSION_1_FIELDS = frozenset({"round", "quotas", "history", "config_fingerprint", "extra", "optimizer", "rng"})
UINT32 = 2**32
MT_STATE_WORDS = 624  # Mersenne Twister state words (numpy); python's state adds the position
SELF_HASH = "state_sha256"
OPTIMIZER_POLICY = "fresh AdamW per client per round (no state between rounds)"
RNG_TENSOR = "rng/torch"
STATE_PREFIX = "state/"


class CheckpointError(SmartFedError, ValueError):
    """A checkpoint that fails verification, or a run folder with no intact checkpoint."""


@dataclass
class Checkpoint:
    round: int
    global_state: dict
    quotas: dict
    history: list
    config_fingerprint: str
    extra: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


def capture_rng_states():
    """Python, numpy (legacy global) and torch global RNG states, JSON/tensor friendly."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def restore_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_sha256(meta: dict) -> str:
    return _sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _discard(directory: Path) -> None:
    # Renamed out of the way first: a crash half-way through rmtree then leaves a staging folder
    # (cleaned by the next save) rather than a half-deleted checkpoint.
    doomed = make_staging(directory.parent, f"{STAGING_PREFIX}{os.getpid()}-discard-")
    os.replace(directory, doomed / directory.name)
    shutil.rmtree(doomed)


def _is_int(value, low=None, high=None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)
            and (high is None or value < high))


def _is_words(value, count) -> bool:
    return isinstance(value, list) and len(value) == count and all(_is_int(word, 0, UINT32) for word in value)


def _problem(meta: dict):
    """What is wrong with the fields of a ``state.json`` (its hashes already checked), or None."""
    if not _is_int(meta.get("round"), 0):
        return f"'round' must be an int >= 0, got {meta.get('round')!r:.40}"
    quotas = meta.get("quotas")
    if quotas is not None and not (isinstance(quotas, dict) and all(_is_int(k, 0) for k in quotas.values())):
        return "'quotas' must be null or a mapping of module -> int >= 0"
    history = meta.get("history")
    if not (isinstance(history, list) and all(isinstance(r, dict) and _is_int(r.get("round"), 0) for r in history)):
        return "'history' must be a list of round records, each with an int 'round'"
    for key in ("config_fingerprint", "optimizer"):
        if not isinstance(meta.get(key), str):
            return f"{key!r} must be a string, got {type(meta.get(key)).__name__}"
    if not isinstance(meta.get("extra"), dict):
        return f"'extra' must be a mapping, got {type(meta.get('extra')).__name__}"
    rng = meta.get("rng")
    python = rng.get("python") if isinstance(rng, dict) else None
    if not (isinstance(python, list) and len(python) == 3 and _is_int(python[0])
            and _is_words(python[1], MT_STATE_WORDS + 1) and (python[2] is None or isinstance(python[2], float))):
        return "'rng.python' must be python's random state [version, 625 words, gauss or null]"
    numpy_state = rng.get("numpy")
    if not (isinstance(numpy_state, list) and len(numpy_state) == 5 and numpy_state[0] == "MT19937"
            and _is_words(numpy_state[1], MT_STATE_WORDS) and _is_int(numpy_state[2], 0, MT_STATE_WORDS + 1)
            and numpy_state[3] in (0, 1) and isinstance(numpy_state[4], (int, float))):
        return "'rng.numpy' must be numpy's MT19937 state [name, 624 words, position, has_gauss, gauss]"
    return None


def _checkpoint_of(meta: dict, data: bytes, state_path: Path, tensors_path: Path) -> Checkpoint:
    """The Checkpoint of a parsed ``state.json`` and the bytes of its tensors file, every field
    checked (``CheckpointError`` naming the file otherwise)."""
    problem = _problem(meta)
    if problem is not None:
        raise CheckpointError(f"{state_path}: {problem}")
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as error:
        raise CheckpointError(f"{tensors_path}: not a readable safetensors file ({error})") from None
    if RNG_TENSOR not in tensors or any(n != RNG_TENSOR and not n.startswith(STATE_PREFIX) for n in tensors):
        raise CheckpointError(f"{tensors_path}: expected {RNG_TENSOR!r} and {STATE_PREFIX}* tensors, found "
                              f"{sorted(tensors)[:6]}")
    generator = tensors.pop(RNG_TENSOR)
    expected = torch.get_rng_state()
    if generator.dtype != expected.dtype or tuple(generator.shape) != tuple(expected.shape):
        raise CheckpointError(f"{tensors_path}: {RNG_TENSOR!r} must be a {expected.dtype} tensor of shape "
                              f"{tuple(expected.shape)}, got {generator.dtype} {tuple(generator.shape)}")
    return Checkpoint(
        round=meta["round"], global_state={name[len(STATE_PREFIX):]: t for name, t in tensors.items()},
        quotas=meta["quotas"], history=meta["history"], config_fingerprint=meta["config_fingerprint"],
        extra=meta["extra"], rng=dict(meta["rng"], torch=generator),
    )


def _read_meta(state_path: Path):
    try:
        text = state_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing") from None
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{state_path}: not valid JSON, truncated or damaged ({error})") from None


def _is_version_1(meta) -> bool:
    return isinstance(meta, dict) and set(meta) == VERSION_1_FIELDS


def _read_verified(directory: Path, *, version_1=False) -> Checkpoint:
    """The checkpoint in ``directory`` after every hash and field checks; else CheckpointError
    naming the file and what is wrong with it. ``version_1``: read a version-1 checkpoint (no
    hashes to check) with a warning instead of refusing it."""
    state_path, tensors_path = directory / STATE_FILE, directory / TENSORS_FILE
    meta = _read_meta(state_path)
    if version_1 and _is_version_1(meta):
        try:
            data = tensors_path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{tensors_path}: missing") from None
        warnings.warn(f"{state_path}: a version-1 checkpoint, written before checkpoints recorded their hashes: "
                      "read without verification")
        return _checkpoint_of(meta, data, state_path, tensors_path)
    found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
    if found != (CHECKPOINT_FORMAT, CHECKPOINT_VERSION):
        hint = " (a version-1 checkpoint: it can be read, not resumed)" if _is_version_1(meta) else ""
        raise CheckpointError(f"{state_path}: expected a {CHECKPOINT_FORMAT!r} state of version {CHECKPOINT_VERSION} "
                              f"(format, version), found {found!r}{hint}")
    recorded = meta.pop(SELF_HASH, None)
    actual = _canonical_sha256(meta)
    if recorded != actual:
        raise CheckpointError(f"{state_path}: damaged, its content hashes to sha256 {actual[:16]} but it records "
                              f"{SELF_HASH} {str(recorded)[:16]}")
    files = meta.get("files")
    expected = files.get(TENSORS_FILE) if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        raise CheckpointError(f"{state_path}: records no sha256 for {TENSORS_FILE}")
    try:
        data = tensors_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{tensors_path}: missing") from None
    if len(data) != expected.get("bytes"):
        raise CheckpointError(f"{tensors_path}: truncated or damaged, {len(data)} bytes where {state_path.name} "
                              f"records {expected.get('bytes')!r:.40}")
    digest = _sha256(data)
    if digest != expected.get("sha256"):
        raise CheckpointError(f"{tensors_path}: damaged, sha256 {digest[:16]} where {state_path.name} records "
                              f"{str(expected.get('sha256'))[:16]}")
    return _checkpoint_of(meta, data, state_path, tensors_path)


def verify_checkpoint(directory) -> Checkpoint:
    """Read and verify the checkpoint folder ``directory`` (a ``checkpoint`` or
    ``checkpoint.previous``); raises :class:`CheckpointError` naming the damaged file."""
    return _read_verified(Path(directory))


def _newest_intact(output_dir, *, version_1=False):
    """(folder, Checkpoint) of the newest checkpoint in ``output_dir`` that verifies, or None
    when there is none at all; warns for a damaged one it passes over. ``version_1``: as for
    ``_read_verified``."""
    output_dir = Path(output_dir)
    problems = []
    for directory in (output_dir / CHECKPOINT_DIR, output_dir / PREVIOUS_DIR):
        if not directory.is_dir():
            continue
        try:
            checkpoint = _read_verified(directory, version_1=version_1)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            # Issued from this line with a fixed text: Python shows it once per process however
            # many callers (the CLI's check, the strategy, the load) look for the checkpoint.
            warnings.warn(f"{problems[0]}; falling back to the previous checkpoint {directory} "
                          f"(round {checkpoint.round})")
        return directory, checkpoint
    if problems:
        raise CheckpointError(f"no intact checkpoint under {output_dir}: {'; '.join(problems)}")
    return None


def save_checkpoint(output_dir, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` as ``output_dir/checkpoint`` (see the module docstring); returns it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)
    target, previous = output_dir / CHECKPOINT_DIR, output_dir / PREVIOUS_DIR
    staging = make_staging(output_dir, f"{STAGING_PREFIX}{os.getpid()}-")
    try:
        rng = checkpoint.rng or capture_rng_states()
        tensors = {f"{STATE_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in checkpoint.global_state.items()}
        tensors[RNG_TENSOR] = rng["torch"]
        data = safetensors.torch.save(tensors)
        meta = json.loads(json.dumps({
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "round": checkpoint.round,
            "quotas": checkpoint.quotas,
            "history": checkpoint.history,
            "config_fingerprint": checkpoint.config_fingerprint,
            "extra": checkpoint.extra,
            "optimizer": OPTIMIZER_POLICY,
            "rng": {"python": rng["python"], "numpy": rng["numpy"]},
            "files": {TENSORS_FILE: {"bytes": len(data), "sha256": _sha256(data)}},
        }))  # normalized as a load will see it (int keys become strings), so the self-hash agrees
        meta[SELF_HASH] = _canonical_sha256(meta)
        fsync_write(staging / TENSORS_FILE, data)
        fsync_write(staging / STATE_FILE, json.dumps(meta))
        _read_verified(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.is_dir():
        try:
            _read_verified(target)
        except CheckpointError as error:
            # Demoting a damaged checkpoint would push out the intact previous one.
            warnings.warn(f"{error}; replacing it and keeping {previous}")
            _discard(target)
        else:
            if previous.exists():
                _discard(previous)
            os.replace(target, previous)
    finish_staging(staging)
    os.replace(staging, target)
    fsync_dir(output_dir)
    return target


def find_checkpoint(output_dir):
    """The checkpoint folder to resume from, or None when ``output_dir`` holds none: the latest
    when it verifies, else ``checkpoint.previous`` with a warning (it is also what is left when a
    crash fell between the two renames of ``save_checkpoint``). Raises CheckpointError when
    checkpoints exist but none verifies."""
    found = _newest_intact(output_dir)
    return None if found is None else found[0]


def load_checkpoint(output_dir) -> Checkpoint:
    """The verified checkpoint to resume ``output_dir`` from (see :func:`find_checkpoint`);
    FileNotFoundError when there is none, CheckpointError when none is intact."""
    remove_stale_staging(output_dir)
    found = _newest_intact(output_dir)
    if found is None:
        raise FileNotFoundError(f"no checkpoint under {Path(output_dir) / CHECKPOINT_DIR} to resume from")
    return found[1]


def read_checkpoint(output_dir):
    """(folder, Checkpoint) of the newest intact checkpoint of a finished run, for readers (never
    for a resume): as :func:`load_checkpoint`, and a version-1 checkpoint is read with a warning;
    None when the folder holds none. Nothing in the folder is changed."""
    return _newest_intact(output_dir, version_1=True)
