"""The MoRE op layer: reference, fast PyTorch path and Triton kernels behind one entry point."""

from smartfed_kernels.dispatch import BACKENDS, resolve_backend
from smartfed_kernels.ops import more_linear

__all__ = ["BACKENDS", "more_linear", "resolve_backend"]
