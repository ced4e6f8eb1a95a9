"""What `smartfed bench` times side by side, and how each one is checked against the reference.

Every provider builds, from one shared random :class:`Case`, a forward callable, the tensors it
trains (their gradients are timed and checked), and the arguments under which
``smartfed_kernels.reference.more_linear`` computes the same function:

- ``linear``: ``nn.Linear`` alone, the floor; training x and its weight. Reference: experts with B = 0.
- ``peft-lora``: peft's ``lora.Linear`` at rank k (what a user would run instead), training x and
  the LoRA factors. Reference: the anchor of docs/design.md §2.2, a pool of that one adapter with
  k = N = r and a zero router.
- ``more-reference``, ``more-torch``, ``more-triton``: the MoRE layer through
  ``smartfed_kernels.more_linear`` with that backend, training x and the router (base and experts
  frozen).
- ``more-layer``: the ``MoRELinear`` module (backend auto) on the same tensors: what a model runs,
  its inputs checked once at construction instead of on every call.
- ``dense-masked``: the plainest PyTorch MoRE (topk, gates scattered into a dense [T, N] tile, one
  A and one B GEMM), the yardstick for large pools.
"""

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import smartfed_kernels
import smartfed_kernels.cpu
from smartfed.benchmarking.shapes import Shape
from smartfed_kernels import dispatch
from smartfed_kernels.testing import ARGUMENTS, make_more_inputs, relative_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass
class Case:
    """Random inputs of one shape (detached, in the benchmark dtype and device) and an output gradient."""

    shape: Shape
    dtype: torch.dtype
    device: torch.device
    tensors: dict
    grad_out: torch.Tensor


def make_case(shape: Shape, dtype: torch.dtype, device, seed: int = 0) -> Case:
    """The op's shared random inputs (smartfed_kernels.testing) and an output gradient."""
    s = shape
    tensors = make_more_inputs(s.tokens, s.d_in, s.d_out, s.experts, dtype=dtype, device=device, seed=seed)
    grad_out = torch.randn(s.tokens, s.d_out, generator=torch.Generator().manual_seed(seed + 1))
    return Case(shape, dtype, torch.device(device), tensors, grad_out.to(device=device, dtype=dtype))


@dataclass
class Built:
    """One provider ready to run on one case."""

    forward: Callable[[], torch.Tensor]
    trainable: dict                                # name -> tensor requiring grad
    reference_arguments: dict                      # more_linear argument -> tensor
    reference_gradients: dict = field(default_factory=dict)  # trainable name -> reference argument


class Provider:
    name = ""
    kind = ""            # work model in smartfed.benchmarking.work: linear, lora or more
    description = ""
    explicit_only_on_cpu = False

    def unavailable_reason(self, device: torch.device, explicit: bool) -> Optional[str]:
        return None

    def build(self, case: Case) -> Built:
        raise NotImplementedError


def _trainable(tensor):
    return tensor.detach().clone().requires_grad_()


def _base_linear(case) -> nn.Linear:
    """The case's base weight and bias in an nn.Linear."""
    s, t = case.shape, case.tensors
    layer = nn.Linear(s.d_in, s.d_out, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        layer.weight.copy_(t["weight"])
        layer.bias.copy_(t["bias"])
    return layer


class LinearProvider(Provider):
    name, kind, description = "linear", "linear", "nn.Linear alone (the floor)"

    def build(self, case):
        t = case.tensors
        layer = _base_linear(case)
        x = _trainable(t["x"])
        arguments = {**t, "x": x, "weight": layer.weight, "bias": layer.bias,
                     "expert_b": torch.zeros_like(t["expert_b"])}
        return Built(lambda: layer(x), {"x": x, "weight": layer.weight}, arguments,
                     reference_gradients={"x": "x", "weight": "weight"})


class _OneLinear(nn.Module):
    def __init__(self, d_in, d_out, device, dtype):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, device=device, dtype=dtype)


