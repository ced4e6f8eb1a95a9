"""Fast PyTorch MoRE path for CPU (and any device without Triton): big GEMMs, a sparse expand.

Forward, per flattened token block X [T, d_in] (gate and router maths: smartfed_kernels.forms):

    H       = X @ A^T                                  shrink values [T, N]
    L       = X @ Wr^T + br                            router="linear" (reads x)
    L       = H @ Wr^T + br                            router="expert_space" (reads H)
    I, L_I  = top-k of L [T, k] (ties to the lower index)
    g       = softmax(L_I)                             gate="topk_softmax"
    g       = P[I], P = softmax(L)                     gate="softmax_topk"
    c       = gamma * g * H[I]                         [T, k]
    Y       = sum_j c[:, j] B[:, I[:, j]]^T + b0       sparse expand (embedding_bag over B^T)
    Y      += X @ W0^T                                 the base GEMM accumulates in place

The expand reads only the k selected columns of B per token (T*k*d_out multiply-adds instead of
a dense-masked T*N*d_out), the bias rides along as one more row of the embedding table, and the
base GEMM adds onto the expand's output with beta=1, so no pass over Y is spent on adds or
copies. Where the dense [T, N] coefficient tile wastes few multiply-adds on zeros (decode sizes,
DENSE_EXPAND_MAX_WASTE) it is one GEMM into the base product instead. ``torch.topk`` breaks ties
arbitrarily, so rows whose k-th logit ties with an unselected one are re-selected by a stable
sort; only those rows pay for it.

Backward with gY [T, d_out] (A and B frozen unless they require grad), u = gY . B[:, I]:

    dg  = gamma * H[I] * u,  dh = gamma * g * u                        [T, k]
    dL  = the gate form's logits_grad(g * dg)                          [T, N]
    dH  = scatter(I, dh) (+ dL @ Wr when the router reads H)           [T, N]
    dX  = gY @ W0 + dH @ A (+ dL @ Wr when the router reads x)
    dWr = dL^T input, dbr = colsum(dL); dA = dH^T X; dB = gY^T scatter(I, c)

The autograd Function saves X, H [T, N], I and g [T, k] (and what the gate form keeps, e.g. P),
so backward never re-runs the router. A call that needs no gradient (grad mode off, or no input
requiring one) skips it: :func:`more_inference` is the one CPU inference path -- the C kernels of
:mod:`smartfed_kernels.cpu` where they run, and the same PyTorch forward as the autograd
Function where they do not.
"""

import torch
import torch.nn.functional as F

from smartfed_kernels.cpu import kernels as cpu_kernels
from smartfed_kernels.forms import gate_form, router_form
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


# The dense expand multiplies T * (N - k) * d_out zero coefficients that embedding_bag skips; up
# to about this many its one GEMM still beats embedding_bag's fixed cost (2-core CPU, fp32).
DENSE_EXPAND_MAX_WASTE = 2 ** 17


def _expand_and_base(x2, weight, bias, expert_b, indices, coefficients):
    """``x2 W0^T + b0 + sum_j coefficients[:, j] B[:, indices[:, j]]`` as a fresh [T, d_out].

    Few tokens (little waste on zeros): the coefficients scattered into a dense [T, N] tile, one
    GEMM onto the base product. Otherwise the sparse expand runs first (embedding_bag over the
    rows of B^T; the bias rides along as one more row with coefficient 1), then the base GEMM
    accumulates onto it in place, so the output is written by the GEMM itself rather than by a
    separate add pass.
    """
    tokens, num_experts = coefficients.shape[0], expert_b.shape[1]
    if tokens * (num_experts - indices.shape[1]) * expert_b.shape[0] <= DENSE_EXPAND_MAX_WASTE:
        dense = coefficients.new_zeros(tokens, num_experts).scatter_(1, indices, coefficients)
        if weight is None:
            return torch.mm(dense, expert_b.t())
        return F.linear(x2, weight, bias).addmm_(dense, expert_b.t())
    table = expert_b.t()
    if bias is not None:
        table = torch.cat([table, bias[None]])
        indices = torch.cat([indices, indices.new_full((indices.shape[0], 1), num_experts)], dim=1)
        coefficients = torch.cat([coefficients, coefficients.new_ones(coefficients.shape[0], 1)], dim=1)
    # embedding_bag takes its fast (FBGEMM) kernel only for a contiguous table; MoRELinear keeps
    # B column-major so that this is free.
    out = F.embedding_bag(indices, table.contiguous(), per_sample_weights=coefficients, mode="sum")
    if weight is not None:
        out.addmm_(x2, weight.t())
    return out


