"""Fast PyTorch MoRE path for CPU (and any device without Triton): big GEMMs, a sparse expand.

Forward, per flattened token block X [T, d_in]:

    [L | H] = X @ [Wr; A]^T + [br; 0]                  router="linear": one [T, 2N] GEMM
    H       = X @ A^T,  L = H @ Wr^T + br              router="expert_space"
    I, Lk   = top-k of L [T, k] (ties to the lower index)
    g       = softmax(Lk)                              gate="topk_softmax"
    g       = P[I], P = softmax(L)                     gate="softmax_topk"
    c       = gamma * g * H[I]                         [T, k]
    Y       = sum_j c[:, j] B[:, I[:, j]]^T + b0       sparse expand (embedding_bag over B^T)
    Y      += X @ W0^T                                 the base GEMM accumulates in place

The expand reads only the k selected columns of B per token (T*k*d_out multiply-adds instead of
a dense-masked T*N*d_out), the bias rides along as one more row of the embedding table, and the
base GEMM adds onto the expand's output with beta=1, so no pass over Y is spent on adds or
copies, and W0 is never copied (a stacked [W0; Wr; A] GEMM would copy W0 on every call).
``torch.topk`` breaks ties arbitrarily, so rows whose k-th logit ties with an unselected one are
re-selected by a stable sort; only those rows pay for it.

Backward with gY [T, d_out] (A and B frozen unless they require grad), u = gY . B[:, I]:

    dg  = gamma * H[I] * u,  dh = gamma * g * u                        [T, k]
    dL  = scatter(I, g * (dg - rowsum(g * dg)))                       gate="topk_softmax"
    dL  = scatter_add(-P * rowsum(g * dg), I, g * dg)                 gate="softmax_topk"
    dH  = scatter(I, dh)                                              [T, N]
    linear:       dX = gY @ W0 + [dL | dH] @ [Wr; A],   dWr = dL^T X
    expert_space: dX = gY @ W0 + (dL @ Wr + dH) @ A,    dWr = dL^T H
    dbr = colsum(dL); dA = dH_total^T X; dB = gY^T scatter(I, c)

The autograd Function saves X, H [T, N], I and g [T, k] (and P for softmax_topk), so backward
never re-runs the router. A call that needs no gradient (grad mode off, or no input requiring
one) skips it: :func:`more_inference` runs the forward alone, on the CPU through the C kernels
of :mod:`smartfed_kernels.cpu` (selection, gates and expand fused per token). Where they do not
run, decode-shaped calls (T <= DECODE_MAX_TOKENS) expand through a dense [T, N] coefficient tile
in one GEMM into the base output.
"""

import torch
import torch.nn.functional as F

from smartfed_kernels.cpu import kernels as cpu_kernels
from smartfed_kernels.reference import routing_order
from smartfed_kernels.validation import check_more_inputs


def select_top_k(logits: torch.Tensor, top_k: int):
    """Indices and logits [T, k] of the k largest logits per row (unordered), ties to lower index.

    Matches a stable descending sort's first k: ``torch.topk`` picks an arbitrary member of a tie,
    so on CPU the rows where more than k logits reach the k-th value are redone with a stable sort.
    On CUDA and under torch.compile every row takes the stable sort: the repair reads counts back
    to the host, which would block CUDA graph capture and cannot be traced.
    """
    if logits.is_cuda or torch.compiler.is_compiling():
        indices = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
        return logits.gather(1, indices), indices
    values, indices = logits.topk(top_k, dim=-1, sorted=False)
    if top_k == logits.shape[-1] or logits.shape[0] == 0:
        return values, indices
    reached = logits >= values.amin(dim=-1, keepdim=True)
    if reached.sum() == top_k * logits.shape[0]:
        return values, indices
    tied_rows = (reached.sum(dim=-1) > top_k).nonzero().flatten()
    if tied_rows.numel():  # NaN logits can also break the count above, with no tie to fix
        order = torch.sort(logits[tied_rows], dim=-1, descending=True, stable=True).indices
        indices[tied_rows] = order[:, :top_k]
        values[tied_rows] = logits[tied_rows].gather(1, indices[tied_rows])
    return values, indices


