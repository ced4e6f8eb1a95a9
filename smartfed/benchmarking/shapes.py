"""Benchmark shapes: model presets (d_in = d_out of the adapted matrix) times tokens, pool, top-k.

A shape spec is ``MODEL[:T<tokens>][:N<experts>][:k<top_k>]`` where MODEL is a preset name
(``smollm2``, ``2048``, ``llama7b``) or ``<d_in>x<d_out>``; every field takes a comma list
and the spec expands to their product, e.g. ``llama7b:T1,16:N64:k8`` is two shapes.
"""

import itertools
import re
from dataclasses import asdict, dataclass

MODELS = {"smollm2": (576, 576), "2048": (2048, 2048), "llama7b": (4096, 4096)}
TOKENS = (1, 16, 512, 2048, 4096)
POOLS = (16, 64, 256, 1024)
TOP_KS = (1, 4, 8, 16)

_FIELD = re.compile(r"^([TNk])([0-9,]+)$")
_DIMS = re.compile(r"^([0-9]+)x([0-9]+)$")
_DEFAULTS = {"T": (2048,), "N": (64,), "k": (8,)}


@dataclass(frozen=True)
class Shape:
    """One MoRE layer problem: x [tokens, d_in], a pool of ``experts`` with ``top_k`` active."""

    model: str
    d_in: int
    d_out: int
    tokens: int
    experts: int
    top_k: int

    @property
    def label(self) -> str:
        return f"{self.model} T={self.tokens} N={self.experts} k={self.top_k}"

    def as_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def _ints(text: str, spec: str) -> tuple:
    values = tuple(int(v) for v in text.split(",") if v)
    if not values or min(values) < 1:
        raise ValueError(f"--shapes: expected positive integers in {spec!r}, got {text!r}")
    return values


def parse_shape_spec(spec: str) -> list:
    """Expand one shape spec (see the module docstring) into its shapes."""
    model, *fields = spec.split(":")
    if model in MODELS:
        d_in, d_out = MODELS[model]
    elif _DIMS.match(model):
        d_in, d_out = (int(v) for v in _DIMS.match(model).groups())
        if min(d_in, d_out) < 1:
            raise ValueError(f"--shapes: expected positive dimensions in {spec!r}")
    else:
        raise ValueError(
            f"--shapes: expected MODEL[:T..][:N..][:k..] with MODEL one of {sorted(MODELS)} or "
            f"<d_in>x<d_out>, got {spec!r}"
        )
    values = dict(_DEFAULTS)
    for field in fields:
        match = _FIELD.match(field)
        if not match:
            raise ValueError(f"--shapes: expected fields T<tokens>, N<experts>, k<top_k> in {spec!r}, got {field!r}")
        values[match.group(1)] = _ints(match.group(2), spec)
    shapes = []
    for tokens, experts, top_k in itertools.product(values["T"], values["N"], values["k"]):
        if top_k > experts:
            raise ValueError(f"--shapes: expected k <= N in {spec!r}, got k={top_k} > N={experts}")
        shapes.append(Shape(model, d_in, d_out, tokens, experts, top_k))
    return shapes


def parse_shapes(specs) -> list:
    """All shapes of several specs, duplicates dropped, order kept."""
    shapes = []
    for spec in specs:
        shapes.extend(s for s in parse_shape_spec(spec) if s not in shapes)
    return shapes


def default_shape_specs(device_type: str, quick: bool) -> list:
    """Shapes a plain `smartfed bench` runs: the targets of docs/design.md §8 for the device and a few others."""
    if quick:
        return ["96x80:T64:N16:k4"]
    if device_type == "cuda":
        return ["llama7b:T4096:N64:k8", "llama7b:T1,16:N64:k8", "smollm2:T2048:N64:k8", "llama7b:T4096:N1024:k16"]
    return ["smollm2:T2048:N64:k8", "2048:T2048:N64:k8", "smollm2:T1,16:N64:k8", "2048:T1,16:N64:k8",
            "64x64:T1:N16:k8", "smollm2:T2048:N256:k8", "smollm2:T512:N256:k16"]
