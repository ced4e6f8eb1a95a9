"""LoRA pool: load peft LoRA adapter folders, validate them, split them into rank-wise experts.

For a module targeted by adapters e = 1..E (each ``A_e [r_e, d_in]``, ``B_e [d_out, r_e]``, scale
``s_e = alpha_e / r_e``, or ``alpha_e / sqrt(r_e)`` with rslora) the pool stacks

    A = [A_1; ...; A_E]              [N, d_in],  N = sum r_e
    B = [s_1 B_1 | ... | s_E B_E]    [d_out, N]  (scale folded in once, here)

and remembers each expert's origin (adapter name, rank index). Only adapters whose weights hold
a module contribute experts to it. Tensors are kept in float32 whatever the file's dtype.

The adapter's ``adapter_config.json`` is checked first (smartfed.adapter_config): LoRA variants
whose forward is not rank-wise are refused by name, every field peft accepts is type- and
range-checked, and each module's scale must be finite and bounded.
GPT-2's Conv1D adapters (``fan_in_fan_out=True``) store lora_A/lora_B as for a Linear and need
nothing special here.
"""

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import safetensors.torch
import torch
from safetensors import SafetensorError

from smartfed.adapter_config import (  # noqa: F401 (the names pool users import from here)
    BASE_MODIFYING_INITS, CONFIG_FILE, NEUTRAL_CONFIG_FIELDS, REFUSED_CONFIG_FIELDS, AdapterError, adapter_scale,
    pattern_value, read_adapter_config,
)
from smartfed.choices import check_target_modules

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
# Tensors that training-time variants save beside lora_A/lora_B; their inference forward is plain
# LoRA (VeLoRA compresses only the backward, MonteCLoRA samples lora_A noise only in training mode).
AUXILIARY_TENSORS = {
    "velora_config": ".lora_velora_embed",
    "monteclora_config": ".lora_monteclora_sampler.",
}
# Tensor names that mark a LoRA variant whose update is not x -> B A x on a Linear.
FOREIGN_LORA_MARKERS = {
    "lora_embedding_A": "an embedding LoRA (lora_embedding_A/B); only LoRA on Linear layers splits into experts",
    "lora_embedding_B": "an embedding LoRA (lora_embedding_A/B); only LoRA on Linear layers splits into experts",
    "lora_magnitude_vector": "a DoRA adapter (lora_magnitude_vector); DoRA's magnitude rescaling is not rank-wise",
}


@dataclass(frozen=True)
class AdapterInfo:
    """Provenance of one adapter of the pool."""

    name: str
    path: str
    sha256: str
    base_model: Optional[str]
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: Union[List[str], str, None]
    rank_pattern: Dict[str, int]
    alpha_pattern: Dict[str, float]
    module_ranks: Dict[str, int]
    module_scales: Dict[str, float]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "base_model": self.base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "module_ranks": dict(self.module_ranks),
            "module_scales": dict(self.module_scales),
        }


@dataclass
class ModuleExperts:
    """The rank-wise experts of one adapted module: ``expert_a [N, d_in]``, ``expert_b [d_out, N]``."""

    name: str
    expert_a: torch.Tensor
    expert_b: torch.Tensor
    origins: List[Tuple[str, int]] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.expert_a.shape[0]

    @property
    def d_in(self) -> int:
        return self.expert_a.shape[1]

    @property
    def d_out(self) -> int:
        return self.expert_b.shape[0]

    def sources(self) -> List[Tuple[str, int]]:
        """(adapter name, number of experts it gives) in stacking order."""
        counts: Dict[str, int] = {}
        for adapter_name, _ in self.origins:
            counts[adapter_name] = counts.get(adapter_name, 0) + 1
        return list(counts.items())


