"""``smartfed report RUN_DIR... --output DIR``: tables and plots from federated runs.

Reads every ``metrics.jsonl`` under the given folders (a run folder, or a folder of run folders)
with the ``config.json`` and, for text tasks, ``text_task.json`` beside it. Writes
``report.md`` (one row per run, one row per task and method averaged over seeds, and the
docs/design.md §8 target check: does SmartFed reach FedIT's final accuracy within a third of FedIT's rounds
and half its bytes, per task and seed) and PNG plots: accuracy vs round, accuracy vs cumulative
bytes (up + down), EEQA quota per matrix over rounds (one heatmap per run that has quotas), and
expert usage by source adapter: a plot for runs whose records carry ``expert_usage`` per round,
a table for runs with an ``expert_usage.json`` (final routers, smartfed.experiments.expert_usage).

Runs of a sweep entry with ``lr_grid`` (``<method>@lr=<rate>``) are first narrowed to the rate
chosen on validation (smartfed.experiments.selection): ``selection.json`` and ``selection.md``
record every rate's validation numbers, ``validation_accuracy_chosen.png`` plots the chosen
rates' validation accuracy per round, and every other table and plot shows only the chosen runs,
under the entry's name.
"""

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from smartfed.experiments.selection import mean_std
from smartfed.federated.run_dir import METRICS_FILE

USAGE_FILE = "expert_usage.json"
TRADEOFF_PLOT = "accuracy_vs_bytes_mean.png"
USAGE_PLOT = "expert_usage_final.png"


@dataclass
class Run:
    path: Path
    task: str
    method: str  # method label: the method, with the router form for SmartFed
    seed: int
    base_method: str = ""  # the method the run trained (config "method"): smartfed for every router form
    records: list = field(default_factory=list)  # completed rounds, in order
    local_steps: int = 1  # optimizer steps per client and round, to turn client compute into step time
    chosen_lr: Optional[float] = None  # a run of an lr_grid entry: its rate, chosen on validation

    @property
    def rounds(self):
        return [r["round"] for r in self.records]

    @property
    def accuracy(self):
        return [r["accuracy"] for r in self.records]

    @property
    def cumulative_bytes(self):
        return [r["total_bytes_up"] + r["total_bytes_down"] for r in self.records]

    @property
    def client_step_seconds(self):
        """Seconds per local step of every (round, client), or [] when not recorded."""
        return [seconds / self.local_steps for r in self.records
                for seconds in (r.get("client_compute_s") or {}).values()]


def method_label(config):
    if config.get("label"):
        return config["label"]
    method = config.get("method", "smartfed")
    if method == "smartfed":
        router = (config.get("more") or {}).get("router", "linear")
        return "smartfed" if router == "linear" else f"smartfed_{router}"
    return method


def load_run(metrics_path):
    metrics_path = Path(metrics_path)
    folder = metrics_path.parent
    records = []
    for number, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics_path}:{number} is not JSON ({error})") from error
        if record.get("status", "completed") == "completed":
            records.append(record)
    if not records:
        raise ValueError(f"{metrics_path} holds no completed round")
    for key in ("round", "accuracy", "total_bytes_up", "total_bytes_down"):
        if key not in records[0]:
            raise ValueError(f"{metrics_path}: records lack {key!r}; is this a smartfed train metrics file?")
    records.sort(key=lambda r: r["round"])
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    task_file = folder / "text_task.json"
    if task_file.is_file():
        task = json.loads(task_file.read_text())["name"]
    else:
        task = (config.get("task") or {}).get("name", "synthetic")
    method = method_label(config) if config else records[0].get("method", "unknown")
    local_steps = int((config.get("federation") or {}).get("local_steps", 1))
    return Run(path=folder, task=task, method=method, seed=int(config.get("seed", 0)), records=records,
               local_steps=local_steps, base_method=config.get("method", records[0].get("method", "unknown")))


def find_runs(paths):
    """Every run under ``paths`` (folders holding metrics.jsonl, searched recursively)."""
    runs = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"run folder {path} does not exist")
        found = [path / METRICS_FILE] if (path / METRICS_FILE).is_file() else sorted(path.rglob(METRICS_FILE))
        if not found:
            raise FileNotFoundError(f"no {METRICS_FILE} under {path}")
        runs.extend(load_run(metrics) for metrics in found)
    return runs


