"""The module layer's options, torch-free: configuration checks them without importing torch.

The option names (router forms, router inits, importance estimators) are keyed by the code that
acts on them, which refuses any other. :class:`MoREConfig`, the object a user types to configure
MoRE layers, is declared here once: ``smartfed.inject`` builds the layers from it, and the run
config's ``more`` section (smartfed.config) is derived from its fields, so the two cannot drift.
"""

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence, Union

from smartfed_kernels.options import BACKENDS, GATES, ROUTERS

ROUTER_INITS = ("zeros", "normal", "affinity")
# The op's router forms, and "projected": z = U (P x) + br with P [m, d_in] fixed (seeded random
# signs, never trained or sent) and U [N, m] the trained router. The layer hands the op the linear
# router U P, so every backend runs it unchanged and autograd carries dWr to dU = dWr P^T; what
# changes is what clients train and exchange: N*m numbers instead of N*d_in.
LAYER_ROUTERS = (*ROUTERS, "projected")
ESTIMATORS = ("cosine", "magnitude", "gradient")

MAX_TOP_K = 65_536
MAX_ROUTER_DIM = 65_536
MAX_SEED = 2**63 - 1

TopK = Union[int, Mapping[str, int]]


@dataclass(frozen=True)
class OptionRule:
    """What one MoRE option accepts: one of ``choices``, or a ``kind`` (bool, int, float) within
    [``minimum``, ``maximum``] (a float strictly above ``minimum``), or None when ``optional``."""

    kind: type = str
    choices: tuple = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    optional: bool = False

    def check(self, name, value) -> None:
        if value is None and self.optional:
            return
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{name}: expected one of {self.choices}, got {value!r}")
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected true or false, got {type(value).__name__}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            expected = "a number" if self.kind is float else "an int"
            raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
        if self.kind is float and not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value}")
        if self.kind is float and self.minimum is not None and not value > self.minimum:
            raise ValueError(f"{name}: expected a number > {self.minimum}, got {value!r}")
        if self.kind is int and self.minimum is not None and value < self.minimum:
            raise ValueError(f"{name}: expected an int >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{name}: expected at most {self.maximum}, got {value!r}")


def _option(default, **rule):
    """A field of MoREConfig that the run config's ``more`` section holds too, with its rule."""
    return field(default=default, metadata={"rule": OptionRule(**rule)})


@dataclass(frozen=True)
class MoREConfig:
    """How :func:`smartfed.inject_more` builds the MoRE layers.

    ``top_k``: one k for every module, or a mapping whose keys are module names (pool or model
    names), dotted name suffixes as in peft (``"q_proj"``) or fnmatch globs; an exact name wins,
    then the first matching suffix, then the first matching glob, in mapping order.

    ``target_modules`` selects pool modules with peft's rule: a string is a regex matched against
    the whole pool module name, a list entry matches the whole name or a dotted suffix
    (``["q_proj", "v_proj"]``); a list entry also matches as an fnmatch glob on the whole name
    (``["*.0.*q_proj"]``), kept from before. None: every pool module. Each list entry (or the
    regex) must match at least one module.
    ``seed`` seeds ``router_init="normal"`` per module (stable whatever the injection order).
    ``router="projected"`` routes on ``U (P x)``: ``router_dim`` is m, the width of U [N, m], and
    ``projection_seed`` seeds the fixed P [m, d_in] that every client rebuilds from it
    (:func:`smartfed.layer.router_projection`); both are ignored by the other router forms.
    ``gamma`` scales the mixture (None: k).

    The fields made with ``_option`` are the run config's ``more`` section as well; ``top_k``
    (one int there), ``train_experts``, ``target_modules`` (the pool's) and ``seed`` (derived from
    the run's seed) are set by the run.
    """

    top_k: TopK = 8
    router: str = _option("linear", choices=LAYER_ROUTERS)
    gate: str = _option("topk_softmax", choices=GATES)
    gamma: Optional[float] = _option(None, kind=float, minimum=0, optional=True)
    router_init: str = _option("normal", choices=ROUTER_INITS)
    router_bias: bool = _option(True, kind=bool)
    train_experts: bool = False
    target_modules: Union[str, Sequence[str], None] = None
    backend: str = _option("auto", choices=BACKENDS)
    seed: int = 0
    router_dim: int = _option(32, kind=int, minimum=1, maximum=MAX_ROUTER_DIM)
    projection_seed: int = _option(0, kind=int, minimum=0, maximum=MAX_SEED)

    def __post_init__(self):
        for name, rule in more_options().items():
            rule.check(name, getattr(self, name))
        if isinstance(self.top_k, Mapping):
            if not self.top_k:
                raise ValueError("top_k: expected a non-empty mapping module name/glob -> int")
            for key, value in self.top_k.items():
                check_k(f"top_k[{key!r}]", value)
        else:
            check_k("top_k", self.top_k)
        if self.target_modules is not None:
            check_target_modules(self.target_modules)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__}")
        if not isinstance(self.train_experts, bool):
            raise TypeError(f"train_experts: expected true or false, got {type(self.train_experts).__name__}")

    def to_dict(self) -> dict:
        config = asdict(self)
        if isinstance(self.top_k, Mapping):
            config["top_k"] = dict(self.top_k)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            config["target_modules"] = list(self.target_modules)
        return config


def more_options() -> dict:
    """{field name: OptionRule} of the MoREConfig fields the run config's ``more`` section holds."""
    return {item.name: item.metadata["rule"] for item in MoREConfig.__dataclass_fields__.values()
            if "rule" in item.metadata}


def check_k(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected k >= 1, got {value}")
    if value > MAX_TOP_K:
        raise ValueError(f"{name}: expected k <= {MAX_TOP_K}, got {value}")


def check_target_modules(target_modules) -> None:
    """Raise unless ``target_modules`` is a valid regex string or a sequence of non-empty strings."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(
                f"target_modules: {target_modules!r} is not a valid regular expression ({error}); a string is a "
                f"regex matched against the whole module name, as in peft; for names, suffixes or globs pass a "
                f"list, e.g. [{target_modules!r}]"
            ) from error
        return
    if not isinstance(target_modules, (list, tuple)) or not target_modules:
        raise TypeError(f"target_modules: expected a regex string or a non-empty list of module names, suffixes "
                        f"or globs, got {target_modules!r}")
    for entry in target_modules:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"target_modules: expected non-empty strings in the list, got {entry!r}")
