"""The MoRE CPU kernels in C (smartfed_kernels.cpu): the same selection, gates and outputs as the
reference on every input class, threads included, and a clean fall-back when they cannot run.

The guard rails: decode-sized calls stay in the caller's thread, the library's layout is checked
against the Python mirror, its first build is locked and leaves it readable by all, a fall-back
warns once naming the compiler's error, and SMARTFED_REQUIRE_CPU_KERNELS=1 turns it into a failure.
Skipped where the kernels are not built, except under that switch (tests/conftest.py).
"""

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from smartfed_kernels import cpu, reference, torch_ops
from smartfed_kernels.cpu import abi, build, kernels
from smartfed_kernels.forms import GATE_FORMS, ROUTER_FORMS
from smartfed_kernels.testing import ARGUMENTS, assert_close_for, make_more_inputs
from smartfed_kernels.validation import check_more_inputs

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def kernel_and_reference(inputs, top_k, **options):
    """(kernel result, reference result), each (y, indices, gates); fails if the kernel declined."""
    spec_inputs = [inputs[n] for n in ARGUMENTS]
    calls = []
    forward = kernels.forward

    def counted(*args, **kwargs):
        result = forward(*args, **kwargs)
        calls.append(result is not None)
        return result

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(kernels, "forward", counted)
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
    k_fraction=st.floats(0, 1), router=st.sampled_from(list(ROUTER_FORMS)),
    gate=st.sampled_from(list(GATE_FORMS)), levels=st.sampled_from([0, 2, 5]),
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


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tokens", [2, 300])
def test_threads_split_the_tokens(monkeypatch, two_threads, tokens):
    """With the per-thread work floor at one multiply-add, every call of several tokens opens a
    parallel region on torch's threads (where the library has OpenMP), with the same results."""
    monkeypatch.setattr(kernels, "GRAIN", 1)
    monkeypatch.setattr(kernels, "_spec_cache", {})
    before = kernels.parallel_regions()
    inputs = make_more_inputs(tokens, 33, 29, 64, seed=tokens)
    assert_matches(*kernel_and_reference(inputs, 8))
    assert kernels.parallel_regions() - before == (1 if kernels.openmp() else 0)


@pytest.mark.parametrize("tokens,grain", [(1, None), (1, 1), (16, None), (64, None)],
                         ids=["one token", "one token, grain 1", "16 tokens", "64 tokens"])
def test_decode_calls_stay_in_the_callers_thread(monkeypatch, two_threads, tokens, grain):
    """A decode-sized call (d=576, N=64, k=8, where one token is 9216 multiply-adds) opens no
    parallel region, whose barrier could wait a scheduler time slice beside a busy neighbour;
    one token never does, whatever the grain."""
    if grain is not None:
        monkeypatch.setattr(kernels, "GRAIN", grain)
        monkeypatch.setattr(kernels, "_spec_cache", {})
    inputs = make_more_inputs(tokens, 576, 576, 64, seed=3)
    before = kernels.parallel_regions()
    assert_matches(*kernel_and_reference(inputs, 8))
    assert kernels.parallel_regions() == before


def test_thread_choice_follows_the_work():
    per_token = 8 * (576 + 576)
    assert kernels.threads_for(1, 10 ** 9, 8, grain=1) == 1
    assert kernels.threads_for(16, per_token, 2) == 1
    assert kernels.threads_for(2048, per_token, 2) == 2
    assert kernels.threads_for(2048, per_token, 64) == 2048 * per_token // kernels.GRAIN
    assert kernels.threads_for(3, 10, 8, grain=1) == 3
    assert kernels.threads_for(0, 10, 8) == 1


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


