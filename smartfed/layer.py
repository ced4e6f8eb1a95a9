"""MoRELinear: a drop-in replacement for ``nn.Linear`` that adds a routed mixture of rank-wise experts.

    y = base(x) + gamma * sum_{i in topk(z)} g_i (A_i . x) B_i       (docs/design.md §2)

The base Linear stays frozen and its weight and bias feed the fused op; only the router trains
(and the experts, if ``train_experts``). The forward is one call, through dispatch, to the chosen
backend's ``more_linear_checked``: the op behind :func:`smartfed_kernels.more_linear` without its
per-call checks (the layer's tensors are checked when they are set, x on each call). On the CPU
that is the one inference path of the torch backend (C kernels, PyTorch ops as their fall-back)
whenever no graph is needed. While observers are attached it splits into ``base(x)`` and the
expert contribution so that observers (EEQA importance) can see both.
"""

import math
import sys
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from smartfed.choices import LAYER_ROUTERS, ROUTER_INITS
from smartfed_kernels.dispatch import BACKENDS, backend_module, resolve_backend
from smartfed_kernels.validation import GATES, CallSpec, check_more_inputs, resolve_gamma

NORMAL_INIT_STD = 1e-3

Observer = Callable[["MoRELinear", torch.Tensor, torch.Tensor, torch.Tensor], None]


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_router_projection(router_dim, projection_seed) -> None:
    """The projected router's size m and the seed of its P (checked whatever the router form, so
    that a bad value fails where it is written, not when the form changes)."""
    if isinstance(router_dim, bool) or not isinstance(router_dim, int) or router_dim < 1:
        raise ValueError(f"router_dim: expected an int >= 1, got {router_dim!r}")
    if isinstance(projection_seed, bool) or not isinstance(projection_seed, int) or projection_seed < 0:
        raise ValueError(f"projection_seed: expected an int >= 0, got {projection_seed!r}")


def is_conv1d(module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2 family): a Linear stored [d_in, d_out]."""
    # Whoever built a model holding a Conv1D imported transformers, so without the module there is none.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def weight_out_in(module) -> torch.Tensor:
    """The [d_out, d_in] weight of an ``nn.Linear``, or a transposed view of a transformers ``Conv1D``'s."""
    return module.weight.t() if is_conv1d(module) else module.weight


def type_name(value) -> str:
    """Module-qualified class name, so peft's ``lora.Linear`` does not read as ``nn.Linear``."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def router_projection(router_dim: int, d_in: int, seed: int) -> torch.Tensor:
    """P [router_dim, d_in] of the projected router, float32: random signs / sqrt(d_in), so each row
    has norm 1 and P x keeps the scale of x. Integers from a seeded CPU generator, so every client
    builds the same P from the seed alone (bit for bit; P is never sent)."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (router_dim, d_in), generator=generator)
    return (signs.float() * 2 - 1) / math.sqrt(d_in)


