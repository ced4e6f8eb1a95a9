"""Host-side launch of the MoRE kernels: buffers, grids, device guards.

Base product: ``x W0^T + b0`` and ``gy W0`` run in cuBLAS (torch.addmm / matmul) and the
kernels add the expert terms into those buffers in place. A Triton GEMM that fuses the
expand as N extra K columns would have to match cuBLAS on the dominant [T, d_in] x [d_in, d_out]
product; the in-place add costs one extra read of y instead (docs/kernels.md).

Nothing here reads a device value back to the host (no ``.item()``, ``.cpu()``, ``.tolist()``,
``nonzero``) or branches on one: sizes come from shapes alone, so a CUDA graph (torch.compile
``mode="reduce-overhead"``) can capture a MoRE call. tests/test_hot_path.py scans this file for them.
"""

import contextlib
import functools

import torch
import triton

from smartfed_kernels.triton.backward import (
    expert_b_grad_kernel,
    input_grad_kernel,
    routing_grad_kernel,
    rows_grad_kernel,
)
from smartfed_kernels.triton.configs import (
    expert_b_grad_config,
    forward_config,
    input_grad_config,
    routing_grad_config,
    rows_grad_config,
)
from smartfed_kernels.triton.forward import more_forward_kernel

# Programs the interpreter pretends the device runs at once: small, so CPU tests exercise
# output splits and token splits.
INTERPRETER_PROGRAMS = 4


def device_guard(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    # Asked once per device: a decode call is a few microseconds of GPU work, and the query is not.
    return torch.cuda.get_device_properties(device).multi_processor_count


def _concurrent_programs(tensor) -> int:
    if tensor.is_cuda:
        return 2 * _multiprocessors(tensor.device)
    return INTERPRETER_PROGRAMS


def _launch(kernel, grid, config, *args):
    kernel[grid](*args, **dict(config.constexprs), num_warps=config.num_warps, num_stages=config.num_stages)


def _split(total_blocks: int, splits: int, block: int) -> tuple:
    """(elements per split, number of splits) covering ``total_blocks`` blocks of ``block``."""
    per_split = triton.cdiv(total_blocks, max(1, splits))
    return per_split * block, triton.cdiv(total_blocks, per_split)


def forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k, gamma, gate, router):
    """Output and saved routing: (y, indices int32, gates, shrink [T, k], shrink_all, logits, lse)."""
    num_tokens, d_in = x2.shape
    num_experts, d_out = expert_a.shape[0], expert_b.shape[0]
    f32 = dict(device=x2.device, dtype=torch.float32)
    indices = torch.empty(num_tokens, top_k, device=x2.device, dtype=torch.int32)
    gates = torch.empty(num_tokens, top_k, **f32)
    shrink = torch.empty(num_tokens, top_k, **f32)
    expert_space = router == "expert_space"
    full_softmax = gate == "softmax_topk"
    shrink_all = torch.empty((num_tokens, num_experts) if expert_space else (0,), **f32)
    logits = torch.empty((num_tokens, num_experts) if full_softmax else (0,), **f32)
    lse = torch.empty((num_tokens,) if full_softmax else (0,), **f32)
    with device_guard(x2):
        if weight is None:
            y = x2.new_empty(num_tokens, d_out)
        elif bias is None:
            y = x2 @ weight.t()
        else:
            y = torch.addmm(bias, x2, weight.t())
        if num_tokens == 0:
            if weight is None:
                y.zero_()
            return y, indices, gates, shrink, shrink_all, logits, lse
        config = forward_config(num_experts, top_k, x2.dtype, router, gate)
        dense = config.get("DENSE")
        block_t, block_d = config.get("BLOCK_T"), config.get("BLOCK_D")
        token_tiles = triton.cdiv(num_tokens, block_t)
        wanted_splits = triton.cdiv(_concurrent_programs(x2), token_tiles)
        cols_per_split, splits = _split(triton.cdiv(d_out, block_d), wanted_splits, block_d)
        # The streaming expand gathers whole expert columns of B: give it B^T rows.
        b_operand = expert_b if dense else expert_b.t().contiguous()
        stride_b_out, stride_b_expert = (
            (expert_b.stride(0), expert_b.stride(1)) if dense else (b_operand.stride(1), b_operand.stride(0))
        )
        placeholder = gates
        _launch(
            more_forward_kernel, (token_tiles, splits), config,
            x2, x2.stride(0), x2.stride(1),
            router_weight, router_weight.stride(0), router_weight.stride(1),
            router_weight if router_bias is None else router_bias, int(router_bias is not None),
            expert_a, expert_a.stride(0), expert_a.stride(1),
            b_operand, stride_b_out, stride_b_expert,
            y, y.stride(0), y.stride(1), int(weight is not None),
            indices, gates, shrink,
            shrink_all if expert_space else placeholder,
            logits if full_softmax else placeholder,
            lse if full_softmax else placeholder,
            num_tokens, d_in, d_out, num_experts, top_k, float(gamma), cols_per_split,
        )
    return y, indices, gates, shrink, shrink_all, logits, lse


