import pytest
import torch
from torch import nn

from smartfed import MoRELinear
from smartfed_kernels import reference
from smartfed_kernels.testing import assert_close_for, make_more_inputs, relative_error

D_IN, D_OUT, N = 24, 20, 6


@pytest.fixture
def parts():
    inputs = make_more_inputs((2, 5), D_IN, D_OUT, N, seed=7)
    base = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        base.weight.copy_(inputs["weight"])
        base.bias.copy_(inputs["bias"])
    return base, inputs["expert_a"], inputs["expert_b"], inputs["x"]


def make_layer(parts, top_k=3, **options):
    base, expert_a, expert_b, _ = parts
    layer = MoRELinear(base, expert_a, expert_b, top_k, **options)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        # Spread logits well apart so the top-k choice is not decided by rounding.
        layer.router_weight.copy_(torch.randn(layer.router_weight.shape, generator=generator))
        if layer.router_bias is not None:
            layer.router_bias.copy_(torch.randn(N, generator=generator))
    return layer


def reference_output(layer, x, top_k=None, dtype=torch.float32):
    def cast(t):
        return None if t is None else t.detach().to(dtype)

    return reference.more_linear(
        x.to(dtype), cast(layer.base.weight), cast(layer.base.bias), cast(layer.router_weight),
        cast(layer.router_bias), cast(layer.expert_a), cast(layer.expert_b), top_k or layer.top_k,
        gate=layer.gate, gamma=layer.gamma, router=layer.router,
    )


