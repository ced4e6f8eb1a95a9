"""``DIR/checkpoint/``: everything needed to continue a run exactly, written atomically.

Layout: ``tensors.safetensors`` (global trainable state under ``state/``, the torch RNG state)
and ``state.json`` (round, quotas, metrics so far, python and numpy RNG states, config
fingerprint, server bookkeeping such as the importance EMA). A new checkpoint is written
into a temporary sibling directory and renamed over the old one, so a crash leaves either the
previous checkpoint or the new one, never a mix. Client optimizers are fresh AdamW instances per
client per round (the usual FL choice), so no optimizer state lives between rounds; the
checkpoint records that choice under ``optimizer``.
"""

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"
_PREVIOUS = "checkpoint.previous"
OPTIMIZER_POLICY = "fresh AdamW per client per round (no state between rounds)"


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


def save_checkpoint(output_dir, checkpoint: Checkpoint) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / CHECKPOINT_DIR
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=output_dir))
    rng = checkpoint.rng or capture_rng_states()
    tensors = {f"state/{k}": v.detach().cpu().contiguous() for k, v in checkpoint.global_state.items()}
    tensors["rng/torch"] = rng["torch"]
    save_file(tensors, str(staging / "tensors.safetensors"))
    meta = {
        "round": checkpoint.round,
        "quotas": checkpoint.quotas,
        "history": checkpoint.history,
        "config_fingerprint": checkpoint.config_fingerprint,
        "extra": checkpoint.extra,
        "optimizer": OPTIMIZER_POLICY,
        "rng": {"python": rng["python"], "numpy": rng["numpy"]},
    }
    with open(staging / "state.json", "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
        handle.flush()
        os.fsync(handle.fileno())
    previous = output_dir / _PREVIOUS
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def find_checkpoint(output_dir):
    """The checkpoint directory to resume from, or None. Falls back to the previous one when a
    crash happened between the two renames of ``save_checkpoint``."""
    output_dir = Path(output_dir)
    for name in (CHECKPOINT_DIR, _PREVIOUS):
        candidate = output_dir / name
        if (candidate / "state.json").is_file() and (candidate / "tensors.safetensors").is_file():
            return candidate
    return None


def load_checkpoint(output_dir) -> Checkpoint:
    directory = find_checkpoint(output_dir)
    if directory is None:
        raise FileNotFoundError(f"no checkpoint under {Path(output_dir) / CHECKPOINT_DIR} to resume from")
    tensors = load_file(str(directory / "tensors.safetensors"))
    with open(directory / "state.json", encoding="utf-8") as handle:
        meta = json.load(handle)
    rng = dict(meta["rng"], torch=tensors.pop("rng/torch"))
    global_state = {name[len("state/"):]: tensor for name, tensor in tensors.items()}
    return Checkpoint(
        round=meta["round"], global_state=global_state,
        quotas=meta["quotas"], history=meta["history"], config_fingerprint=meta["config_fingerprint"],
        extra=meta["extra"], rng=rng,
    )