def reach(run, accuracy):
    """(round, cumulative bytes) of the first round of ``run`` at or above ``accuracy``, or None."""
    for record, total in zip(run.records, run.cumulative_bytes):
        if record["accuracy"] >= accuracy:
            return record["round"], total
    return None


def _reference_runs(runs, reference):
    """{(task, seed): the reference method's run}."""
    return {(run.task, run.seed): run for run in runs if run.method == reference}


def target_checks(runs, *, reference="fedit"):
    """Per (task, seed, method other than the reference): rounds and bytes to reach the
    reference's final accuracy, against a third of its rounds and half its bytes."""
    references = _reference_runs(runs, reference)
    by_key = {(run.task, run.seed, run.method): run for run in runs}
    checks = []
    for (task, seed, method), run in sorted(by_key.items()):
        base = references.get((task, seed))
        if method == reference or base is None or run.base_method != "smartfed":
            continue
        goal, rounds, total = base.accuracy[-1], base.rounds[-1], base.cumulative_bytes[-1]
        reached = reach(run, goal)
        checks.append({
            "task": task, "seed": seed, "method": method, "fedit_final_accuracy": goal, "fedit_rounds": rounds,
            "fedit_bytes": total, "reached_round": reached[0] if reached else None,
            "reached_bytes": reached[1] if reached else None,
            "rounds_ok": bool(reached and reached[0] <= rounds / 3),
            "bytes_ok": bool(reached and reached[1] <= 0.5 * total),
        })
    return checks


def target_met(check):
    """Whether a :func:`target_checks` row meets both halves of the target."""
    return check["rounds_ok"] and check["bytes_ok"]


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _reach_columns(members, runs, reference="fedit"):
    """Per seed, the round reaching the reference's final accuracy on the same task and seed
    ('-' if never), and the mean MB at reach over the seeds that reached it."""
    references = _reference_runs(runs, reference)
    rounds, megabytes = [], []
    for member in sorted(members, key=lambda run: run.seed):
        base = references.get((member.task, member.seed))
        reached = None if base is None else reach(member, base.accuracy[-1])
        rounds.append("-" if reached is None else str(reached[0]))
        if reached is not None:
            megabytes.append(reached[1])
    if not references:
        return "no FedIT run", "-"
    return " / ".join(rounds), (_megabytes(sum(megabytes) / len(megabytes)) if megabytes else "never")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _megabytes(value):
    return f"{value / 1e6:.3f}"


def _chosen_lr(run):
    return "-" if run.chosen_lr is None else repr(run.chosen_lr)


