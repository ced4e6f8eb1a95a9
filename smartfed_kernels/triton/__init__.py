"""Fused Triton MoRE kernels (forward and backward) behind ``more_linear_checked``.

Importing this package imports triton: an ImportError here means "Triton backend unavailable".
"""

import triton  # noqa: F401  (the availability probe of smartfed_kernels.dispatch)

from smartfed_kernels.triton.autograd import more_linear_checked

__all__ = ["more_linear_checked"]
