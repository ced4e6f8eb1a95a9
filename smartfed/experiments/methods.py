"""The federated methods by name: SmartFed and the baselines, built from a run config and
handed to the engine (which never picks a method itself)."""

from smartfed.baselines.adapter_mixture import AdapterMixtureMethod
from smartfed.baselines.fedit import FedITMethod
from smartfed.baselines.ffa_lora import FFALoRAMethod
from smartfed.baselines.linear_merge import LinearMergeMethod
from smartfed.federated.methods import FederatedMethod, SmartFedMethod

METHOD_CLASSES = {
    cls.name: cls
    for cls in (SmartFedMethod, FedITMethod, FFALoRAMethod, AdapterMixtureMethod, LinearMergeMethod)
}


def build_method(config) -> FederatedMethod:
    if config.method not in METHOD_CLASSES:
        raise ValueError(f"method must be one of {sorted(METHOD_CLASSES)}, got {config.method!r}")
    return METHOD_CLASSES[config.method](config)
