"""One-command GPU check of the Triton MoRE kernels: correctness tests, then a timing table.

    python benchmarks/gpu_check.py [--skip-tests] [--warmup 25] [--rep 100]

1. Runs tests/test_triton_cuda.py (bf16, fp16, fp32 against the reference) in a subprocess
   without TRITON_INTERPRET.
2. Times (triton.testing.do_bench, median ms) nn.Linear alone (cuBLAS), the torch fast path,
   the reference and the Triton path, bf16, at the docs/design.md §8 shape T=4096, d=4096, N=64, k=8
   (forward, forward+backward of router and x) and decode T=1, 16 (forward).
3. Writes benchmarks/results/gpu_check-<device>.json. Takes a few minutes on one GPU.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [  # (label, tokens, d_in = d_out, experts, k, with backward)
    ("train T=4096 d=4096 N=64 k=8", 4096, 4096, 64, 8, True),
    ("decode T=1 d=4096 N=64 k=8", 1, 4096, 64, 8, False),
    ("decode T=16 d=4096 N=64 k=8", 16, 4096, 64, 8, False),
]
BACKENDS = ("triton", "torch", "reference")


def run_tests() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.time()
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_triton_cuda.py"), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    summary = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else completed.stderr[-500:]
    print(completed.stdout[-4000:])
    return {"returncode": completed.returncode, "summary": summary, "seconds": round(time.time() - started, 1)}


def make_layer(tokens, width, experts, device, dtype, generator):
    import torch

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype).requires_grad_(grad)

    return dict(
        x=randn(tokens, width, grad=True),
        weight=randn(width, width, scale=width ** -0.5),
        bias=randn(width),
        router_weight=randn(experts, width, scale=width ** -0.5, grad=True),
        router_bias=randn(experts, grad=True),
        expert_a=randn(experts, width, scale=width ** -0.5),
        expert_b=randn(width, experts, scale=0.05),
    )


def time_shape(tokens, width, experts, top_k, backward, warmup, rep):
    import torch
    from triton.testing import do_bench

    from smartfed_kernels import more_linear

    device = torch.device("cuda")
    layer = make_layer(tokens, width, experts, device, torch.bfloat16, torch.Generator(device).manual_seed(0))
    x, weight, bias = layer["x"], layer["weight"], layer["bias"]
    grad_y = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    timings = {}

    def bench(name, forward):
        timings[f"{name} forward"] = do_bench(lambda: forward(), warmup=warmup, rep=rep)
        if backward:
            def step():
                x.grad = None
                forward().backward(grad_y)
            timings[f"{name} forward+backward"] = do_bench(step, warmup=warmup, rep=rep)

    bench("linear (cuBLAS)", lambda: torch.nn.functional.linear(x, weight, bias))
    for backend in BACKENDS:
        bench(f"MoRE {backend}", lambda backend=backend: more_linear(*layer.values(), top_k, backend=backend))
    return {name: round(ms, 4) for name, ms in timings.items()}


def print_table(results):
    for label, timings in results.items():
        print(f"\n{label}")
        linear = {kind: timings.get(f"linear (cuBLAS) {kind}") for kind in ("forward", "forward+backward")}
        for name, ms in timings.items():
            kind = name.rsplit(" ", 1)[1]
            ratio = ms / linear[kind] if linear.get(kind) else float("nan")
            print(f"  {name:<36} {ms:9.4f} ms   x{ratio:5.2f} of linear")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    device_name = torch.cuda.get_device_name()
    report = {"device": device_name, "torch": torch.__version__}
    import triton

    report["triton"] = triton.__version__
    if not args.skip_tests:
        report["tests"] = run_tests()
    report["timings_ms"] = {}
    for label, tokens, width, experts, top_k, backward in SHAPES:
        report["timings_ms"][label] = time_shape(tokens, width, experts, top_k, backward, args.warmup, args.rep)
    print_table(report["timings_ms"])
    out = ROOT / "benchmarks" / "results" / f"gpu_check-{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
