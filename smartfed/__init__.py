"""SmartFed: federated fine-tuning by reuse of public LoRA adapters as rank-wise experts."""



def __getattr__(name):
    # The public names load on first use: `smartfed --help` (smartfed.cli, inside this package)
    # must not pay for importing torch.
    if name not in __all__:
        raise AttributeError(f"module 'smartfed' has no attribute {name!r}")
    from smartfed.eeqa import ImportanceTracker, allocate_quotas, apply_quotas, uniform_quotas
    from smartfed.inject import MoREConfig, describe, inject_more, more_layers
    from smartfed.layer import MoRELinear
    from smartfed.pool import AdapterError, AdapterInfo, LoRAPool, ModuleExperts
    from smartfed.routers import load_router_state_dict, load_routers, router_state_dict, save_routers

    # Importing a submodule binds it in this namespace (``eeqa``); the names are bound here.
    globals().update({key: value for key, value in locals().items() if key in __all__})
    return globals()[name]


__all__ = [
    "AdapterError",
    "AdapterInfo",
    "ImportanceTracker",
    "LoRAPool",
    "ModuleExperts",
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
