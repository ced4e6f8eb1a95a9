"""SmartFed: federated fine-tuning by reuse of public LoRA adapters as rank-wise experts."""

from smartfed import eeqa
from smartfed.eeqa import ImportanceTracker, QuotaHistory, allocate_quotas, apply_quotas, uniform_quotas
from smartfed.inject import MoREConfig, describe, inject_more, more_layers
from smartfed.layer import MoRELinear
from smartfed.pool import AdapterError, AdapterInfo, LoRAPool, ModuleExperts
from smartfed.routers import load_router_state_dict, load_routers, router_state_dict, save_routers

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "ImportanceTracker",
    "LoRAPool",
    "ModuleExperts",
    "QuotaHistory",
    "MoREConfig",
    "MoRELinear",
    "allocate_quotas",
    "apply_quotas",
    "describe",
    "eeqa",
    "inject_more",
    "load_router_state_dict",
    "load_routers",
    "more_layers",
    "router_state_dict",
    "save_routers",
    "uniform_quotas",
]
