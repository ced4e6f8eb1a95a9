"""The fast PyTorch MoRE path against the reference: outputs, routing, every gradient, dispatch."""

import pytest
import torch

import smartfed_kernels
from smartfed_kernels import reference, torch_ops
from smartfed_kernels.forms import GATE_FORMS, ROUTER_FORMS
from smartfed_kernels.testing import ARGUMENTS as INPUT_NAMES, assert_close_for, make_more_inputs

ROUTERS = tuple(ROUTER_FORMS)
GATES = tuple(GATE_FORMS)


def make_inputs(tokens, d_in, d_out, num_experts, **options):
    """The shared inputs with every tensor requiring grad, so run_both checks every gradient."""
    return make_more_inputs(tokens, d_in, d_out, num_experts, requires_grad=True, **options)


def call(impl, inputs, top_k, **options):
    return impl(*(inputs[name] for name in INPUT_NAMES), top_k, return_routing=True, **options)


def run_both(inputs, top_k, **options):
    """Output, routing and the gradient of every input that requires one, for both paths."""
    results = []
    differentiable = [name for name in INPUT_NAMES
                      if inputs[name] is not None and inputs[name].requires_grad]
    grad_gen = torch.Generator().manual_seed(99)
    grad_out = None
    for impl in (reference.more_linear, torch_ops.more_linear):
        y, indices, gates = call(impl, inputs, top_k, **options)
        if grad_out is None:
            grad_out = torch.randn(y.shape, generator=grad_gen, dtype=torch.float64).to(y.dtype)
        grads = torch.autograd.grad(y, [inputs[n] for n in differentiable], grad_out, allow_unused=True)
        results.append((y, indices, gates, dict(zip(differentiable, grads))))
    return results


def assert_paths_agree(inputs, top_k, dtype, **options):
    (y_ref, i_ref, g_ref, grads_ref), (y, i, g, grads) = run_both(inputs, top_k, **options)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert y.is_contiguous()
    assert torch.equal(i, i_ref), "indices differ from the reference"
    assert g.dtype == g_ref.dtype
    assert_close_for(y, y_ref, dtype, "output")
    assert_close_for(g, g_ref, dtype, "gates")
    for name, expected in grads_ref.items():
        assert grads[name] is not None and grads[name].dtype == expected.dtype, name
        assert_close_for(grads[name], expected, dtype, f"grad of {name}")


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead_shape,d_in,d_out,num_experts,top_k", [
    ((37,), 23, 19, 11, 3),
    ((2, 3, 5), 16, 24, 8, 1),
    ((29,), 12, 7, 6, 6),
])
def test_matches_reference(router, gate, dtype, lead_shape, d_in, d_out, num_experts, top_k):
    inputs = make_inputs(lead_shape, d_in, d_out, num_experts, router=router, dtype=dtype, seed=top_k)
    assert_paths_agree(inputs, top_k, dtype, router=router, gate=gate)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("base,router_bias", [(False, True), (True, False), (False, False)])
def test_optional_tensors(router, base, router_bias):
    inputs = make_inputs((17,), 10, 9, 7, router=router, base=base, router_bias=router_bias, seed=3)
    assert_paths_agree(inputs, 4, torch.float32, router=router, gamma=0.7)


@pytest.mark.parametrize("router", ROUTERS)
def test_frozen_experts_and_base(router):
    """The usual training setup: only x and the router require grad; frozen inputs get none."""
    inputs = make_inputs((21,), 14, 11, 9, router=router, seed=5)
    for name in ("weight", "bias", "expert_a", "expert_b"):
        inputs[name] = inputs[name].detach()
    assert_paths_agree(inputs, 3, torch.float32, router=router)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("router", ROUTERS)
def test_half_precision_upcasts(dtype, router):
    inputs = make_inputs((33,), 20, 18, 12, router=router, dtype=dtype, seed=7)
    assert_paths_agree(inputs, 5, dtype, router=router, gate="softmax_topk")


def test_non_contiguous_x():
    inputs = make_inputs((19,), 13, 8, 6, seed=11, non_contiguous=("x",))
    assert not inputs["x"].is_contiguous()
    assert_paths_agree(inputs, 2, torch.float32)


@pytest.mark.parametrize("router", ROUTERS)
def test_zero_tokens(router):
    inputs = make_inputs((0,), 8, 6, 5, router=router)
    y, indices, gates = call(torch_ops.more_linear, inputs, 2, router=router)
    assert y.shape == (0, 6) and indices.shape == (0, 2) and gates.shape == (0, 2)
    grads = torch.autograd.grad(y.sum(), [inputs["x"], inputs["router_weight"]])
    assert grads[0].shape == (0, 8)
    assert torch.count_nonzero(grads[1]) == 0


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
def test_zero_router_picks_lowest_indices(router, gate):
    inputs = make_inputs((9,), 10, 6, 8, router=router, seed=2)
    with torch.no_grad():
        inputs["router_weight"].zero_()
        inputs["router_bias"].zero_()
    _, indices, gates = call(torch_ops.more_linear, inputs, 3, router=router, gate=gate)
    assert torch.equal(indices, torch.arange(3).expand(9, 3))
    expected = 1 / 3 if gate == "topk_softmax" else 1 / 8
    torch.testing.assert_close(gates, torch.full((9, 3), expected))
    assert_paths_agree(inputs, 3, torch.float32, router=router, gate=gate)


