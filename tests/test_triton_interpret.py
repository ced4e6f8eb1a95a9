"""Triton MoRE kernels under Triton's CPU interpreter against the reference (docs/design.md §2, §4.4).

The interpreter (TRITON_INTERPRET=1, read as the kernels are defined) computes bf16 ``tl.dot``
wrongly, so bf16 is checked on GPU only (tests/test_triton_cuda.py).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smartfed_kernels import more_linear
from smartfed_kernels.testing import assert_close_for, make_more_inputs
from smartfed_kernels.triton import configs

# Triton chooses compiled kernels or its CPU interpreter once per process: these run in their own
# process (tests/test_interpreter_suite.py, or TRITON_INTERPRET=1 python -m pytest -m interpreter tests).
pytestmark = pytest.mark.interpreter

DENSE_POOL = 19
STREAMING_POOL = configs.DENSE_MAX_EXPERTS + 5


def make_inputs(tokens, d_in, d_out, num_experts, *, train_experts=False, **options):
    """The shared inputs, training x and the router (and the experts with ``train_experts``)."""
    trainable = ("x", "router_weight", "router_bias") + (("expert_a", "expert_b") if train_experts else ())
    return make_more_inputs(tokens, d_in, d_out, num_experts, requires_grad=trainable, **options)


def run(inputs, top_k, backend, *, upcast=False, **options):
    """Output, routing and the gradients of every trainable input under a fixed random gy."""
    tensors = {name: None if t is None else (t.detach().double() if upcast else t.detach()).requires_grad_(t.requires_grad)
               for name, t in inputs.items()}
    y, indices, gates = more_linear(*tensors.values(), top_k, backend=backend, return_routing=True, **options)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    trainable = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [tensors[name] for name in trainable], grad_y) if y.numel() else []
    return y, indices, gates, dict(zip(trainable, grads))


def assert_matches_reference(inputs, top_k, **options):
    dtype = inputs["x"].dtype
    # fp32 against a float64 reference; fp16 against the reference on the same fp16 inputs.
    expected = run(inputs, top_k, "reference", upcast=dtype == torch.float32, **options)
    actual = run(inputs, top_k, "triton", **options)
    y, indices, gates, grads = actual
    assert y.dtype == dtype and y.shape == expected[0].shape
    assert indices.dtype == torch.int64 and gates.dtype == torch.float32
    assert torch.equal(indices, expected[1])
    assert_close_for(gates, expected[2], dtype, "gates")
    assert_close_for(y, expected[0], dtype, "output")
    assert grads.keys() == expected[3].keys()
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == inputs[name].shape, name
        assert_close_for(grad, expected[3][name], dtype, f"grad of {name}")


@pytest.mark.parametrize("num_experts", [DENSE_POOL, STREAMING_POOL], ids=["dense", "streaming"])
@pytest.mark.parametrize("router", ["linear", "expert_space"])
@pytest.mark.parametrize("gate", ["topk_softmax", "softmax_topk"])
def test_forward_routing_and_every_gradient_match_reference(num_experts, router, gate):
    # Odd sizes everywhere; train_experts adds dA and dB.
    inputs = make_inputs((11,), 37, 29, num_experts, router=router, train_experts=True, seed=num_experts)
    assert_matches_reference(inputs, 3, router=router, gate=gate)


@pytest.mark.parametrize("num_experts", [DENSE_POOL, STREAMING_POOL], ids=["dense", "streaming"])
def test_leading_dims_non_contiguous_x_and_no_base(num_experts):
    inputs = make_inputs((4, 3), 21, 18, num_experts, base=False, router_bias=False, seed=3)
    inputs["x"] = inputs["x"].detach().transpose(0, 1).requires_grad_()
    assert not inputs["x"].is_contiguous()
    assert_matches_reference(inputs, 2, gamma=0.7)


@pytest.mark.parametrize("router", ["linear", "expert_space"])
def test_float16(router):
    inputs = make_inputs((13,), 40, 24, DENSE_POOL, router=router, dtype=torch.float16, seed=5)
    assert_matches_reference(inputs, 4, router=router, gate="softmax_topk" if router == "linear" else "topk_softmax")


@pytest.mark.parametrize("top_k", [1, DENSE_POOL], ids=["k=1", "k=N"])
def test_extreme_k(top_k):
    inputs = make_inputs((9,), 16, 20, DENSE_POOL, train_experts=True, seed=top_k)
    assert_matches_reference(inputs, top_k)


def test_streaming_k_at_bucket_edge():
    k_max = configs.STREAM_K_BUCKETS[0]
    inputs = make_inputs((5,), 17, 16, STREAMING_POOL, seed=8)
    assert_matches_reference(inputs, k_max, gate="softmax_topk")


def test_zero_tokens():
    inputs = make_inputs((0,), 16, 12, DENSE_POOL, train_experts=True)
    y, indices, gates = more_linear(*inputs.values(), 3, backend="triton", return_routing=True)
    assert y.shape == (0, 12) and indices.shape == (0, 3) and gates.shape == (0, 3)
    y.sum().backward()
    assert inputs["x"].grad.shape == (0, 16)
    assert torch.count_nonzero(inputs["router_weight"].grad) == 0


def test_expert_gradients_absent_when_frozen():
    inputs = make_inputs((6,), 16, 12, DENSE_POOL)
    more_linear(*inputs.values(), 3, backend="triton").sum().backward()
    assert inputs["expert_a"].grad is None and inputs["expert_b"].grad is None
    assert inputs["router_weight"].grad is not None


def test_streaming_rejects_k_above_largest_bucket():
    top_k = configs.STREAM_K_BUCKETS[-1] + 1
    inputs = make_inputs((2,), 16, 16, top_k + 1)
    with pytest.raises(ValueError, match="top_k: the Triton streaming layout"):
        more_linear(*inputs.values(), top_k, backend="triton")


@settings(max_examples=6, deadline=None)
@given(
    tokens=st.integers(1, 20),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    num_experts=st.integers(1, 24),
    k_fraction=st.floats(0.0, 1.0),
    router=st.sampled_from(["linear", "expert_space"]),
    gate=st.sampled_from(["topk_softmax", "softmax_topk"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(tokens, d_in, d_out, num_experts, k_fraction, router, gate, seed):
    top_k = max(1, round(k_fraction * num_experts))
    inputs = make_inputs((tokens,), d_in, d_out, num_experts, router=router, train_experts=True, seed=seed)
    assert_matches_reference(inputs, top_k, router=router, gate=gate)


@pytest.mark.parametrize("num_experts", [DENSE_POOL, STREAMING_POOL], ids=["dense", "streaming"])
@pytest.mark.parametrize("tokens", [0, 1, 5])
def test_inference_without_grad_matches_reference(num_experts, tokens):
    """No gradient wanted: the launcher runs directly, outside the custom op and its autograd."""
    inputs = make_more_inputs((tokens,), 24, 20, num_experts, seed=tokens)
    with torch.no_grad():
        y, indices, gates = more_linear(*inputs.values(), 3, backend="triton", return_routing=True)
    want_y, want_indices, want_gates = more_linear(*inputs.values(), 3, backend="reference", return_routing=True)
    assert torch.equal(indices, want_indices)
    assert y.shape == (tokens, 20)
    if tokens:
        assert_close_for(y, want_y, what="output")
        assert_close_for(gates, want_gates, what="gates")


def test_projected_router_layer_forward_and_router_gradient():
    """The layer's projected router (z = U (P x)) runs on the Triton kernels as the linear router U P."""
    from smartfed.layer import MoRELinear
    from smartfed_kernels import reference

    generator = torch.Generator().manual_seed(5)
    layer = MoRELinear(torch.nn.Linear(24, 16), torch.randn(DENSE_POOL, 24, generator=generator) * 0.3,
                       torch.randn(16, DENSE_POOL, generator=generator) * 0.3, 4, router="projected", router_dim=6,
                       backend="triton", router_init="affinity")
    x = torch.randn(11, 24, generator=generator)
    y = layer(x)
    u = layer.router_weight.detach().clone().requires_grad_()
    want = reference.more_linear(x, layer.base.weight, layer.base.bias, u @ layer.router_projection,
                                 layer.router_bias.detach(), layer.expert_a, layer.expert_b, 4)
    assert_close_for(y, want)
    grad_y = torch.randn(y.shape, generator=generator)
    (y * grad_y).sum().backward()
    (want * grad_y).sum().backward()
    assert_close_for(layer.router_weight.grad, u.grad, what="grad U")
