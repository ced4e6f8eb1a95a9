"""Fused MoRE forward kernel: router, shrink, top-k, gates and expand in one pass per token tile.

Grid ``(token tiles, output splits)``. Each program owns ``BLOCK_T`` tokens and a slice of
``cols_per_split`` output columns; it routes its tokens (redundantly across splits, which only
buys parallelism for small T: A and Wr stay in L2) and adds the gated expand into its slice.
Only programs of split 0 write the saved routing.

Layouts (``DENSE`` constexpr):
  dense-in-tile  all N experts in one ``BLOCK_E`` tile; top-k by k max-passes over the tile;
                 expand is one tensor-core product of the dense coefficient tile with B.
  streaming      experts in ``BLOCK_E`` chunks with a running top-k of ``K_MAX`` slots; the
                 expand gathers only the k selected columns of B (passed as B^T rows).
Saved for backward: indices, gates, selected shrink values [T, k]; for the expert_space router
all shrink values [T, N] (its router gradient needs them); for softmax_topk the logits [T, N]
and their log-sum-exp [T] (its gate gradient reaches every expert).
"""

import triton
import triton.language as tl

from smartfed_kernels.triton.kernel_utils import (
    GATE_SOFTMAX_TOPK,
    GATE_TOPK_SOFTMAX,
    NO_EXPERT,
    add_into_output,
    column,
    expert_space_logits_chunk,
    pick_largest,
    shrink_and_logits_chunk,
)