def markdown_report(runs, plots, selections=(), configurations=None):
    """report.md of ``runs``; with ``selections`` (smartfed.experiments.selection), ``runs`` are
    the chosen ones (:func:`headline_runs`) and the report opens with how they were chosen, and
    with ``configurations`` the target section says how the entry chosen among SmartFed's fares."""
    # Only runs with a validation split log val_accuracy; reports of the others keep their columns.
    with_validation = any("val_accuracy" in run.records[-1] for run in runs)
    run_rows = [
        [run.path.name, run.task, run.method, *([_chosen_lr(run)] if selections else []), run.seed, run.rounds[-1],
         f"{run.accuracy[-1]:.3f}",
         *([f"{run.records[-1]['val_accuracy']:.3f}" if "val_accuracy" in run.records[-1] else "-"]
           if with_validation else []),
         f"{max(run.accuracy):.3f}", _megabytes(run.records[-1]["total_bytes_up"]),
         _megabytes(run.cumulative_bytes[-1]), f"{sum(r.get('wall_s', 0.0) for r in run.records):.0f}"]
        for run in sorted(runs, key=lambda r: (r.task, r.method, r.seed))
    ]
    groups = {}
    for run in runs:
        groups.setdefault((run.task, run.method), []).append(run)
    group_rows = []
    for (task, method), members in sorted(groups.items()):
        final_mean, final_std = mean_std([m.accuracy[-1] for m in members])
        best_mean, _ = mean_std([max(m.accuracy) for m in members])
        bytes_mean, _ = mean_std([m.cumulative_bytes[-1] for m in members])
        per_round = bytes_mean / mean_std([m.rounds[-1] for m in members])[0]
        reached_rounds, reached_megabytes = _reach_columns(members, runs)
        steps = [seconds for m in members for seconds in m.client_step_seconds]
        group_rows.append([task, method, *([_chosen_lr(members[0])] if selections else []), len(members),
                           f"{final_mean:.3f} ± {final_std:.3f}", f"{best_mean:.3f}",
                           _megabytes(bytes_mean), _megabytes(per_round), reached_rounds, reached_megabytes,
                           f"{_median(steps):.2f}" if steps else "-"])
    checks = target_checks(runs)
    check_rows = [
        [c["task"], c["seed"], c["method"], f"{c['fedit_final_accuracy']:.3f}", c["fedit_rounds"],
         _megabytes(c["fedit_bytes"]), c["reached_round"] if c["reached_round"] is not None else "not reached",
         _megabytes(c["reached_bytes"]) if c["reached_bytes"] is not None else "-",
         "yes" if target_met(c) else "no"]
        for c in checks
    ]
    parts = [
        "# Federated runs", "",
        "Accuracy is on each task's fixed evaluation split after the round's aggregation; bytes are the "
        "serialized payloads (MB = 1e6 bytes), up + down unless marked.", "",
        *([selection_markdown(selections, configurations), ""] if selections else []),
        "## Runs", "",
        _table(["run", "task", "method", *(["chosen lr"] if selections else []), "seed", "rounds", "final acc",
                *(["final val acc"] if with_validation else []), "best acc", "MB up", "MB up+down", "wall s"],
               run_rows),
        "", "## Mean over seeds", "",
        "Round reached: the first round at or above FedIT's final accuracy of the same task and seed, "
        "per seed in seed order ('-': never); MB at reach: mean over the seeds that reached it. "
        "Client step: median seconds per local optimizer step over every sampled client and round.", "",
        _table(["task", "method", *(["chosen lr"] if selections else []), "seeds", "final acc (mean ± std)",
                "best acc", "MB up+down", "MB per round",
                "round reached FedIT final", "MB at reach", "client step s"], group_rows),
        "", "## Target (docs/design.md §8): reach FedIT's final accuracy in <= 1/3 of its rounds with <= 1/2 of its bytes", "",
        _table(["task", "seed", "method", "FedIT final acc", "FedIT rounds", "FedIT MB", "round reached",
                "MB at reach", "target met"], check_rows) if check_rows
        else "No task and seed has both a FedIT and a SmartFed run.",
        *(["", verdict] if (verdict := _verdict_markdown(checks, configurations or {})) else []),
        "", "## Plots", "",
    ]
    parts += [f"![{name}]({name})" for name in plots]
    usage_rows = []
    for run in sorted(runs, key=lambda r: (r.task, r.method, r.seed)):
        if (run.path / USAGE_FILE).is_file():
            usage = json.loads((run.path / USAGE_FILE).read_text())
            usage_rows.append([run.task, run.method, run.seed, usage["round"], usage["prompts"],
                               ", ".join(f"{name} {share:.2f}" for name, share in usage["selections"].items()),
                               ", ".join(f"{name} {share:.2f}" for name, share in usage["gate_mass"].items())])
    if usage_rows:
        parts += ["", "## Expert usage by source adapter (final routers, every token of the evaluation prompts)", "",
                  _table(["task", "method", "seed", "round", "prompts", "share of top-k selections",
                          "share of gate mass"], usage_rows)]
    elif not any("expert_usage" in r for run in runs for r in run.records):
        parts += ["", "Expert usage by source adapter: not recorded for these runs."]
    return "\n".join(parts) + "\n"


def headline_runs(runs, selections):
    """``runs`` with the runs of each lr_grid entry narrowed to its chosen rate, named after the entry."""
    from smartfed.experiments.selection import grid_point

    chosen = {id(run): selection for selection in selections for run in selection.chosen.runs}
    headline = []
    for run in runs:
        selection = chosen.get(id(run))
        if selection is not None:
            headline.append(replace(run, method=selection.family, chosen_lr=selection.chosen.lr))
        elif grid_point(run.method) is None:
            headline.append(run)
    return headline


