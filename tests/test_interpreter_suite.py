"""The tests marked ``interpreter`` (Triton's CPU interpreter), run in a pytest process of their own.

Triton makes its kernels compiled or interpreted as they are defined, once per process, from
TRITON_INTERPRET. This process keeps compiled Triton so that tests/test_triton_cuda.py runs on a
CUDA machine; the child process gets TRITON_INTERPRET=1 and runs only the interpreter tests
(tests/conftest.py splits the two sets), so that ``python -m pytest tests`` still runs them all.
"""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# The interpreter tests take under a minute on 2 CPU cores; this bounds a hang, not a slow machine.
TIMEOUT_S = 900
OUTPUT_TAIL_CHARS = 8000


def test_interpreter_tests_pass_in_their_own_process():
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "interpreter", "-q", "-p", "no:cacheprovider", str(TESTS)],
        cwd=TESTS.parent, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )
    exit_code, output = completed.returncode, (completed.stdout + completed.stderr)[-OUTPUT_TAIL_CHARS:]
    assert exit_code == 0, f"TRITON_INTERPRET=1 python -m pytest -m interpreter tests exited {exit_code}:\n{output}"
