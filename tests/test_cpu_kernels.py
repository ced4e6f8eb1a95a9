"""The MoRE CPU kernels in C (smartfed_kernels.cpu): the same selection, gates and outputs as the
reference on every input class, threads included, and a clean fall-back when they cannot run."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from smartfed_kernels import cpu, reference, torch_ops
from smartfed_kernels.cpu import build, kernels
from smartfed_kernels.testing import ARGUMENTS, assert_close_for, make_more_inputs
from smartfed_kernels.validation import check_more_inputs

pytestmark = pytest.mark.skipif(build.load_library() is None,
                                reason=f"no C kernels here: {build.unavailable_reason()}")


def kernel_and_reference(inputs, top_k, **options):
    """(kernel result, reference result), each (y, indices, gates); fails if the kernel declined."""
    spec_inputs = [inputs[n] for n in ARGUMENTS]
    calls = []
    forward = torch_ops._cpu_kernel_forward

    def counted(*args, **kwargs):
        result = forward(*args, **kwargs)
        calls.append(result is not None)
        return result

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(torch_ops, "_cpu_kernel_forward", counted)
        got = torch_ops.more_linear(*spec_inputs, top_k, return_routing=True, **options)
    assert calls == [True], "the C kernels did not take the call"
    return got, reference.more_linear(*spec_inputs, top_k, return_routing=True, **options)


def assert_matches(got, want):
    (y, indices, gates), (want_y, want_indices, want_gates) = got, want
    assert torch.equal(indices, want_indices)
    assert_close_for(y, want_y, what="output")
    assert_close_for(gates, want_gates, y.dtype, "gates")


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40), num_experts=st.integers(1, 150), d_in=st.integers(1, 70), d_out=st.integers(1, 70),
    k_fraction=st.floats(0, 1), router=st.sampled_from(["linear", "expert_space"]),
    gate=st.sampled_from(["topk_softmax", "softmax_topk"]), levels=st.sampled_from([0, 2, 5]),
    dtype=st.sampled_from([torch.float32, torch.float64]), router_bias=st.booleans(), base=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_kernels_match_reference(tokens, num_experts, d_in, d_out, k_fraction, router, gate, levels, dtype,
                                 router_bias, base, seed):
    """Random sizes and options; ``levels`` > 0 rounds the router to a few values, so that many
    logits tie exactly and the lower-index rule decides."""
    top_k = max(1, round(k_fraction * num_experts))
    inputs = make_more_inputs(tokens, d_in, d_out, num_experts, router=router, dtype=dtype, seed=seed,
                              base=base, router_bias=router_bias)
    if levels:
        inputs["router_weight"] = torch.zeros_like(inputs["router_weight"])
        if router_bias:
            inputs["router_bias"] = torch.randint(0, levels, (num_experts,), generator=torch.Generator().manual_seed(
                seed)).to(dtype)
    assert_matches(*kernel_and_reference(inputs, top_k, router=router, gate=gate, gamma=0.8))


@pytest.mark.parametrize("tokens", [1, 3])
def test_all_logits_tied_select_the_first_k(tokens):
    inputs = make_more_inputs(tokens, 9, 7, 12, seed=1)
    inputs["router_weight"] = torch.zeros_like(inputs["router_weight"])
    inputs["router_bias"] = torch.zeros(12)
    got, want = kernel_and_reference(inputs, 5)
    assert_matches(got, want)
    assert got[1].sort(dim=-1).values.tolist() == [[0, 1, 2, 3, 4]] * tokens


@pytest.mark.parametrize("tokens", [2, 300])
def test_threads_split_the_tokens(monkeypatch, tokens):
    """With the per-thread work floor at one token, every call runs on all of torch's threads."""
    monkeypatch.setattr(kernels, "_WORK_PER_THREAD", 1)
    monkeypatch.setattr(kernels, "_spec_cache", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        inputs = make_more_inputs(tokens, 33, 29, 64, seed=tokens)
        assert_matches(*kernel_and_reference(inputs, 8))
    finally:
        torch.set_num_threads(threads)


def test_python_threads_calling_at_once():
    """Each Python thread fills its own problem buffer."""
    cases = [make_more_inputs(t, 31, 27, 40, seed=t) for t in (1, 7, 1, 50, 1, 9)]
    wanted = [reference.more_linear(*(c[n] for n in ARGUMENTS), 6) for c in cases]
    failures = []

    def run(case, want):
        for _ in range(30):
            with torch.no_grad():
                got = torch_ops.more_linear(*(case[n] for n in ARGUMENTS), 6)
            if (got - want).abs().max() > 1e-4 * want.abs().max():
                failures.append(case["x"].shape)

    workers = [threading.Thread(target=run, args=pair) for pair in zip(cases, wanted)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []


def test_strided_logits_and_bias_views_are_read_in_place():
    """route_expand reads the two halves of one routing GEMM and a strided bias without copies."""
    inputs = make_more_inputs(6, 20, 14, 10, seed=2)
    routed = torch.randn(6, 20, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(20, generator=torch.Generator().manual_seed(5))[::2]
    spec = check_more_inputs(inputs["x"], inputs["weight"], None, inputs["router_weight"], bias,
                                       inputs["expert_a"], inputs["expert_b"], 3)
    out = torch.randn(6, 14, generator=torch.Generator().manual_seed(6))
    expected = out.clone()
    indices, gates = kernels.route_expand(routed[:, :10], bias, routed[:, 10:], inputs["expert_b"], out, spec, True)
    logits = routed[:, :10] + bias
    want_indices = reference.select_top_k(logits, 3)
    want_gates = torch.softmax(logits.gather(1, want_indices), dim=-1)
    assert torch.equal(indices, want_indices)
    coefficients = spec.gamma * want_gates * routed[:, 10:].gather(1, want_indices)
    expected += torch.einsum("tk,tko->to", coefficients, inputs["expert_b"].t()[want_indices])
    assert_close_for(out, expected)
    assert_close_for(gates, want_gates)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tokens", [1, 5])
def test_non_finite_logits_decline_and_the_general_path_answers(special, tokens):
    inputs = make_more_inputs(tokens, 12, 7, 9, seed=8)
    inputs["router_bias"][4] = special
    spec = check_more_inputs(*(inputs[n] for n in ARGUMENTS), 3)
    with torch.no_grad():
        assert torch_ops._cpu_kernel_forward(*(inputs[n] for n in ARGUMENTS), spec, True) is None
        y = torch_ops.more_linear(*(inputs[n] for n in ARGUMENTS), 3)
    want = reference.more_linear(*(inputs[n] for n in ARGUMENTS), 3)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_disabled_runs_pytorch_ops_alone(monkeypatch):
    def refuse(*args):
        raise AssertionError("the C kernels ran while disabled")

    monkeypatch.setattr(torch_ops, "_cpu_kernel_forward", refuse)
    inputs = make_more_inputs(4, 10, 8, 6, seed=3)
    with cpu.disabled(), torch.no_grad():
        y = torch_ops.more_linear(*(inputs[n] for n in ARGUMENTS), 2)
        assert "disabled" in cpu.status()
    assert_close_for(y, reference.more_linear(*(inputs[n] for n in ARGUMENTS), 2))
    assert cpu.status().startswith("built (")


def test_library_cache_name_follows_sources_flags_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path))
    first = build.library_path("/usr/bin/cc", ("-O3",))
    assert first.parent == tmp_path and first.name.startswith("more_cpu-")
    assert build.library_path("/usr/bin/cc", ("-O2",)) != first
    assert build.library_path("/usr/bin/clang", ("-O3",)) != first
    assert build.library_path("/usr/bin/cc", ("-O3",)) == first


FRESH_PROCESS = """
import torch
from smartfed_kernels import cpu, more_linear
from smartfed_kernels.testing import ARGUMENTS, make_more_inputs
inputs = make_more_inputs(3, 10, 8, 6)
with torch.no_grad():
    y = more_linear(*(inputs[n] for n in ARGUMENTS), 2)
print(cpu.status())
print(float(y.abs().sum()))
"""


def fresh_process(tmp_path, **environment):
    env = {**os.environ, build.CACHE_VARIABLE: str(tmp_path / "cache"), **environment}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_fresh_cache_builds_once_and_every_fallback_gives_the_same_output(tmp_path):
    built, total = fresh_process(tmp_path)
    assert built.startswith(f"built ({tmp_path / 'cache'}")
    assert len(list((tmp_path / "cache").glob("more_cpu-*.so"))) == 1
    assert fresh_process(tmp_path) == [built, total]  # reused, not rebuilt
    status, disabled_total = fresh_process(tmp_path, **{build.DISABLE_VARIABLE: "0"})
    assert status.startswith("not built (disabled by SMARTFED_CPU_KERNELS=0)")
    status, broken_total = fresh_process(tmp_path, CC="false")
    assert status.startswith("not built (false ") and "failed" in status
    assert float(disabled_total) == pytest.approx(float(total), rel=1e-5)
    assert float(broken_total) == pytest.approx(float(total), rel=1e-5)
