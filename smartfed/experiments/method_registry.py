"""The federated methods by name: SmartFed and the baselines, built from a run config and
handed to the engine (which never picks a method itself). The registry holds exactly the names
of smartfed.config's ``METHODS`` (a test keeps them equal) and refuses any other name."""

from smartfed.baselines.adapter_mixture import AdapterMixtureMethod
from smartfed.baselines.fedit import FedITMethod
from smartfed.baselines.ffa_lora import FFALoRAMethod
from smartfed.baselines.linear_merge import LinearMergeMethod
from smartfed.config import ConfigError
from smartfed.config.validation import unknown_key_message
from smartfed.federated.methods import FederatedMethod, SmartFedMethod

METHOD_CLASSES = {
    cls.name: cls
    for cls in (SmartFedMethod, FedITMethod, FFALoRAMethod, AdapterMixtureMethod, LinearMergeMethod)
}


def method_class(name) -> type:
    """The FederatedMethod class registered as ``name``; a ConfigError (with a did-you-mean) for
    any other name."""
    if name not in METHOD_CLASSES:
        message = unknown_key_message(name, sorted(METHOD_CLASSES)).replace("unknown key", f"unknown method {name!r}")
        raise ConfigError(message, key="method")
    return METHOD_CLASSES[name]


def build_method(config) -> FederatedMethod:
    return method_class(config.method)(config)
