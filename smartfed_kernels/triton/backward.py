"""MoRE backward kernels (docs/design.md §2.4), in three stages.

1. ``routing_grad_kernel`` (grid: token tiles) turns ``gy`` and the saved routing into the two
   fp32 [T, N] coefficient tiles every gradient needs: ``dz`` (logits) and ``dh`` (shrink values,
   including the expert_space router's ``dz Wr``). Experts are visited in ``BLOCK_E`` chunks, so
   one compiled kernel serves every N.
2. ``input_grad_kernel`` (grid: token tiles x d_in tiles): ``dx += [dz | dh] [Wr; A]``
   (``dh A`` alone for the expert_space router), added into ``gy W0`` computed by cuBLAS.
3. ``rows_grad_kernel`` (grid: expert tiles x column tiles x token splits): ``dz^T X`` (router
   weight), ``dh^T X`` (A) and the column sums of ``dz`` (router bias), x read once for all;
   ``expert_b_grad_kernel``: ``dB = gamma gy^T (G * H)`` with G * H scattered from the [T, k]
   routing. Token splits write fp32 partial sums that the launcher adds (deterministic).
"""

import triton
import triton.language as tl

from smartfed_kernels.triton.kernel_utils import (
    GATE_SOFTMAX_TOPK,
    GATE_TOPK_SOFTMAX,
    add_into_output,
    selected_coefficients,
    split_rows,
)


