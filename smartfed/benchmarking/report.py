"""Renderings of one benchmark run: console/markdown tables, the JSON record, the PNG plot."""

import json

RESULT_COLUMNS = ("shape", "mode", "provider", "ms", "x linear", "GFLOP", "MB", "TFLOP/s", "GB/s",
                  "FLOP/B", "roofline", "design §8 target")


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


NEIGHBOUR_MARK = " +neighbour"


def row_label(result) -> str:
    """The shape of a timed row, marked when it was timed beside a neighbour process."""
    return result["shape"]["label"] + (NEIGHBOUR_MARK if result.get("neighbour") else "")


def result_rows(results):
    rows = []
    for r in results:
        targets = "; ".join(f"{v['target']}: {'met' if v['met'] else 'NOT met'} ({v['ratio']:.2f})"
                            for v in r["targets"]) or "-"
        rows.append((
            row_label(r), r["mode"], r["provider"], _fmt(r["median_ms"]), _fmt(r["ratio_to_linear"]),
            f"{r['min_gflop']:.3g}", f"{r['min_mbytes']:.3g}", f"{r['tflops']:.3g}", f"{r['gbytes_per_s']:.3g}",
            f"{r['flop_per_byte']:.3g}",
            "-" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%", targets,
        ))
    return rows


def check_rows(checks):
    return [(c["shape"], c["provider"], c["quantity"], "-" if c["max_rel_err"] is None else f"{c['max_rel_err']:.2e}",
             f"{c['tolerance']:.0e}", "ok" if c["ok"] else "FAIL") for c in checks]


CHECK_COLUMNS = ("shape", "provider", "compared", "max rel err", "tolerance", "result")
TARGET_COLUMNS = ("target", "shape", "mode", "provider", "against", "ratio", "bound", "result")


def target_rows(results):
    """One row per target verdict of the run, in table order."""
    return [(v["target"], row_label(r), r["mode"], r["provider"], v["against"], f"{v['ratio']:.2f}",
             f"{v['bound']:.2f}", "met" if v["met"] else "NOT met") for r in results for v in r["targets"]]