@triton.jit
def _chunk_logits(
    x_ptr, stride_xt, stride_xk, a_ptr, stride_a0, stride_a1, wr_ptr, stride_wr0, stride_wr1,
    br_ptr, has_router_bias, shrink_all_ptr,
    rows, row_ok, experts, expert_ok, d_in, num_experts,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ROUTER_LINEAR: tl.constexpr, SHRINK_STORED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Shrink values and masked logits (``-inf`` outside the pool) of one expert chunk."""
    if ROUTER_LINEAR:
        shrink, logits = shrink_and_logits_chunk(
            x_ptr, stride_xt, stride_xk, a_ptr, stride_a0, stride_a1, wr_ptr, stride_wr0, stride_wr1,
            rows, row_ok, experts, expert_ok, d_in, BLOCK_T, BLOCK_E, BLOCK_K, True, DOT_PRECISION,
        )
    else:
        if SHRINK_STORED:
            shrink = tl.load(
                shrink_all_ptr + rows[:, None] * num_experts + experts[None, :],
                mask=row_ok[:, None] & expert_ok[None, :], other=0.0,
            )
        else:
            shrink, _unused = shrink_and_logits_chunk(
                x_ptr, stride_xt, stride_xk, a_ptr, stride_a0, stride_a1, wr_ptr, stride_wr0, stride_wr1,
                rows, row_ok, experts, expert_ok, d_in, BLOCK_T, BLOCK_E, BLOCK_K, False, DOT_PRECISION,
            )
            tl.store(
                shrink_all_ptr + rows[:, None] * num_experts + experts[None, :], shrink,
                mask=row_ok[:, None] & expert_ok[None, :],
            )
            tl.debug_barrier()
        logits = expert_space_logits_chunk(
            shrink_all_ptr, wr_ptr, stride_wr0, stride_wr1, rows, row_ok, experts, expert_ok,
            num_experts, BLOCK_T, BLOCK_E, BLOCK_R,
        )
    if has_router_bias:
        bias = tl.load(br_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)
        logits += bias[None, :]
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    return shrink, logits


@triton.jit
def more_forward_kernel(
    x_ptr, stride_xt, stride_xk,
    wr_ptr, stride_wr0, stride_wr1,
    br_ptr, has_router_bias,
    a_ptr, stride_a0, stride_a1,
    b_ptr, stride_b_out, stride_b_expert,
    y_ptr, stride_yt, stride_yd, accumulate,
    index_ptr, gate_ptr, shrink_ptr,
    shrink_all_ptr, logits_ptr, lse_ptr,
    num_tokens, d_in, d_out, num_experts, top_k, gamma, cols_per_split,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, K_MAX: tl.constexpr,
    DENSE: tl.constexpr, ROUTER_LINEAR: tl.constexpr, GATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < num_tokens
    save_ok = row_ok & ((rows * 0 + pid_d) == 0)
    lanes = tl.arange(0, BLOCK_E)
    out_begin = pid_d * cols_per_split

    if DENSE:
        expert_ok = lanes < num_experts
        shrink, logits = _chunk_logits(
            x_ptr, stride_xt, stride_xk, a_ptr, stride_a0, stride_a1, wr_ptr, stride_wr0, stride_wr1,
            br_ptr, has_router_bias, shrink_all_ptr, rows, row_ok, lanes, expert_ok, d_in, num_experts,
            BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_R, ROUTER_LINEAR, False, DOT_PRECISION,
        )
        top = tl.max(logits, axis=1)
        if GATE == GATE_TOPK_SOFTMAX:
            shift = top
        else:  # GATE_SOFTMAX_TOPK
            shift = top + tl.log(tl.sum(tl.exp(logits - top[:, None]), axis=1))
            tl.store(
                logits_ptr + rows[:, None] * num_experts + lanes[None, :], logits,
                mask=save_ok[:, None] & expert_ok[None, :],
            )
            tl.store(lse_ptr + rows, shift, mask=save_ok)
        remaining = logits
        selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in range(top_k):
            best, expert = pick_largest(remaining, lanes[None, :])
            hit = lanes[None, :] == expert[:, None]
            selected = tl.where(hit, 1, selected)
            remaining = tl.where(hit, float("-inf"), remaining)
            weight = tl.exp(best - shift)
            total += weight
            saved = rows * top_k + j
            tl.store(index_ptr + saved, expert, mask=save_ok)
            tl.store(gate_ptr + saved, weight, mask=save_ok)
            tl.store(shrink_ptr + saved, tl.sum(tl.where(hit, shrink, 0.0), axis=1), mask=save_ok)
        gates = tl.where(selected != 0, tl.exp(logits - shift[:, None]), 0.0)
        if GATE == GATE_TOPK_SOFTMAX:
            gates = gates / total[:, None]
            # The gates stored in the loop lacked the normaliser; every thread must see them
            # written before they are rescaled in place.
            tl.debug_barrier()
            for j in range(top_k):
                saved = rows * top_k + j
                weight = tl.load(gate_ptr + saved, mask=save_ok, other=0.0)
                tl.store(gate_ptr + saved, weight / total, mask=save_ok)
        coefficients = (gates * shrink * gamma).to(b_ptr.dtype.element_ty)
        for d0 in range(0, cols_per_split, BLOCK_D):
            cols = out_begin + d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d_out
            b_tile = tl.load(
                b_ptr + cols[None, :] * stride_b_out + lanes[:, None] * stride_b_expert,
                mask=expert_ok[:, None] & col_ok[None, :], other=0.0,
            )
            delta = tl.dot(coefficients, b_tile, input_precision=DOT_PRECISION)
            add_into_output(y_ptr, stride_yt, stride_yd, rows, row_ok, cols, col_ok, delta, accumulate)
    else:
        slots = tl.arange(0, K_MAX)
        best_logits = tl.full((BLOCK_T, K_MAX), float("-inf"), tl.float32)
        best_experts = tl.full((BLOCK_T, K_MAX), NO_EXPERT, tl.int32)
        best_shrink = tl.zeros((BLOCK_T, K_MAX), dtype=tl.float32)
        run_max = tl.full((BLOCK_T,), -3.0e38, tl.float32)
        run_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if not ROUTER_LINEAR:
            # The expert_space logits need every shrink value before the first chunk's logits.
            for e0 in range(0, num_experts, BLOCK_E):
                experts = e0 + lanes
                expert_ok = experts < num_experts
                shrink, _unused = shrink_and_logits_chunk(
                    x_ptr, stride_xt, stride_xk, a_ptr, stride_a0, stride_a1, wr_ptr, stride_wr0,
                    stride_wr1, rows, row_ok, experts, expert_ok, d_in, BLOCK_T, BLOCK_E, BLOCK_K,
                    False, DOT_PRECISION,
                )
                tl.store(
                    shrink_all_ptr + rows[:, None] * num_experts + experts[None, :], shrink,
                    mask=row_ok[:, None] & expert_ok[None, :],
                )
            tl.debug_barrier()
        for e0 in range(0, num_experts, BLOCK_E):
            experts = e0 + lanes
            expert_ok = experts < num_experts
            shrink, logits = _chunk_logits(
                x_ptr, stride_xt, stride_xk, a_ptr, stride_a0, stride_a1, wr_ptr, stride_wr0, stride_wr1,
                br_ptr, has_router_bias, shrink_all_ptr, rows, row_ok, experts, expert_ok, d_in,
                num_experts, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_R, ROUTER_LINEAR, True, DOT_PRECISION,
            )
            if GATE == GATE_SOFTMAX_TOPK:
                chunk_max = tl.maximum(run_max, tl.max(logits, axis=1))
                run_sum = run_sum * tl.exp(run_max - chunk_max) + tl.sum(
                    tl.exp(logits - chunk_max[:, None]), axis=1
                )
                run_max = chunk_max
                tl.store(
                    logits_ptr + rows[:, None] * num_experts + experts[None, :], logits,
                    mask=save_ok[:, None] & expert_ok[None, :],
                )
            # Merge the chunk into the running top-k: k picks over (running slots, chunk), ties
            # to the lower expert index; taken entries leave their pool by key NO_EXPERT.
            keys_run = best_experts
            keys_chunk = tl.broadcast_to(tl.where(expert_ok, experts, NO_EXPERT)[None, :], (BLOCK_T, BLOCK_E))
            left_run = best_logits
            left_chunk = logits
            new_logits = tl.full((BLOCK_T, K_MAX), float("-inf"), tl.float32)
            new_experts = tl.full((BLOCK_T, K_MAX), NO_EXPERT, tl.int32)
            new_shrink = tl.zeros((BLOCK_T, K_MAX), dtype=tl.float32)
            for j in range(top_k):
                value_run, key_run = pick_largest(left_run, keys_run)
                value_chunk, key_chunk = pick_largest(left_chunk, keys_chunk)
                from_run = (value_run > value_chunk) | ((value_run == value_chunk) & (key_run < key_chunk))
                hit_run = keys_run == key_run[:, None]
                hit_chunk = keys_chunk == key_chunk[:, None]
                shrink_run = tl.sum(tl.where(hit_run, best_shrink, 0.0), axis=1)
                shrink_chunk = tl.sum(tl.where(hit_chunk, shrink, 0.0), axis=1)
                slot = slots[None, :] == j
                new_logits = tl.where(slot, tl.where(from_run, value_run, value_chunk)[:, None], new_logits)
                new_experts = tl.where(slot, tl.where(from_run, key_run, key_chunk)[:, None], new_experts)
                new_shrink = tl.where(slot, tl.where(from_run, shrink_run, shrink_chunk)[:, None], new_shrink)
                take_run = hit_run & from_run[:, None]
                take_chunk = hit_chunk & (~from_run)[:, None]
                left_run = tl.where(take_run, float("-inf"), left_run)
                keys_run = tl.where(take_run, NO_EXPERT, keys_run)
                left_chunk = tl.where(take_chunk, float("-inf"), left_chunk)
                keys_chunk = tl.where(take_chunk, NO_EXPERT, keys_chunk)
            best_logits = new_logits
            best_experts = new_experts
            best_shrink = new_shrink
        in_k = slots[None, :] < top_k
        if GATE == GATE_TOPK_SOFTMAX:
            weights = tl.where(in_k, tl.exp(best_logits - column(best_logits, slots, 0)[:, None]), 0.0)
            gates = weights / tl.sum(weights, axis=1)[:, None]
        else:  # GATE_SOFTMAX_TOPK
            shift = run_max + tl.log(run_sum)
            tl.store(lse_ptr + rows, shift, mask=save_ok)
            gates = tl.where(in_k, tl.exp(best_logits - shift[:, None]), 0.0)
        saved = rows[:, None] * top_k + slots[None, :]
        save_mask = save_ok[:, None] & in_k
        tl.store(index_ptr + saved, best_experts, mask=save_mask)
        tl.store(gate_ptr + saved, gates, mask=save_mask)
        tl.store(shrink_ptr + saved, best_shrink, mask=save_mask)
        coefficients = gates * best_shrink * gamma
        for d0 in range(0, cols_per_split, BLOCK_D):
            cols = out_begin + d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d_out
            gather_mask = row_ok[:, None] & col_ok[None, :]
            delta = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for j in range(top_k):
                expert = column(best_experts, slots, j)
                b_rows = tl.load(
                    b_ptr + expert[:, None].to(tl.int64) * stride_b_expert + cols[None, :] * stride_b_out,
                    mask=gather_mask, other=0.0,
                )
                delta += column(coefficients, slots, j)[:, None] * b_rows.to(tl.float32)
            add_into_output(y_ptr, stride_yt, stride_yd, rows, row_ok, cols, col_ok, delta, accumulate)
