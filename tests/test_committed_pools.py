"""The committed public pools (pools/, docs/experiment.md "v2: evidence that holds") are the files
their manifests describe, and they hold the very adapters the committed runs were trained on
(v1 runs: pools/public_v1; v2 runs: pools/public_v2): the pool fingerprint each run recorded is
that of the committed copies. Reads
safetensors only (no base model), so it runs everywhere CI does."""

import hashlib
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from smartfed.pool import LoRAPool
from smartfed.tasks.templates import TEXTS

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


def test_the_committed_pools_are_v1_and_v2_and_small():
    assert [path.name for path in POOL_DIRS] == ["public_v1", "public_v2"]
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


def test_the_v2_adapters_are_float16_finite_and_load_into_the_pool_exactly():
    pool = POOLS / "public_v2"
    record = manifest(pool)
    assert record["dtype"] == "float16"
    for adapter in record["adapters"]:
        stored = safetensors.torch.load_file(str(pool / adapter["name"] / "adapter_model.safetensors"))
        assert stored and all(tensor.dtype == torch.float16 and bool(torch.isfinite(tensor).all())
                              for tensor in stored.values())
        loaded = LoRAPool.from_pretrained(pool / adapter["name"])
        for module in loaded.modules.values():
            assert module.expert_a.dtype == torch.float32
            assert torch.equal(module.expert_a.half().float(), module.expert_a)


def test_the_v2_provenance_names_templates_training_data_and_code():
    for adapter in manifest(POOLS / "public_v2")["adapters"]:
        provenance = json.loads((POOLS / "public_v2" / adapter["name"] / "provenance.json").read_text())
        assert provenance["training_data"]["rows"] > 0 and len(provenance["training_data"]["sha256"]) == 64
        assert len(provenance["code_version"].split("+")[0]) == 40
        assert provenance["environment"]["cpu_capability"]
        # Trained on pool templates only (several paraphrases), checked on those and one it never saw.
        assert len(provenance["templates"]) >= 2
        for template, text in provenance["templates"].items():
            family, role = template.split("/")
            assert role.startswith("pool-") and text in TEXTS[family]["pool"]
        assert set(provenance["check_templates"]) - set(provenance["templates"])
        assert provenance["check_after"]["rows"] > 0


def committed_runs():
    """(run folder, its pool paths as its config names them, the pool fingerprint its final state
    recorded) of every committed run trained on a public pool."""
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
        runs.append((run, tuple(paths), recorded))
    return runs


def committed_copy(paths):
    """The committed adapters behind a run's pool paths: a v2 run names pools/public_v2 itself;
    a v1 run names where its pool was built (build/public_pool/...), committed as pools/public_v1."""
    if all(path.startswith("pools/") for path in paths):
        return [ROOT / path for path in paths]
    return [POOLS / "public_v1" / Path(path).name for path in paths]


def test_every_committed_run_was_trained_on_a_committed_pool():
    runs = committed_runs()
    assert len(runs) >= 40
    assert any(all(path.startswith("pools/public_v2/") for path in paths) for _, paths, _ in runs)
    fingerprints = {}
    for run, paths, recorded in runs:
        if paths not in fingerprints:
            fingerprints[paths] = LoRAPool.from_pretrained(committed_copy(paths)).fingerprint
        assert fingerprints[paths] == recorded, run.relative_to(RESULTS)