def text_table(columns, rows) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(columns), line("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(columns, rows) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(out)


def markdown_report(record) -> str:
    env = record["environment"]
    targets = target_rows(record["results"])
    lines = [
        f"# `smartfed bench` on {env['device_name']} ({env['device']}), {record['dtype']}",
        "",
        f"{record['date']}; torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
        f"python {env['python']}; {env['threads']} threads; load average before {env['load_before']}, "
        f"after {env['load_after']}." + (f" C kernels: {env['cpu_kernels']}." if "cpu_kernels" in env else ""),
        "Times are medians over interleaved rounds; `x linear` is the median of per-round ratios to "
        "nn.Linear; GFLOP and MB are the minimum work of the call (see smartfed/benchmarking/work.py).",
    ]
    if "cpu_capability" in env:
        isa = ", ".join(f"{k}={v}" for k, v in env["isa_environment"].items() if v) or "none set"
        lines.append(f"CPU capability used by torch: {env['cpu_capability']} (ISA variables: {isa}).")
    if "neighbour" in env:
        lines.append(f"Rows marked `{NEIGHBOUR_MARK.strip()}` were timed while another process ran "
                     f"{env['neighbour']['work']} on {env['neighbour']['threads']} threads.")
    if "verdict" in record:
        lines += ["", f"**{record['verdict']}**"]
    lines.append("")
    if "tests" in record:
        tests = record["tests"]
        lines += ["## CUDA tests", "", f"`{tests['command']}`: exit code {tests['returncode']}, {tests['summary']} "
                  f"({tests['seconds']} s).", ""]
    lines += [
        "## Targets",
        "",
        markdown_table(TARGET_COLUMNS, targets) if targets
        else "No target applies to the shapes, providers and dtype of this run.",
        "",
        "## Timings",
        "",
        markdown_table(RESULT_COLUMNS, result_rows(record["results"])),
        "",
        "## Agreement with the float64 reference",
        "",
        markdown_table(CHECK_COLUMNS, check_rows(record["checks"])),
    ]
    if record["skipped"]:
        lines += ["", "## Skipped providers", ""]
        lines += [f"- {name}: {note}" for name, note in record["skipped"].items()]
    return "\n".join(lines) + "\n"


def json_text(record) -> str:
    return json.dumps(record, indent=2) + "\n"


def _load_meaning(env) -> str:
    """What the load averages say about the timings (the 1-minute values)."""
    cores = env.get("cpu_count") or 1
    before = env["load_before"][0]
    own = env["threads"] + (env["neighbour"]["threads"] if "neighbour" in env else 0)
    after = env.get("load_after")
    measured = f"load {before:.2f} before" + (f", {after[0]:.2f} after" if after else "") + f" on {cores} cores"
    if env["device"] != "cpu":
        return f"{measured} (GPU timings depend little on it)"
    counted = f"; the load after counts this bench's own {own} threads" + (
        " (its neighbour's included)" if "neighbour" in env else "")
    if before <= 0.25 * cores:
        meaning = "quiet before the run: ratios representative"
    elif before <= 0.75 * cores:
        meaning = (f"other processes used about {before:.1f} of {cores} cores before the run: ratios somewhat "
                   "inflated, compare with a run on idle cores")
    else:
        meaning = (f"other processes kept the cores busy before the run: CPU ratios unreliable, rerun on "
                   "idle cores")
    return f"{measured}: {meaning}" + (counted if after else "")


def verdict_line(record) -> str:
    """One line: correctness x/y, targets met x/y (naming those not met), the load and its meaning."""
    checks = record["checks"]
    verdicts = [(row_label(r), v) for r in record["results"] for v in r["targets"]]
    missed = [f"{v['target']} on {label} ({v['ratio']:.2f})" for label, v in verdicts if not v["met"]]
    targets = f"targets met {len(verdicts) - len(missed)}/{len(verdicts)}"
    if missed:
        targets += " (NOT met: " + "; ".join(missed) + ")"
    if not verdicts:
        targets = "no target applies" if record["results"] else "nothing timed"
    return (f"verdict: correctness {sum(c['ok'] for c in checks)}/{len(checks)} ok; {targets}; "
            f"{_load_meaning(record['environment'])}")


def write_plot(record, path):
    """One panel per mode: time ratio to nn.Linear per shape, a bar per provider, log scale.

    Targets against nn.Linear show as a dashed mark over the bar they apply to. ``path``: a file
    name or a binary file object.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    results = record["results"]
    modes = list(dict.fromkeys(r["mode"] for r in results))
    shapes = list(dict.fromkeys(row_label(r) for r in results))
    providers = list(dict.fromkeys(r["provider"] for r in results))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 1.6 * len(shapes) * len(providers) / 3), 3.2 * len(modes)),
                             squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[:, 0], modes):
        for p_index, provider in enumerate(providers):
            ratios = []
            for s_index, shape in enumerate(shapes):
                match = [r for r in results if r["mode"] == mode and r["provider"] == provider
                         and row_label(r) == shape]
                ratios.append(match[0]["ratio_to_linear"] if match and match[0]["ratio_to_linear"] else 0.0)
                centre = s_index + p_index * width
                for verdict in (match[0]["targets"] if match else []):
                    if verdict["against"] == "linear":
                        ax.hlines(verdict["bound"], centre - width / 2, centre + width / 2, colors="black",
                                  linestyles="--", linewidth=1.2)
                        ax.annotate("met" if verdict["met"] else "NOT met", (centre, verdict["bound"]),
                                    xytext=(0, 2), textcoords="offset points", ha="center", fontsize=5,
                                    color="green" if verdict["met"] else "red")
            ax.bar([i + p_index * width for i in range(len(shapes))], ratios, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%.2g"))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_ylabel(f"{mode}: time / nn.Linear")
        ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, fontsize=7)
    axes[0, 0].legend(fontsize=7, ncol=len(providers))
    axes[0, 0].set_title(f"{record['environment']['device_name']}, {record['dtype']} ({record['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
