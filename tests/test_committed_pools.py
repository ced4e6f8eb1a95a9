"""The committed public pools (pools/, docs/experiment.md "v2: evidence that holds") are the files
their manifests describe, and pools/public_v1 holds the very adapters the committed v1 runs were
trained on: the pool fingerprint each run recorded is that of the committed copies. Reads
safetensors only (no base model), so it runs everywhere CI does."""

import hashlib
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from smartfed.pool import LoRAPool

ROOT = Path(__file__).resolve().parent.parent
POOLS = ROOT / "pools"
RESULTS = ROOT / "benchmarks" / "results"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "provenance.json"}
# The committed pools stay small enough for a git repository (the v1 copies are float32).
MAX_POOLS_BYTES = 20 * 2**20
POOL_DIRS = sorted(path for path in POOLS.iterdir() if path.is_dir())


def manifest(pool):
    return json.loads((pool / "manifest.json").read_text())


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_committed_pools_are_v1_and_small():
    assert [path.name for path in POOL_DIRS] == ["public_v1"]
    assert sum(path.stat().st_size for path in POOLS.rglob("*") if path.is_file()) < MAX_POOLS_BYTES


@pytest.mark.parametrize("pool", POOL_DIRS, ids=lambda path: path.name)
def test_every_adapter_is_the_file_its_manifest_hashes(pool):
    record = manifest(pool)
    names = [adapter["name"] for adapter in record["adapters"]]
    assert sorted(path.name for path in pool.iterdir() if path.is_dir()) == sorted(names)
    for adapter in record["adapters"]:
        folder = pool / adapter["name"]
        assert {path.name for path in folder.iterdir()} == ADAPTER_FILES
        assert {name: sha256(folder / name) for name in adapter["files_sha256"]} == adapter["files_sha256"]
        assert set(adapter["files_sha256"]) == ADAPTER_FILES - {"provenance.json"}
        assert json.loads((folder / "provenance.json").read_text())["files_sha256"] == adapter["files_sha256"]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (record["lora"]["r"], record["lora"]["lora_alpha"])
        assert sorted(config["target_modules"]) == sorted(record["lora"]["target_modules"])


def committed_runs():
    """(run folder, its pool folder names, the pool fingerprint its final state recorded) of every
    committed run trained on the v1 public pool."""
    runs = []
    for config_path in sorted(RESULTS.glob("**/config.json")):
        run = config_path.parent
        paths = json.loads(config_path.read_text()).get("pool", {}).get("paths")
        if not paths:
            continue
        if (run / "final_state.safetensors").is_file():
            with safetensors.safe_open(str(run / "final_state.safetensors"), "pt") as state:
                recorded = state.metadata()["pool_fingerprint"]
        elif (run / "checkpoint" / "state.json").is_file():
            recorded = json.loads((run / "checkpoint" / "state.json").read_text())["extra"]["pool_fingerprint"]
        else:
            continue  # a grid run that kept no state
        runs.append((run, tuple(Path(path).name for path in paths), recorded))
    return runs


def test_every_committed_v1_run_was_trained_on_the_committed_v1_pool():
    runs = committed_runs()
    assert len(runs) >= 40
    fingerprints = {}
    for run, names, recorded in runs:
        if names not in fingerprints:
            fingerprints[names] = LoRAPool.from_pretrained([POOLS / "public_v1" / name for name in names]).fingerprint
        assert fingerprints[names] == recorded, run.relative_to(RESULTS)