@pytest.mark.parametrize("router", ["linear", "expert_space"])
@pytest.mark.parametrize("gate", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("router_bias", [True, False])
def test_forward_matches_reference(parts, router, gate, router_bias):
    layer = make_layer(parts, router=router, gate=gate, router_bias=router_bias)
    x = parts[3]
    out = layer(x)
    assert out.shape == (2, 5, D_OUT)
    assert_close_for(out, reference_output(layer, x))
    assert not torch.allclose(out, layer.base(x), atol=1e-3)


def test_top_k_and_gamma_at_runtime(parts):
    layer = make_layer(parts, top_k=3)
    x = parts[3]
    layer.top_k = 5
    assert_close_for(layer(x), reference_output(layer, x, top_k=5))
    assert not torch.allclose(reference_output(layer, x, top_k=5), reference_output(layer, x, top_k=3))
    fixed = make_layer(parts, top_k=2, gamma=1.5)
    fixed.top_k = 4
    assert_close_for(fixed(x), reference_output(fixed, x))
    assert fixed.gamma == 1.5
    for bad, error, message in [(0, ValueError, "1 <= top_k <= N=6, got 0"), (7, ValueError, "N=6, got 7"),
                                (2.0, TypeError, "expected an int, got float"),
                                (True, TypeError, "expected an int, got bool")]:
        with pytest.raises(error, match=message):
            layer.top_k = bad
    assert layer.top_k == 5


def test_observer_path_equals_fused_path_and_sees_the_split(parts):
    layer = make_layer(parts, top_k=3)
    x = parts[3].clone().requires_grad_(True)
    fused = layer(x)
    fused_grads = torch.autograd.grad(fused.square().sum(), [x, layer.router_weight, layer.router_bias])
    seen, delta_grads = [], []

    def observe(module, inputs, y0, delta):
        seen.append((module, inputs, y0, delta))
        delta.register_hook(delta_grads.append)

    handle = layer.add_observer(observe)
    observed = layer(x)
    torch.testing.assert_close(observed, fused, rtol=1e-6, atol=1e-6)
    (module, inputs, y0, delta), = seen
    assert module is layer and inputs is x
    torch.testing.assert_close(y0, layer.base(x), rtol=0, atol=0)
    torch.testing.assert_close(y0 + delta, observed, rtol=0, atol=0)
    observed_grads = torch.autograd.grad(observed.square().sum(), [x, layer.router_weight, layer.router_bias])
    for got, want in zip(observed_grads, fused_grads):
        assert_close_for(got, want)
    torch.testing.assert_close(delta_grads[0], 2 * observed.detach(), rtol=1e-6, atol=1e-6)

    handle.remove()
    layer(x)
    assert len(seen) == 1
    with pytest.raises(TypeError, match="fn: expected a callable"):
        layer.add_observer(3)


@pytest.mark.parametrize("router", ["linear", "expert_space"])
def test_gradients_reach_only_the_router_and_match_reference(parts, router):
    layer = make_layer(parts, top_k=3, router=router)
    x = parts[3].clone().requires_grad_(True)
    grad_out = torch.randn(2, 5, D_OUT, generator=torch.Generator().manual_seed(3))
    layer(x).backward(grad_out)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["router_weight", "router_bias"]
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert {name for name, _ in layer.named_buffers()} == {"expert_a", "expert_b"}

    router_weight = layer.router_weight.detach().clone().requires_grad_(True)
    router_bias = layer.router_bias.detach().clone().requires_grad_(True)
    x_ref = parts[3].clone().requires_grad_(True)
    reference.more_linear(x_ref, layer.base.weight, layer.base.bias, router_weight, router_bias,
                          layer.expert_a, layer.expert_b, 3, router=router).backward(grad_out)
    assert layer.router_weight.grad.abs().max() > 0
    assert_close_for(layer.router_weight.grad, router_weight.grad)
    assert_close_for(layer.router_bias.grad, router_bias.grad)
    assert_close_for(x.grad, x_ref.grad)


def test_train_experts_makes_experts_parameters_with_reference_gradients(parts):
    base, expert_a, expert_b, x = parts
    layer = make_layer(parts, top_k=2, train_experts=True)
    assert isinstance(layer.expert_a, nn.Parameter) and layer.expert_a.requires_grad
    assert layer.expert_a.data_ptr() != expert_a.data_ptr()
    layer(x).sum().backward()
    a_ref = expert_a.clone().requires_grad_(True)
    b_ref = expert_b.clone().requires_grad_(True)
    reference.more_linear(x, base.weight, base.bias, layer.router_weight.detach(), layer.router_bias.detach(),
                          a_ref, b_ref, 2).sum().backward()
    assert_close_for(layer.expert_a.grad, a_ref.grad)
    assert_close_for(layer.expert_b.grad, b_ref.grad)


@pytest.mark.parametrize("whole_layer", [True, False])
def test_bfloat16_inputs_cast_router_and_experts(parts, whole_layer):
    layer = make_layer(parts, top_k=3)
    expected = reference_output(layer, parts[3])
    if whole_layer:
        layer.to(torch.bfloat16)
    else:
        layer.base.to(torch.bfloat16)
        assert layer.router_weight.dtype == torch.float32
    out = layer(parts[3].to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # Looser than the bf16 tolerance: expected is the fp32 reference on the unrounded weights and x, so
    # rounding them to bf16 (2^-9 relative each) adds to the error of the bf16 computation itself.
    assert relative_error(out, expected) <= 2e-2


def test_router_inits(parts):
    base, expert_a, _, _ = parts
    zeros = MoRELinear(base, expert_a, parts[2], 2, router_init="zeros")
    assert torch.count_nonzero(zeros.router_weight) == 0 and torch.count_nonzero(zeros.router_bias) == 0
    affinity = MoRELinear(base, expert_a, parts[2], 2, router_init="affinity")
    torch.testing.assert_close(affinity.router_weight, expert_a / expert_a.norm(dim=1, keepdim=True))
    space = MoRELinear(base, expert_a, parts[2], 2, router="expert_space", router_init="affinity")
    torch.testing.assert_close(space.router_weight, torch.eye(N))
    first = MoRELinear(base, expert_a, parts[2], 2, router_init="normal", seed=5)
    again = MoRELinear(base, expert_a, parts[2], 2, router_init="normal", seed=5)
    other = MoRELinear(base, expert_a, parts[2], 2, router_init="normal", seed=6)
    torch.testing.assert_close(first.router_weight, again.router_weight, rtol=0, atol=0)
    assert not torch.equal(first.router_weight, other.router_weight)
    assert 5e-4 < first.router_weight.std().item() < 2e-3


def test_constructor_rejects_bad_arguments(parts):
    base, expert_a, expert_b, _ = parts
    cases = [
        ((nn.Conv1d(2, 2, 1), expert_a, expert_b, 2), {}, TypeError, "base: expected an nn.Linear, got Conv1d"),
        ((base, expert_a[:, :5], expert_b, 2), {}, ValueError, r"expert_a: expected shape \[N, d_in=24\]"),
        ((base, expert_a, expert_b[:4], 2), {}, ValueError, r"expert_b: expected shape \(20, 6\)"),
        ((base, expert_a, expert_b, 7), {}, ValueError, "top_k: expected 1 <= top_k <= N=6, got 7"),
        ((base, expert_a, expert_b, 2), {"router": "mlp"}, ValueError, "router: expected one of"),
        ((base, expert_a, expert_b, 2), {"router_init": "ones"}, ValueError, "router_init: expected one of"),
        ((base, expert_a, expert_b, 2), {"origins": [("a", 0)]}, ValueError, "origins: expected 6 entries"),
        ((base, expert_a, expert_b, 2), {"gamma": float("nan")}, ValueError, "gamma: expected a finite number"),
    ]
    for args, options, error, message in cases:
        with pytest.raises(error, match=message):
            MoRELinear(*args, **options)


def test_drop_in_attributes(parts):
    layer = make_layer(parts, top_k=2, origins=[("a", j) for j in range(N)])
    assert (layer.in_features, layer.out_features, layer.num_experts) == (D_IN, D_OUT, N)
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    assert not layer.base.weight.requires_grad
    assert layer.origins[5] == ("a", 5)
    assert "num_experts=6, top_k=2, router='linear'" in repr(layer)
