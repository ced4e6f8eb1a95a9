"""`smartfed bench` end to end on a tiny shape: checks, tables, JSON, markdown, PNG, failure exit."""

import json

import pytest
import torch

import smartfed_kernels.cpu
from smartfed.benchmarking import command, gpu_check, providers, report
from smartfed.benchmarking.shapes import default_shape_specs, parse_shapes
from smartfed.cli import main

TINY = ["--shapes", "48x40:T16:N8:k2", "--time-per-case", "0.02", "--quick"]


def test_bench_writes_record_table_and_plot(tmp_path, capsys):
    assert main(["bench", *TINY, "--mode", "fwd", "full", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("cpu-*.json")
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
            "--time-per-case", "0.01", "--quick", "--output", str(tmp_path / "run.json")]
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
    assert code != 0
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
            "--mode", "fwd", "--time-per-case", "0.01", "--quick", "--output", str(tmp_path / "run.json")]
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


def test_gpu_check_record_is_one_file_per_gpu_with_the_test_outcome(tmp_path):
    paths = command._output_paths(tmp_path, "cuda", "NVIDIA H200", "2026-11-30", gpu_check=True)
    assert {p.name for p in paths.values()} == {f"gpu_check-nvidia-h200.{ext}" for ext in ("json", "md", "png")}
    assert main(["bench", *TINY, "--providers", "linear", "--mode", "fwd", "--output", str(tmp_path / "run.json")]) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert "tests" not in record and "CUDA tests" not in (tmp_path / "run.md").read_text()
    record["tests"] = {"command": "python -m pytest tests/test_triton_cuda.py", "returncode": 0,
                       "summary": "31 passed in 40.0s", "seconds": 41.2, "output_tail": ""}
    assert "## CUDA tests\n\n`python -m pytest tests/test_triton_cuda.py`: exit code 0, 31 passed" in (
        report.markdown_report(record))
