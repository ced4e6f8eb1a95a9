"""Plain PyTorch MoRE layer: the definition of correct (docs/design.md §2.2).

For a token x (a row of X), with N rank-one experts (A[i, :], B[:, i]):

    z   = Wr x + br                      router="linear"
    z   = Wr (A x) + br                  router="expert_space"
    S   = top-k(z), ties to the lower index
    g   = softmax(z[S])                  gate="topk_softmax"
    g   = softmax(z)[S]                  gate="softmax_topk"
    h_i = A[i, :] . x                    for i in S
    y   = W0 x + b0 + gamma * sum_{i in S} g_i h_i B[:, i]

Written for reading, not speed: every gradient comes from autograd through these lines.
Works in float64, which makes it usable with ``torch.autograd.gradcheck``.
"""

import torch

from smartfed_kernels.validation import check_more_inputs


def select_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [T, k] of the k largest logits per row, largest first, ties to the lower index."""
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    return order[:, :top_k]


def routing_order(indices: torch.Tensor, gates: torch.Tensor):
    """Indices and gates [T, k] with a row's experts in the documented order: largest gate first,
    equal gates by lower index (distinct logits can give equal gates, e.g. two that underflow to 0)."""
    by_index = indices.sort(dim=-1).indices
    by_gate = torch.sort(gates.detach().gather(1, by_index), dim=-1, descending=True, stable=True).indices
    order = by_index.gather(1, by_gate)
    return indices.gather(1, order), gates.gather(1, order)


def more_linear(
    x,
    weight,
    bias,
    router_weight,
    router_bias,
    expert_a,
    expert_b,
    top_k,
    *,
    gate="topk_softmax",
    gamma=None,
    router="linear",
    backend="reference",
    return_routing=False,
):
    """MoRE layer output ``[..., d_out]`` (and ``indices``, ``gates`` ``[..., k]`` if asked).

    Gates come back in float32 (float64 for float64 inputs), whatever the input dtype.

    ``weight`` may be None: then the result is the expert contribution alone (no base product).
    ``backend`` is accepted for signature parity with :func:`smartfed_kernels.more_linear`.
    """
    spec = check_more_inputs(
        x, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k,
        gate=gate, gamma=gamma, router=router,
    )
    return more_linear_checked(
        x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing
    )


def more_linear_checked(x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing):
    """The reference on already validated inputs (the dispatcher validates once for all backends)."""
    top_k, router, gate = spec.top_k, spec.router, spec.gate
    lead_shape = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def up(t):
        return None if t is None else t.to(compute_dtype)

    xs, w0, b0 = up(tokens), up(weight), up(bias)
    wr, br, a_all, b_all = up(router_weight), up(router_bias), up(expert_a), up(expert_b)

    shrink_all = xs @ a_all.t()
    router_input = xs if router == "linear" else shrink_all
    logits = router_input @ wr.t()
    if br is not None:
        logits = logits + br

    indices = select_top_k(logits.detach(), top_k)
    selected_logits = logits.gather(1, indices)
    if gate == "topk_softmax":
        gates = torch.softmax(selected_logits, dim=-1)
    else:
        gates = torch.softmax(logits, dim=-1).gather(1, indices)

    shrink = shrink_all.gather(1, indices)
    selected_b = b_all.t()[indices]
    delta = spec.gamma * torch.einsum("tk,tkd->td", gates * shrink, selected_b)

    if w0 is None:
        out = delta
    else:
        out = xs @ w0.t() + delta
        if b0 is not None:
            out = out + b0
    out = out.to(x.dtype).reshape(*lead_shape, spec.d_out)
    if not return_routing:
        return out
    indices, gates = routing_order(indices, gates)
    return out, indices.reshape(*lead_shape, top_k), gates.reshape(*lead_shape, top_k)
