"""The public MoRE op: validate once, pick a backend, run it."""

from smartfed_kernels.dispatch import backend_module, resolve_backend
from smartfed_kernels.validation import check_more_inputs


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
    backend="auto",
    return_routing=False,
):
    """MoRE layer ``y = x W0^T + b0 + gamma * sum_{i in topk} g_i (A_i . x) B_i`` (docs/design.md §2.2).

    Shapes: x [..., d_in]; weight [d_out, d_in] or None (expert contribution only); bias [d_out]
    or None; router_weight [N, d_in] (router="linear") or [N, N] (router="expert_space");
    router_bias [N] or None; expert_a [N, d_in]; expert_b [d_out, N]; 1 <= top_k <= N.
    ``gamma=None`` means k. With ``return_routing=True`` also returns ``indices`` [..., k]
    (largest gate first, ties to the lower index) and ``gates`` [..., k] in float32.
    """
    spec = check_more_inputs(
        x, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k,
        gate=gate, gamma=gamma, router=router,
    )
    impl = backend_module(resolve_backend(backend, x))
    return impl.more_linear_checked(
        x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing
    )
