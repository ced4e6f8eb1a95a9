"""Compiled Triton MoRE kernels on a CUDA GPU against the reference: bf16, fp16 and fp32.

Skips without CUDA. Part of the default ``python -m pytest tests`` process, which never turns on
Triton's CPU interpreter: the interpreter tests run in a process of their own (tests/conftest.py).
"""

import pytest
import torch

from smartfed_kernels import more_linear
from smartfed_kernels.testing import assert_close_for, make_more_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DENSE_POOL, STREAMING_POOL = 64, 300
TRAINABLE = ("x", "router_weight", "router_bias", "expert_a", "expert_b")


def _device():
    # The last device: exercises the device guard when it is not the current one.
    return torch.device("cuda", torch.cuda.device_count() - 1)


def make_inputs(tokens, d_in, d_out, num_experts, router, dtype, seed):
    """The shared inputs on the test device, everything but the base trainable."""
    return make_more_inputs(tokens, d_in, d_out, num_experts, router=router, dtype=dtype, device=_device(), seed=seed,
                            requires_grad=TRAINABLE)


def run(inputs, top_k, backend, upcast, **options):
    tensors = {n: t.detach().double().requires_grad_() if upcast else t.detach().requires_grad_()
               for n, t in inputs.items()}
    y, indices, gates = more_linear(*tensors.values(), top_k, backend=backend, return_routing=True, **options)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [tensors[n] for n in TRAINABLE], grad_y)
    return (y, indices, gates) + grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("num_experts", [DENSE_POOL, STREAMING_POOL], ids=["dense", "streaming"])
@pytest.mark.parametrize("router", ["linear", "expert_space"])
@pytest.mark.parametrize("gate", ["topk_softmax", "softmax_topk"])
def test_matches_reference_on_gpu(dtype, num_experts, router, gate):
    inputs = make_inputs((3, 101), 576, 2049, num_experts, router, dtype, seed=num_experts)
    expected = run(inputs, 8, "reference", dtype == torch.float32, router=router, gate=gate)
    actual = run(inputs, 8, "triton", False, router=router, gate=gate)
    assert actual[0].device == _device() and actual[0].dtype == dtype
    assert torch.equal(actual[1], expected[1])
    names = ("y", "indices", "gates", "x", "router_weight", "router_bias", "expert_a", "expert_b")
    for name, got, want in zip(names, actual, expected):
        if name != "indices":
            assert_close_for(got, want, dtype, name)


def test_decode_and_empty_batches_on_gpu():
    for tokens in (0, 1, 16):
        inputs = make_inputs((tokens,), 256, 320, DENSE_POOL, "linear", torch.bfloat16, seed=tokens)
        expected = run(inputs, 4, "reference", False)
        actual = run(inputs, 4, "triton", False)
        assert actual[0].shape == (tokens, 320)
        if tokens:
            assert_close_for(actual[0], expected[0])


def _captured_and_eager(call, x, fresh_x):
    """Output of ``call`` replayed from a CUDA graph after ``x`` was overwritten, and eager on the new x."""
    device = _device()
    with torch.no_grad(), torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the kernels and warms the allocator outside the capture
                call()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        x.copy_(fresh_x)
        graph.replay()
        torch.cuda.synchronize(device)
        return captured, call()


@pytest.mark.parametrize("backend,tokens", [("triton", 1), ("triton", 16), ("triton", 130), ("torch", 1),
                                            ("torch", 16)])
def test_more_linear_is_captured_by_a_cuda_graph(backend, tokens):
    inputs = {n: t.detach() for n, t in make_inputs((tokens,), 256, 320, DENSE_POOL, "linear", torch.bfloat16,
                                                     seed=tokens).items()}
    fresh_x = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(7)).to(inputs["x"])
    captured, eager = _captured_and_eager(lambda: more_linear(*inputs.values(), 4, backend=backend),
                                          inputs["x"], fresh_x)
    torch.testing.assert_close(captured, eager)


def test_more_linear_module_decode_is_captured_by_a_cuda_graph():
    from smartfed.layer import MoRELinear

    generator = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(256, 320).to(device=_device(), dtype=torch.bfloat16)
    layer = MoRELinear(base, torch.randn(DENSE_POOL, 256, generator=generator) / 16,
                       torch.randn(320, DENSE_POOL, generator=generator), 8, seed=0)
    x = torch.randn(1, 256, generator=generator).to(base.weight)
    fresh_x = torch.randn(1, 256, generator=generator).to(base.weight)
    captured, eager = _captured_and_eager(lambda: layer(x), x, fresh_x)
    torch.testing.assert_close(captured, eager)
