"""``python -m smartfed_kernels.cpu``: build the MoRE CPU kernels if needed, print their status,
exit 1 when they are not in use (CI runs it before the tests)."""

import sys

from smartfed_kernels.cpu import build, status

print(f"MoRE CPU kernels: {status()}")
sys.exit(0 if build.load_library() is not None else 1)
