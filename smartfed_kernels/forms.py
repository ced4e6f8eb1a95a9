"""Gate and router forms of the MoRE op: the maths behind each option name, in one place.

One entry per name of :mod:`smartfed_kernels.options`, in the same order; its ``code`` (the
position there) is how the C kernels (``enum more_gate``, checked at load) and the Triton
kernels (the ``GATE`` constexpr) name it. The fast PyTorch path takes every formula from here,
in its autograd forward and backward and in its inference fall-back. The reference
(reference.py) keeps its own plainer lines, so that a mistake here shows up against it.

Adding a gate: its name in ``options.GATES``, a :class:`GateForm` below, the reference's branch,
the C body (more_cpu_body.h, ``MORE_GATES`` in more_cpu.c) and the Triton bodies
(triton/forward.py, triton/backward.py); the tests iterate :data:`GATE_FORMS`.

Notation: logits L [T, N], the selected indices I and their logits L_I [T, k], gates g [T, k].
"""

from dataclasses import dataclass
from typing import Callable

import torch

from smartfed_kernels.options import GATES, ROUTERS


@dataclass(frozen=True)
class GateForm:
    """``gates(L, L_I, I) -> (g, saved)``: the gates and what the backward needs besides them.
    ``logits_grad(w, g, saved, I, L) -> dL [T, N]`` from ``w = g * dg``, dg the gradient of the
    loss with respect to the gates (L gives dL's shape)."""

    name: str
    code: int
    gates: Callable
    logits_grad: Callable


@dataclass(frozen=True)
class RouterForm:
    """``L = input Wr^T + br``, where the input is x, or the shrink values H = x A^T when
    ``reads_shrink`` (then the router sees all N of them, and the backward adds ``dL Wr`` to dH
    instead of to dx)."""

    name: str
    code: int
    reads_shrink: bool

    def input(self, x2: torch.Tensor, shrink: torch.Tensor) -> torch.Tensor:
        return shrink if self.reads_shrink else x2


_ROW_WISE_MIN_TOKENS = 64


def _topk_softmax(logits, selected_logits, indices):
    """g = softmax(L_I)."""
    if selected_logits.dtype in (torch.float16, torch.bfloat16) or selected_logits.shape[0] < _ROW_WISE_MIN_TOKENS:
        # Half inputs: torch.softmax accumulates them in fp32. Few tokens: one op costs less than five.
        return torch.softmax(selected_logits, dim=-1), None
    # Over many rows of k ~ 8, these row-wise ops run ~2.5x faster on CPU than torch.softmax.
    gates = (selected_logits - selected_logits.amax(dim=-1, keepdim=True)).exp_()
    return gates.div_(gates.sum(dim=-1, keepdim=True)), None


def _topk_softmax_grad(weighted, gates, _saved, indices, logits):
    """dL_I = g (dg - sum_j g_j dg_j) = w - g sum(w); zero off the selection."""
    return torch.zeros_like(logits).scatter_(1, indices, weighted - gates * weighted.sum(dim=-1, keepdim=True))


def _softmax_topk(logits, _selected_logits, indices):
    """g = P_I with P = softmax(L) over all N; P is kept for the backward."""
    probs = torch.softmax(logits, dim=-1)
    return probs.gather(1, indices), probs


def _softmax_topk_grad(weighted, _gates, probs, indices, _logits):
    """dL = scatter_I(w) - P sum(w): every logit moves P, so the gradient reaches all N."""
    return (probs * -weighted.sum(dim=-1, keepdim=True)).scatter_add_(1, indices, weighted)


def _registry(kind: str, names: tuple, forms: tuple) -> dict:
    found = tuple(form.name for form in forms)
    if found != names or [form.code for form in forms] != list(range(len(names))):
        raise RuntimeError(f"smartfed_kernels.forms: the {kind} forms {found} must follow options {names}")
    return {form.name: form for form in forms}


GATE_FORMS = _registry("gate", GATES, (
    GateForm("topk_softmax", 0, _topk_softmax, _topk_softmax_grad),
    GateForm("softmax_topk", 1, _softmax_topk, _softmax_topk_grad),
))
ROUTER_FORMS = _registry("router", ROUTERS, (
    RouterForm("linear", 0, reads_shrink=False),
    RouterForm("expert_space", 1, reads_shrink=True),
))


def _lookup(registry: dict, kind: str, name):
    form = registry.get(name) if isinstance(name, str) else None
    if form is None:
        raise ValueError(f"{kind}: expected one of {tuple(registry)}, got {name!r}")
    return form


def gate_form(name: str) -> GateForm:
    """The gate form of ``name``; a ValueError naming the known gates for any other name."""
    return _lookup(GATE_FORMS, "gate", name)


def router_form(name: str) -> RouterForm:
    """The router form of ``name``; a ValueError naming the known routers for any other name."""
    return _lookup(ROUTER_FORMS, "router", name)
