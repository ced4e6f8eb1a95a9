"""The names a run config may choose from. The run-level ones are named here and nowhere else;
the kernel and layer ones come from where the code that acts on them lives (torch-free)."""

from smartfed.choices import ESTIMATORS, LAYER_ROUTERS, ROUTER_INITS
from smartfed_kernels.options import BACKENDS, GATES

# The registry smartfed.experiments.method_registry builds each of these by name (a test holds
# the two to the same names).
METHODS = ("smartfed", "fedit", "ffa_lora", "adapter_mixture", "linear_merge")
WIRE_DTYPES = ("fp32", "bf16")
PARTITIONS = ("dirichlet", "iid")
FAULT_KINDS = ("raise", "nan", "shape", "timeout", "hang", "poison", "malformed")
AGGREGATORS = ("fedavg", "trimmed_mean", "median", "krum", "multi_krum")
NORM_BOUND_MODES = ("clip", "reject", "none")
EXAMPLE_COUNTS = ("partition", "claimed")
IMPORTANCE_AGGREGATIONS = ("median", "trimmed_mean", "mean")

SYNTHETIC_TASK = "synthetic"

__all__ = [
    "AGGREGATORS", "BACKENDS", "ESTIMATORS", "EXAMPLE_COUNTS", "FAULT_KINDS", "GATES", "IMPORTANCE_AGGREGATIONS",
    "LAYER_ROUTERS", "METHODS", "NORM_BOUND_MODES", "PARTITIONS", "ROUTER_INITS", "SYNTHETIC_TASK", "WIRE_DTYPES",
]