class PeftLoRAProvider(Provider):
    name, kind, description = "peft-lora", "lora", "peft lora.Linear at rank k (adapters in peft's default dtype)"

    def unavailable_reason(self, device, explicit):
        return None if importlib.util.find_spec("peft") else "peft is not installed"

    def build(self, case):
        from peft import LoraConfig, get_peft_model

        s, t = case.shape, case.tensors
        model = get_peft_model(
            _OneLinear(s.d_in, s.d_out, case.device, case.dtype),
            LoraConfig(r=s.top_k, lora_alpha=s.top_k, target_modules=["proj"], lora_dropout=0.0),
        )
        layer = model.base_model.model.proj
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            layer.base_layer.weight.copy_(t["weight"])
            layer.base_layer.bias.copy_(t["bias"])
            lora_a.copy_(t["expert_a"][: s.top_k])
            lora_b.copy_(t["expert_b"][:, : s.top_k])
        x = _trainable(t["x"])
        arguments = {
            "x": x, "weight": layer.base_layer.weight, "bias": layer.base_layer.bias,
            "router_weight": torch.zeros(s.top_k, s.d_in, device=case.device, dtype=case.dtype),
            # lora_alpha = r makes peft's scaling 1, so expert_b is lora_B itself.
            "router_bias": None, "expert_a": lora_a, "expert_b": lora_b,
        }
        return Built(lambda: layer(x), {"x": x, "lora_A": lora_a, "lora_B": lora_b}, arguments,
                     reference_gradients={"x": "x", "lora_A": "expert_a", "lora_B": "expert_b"})


class MoREProvider(Provider):
    kind = "more"

    def __init__(self, backend, description, name=None):
        self.backend = backend
        self.name = name or f"more-{backend}"
        self.description = description

    def build(self, case):
        t = case.tensors
        arguments = {**t, "x": _trainable(t["x"]), "router_weight": _trainable(t["router_weight"]),
                     "router_bias": _trainable(t["router_bias"])}
        top_k, more = case.shape.top_k, self.more

        def forward():
            return more(*(arguments[n] for n in ARGUMENTS), top_k)

        trainable = {n: arguments[n] for n in ("x", "router_weight", "router_bias")}
        return Built(forward, trainable, arguments, reference_gradients={n: n for n in trainable})

    def more(self, *arguments):
        return smartfed_kernels.more_linear(*arguments, backend=self.backend)


class TorchOpsProvider(MoREProvider):
    """The fast path with smartfed_kernels.cpu switched off: what a machine without a C compiler
    runs, beside more-torch in the same run."""

    def __init__(self):
        super().__init__("torch", "MoRE fast path on PyTorch ops alone (C kernels off)", "more-torch-ops")

    def unavailable_reason(self, device, explicit):
        if device.type != "cpu":
            return "the C kernels are CPU-only: on this device it is more-torch"
        return None

    def more(self, *arguments):
        with smartfed_kernels.cpu.disabled():
            return super().more(*arguments)


class LayerProvider(Provider):
    name, kind = "more-layer", "more"
    description = "MoRELinear module, backend auto (smartfed.layer)"

    def build(self, case):
        from smartfed.layer import MoRELinear

        s, t = case.shape, case.tensors
        base = _base_linear(case)
        layer = MoRELinear(base, t["expert_a"], t["expert_b"], s.top_k, router_init="zeros")
        with torch.no_grad():
            layer.router_weight.copy_(t["router_weight"])
            layer.router_bias.copy_(t["router_bias"])
        x = _trainable(t["x"])
        arguments = {"x": x, "weight": base.weight, "bias": base.bias, "router_weight": layer.router_weight,
                     "router_bias": layer.router_bias, "expert_a": layer.expert_a, "expert_b": layer.expert_b}
        trainable = {n: arguments[n] for n in ("x", "router_weight", "router_bias")}
        return Built(lambda: layer(x), trainable, arguments, reference_gradients={n: n for n in trainable})