def selection_markdown(selections, configurations=None):
    """The section of report.md (and the whole of selection.md) that shows how each lr_grid
    entry's rate, and each method's entry (``configurations``), was chosen: validation numbers
    only, none of the test split."""
    from smartfed.experiments.selection import CONFIGURATION_RULE, LAST_ROUNDS, RULE

    rows = [[selection.task, selection.family, repr(candidate.lr),
             ", ".join(str(seed) for seed in candidate.selection_seeds),
             f"{candidate.mean:.3f} ± {candidate.std:.3f}",
             " / ".join(f"{score:.3f}" for score in candidate.scores),
             ("**chosen**, runs seeds " + ", ".join(str(run.seed) for run in candidate.runs))
             if candidate is selection.chosen else ""]
            for selection in selections for candidate in selection.candidates]
    parts = [
        "## Learning rates chosen on validation", "",
        f"Rule: {RULE}. Every other table and plot shows only the chosen rate's runs, under the method's name.", "",
        _table(["task", "method", "lr", "seeds scored", f"val acc, last {LAST_ROUNDS} rounds (mean ± std)",
                "per seed", "chosen"], rows),
    ]
    if configurations:
        rows = [[task, configuration.method, ", ".join(str(seed) for seed in configuration.seeds),
                 ", ".join(f"{'**' + entry + '**' if entry == configuration.chosen.family else entry} "
                           f"{score:.3f}" for entry, score in configuration.scores.items()),
                 f"{configuration.chosen.family} (lr {configuration.chosen.chosen.lr!r})"]
                for task, configuration in sorted(configurations.items())]
        parts += ["", "## Configuration chosen on validation", "",
                  f"Rule: {CONFIGURATION_RULE}.", "",
                  _table(["task", "method", "seeds scored", "val acc of each entry's chosen rate", "chosen"], rows)]
    return "\n".join(parts)


def configuration_verdicts(checks, configurations):
    """Per task, the target checks of the configuration chosen on validation: (entry, checks)."""
    return {task: (configuration.chosen.family,
                   [check for check in checks if check["task"] == task and check["method"] == configuration.chosen.family])
            for task, configuration in sorted(configurations.items())}


def _verdict_markdown(checks, configurations):
    verdicts = configuration_verdicts(checks, configurations)
    pairs = [check for _, task_checks in verdicts.values() for check in task_checks]
    if not pairs:
        return ""
    met = [check for check in pairs if target_met(check)]
    lines = [f"The configuration chosen on validation per task ({', '.join(f'{task}: {entry}' for task, (entry, _) in verdicts.items())}) "
             f"meets the target in {len(met)} of {len(pairs)} (task, seed) pairs."]
    for check in pairs:
        if target_met(check):
            continue
        if check["reached_round"] is None:
            why = f"never reaches FedIT's final {check['fedit_final_accuracy']:.3f}"
        else:
            why = "; ".join(reason for ok, reason in (
                (check["rounds_ok"], f"reaches it at round {check['reached_round']}, after a third of FedIT's "
                                     f"{check['fedit_rounds']} rounds"),
                (check["bytes_ok"], f"needs {_megabytes(check['reached_bytes'])} MB, over half of FedIT's "
                                    f"{_megabytes(check['fedit_bytes'])} MB")) if not ok)
        lines.append(f"- {check['task']} seed {check['seed']} ({check['method']}): {why}")
    return "\n".join(lines)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (reports run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _style_axis(axis, *, title, xlabel, ylabel, legend_size):
    axis.set_title(title, fontsize=9)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=legend_size)


def _plot_panels(panels, path, *, xlabel, ylabel, log_x=False):
    """One subplot per task of ``panels`` (task -> (title, {label: [(xs, ys), ...]})), a color per
    label and a line per series."""
    plt = _pyplot()

    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (title, lines) in zip(axes[0], (panels[task] for task in sorted(panels))):
        for color, (label, series) in zip(plt.cm.tab10.colors, lines.items()):
            for index, (xs, ys) in enumerate(series):
                axis.plot(xs, ys, marker="o", markersize=3, color=color, alpha=0.8,
                          label=label if index == 0 else None)
        if log_x:
            axis.set_xscale("log")
        _style_axis(axis, title=title, xlabel=xlabel, ylabel=ylabel, legend_size=8)
    _save(figure, path)


def plot_validation(selections, path):
    """Validation accuracy per round of the chosen rate of every lr_grid entry, the mean over its
    seeds (rounds every seed scored), to show whether it had flattened."""
    panels = {}
    for selection in selections:
        by_round = {}
        for run in selection.chosen.runs:
            for record in run.records:
                if "val_accuracy" in record:
                    by_round.setdefault(record["round"], []).append(record["val_accuracy"])
        seeds = len(selection.chosen.runs)
        rounds = [round_ for round_, scores in sorted(by_round.items()) if len(scores) == seeds]
        lines = panels.setdefault(selection.task, (f"{selection.task}: chosen learning rates, mean over seeds", {}))[1]
        lines[f"{selection.family} (lr {selection.chosen.lr!r}, {seeds} seed{'s' if seeds > 1 else ''})"] = [
            (rounds, [mean_std(by_round[round_])[0] for round_ in rounds])]
    _plot_panels(panels, path, xlabel="round", ylabel="validation accuracy")


