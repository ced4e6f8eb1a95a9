"""Compiled Triton MoRE kernels on a CUDA GPU against the reference: bf16, fp16 and fp32.

Skips without CUDA. Part of the default ``python -m pytest tests`` process, which never turns on
Triton's CPU interpreter: the interpreter tests run in a process of their own (tests/conftest.py).
"""

import pytest
import torch

from smartfed_kernels import more_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DENSE_POOL, STREAMING_POOL = 64, 300


def _device():
    # The last device: exercises the device guard when it is not the current one.
    return torch.device("cuda", torch.cuda.device_count() - 1)


def make_inputs(tokens, d_in, d_out, num_experts, router, dtype, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=generator) * scale).to(device=_device(), dtype=dtype).requires_grad_(grad)

    router_in = d_in if router == "linear" else num_experts
    return dict(
        x=randn(*tokens, d_in, grad=True),
        weight=randn(d_out, d_in, scale=d_in ** -0.5),
        bias=randn(d_out),
        router_weight=randn(num_experts, router_in, scale=router_in ** -0.5, grad=True),
        router_bias=randn(num_experts, grad=True),
        expert_a=randn(num_experts, d_in, scale=d_in ** -0.5, grad=True),
        expert_b=randn(d_out, num_experts, scale=0.3, grad=True),
    )


def run(inputs, top_k, backend, upcast, **options):
    tensors = {n: t.detach().double().requires_grad_() if upcast else t.detach().requires_grad_()
               for n, t in inputs.items()}
    y, indices, gates = more_linear(*tensors.values(), top_k, backend=backend, return_routing=True, **options)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [tensors[n] for n in ("x", "router_weight", "router_bias", "expert_a", "expert_b")], grad_y)
    return (y, indices, gates) + grads


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()


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
            assert relative_error(got, want) < TOLERANCE[dtype], name


def test_decode_and_empty_batches_on_gpu():
    for tokens in (0, 1, 16):
        inputs = make_inputs((tokens,), 256, 320, DENSE_POOL, "linear", torch.bfloat16, seed=tokens)
        expected = run(inputs, 4, "reference", False)
        actual = run(inputs, 4, "triton", False)
        assert actual[0].shape == (tokens, 320)
        if tokens:
            assert relative_error(actual[0], expected[0]) < 1e-2


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