def initial_router_weight(router: str, router_init: str, expert_a: torch.Tensor, width: int,
                          generator: Optional[torch.Generator] = None,
                          projection: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router weight [N, width] in float32 for ``router_init``: width d_in (linear), N
    (expert_space) or m (projected, whose ``projection`` P [m, d_in] affinity needs)."""
    num_experts, d_in = expert_a.shape
    if router_init == "zeros":
        return torch.zeros(num_experts, width)
    if router_init == "normal":
        return torch.randn(num_experts, width, generator=generator) * NORMAL_INIT_STD
    if router == "expert_space":
        return torch.eye(num_experts)
    # Affinity: the logit of expert i is the cosine-scaled response of its A row to x.
    rows = expert_a.detach().float().cpu()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if router == "linear":
        return rows
    # U P approximates those rows: E[P^T P] = (m / d_in) I for P's random signs.
    return rows @ projection.t() * (d_in / projection.shape[0])


class MoRELinear(nn.Module):
    """``nn.Linear`` plus a top-k routed mixture of frozen rank-one experts.

    ``expert_a [N, d_in]``, ``expert_b [d_out, N]`` (scale already folded in, as in
    :class:`smartfed.LoRAPool`) are copied to the base weight's device and dtype.
    ``top_k`` may be changed at any time (1..N); ``gamma=None`` means k at call time.
    ``seed`` makes ``router_init="normal"`` reproducible (None: the global RNG).
    """

    def __init__(
        self,
        base: nn.Linear,
        expert_a: torch.Tensor,
        expert_b: torch.Tensor,
        top_k: int,
        *,
        router: str = "linear",
        gate: str = "topk_softmax",
        gamma: Optional[float] = None,
        router_init: str = "normal",
        router_bias: bool = True,
        train_experts: bool = False,
        backend: str = "auto",
        origins: Optional[Sequence[Tuple[str, int]]] = None,
        seed: Optional[int] = None,
        router_dim: int = 32,
        projection_seed: int = 0,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear) and not is_conv1d(base):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__} ({type_name(base)}; "
                            "a transformers Conv1D is accepted too)")
        check_choice("router", router, LAYER_ROUTERS)
        check_choice("gate", gate, GATES)
        check_choice("router_init", router_init, ROUTER_INITS)
        check_choice("backend", backend, BACKENDS)
        check_router_projection(router_dim, projection_seed)
        for name, tensor in (("expert_a", expert_a), ("expert_b", expert_b)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(tensor, 'shape', type(tensor))}")
        num_experts = expert_a.shape[0]
        d_out, d_in = weight_out_in(base).shape
        expected_a = (num_experts, d_in)
        expected_b = (d_out, num_experts)
        if num_experts < 1 or tuple(expert_a.shape) != expected_a:
            raise ValueError(f"expert_a: expected shape [N, d_in={d_in}] with N >= 1, "
                             f"got {tuple(expert_a.shape)}")
        if tuple(expert_b.shape) != expected_b:
            raise ValueError(f"expert_b: expected shape {expected_b} (d_out from base, N from expert_a), "
                             f"got {tuple(expert_b.shape)}")
        if origins is not None and len(origins) != num_experts:
            raise ValueError(f"origins: expected {num_experts} entries (one per expert), got {len(origins)}")

        self.base = base
        self._base_is_conv1d = is_conv1d(base)
        base.requires_grad_(False)
        self.router = router
        self.gate = gate
        self.gamma = None if gamma is None else resolve_gamma(gamma, 1)
        self.router_init = router_init
        self.backend = backend
        self.origins: Optional[List[Tuple[str, int]]] = None if origins is None else [tuple(o) for o in origins]
        self.pool_module_name: Optional[str] = None
        self.pool_fingerprint: Optional[str] = None

        place = {"device": base.weight.device, "dtype": base.weight.dtype}
        # B is kept column-major ([d_out, N] with strides (1, d_out)): its transpose, the expand's
        # table of expert columns, is then contiguous with no copy on every call.
        expert_b_columns = torch.empty(num_experts, expected_b[0], **place).copy_(expert_b.detach().t()).t()
        experts = [expert_a.detach().to(copy=True, **place), expert_b_columns]
        for name, tensor in zip(("expert_a", "expert_b"), experts):
            if train_experts:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

        projection = None
        self.router_dim = self.projection_seed = None
        if router == "projected":
            self.router_dim, self.projection_seed = router_dim, projection_seed
            projection = router_projection(router_dim, d_in, projection_seed)
            self.register_buffer("router_projection", projection.to(**place))
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        weight = initial_router_weight(router, router_init, expert_a, self.router_input_width(), generator,
                                       projection)
        self.router_weight = nn.Parameter(weight.to(**place))
        if router_bias:
            self.router_bias = nn.Parameter(torch.zeros(num_experts, **place))
        else:
            self.register_parameter("router_bias", None)
        self._spec_key = None
        self._spec: Optional[CallSpec] = None
        self._top_k = 0
        self.top_k = top_k
        self._observers: "OrderedDict[int, Observer]" = OrderedDict()

    @property
    def num_experts(self) -> int:
        return self.expert_a.shape[0]

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"top_k: expected an int, got {type(value).__name__}")
        if not 1 <= value <= self.num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= N={self.num_experts}, got {value}")
        self._top_k = value
        # Ready before the next forward, so that a forward never changes the module's state (which
        # would make torch.compile guard on it and recompile).
        self._call_spec()

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as [d_out, d_in]; a transposed view for a Conv1D base (stored [d_in, d_out])."""
        return self.base.weight.t() if self._base_is_conv1d else self.base.weight

    @property
    def in_features(self) -> int:
        return self.base_weight_out_in().shape[1]

    @property
    def out_features(self) -> int:
        return self.base_weight_out_in().shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``module.weight`` (dtype, device) keeps working."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def add_observer(self, fn: Observer) -> RemovableHandle:
        """Call ``fn(layer, x, y0, delta)`` on every forward until the handle's ``remove()``.

        While any observer is attached the forward computes ``y0 = base(x)`` and the expert
        contribution ``delta`` separately (``delta`` keeps its autograd graph) and returns
        ``y0 + delta``.
        """
        if not callable(fn):
            raise TypeError(f"fn: expected a callable(layer, x, y0, delta), got {type(fn).__name__}")
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def effective_router_weight(self) -> torch.Tensor:
        """The router weight the op runs: U P for the projected router (differentiable in U),
        the parameter itself otherwise."""
        if self.router == "projected":
            return self.router_weight @ self.router_projection.to(self.router_weight.dtype)
        return self.router_weight

    def _routing_tensors(self, dtype: torch.dtype):
        """(router weight, router bias, A, B) as the op takes them, in ``dtype``. Read from the
        module's registries directly: at decode sizes nn.Module.__getattr__'s lookups add up to a
        sizeable part of the call. Nothing is kept between calls, so in-place and ``.data`` writes
        show on the next one."""
        params = self._parameters
        experts = params if "expert_a" in params else self._buffers
        router_weight = self.effective_router_weight() if self.router == "projected" else params["router_weight"]
        router_bias, expert_a, expert_b = params["router_bias"], experts["expert_a"], experts["expert_b"]
        if (router_weight.dtype is dtype and expert_a.dtype is dtype and expert_b.dtype is dtype
                and (router_bias is None or router_bias.dtype is dtype)):
            return router_weight, router_bias, expert_a, expert_b
        return tuple(t if t is None or t.dtype == dtype else t.to(dtype)
                     for t in (router_weight, router_bias, expert_a, expert_b))

    @property
    def op_router(self) -> str:
        """The op's router form: the projected router runs as the linear router U P."""
        return "linear" if self.router == "projected" else self.router

    def router_input_width(self) -> int:
        """The router weight's width: d_in (linear), N (expert_space) or m (projected)."""
        return {"linear": self.in_features, "expert_space": self.num_experts}.get(self.router, self.router_dim)

    def _call_spec(self) -> CallSpec:
        """Sizes and options of a forward, validated again only when an option was reassigned."""
        key = (self._top_k, self.gamma, self.gate, self.router)
        if key != self._spec_key:
            check_choice("router", self.router, LAYER_ROUTERS)
            check_choice("gate", self.gate, GATES)
            if self.router == "projected" and self.router_dim is None:
                raise ValueError("router: 'projected' needs the layer to be built with it (it owns the "
                                 "projection P); build a new MoRELinear with router='projected'")
            d_out, d_in = self.base_weight_out_in().shape
            expected = (self.num_experts, self.router_input_width())
            if tuple(self.router_weight.shape) != expected:
                raise ValueError(f"router_weight (router={self.router!r}): expected shape "
                                 f"{expected}, got {tuple(self.router_weight.shape)}")
            self._spec = CallSpec(d_in, d_out, self.num_experts, self._top_k,
                                  resolve_gamma(self.gamma, self._top_k), self.gate, self.op_router)
            self._spec_key = key
        return self._spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self._call_spec()
        base = self._modules["base"]._parameters
        weight = base["weight"].t() if self._base_is_conv1d else base["weight"]
        tensors = (weight, base["bias"], *self._routing_tensors(x.dtype))
        # The layer's own tensors were validated when set; per call only x can be wrong, and the
        # full check runs just to name what is wrong.
        if not x.shape or x.shape[-1] != spec.d_in or x.dtype != weight.dtype or x.device != weight.device:
            check_more_inputs(x, *tensors, spec.top_k, gate=spec.gate, gamma=self.gamma, router=spec.router)
        impl = backend_module(resolve_backend(self.backend, x))
        if not self._observers:
            return impl.more_linear_checked(x, *tensors, spec, False)
        y0 = self.base(x)
        delta = impl.more_linear_checked(x, None, None, *tensors[2:], spec, False)
        for observer in list(self._observers.values()):
            observer(self, x, y0, delta)
        return y0 + delta

    def num_router_parameters(self) -> int:
        return self.router_weight.numel() + (0 if self.router_bias is None else self.router_bias.numel())

    def extra_repr(self) -> str:
        gamma = "k" if self.gamma is None else f"{self.gamma:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, router={self.router!r}, "
                f"gate={self.gate!r}, gamma={gamma}, router_bias={self.router_bias is not None}"
                + (f", router_dim={self.router_dim}, projection_seed={self.projection_seed}"
                   if self.router == "projected" else ""))
