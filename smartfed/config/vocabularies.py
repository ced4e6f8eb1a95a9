"""The names a run config may choose from. The run-level ones are named here and nowhere else;
the kernel and layer ones come from where the code that acts on them lives (torch-free)."""

from smartfed.choices import ESTIMATORS, LAYER_ROUTERS, ROUTER_INITS
from smartfed_kernels.options import BACKENDS, GATES

# The registry smartfed.experiments.method_registry builds each of these by name (a test holds
# the two to the same names).
METHODS = ("smartfed", "fedit", "ffa_lora", "adapter_mixture", "linear_merge")
WIRE_DTYPES = ("fp32", "bf16")
# "natural": one client per distinct value of task.data.partition_column (file tasks only).
PARTITIONS = ("dirichlet", "iid", "natural")
FAULT_KINDS = ("raise", "nan", "shape", "timeout", "hang", "poison", "malformed")
# The Byzantine attacks of smartfed.federated.attacks (a test holds the two to the same names),
# written "<name>:<param>" as fault kinds: True, the parameter is required; False, optional; None,
# the attack takes none.
ATTACK_PARAMS = {"sign_flip": True, "inner_product": True, "free_ride": None, "collude": False}
AGGREGATORS = ("fedavg", "trimmed_mean", "median", "krum", "multi_krum", "filtered_mean", "filtered_mean_root")
NORM_BOUND_MODES = ("clip", "reject", "none")
EXAMPLE_COUNTS = ("partition", "claimed")
IMPORTANCE_AGGREGATIONS = ("median", "trimmed_mean", "mean")

SYNTHETIC_TASK = "synthetic"

__all__ = [
    "AGGREGATORS", "ATTACK_PARAMS", "BACKENDS", "ESTIMATORS", "EXAMPLE_COUNTS", "FAULT_KINDS", "GATES",
    "IMPORTANCE_AGGREGATIONS", "LAYER_ROUTERS", "METHODS", "NORM_BOUND_MODES", "PARTITIONS", "ROUTER_INITS",
    "SYNTHETIC_TASK", "WIRE_DTYPES",
]
