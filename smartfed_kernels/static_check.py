"""Compile every MoRE kernel configuration for sm_80 / sm_90 without a GPU and report its resources.

    python -m smartfed_kernels.static_check [--arch sm_80 sm_90] [--dtype bf16 ...] [--kernel NAME ...]
                                            [--where KEY=VALUE ...] [--json FILE] [--dump DIR]
    smartfed inspect ...                    (the same, from the smartfed command)

For each (arch, dtype, kernel, config) the launcher can choose (smartfed_kernels.triton.configs),
``triton.compile`` builds a cubin for ``GPUTarget("cuda", arch, 32)``; the ``cuobjdump`` shipped
inside triton's package reports registers, the stack frame and local memory (spill bytes:
STACK + LOCAL), and the SASS, where tensor-core products show as HMMA (sm_80) / HGMMA (sm_90).
Pointers are compiled as 16-byte aligned (what the runtime sees for torch allocations); sizes and
strides as generic 32-bit integers. Exits 1 if a compile fails, a config spills, or an fp16/bf16
config has no tensor-core instruction.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ARCHS = {"sm_80": 80, "sm_90": 90}
# Kernel arguments that hold fp32 work buffers or int32 indices whatever the input dtype.
FP32_POINTERS = {
    "gate_ptr", "shrink_ptr", "shrink_all_ptr", "logits_ptr", "lse_ptr", "dz_ptr", "dh_ptr",
    "first_ptr", "second_ptr", "first_out_ptr", "second_out_ptr", "bias_out_ptr", "out_ptr",
}
INT32_POINTERS = {"index_ptr"}
FLOAT_SCALARS = {"gamma"}
TENSOR_CORE_OPCODE = re.compile(r"\b(HMMA|HGMMA)\.")
RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump_path() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump: expected it inside the triton package at {path}")
    return path


def _signature(kernel, dtype_name, constexprs):
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype_name]
    signature, attrs = {}, {}
    for position, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = "fp32" if name in FP32_POINTERS else "i32" if name in INT32_POINTERS else short
            signature[name] = f"*{element}"
            attrs[(position,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    missing = set(n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr) - set(constexprs)
    if missing:
        raise ValueError(f"config of {kernel.__name__}: constexprs {sorted(missing)} have no value")
    return signature, attrs


def _kernels():
    from smartfed_kernels.triton import backward, forward

    return {
        "more_forward_kernel": forward.more_forward_kernel,
        "routing_grad_kernel": backward.routing_grad_kernel,
        "input_grad_kernel": backward.input_grad_kernel,
        "rows_grad_kernel": backward.rows_grad_kernel,
        "expert_b_grad_kernel": backward.expert_b_grad_kernel,
    }


def config_label(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.constexprs if k != "DOT_PRECISION")


def _root_cause(error) -> str:
    """Triton wraps the real compile error in a chain of source excerpts: report the innermost."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def inspect_one(arch, dtype_name, kernel_name, config, dump_dir=None) -> dict:
    """Compile one configuration and read its resource usage and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels()[kernel_name]
    constexprs = dict(config.constexprs)
    signature, attrs = _signature(kernel, dtype_name, constexprs)
    row = {"arch": arch, "dtype": dtype_name, "kernel": kernel_name, "config": config_label(config),
           "num_warps": config.num_warps, "num_stages": config.num_stages}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # report every failing config, not only the first
        row["error"] = _root_cause(error)
        return row
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump_path()), "--dump-sass", str(path)],
                              capture_output=True, text=True, check=True).stdout
    registers, stack, static_shared, local = map(int, RESOURCE_LINE.search(usage).groups())
    row.update(
        registers=registers,
        spill_bytes=stack + local,
        shared_bytes=static_shared + int(compiled.metadata.shared),
        tensor_core_ops=len(TENSOR_CORE_OPCODE.findall(sass)),
    )
    if dump_dir is not None:
        name = f"{kernel_name}-{arch}-{dtype_name}-{abs(hash(row['config'])) % 10**8:08d}.cubin"
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / name).write_bytes(cubin)
        row["cubin"] = name
    return row


def problems(row) -> list:
    found = []
    if "error" in row:
        found.append(f"compile failed: {row['error']}")
        return found
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes")
    if row["dtype"] != "float32" and row["tensor_core_ops"] == 0:
        found.append("no HMMA/HGMMA instruction")
    return found


def format_table(rows) -> str:
    header = ("arch", "dtype", "kernel", "warps", "regs", "spill", "smem", "mma", "config")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['arch']} | {row['dtype']} | {row['kernel']} | - | - | - | - | - | "
                         f"{row['config']} FAILED {row['error']}")
            continue
        lines.append(" | ".join(str(v) for v in (
            row["arch"], row["dtype"], row["kernel"], row["num_warps"], row["registers"],
            row["spill_bytes"], row["shared_bytes"], row["tensor_core_ops"], row["config"],
        )))
    return "\n".join(lines)


def where_pair(text: str) -> tuple:
    """One ``KEY=VALUE`` filter on constexprs; the value parses as a Python literal (64, True, or
    32,64 for either)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _selected(config, where) -> bool:
    values = dict(config.constexprs)
    return all(values[key] in (value if isinstance(value, tuple) else (value,))
               for key, value in where.items() if key in values)


def collect(archs, dtype_names, kernel_names=None, dump_dir=None, progress=True, where=None) -> list:
    import torch
    from tqdm import tqdm

    from smartfed_kernels.triton.configs import all_configs

    jobs = []
    for arch in archs:
        for dtype_name in dtype_names:
            for kernel_name, config in all_configs(getattr(torch, dtype_name)):
                if (kernel_names is None or kernel_name in kernel_names) and _selected(config, where or {}):
                    jobs.append((arch, dtype_name, kernel_name, config))
    return [inspect_one(*job, dump_dir=dump_dir)
            for job in tqdm(jobs, desc="compiling", disable=not progress, file=sys.stderr)]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of the check, on ``parser`` (this module's own, or `smartfed inspect`'s)."""
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS),
                        help="GPU architectures to compile for (default: all)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPE_NAMES), default=["fp32", "fp16", "bf16"],
                        help="input dtypes (default: fp32 fp16 bf16)")
    parser.add_argument("--kernel", nargs="+", choices=sorted(_KERNEL_NAMES), default=None,
                        help="only these kernels (default: every kernel)")
    parser.add_argument("--where", nargs="+", type=where_pair, default=None, metavar="KEY=VALUE",
                        help="only configs whose constexpr KEY (when it has one) equals VALUE (A,B: either), "
                             "e.g. BLOCK_E=32,64 GATE=0")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the rows as JSON to this file")
    parser.add_argument("--dump", type=Path, default=None, metavar="DIR", help="write every cubin into this directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m smartfed_kernels.static_check",
                                     description=__doc__.split("\n")[0])
    configure_parser(parser)
    return parser


_KERNEL_NAMES = ("more_forward_kernel", "routing_grad_kernel", "input_grad_kernel", "rows_grad_kernel",
                 "expert_b_grad_kernel")


def run(args) -> int:
    """Compile, print the table and the failures; 1 when anything failed (the `smartfed inspect` entry)."""
    rows = collect(args.arch, [DTYPE_NAMES[d] for d in args.dtype], args.kernel, args.dump,
                   progress=not args.no_progress, where=dict(args.where or ()))
    print(format_table(rows))
    failures = [(row, problem) for row in rows for problem in problems(row)]
    for row, problem in failures:
        print(f"FAIL {row['arch']} {row['dtype']} {row['kernel']} [{row['config']}]: {problem}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "failures": len(failures)}, indent=1))
    return 1 if failures else 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
