"""Launch configurations: the one table of every compiled MoRE kernel variant and its rule.

Layout rule: N <= 256 experts run dense-in-tile (the whole pool in one tile of
``next_pow2(N)`` lanes, at least 16 for the tensor-core product); larger pools stream the
experts in chunks of 64 (32 for fp32) with a running top-k of ``K_MAX`` slots. One compiled kernel serves
every k <= its ``K_MAX``. Tile sizes were tuned with ``python -m smartfed_kernels.static_check``
to zero spills on sm_80 and sm_90 (docs/kernels.md keeps the table).
"""

from dataclasses import dataclass

import torch

from smartfed_kernels.forms import gate_form
from smartfed_kernels.options import GATES, ROUTERS

DENSE_MAX_EXPERTS = 256
STREAM_CHUNK = 64
STREAM_K_BUCKETS = (16, 64, 256)
DENSE_WIDTHS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class KernelConfig:
    """Constexpr block sizes and launch options of one compiled variant."""

    constexprs: tuple
    num_warps: int
    num_stages: int

    def get(self, name):
        return dict(self.constexprs)[name]


def _config(num_warps, num_stages, **constexprs):
    return KernelConfig(tuple(sorted(constexprs.items())), num_warps, num_stages)


def _half(dtype):
    return dtype in (torch.float16, torch.bfloat16)


def dot_precision(dtype) -> str:
    """IEEE fp32 products for fp32 inputs; TF32 only when torch's own TF32 switch is on."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def stream_k_max(top_k: int) -> int:
    for bucket in STREAM_K_BUCKETS:
        if top_k <= bucket:
            return bucket
    raise ValueError(
        f"top_k: the Triton streaming layout (N > {DENSE_MAX_EXPERTS}) supports top_k <= "
        f"{STREAM_K_BUCKETS[-1]}, got {top_k}"
    )


def forward_config(num_experts: int, top_k: int, dtype, router: str, gate: str) -> KernelConfig:
    """The forward variant the launcher runs for this pool size, k, dtype and options."""
    flags = dict(ROUTER_LINEAR=router == "linear", GATE=gate_form(gate).code,
                 DOT_PRECISION=dot_precision(dtype))
    block_k = 64 if _half(dtype) else 16
    block_d = 64 if _half(dtype) else 32
    if num_experts <= DENSE_MAX_EXPERTS:
        width = max(16, next_power_of_two(num_experts))
        block_t = 32 if width <= 64 else 16
        return _config(
            4 if width <= 128 and _half(dtype) else 8, 2, DENSE=True, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d,
            BLOCK_E=width, BLOCK_R=16, K_MAX=16, **flags,
        )
    k_max = stream_k_max(top_k)
    return _config(
        4 if k_max <= 64 else 8, 2, DENSE=False, BLOCK_T=16, BLOCK_K=block_k,
        BLOCK_D=block_d, BLOCK_E=STREAM_CHUNK if _half(dtype) else STREAM_CHUNK // 2, BLOCK_R=16, K_MAX=k_max, **flags,
    )


def routing_grad_config(dtype, router: str, gate: str) -> KernelConfig:
    return _config(4 if _half(dtype) else 8, 2, BLOCK_T=16, BLOCK_D=64, BLOCK_E=64, BLOCK_R=16,
                   ROUTER_LINEAR=router == "linear", GATE=gate_form(gate).code,
                   DOT_PRECISION=dot_precision(dtype))


def input_grad_config(dtype, router: str) -> KernelConfig:
    return _config(4, 2, BLOCK_T=64 if _half(dtype) else 32, BLOCK_K=64 if _half(dtype) else 32, BLOCK_E=32,
                   ROUTER_LINEAR=router == "linear", DOT_PRECISION=dot_precision(dtype))


def rows_grad_config(dtype, with_second: bool, with_bias: bool) -> KernelConfig:
    return _config(4 if _half(dtype) else 8, 2, BLOCK_T=32, BLOCK_K=64 if _half(dtype) else 32, BLOCK_E=64 if _half(dtype) else 32,
                   WITH_SECOND=with_second, WITH_BIAS=with_bias, DOT_PRECISION=dot_precision(dtype))


def expert_b_grad_config(dtype) -> KernelConfig:
    return _config(8, 2, BLOCK_T=32, BLOCK_D=64, BLOCK_E=64 if _half(dtype) else 32,
                   DOT_PRECISION=dot_precision(dtype))


def all_configs(dtype):
    """Every (kernel name, config) the launcher can choose for ``dtype``: what inspect compiles."""
    found = []
    for router in ROUTERS:
        for gate in GATES:
            for width in DENSE_WIDTHS:
                found.append(("more_forward_kernel", forward_config(width, 1, dtype, router, gate)))
            for k_max in STREAM_K_BUCKETS:
                found.append(("more_forward_kernel",
                              forward_config(DENSE_MAX_EXPERTS + 1, k_max, dtype, router, gate)))
            found.append(("routing_grad_kernel", routing_grad_config(dtype, router, gate)))
        found.append(("input_grad_kernel", input_grad_config(dtype, router)))
    for with_second in (False, True):
        for with_bias in (False, True):
            found.append(("rows_grad_kernel", rows_grad_config(dtype, with_second, with_bias)))
    found.append(("expert_b_grad_kernel", expert_b_grad_config(dtype)))
    return found


