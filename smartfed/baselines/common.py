"""Pieces the baselines share: seeded initialisation, tensor copying, per-adapter factors of a
pool, and swapping a model's Linears for wrapper layers."""

from contextlib import contextmanager

import torch
from torch import nn

from smartfed.federated.methods import FederatedMethod
from smartfed.federated.seeding import STREAM_ROUTER_INIT, derived_seed


@contextmanager
def seeded_init(seed):
    """Parameter initialisation that depends on the run's seed only, never on the global RNG's
    position, and leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, STREAM_ROUTER_INIT))
        yield


def trainable_tensors(model):
    """name -> detached clone of every parameter that requires grad."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class TrainableParametersMethod(FederatedMethod):
    """A method whose travelling tensors are exactly its trainable parameters, by name:
    ``build`` records them in ``self._names``."""

    _names = ()

    def trainable_state(self, model):
        return trainable_tensors(model)

    def load_trainable_state(self, model, state):
        load_named_parameters(model, state, self._names)


def load_named_parameters(model, state, names):
    """Strict copy of ``state`` into the parameters ``names`` of ``model``."""
    parameters = dict(model.named_parameters())
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise KeyError(f"state: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    for name in names:
        if tuple(state[name].shape) != tuple(parameters[name].shape):
            raise ValueError(
                f"state[{name!r}]: expected shape {tuple(parameters[name].shape)}, got {tuple(state[name].shape)}"
            )
    with torch.no_grad():
        for name in names:
            parameters[name].copy_(state[name])


def adapter_factors(experts):
    """The pool's experts of one module regrouped per adapter: list of (adapter name,
    A_e [r_e, d_in], B_e [d_out, r_e]) with the adapter's scale already folded into B_e."""
    groups = {}
    for column, (adapter_name, _) in enumerate(experts.origins):
        groups.setdefault(adapter_name, []).append(column)
    return [
        (name, experts.expert_a[columns], experts.expert_b[:, columns]) for name, columns in groups.items()
    ]


def replace_pool_linears(model, pool, make_layer):
    """Replace each Linear the pool adapts by ``make_layer(base_linear, module_experts)``, in
    place, after freezing the whole model. Returns {model module name: new layer}."""
    from smartfed.inject import resolve_module_names

    model.requires_grad_(False)
    targets = resolve_module_names(model, list(pool.modules))
    replaced = {}
    for pool_name, model_name in targets.items():
        base = model.get_submodule(model_name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"model module {model_name!r}: expected an nn.Linear, got {type(base).__name__}")
        layer = make_layer(base, pool.modules[pool_name])
        parent_name, _, child_name = model_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
        replaced[model_name] = layer
    return replaced