@pytest.mark.parametrize("tokens", [1, 5, kernels.FEW_TOKENS, kernels.FEW_TOKENS + 1, 40])
@pytest.mark.parametrize("router", list(ROUTER_FORMS))
def test_row_strided_x_is_read_in_place(tokens, router):
    """x as rows of a wider tensor (unit column stride): the few-token entry point, which computes
    the logits itself, and the GEMM route both read it by its row stride."""
    inputs = make_more_inputs(tokens, 19, 11, 13, router=router, seed=tokens)
    wide = torch.randn(tokens, 25, generator=torch.Generator().manual_seed(1))
    wide[:, 3:22] = inputs["x"]
    inputs["x"] = wide[:, 3:22]
    assert inputs["x"].stride() == (25, 1)
    assert_matches(*kernel_and_reference(inputs, 4, router=router, gate="softmax_topk"))


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tokens", [1, 5])
def test_non_finite_logits_decline_and_the_general_path_answers(special, tokens):
    inputs = make_more_inputs(tokens, 12, 7, 9, seed=8)
    inputs["router_bias"][4] = special
    spec = check_more_inputs(*(inputs[n] for n in ARGUMENTS), 3)
    with torch.no_grad():
        assert kernels.forward(*(inputs[n] for n in ARGUMENTS), spec, True) is None
        y = torch_ops.more_linear(*(inputs[n] for n in ARGUMENTS), 3)
    want = reference.more_linear(*(inputs[n] for n in ARGUMENTS), 3)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_disabled_runs_pytorch_ops_alone(monkeypatch):
    def refuse(*args):
        raise AssertionError("the C kernels ran while disabled")

    monkeypatch.setattr(kernels, "forward", refuse)
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


def fresh_process(tmp_path, expect_success=True, **environment):
    """The script above in a child with its own cache; the strict switch only where given."""
    env = {name: value for name, value in os.environ.items() if name != build.REQUIRE_VARIABLE}
    env.update({build.CACHE_VARIABLE: str(tmp_path / "cache"), **environment})
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True,
                          timeout=300)
    if not expect_success:
        assert done.returncode != 0, done.stdout
        return done.stderr
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_fresh_cache_builds_once_and_every_fallback_gives_the_same_output(tmp_path):
    built, total = fresh_process(tmp_path)
    assert built.startswith(f"built ({tmp_path / 'cache'}")
    (library,) = (tmp_path / "cache").glob("more_cpu-*.so")
    assert stat.S_IMODE(library.stat().st_mode) == 0o755  # other users of a shared cache can load it
    assert fresh_process(tmp_path) == [built, total]  # reused, not rebuilt
    status, disabled_total = fresh_process(tmp_path, **{build.DISABLE_VARIABLE: "0"})
    assert status.startswith("not built (disabled by SMARTFED_CPU_KERNELS=0)")
    status, broken_total = fresh_process(tmp_path, CC="false")
    assert status.startswith("not built (false ") and "failed: exit status 1, no output" in status
    assert float(disabled_total) == pytest.approx(float(total), rel=1e-5)
    assert float(broken_total) == pytest.approx(float(total), rel=1e-5)


def test_avx2_build_is_cached_apart_and_gives_the_same_output(tmp_path):
    native = fresh_process(tmp_path)
    status, total = fresh_process(tmp_path, **{build.ISA_VARIABLE: "avx2"})
    assert status.startswith(f"built ({tmp_path / 'cache'}") and status != native[0]
    assert float(total) == pytest.approx(float(native[1]), rel=1e-5)
    assert len(list((tmp_path / "cache").glob("more_cpu-*.so"))) == 2
    status, _ = fresh_process(tmp_path, **{build.ISA_VARIABLE: "sse9"})
    assert "SMARTFED_CPU_KERNELS_ISA: expected one of ('native', 'avx2', 'avx512'), got 'sse9'" in status


def test_strict_switch_fails_where_the_kernels_do_not_build(tmp_path):
    """SMARTFED_REQUIRE_CPU_KERNELS=1 (CI) turns the silent fall-back into an error that names why."""
    error = fresh_process(tmp_path, expect_success=False, CC="false", **{build.REQUIRE_VARIABLE: "1"})
    assert "CPUKernelsUnavailable: the MoRE CPU kernels are unavailable (false " in error
    assert "SMARTFED_REQUIRE_CPU_KERNELS=1 forbids falling back" in error
    # A deliberate switch-off is no failure, even under the switch.
    status, _ = fresh_process(tmp_path, **{build.DISABLE_VARIABLE: "0", build.REQUIRE_VARIABLE: "1"})
    assert status.startswith("not built (disabled")


