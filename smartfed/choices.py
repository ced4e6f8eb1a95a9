"""The module layer's option names, torch-free: configuration checks them without importing torch.

The code that acts on each name keys its implementations by it and refuses any other.
"""

from smartfed_kernels.options import ROUTERS

ROUTER_INITS = ("zeros", "normal", "affinity")
# The op's router forms, and "projected": z = U (P x) + br with P [m, d_in] fixed (seeded random
# signs, never trained or sent) and U [N, m] the trained router. The layer hands the op the linear
# router U P, so every backend runs it unchanged and autograd carries dWr to dU = dWr P^T; what
# changes is what clients train and exchange: N*m numbers instead of N*d_in.
LAYER_ROUTERS = (*ROUTERS, "projected")
ESTIMATORS = ("cosine", "magnitude", "gradient")
