"""The inference and decode paths (issue 13): no autograd Function, no per-call validation in the
layer, one CPU inference path entered through dispatch by the op and the layer alike, no host
syncs in the Triton launcher, and the same results as the reference throughout."""

import ast
import copy
import inspect
from pathlib import Path

import pytest
import torch
from torch import nn

import smartfed.layer
from smartfed.layer import MoRELinear
from smartfed_kernels import dispatch, more_linear, reference, torch_ops
from smartfed_kernels.forms import GATE_FORMS, ROUTER_FORMS
from smartfed_kernels.testing import ARGUMENTS as NAMES, assert_close_for, make_more_inputs as make_inputs

ROUTERS = tuple(ROUTER_FORMS)
GATES = tuple(GATE_FORMS)
LAUNCHER_FILES = ("launch.py", "autograd.py")
HOST_SYNCS = ("item", "cpu", "tolist", "nonzero", "numpy")


@pytest.fixture(autouse=True, params=["c-kernels", "pytorch"])
def cpu_path(request, monkeypatch):
    """Every test runs with the C kernels (smartfed_kernels.cpu; skipped where they are not built,
    failed under SMARTFED_REQUIRE_CPU_KERNELS=1) and with the PyTorch ops alone."""
    if request.param == "pytorch":
        monkeypatch.setattr(torch_ops.cpu_kernels, "_enabled", False)
    else:
        request.getfixturevalue("cpu_kernels")
    return request.param


def routed(impl, inputs, top_k, **options):
    return impl(*(inputs[n] for n in NAMES), top_k, return_routing=True, **options)


def assert_same_as_reference(inputs, top_k, **options):
    with torch.no_grad():
        y, indices, gates = routed(torch_ops.more_linear, inputs, top_k, **options)
    want_y, want_indices, want_gates = routed(reference.more_linear, inputs, top_k, **options)
    assert torch.equal(indices, want_indices)
    assert_close_for(y, want_y, what="output")
    assert_close_for(gates, want_gates, y.dtype, "gates")


# Token counts on both sides of the PyTorch fall-back's dense-expand threshold (11 experts, k=3,
# d_out=19: up to 862 tokens), and none.
TOKENS = (0, 1, 5, 64, 97, 900)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
def test_inference_path_matches_reference(tokens, router, gate):
    inputs = make_inputs(tokens, 23, 19, 11, router=router, seed=tokens + 1)
    assert_same_as_reference(inputs, 3, router=router, gate=gate)


@pytest.mark.parametrize("tokens", [0, 1, 5])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("top_k", [1, 4, 11], ids=["k=1", "k=4", "k=N"])
def test_decode_with_sparse_expand_matches_reference(monkeypatch, tokens, router, gate, top_k):
    """Large pools or outputs at decode size: the embedding_bag expand instead of the dense tile."""
    monkeypatch.setattr(torch_ops, "DENSE_EXPAND_MAX_WASTE", -1)
    inputs = make_inputs(tokens, 23, 19, 11, router=router, seed=tokens + 7)
    assert_same_as_reference(inputs, top_k, router=router, gate=gate)


@pytest.mark.parametrize("tokens", [1, 97])
@pytest.mark.parametrize("top_k", [1, 11], ids=["k=1", "k=N"])
@pytest.mark.parametrize("base,router_bias", [(True, True), (False, True), (True, False)])
def test_inference_path_extreme_k_and_optional_tensors(tokens, top_k, base, router_bias):
    inputs = make_inputs(tokens, 17, 13, 11, base=base, router_bias=router_bias, seed=top_k)
    assert_same_as_reference(inputs, top_k, gamma=0.7)


@pytest.mark.parametrize("tokens", [7, 97])
def test_inference_path_non_contiguous_views(tokens):
    inputs = make_inputs(tokens, 13, 9, 6, seed=4, non_contiguous=("x", "expert_b", "router_weight"))
    assert not (inputs["x"].is_contiguous() or inputs["expert_b"].is_contiguous())
    assert_same_as_reference(inputs, 2)