def test_ties_in_some_rows_follow_the_reference():
    """Rows of x that are zero give logits equal to the (tied) bias; the other rows do not tie."""
    inputs = make_inputs((12,), 10, 6, 8, seed=4)
    with torch.no_grad():
        inputs["x"][::3] = 0.0
        inputs["router_bias"].copy_(torch.tensor([0.5, 1.0, 0.5, 1.0, 0.2, 0.5, 1.0, 0.5]))
    _, indices, _ = call(torch_ops.more_linear, inputs, 4)
    assert torch.equal(indices[0], torch.tensor([1, 3, 6, 0]))
    assert_paths_agree(inputs, 4, torch.float32)


@pytest.mark.parametrize("top_k", [1, 3, 5, 8])
def test_select_top_k_matches_stable_sort(top_k):
    logits = torch.randint(0, 4, (300, 8), generator=torch.Generator().manual_seed(top_k)).float()
    values, indices = torch_ops.select_top_k(logits, top_k)
    expected = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(indices.sort(dim=-1).values, expected.sort(dim=-1).values)
    assert torch.equal(values, logits.gather(1, indices))


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("impl", [reference.more_linear, torch_ops.more_linear], ids=["reference", "torch"])
def test_gradcheck(router, gate, impl):
    inputs = make_inputs((4,), 5, 3, 6, router=router, dtype=torch.float64, seed=8)

    def output(*tensors):
        return impl(*tensors, 3, router=router, gate=gate, gamma=1.3)

    assert torch.autograd.gradcheck(output, tuple(inputs[name] for name in INPUT_NAMES))


@pytest.mark.parametrize("backend,module", [("torch", torch_ops), ("auto", torch_ops), ("reference", reference)])
def test_public_dispatch(backend, module):
    inputs = make_inputs((2, 7), 9, 5, 6, seed=9)
    y, indices, gates = call(smartfed_kernels.more_linear, inputs, 2, backend=backend)
    y_direct, indices_direct, gates_direct = call(module.more_linear, inputs, 2)
    assert torch.equal(y, y_direct) and torch.equal(indices, indices_direct) and torch.equal(gates, gates_direct)
    assert smartfed_kernels.resolve_backend(backend, inputs["x"]) == ("torch" if backend == "auto" else backend)


def test_dispatch_rejects_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs((3,), 4, 4, 4)
    with pytest.raises(RuntimeError, match="backend='triton'.*TRITON_INTERPRET=1"):
        call(smartfed_kernels.more_linear, inputs, 2, backend="triton")


def test_dispatch_rejects_unknown_backend():
    inputs = make_inputs((3,), 4, 4, 4)
    with pytest.raises(ValueError, match="backend: expected one of"):
        call(smartfed_kernels.more_linear, inputs, 2, backend="cuda")


def _replace(inputs, **changes):
    return {**{k: (v.detach() if v is not None else None) for k, v in inputs.items()}, **changes}


VALIDATION_CASES = [
    ("weight: expected shape \\(5, 6\\)", lambda i: _replace(i, weight=torch.randn(6, 5)), {}),
    ("bias: expected shape \\(5,\\)", lambda i: _replace(i, bias=torch.randn(4)), {}),
    ("router_weight \\(router='linear'\\): expected shape \\(4, 6\\)",
     lambda i: _replace(i, router_weight=torch.randn(4, 4)), {}),
    ("router_weight \\(router='expert_space'\\): expected shape \\(4, 4\\)", lambda i: _replace(i),
     {"router": "expert_space"}),
    ("router_bias: expected shape \\(4,\\)", lambda i: _replace(i, router_bias=torch.randn(5)), {}),
    ("expert_b: expected dtype torch.float32", lambda i: _replace(i, expert_b=torch.randn(5, 4).double()), {}),
    ("weight: expected device cpu", lambda i: _replace(i, weight=torch.empty(5, 6, device="meta")), {}),
    ("x: expected last dimension d_in=6", lambda i: _replace(i, x=torch.randn(3, 7)), {}),
    ("x: expected a floating dtype", lambda i: _replace(i, x=torch.ones(3, 6, dtype=torch.int64)), {}),
    ("bias: expected None when weight is None", lambda i: _replace(i, weight=None), {}),
    ("gate: expected one of", lambda i: _replace(i), {"gate": "softmax"}),
    ("router: expected one of", lambda i: _replace(i), {"router": "mlp"}),
]


@pytest.mark.parametrize("impl", [torch_ops.more_linear, smartfed_kernels.more_linear, reference.more_linear],
                         ids=["torch", "public", "reference"])
@pytest.mark.parametrize("message,change,options", VALIDATION_CASES, ids=[c[0][:24] for c in VALIDATION_CASES])
def test_validation_names_the_argument(impl, message, change, options):
    inputs = change(make_inputs((3,), 6, 5, 4))
    with pytest.raises((ValueError, TypeError), match=message):
        impl(*(inputs[name] for name in INPUT_NAMES), 2, **options)


@pytest.mark.parametrize("top_k,message", [(5, "top_k: expected 1 <= top_k <= N=4, got 5"),
                                           (0, "top_k: expected 1 <= top_k <= N=4, got 0"),
                                           (2.0, "top_k: expected an int")])
def test_validation_of_top_k(top_k, message):
    inputs = make_inputs((3,), 6, 5, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        call(torch_ops.more_linear, inputs, top_k)