def _rows_grad(inputs, first, second, with_bias, num_experts):
    """(first^T X, second^T X or None, colsum(first) or None), fp32, summed over token splits."""
    num_tokens, width = inputs.shape
    config = rows_grad_config(inputs.dtype, second is not None, with_bias)
    block_t, block_k, block_e = config.get("BLOCK_T"), config.get("BLOCK_K"), config.get("BLOCK_E")
    tiles = triton.cdiv(num_experts, block_e) * triton.cdiv(width, block_k)
    tokens_per_split, splits = _split(
        triton.cdiv(num_tokens, block_t), triton.cdiv(_concurrent_programs(inputs), tiles), block_t
    )
    f32 = dict(device=inputs.device, dtype=torch.float32)
    first_out = torch.empty(splits, num_experts, width, **f32)
    second_out = torch.empty(splits, num_experts, width, **f32) if second is not None else first_out
    bias_out = torch.empty(splits, num_experts, **f32) if with_bias else first_out
    _launch(
        rows_grad_kernel, (triton.cdiv(num_experts, block_e), triton.cdiv(width, block_k), splits), config,
        inputs, inputs.stride(0), inputs.stride(1),
        first, first if second is None else second,
        first_out, second_out, bias_out,
        num_tokens, width, num_experts, tokens_per_split,
    )
    return (
        first_out.sum(0),
        second_out.sum(0) if second is not None else None,
        bias_out.sum(0) if with_bias else None,
    )


def backward(grad_y, x2, weight, router_weight, expert_a, expert_b, indices, gates, shrink,
             shrink_all, logits, lse, top_k, gamma, gate, router, needs):
    """Gradients (x, weight, bias, router_weight, router_bias, expert_a, expert_b); None where not needed."""
    num_tokens, d_in = x2.shape
    num_experts, d_out = expert_a.shape[0], expert_b.shape[0]
    dtype = x2.dtype
    need_x, need_w, need_b, need_rw, need_rb, need_a, need_eb = needs
    grads = [None] * 7
    with device_guard(x2):
        if need_w:
            grads[1] = grad_y.t() @ x2
        if need_b:
            grads[2] = grad_y.sum(0)
        if num_tokens == 0:
            zeros = {3: router_weight, 4: router_weight[:, 0], 5: expert_a, 6: expert_b}
            if need_x:
                grads[0] = torch.zeros_like(x2)
            for position, like in zeros.items():
                if needs[position]:
                    grads[position] = torch.zeros_like(like)
            return tuple(grads)
        f32 = dict(device=x2.device, dtype=torch.float32)
        if need_x or need_rw or need_rb or need_a:
            grad_logits = torch.empty(num_tokens, num_experts, **f32)
            grad_shrink = torch.empty(num_tokens, num_experts, **f32)
            config = routing_grad_config(dtype, router, gate)
            _launch(
                routing_grad_kernel, (triton.cdiv(num_tokens, config.get("BLOCK_T")),), config,
                grad_y, grad_y.stride(0), grad_y.stride(1),
                expert_b, expert_b.stride(0), expert_b.stride(1),
                router_weight, router_weight.stride(0), router_weight.stride(1),
                indices, gates, shrink,
                logits if gate == "softmax_topk" else gates, lse if gate == "softmax_topk" else gates,
                grad_logits, grad_shrink,
                num_tokens, d_out, num_experts, top_k, float(gamma),
            )
        if need_x:
            if weight is None:
                grad_x = torch.empty_like(x2, memory_format=torch.contiguous_format)
            else:
                grad_x = grad_y @ weight
            config = input_grad_config(dtype, router)
            _launch(
                input_grad_kernel,
                (triton.cdiv(num_tokens, config.get("BLOCK_T")), triton.cdiv(d_in, config.get("BLOCK_K"))),
                config,
                grad_logits, grad_shrink,
                router_weight, router_weight.stride(0), router_weight.stride(1),
                expert_a, expert_a.stride(0), expert_a.stride(1),
                grad_x, grad_x.stride(0), grad_x.stride(1), int(weight is not None),
                num_tokens, d_in, num_experts,
            )
            grads[0] = grad_x
        if router == "linear" and (need_rw or need_rb or need_a):
            router_grad, expert_grad, bias_grad = _rows_grad(
                x2, grad_logits, grad_shrink if need_a else None, need_rb, num_experts
            )
            grads[3], grads[4], grads[5] = router_grad, bias_grad, expert_grad
        elif router == "expert_space":
            if need_rw or need_rb:
                grads[3], _unused, grads[4] = _rows_grad(
                    shrink_all.to(dtype), grad_logits, None, need_rb, num_experts
                )
            if need_a:
                grads[5] = _rows_grad(x2, grad_shrink, None, False, num_experts)[0]
        if need_eb:
            config = expert_b_grad_config(dtype)
            block_t, block_d, block_e = config.get("BLOCK_T"), config.get("BLOCK_D"), config.get("BLOCK_E")
            tiles = triton.cdiv(d_out, block_d) * triton.cdiv(num_experts, block_e)
            tokens_per_split, splits = _split(
                triton.cdiv(num_tokens, block_t), triton.cdiv(_concurrent_programs(x2), tiles), block_t
            )
            partial = torch.empty(splits, d_out, num_experts, **f32)
            _launch(
                expert_b_grad_kernel,
                (triton.cdiv(d_out, block_d), triton.cdiv(num_experts, block_e), splits), config,
                grad_y, grad_y.stride(0), grad_y.stride(1),
                indices, gates, shrink, partial,
                num_tokens, d_out, num_experts, top_k, float(gamma), tokens_per_split,
            )
            grads[6] = partial.sum(0)
    return tuple(None if g is None else g.to(dtype) for g in grads)
