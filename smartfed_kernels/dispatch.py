"""Backend choice for :func:`smartfed_kernels.more_linear`.

"auto" takes Triton for CUDA tensors when Triton kernels are importable, else the fast PyTorch
path; "triton" on CPU needs ``TRITON_INTERPRET=1`` (Triton's numpy interpreter); "reference"
runs the plain definition. Every backend exposes ``more_linear_checked(x, weight, bias,
router_weight, router_bias, expert_a, expert_b, spec, return_routing)`` on validated inputs.
"""

import os

import torch

from smartfed_kernels import reference, torch_ops
from smartfed_kernels.options import BACKENDS


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton_backend():
    # A plain import statement (not importlib) so that torch.compile(fullgraph=True) traces it.
    import smartfed_kernels.triton as triton_backend

    return triton_backend


def triton_available() -> bool:
    try:
        _import_triton_backend()
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Name of the backend that will run a call with input ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not x.is_cuda and not triton_interpreting():
            raise RuntimeError(
                "backend='triton': x is on the CPU; Triton kernels run on CUDA tensors, or on CPU "
                "only under Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
        if not triton_available():
            raise RuntimeError("backend='triton': the Triton kernels could not be imported "
                               "(is the triton package installed?)")
    return backend


def backend_module(name: str):
    """The module implementing ``more_linear_checked`` for a resolved backend name."""
    if name == "triton":
        return _import_triton_backend()
    return torch_ops if name == "torch" else reference
