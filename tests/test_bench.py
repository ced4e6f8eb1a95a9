"""`smartfed bench` end to end on a tiny shape: checks, tables, JSON, markdown, PNG, failure exit,
the output folder (never the tracked results, never over a file), the verdict line,
--require-targets, and the decode rows timed beside a neighbour process."""

import json
import os

import pytest
import torch

import smartfed_kernels.cpu
from smartfed.benchmarking import command, gpu_check, providers, report
from smartfed.benchmarking.shapes import default_shape_specs, parse_shapes
from smartfed.cli import main

TINY = ["--shapes", "48x40:T16:N8:k2", "--time-per-case", "0.02", "--quick", "--no-neighbour", "--no-progress"]


def test_bench_writes_record_table_and_plot(tmp_path, capsys):
    assert main(["bench", *TINY, "--mode", "fwd", "full", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("cpu-*Z.json")
    record = json.loads(json_path.read_text())
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = json_path.with_suffix(".md").read_text()

    names = ["linear", "peft-lora", "more-reference", "more-torch", "more-torch-ops", "more-layer", "dense-masked"]
    assert list(record["providers"]) == names
    assert "more-triton" in record["skipped"]
    env = record["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["triton"] and env["python"]
    assert len(env["load_before"]) == 3 and len(env["load_after"]) == 3
    assert env["cpu_kernels"] == smartfed_kernels.cpu.status() and "C kernels:" in markdown
    assert record["dtype"] == "fp32" and record["shapes"][0]["d_in"] == 48
    assert {(r["provider"], r["mode"]) for r in record["results"]} == {(n, m) for n in names for m in ("fwd", "full")}
    for row in record["results"]:
        assert row["median_ms"] > 0 and row["rounds"] >= 2 and row["min_gflop"] > 0 and row["min_mbytes"] > 0
        assert (row["ratio_to_linear"] == 1.0) == (row["provider"] == "linear")
    assert all(c["ok"] for c in record["checks"])
    assert {c["quantity"] for c in record["checks"] if c["provider"] == "more-torch"} == {
        "output", "grad x", "grad router_weight", "grad router_bias"}
    for text in (out, markdown):
        assert "more-torch" in text and "x linear" in text and "max rel err" in text


def test_bench_reports_design_targets_on_target_shapes(tmp_path):
    args = ["bench", "--shapes", "smollm2:T2048:N64:k8", "--providers", "linear", "more-torch", "--mode", "fwd",
            "--time-per-case", "0.01", "--quick", "--no-progress", "--output", str(tmp_path / "run.json")]
    assert main(args) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    (row,) = [r for r in record["results"] if r["provider"] == "more-torch"]
    (verdict,) = row["targets"]
    assert verdict["target"] == "fwd <= 1.40x linear" and isinstance(verdict["met"], bool)


class WrongProvider(providers.MoREProvider):
    def build(self, case):
        built = super().build(case)
        forward = built.forward
        built.forward = lambda: forward() * 1.01
        return built


def test_bench_fails_loudly_when_a_provider_disagrees(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(providers.PROVIDERS, "more-torch", WrongProvider("torch", "off by 1%"))
    code = main(["bench", *TINY, "--providers", "linear", "more-torch", "--output", str(tmp_path)])
    assert code == 1
    assert "FAIL: more-torch" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_shape_specs_expand_and_reject_bad_input():
    shapes = parse_shapes(["llama7b:T1,16:N64:k8", "96x80:T4"])
    assert [(s.d_in, s.tokens, s.experts, s.top_k) for s in shapes] == [(4096, 1, 64, 8), (4096, 16, 64, 8),
                                                                       (96, 4, 64, 8)]
    with pytest.raises(ValueError, match="expected k <= N"):
        parse_shapes(["smollm2:N4:k8"])
    with pytest.raises(ValueError, match="MODEL one of"):
        parse_shapes(["gpt5"])
    with pytest.raises(ValueError, match="expected fields"):
        parse_shapes(["smollm2:X3"])


class RaisingProvider(providers.MoREProvider):
    def build(self, case):
        built = super().build(case)

        def forward():
            raise RuntimeError("kernel exploded")

        built.forward = forward
        return built


def test_bench_fails_when_a_provider_raises(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(providers.PROVIDERS, "more-torch", RaisingProvider("torch", "raises"))
    assert main(["bench", *TINY, "--providers", "more-torch", "--output", str(tmp_path)]) == 1
    assert "FAIL: more-torch on 48x40 T=16 N=8 k=2: raised RuntimeError: kernel exploded" in capsys.readouterr().err


def test_triton_provider_on_cpu_needs_to_be_named_and_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_provider, cpu = providers.PROVIDERS["more-triton"], torch.device("cpu")
    assert "CUDA only" in triton_provider.unavailable_reason(cpu, explicit=False)
    assert "TRITON_INTERPRET=1" in triton_provider.unavailable_reason(cpu, explicit=True)


def test_bench_decode_per_call_and_large_pool_rows_carry_their_targets(tmp_path):
    shapes = ["smollm2:T1:N64:k8", "2048:T1:N64:k8", "64x64:T1:N16:k8", "smollm2:T2048:N256:k8"]
    args = ["bench", "--shapes", *shapes, "--providers", "linear", "more-torch", "more-layer", "dense-masked",
            "--mode", "fwd", "--time-per-case", "0.01", "--quick", "--no-neighbour", "--no-progress",
            "--output", str(tmp_path / "run.json")]
    assert main(args) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    verdicts = {(r["shape"]["label"], r["provider"]): [v["target"] for v in r["targets"]] for r in record["results"]}
    assert verdicts[("smollm2 T=1 N=64 k=8", "more-layer")] == ["decode <= 1.5x linear"]
    assert verdicts[("2048 T=1 N=64 k=8", "more-layer")] == ["decode <= 1.3x linear"]
    assert verdicts[("64x64 T=1 N=16 k=8", "more-layer")] == ["per call <= 3x linear"]
    assert verdicts[("smollm2 T=2048 N=256 k=8", "more-layer")] == ["large pool <= dense-masked"]
    assert verdicts[("smollm2 T=2048 N=256 k=8", "more-torch")] == ["large pool <= dense-masked"]
    assert verdicts[("smollm2 T=1 N=64 k=8", "more-torch")] == []
    assert all(isinstance(v["met"], bool) for r in record["results"] for v in r["targets"])
    markdown = (tmp_path / "run.md").read_text()
    assert "## Targets" in markdown and "per call <= 3x linear" in markdown
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_cpu_shapes_include_decode_per_call_and_large_pool_rows():
    labels = {s.label for s in parse_shapes(default_shape_specs("cpu", quick=False))}
    assert {"smollm2 T=1 N=64 k=8", "smollm2 T=16 N=64 k=8", "2048 T=1 N=64 k=8", "2048 T=16 N=64 k=8",
            "64x64 T=1 N=16 k=8", "smollm2 T=2048 N=64 k=8", "2048 T=2048 N=64 k=8",
            "smollm2 T=2048 N=256 k=8"} <= labels


def test_gpu_check_needs_cuda_and_compiled_kernels(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--gpu-check"]) == 2
    assert "--gpu-check needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "unset TRITON_INTERPRET" in gpu_check.unusable_reason(torch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs the whole CUDA suite a second time")
def test_gpu_check_runs_the_cuda_tests_without_the_interpreter(monkeypatch):
    # Inherited, TRITON_INTERPRET=1 would make tests/conftest.py refuse the CUDA tests (exit 4).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    outcome = gpu_check.run_cuda_tests()
    assert outcome["returncode"] == 0, outcome["output_tail"]
    assert "skipped" in outcome["summary"] and outcome["command"].endswith("tests/test_triton_cuda.py -q -p no:cacheprovider")


def test_gpu_check_record_is_named_by_gpu_and_time_with_the_test_outcome(tmp_path):
    paths = command._output_paths(tmp_path, "cuda", "NVIDIA H200", "20261130T101500Z", gpu_check=True)
    assert {p.name for p in paths.values()} == {f"gpu_check-nvidia-h200-20261130T101500Z.{ext}"
                                                for ext in ("json", "md", "png")}
    assert main(["bench", *TINY, "--providers", "linear", "--mode", "fwd", "--output", str(tmp_path / "run.json")]) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert "tests" not in record and "CUDA tests" not in (tmp_path / "run.md").read_text()
    record["tests"] = {"command": "python -m pytest tests/test_triton_cuda.py", "returncode": 0,
                       "summary": "31 passed in 40.0s", "seconds": 41.2, "output_tail": ""}
    assert "## CUDA tests\n\n`python -m pytest tests/test_triton_cuda.py`: exit code 0, 31 passed" in (
        report.markdown_report(record))


def test_default_output_is_a_new_folder_under_bench_results(tmp_path, monkeypatch, capsys):
    """Never the tracked benchmarks/results/ unless asked: a folder of its own, named by the UTC time."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *TINY, "--providers", "linear", "--mode", "fwd"]) == 0
    (folder,) = (tmp_path / "bench-results").iterdir()
    assert folder.name.startswith("cpu-") and folder.name.endswith("Z")
    assert sorted(p.name for p in folder.iterdir()) == [f"{folder.name}.{ext}" for ext in ("json", "md", "png")]
    assert str(folder / f"{folder.name}.json") in capsys.readouterr().out


def test_bench_never_overwrites_a_record(tmp_path, monkeypatch, capsys):
    target = tmp_path / "run.json"
    target.write_text("kept")
    assert main(["bench", *TINY, "--providers", "linear", "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"smartfed bench: {target} exists; a bench never overwrites a record "
                           "(choose another --output)")
    assert target.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]

    stamp = "20261130T101500Z"
    paths = command._output_paths(tmp_path, "cpu", "AMD EPYC", stamp, gpu_check=False)
    paths["png"].write_bytes(b"kept")
    monkeypatch.setattr(command, "_output_paths", lambda *args: paths)
    assert main(["bench", *TINY, "--providers", "linear", "--output", str(tmp_path)]) == 2
    assert paths["png"].read_bytes() == b"kept" and not paths["json"].exists()


def _with_targets(monkeypatch, bound):
    """One target on the tiny shape: the MoRE fast path within ``bound`` x nn.Linear."""
    from smartfed.benchmarking import targets

    target = targets.Target("tiny fwd", "cpu", "fp32", "more-torch", ("fwd",), lambda s: s.d_in == 48, "linear", bound)
    monkeypatch.setattr(targets, "TARGETS", (target,))


@pytest.mark.parametrize("bound,met", [(1e6, True), (1e-6, False)], ids=["met", "not met"])
def test_verdict_line_and_require_targets(tmp_path, monkeypatch, capsys, bound, met):
    _with_targets(monkeypatch, bound)
    args = ["bench", *TINY, "--providers", "linear", "more-torch", "--mode", "fwd", "--output", str(tmp_path)]
    assert main(args) == 0  # reporting alone never fails on targets
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("verdict: correctness 2/2 ok; targets met " + ("1/1;" if met else "0/1 (NOT met: "))
    if not met:
        assert "tiny fwd on 48x40 T=16 N=8 k=2 (" in last_line
    assert f" on {os.cpu_count()} cores: " in last_line and ("quiet" in last_line or "other processes" in last_line)
    (json_path,) = tmp_path.glob("*.json")
    assert json.loads(json_path.read_text())["verdict"] == last_line
    assert f"**{last_line}**" in json_path.with_suffix(".md").read_text()
    code = main([*args[:-1], str(tmp_path / "again"), "--require-targets"])
    assert code == (0 if met else command.TARGETS_NOT_MET)
    if not met:
        assert "--require-targets: some docs/design.md §8 targets are not met" in capsys.readouterr().err


def test_verdict_explains_the_load():
    env = {"device": "cpu", "cpu_count": 2, "threads": 2, "load_before": [0.2, 0.1, 0.1],
           "load_after": [2.4, 1.0, 0.5], "neighbour": {"threads": 2}}
    record = {"checks": [{"ok": True}], "results": [], "environment": env}
    line = report.verdict_line(record)
    assert line == ("verdict: correctness 1/1 ok; nothing timed; load 0.20 before, 2.40 after on 2 cores: quiet "
                    "before the run: ratios representative; the load after counts this bench's own 4 threads "
                    "(its neighbour's included)")
    env["load_before"] = [1.9, 1.5, 1.0]
    assert "other processes kept the cores busy before the run: CPU ratios unreliable" in report.verdict_line(record)


def test_decode_rows_are_timed_again_beside_a_neighbour(tmp_path):
    args = ["bench", "--shapes", "48x40:T1,64:N8:k2", "--providers", "linear", "more-layer", "dense-masked",
            "--mode", "fwd", "--time-per-case", "0.01", "--quick", "--no-progress", "--output", str(tmp_path / "run.json")]
    assert main(args) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    beside = {(r["shape"]["tokens"], r["provider"]) for r in record["results"] if r["neighbour"]}
    assert beside == {(1, "linear"), (1, "more-layer")}  # decode shapes only, the providers decode targets name
    assert record["environment"]["neighbour"]["threads"] == os.cpu_count()
    assert "48x40 T=1 N=8 k=2 +neighbour" in (tmp_path / "run.md").read_text()


def test_neighbour_is_stopped_even_when_timing_fails():
    from smartfed.benchmarking import neighbour

    with pytest.raises(RuntimeError, match="inside"):
        with neighbour.running(threads=1):
            raise RuntimeError("inside")
