"""`smartfed bench --gpu-check`: the compiled Triton kernels on a CUDA GPU, in one command.

1. tests/test_triton_cuda.py (bf16, fp16 and fp32 against the reference, CUDA graph capture) runs
   in a pytest process of its own, without TRITON_INTERPRET: a process that has loaded Triton
   interpreted cannot run the compiled kernels.
2. The usual `smartfed bench` check and timings on this device's shapes follow, in this process.
3. Both go into one record, ``gpu_check-<device>-<UTC time>.{json,md,png}`` (where ``--output``
   says, by default a folder of that name under ``bench-results/``).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_TESTS = Path("tests") / "test_triton_cuda.py"
OUTPUT_TAIL_CHARS = 4000


def unusable_reason(torch) -> str:
    """Why this process cannot run the GPU check, or "" when it can."""
    if not torch.cuda.is_available():
        return "--gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "--gpu-check times the compiled kernels: unset TRITON_INTERPRET"
    return ""


def run_cuda_tests() -> dict:
    """Outcome of tests/test_triton_cuda.py in a child pytest: command, exit code, summary line,
    seconds and the tail of its output."""
    command = [sys.executable, "-m", "pytest", str(CUDA_TESTS), "-q", "-p", "no:cacheprovider"]
    shown = " ".join(["python", *command[1:]])
    if not (ROOT / CUDA_TESTS).is_file():
        return {"command": shown, "returncode": None, "seconds": 0.0, "output_tail": "",
                "summary": f"{CUDA_TESTS} not found under {ROOT}: run from a source checkout"}
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    output = completed.stdout + completed.stderr
    lines = output.strip().splitlines()
    return {"command": shown, "returncode": completed.returncode, "summary": lines[-1] if lines else "",
            "seconds": round(time.perf_counter() - started, 1), "output_tail": output[-OUTPUT_TAIL_CHARS:]}
