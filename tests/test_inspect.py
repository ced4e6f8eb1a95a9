"""``python -m smartfed_kernels.static_check`` (``smartfed inspect``) on a subset: compiles for sm_80/sm_90 without a GPU.

Runs the CLI in a subprocess without TRITON_INTERPRET in its environment (it compiles real GPU
code, which Triton's CPU interpreter would replace). Asserts zero spills and tensor-core
instructions (HMMA on sm_80, HGMMA on sm_90) in every fp16/bf16 config of the subset, and the
CLI's exit status and cubin dump.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUBSET = ["--where", "BLOCK_E=32,64", "ROUTER_LINEAR=True", "GATE=0", "DENSE=True",
          "WITH_SECOND=True"]


def run_inspect(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "inspect.json"
    completed = subprocess.run(
        [sys.executable, "-m", "smartfed_kernels.static_check", "--no-progress", "--json", str(report), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    return completed, json.loads(report.read_text())


def test_subset_compiles_without_spills_and_uses_tensor_cores(tmp_path):
    dump = tmp_path / "cubins"
    completed, report = run_inspect(tmp_path, "--arch", "sm_80", "sm_90", "--dtype", "fp16", "bf16",
                                    "--dump", str(dump), *SUBSET)
    assert completed.returncode == 0, completed.stdout[-3000:]
    rows = report["rows"]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"more_forward_kernel", "routing_grad_kernel", "input_grad_kernel",
                       "rows_grad_kernel", "expert_b_grad_kernel"}
    assert {(row["arch"], row["dtype"]) for row in rows} == {
        (arch, dtype) for arch in ("sm_80", "sm_90") for dtype in ("float16", "bfloat16")}
    for row in rows:
        assert "error" not in row, row
        assert row["spill_bytes"] == 0, row
        assert row["tensor_core_ops"] > 0, row
        assert 0 < row["registers"] <= 255, row
        assert (dump / row["cubin"]).stat().st_size > 0
    assert "more_forward_kernel" in completed.stdout


def test_where_filter_rejects_malformed_pairs(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "smartfed_kernels.static_check", "--where", "BLOCK_E"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert "--where: expected KEY=VALUE" in completed.stderr


def test_no_module_shadows_the_standard_library():
    """A module named like a standard one (smartfed_kernels/inspect.py was) shadows it for any
    script run from its folder; none of the packages' modules may take such a name."""
    root = Path(__file__).resolve().parent.parent
    found = [str(path.relative_to(root)) for package in ("smartfed", "smartfed_kernels")
             for path in (root / package).rglob("*.py") if path.stem in sys.stdlib_module_names]
    assert found == []


def test_smartfed_inspect_help_lists_its_options(capsys):
    from smartfed.cli import main

    with pytest.raises(SystemExit) as done:
        main(["inspect", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--arch", "--dtype", "--kernel", "--where", "--json", "--dump", "--no-progress"):
        assert option in help_text
