"""MoRE CPU kernels in C: top-k selection, gates and the sparse expand fused per token, built at
first use (:mod:`smartfed_kernels.cpu.build`) and called through ctypes
(:mod:`smartfed_kernels.cpu.kernels`) by the fast PyTorch path's inference forward."""

import contextlib

from smartfed_kernels.cpu import build, kernels


def status() -> str:
    """One line: whether the kernels are in use here, and where the library is or why not."""
    library = build.load_library()
    if library is None:
        return f"not built ({build.unavailable_reason()}): PyTorch ops only"
    threads = "OpenMP" if kernels.openmp() else "single-threaded"
    return f"built ({library._name}, {threads})" if kernels.enabled() else "built, disabled in this context"


@contextlib.contextmanager
def disabled():
    """Within this block the CPU paths run on PyTorch ops alone (for comparisons and tests)."""
    previous = kernels.set_enabled(False)
    try:
        yield
    finally:
        kernels.set_enabled(previous)