def _routing_product(x2, router_weight, router_bias, expert_a, spec):
    """Router logits [T, N] (contiguous, for topk) and shrink values H [T, N]."""
    num_experts = spec.num_experts
    if spec.router == "linear":
        routed = x2 @ torch.cat([router_weight, expert_a]).t()
        logits, shrink = routed[:, :num_experts], routed[:, num_experts:]
        # Adding the bias is also the copy that makes the logits contiguous.
        return (logits.contiguous() if router_bias is None else logits + router_bias), shrink
    shrink = x2 @ expert_a.t()
    if router_bias is None:
        return shrink @ router_weight.t(), shrink
    return torch.addmm(router_bias, shrink, router_weight.t()), shrink


def _gates(logits, selected_logits, indices, gate):
    """Gates [T, k] on the selected experts and, for softmax_topk, the full softmax P [T, N]."""
    if gate == "topk_softmax":
        return torch.softmax(selected_logits, dim=-1), None
    probs = torch.softmax(logits, dim=-1)
    return probs.gather(1, indices), probs


def _expand_and_base(x2, weight, bias, expert_b, indices, coefficients):
    """``x2 W0^T + b0 + sum_j coefficients[:, j] B[:, indices[:, j]]`` as a fresh [T, d_out].

    The sparse expand runs first (embedding_bag over the rows of B^T; the bias rides along as
    one more row with coefficient 1), then the base GEMM accumulates onto it in place, so the
    output is written by the GEMM itself rather than by a separate add pass.
    """
    table = expert_b.t()
    if bias is not None:
        table = torch.cat([table, bias[None]])
        indices = torch.cat([indices, indices.new_full((indices.shape[0], 1), expert_b.shape[1])], dim=1)
        coefficients = torch.cat([coefficients, coefficients.new_ones(coefficients.shape[0], 1)], dim=1)
    # embedding_bag takes its fast (FBGEMM) kernel only for a contiguous table.
    out = F.embedding_bag(indices, table.contiguous(), per_sample_weights=coefficients, mode="sum")
    if weight is not None:
        out.addmm_(x2, weight.t())
    return out


# Up to this many tokens a call is decode-shaped: per-op overhead outweighs arithmetic, so the
# inference path takes the variant with the fewest ops (see more_inference).
DECODE_MAX_TOKENS = 64
# The dense expand multiplies T * (N - k) * d_out zero coefficients that embedding_bag skips; up
# to about this many its one GEMM still beats embedding_bag's fixed cost (2-core CPU, fp32).
DENSE_EXPAND_MAX_WASTE = 2 ** 17


