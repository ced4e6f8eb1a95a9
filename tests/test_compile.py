"""torch.compile(fullgraph=True) traces a MoRE call through the Triton custom ops and fake kernels.

Runs on CPU under Triton's interpreter with the aot_eager compile backend (no C++ toolchain or
GPU needed): what is checked is that dynamo and AOTAutograd see one opaque forward op and one
opaque backward op, and that the compiled results equal the eager ones.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from smartfed_kernels.testing import assert_close_for, make_more_inputs
from smartfed_kernels.triton import more_linear_checked
from smartfed_kernels.validation import check_more_inputs

# Triton chooses compiled kernels or its CPU interpreter once per process: these run in their own
# process (tests/test_interpreter_suite.py, or TRITON_INTERPRET=1 python -m pytest -m interpreter tests).
pytestmark = pytest.mark.interpreter


def more_call(x, weight, bias, router_weight, router_bias, expert_a, expert_b):
    spec = check_more_inputs(x, weight, bias, router_weight, router_bias, expert_a, expert_b, 3,
                             gate="softmax_topk", router="expert_space")
    return more_linear_checked(x, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, False)


def test_fullgraph_compile_matches_eager_forward_and_backward():
    inputs = make_more_inputs((2, 5), 16, 12, 6, router="expert_space")
    weight, bias, expert_a, expert_b = (inputs[n] for n in ("weight", "bias", "expert_a", "expert_b"))
    trainable = (inputs["x"], inputs["router_weight"], inputs["router_bias"])

    def outputs(fn):
        leaves = [t.clone().requires_grad_() for t in trainable]
        y = fn(leaves[0], weight, bias, leaves[1], leaves[2], expert_a, expert_b)
        return (y,) + torch.autograd.grad(y, leaves, torch.cos(y.detach()))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = outputs(torch.compile(more_call, fullgraph=True, backend=counter))
    eager = outputs(more_call)
    assert counter.frame_count == 1
    op = torch.ops.smartfed.more_forward
    assert any(node.target in (op, op.default) for node in counter.graphs[0].graph.nodes)
    for got, want in zip(compiled, eager):
        assert_close_for(got, want)


def test_fake_kernel_shapes_match_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = (torch.randn(7, 16), None, None, torch.randn(5, 16), torch.randn(5), torch.randn(5, 16),
            torch.randn(9, 5), 2, 2.0, "softmax_topk", "linear")
    real = torch.ops.smartfed.more_forward(*args)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = torch.ops.smartfed.more_forward(*fake_args)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_fullgraph_compile_of_more_linear_module_uses_custom_op():
    from smartfed import MoRELinear

    generator = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(16, 12)
    layer = MoRELinear(base, torch.randn(6, 16, generator=generator) / 4,
                       torch.randn(12, 6, generator=generator), 2, backend="triton", seed=0)
    x = torch.randn(3, 16, generator=generator)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    assert_close_for(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert counter.frame_count == 1
    op = torch.ops.smartfed.more_forward
    assert any(node.target in (op, op.default) for node in counter.graphs[0].graph.nodes)
    assert layer.router_weight.grad is not None and layer.router_weight.grad.abs().sum() > 0


def test_fullgraph_compile_of_more_linear_module_on_the_torch_path_keeps_tie_order():
    from smartfed import MoRELinear
    from smartfed_kernels import reference

    generator = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(16, 12)
    layer = MoRELinear(base, torch.randn(6, 16, generator=generator) / 4,
                       torch.randn(12, 6, generator=generator), 3, backend="torch", router_init="zeros")
    x = torch.randn(4, 16, generator=generator)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    want = reference.more_linear(x, base.weight, base.bias, layer.router_weight, layer.router_bias,
                                 layer.expert_a, layer.expert_b, 3)
    assert_close_for(compiled(x), want)
    compiled(x).sum().backward()
    assert counter.frame_count == 1
    assert layer.router_weight.grad is not None