@pytest.mark.parametrize("tokens", [3, 97])
def test_inference_path_ties_go_to_the_lower_index(tokens):
    inputs = make_inputs(tokens, 10, 6, 8, seed=2)
    inputs["x"][::2] = 0.0
    inputs["router_bias"] = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.2, 0.5, 1.0, 0.5])
    assert_same_as_reference(inputs, 4)
    with torch.no_grad():
        _, indices, _ = routed(torch_ops.more_linear, inputs, 4)
    assert indices[0].tolist() == [1, 3, 6, 0]


@pytest.mark.parametrize("tokens", [5, 97])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inference_path_half_precision(tokens, dtype):
    inputs = make_inputs(tokens, 20, 18, 12, dtype=dtype, seed=9)
    with torch.no_grad():
        y = torch_ops.more_linear(*(inputs[n] for n in NAMES), 5, gate="softmax_topk")
    want = reference.more_linear(*(inputs[n] for n in NAMES), 5, gate="softmax_topk")
    assert y.dtype == dtype
    assert_close_for(y, want)


def test_inference_path_without_grad_mode_off():
    """Inputs that need no gradient take the inference path even with grad mode on."""
    inputs = make_inputs(29, 12, 10, 7, seed=3)
    y = torch_ops.more_linear(*(inputs[n] for n in NAMES), 3)
    assert y.grad_fn is None
    assert_close_for(y, reference.more_linear(*(inputs[n] for n in NAMES), 3))


def test_inference_path_skips_the_autograd_function(monkeypatch):
    def refuse(*args):
        raise AssertionError("the autograd Function ran without any gradient to compute")

    monkeypatch.setattr(torch_ops.MoRELinearFunction, "apply", refuse)
    inputs = make_inputs(9, 12, 10, 7)
    inputs["x"].requires_grad_()
    with torch.no_grad():
        more_linear(*(inputs[n] for n in NAMES), 3)


@pytest.mark.parametrize("router", ROUTERS)
def test_reference_handles_zero_tokens(router):
    inputs = make_inputs(0, 8, 6, 5, router=router)
    y, indices, gates = routed(reference.more_linear, inputs, 2, router=router)
    assert y.shape == (0, 6) and indices.shape == (0, 2) and gates.shape == (0, 2)
    inputs["x"] = torch.zeros(3, 0, 8)
    assert reference.more_linear(*(inputs[n] for n in NAMES), 2, router=router).shape == (3, 0, 6)