def _natural_key(name: str):
    """Sort key that orders layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_weights(folder: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        other = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {other}; re-save with safe_serialization=True)" if other else ""
        raise AdapterError(f"{weights_path}: missing {WEIGHTS_FILE}{hint}")
    data = weights_path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as error:
        raise AdapterError(f"{weights_path}: corrupt or truncated safetensors file ({error})") from error
    return tensors, hashlib.sha256(data).hexdigest()


def _split_lora_tensors(tensors: Dict[str, torch.Tensor], weights_path: Path, config: dict):
    """module name -> (lora_A [r, d_in], lora_B [d_out, r]), validated."""
    for key in tensors:
        for marker, problem in FOREIGN_LORA_MARKERS.items():
            if f".{marker}" in key:
                raise AdapterError(f"{weights_path}: tensor {key!r} shows {problem}")
    auxiliary = tuple(marker for flag, marker in AUXILIARY_TENSORS.items() if config.get(flag) is not None)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if auxiliary and any(marker in key for marker in auxiliary):
            continue
        module_key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if module_key.endswith(LORA_A_SUFFIX):
            pairs.setdefault(module_key[: -len(LORA_A_SUFFIX)], {})["A"] = tensor
        elif module_key.endswith(LORA_B_SUFFIX):
            pairs.setdefault(module_key[: -len(LORA_B_SUFFIX)], {})["B"] = tensor
        else:
            raise AdapterError(f"{weights_path}: unexpected tensor {key!r} "
                               "(expected only <module>.lora_A.weight / <module>.lora_B.weight)")
    if not pairs:
        raise AdapterError(f"{weights_path}: no lora_A/lora_B tensors found")
    modules = {}
    for module, pair in sorted(pairs.items(), key=lambda item: _natural_key(item[0])):
        for part, other in (("A", "B"), ("B", "A")):
            if part not in pair:
                raise AdapterError(f"{weights_path}: module {module!r} has lora_{other} but no lora_{part}")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise AdapterError(
                f"{weights_path}: module {module!r} has lora_A of shape {tuple(lora_a.shape)} and lora_B of "
                f"shape {tuple(lora_b.shape)}; expected 2-D (non-Linear LoRA such as conv is not supported)"
            )
        if lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(
                f"{weights_path}: module {module!r}: rank mismatch, lora_A {tuple(lora_a.shape)} has rank "
                f"{lora_a.shape[0]} but lora_B {tuple(lora_b.shape)} has rank {lora_b.shape[1]}"
            )
        for part, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if not tensor.is_floating_point():
                raise AdapterError(f"{weights_path}: module {module!r}: {part} has dtype {tensor.dtype}, "
                                   "expected a floating dtype")
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{weights_path}: module {module!r}: {part} holds non-finite values (NaN or inf)")
        modules[module] = (lora_a.float(), lora_b.float())
    return modules


def _load_adapter(folder: Path, name: str):
    """(AdapterInfo, module name -> (A, B with the scale folded in))."""
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a directory (expected a peft adapter folder)")
    config = read_adapter_config(folder)
    tensors, sha256 = _read_weights(folder)
    weights_path = folder / WEIGHTS_FILE
    modules = _split_lora_tensors(tensors, weights_path, config)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    use_rslora = bool(config.get("use_rslora", False))
    ranks, scales, experts = {}, {}, {}
    for module, (lora_a, lora_b) in modules.items():
        rank = lora_a.shape[0]
        expected_rank = pattern_value(rank_pattern, module, config["r"])
        if rank != expected_rank:
            raise AdapterError(
                f"{weights_path}: module {module!r}: lora_A has rank {rank} but {CONFIG_FILE} "
                f"(r / rank_pattern) says {expected_rank}"
            )
        alpha = pattern_value(alpha_pattern, module, config["lora_alpha"])
        scale = adapter_scale(weights_path, module, alpha, rank, use_rslora)
        ranks[module], scales[module] = rank, scale
        experts[module] = (lora_a, lora_b * scale)
    info = AdapterInfo(
        name=name,
        path=str(folder.resolve()),
        sha256=sha256,
        base_model=config.get("base_model_name_or_path"),
        r=int(config["r"]),
        lora_alpha=config["lora_alpha"],
        use_rslora=use_rslora,
        target_modules=config.get("target_modules"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        module_ranks=dict(sorted(ranks.items(), key=lambda item: _natural_key(item[0]))),
        module_scales=dict(sorted(scales.items(), key=lambda item: _natural_key(item[0]))),
    )
    return info, experts


def _adapter_names(paths: Sequence[Path], names: Optional[Sequence[str]]) -> List[str]:
    if names is None:
        names = [path.resolve().name for path in paths]
    else:
        names = list(names)
        if len(names) != len(paths):
            raise ValueError(f"names: expected {len(paths)} names (one per path), got {len(names)}")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"names: expected non-empty strings, got {name!r}")
    first_path: Dict[str, Path] = {}
    for name, path in zip(names, paths):
        if name in first_path:
            raise AdapterError(
                f"{path}: duplicate adapter name {name!r} (also used by {first_path[name]}); "
                "pass distinct names= to LoRAPool.from_pretrained"
            )
        first_path[name] = path
    return names


def matches_target(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """peft's ``target_modules`` rule: a string is a regex that must match the whole name; a list entry
    matches the whole name or a dotted suffix of it (``"q_proj"`` and ``"self_attn.q_proj"`` match
    ``model.layers.0.self_attn.q_proj``). A list entry also matches as an fnmatch glob on the whole name
    (``"*.0.*q_proj"``), as before SmartFed followed peft; for an entry without glob characters the glob
    adds nothing, so a list written for peft selects exactly what peft would.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == entry or name.endswith("." + entry) or fnmatch.fnmatchcase(name, entry)
               for entry in target_modules)


