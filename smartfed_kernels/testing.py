"""Random MoRE inputs and the tolerance every path is held to: shared by the tests, `smartfed bench`
and its GPU check (``smartfed bench --gpu-check``), so that all of them check the same thing.

``make_more_inputs`` scales the tensors so that outputs and router logits are O(1), which keeps
top-k near-ties rare. Values are drawn in float32 on the CPU from one seeded generator, in the
order of ``ARGUMENTS``, and only then cast and moved: a seed gives the same values in every dtype
and on every device.

``TOLERANCES`` bounds the max-norm relative error ``max |actual - expected| / max |expected|``
against the reference (docs/design.md §2.5). It is relative to the tensor's largest element, not
to each element, because the rounding error of a reduction scales with the magnitude of its
terms, not with that of its result: an element that nearly cancels has no meaningful relative
error of its own.
"""

from collections.abc import Collection
from typing import Optional, Union

import torch

# The positional tensor arguments of more_linear, in order.
ARGUMENTS = ("x", "weight", "bias", "router_weight", "router_bias", "expert_a", "expert_b")

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

Names = Union[bool, Collection]


def _named(option: Names, present) -> set:
    if option is True:
        return set(present)
    if option is False:
        return set()
    unknown = set(option) - set(ARGUMENTS)
    if unknown:
        raise ValueError(f"expected argument names from {ARGUMENTS}, got {sorted(unknown)}")
    return set(option) & set(present)


def _strided_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a layout no kernel can take as contiguous: dimensions reversed in memory
    and every other element of the innermost one skipped (``wide[:, ::2].t()`` for a matrix)."""
    reversed_shape = tensor.shape[::-1]
    wide = torch.empty(*reversed_shape[:-1], 2 * reversed_shape[-1], dtype=tensor.dtype, device=tensor.device)
    view = wide[..., ::2].permute(*reversed(range(tensor.dim())))
    return view.copy_(tensor)


def make_more_inputs(
    tokens: Union[int, tuple],
    d_in: int,
    d_out: int,
    num_experts: int,
    *,
    router: str = "linear",
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    base: bool = True,
    router_bias: bool = True,
    requires_grad: Names = False,
    non_contiguous: Names = False,
) -> dict:
    """Random arguments of ``more_linear``: argument name -> tensor (or None), in call order.

    ``tokens`` is T or a tuple of leading dimensions of x. ``base=False`` leaves weight and bias
    None, ``router_bias=False`` the router bias. ``requires_grad`` and ``non_contiguous`` take
    True (every tensor) or argument names; ``non_contiguous`` tensors keep their values in a
    strided, transposed layout.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    lead = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    router_in = d_in if router == "linear" else num_experts
    inputs = {
        "x": draw(*lead, d_in),
        "weight": draw(d_out, d_in, scale=d_in ** -0.5) if base else None,
        "bias": draw(d_out) if base else None,
        "router_weight": draw(num_experts, router_in, scale=router_in ** -0.5),
        "router_bias": draw(num_experts) if router_bias else None,
        "expert_a": draw(num_experts, d_in, scale=d_in ** -0.5),
        "expert_b": draw(d_out, num_experts, scale=0.3),
    }
    present = [name for name, tensor in inputs.items() if tensor is not None]
    for name in _named(non_contiguous, present):
        inputs[name] = _strided_copy(inputs[name])
    for name in _named(requires_grad, present):
        inputs[name].requires_grad_()
    return inputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    expected = expected.detach().double()
    error = (actual.detach().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    if scale == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return error / scale


def assert_close_for(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                     what: str = "") -> None:
    """Shapes equal and ``relative_error`` within the tolerance of ``dtype`` (default: actual's)."""
    dtype = dtype or actual.dtype
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error, tolerance = relative_error(actual, expected), TOLERANCES[dtype]
    assert error <= tolerance, f"{label}max relative error {error:.3e} > {tolerance:.0e} ({dtype})"
