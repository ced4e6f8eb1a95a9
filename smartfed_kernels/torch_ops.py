"""Fast PyTorch MoRE path for CPU (and any device without Triton): a few large GEMMs.

Forward, per flattened token block X [T, d_in]:

    [Y0 | L | H] = X @ [W0; Wr; A]^T + [b0; br; 0]    one GEMM (router="linear")
    [Y0 | H]     = X @ [W0; A]^T + [b0; 0]            router="expert_space",
    L            = H @ Wr^T + br                      then one small [N, N] product
    M            = top-k mask of L (ties to the lower index), G = gates on M, zero elsewhere
    Y            = Y0 + gamma * (G * H) @ B^T          dense-masked expand, added in place

Backward with gY [T, d_out] (A and B frozen unless they require grad):

    U   = gY @ B                         [T, N]
    dG  = gamma * H * U,  dH = gamma * G * U
    dL  = G * (dG - rowsum(G * dG))                      gate="topk_softmax"
    dL  = P * (M * dG - rowsum(G * dG))                  gate="softmax_topk", P = softmax(L)
    linear:       dX = gY @ W0 + [dL | dH] @ [Wr; A],   dWr = dL^T X
    expert_space: dX = gY @ W0 + (dL @ Wr + dH) @ A,    dWr = dL^T H
    dbr = colsum(dL); dA = dH_total^T X; dB = gamma * gY^T (G * H)

The autograd Function saves X, H, G (and P for softmax_topk): [T, N] each besides X, so backward
never re-runs the router.
"""

import torch

from smartfed_kernels.validation import check_more_inputs

