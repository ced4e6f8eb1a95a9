"""Put MoRE layers into any PyTorch / transformers model in place of the Linears a LoRA pool adapts.

Pool module names (peft's, e.g. ``model.layers.0.self_attn.q_proj``) are matched to
``model.named_modules()`` exactly, or by dotted suffix when the model wraps them under an extra
prefix (``backbone.model.layers.0...``); a name matching several modules or none is an error.
The replaced module is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 family, whose peft
adapters are saved with ``fan_in_fan_out=True`` but with lora_A/lora_B in the Linear orientation).

A model holding peft adapter layers (a ``PeftModel``, or one given to ``inject_adapter_in_model``) is
refused rather than unwrapped: its own adapters would run beside the experts, or be dropped
silently if merged into the base weights; ``peft_model.unload()`` gives the plain base model.
"""

import fnmatch
import sys
import zlib
from typing import Dict, Mapping, Optional, Sequence

from torch import nn

from smartfed.choices import MoREConfig, TopK
from smartfed.layer import MoRELinear, is_conv1d, type_name, weight_out_in
from smartfed.pool import LoRAPool

__all__ = ["MoREConfig", "TopK", "describe", "inject_more", "more_layers", "resolve_module_names", "resolve_top_k"]


def more_layers(model: nn.Module) -> Dict[str, MoRELinear]:
    """Every MoRE layer of ``model`` by its qualified name in ``model.named_modules()``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoRELinear)}


def resolve_module_names(model: nn.Module, pool_names: Sequence[str]) -> Dict[str, str]:
    """pool module name -> model module name (exact, else unique dotted-suffix match)."""
    model_names = [name for name, _ in model.named_modules()]
    present = set(model_names)
    resolved = {}
    for pool_name in pool_names:
        if pool_name in present:
            resolved[pool_name] = pool_name
            continue
        candidates = [name for name in model_names if name.endswith("." + pool_name)]
        if not candidates:
            raise ValueError(f"pool module {pool_name!r}: no module of the model has this name or ends with it")
        if len(candidates) > 1:
            raise ValueError(f"pool module {pool_name!r}: ambiguous, it matches {len(candidates)} modules "
                             f"of the model: {candidates}")
        resolved[pool_name] = candidates[0]
    return resolved


def resolve_top_k(top_k: TopK, targets: Dict[str, str], num_experts: Dict[str, int]) -> Dict[str, int]:
    """Per pool module k from an int or a mapping of names/suffixes/globs (keys: pool or model names)."""
    if not isinstance(top_k, Mapping):
        chosen = {pool_name: top_k for pool_name in targets}
        source = {pool_name: "top_k" for pool_name in targets}
    else:
        chosen, source, used = {}, {}, set()
        for pool_name, model_name in targets.items():
            names = (pool_name, model_name)
            exact = [key for key in top_k if key in names]
            suffix = [key for key in top_k if any(n.endswith("." + key) for n in names)]
            matches = exact or suffix or [key for key in top_k if any(fnmatch.fnmatchcase(n, key) for n in names)]
            if not matches:
                raise ValueError(f"top_k: no key matches module {pool_name!r} "
                                 f"(keys: {list(top_k)}; add a '*' entry for a default)")
            used.add(matches[0])
            chosen[pool_name] = top_k[matches[0]]
            source[pool_name] = f"top_k[{matches[0]!r}]"
        unused = [key for key in top_k if key not in used]
        if unused:
            raise ValueError(f"top_k: keys {unused} match no targeted module (or are shadowed by earlier keys)")
    for pool_name, k in chosen.items():
        if k > num_experts[pool_name]:
            raise ValueError(f"{source[pool_name]}: k={k} exceeds the N={num_experts[pool_name]} experts "
                             f"of module {pool_name!r}")
    return chosen


def _target_pool_modules(pool: LoRAPool, target_modules) -> list:
    if target_modules is None:
        return list(pool.modules)
    selected = pool.select(target_modules)
    shown = f"(pool modules: {list(pool.modules)[:6]}...)"
    if isinstance(target_modules, str):
        if not selected:
            raise ValueError(f"target_modules: the regex {target_modules!r} matches no whole module name of the "
                             f"pool (a string must match the whole name, as in peft; for name suffixes pass a "
                             f"list) {shown}")
        return selected
    unmatched = [entry for entry in target_modules if not pool.select([entry])]
    if unmatched:
        raise ValueError(f"target_modules: {unmatched} match no module of the pool (expected each entry to be a "
                         f"whole module name, a dotted suffix of one, or a glob) {shown}")
    return selected


def _refuse_peft_layers(model: nn.Module) -> None:
    """Raise if ``model`` is a peft model or holds peft tuner layers (see the module docstring)."""
    peft_model = getattr(sys.modules.get("peft.peft_model"), "PeftModel", None)
    tuner_layer = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    if peft_model is not None and isinstance(model, peft_model):
        found = "is a peft PeftModel"
    else:
        wrapped = [] if tuner_layer is None else [
            (name, module) for name, module in model.named_modules() if isinstance(module, tuner_layer)]
        if not wrapped:
            return
        found = f"holds peft adapter layers ({wrapped[0][0]!r}: {type_name(wrapped[0][1])})"
    raise TypeError(
        f"model: {found}; expected the plain base model (MoRE replaces its Linears, and peft's own adapters "
        "would run beside the experts): pass peft_model.unload() (after unmerge_adapter() if merged), or the "
        "model before get_peft_model"
    )


def _module_seed(seed: int, pool_name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(pool_name.encode("utf-8"))) % (2**63)


def inject_more(model: nn.Module, pool: LoRAPool, config: Optional[MoREConfig] = None) -> nn.Module:
    """Replace the pool's target Linears (or Conv1Ds) of ``model`` by :class:`MoRELinear`, in place.

    Every parameter is frozen except the routers (and the experts if ``config.train_experts``).
    Checks everything before changing the model. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(pool, LoRAPool):
        raise TypeError(f"pool: expected a smartfed.LoRAPool, got {type(pool).__name__}")
    config = MoREConfig() if config is None else config
    if not isinstance(config, MoREConfig):
        raise TypeError(f"config: expected a smartfed.MoREConfig, got {type(config).__name__}")
    if more_layers(model):
        raise ValueError("model: already holds MoRE layers; inject_more into a fresh model")
    _refuse_peft_layers(model)

    pool_names = _target_pool_modules(pool, config.target_modules)
    targets = resolve_module_names(model, pool_names)
    modules = dict(model.named_modules())
    for pool_name, model_name in targets.items():
        module, experts = modules[model_name], pool.modules[pool_name]
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            raise TypeError(f"model module {model_name!r}: expected an nn.Linear or a transformers Conv1D to "
                            f"replace, got {type_name(module)}")
        d_out, d_in = weight_out_in(module).shape
        if (d_out, d_in) != (experts.d_out, experts.d_in):
            raise ValueError(
                f"model module {model_name!r}: Linear weight is [{d_out}, {d_in}] "
                f"but the pool's experts for {pool_name!r} need [{experts.d_out}, {experts.d_in}] "
                "(was the pool made for another base model?)"
            )
    top_k = resolve_top_k(config.top_k, targets, {name: pool.modules[name].num_experts for name in targets})

    model.requires_grad_(False)
    for pool_name, model_name in targets.items():
        experts = pool.modules[pool_name]
        layer = MoRELinear(
            modules[model_name], experts.expert_a, experts.expert_b, top_k[pool_name],
            router=config.router, gate=config.gate, gamma=config.gamma, router_init=config.router_init,
            router_bias=config.router_bias, train_experts=config.train_experts, backend=config.backend,
            origins=experts.origins, seed=_module_seed(config.seed, pool_name), router_dim=config.router_dim,
            projection_seed=config.projection_seed,
        )
        layer.pool_module_name = pool_name
        layer.pool_fingerprint = pool.fingerprint
        parent_name, _, child_name = model_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, layer)
    model.more_config = config
    return model


def describe(model: nn.Module) -> str:
    """One line per MoRE layer and the model's trainable parameter count."""
    layers = more_layers(model)
    lines = [f"{len(layers)} MoRE layers"]
    for name, layer in layers.items():
        gamma = "k" if layer.gamma is None else f"{layer.gamma:g}"
        lines.append(
            f"  {name}: [{layer.out_features} x {layer.in_features}] N={layer.num_experts} k={layer.top_k} "
            f"router={layer.router}{f' m={layer.router_dim}' if layer.router == 'projected' else ''} "
            f"gate={layer.gate} gamma={gamma} router parameters={layer.num_router_parameters()}"
        )
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = 100.0 * trainable / total if total else 0.0
    lines.append(f"trainable parameters: {trainable} of {total} ({share:.4f}%)")
    return "\n".join(lines)
