"""Argument checks shared by every backend: one place that says what a MoRE call expects."""

from dataclasses import dataclass
from typing import Optional

import torch

from smartfed_kernels.options import GATES, ROUTERS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CallSpec:
    """Sizes and options of one MoRE call, after validation: what every backend runs on."""

    d_in: int
    d_out: int
    num_experts: int
    top_k: int
    gamma: float
    gate: str
    router: str


def _check_tensor(name, tensor, shape, dtype, device, optional=False):
    if tensor is None:
        if optional:
            return
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, got None")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of x), got {tensor.device}")


def check_more_inputs(
    x, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k,
    *, gate="topk_softmax", gamma=None, router="linear",
) -> CallSpec:
    """Validate a MoRE call and return its sizes; raises with the argument's name on bad input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., d_in] with at least one dimension, got a scalar")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype among {FLOAT_DTYPES}, got {x.dtype}")
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
    if router not in ROUTERS:
        raise ValueError(f"router: expected one of {ROUTERS}, got {router!r}")
    if not isinstance(expert_a, torch.Tensor) or expert_a.dim() != 2:
        raise ValueError("expert_a: expected a tensor of shape [N, d_in]")
    num_experts, d_in = expert_a.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dimension d_in={d_in} (from expert_a), got {x.shape[-1]}")
    if num_experts < 1:
        raise ValueError("expert_a: expected at least one expert (N >= 1), got N=0")
    if not isinstance(expert_b, torch.Tensor) or expert_b.dim() != 2:
        raise ValueError(f"expert_b: expected a tensor of shape [d_out, {num_experts}]")
    d_out = expert_b.shape[0]
    if expert_b.shape[1] != num_experts and expert_b.shape[0] == num_experts:
        # A transposed B ([N, d_out]): the shape meant is [d_out, N], so name that one.
        d_out = expert_b.shape[1]
    device, dtype = x.device, x.dtype
    _check_tensor("expert_a", expert_a, (num_experts, d_in), dtype, device)
    _check_tensor("expert_b", expert_b, (d_out, num_experts), dtype, device)
    _check_tensor("weight", weight, (d_out, d_in), dtype, device, optional=True)
    if weight is None and bias is not None:
        raise ValueError("bias: expected None when weight is None (no base product)")
    _check_tensor("bias", bias, (d_out,), dtype, device, optional=True)
    router_in = d_in if router == "linear" else num_experts
    _check_tensor(f"router_weight (router={router!r})", router_weight, (num_experts, router_in), dtype, device)
    _check_tensor("router_bias", router_bias, (num_experts,), dtype, device, optional=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= N={num_experts}, got {top_k}")
    gamma_value = resolve_gamma(gamma, top_k)
    return CallSpec(d_in, d_out, num_experts, top_k, gamma_value, gate, router)


def resolve_gamma(gamma: Optional[float], top_k: int) -> float:
    """The mixture scale: ``gamma`` if given, else k (so uniform gates over r ranks give the adapter)."""
    if gamma is None:
        return float(top_k)
    gamma = float(gamma)
    if gamma != gamma or gamma in (float("inf"), float("-inf")):
        raise ValueError(f"gamma: expected a finite number, got {gamma}")
    return gamma