def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean [T, N] mask of the k largest logits per row, ties resolved to the lower index.

    ``torch.topk`` gives the k-th value; every logit above it is in, and the ties at it are
    filled from the lowest index up, which is what a stable descending sort would select.
    """
    kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = logits > kth
    at_kth = logits == kth
    room = top_k - above.sum(dim=-1, keepdim=True)
    return above | (at_kth & (at_kth.cumsum(dim=-1) <= room))


def dense_gates(logits: torch.Tensor, mask: torch.Tensor, gate: str):
    """Gates [T, N] (zero outside the mask) and, for softmax_topk, the full softmax P."""
    if gate == "topk_softmax":
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1), None
    probs = torch.softmax(logits, dim=-1)
    return probs * mask, probs


def routing_from_dense(gates: torch.Tensor, mask: torch.Tensor, top_k: int):
    """Indices and gates [T, k] in the reference order: largest gate first, ties to lower index."""
    keyed = gates.masked_fill(~mask, -1.0)
    indices = torch.sort(keyed, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return indices, gates.gather(1, indices)


def _forward(x2, weight, bias, router_weight, router_bias, expert_a, spec):
    """One GEMM over the stacked rows; returns (fused [T, cols], base column count, H, L)."""
    blocks = []
    if weight is not None:
        blocks.append((weight, bias))
    if spec.router == "linear":
        blocks.append((router_weight, router_bias))
    blocks.append((expert_a, None))
    stacked = torch.cat([rows for rows, _ in blocks]) if len(blocks) > 1 else expert_a
    if all(b is None for _, b in blocks):
        fused = x2 @ stacked.t()
    else:
        stacked_bias = torch.cat([
            b if b is not None else x2.new_zeros(rows.shape[0]) for rows, b in blocks
        ])
        fused = torch.addmm(stacked_bias, x2, stacked.t())
    base_cols = spec.d_out if weight is not None else 0
    shrink = fused[:, fused.shape[1] - spec.num_experts:]
    if spec.router == "linear":
        logits = fused[:, base_cols:base_cols + spec.num_experts]
    else:
        logits = shrink @ router_weight.t()
        if router_bias is not None:
            logits = logits + router_bias
    return fused, base_cols, shrink, logits


class MoRELinearFunction(torch.autograd.Function):
    """Autograd for the dense-masked path; backward follows the formulas in the module docstring."""

    @staticmethod
    def forward(ctx, x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec):
        fused, base_cols, shrink, logits = _forward(
            x2, weight, bias, router_weight, router_bias, expert_a, spec
        )
        mask = top_k_mask(logits, spec.top_k)
        gates, probs = dense_gates(logits, mask, spec.gate)
        coefficients = gates * shrink
        if base_cols:
            y = fused[:, :base_cols].addmm(coefficients, expert_b.t(), alpha=spec.gamma)
        else:
            y = (coefficients @ expert_b.t()).mul_(spec.gamma)
        shrink = shrink.contiguous()
        ctx.spec = spec
        ctx.save_for_backward(x2, weight, router_weight, expert_a, expert_b, shrink, gates, mask, probs)
        ctx.mark_non_differentiable(mask, gates)
        return y, mask, gates

    @staticmethod
    def backward(ctx, grad_y, _grad_mask, _grad_gates):
        x2, weight, router_weight, expert_a, expert_b, shrink, gates, mask, probs = ctx.saved_tensors
        spec = ctx.spec
        needs = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        gamma = spec.gamma

        per_expert = grad_y @ expert_b
        grad_gate = per_expert * shrink * gamma
        grad_shrink = per_expert * gates * gamma
        weighted = (gates * grad_gate).sum(dim=-1, keepdim=True)
        if spec.gate == "topk_softmax":
            grad_logits = gates * (grad_gate - weighted)
        else:
            grad_logits = probs * (grad_gate * mask - weighted)

        grad_x = grad_weight = grad_bias = grad_router_w = grad_router_b = grad_a = grad_b = None
        if spec.router == "linear":
            grad_shrink_total = grad_shrink
            if needs[0]:
                coeff = torch.cat([grad_logits, grad_shrink], dim=1)
                grad_x = coeff @ torch.cat([router_weight, expert_a], dim=0)
            if needs[3]:
                grad_router_w = grad_logits.t() @ x2
        else:
            grad_shrink_total = grad_shrink + grad_logits @ router_weight
            if needs[0]:
                grad_x = grad_shrink_total @ expert_a
            if needs[3]:
                grad_router_w = grad_logits.t() @ shrink
        if needs[0] and weight is not None:
            grad_x.addmm_(grad_y, weight)
        if needs[1]:
            grad_weight = grad_y.t() @ x2
        if needs[2]:
            grad_bias = grad_y.sum(dim=0)
        if needs[4]:
            grad_router_b = grad_logits.sum(dim=0)
        if needs[5]:
            grad_a = grad_shrink_total.t() @ x2
        if needs[6]:
            grad_b = (grad_y.t() @ (gates * shrink)).mul_(gamma)
        return (
            grad_x,          # x2
            grad_weight,     # weight
            grad_bias,       # bias
            grad_router_w,   # router_weight
            grad_router_b,   # router_bias
            grad_a,          # expert_a
            grad_b,          # expert_b
            None,            # spec
        )


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
    backend="torch",
    return_routing=False,
):
    """Fast-path MoRE layer; same contract as :func:`smartfed_kernels.reference.more_linear`."""
    spec = check_more_inputs(
        x, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k,
        gate=gate, gamma=gamma, router=router,
    )
    return more_linear_checked(
        x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing
    )


def more_linear_checked(x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, return_routing):
    """Fast path on already validated inputs (the dispatcher validates once for all backends)."""
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, spec.d_in)
    low_precision = x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu"
    if low_precision:
        # CPU half GEMMs are slow and accumulate poorly; compute in fp32 and cast back.
        args = [t if t is None else t.float() for t in
                (x2, weight, bias, router_weight, router_bias, expert_a, expert_b)]
    else:
        args = [x2, weight, bias, router_weight, router_bias, expert_a, expert_b]
    y, mask, gates = MoRELinearFunction.apply(*args, spec)
    y = y.to(x.dtype).reshape(*lead_shape, spec.d_out)
    if not return_routing:
        return y
    indices, top_gates = routing_from_dense(gates, mask, spec.top_k)
    return y, indices.reshape(*lead_shape, spec.top_k), top_gates.reshape(*lead_shape, spec.top_k)