def _forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec):
    """The PyTorch forward of the module docstring: (y, indices, gates, shrink, what the gate keeps)."""
    shrink = F.linear(x2, expert_a)
    logits = F.linear(router_form(spec.router).input(x2, shrink), router_weight, router_bias)
    selected_logits, indices = select_top_k(logits, spec.top_k)
    gates, gate_saved = gate_form(spec.gate).gates(logits, selected_logits, indices)
    coefficients = (gates * shrink.gather(1, indices)).mul_(spec.gamma)
    y = _expand_and_base(x2, weight, bias, expert_b, indices, coefficients)
    return y, indices, gates, shrink, gate_saved


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def needs_autograd(tensors) -> bool:
    """Whether a call must record a graph: grad mode on and some input requiring a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def more_inference(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, with_routing=True):
    """The CPU inference path (and the forward of any call that needs no graph): (y [T, d_out],
    indices [T, k], gates [T, k]), unordered; without ``with_routing`` (the layer has no use for
    them) the last two may be None.

    On the CPU in fp32/fp64 the C kernels take the call (smartfed_kernels.cpu.kernels.forward).
    Elsewhere, or when they decline (no C compiler, a NaN or infinite logit), the PyTorch forward
    the autograd Function runs answers.
    """
    if cpu_kernels.supports(x2):
        result = cpu_kernels.forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec,
                                     with_routing)
        if result is not None:
            return result
    return _forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec)[:3]


class MoRELinearFunction(torch.autograd.Function):
    """Autograd for the sparse-expand path; backward follows the formulas in the module docstring."""

    @staticmethod
    def forward(ctx, x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec):
        y, indices, gates, shrink, gate_saved = _forward(x2, weight, bias, router_weight, router_bias, expert_a,
                                                         expert_b, spec)
        ctx.spec = spec
        ctx.save_for_backward(x2, weight, router_weight, expert_a, expert_b, shrink, indices, gates, gate_saved)
        ctx.mark_non_differentiable(indices, gates)
        return y, indices, gates

    @staticmethod
    def backward(ctx, grad_y, _grad_indices, _grad_gates):
        x2, weight, router_weight, expert_a, expert_b, shrink, indices, gates, gate_saved = ctx.saved_tensors
        spec = ctx.spec
        router = router_form(spec.router)
        needs = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        gamma = spec.gamma

        per_expert = (grad_y @ expert_b).gather(1, indices)
        selected_shrink = shrink.gather(1, indices)
        weighted_gate = gates * per_expert * selected_shrink * gamma
        grad_logits = gate_form(spec.gate).logits_grad(weighted_gate, gates, gate_saved, indices, shrink)
        grad_shrink = torch.zeros_like(shrink).scatter_(1, indices, per_expert * gates * gamma)
        if router.reads_shrink:
            grad_shrink.addmm_(grad_logits, router_weight)

        grad_x = grad_weight = grad_bias = grad_router_w = grad_router_b = grad_a = grad_b = None
        if needs[0]:
            grad_x = grad_shrink @ expert_a
            if not router.reads_shrink:
                grad_x.addmm_(grad_logits, router_weight)
            if weight is not None:
                grad_x.addmm_(grad_y, weight)
        if needs[1]:
            grad_weight = grad_y.t() @ x2
        if needs[2]:
            grad_bias = grad_y.sum(dim=0)
        if needs[3]:
            grad_router_w = grad_logits.t() @ router.input(x2, shrink)
        if needs[4]:
            grad_router_b = grad_logits.sum(dim=0)
        if needs[5]:
            grad_a = grad_shrink.t() @ x2
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
    """Fast path on already validated inputs (the dispatcher validates once for all backends).

    Written for the per-call cost at decode sizes: a 2-D x is used as it is (a reshape costs
    about a microsecond), and the CPU is asked for by attribute rather than through a device.
    """
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, spec.d_in)
    args = [x2, weight, bias, router_weight, router_bias, expert_a, expert_b]
    if x.is_cpu and x.dtype in _HALF_DTYPES:
        # CPU half GEMMs are slow and accumulate poorly; compute in fp32 and cast back.
        args = [t if t is None else t.float() for t in args]
    if needs_autograd(args):
        y, indices, gates = MoRELinearFunction.apply(*args, spec)
    else:
        y, indices, gates = more_inference(*args, spec, with_routing=return_routing)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if not flat:
        y = y.reshape(*x.shape[:-1], spec.d_out)
    if not return_routing:
        return y
    lead_shape = x.shape[:-1]
    indices, gates = routing_order(indices, gates)
    return y, indices.reshape(*lead_shape, spec.top_k), gates.reshape(*lead_shape, spec.top_k)