@triton.jit
def routing_grad_kernel(
    gy_ptr, stride_gt, stride_gd,
    b_ptr, stride_b_out, stride_b_expert,
    wr_ptr, stride_wr0, stride_wr1,
    index_ptr, gate_ptr, shrink_ptr, logits_ptr, lse_ptr,
    dz_ptr, dh_ptr,
    num_tokens, d_out, num_experts, top_k, gamma,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
    ROUTER_LINEAR: tl.constexpr, GATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < num_tokens
    lanes = tl.arange(0, BLOCK_E)

    # u = gy B for every expert, parked in dh until the gate sum w is known.
    for e0 in range(0, num_experts, BLOCK_E):
        experts = e0 + lanes
        expert_ok = experts < num_experts
        u = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for d0 in range(0, d_out, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d_out
            gy_tile = tl.load(
                gy_ptr + rows[:, None] * stride_gt + cols[None, :] * stride_gd,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0,
            )
            b_tile = tl.load(
                b_ptr + cols[:, None] * stride_b_out + experts[None, :] * stride_b_expert,
                mask=col_ok[:, None] & expert_ok[None, :], other=0.0,
            )
            u = tl.dot(gy_tile, b_tile, u, input_precision=DOT_PRECISION)
        tl.store(dh_ptr + rows[:, None] * num_experts + experts[None, :], u,
                 mask=row_ok[:, None] & expert_ok[None, :])
    tl.debug_barrier()

    # w = sum_{j in S} g_j dg_j with dg_j = gamma h_j u_j.
    weighted = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in range(top_k):
        saved = rows * top_k + j
        expert = tl.load(index_ptr + saved, mask=row_ok, other=0)
        gate = tl.load(gate_ptr + saved, mask=row_ok, other=0.0)
        shrink = tl.load(shrink_ptr + saved, mask=row_ok, other=0.0)
        u = tl.load(dh_ptr + rows * num_experts + expert, mask=row_ok, other=0.0)
        weighted += gate * shrink * u
    weighted = weighted * gamma
    if GATE == GATE_SOFTMAX_TOPK:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)

    for e0 in range(0, num_experts, BLOCK_E):
        experts = e0 + lanes
        expert_ok = experts < num_experts
        tile = rows[:, None] * num_experts + experts[None, :]
        tile_ok = row_ok[:, None] & expert_ok[None, :]
        u = tl.load(dh_ptr + tile, mask=tile_ok, other=0.0)
        gates, shrink = selected_coefficients(
            index_ptr, gate_ptr, shrink_ptr, rows, row_ok, experts, top_k, BLOCK_T, BLOCK_E
        )
        grad_gate = gamma * shrink * u
        grad_shrink = gamma * gates * u
        if GATE == GATE_TOPK_SOFTMAX:
            grad_logits = gates * (grad_gate - weighted[:, None])
        else:  # GATE_SOFTMAX_TOPK
            logits = tl.load(logits_ptr + tile, mask=tile_ok, other=float("-inf"))
            grad_logits = tl.exp(logits - lse[:, None]) * (grad_gate - weighted[:, None])
        # u is read by every thread before any thread overwrites it with dh.
        tl.debug_barrier()
        tl.store(dz_ptr + tile, grad_logits, mask=tile_ok)
        tl.store(dh_ptr + tile, grad_shrink, mask=tile_ok)

    if not ROUTER_LINEAR:
        # expert_space: dh += dz Wr over all experts (z = Wr a), in IEEE fp32.
        tl.debug_barrier()
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            expert_ok = experts < num_experts
            tile = rows[:, None] * num_experts + experts[None, :]
            tile_ok = row_ok[:, None] & expert_ok[None, :]
            extra = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
            for r0 in range(0, num_experts, BLOCK_R):
                inner = r0 + tl.arange(0, BLOCK_R)
                inner_ok = inner < num_experts
                dz_tile = tl.load(dz_ptr + rows[:, None] * num_experts + inner[None, :],
                                  mask=row_ok[:, None] & inner_ok[None, :], other=0.0)
                wr_tile = tl.load(
                    wr_ptr + inner[:, None] * stride_wr0 + experts[None, :] * stride_wr1,
                    mask=inner_ok[:, None] & expert_ok[None, :], other=0.0,
                ).to(tl.float32)
                extra = tl.dot(dz_tile, wr_tile, extra, input_precision="ieee")
            grad_shrink = tl.load(dh_ptr + tile, mask=tile_ok, other=0.0)
            tl.store(dh_ptr + tile, grad_shrink + extra, mask=tile_ok)


@triton.jit
def input_grad_kernel(
    dz_ptr, dh_ptr,
    wr_ptr, stride_wr0, stride_wr1,
    a_ptr, stride_a0, stride_a1,
    dx_ptr, stride_dxt, stride_dxk, accumulate,
    num_tokens, d_in, num_experts,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    ROUTER_LINEAR: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < num_tokens
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < d_in
    operand_type = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for e0 in range(0, num_experts, BLOCK_E):
        experts = e0 + tl.arange(0, BLOCK_E)
        expert_ok = experts < num_experts
        coeff_mask = row_ok[:, None] & expert_ok[None, :]
        rows_mask = expert_ok[:, None] & col_ok[None, :]
        coeff = rows[:, None] * num_experts + experts[None, :]
        dh_tile = tl.load(dh_ptr + coeff, mask=coeff_mask, other=0.0).to(operand_type)
        a_tile = tl.load(a_ptr + experts[:, None] * stride_a0 + cols[None, :] * stride_a1,
                         mask=rows_mask, other=0.0)
        acc = tl.dot(dh_tile, a_tile, acc, input_precision=DOT_PRECISION)
        if ROUTER_LINEAR:
            dz_tile = tl.load(dz_ptr + coeff, mask=coeff_mask, other=0.0).to(operand_type)
            wr_tile = tl.load(wr_ptr + experts[:, None] * stride_wr0 + cols[None, :] * stride_wr1,
                              mask=rows_mask, other=0.0)
            acc = tl.dot(dz_tile, wr_tile, acc, input_precision=DOT_PRECISION)
    add_into_output(dx_ptr, stride_dxt, stride_dxk, rows, row_ok, cols, col_ok, acc, accumulate)


@triton.jit
def rows_grad_kernel(
    inputs_ptr, stride_it, stride_ik,
    first_ptr, second_ptr,
    first_out_ptr, second_out_ptr, bias_out_ptr,
    num_tokens, width, num_experts, tokens_per_split,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    WITH_SECOND: tl.constexpr, WITH_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial sums over one token split of ``first^T X`` (and ``second^T X``, colsum(first))."""
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    experts = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < width
    operand_type = inputs_ptr.dtype.element_ty
    acc_first = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
    acc_second = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
    bias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for t0 in range(0, tokens_per_split, BLOCK_T):
        rows, row_ok = split_rows(pid_s, tokens_per_split, t0, num_tokens, BLOCK_T)
        x_tile = tl.load(inputs_ptr + rows[:, None] * stride_it + cols[None, :] * stride_ik,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # Coefficients are loaded transposed, [experts, tokens], straight into the product.
        coeff = rows[None, :] * num_experts + experts[:, None]
        coeff_mask = expert_ok[:, None] & row_ok[None, :]
        first = tl.load(first_ptr + coeff, mask=coeff_mask, other=0.0)
        acc_first = tl.dot(first.to(operand_type), x_tile, acc_first, input_precision=DOT_PRECISION)
        if WITH_BIAS:
            bias += tl.sum(first, axis=1)
        if WITH_SECOND:
            second = tl.load(second_ptr + coeff, mask=coeff_mask, other=0.0)
            acc_second = tl.dot(second.to(operand_type), x_tile, acc_second, input_precision=DOT_PRECISION)
    out = pid_s * num_experts * width + experts[:, None] * width + cols[None, :]
    out_mask = expert_ok[:, None] & col_ok[None, :]
    tl.store(first_out_ptr + out, acc_first, mask=out_mask)
    if WITH_SECOND:
        tl.store(second_out_ptr + out, acc_second, mask=out_mask)
    if WITH_BIAS:
        tl.store(bias_out_ptr + pid_s * num_experts + experts, bias, mask=expert_ok & ((experts * 0 + pid_k) == 0))


@triton.jit
def expert_b_grad_kernel(
    gy_ptr, stride_gt, stride_gd,
    index_ptr, gate_ptr, shrink_ptr,
    out_ptr,
    num_tokens, d_out, num_experts, top_k, gamma, tokens_per_split,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial ``gamma gy^T (G * H)`` [d_out, N] over one token split."""
    pid_d = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d_out
    experts = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    operand_type = gy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    for t0 in range(0, tokens_per_split, BLOCK_T):
        rows, row_ok = split_rows(pid_s, tokens_per_split, t0, num_tokens, BLOCK_T)
        gy_tile = tl.load(gy_ptr + cols[:, None] * stride_gd + rows[None, :] * stride_gt,
                          mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        gates, shrink = selected_coefficients(
            index_ptr, gate_ptr, shrink_ptr, rows, row_ok, experts, top_k, BLOCK_T, BLOCK_E
        )
        coefficients = (gates * shrink).to(operand_type)
        acc = tl.dot(gy_tile, coefficients, acc, input_precision=DOT_PRECISION)
    out = pid_s * d_out * num_experts + cols[:, None] * num_experts + experts[None, :]
    tl.store(out_ptr + out, acc * gamma, mask=col_ok[:, None] & expert_ok[None, :])
