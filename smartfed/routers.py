"""Router-only state: what clients exchange, and router checkpoints tied to the pool they were trained on.

``router_state_dict`` keys are ``"<model module name>.router_weight"`` / ``".router_bias"``.
A checkpoint folder holds ``routers.safetensors`` (keys by pool module name, so it loads into
the same pool injected under another wrapper prefix) and ``routers.json`` (pool provenance and
fingerprint, the injection config, per-module top_k and router settings, the sha256 of
``routers.safetensors``). ``load_routers`` trusts none of it: see its docstring.
"""

import hashlib
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


def _check_state(targets: Dict[str, torch.Tensor], state, what: str) -> None:
    """Raise unless ``state`` holds exactly the keys of ``targets``, each a tensor of the same shape
    whose values stay finite in the target's dtype."""
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
        # Checked as the copy will store it: an fp32 value beyond the fp16 range becomes inf.
        if not value.is_floating_point() or not torch.isfinite(value.to(target.dtype)).all():
            raise ValueError(f"{what}[{key!r}]: expected finite floating-point values (in {target.dtype}), "
                             f"got {value.dtype} with non-finite or non-float entries")


def _copy_into(targets: Dict[str, torch.Tensor], state) -> None:
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


def load_router_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy router tensors into the model's MoRE layers (strict: keys and shapes must match exactly)."""
    layers = more_layers(model)
    if not layers:
        raise ValueError("model: holds no MoRE layers (call smartfed.inject_more first)")
    targets = _router_tensors(layers)
    _check_state(targets, state, "state")
    _copy_into(targets, state)


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
    data = safetensors.torch.save(tensors, metadata={"pool_fingerprint": pool.fingerprint})
    config = getattr(model, "more_config", None)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "pool_fingerprint": pool.fingerprint,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "pool": pool.provenance(),
        "config": None if config is None else config.to_dict(),
        "layers": {pool_name: {"top_k": layer.top_k, **_layer_settings(layer)} for pool_name, layer in layers.items()},
    }
    (directory / CHECKPOINT_TENSORS).write_bytes(data)
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def _read_checkpoint(directory: Path):
    """(routers.json, tensors, safetensors metadata) of a router folder whose files are readable
    and agree with each other; ValueError naming the file otherwise."""
    meta_path, tensors_path = directory / CHECKPOINT_META, directory / CHECKPOINT_TENSORS
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (expected a folder written by smartfed.save_routers)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{meta_path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{meta_path}: not a smartfed router checkpoint (format {CHECKPOINT_FORMAT!r})")
    version = meta.get("version")
    if version != CHECKPOINT_VERSION or isinstance(version, bool):
        raise ValueError(f"{meta_path}: version: expected {CHECKPOINT_VERSION}, got {version!r}")
    data = tensors_path.read_bytes()
    recorded = meta.get("tensors_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise ValueError(f"{tensors_path}: damaged or replaced: its sha256 is not the tensors_sha256 "
                         f"{str(recorded)[:16]} recorded in {CHECKPOINT_META}")
    try:
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(tensors_path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except safetensors.SafetensorError as error:
        raise ValueError(f"{tensors_path}: corrupt or truncated safetensors file ({error})") from error
    return meta, tensors, metadata


def _check_fingerprints(directory: Path, meta: dict, metadata: dict, pool: LoRAPool) -> None:
    """The pool fingerprint is recorded three times (routers.json's ``pool_fingerprint`` and
    ``pool.fingerprint``, the safetensors metadata); all must agree, and name ``pool``."""
    meta_path, tensors_path = directory / CHECKPOINT_META, directory / CHECKPOINT_TENSORS
    saved = meta.get("pool_fingerprint")
    if not isinstance(saved, str):
        raise ValueError(f"{meta_path}: pool_fingerprint: expected the pool's sha256 string, got {saved!r}")
    provenance = meta.get("pool")
    if not isinstance(provenance, dict) or provenance.get("fingerprint") != saved:
        found = provenance.get("fingerprint") if isinstance(provenance, dict) else provenance
        raise ValueError(f"{meta_path}: pool.fingerprint {str(found)[:16]!r} disagrees with its pool_fingerprint "
                         f"{saved[:16]!r}")
    in_tensors = metadata.get("pool_fingerprint")
    if in_tensors != saved:
        raise ValueError(f"{tensors_path}: metadata pool_fingerprint {str(in_tensors)[:16]!r} disagrees with "
                         f"pool_fingerprint {saved[:16]!r} in {CHECKPOINT_META}: the two files come from different "
                         "saves")
    if saved != pool.fingerprint:
        saved_adapters = [a.get("name") for a in provenance.get("adapters", []) if isinstance(a, dict)]
        raise ValueError(
            f"{meta_path}: checkpoint was made against pool {saved[:16]} "
            f"(adapters {saved_adapters}), not the given pool {pool.fingerprint[:16]} "
            f"(adapters {[a.name for a in pool.adapters]}); its routers index other experts"
        )


def _same_setting(saved, current) -> bool:
    if isinstance(current, bool) or current is None or isinstance(current, str):
        return type(saved) is type(current) and saved == current
    return isinstance(saved, (int, float)) and not isinstance(saved, bool) and saved == current


def projection_digest(layer) -> str:
    """sha256 of a projected router's P as float32 bytes: routers trained against one P mean
    nothing against another, and P is rebuilt from its seed, never sent."""
    return hashlib.sha256(layer.router_projection.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _layer_settings(layer) -> dict:
    """What a module's routers were trained under, as saved in routers.json."""
    settings = {
        "num_experts": layer.num_experts,
        "router": layer.router,
        "gate": layer.gate,
        "gamma": layer.gamma,
        "router_bias": layer.router_bias is not None,
    }
    if layer.router == "projected":
        settings.update(router_dim=layer.router_dim, projection_seed=layer.projection_seed,
                        projection_sha256=projection_digest(layer))
    return settings


def _check_layer(meta_path: Path, pool_name: str, saved, layer) -> None:
    """The settings saved for one module must be the model's layer's: the routers were trained
    under them, so loading them under others would silently compute something else."""
    if not isinstance(saved, dict):
        raise ValueError(f"{meta_path}: layers[{pool_name!r}]: expected an object, got {type(saved).__name__}")
    for name, value in _layer_settings(layer).items():
        if name not in saved:
            raise ValueError(f"{meta_path}: module {pool_name!r}: {name} is missing (the model's layer has "
                             f"{name}={value!r})")
        if not _same_setting(saved[name], value):
            hint = " (gamma None means k)" if name == "gamma" else ""
            raise ValueError(f"{meta_path}: module {pool_name!r} was saved with {name}={saved[name]!r} but the "
                             f"model's layer has {name}={value!r}{hint}")
    top_k = saved.get("top_k")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= layer.num_experts:
        raise ValueError(f"{meta_path}: module {pool_name!r}: top_k {top_k!r} is not an int in "
                         f"1..{layer.num_experts}")


def load_routers(model: nn.Module, directory, pool: LoRAPool) -> None:
    """Load routers saved by :func:`save_routers` (and their per-module top_k) into ``model``.

    Everything is checked before any tensor changes: the files (format, version, the tensors'
    sha256, a readable safetensors file), the pool fingerprint in routers.json and in the
    safetensors metadata (equal to each other and to ``pool``'s), a model injected with ``pool``
    with the same modules, each module's router form, gate, gamma, expert count, router bias and
    top_k (and for a projected router m, the seed and the sha256 of P), and every tensor's name,
    shape and finite floating-point values. A mismatch raises an
    error naming the file and the field, and leaves the model as it was.
    """
    directory = Path(directory)
    meta, tensors, metadata = _read_checkpoint(directory)
    _check_fingerprints(directory, meta, metadata, pool)
    meta_path = directory / CHECKPOINT_META
    layers = _layers_by_pool_name(model, pool)
    saved_layers = meta.get("layers")
    if not isinstance(saved_layers, dict):
        raise ValueError(f"{meta_path}: layers: expected an object of modules, got {type(saved_layers).__name__}")
    if set(saved_layers) != set(layers):
        raise KeyError(f"{meta_path}: checkpoint modules {sorted(saved_layers)[:6]} differ "
                       f"from the model's MoRE modules {sorted(layers)[:6]}")
    for pool_name, layer in layers.items():
        _check_layer(meta_path, pool_name, saved_layers[pool_name], layer)
    targets = _router_tensors(layers)
    _check_state(targets, tensors, str(directory / CHECKPOINT_TENSORS))
    _copy_into(targets, tensors)
    for pool_name, layer in layers.items():
        layer.top_k = saved_layers[pool_name]["top_k"]