def dense_masked_more(x, weight, bias, router_weight, router_bias, expert_a, expert_b, top_k):
    """The MoRE layer written the plain way, for comparison (linear router, topk_softmax, gamma = k)."""
    # Logits in fp32, as every MoRE path computes them (docs/design.md §2.5): rounded to bf16 they
    # pick a different top-k than the reference on a few tokens per hundred. No-ops in fp32.
    logits = torch.addmm(router_bias.float(), x.float(), router_weight.float().t())
    values, indices = logits.topk(top_k, dim=-1)
    dense_gates = torch.zeros_like(logits).scatter(1, indices, torch.softmax(values, dim=-1)).to(x.dtype)
    return torch.addmm(torch.addmm(bias, x, weight.t()), dense_gates * (x @ expert_a.t()), expert_b.t(),
                       alpha=top_k)


class DenseMaskedProvider(MoREProvider):
    def __init__(self):
        super().__init__(None, "plain PyTorch MoRE: topk, dense gate tile, one A and one B GEMM", "dense-masked")

    def more(self, *arguments):
        return dense_masked_more(*arguments)


class TritonProvider(MoREProvider):
    explicit_only_on_cpu = True

    def __init__(self):
        super().__init__("triton", "MoRE Triton kernels (smartfed_kernels.triton)")

    def unavailable_reason(self, device, explicit):
        if device.type == "cpu":
            if not explicit:
                return "CUDA only here (name it in --providers to run Triton's slow CPU interpreter)"
            if not dispatch.triton_interpreting():
                return "on CPU it needs Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
        try:
            module = dispatch.backend_module("triton")
        except ImportError as error:
            return f"smartfed_kernels.triton not importable: {error}"
        if not hasattr(module, "more_linear_checked"):
            return "smartfed_kernels.triton does not provide more_linear_checked yet"
        return None


PROVIDERS = {
    p.name: p for p in (
        LinearProvider(),
        PeftLoRAProvider(),
        MoREProvider("reference", "MoRE reference (smartfed_kernels.reference)"),
        MoREProvider("torch", "MoRE fast path (smartfed_kernels.torch_ops; on CPU with smartfed_kernels.cpu)"),
        TorchOpsProvider(),
        TritonProvider(),
        LayerProvider(),
        DenseMaskedProvider(),
    )
}


def timed_call(built: Built, mode: str, grad_out: torch.Tensor) -> Callable[[], object]:
    """What one timing sample runs: fwd (no grad), bwd (backward of one kept graph) or full."""
    trainable = list(built.trainable.values())
    if mode == "fwd":
        def forward_only():
            with torch.no_grad():
                return built.forward()
        return forward_only
    if mode == "full":
        return lambda: torch.autograd.grad(built.forward(), trainable, grad_out)
    if mode != "bwd":
        raise ValueError(f"mode: expected one of ('fwd', 'bwd', 'full'), got {mode!r}")
    output = built.forward()
    return lambda: torch.autograd.grad(output, trainable, grad_out, retain_graph=True)


def reference_check(built: Built, case: Case, with_gradients: bool) -> dict:
    """Max relative error of the provider's output (and gradients) against the float64 reference."""
    from smartfed_kernels.reference import more_linear

    arguments = {name: None if tensor is None else tensor.detach().double().requires_grad_(
        name in built.reference_gradients.values()) for name, tensor in built.reference_arguments.items()}
    expected = more_linear(*(arguments[n] for n in ARGUMENTS), case.shape.top_k)
    actual = built.forward()
    errors = {"output": relative_error(actual, expected)}
    if with_gradients:
        names = list(built.trainable)
        grad_out = case.grad_out.to(actual.dtype)
        got = torch.autograd.grad(actual, [built.trainable[n] for n in names], grad_out)
        want = torch.autograd.grad(expected, [arguments[built.reference_gradients[n]] for n in names],
                                   grad_out.double())
        errors.update({f"grad {n}": relative_error(g, w) for n, g, w in zip(names, got, want)})
    return errors
