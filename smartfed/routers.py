"""Router-only state: what clients exchange, and router checkpoints tied to the pool they were trained on.

``router_state_dict`` keys are ``"<model module name>.router_weight"`` / ``".router_bias"``.
A checkpoint folder holds ``routers.safetensors`` (keys by pool module name, so it loads into
the same pool injected under another wrapper prefix) and ``routers.json`` (pool provenance and
fingerprint, the injection config, per-module top_k and router settings).
"""

import json
from pathlib import Path
from typing import Dict

import safetensors.torch
import torch
from torch import nn

from smartfed.inject import more_layers
from smartfed.pool import LoRAPool

ROUTER_TENSORS = ("router_weight", "router_bias")
CHECKPOINT_TENSORS = "routers.safetensors"
CHECKPOINT_META = "routers.json"
CHECKPOINT_FORMAT = "smartfed-routers"
CHECKPOINT_VERSION = 1


def _router_tensors(layers) -> Dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        for tensor_name in ROUTER_TENSORS:
            tensor = getattr(layer, tensor_name)
            if tensor is not None:
                state[f"{name}.{tensor_name}"] = tensor
    return state


def router_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached clones of every MoRE router tensor, keyed ``<module name>.router_weight|router_bias``."""
    layers = more_layers(model)
    if not layers:
        raise ValueError("model: holds no MoRE layers (call smartfed.inject_more first)")
    return {key: tensor.detach().clone() for key, tensor in _router_tensors(layers).items()}


def _load_into(targets: Dict[str, torch.Tensor], state, what: str) -> None:
    """Strict copy of ``state`` into ``targets``; checks every key and shape before copying any."""
    if not isinstance(state, dict):
        raise TypeError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise KeyError(f"{what}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for key, target in targets.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}[{key!r}]: expected a tensor, got {type(value).__name__}")
        if value.shape != target.shape:
            raise ValueError(f"{what}[{key!r}]: expected shape {tuple(target.shape)}, got {tuple(value.shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"{what}[{key!r}]: expected finite floating-point values")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


def load_router_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy router tensors into the model's MoRE layers (strict: keys and shapes must match exactly)."""
    layers = more_layers(model)
    if not layers:
        raise ValueError("model: holds no MoRE layers (call smartfed.inject_more first)")
    _load_into(_router_tensors(layers), state, "state")


def _layers_by_pool_name(model: nn.Module, pool: LoRAPool) -> Dict[str, nn.Module]:
    layers = more_layers(model)
    if not layers:
        raise ValueError("model: holds no MoRE layers (call smartfed.inject_more first)")
    by_pool_name = {}
    for name, layer in layers.items():
        if layer.pool_fingerprint != pool.fingerprint:
            raise ValueError(
                f"model layer {name!r}: built from pool {str(layer.pool_fingerprint)[:16]}, not from the "
                f"given pool {pool.fingerprint[:16]} (inject_more the model with this pool)"
            )
        by_pool_name[layer.pool_module_name] = layer
    return by_pool_name


def save_routers(model: nn.Module, directory, pool: LoRAPool) -> Path:
    """Write the routers of a MoRE model injected with ``pool`` to ``directory``; returns the folder."""
    layers = _layers_by_pool_name(model, pool)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in _router_tensors(layers).items()}
    safetensors.torch.save_file(tensors, directory / CHECKPOINT_TENSORS,
                                metadata={"pool_fingerprint": pool.fingerprint})
    config = getattr(model, "more_config", None)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "pool_fingerprint": pool.fingerprint,
        "pool": pool.provenance(),
        "config": None if config is None else config.to_dict(),
        "layers": {
            pool_name: {
                "top_k": layer.top_k,
                "num_experts": layer.num_experts,
                "router": layer.router,
                "gate": layer.gate,
                "gamma": layer.gamma,
                "router_bias": layer.router_bias is not None,
            }
            for pool_name, layer in layers.items()
        },
    }
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def _read_checkpoint(directory: Path):
    meta_path, tensors_path = directory / CHECKPOINT_META, directory / CHECKPOINT_TENSORS
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (expected a folder written by smartfed.save_routers)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{meta_path}: not a smartfed router checkpoint (format {CHECKPOINT_FORMAT!r})")
    try:
        tensors = safetensors.torch.load_file(tensors_path)
    except safetensors.SafetensorError as error:
        raise ValueError(f"{tensors_path}: corrupt or truncated safetensors file ({error})") from error
    return meta, tensors


def load_routers(model: nn.Module, directory, pool: LoRAPool) -> None:
    """Load routers saved by :func:`save_routers` (and their per-module top_k) into ``model``.

    Refuses a checkpoint made against another pool, a model not injected with ``pool``, and any
    mismatch of modules, router form or shapes; nothing is changed unless everything matches.
    """
    directory = Path(directory)
    meta, tensors = _read_checkpoint(directory)
    saved_fingerprint = meta.get("pool_fingerprint")
    if saved_fingerprint != pool.fingerprint:
        saved_adapters = [a.get("name") for a in (meta.get("pool") or {}).get("adapters", [])]
        raise ValueError(
            f"{directory / CHECKPOINT_META}: checkpoint was made against pool {str(saved_fingerprint)[:16]} "
            f"(adapters {saved_adapters}), not the given pool {pool.fingerprint[:16]} "
            f"(adapters {[a.name for a in pool.adapters]}); its routers index other experts"
        )
    layers = _layers_by_pool_name(model, pool)
    saved_layers = meta.get("layers") or {}
    if set(saved_layers) != set(layers):
        raise KeyError(f"{directory / CHECKPOINT_META}: checkpoint modules {sorted(saved_layers)[:6]} differ "
                       f"from the model's MoRE modules {sorted(layers)[:6]}")
    for pool_name, layer in layers.items():
        saved = saved_layers[pool_name]
        if saved.get("router") != layer.router:
            raise ValueError(f"{directory / CHECKPOINT_META}: module {pool_name!r} was saved with "
                             f"router={saved.get('router')!r} but the model's layer has router={layer.router!r}")
        top_k = saved.get("top_k")
        if not isinstance(top_k, int) or not 1 <= top_k <= layer.num_experts:
            raise ValueError(f"{directory / CHECKPOINT_META}: module {pool_name!r}: top_k {top_k!r} is not in "
                             f"1..{layer.num_experts}")
    _load_into(_router_tensors(layers), tensors, str(directory / CHECKPOINT_TENSORS))
    for pool_name, layer in layers.items():
        layer.top_k = saved_layers[pool_name]["top_k"]