@pytest.mark.parametrize("impl", [reference.more_linear, torch_ops.more_linear], ids=["reference", "torch"])
@pytest.mark.parametrize("tokens", [2, 97])
def test_equal_zero_gates_are_ordered_by_lower_index(impl, tokens):
    """Logits -400, -300, -200 give gates that underflow to exactly 0: equal gates, lower index first."""
    inputs = make_inputs(tokens, 6, 5, 6, seed=1)
    inputs["router_weight"] = torch.zeros(6, 6)
    inputs["router_bias"] = torch.tensor([-400.0, -300.0, -200.0, 0.0, -1000.0, -1000.0])
    with torch.no_grad():
        _, indices, gates = routed(impl, inputs, 4, gate="softmax_topk")
    assert indices[0].tolist() == [3, 0, 1, 2]
    assert gates[0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("impl", [reference.more_linear, more_linear], ids=["reference", "public"])
def test_transposed_expert_b_names_the_shape_meant(impl):
    inputs = make_inputs(3, 16, 48, 16)
    inputs["expert_b"] = inputs["expert_b"].t().contiguous()
    with pytest.raises(ValueError, match=r"expert_b: expected shape \(48, 16\), got \(16, 48\)"):
        impl(*(inputs[n] for n in NAMES), 2)


# MoRELinear: validated once, every option change and tensor update seen on the next call.

def make_layer(d_in=21, d_out=15, num_experts=9, top_k=3, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    layer = MoRELinear(base, torch.randn(num_experts, d_in, generator=generator) * 0.3,
                       torch.randn(d_out, num_experts, generator=generator), top_k, seed=seed, **options)
    with torch.no_grad():
        layer.router_weight.copy_(torch.randn(layer.router_weight.shape, generator=generator))
        if layer.router_bias is not None:
            layer.router_bias.copy_(torch.randn(num_experts, generator=generator))
    return layer


def layer_reference(layer, x):
    def cast(t):
        return None if t is None else t.detach().to(x.dtype)

    return reference.more_linear(
        x, cast(layer.base.weight), cast(layer.base.bias), cast(layer.router_weight), cast(layer.router_bias),
        cast(layer.expert_a), cast(layer.expert_b), layer.top_k, gate=layer.gate, gamma=layer.gamma,
        router=layer.router,
    )


def assert_layer_matches(layer, x):
    with torch.no_grad():
        got = layer(x)
    assert_close_for(got, layer_reference(layer, x))
    return got


@pytest.mark.parametrize("tokens", [1, 16, 97])
@pytest.mark.parametrize("router", ROUTERS)
def test_layer_inference_matches_reference(tokens, router):
    layer = make_layer(router=router)
    x = torch.randn(2, tokens, 21, generator=torch.Generator().manual_seed(tokens))
    assert_layer_matches(layer, x)


def test_layer_validates_at_construction_not_per_call(monkeypatch):
    layer = make_layer()
    x = torch.randn(4, 21)

    def refuse(*args, **kwargs):
        raise AssertionError("a forward on valid inputs re-validated the layer's own tensors")

    monkeypatch.setattr(smartfed.layer, "check_more_inputs", refuse)
    assert_layer_matches(layer, x)
    layer.top_k = 5
    assert_layer_matches(layer, x)


def test_layer_names_what_is_wrong_with_x():
    layer = make_layer()
    with pytest.raises(ValueError, match="x: expected last dimension d_in=21"):
        layer(torch.randn(3, 20))
    with pytest.raises(TypeError, match="weight: expected dtype torch.float64"):
        layer(torch.randn(3, 21, dtype=torch.float64))


def test_layer_sees_option_changes():
    layer = make_layer(top_k=3)
    x = torch.randn(7, 21, generator=torch.Generator().manual_seed(1))
    outputs = [assert_layer_matches(layer, x)]
    layer.top_k = 6
    outputs.append(assert_layer_matches(layer, x))
    layer.gamma = 0.5
    outputs.append(assert_layer_matches(layer, x))
    layer.gate = "softmax_topk"
    outputs.append(assert_layer_matches(layer, x))
    for before, after in zip(outputs, outputs[1:]):
        assert not torch.allclose(before, after)
    layer.gate = "softmax"
    with pytest.raises(ValueError, match="gate: expected one of"):
        layer(x)


def test_layer_sees_router_updates_in_place_and_loaded():
    layer = make_layer()
    x = torch.randn(5, 21, generator=torch.Generator().manual_seed(2))
    before = assert_layer_matches(layer, x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    optimizer.step()
    stepped = assert_layer_matches(layer, x)
    assert not torch.allclose(before, stepped)

    other = make_layer(seed=3)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(assert_layer_matches(layer, x), assert_layer_matches(other, x), rtol=0, atol=0)
    with torch.no_grad():
        layer.router_weight.data.copy_(torch.randn(layer.router_weight.shape))
    assert_layer_matches(layer, x)


def test_layer_keeps_expert_columns_contiguous_through_moves_and_copies():
    layer = make_layer(train_experts=True)
    x = torch.randn(6, 21, generator=torch.Generator().manual_seed(4))
    assert layer.expert_b.shape == (15, 9) and layer.expert_b.t().is_contiguous()
    assert_layer_matches(layer, x)
    wide = layer.to(torch.float64)
    assert wide.expert_b.t().is_contiguous()
    assert_layer_matches(wide, x.double())
    twin = copy.deepcopy(wide)
    assert twin.expert_b.t().is_contiguous()
    torch.testing.assert_close(twin(x.double()), wide(x.double()), rtol=0, atol=0)
    wide(x.double()).sum().backward()
    assert wide.expert_b.grad.shape == (15, 9)


def test_layer_observers_see_the_same_output_under_no_grad():
    layer = make_layer()
    x = torch.randn(3, 21)
    seen = []
    layer.add_observer(lambda module, inputs, y0, delta: seen.append(delta))
    assert_layer_matches(layer, x)
    assert seen and seen[0].grad_fn is None


# The Triton launcher: nothing that waits on the device, so a CUDA graph can capture it.

def _host_syncs(path: Path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in HOST_SYNCS:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_triton_launcher_has_no_host_syncs():
    folder = Path(inspect.getfile(torch_ops)).parent / "triton"
    assert [name for name in LAUNCHER_FILES if (folder / name).is_file()] == list(LAUNCHER_FILES)
    assert [hit for name in LAUNCHER_FILES for hit in _host_syncs(folder / name)] == []


def test_host_sync_scan_finds_syncs(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(t):\n    return t.sum().item() + t.nonzero().cpu().tolist()[0]\n")
    assert len(_host_syncs(sample)) == 4


# One CPU token (the C kernel's own router products, or the PyTorch fall-back), and the layer's way to it.

@pytest.mark.parametrize("num_experts", [11, 97])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("top_k", ["1", "4", "N"])
def test_one_token_matches_reference(num_experts, router, gate, top_k):
    k = num_experts if top_k == "N" else int(top_k)
    inputs = make_inputs(1, 23, 19, num_experts, router=router, seed=num_experts + k)
    assert_same_as_reference(inputs, k, router=router, gate=gate)


@pytest.mark.parametrize("base,router_bias", [(False, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_one_token_optional_tensors_and_dtypes(base, router_bias, dtype):
    inputs = make_inputs(1, 17, 13, 9, base=base, router_bias=router_bias, dtype=dtype, seed=5)
    with torch.no_grad():
        y, indices, gates = routed(torch_ops.more_linear, inputs, 4, gamma=0.7, gate="softmax_topk")
    want_y, want_indices, want_gates = routed(reference.more_linear, inputs, 4, gamma=0.7, gate="softmax_topk")
    assert y.dtype == dtype and torch.equal(indices, want_indices)
    assert_close_for(y, want_y, what="output")
    assert_close_for(gates, want_gates, y.dtype, "gates")


def test_one_token_non_contiguous_views():
    inputs = make_inputs(1, 13, 9, 6, seed=4, non_contiguous=True)
    assert_same_as_reference(inputs, 2)


@pytest.mark.parametrize("num_experts", [8, 72])
def test_one_token_ties_go_to_the_lower_index(num_experts):
    """A zero router ties every expert; a bias ties the k-th and (k+1)-th logits only."""
    inputs = make_inputs(1, 10, 6, num_experts, seed=2)
    inputs["router_weight"] = torch.zeros_like(inputs["router_weight"])
    inputs["router_bias"] = torch.zeros(num_experts)
    assert_same_as_reference(inputs, 3)
    with torch.no_grad():
        assert routed(torch_ops.more_linear, inputs, 3)[1][0].tolist() == [0, 1, 2]
    inputs["router_bias"] = -torch.arange(num_experts, dtype=torch.float32)
    inputs["router_bias"][[1, 5, 6]] = torch.tensor([2.0, -1.0, -1.0])
    assert_same_as_reference(inputs, 3)
    with torch.no_grad():
        assert routed(torch_ops.more_linear, inputs, 3)[1][0].tolist() == [1, 0, 5]


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [[0], [2, 6], [8]], ids=["first", "middle", "last"])
@pytest.mark.parametrize("gate", GATES)
def test_one_token_non_finite_logits_match_reference(special, where, gate):
    """NaN and +inf take the general path; -inf logits are experts that can never win."""
    inputs = make_inputs(1, 12, 7, 9, seed=8)
    inputs["router_bias"][where] = special
    with torch.no_grad():
        y = torch_ops.more_linear(*(inputs[n] for n in NAMES), 3, gate=gate)
    want = reference.more_linear(*(inputs[n] for n in NAMES), 3, gate=gate)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert y.isnan().any() == (special != float("-inf"))


@pytest.mark.parametrize("shape", [(21,), (1, 21), (1, 1, 21), (3, 21), (4, 0, 21)])
@pytest.mark.parametrize("router", ROUTERS)
def test_layer_goes_through_dispatch_to_the_inference_path(monkeypatch, shape, router):
    """No shortcut: the layer asks dispatch for its backend and the torch backend's one inference
    path answers, without re-validating the layer's tensors or building a graph."""
    resolved, inference = [], []
    resolve, run = dispatch.resolve_backend, torch_ops.more_inference
    monkeypatch.setattr(smartfed.layer, "resolve_backend", lambda *a: resolved.append(a[0]) or resolve(*a))
    monkeypatch.setattr(torch_ops, "more_inference", lambda *a, **k: inference.append(1) or run(*a, **k))
    monkeypatch.setattr(torch_ops.MoRELinearFunction, "apply", None)
    monkeypatch.setattr(smartfed.layer, "check_more_inputs", None)
    layer = make_layer(router=router, num_experts=11, top_k=4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    got = assert_layer_matches(layer, x)
    assert got.shape == (*shape[:-1], 15)
    assert resolved == ["auto"] and inference == [1]


def test_layer_inference_on_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    generator = torch.Generator().manual_seed(3)
    conv = Conv1D(15, 21)
    with torch.no_grad():
        conv.bias.normal_(generator=generator)
    layer = MoRELinear(conv, torch.randn(9, 21, generator=generator), torch.randn(15, 9, generator=generator), 3,
                       seed=1)
    for tokens in (1, 5):
        x = torch.randn(tokens, 21, generator=generator)
        with torch.no_grad():
            got = layer(x)
            want = reference.more_linear(x, layer.base_weight_out_in(), conv.bias, layer.router_weight,
                                         layer.router_bias, layer.expert_a, layer.expert_b, 3)
        assert_close_for(got, want)


def test_layer_inference_path_leaves_other_calls_to_their_paths(monkeypatch):
    """Grad mode and other backends take their own paths; half precision and mixed dtypes agree."""
    calls = []
    inference = torch_ops.more_inference
    monkeypatch.setattr(torch_ops, "more_inference", lambda *a, **k: calls.append(1) or inference(*a, **k))
    x = torch.randn(1, 21, generator=torch.Generator().manual_seed(6))
    layer = make_layer(backend="reference")
    assert_layer_matches(layer, x)
    assert calls == []
    layer = make_layer()
    y = layer(x)
    assert y.grad_fn is not None and calls == []
    y.sum().backward()
    assert layer.router_weight.grad.abs().sum() > 0
    half = make_layer().to(torch.bfloat16)
    with torch.no_grad():
        assert_close_for(half(x.bfloat16()), layer_reference(half, x.bfloat16()))
    mixed = make_layer()
    mixed.router_weight.data = mixed.router_weight.data.double()
    assert_layer_matches(mixed, x)


@pytest.mark.parametrize("tokens", [1, 5])
def test_layer_inference_sees_every_update(tokens):
    """Nothing derived from the layer's tensors is kept between calls: writes through .data,
    reassignment, load_state_dict, .to() and deepcopy all show on the next call."""
    layer = make_layer()
    x = torch.randn(tokens, 21, generator=torch.Generator().manual_seed(tokens))
    outputs = [assert_layer_matches(layer, x)]
    with torch.no_grad():
        layer.base.weight.data.mul_(2.0)
        outputs.append(assert_layer_matches(layer, x))
        layer.expert_b.data.add_(1.0)
        outputs.append(assert_layer_matches(layer, x))
        layer.expert_a.copy_(torch.randn(layer.expert_a.shape, generator=torch.Generator().manual_seed(9)))
        outputs.append(assert_layer_matches(layer, x))
        layer.router_weight.data = torch.randn(layer.router_weight.shape, generator=torch.Generator().manual_seed(8))
        outputs.append(assert_layer_matches(layer, x))
    layer.load_state_dict(make_layer(seed=4).state_dict())
    outputs.append(assert_layer_matches(layer, x))
    for before, after in zip(outputs, outputs[1:]):
        assert not torch.allclose(before, after)
    wide = copy.deepcopy(layer).to(torch.float64)
    torch.testing.assert_close(assert_layer_matches(wide, x.double()), outputs[-1].double(), rtol=1e-5, atol=1e-5)


def test_one_token_with_no_finite_logit_matches_reference():
    inputs = make_inputs(1, 12, 7, 9, seed=8)
    inputs["router_bias"][:] = float("-inf")
    with torch.no_grad():
        y = torch_ops.more_linear(*(inputs[n] for n in NAMES), 3)
    torch.testing.assert_close(y, reference.more_linear(*(inputs[n] for n in NAMES), 3), equal_nan=True)
