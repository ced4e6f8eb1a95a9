"""The Triton MoRE path as torch.library custom ops with autograd and fake (meta) kernels.

``smartfed::more_forward`` and ``smartfed::more_backward`` are opaque to torch.compile: the
fake kernels give it output shapes, so a compiled model traces through a MoRE layer with
``fullgraph=True``. Tensors an op does not produce for a given router/gate come back empty
(shape [0]) because custom ops cannot return None.
"""

from typing import List, Optional, Tuple

import torch

from smartfed_kernels import torch_ops
from smartfed_kernels.reference import routing_order
from smartfed_kernels.triton import launch

def _saved_shapes(num_tokens, num_experts, top_k, gate, router):
    expert_space, full_softmax = router == "expert_space", gate == "softmax_topk"
    return (
        (num_tokens, top_k),
        (num_tokens, num_experts) if expert_space else (0,),
        (num_tokens, num_experts) if full_softmax else (0,),
        (num_tokens,) if full_softmax else (0,),
    )


@torch.library.custom_op("smartfed::more_forward", mutates_args=())
def more_forward(
    x2: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    router_weight: torch.Tensor,
    router_bias: Optional[torch.Tensor],
    expert_a: torch.Tensor,
    expert_b: torch.Tensor,
    top_k: int,
    gamma: float,
    gate: str,
    router: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [T, d_out], indices int32 [T, k], gates, shrink [T, k], shrink_all, logits, lse)."""
    return launch.forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b,
                          top_k, gamma, gate, router)


@more_forward.register_fake
def _more_forward_fake(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k, gamma, gate, router):
    num_tokens = x2.shape[0]
    routing, shrink_all, logits, lse = _saved_shapes(num_tokens, expert_a.shape[0], top_k, gate, router)
    f32 = dict(dtype=torch.float32, device=x2.device)
    return (
        x2.new_empty(num_tokens, expert_b.shape[0]),
        x2.new_empty(routing, dtype=torch.int32),
        x2.new_empty(routing, **f32),
        x2.new_empty(routing, **f32),
        x2.new_empty(shrink_all, **f32),
        x2.new_empty(logits, **f32),
        x2.new_empty(lse, **f32),
    )


@torch.library.custom_op("smartfed::more_backward", mutates_args=())
def more_backward(
    grad_y: torch.Tensor,
    x2: torch.Tensor,
    weight: Optional[torch.Tensor],
    router_weight: torch.Tensor,
    expert_a: torch.Tensor,
    expert_b: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    shrink: torch.Tensor,
    shrink_all: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    top_k: int,
    gamma: float,
    gate: str,
    router: str,
    needs: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, weight, bias, router_weight, router_bias, expert_a, expert_b); empty where ``needs`` is False."""
    grads = launch.backward(grad_y, x2, weight, router_weight, expert_a, expert_b, indices, gates,
                            shrink, shrink_all, logits, lse, top_k, gamma, gate, router, needs)
    return tuple(x2.new_empty(0) if g is None else g for g in grads)


def _grad_shapes(x2, weight, router_weight, expert_a, expert_b):
    d_out = expert_b.shape[0]
    return (tuple(x2.shape), (d_out, x2.shape[1]), (d_out,), tuple(router_weight.shape),
            (router_weight.shape[0],), tuple(expert_a.shape), tuple(expert_b.shape))


@more_backward.register_fake
def _more_backward_fake(grad_y, x2, weight, router_weight, expert_a, expert_b, indices, gates, shrink,
                        shrink_all, logits, lse, top_k, gamma, gate, router, needs):
    shapes = _grad_shapes(x2, weight, router_weight, expert_a, expert_b)
    return tuple(x2.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x2, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k, gamma, gate, router = inputs
    _y, indices, gates, shrink, shrink_all, logits, lse = output
    ctx.save_for_backward(x2, weight, router_weight, expert_a, expert_b, indices, gates, shrink,
                          shrink_all, logits, lse)
    ctx.options = (top_k, gamma, gate, router)
    ctx.present = tuple(t is not None for t in (x2, weight, bias, router_weight, router_bias, expert_a, expert_b))
    ctx.mark_non_differentiable(indices, gates, shrink, shrink_all, logits, lse)


def _backward(ctx, grad_y, *_routing_grads):
    x2, weight, router_weight, expert_a, expert_b, indices, gates, shrink, shrink_all, logits, lse = ctx.saved_tensors
    needs = [bool(need) and present for need, present in zip(ctx.needs_input_grad[:7], ctx.present)]
    if not any(needs):
        return (None,) * 11
    grads = more_backward(grad_y, x2, weight, router_weight, expert_a, expert_b, indices, gates, shrink,
                          shrink_all, logits, lse, *ctx.options, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 4


more_forward.register_autograd(_backward, setup_context=_setup_context)


def more_linear_checked(x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing):
    """Triton MoRE layer on validated inputs; same results as the torch and reference backends."""
    if x.dtype == torch.float64:
        # Triton has no float64 tensor-core path; float64 (gradcheck) calls run the torch path.
        return torch_ops.more_linear_checked(
            x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing
        )
    lead_shape = x.shape[:-1]
    args = (x.reshape(-1, spec.d_in), weight, bias, router_weight, router_bias, expert_a, expert_b,
            spec.top_k, spec.gamma, spec.gate, spec.router)
    if torch_ops.needs_autograd(args[:7]) or torch.compiler.is_compiling():
        y, indices, gates, *_saved = torch.ops.smartfed.more_forward(*args)
    else:
        # Nothing to differentiate: the launcher directly, without the custom op's dispatch.
        y, indices, gates, *_saved = launch.forward(*args)
    y = y.reshape(*lead_shape, spec.d_out)
    if not return_routing:
        return y
    indices, gates = routing_order(indices.to(torch.int64), gates)
    return y, indices.reshape(*lead_shape, spec.top_k), gates.reshape(*lead_shape, spec.top_k)