def needs_autograd(tensors) -> bool:
    """Whether a call must record a graph: grad mode on and some input requiring a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _decode_forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec):
    """(y, indices, gates) for a few tokens in few ops; None where another path does better.

    With every expert selected (k = N) there is nothing to select. Otherwise the coefficients go
    into a dense [T, N] tile whose one GEMM accumulates into the base product, while the zeros it
    multiplies stay few (DENSE_EXPAND_MAX_WASTE).
    """
    tokens, top_k, num_experts = x2.shape[0], spec.top_k, spec.num_experts
    if tokens * (num_experts - top_k) * spec.d_out > DENSE_EXPAND_MAX_WASTE:
        return None
    shrink = F.linear(x2, expert_a)
    logits = F.linear(x2 if spec.router == "linear" else shrink, router_weight, router_bias)
    if top_k == num_experts:
        gates = torch.softmax(logits, dim=-1)
        coefficients = shrink * gates
        indices = torch.arange(num_experts, device=x2.device).expand(tokens, num_experts)
    else:
        values, indices = select_top_k(logits, top_k)
        if spec.gate == "topk_softmax":
            gates = torch.softmax(values, dim=-1)
        else:
            gates = torch.softmax(logits, dim=-1).gather(1, indices)
        coefficients = torch.zeros_like(shrink).scatter_(1, indices, gates).mul_(shrink)
    if weight is None:
        y = torch.mm(coefficients, expert_b.t()).mul_(spec.gamma)
    else:
        y = F.linear(x2, weight, bias).addmm_(coefficients, expert_b.t(), alpha=spec.gamma)
    return y, indices, gates


def _base_product(x2, weight, bias, spec):
    return x2.new_zeros(x2.shape[0], spec.d_out) if weight is None else F.linear(x2, weight, bias)


def _cpu_kernel_forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, with_routing):
    """(y, indices, gates) by the C kernels (smartfed_kernels.cpu), or None where they decline.

    The kernel selects, gates and adds the k chosen experts of each token onto the base product
    (F.linear, bias included) in one pass over the token's logits, computing A x for the k
    selected experts alone (the expert_space router needs all N: they come from the routing GEMM).
    One token computes its logits in the kernel too (one call instead of four GEMVs); more tokens
    take theirs from one GEMM, which the kernel reads in place and adds the router bias to.
    """
    tokens = x2.shape[0]
    if tokens == 1:
        y = _base_product(x2, weight, bias, spec)
        routing = cpu_kernels.one_token(x2, router_weight, router_bias, expert_a, expert_b, y, spec, with_routing)
        return None if routing is None else (y, *routing)
    # The routing GEMM goes first so that the base product, written last, is still in cache when
    # the kernel adds onto it.
    if spec.router == "linear":
        # Only the logits come from a GEMM: the kernel computes A x for the k selected experts of
        # each token alone (~0.1x of the base cheaper at d=576, N=64, k=8 than all N in the GEMM).
        logits = F.linear(x2, router_weight)
        y = _base_product(x2, weight, bias, spec)
        routing = cpu_kernels.route_expand(logits, router_bias, None, expert_b, y, spec, with_routing,
                                           x2=x2, expert_a=expert_a)
    else:
        logits, shrink = _routing_product(x2, router_weight, router_bias, expert_a, spec)
        y = _base_product(x2, weight, bias, spec)
        routing = cpu_kernels.route_expand(logits, None, shrink, expert_b, y, spec, with_routing)
    return None if routing is None else (y, *routing)


def more_inference(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, with_routing=True):
    """Forward alone, no autograd Function: (y [T, d_out], indices [T, k], gates [T, k]); without
    ``with_routing`` (the layer has no use for them) the last two may be None.

    On the CPU in fp32/fp64 the C kernels take the call (_cpu_kernel_forward). Elsewhere, or when
    they decline (no C compiler, a NaN or infinite logit), decode-shaped calls
    (T <= DECODE_MAX_TOKENS) take _decode_forward while its expand wastes little; otherwise topk
    (with tie repair) selects and embedding_bag expands the k chosen columns of B (T*k*d_out
    multiply-adds), onto which the base GEMM accumulates. Indices and gates come back unordered.
    """
    tokens, top_k = x2.shape[0], spec.top_k
    if cpu_kernels.supports(x2):
        result = _cpu_kernel_forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec,
                                     with_routing)
        if result is not None:
            return result
    if tokens <= DECODE_MAX_TOKENS:
        result = _decode_forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec)
        if result is not None:
            return result
    logits, shrink = _routing_product(x2, router_weight, router_bias, expert_a, spec)
    selected_logits, indices = select_top_k(logits, top_k)
    if spec.gate == "softmax_topk":
        gates = torch.softmax(logits, dim=-1).gather(1, indices)
    elif selected_logits.dtype in (torch.float16, torch.bfloat16):
        # (CUDA only: CPU computes in fp32) torch.softmax accumulates half inputs in fp32.
        gates = torch.softmax(selected_logits, dim=-1)
    else:
        # torch.softmax over rows of k ~ 8 runs ~4x slower on CPU than these row-wise ops.
        gates = selected_logits.sub_(selected_logits.amax(dim=-1, keepdim=True)).exp_()
        gates.div_(gates.sum(dim=-1, keepdim=True))
    coefficients = gates * shrink.gather(1, indices)
    coefficients.mul_(spec.gamma)
    # embedding_bag takes its fast (FBGEMM) kernel only for a contiguous table; MoRELinear keeps
    # B column-major so that this is free.
    y = F.embedding_bag(indices, expert_b.t().contiguous(), per_sample_weights=coefficients, mode="sum")
    if weight is not None:
        y.addmm_(x2, weight.t())
        if bias is not None:
            y.add_(bias)
    return y, indices, gates


class MoRELinearFunction(torch.autograd.Function):
    """Autograd for the sparse-expand path; backward follows the formulas in the module docstring."""

    @staticmethod
    def forward(ctx, x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec):
        logits, shrink = _routing_product(x2, router_weight, router_bias, expert_a, spec)
        selected_logits, indices = select_top_k(logits, spec.top_k)
        gates, probs = _gates(logits, selected_logits, indices, spec.gate)
        coefficients = gates * shrink.gather(1, indices)
        coefficients.mul_(spec.gamma)
        y = _expand_and_base(x2, weight, bias, expert_b, indices, coefficients)
        ctx.spec = spec
        ctx.save_for_backward(x2, weight, router_weight, expert_a, expert_b, shrink, indices, gates, probs)
        ctx.mark_non_differentiable(indices, gates)
        return y, indices, gates

    @staticmethod
    def backward(ctx, grad_y, _grad_indices, _grad_gates):
        x2, weight, router_weight, expert_a, expert_b, shrink, indices, gates, probs = ctx.saved_tensors
        spec = ctx.spec
        needs = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        gamma = spec.gamma

        per_expert = (grad_y @ expert_b).gather(1, indices)
        selected_shrink = shrink.gather(1, indices)
        grad_gate = per_expert * selected_shrink * gamma
        weighted_gate = gates * grad_gate
        weighted = weighted_gate.sum(dim=-1, keepdim=True)
        if spec.gate == "topk_softmax":
            grad_logits = torch.zeros_like(shrink).scatter_(1, indices, weighted_gate - gates * weighted)
        else:
            grad_logits = (probs * -weighted).scatter_add_(1, indices, weighted_gate)
        grad_shrink = torch.zeros_like(shrink).scatter_(1, indices, per_expert * gates * gamma)

        grad_x = grad_weight = grad_bias = grad_router_w = grad_router_b = grad_a = grad_b = None
        if spec.router == "linear":
            grad_shrink_total = grad_shrink
            if needs[0]:
                coeff = torch.cat([grad_logits, grad_shrink], dim=1)
                grad_x = coeff @ torch.cat([router_weight, expert_a], dim=0)
            if needs[3]:
                grad_router_w = grad_logits.t() @ x2
        else:
            grad_shrink_total = grad_shrink.addmm_(grad_logits, router_weight)
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
            coefficients = torch.zeros_like(shrink).scatter_(1, indices, gates * selected_shrink)
            grad_b = (grad_y.t() @ coefficients).mul_(gamma)
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
    args = [x2, weight, bias, router_weight, router_bias, expert_a, expert_b]
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        # CPU half GEMMs are slow and accumulate poorly; compute in fp32 and cast back.
        args = [t if t is None else t.float() for t in args]
    if needs_autograd(args):
        y, indices, gates = MoRELinearFunction.apply(*args, spec)
    else:
        y, indices, gates = more_inference(*args, spec, with_routing=return_routing)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if x.dim() != 2:
        y = y.reshape(*lead_shape, spec.d_out)
    if not return_routing:
        return y
    indices, gates = routing_order(indices, gates)
    return y, indices.reshape(*lead_shape, spec.top_k), gates.reshape(*lead_shape, spec.top_k)
