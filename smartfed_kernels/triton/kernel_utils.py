"""Shared ``@triton.jit`` helpers of the MoRE kernels (tile loads, products, top-k steps).

Conventions of every helper: ``rows`` are int64 token indices of the tile with ``row_ok`` their
mask; expert columns ``experts`` (int32) with ``expert_ok``; every product accumulates in fp32.
"""

import triton
import triton.language as tl

from smartfed_kernels.forms import GATE_FORMS

# Larger than any expert index: the "no expert" marker of an empty top-k slot.
NO_EXPERT = tl.constexpr(2**30)
# Values of the kernels' GATE constexpr: the codes of smartfed_kernels.forms.
GATE_TOPK_SOFTMAX = tl.constexpr(GATE_FORMS["topk_softmax"].code)
GATE_SOFTMAX_TOPK = tl.constexpr(GATE_FORMS["softmax_topk"].code)


@triton.jit
def shrink_and_logits_chunk(
    x_ptr, stride_xt, stride_xk,
    a_ptr, stride_a0, stride_a1,
    wr_ptr, stride_wr0, stride_wr1,
    rows, row_ok, experts, expert_ok, d_in,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    WITH_ROUTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``(X A^T, X Wr^T)`` for one token tile and one expert chunk: x is read once for both.

    The two products are the stacked ``X [A; Wr]^T`` of docs/design.md §4.4, split so each half lands in
    its own accumulator. Without ``WITH_ROUTER`` (expert_space router) the second is zeros.
    """
    shrink = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < d_in
        x_tile = tl.load(
            x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xk,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )
        tile_mask = col_ok[:, None] & expert_ok[None, :]
        a_tile = tl.load(
            a_ptr + experts[None, :] * stride_a0 + cols[:, None] * stride_a1, mask=tile_mask, other=0.0
        )
        shrink = tl.dot(x_tile, a_tile, shrink, input_precision=DOT_PRECISION)
        if WITH_ROUTER:
            wr_tile = tl.load(
                wr_ptr + experts[None, :] * stride_wr0 + cols[:, None] * stride_wr1, mask=tile_mask, other=0.0
            )
            logits = tl.dot(x_tile, wr_tile, logits, input_precision=DOT_PRECISION)
    return shrink, logits


@triton.jit
def expert_space_logits_chunk(
    shrink_all_ptr, wr_ptr, stride_wr0, stride_wr1,
    rows, row_ok, experts, expert_ok, num_experts,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``a Wr^T`` for an expert chunk, from the fp32 shrink values ``a`` [T, N] in global memory.

    Kept in IEEE fp32: the logits decide the top-k set, and rounding ``a`` to fp16/bf16 would
    flip near-ties against the reference, which computes them in fp32.
    """
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for r0 in range(0, num_experts, BLOCK_R):
        inner = r0 + tl.arange(0, BLOCK_R)
        inner_ok = inner < num_experts
        a_tile = tl.load(
            shrink_all_ptr + rows[:, None] * num_experts + inner[None, :],
            mask=row_ok[:, None] & inner_ok[None, :], other=0.0,
        )
        wr_tile = tl.load(
            wr_ptr + experts[None, :] * stride_wr0 + inner[:, None] * stride_wr1,
            mask=inner_ok[:, None] & expert_ok[None, :], other=0.0,
        ).to(tl.float32)
        logits = tl.dot(a_tile, wr_tile, logits, input_precision="ieee")
    return logits


@triton.jit
def pick_largest(remaining, keys):
    """Per row, the largest value of ``remaining`` and the smallest key among its ties."""
    best = tl.max(remaining, axis=1)
    key = tl.min(tl.where(remaining == best[:, None], keys, NO_EXPERT), axis=1)
    return best, key


@triton.jit
def column(values, slots, j):
    """Column ``j`` of a [rows, slots] register tile (``slots`` is the arange of its columns)."""
    return tl.sum(tl.where(slots[None, :] == j, values, 0), axis=1)


@triton.jit
def selected_coefficients(
    index_ptr, gate_ptr, shrink_ptr, rows, row_ok, experts, top_k,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Dense gates G and shrink values H over an expert chunk, from the saved [T, k] routing."""
    gates = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    shrink = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for j in range(top_k):
        index = tl.load(index_ptr + rows * top_k + j, mask=row_ok, other=NO_EXPERT)
        hit = experts[None, :] == index[:, None]
        gate = tl.load(gate_ptr + rows * top_k + j, mask=row_ok, other=0.0)
        value = tl.load(shrink_ptr + rows * top_k + j, mask=row_ok, other=0.0)
        gates = tl.where(hit, gate[:, None], gates)
        shrink = tl.where(hit, value[:, None], shrink)
    return gates, shrink


@triton.jit
def add_into_output(y_ptr, stride_yt, stride_yd, rows, row_ok, cols, col_ok, delta, accumulate):
    """Store the fp32 tile ``delta`` into ``y`` in y's dtype, onto what y holds when ``accumulate``."""
    pointers = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yd
    mask = row_ok[:, None] & col_ok[None, :]
    if accumulate:
        delta += tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, delta.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def split_rows(split, tokens_per_split, offset, num_tokens, BLOCK_T: tl.constexpr):
    """Token rows ``offset .. offset + BLOCK_T`` of token split ``split`` and their mask: inside
    the split and inside the tokens."""
    lanes = offset + tl.arange(0, BLOCK_T)
    rows = (split * tokens_per_split + lanes).to(tl.int64)
    return rows, (rows < num_tokens) & (lanes < tokens_per_split)