@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    """build.load_library as in a new process, into an empty cache, without the strict switch;
    the process's own library comes back afterwards."""
    monkeypatch.setenv(build.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.delenv(build.REQUIRE_VARIABLE, raising=False)
    for name, value in (("_library", None), ("_reason", None), ("_deliberate", False), ("_warned", False)):
        monkeypatch.setattr(build, name, value)
    return tmp_path


def broken_sources(folder):
    """A copy of the kernel sources with a syntax error in more_cpu.c; (folder, its line number)."""
    folder.mkdir()
    for name in build.SOURCES:
        shutil.copy(build.SOURCE_DIR / name, folder / name)
    lines = (folder / "more_cpu.c").read_text().splitlines()
    line_number = next(i for i, line in enumerate(lines) if line.startswith("typedef void (*rows_fn)")) + 1
    lines.insert(line_number - 1, "int broken = ;")
    (folder / "more_cpu.c").write_text("\n".join(lines) + "\n")
    return folder, line_number


def test_fallback_warns_once_with_the_compilers_error_line(monkeypatch, fresh_build_state):
    folder, line_number = broken_sources(fresh_build_state / "src")
    monkeypatch.setattr(build, "SOURCE_DIR", folder)
    inputs = make_more_inputs(2, 10, 8, 6, seed=1)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outputs = [torch_ops.more_linear(*(inputs[n] for n in ARGUMENTS), 2) for _ in range(3)]
    fallbacks = [w for w in caught if issubclass(w.category, build.CPUKernelsFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert f"more_cpu.c:{line_number}:" in message and "error: expected expression before ';' token" in message
    assert "^" not in message and "int broken" not in message  # the error line, not the source and caret lines
    assert "runs on PyTorch ops alone" in message
    for y in outputs:
        assert_close_for(y, reference.more_linear(*(inputs[n] for n in ARGUMENTS), 2))


def test_first_error_line_skips_source_and_caret_lines():
    output = ("more_cpu.c: In function 'f':\nmore_cpu.c:60:13: error: expected expression before ';' token\n"
              "   60 | int broken = ;\n      |             ^\nmore_cpu.c:61:1: error: second\n")
    assert build.first_error_line(output) == "more_cpu.c:60:13: error: expected expression before ';' token"
    assert build.first_error_line("ld: cannot find -lm\n") == "ld: cannot find -lm"


@pytest.mark.parametrize("change,named", [
    (lambda patch: patch.setattr(abi, "FIELDS", (abi.FIELDS[1], abi.FIELDS[0], *abi.FIELDS[2:])),
     "struct more_problem has fields ('tokens', 'num_experts'"),
    (lambda patch: patch.setattr(abi, "FIELDS", abi.FIELDS[:-1]), "the Python mirror (abi.FIELDS)"),
    (lambda patch: patch.setattr(abi, "VERSION", abi.VERSION + 1), f"ABI version {abi.VERSION}, the Python side"),
    (lambda patch: patch.setattr(abi, "GATES", tuple(reversed(abi.GATES))), "the C gates are numbered"),
], ids=["fields swapped", "field missing", "version", "gate order"])
def test_layout_mismatch_refuses_the_library(monkeypatch, fresh_build_state, change, named):
    library = build.load_library()
    assert library is not None and abi.mismatch(library) is None
    change(monkeypatch)
    assert named in abi.mismatch(library)
    monkeypatch.setattr(build, "_library", None)
    assert build.load_library() is None
    reason = build.unavailable_reason()
    assert " refused: " in reason and named in reason


def test_first_build_holds_the_lock_and_a_waiter_reuses_the_result(monkeypatch, tmp_path):
    """While one process compiles, the lock is taken (a second flock on it would block); a
    process that got the lock after another built the library does not compile again."""
    target = tmp_path / "cache" / "more_cpu-test.so"
    compile_for_real = build._compile
    seen = []

    def compile_checking_the_lock(compiler, flags, path):
        with open(path.with_name(path.name + ".lock")) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(path)
        compile_for_real(compiler, flags, path)

    monkeypatch.setattr(build, "_compile", compile_checking_the_lock)
    flags = (*build.FLAGS, *build.ISA_FLAGS["native"], *build.THREADING_FLAGS[0])
    build.ensure_built(build._compiler(), flags, target)
    assert seen == [target] and stat.S_IMODE(target.stat().st_mode) == 0o755

    other = target.with_name("more_cpu-other.so")
    real_lock = build._build_lock

    def lock_then_find_it_built(path):
        lock = real_lock(path)
        shutil.copy(target, other)  # what a process holding the lock before us left
        return lock

    monkeypatch.setattr(build, "_build_lock", lock_then_find_it_built)
    build.ensure_built(build._compiler(), flags, other)
    assert seen == [target]


def test_the_only_parallel_region_is_the_counted_one():
    """Every OpenMP region goes through run_rows, which counts it and opens it only for calls
    more_threads_for gives several threads; a region anywhere else would escape those tests."""
    sources = "".join((build.SOURCE_DIR / name).read_text() for name in build.SOURCES)
    assert sources.count("#pragma omp parallel") == 1