def _group_curves(runs, x_of):
    groups = {}
    for run in runs:
        groups.setdefault(run.task, {}).setdefault(run.method, []).append(run)
    return {task: {m: [(x_of(run), run.accuracy) for run in rs] for m, rs in methods.items()}
            for task, methods in groups.items()}


def plot_accuracy(runs, path, *, by_bytes):
    curves = _group_curves(runs, (lambda r: r.cumulative_bytes) if by_bytes else (lambda r: r.rounds))
    panels = {task: (task, dict(sorted(methods.items()))) for task, methods in curves.items()}
    _plot_panels(panels, path, xlabel="cumulative bytes (up + down)" if by_bytes else "round", ylabel="accuracy",
                 log_x=by_bytes)


def _natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _short_module_name(name):
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def plot_quotas(run, path):
    """Heatmap of k per adapted matrix (rows) over rounds (columns)."""
    plt = _pyplot()
    import numpy as np

    records = [r for r in run.records if r.get("quotas")]
    modules = sorted(records[0]["quotas"], key=_natural_key)
    grid = np.array([[r["quotas"].get(m, 0) for r in records] for m in modules], dtype=float)
    figure, axis = plt.subplots(figsize=(max(4, 0.5 * len(records) + 3), max(3, 0.14 * len(modules) + 1.5)))
    image = axis.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(len(records)), [r["round"] for r in records])
    step = max(1, len(modules) // 64)
    axis.set_yticks(range(0, len(modules), step), [_short_module_name(modules[i]) for i in
                                                   range(0, len(modules), step)], fontsize=6)
    axis.set_xlabel("round")
    axis.set_title(f"EEQA quota k per matrix: {run.path.name}")
    figure.colorbar(image, ax=axis, label="k")
    _save(figure, path)


def plot_expert_usage(run, path):
    """Bar chart of the share of expert activations per source adapter, by round."""
    plt = _pyplot()

    records = [r for r in run.records if r.get("expert_usage")]
    adapters = sorted({name for r in records for name in r["expert_usage"]})
    figure, axis = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(records)
    for adapter in adapters:
        shares = [r["expert_usage"].get(adapter, 0.0) / max(sum(r["expert_usage"].values()), 1e-12) for r in records]
        axis.bar([r["round"] for r in records], shares, bottom=bottom, label=adapter)
        bottom = [b + s for b, s in zip(bottom, shares)]
    axis.set_xlabel("round")
    axis.set_ylabel("share of activations")
    axis.legend(fontsize=7)
    _save(figure, path)


def plot_tradeoff(runs, path, configurations=None):
    """Accuracy against cumulative MB (up + down), mean over seeds per round, one line per method
    and a panel per task; FedIT's final accuracy and half its bytes as guides, the configuration
    chosen on validation drawn thick."""
    plt = _pyplot()

    groups = {}
    for run in runs:
        groups.setdefault(run.task, {}).setdefault(run.method, []).append(run)
    tasks = sorted(groups)
    figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        chosen = configurations[task].chosen.family if configurations and task in configurations else None
        for color, (method, members) in zip(plt.cm.tab10.colors, sorted(groups[task].items())):
            length = min(len(member.records) for member in members)
            megabytes = [mean_std(member.cumulative_bytes[i] / 1e6 for member in members)[0] for i in range(length)]
            accuracy = [mean_std(member.accuracy[i] for member in members)[0] for i in range(length)]
            label = f"{method} ({len(members)} seed{'s' if len(members) > 1 else ''})"
            axis.plot(megabytes, accuracy, marker="o", markersize=3, color=color,
                      linewidth=3 if method == chosen else 1.2, label=label + (", chosen" if method == chosen else ""))
            if method == "fedit":
                axis.axhline(accuracy[-1], color=color, linestyle=":", linewidth=1)
                axis.axvline(megabytes[-1] / 2, color=color, linestyle="--", linewidth=1)
        axis.set_xscale("log")
        guides = " (dotted: FedIT final, dashed: half its MB)" if "fedit" in groups[task] else ""
        _style_axis(axis, title=f"{task}: mean over seeds{guides}", xlabel="cumulative MB (up + down)",
                    ylabel="test accuracy", legend_size=7)
    _save(figure, path)


def plot_final_expert_usage(usages, path):
    """Stacked bars of the share of top-k selections per source adapter, one bar per run
    (``usages``: [(run, expert_usage.json contents)]), a panel per task."""
    plt = _pyplot()

    tasks = sorted({run.task for run, _ in usages})
    adapters = sorted({name for _, usage in usages for name in usage["selections"]})
    colors = dict(zip(adapters, plt.cm.tab10.colors))
    figure, axes = plt.subplots(1, len(tasks), figsize=(9 * len(tasks), 0.35 * len(usages) + 2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        members = sorted(((run, usage) for run, usage in usages if run.task == task),
                         key=lambda item: (item[0].method, item[0].seed))
        labels = [f"{run.method} seed {run.seed}" for run, _ in members]
        left = [0.0] * len(members)
        for adapter in adapters:
            shares = [usage["selections"].get(adapter, 0.0) for _, usage in members]
            axis.barh(labels, shares, left=left, color=colors[adapter], label=adapter)
            left = [a + b for a, b in zip(left, shares)]
        axis.set_xlim(0, 1)
        axis.set_xlabel("share of top-k selections (final routers, evaluation prompts)")
        axis.set_title(f"{task}: expert usage by source adapter", fontsize=9)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(figure, path)


def write_report(run_paths, output_dir):
    """Write report.md, summary.json and the plots into ``output_dir`` (and, for runs of lr_grid
    entries, selection.json, selection.md and the chosen rates' validation plot); returns the
    report path."""
    from smartfed.experiments.selection import (
        SELECTION_FILE,
        SELECTION_TABLE,
        VALIDATION_PLOT,
        choose_configuration,
        select_by_validation,
        selection_record,
    )

    runs = find_runs(run_paths)
    selections = select_by_validation(runs)
    configurations = choose_configuration(selections, "smartfed")
    runs = headline_runs(runs, selections)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plots = ["accuracy_vs_round.png", "accuracy_vs_bytes.png", TRADEOFF_PLOT]
    if selections:
        (output / SELECTION_FILE).write_text(json.dumps(selection_record(selections, configurations), indent=1))
        (output / SELECTION_TABLE).write_text(selection_markdown(selections, configurations) + "\n")
        plots.append(VALIDATION_PLOT)
        plot_validation(selections, output / VALIDATION_PLOT)
    plot_accuracy(runs, output / plots[0], by_bytes=False)
    plot_accuracy(runs, output / plots[1], by_bytes=True)
    plot_tradeoff(runs, output / TRADEOFF_PLOT, configurations)
    usages = [(run, json.loads((run.path / USAGE_FILE).read_text())) for run in runs
              if (run.path / USAGE_FILE).is_file()]
    if usages:
        plots.append(USAGE_PLOT)
        plot_final_expert_usage(usages, output / USAGE_PLOT)
    for run in runs:
        label = f"{run.task}_{run.method}_seed{run.seed}_{run.path.name}"
        if any(r.get("quotas") for r in run.records):
            plots.append(f"quotas_{label}.png")
            plot_quotas(run, output / plots[-1])
        if any(r.get("expert_usage") for r in run.records):
            plots.append(f"expert_usage_{label}.png")
            plot_expert_usage(run, output / plots[-1])
    report = output / "report.md"
    report.write_text(markdown_report(runs, plots, selections, configurations))
    checks = target_checks(runs)
    summary = {
        "runs": [{"path": str(r.path), "task": r.task, "method": r.method, "chosen_lr": r.chosen_lr, "seed": r.seed,
                  "rounds": r.rounds, "accuracy": r.accuracy, "cumulative_bytes": r.cumulative_bytes}
                 for r in runs],
        "target_checks": checks,
        "chosen_configuration_checks": {
            task: {"entry": entry, "met": sum(map(target_met, task_checks)),
                   "pairs": len(task_checks)}
            for task, (entry, task_checks) in configuration_verdicts(checks, configurations).items()},
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return report


def configure_parser(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders (holding metrics.jsonl) or folders of run folders")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for report.md, summary.json and the PNG plots")


def run(args) -> int:
    report = write_report(args.runs, args.output)
    print(report.read_text())
    return 0