class LoRAPool:
    """Frozen rank-wise experts from a set of peft LoRA adapters, with their provenance."""

    def __init__(self, adapters: Sequence[AdapterInfo], modules: Dict[str, ModuleExperts]):
        self.adapters = list(adapters)
        self.modules = dict(modules)

    @classmethod
    def from_pretrained(cls, paths, names: Optional[Sequence[str]] = None) -> "LoRAPool":
        """Load adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

        ``paths``: one folder or a sequence of folders; ``names``: one name per folder (default:
        the folder names). Experts are stacked in the order of ``paths``. Raises
        :class:`AdapterError` naming the file and the problem on any unusable adapter.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [Path(path) for path in paths]
        if not paths:
            raise ValueError("paths: expected at least one adapter folder, got none")
        names = _adapter_names(paths, names)
        adapters: List[AdapterInfo] = []
        parts: Dict[str, List[Tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for path, name in zip(paths, names):
            info, experts = _load_adapter(path, name)
            adapters.append(info)
            for module, (lora_a, lora_b) in experts.items():
                _check_same_shape(parts.get(module), module, lora_a, lora_b, path, adapters)
                parts.setdefault(module, []).append((name, lora_a, lora_b))
        modules = {}
        for module in sorted(parts, key=_natural_key):
            entries = parts[module]
            origins = [(name, index) for name, lora_a, _ in entries for index in range(lora_a.shape[0])]
            modules[module] = ModuleExperts(
                name=module,
                expert_a=torch.cat([lora_a for _, lora_a, _ in entries], dim=0).contiguous(),
                expert_b=torch.cat([lora_b for _, _, lora_b in entries], dim=1).contiguous(),
                origins=origins,
            )
        return cls(adapters, modules)

    @property
    def fingerprint(self) -> str:
        """sha256 over (name, weights sha256) of every adapter, in order: identifies the expert layout."""
        identity = json.dumps([[info.name, info.sha256] for info in self.adapters])
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()

    @property
    def num_experts(self) -> int:
        return sum(experts.num_experts for experts in self.modules.values())

    def select(self, target_modules: Union[str, Sequence[str]]) -> List[str]:
        """Module names matching ``target_modules`` by :func:`matches_target`, in pool order."""
        check_target_modules(target_modules)
        return [name for name in self.modules if matches_target(name, target_modules)]

    def provenance(self) -> dict:
        """JSON-able record of where every expert comes from."""
        return {
            "fingerprint": self.fingerprint,
            "adapters": [info.to_dict() for info in self.adapters],
            "modules": {
                name: {
                    "d_in": experts.d_in,
                    "d_out": experts.d_out,
                    "num_experts": experts.num_experts,
                    "sources": [list(source) for source in experts.sources()],
                }
                for name, experts in self.modules.items()
            },
        }

    def describe(self) -> str:
        lines = [
            f"LoRAPool {self.fingerprint[:16]}: {len(self.adapters)} adapters, "
            f"{len(self.modules)} modules, {self.num_experts} experts"
        ]
        for info in self.adapters:
            scaling = "rslora alpha/sqrt(r)" if info.use_rslora else "alpha/r"
            lines.append(
                f"  adapter {info.name}: r={info.r} alpha={info.lora_alpha} scale={scaling} "
                f"modules={len(info.module_ranks)} base={info.base_model} "
                f"sha256={info.sha256[:12]} path={info.path}"
            )
        for name, experts in self.modules.items():
            sources = ", ".join(f"{adapter}:{count}" for adapter, count in experts.sources())
            lines.append(f"  {name}: [{experts.d_out} x {experts.d_in}] N={experts.num_experts} ({sources})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"LoRAPool(adapters={[info.name for info in self.adapters]}, "
                f"modules={len(self.modules)}, experts={self.num_experts})")


def _check_same_shape(previous, module, lora_a, lora_b, path, adapters):
    if not previous:
        return
    first_name, first_a, first_b = previous[0]
    if first_a.shape[1] != lora_a.shape[1] or first_b.shape[0] != lora_b.shape[0]:
        first_path = next(info.path for info in adapters if info.name == first_name)
        raise AdapterError(
            f"{Path(path) / WEIGHTS_FILE}: module {module!r} has d_in={lora_a.shape[1]}, "
            f"d_out={lora_b.shape[0]} but adapter {first_name!r} ({first_path}) has "
            f"d_in={first_a.shape[1]}, d_out={first_b.shape[0]} for the same module"
        )
