"""`smartfed bench`: check every MoRE provider against the reference, then time them side by side.

Steps: (1) on each shape, every available provider's output (and, when a backward mode is
asked for, its gradients) is compared with ``smartfed_kernels.reference`` in float64; any
disagreement prints FAIL and exits 1 before timing. (2) Providers are timed interleaved, per
shape and mode, with ratios to nn.Linear, the minimum work of each call and the targets of
docs/design.md §8. On the CPU the decode shapes (T <= 16) are timed again beside a neighbour:
another process doing PyTorch matmuls on its own threads (smartfed/benchmarking/neighbour.py).
(3) A JSON record, a markdown table and a PNG plot are written, named after the device and the
UTC time, by default into a folder of their own under ``bench-results/`` (never over an
existing file), and a last line gives the verdict: correctness, targets met, and the machine's
load and what it means for the numbers.

``--gpu-check`` runs the CUDA tests first and names the record ``gpu_check-<device>-<time>``
(smartfed/benchmarking/gpu_check.py).
"""

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

from smartfed.benchmarking.shapes import default_shape_specs, parse_shapes

MODES = ("fwd", "bwd", "full")
RESULTS_ROOT = Path("bench-results")
# Shapes with at most this many tokens are decode-shaped: timed again beside a neighbour on CPU.
DECODE_TOKENS = 16
NEIGHBOUR_PROVIDERS = ("linear", "more-torch", "more-torch-ops", "more-layer")
# What --cpu-isa avx2 sets before torch loads: ATen's vector kernels, MKL, oneDNN, the C kernels.
AVX2_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "SMARTFED_CPU_KERNELS_ISA": "avx2"}
TARGETS_NOT_MET = 3
PROVIDER_NAMES = ("linear", "peft-lora", "more-reference", "more-torch", "more-torch-ops", "more-triton", "more-layer",
                  "dense-masked")
DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp64")
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def configure_parser(parser: argparse.ArgumentParser):
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--shapes", nargs="+", metavar="SPEC",
                        help="shapes as MODEL[:T<tokens>][:N<experts>][:k<top_k>], MODEL one of smollm2, 2048, "
                             "llama7b or <d_in>x<d_out>; fields take comma lists (default: the target shapes of "
                             "docs/design.md §8 for the device and a few others)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["fwd", "full"],
                        help="fwd (no grad), bwd (backward alone) and/or full (forward + backward); default fwd full")
    parser.add_argument("--providers", nargs="+", choices=PROVIDER_NAMES,
                        help="default: all available (more-triton on CPU only when named here)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="a tiny default shape and a short time budget")
    parser.add_argument("--time-per-case", type=float, metavar="SECONDS",
                        help="timing budget per shape and mode (default 3, 0.2 with --quick)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing (CPU)")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="directory for <device>-<UTC time>.{json,md,png} (default: a new folder of that name "
                             "under ./bench-results/), or a path ending in .json; an existing file is never "
                             "overwritten")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-neighbour", action="store_true",
                        help="CPU: skip timing the decode shapes (T <= 16) again beside another process doing "
                             "PyTorch matmuls on its own threads")
    parser.add_argument("--cpu-isa", choices=("native", "avx2"), default="native",
                        help="avx2: run torch (ATen, MKL, oneDNN) and build the C kernels without AVX-512, to "
                             "measure an AVX2 machine on an AVX-512 one (takes effect before torch loads)")
    parser.add_argument("--require-targets", action="store_true",
                        help=f"exit {TARGETS_NOT_MET} when a docs/design.md §8 target is not met (default: report only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--gpu-check", action="store_true",
                        help="CUDA only: run tests/test_triton_cuda.py (compiled kernels) in a child pytest first, "
                             "then check and time as usual; names the record gpu_check-<device>-<UTC time> with the "
                             "test outcome, and exits 1 when a test fails")


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def _output_paths(output, device_type: str, device_name: str, stamp: str, gpu_check: bool) -> dict:
    """json/md/png paths of the record: ``<device>-<stamp>`` in ``output`` (default: a folder of
    that name under RESULTS_ROOT), or the stem of an ``output`` ending in .json."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    name = f"gpu_check-{slug}-{stamp}" if gpu_check else f"{device_type}-{slug}-{stamp}"
    if output is None:
        stem = RESULTS_ROOT / name / name
    elif output.suffix == ".json":
        stem = output.with_suffix("")
    else:
        stem = output / name
    return {ext: stem.with_name(stem.name + "." + ext) for ext in ("json", "md", "png")}


def _existing(paths: dict):
    """The first of ``paths`` that exists (resolved), or None."""
    return next((path.resolve() for path in paths.values() if path.exists()), None)


def _write_record(record, paths: dict) -> None:
    """The three files, each created anew: one that appeared meanwhile is refused, not replaced."""
    from smartfed.benchmarking import report

    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    with open(paths["json"], "x") as handle:
        handle.write(report.json_text(record))
    with open(paths["md"], "x") as handle:
        handle.write(report.markdown_report(record))
    with open(paths["png"], "xb") as handle:
        report.write_plot(record, handle)


def _apply_cpu_isa(isa: str):
    """Sets the environment of --cpu-isa before torch loads; an error line when too late."""
    if isa == "native":
        return None
    if "torch" in sys.modules:
        import torch

        if torch.backends.cpu.get_cpu_capability() != "AVX2":
            settings = " ".join(f"{k}={v}" for k, v in AVX2_ENVIRONMENT.items())
            return f"--cpu-isa avx2: torch is already loaded in this process; set {settings} in its environment"
    for name, value in AVX2_ENVIRONMENT.items():
        os.environ[name] = value
    return None


def _select_providers(args, device):
    from smartfed.benchmarking.providers import PROVIDERS

    explicit = args.providers is not None
    names = args.providers or list(PROVIDERS)
    chosen, skipped = [], {}
    for name in names:
        provider = PROVIDERS[name]
        reason = provider.unavailable_reason(device, explicit)
        if reason is None:
            chosen.append(provider)
        else:
            skipped[name] = reason
    return chosen, skipped


def _check(shapes, providers, dtype, device, args, progress):
    """Reference checks of every provider on every shape; a provider that raises is a failure too."""
    from smartfed.benchmarking.providers import make_case, reference_check
    from smartfed_kernels.testing import TOLERANCES

    with_gradients = any(m in ("bwd", "full") for m in args.mode)
    tolerance = TOLERANCES[dtype]
    checks = []
    for shape in progress(shapes, desc="checking against the reference"):
        case = make_case(shape, dtype, device, args.seed)
        for provider in providers:
            row = {"shape": shape.label, "provider": provider.name, "tolerance": tolerance}
            try:
                errors = reference_check(provider.build(case), case, with_gradients)
            except Exception as error:  # noqa: BLE001  (reported as a failed check, then exit 1)
                checks.append({**row, "quantity": f"raised {type(error).__name__}: {error}",
                               "max_rel_err": None, "ok": False})
                continue
            checks.extend({**row, "quantity": quantity, "max_rel_err": error, "ok": error <= tolerance}
                          for quantity, error in errors.items())
    return checks


def _time(shapes, providers, dtype, device, args, progress, modes, neighbour=False):
    from smartfed.benchmarking import targets, timing, work
    from smartfed.benchmarking.providers import make_case, timed_call

    budget = args.time_per_case if args.time_per_case is not None else (0.2 if args.quick else 3.0)
    peaks = work.gpu_peaks(_device_name(device)) if device.type == "cuda" else None
    results = []
    cases = [(shape, mode) for shape in shapes for mode in modes]
    for shape, mode in progress(cases, desc="timing beside a neighbour" if neighbour else "timing"):
        case = make_case(shape, dtype, device, args.seed)
        fns = {p.name: timed_call(p.build(case), mode, case.grad_out) for p in providers}
        if device.type == "cuda":
            samples = timing.time_cuda(fns, rounds=2 if args.quick else 5)
        else:
            samples = timing.time_cpu(fns, budget, min_rounds=2 if args.quick else 5, max_rounds=200,
                                      min_sample_s=2e-4 if args.quick else 2e-3)
        summary = timing.summarize(samples, "linear")
        for provider in providers:
            stats = summary[provider.name]
            flops, nbytes = work.minimum_work(provider.kind, shape, mode, ELEMENT_BYTES[args.dtype])
            seconds = stats["median_ms"] / 1e3
            roofline = None
            if peaks is not None and args.dtype in peaks:
                attainable = min(peaks[args.dtype], flops / nbytes * peaks["bandwidth"])
                roofline = flops / seconds / attainable
            results.append({
                "shape": shape.as_dict(), "mode": mode, "provider": provider.name, "neighbour": neighbour,
                "median_ms": stats["median_ms"], "ratio_to_linear": stats["ratio"], "rounds": stats["samples"],
                "min_gflop": flops / 1e9, "min_mbytes": nbytes / 1e6, "tflops": flops / seconds / 1e12,
                "gbytes_per_s": nbytes / seconds / 1e9, "flop_per_byte": flops / nbytes,
                "roofline_fraction": roofline,
                "targets": targets.evaluate(device.type, args.dtype, provider.name, mode, shape,
                                            lambda other, n=provider.name: timing.median_ratio(samples, n, other)),
            })
    return results


def _fail(message: str, code: int = 2) -> int:
    print(f"smartfed bench: {message}", file=sys.stderr)
    return code


def _time_beside_neighbour(shapes, providers, dtype, device, args, progress, environment):
    """fwd timings of the decode shapes while a neighbour process computes on every core."""
    from smartfed.benchmarking import neighbour

    decode = [s for s in shapes if s.tokens <= DECODE_TOKENS]
    chosen = [p for p in providers if p.name in NEIGHBOUR_PROVIDERS]
    if args.no_neighbour or device.type != "cpu" or not decode or not chosen:
        return []
    with neighbour.running(threads=os.cpu_count() or 1) as described:
        environment["neighbour"] = described
        return _time(decode, chosen, dtype, device, args, progress, ("fwd",), neighbour=True)


def run(args) -> int:
    problem = _apply_cpu_isa(args.cpu_isa)
    if problem:
        return _fail(problem)
    import torch
    from tqdm import tqdm

    from smartfed.benchmarking import gpu_check, report
    from smartfed.benchmarking.providers import DTYPES

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda, but torch sees no CUDA device")
    unusable = args.gpu_check and gpu_check.unusable_reason(torch)
    if unusable:
        return _fail(unusable)
    if args.gpu_check and args.device == "cpu":
        return _fail("--gpu-check runs on CUDA, not with --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and "more-triton" in (args.providers or ()) and "triton" not in sys.modules:
        # Asked for by name on CPU: Triton's interpreter, which must be chosen before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        shapes = parse_shapes(args.shapes or default_shape_specs(device.type, args.quick))
    except ValueError as error:
        return _fail(str(error))
    now = datetime.datetime.now(datetime.timezone.utc)
    environment = {
        "device": device.type, "device_name": _device_name(device), "torch": torch.__version__,
        "triton": _version("triton"), "peft": _version("peft"), "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_before": _load(),
    }
    paths = _output_paths(args.output, device.type, environment["device_name"], now.strftime("%Y%m%dT%H%M%SZ"),
                          args.gpu_check)
    existing = _existing(paths)
    if existing is not None:
        return _fail(f"{existing} exists; a bench never overwrites a record (choose another --output)")
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        from smartfed_kernels import cpu

        environment["cpu_kernels"] = cpu.status()
        environment["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        environment["isa_environment"] = {name: os.environ.get(name) for name in AVX2_ENVIRONMENT}
    print(f"smartfed bench on {environment['device_name']} ({device.type}), {args.dtype}, "
          f"{environment['threads']} threads, torch {environment['torch']}, load {environment['load_before']}")
    if device.type == "cpu" and environment["load_before"][0] > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes keep the CPU busy; CPU timings and ratios will be unreliable")

    def progress(items, desc):
        return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=args.no_progress)

    tests = None
    if args.gpu_check:
        print(f"\nCUDA tests ({gpu_check.CUDA_TESTS}, compiled kernels):")
        tests = gpu_check.run_cuda_tests()
        print(tests["output_tail"] or tests["summary"])
    providers, skipped = _select_providers(args, device)
    checks = _check(shapes, providers, dtype, device, args, progress)
    for name, note in skipped.items():
        print(f"skipped {name}: {note}")
    print("\nAgreement with the float64 reference (max |y - ref| / max |ref|):")
    print(report.text_table(report.CHECK_COLUMNS, report.check_rows(checks)))
    failures = [c for c in checks if not c["ok"]]
    if failures:
        for c in failures:
            detail = c["quantity"] if c["max_rel_err"] is None else (
                f"{c['quantity']} max relative error {c['max_rel_err']:.3e} > {c['tolerance']:.0e}")
            print(f"FAIL: {c['provider']} on {c['shape']}: {detail}", file=sys.stderr)
        print(report.verdict_line({"checks": checks, "results": [], "environment": environment}))
        return _fail("providers disagree with the reference; nothing timed", 1)
    if not providers:
        return _fail("no provider available to time", 1)

    results = _time(shapes, providers, dtype, device, args, progress, args.mode)
    results += _time_beside_neighbour(shapes, providers, dtype, device, args, progress, environment)
    environment["load_after"] = _load()
    record = {
        "date": now.strftime("%Y-%m-%d"), "timestamp": now.isoformat(timespec="seconds"),
        "environment": environment, "dtype": args.dtype, "modes": args.mode,
        "shapes": [s.as_dict() for s in shapes], "providers": {p.name: p.description for p in providers},
        "skipped": skipped, "checks": checks, "results": results,
    }
    if tests is not None:
        record["tests"] = tests
    record["verdict"] = report.verdict_line(record)
    print("\nTimings (median; x linear = median of per-round ratios to nn.Linear):")
    print(report.text_table(report.RESULT_COLUMNS, report.result_rows(results)))
    target_rows = report.target_rows(results)
    if target_rows:
        print("\nTargets:")
        print(report.text_table(report.TARGET_COLUMNS, target_rows))
    try:
        _write_record(record, paths)
    except FileExistsError as error:
        return _fail(f"{Path(error.filename).resolve()} appeared during the run; nothing overwritten")
    print("\nwrote " + ", ".join(str(p.resolve()) for p in paths.values()))
    print(record["verdict"])
    if tests is not None and tests["returncode"] != 0:
        return _fail(f"the CUDA tests failed: {tests['summary']}", 1)
    if args.require_targets and not all(v["met"] for r in results for v in r["targets"]):
        return _fail("--require-targets: some docs/design.md §8 targets are not met (see the verdict)",
                     TARGETS_NOT_MET)
    return 0
