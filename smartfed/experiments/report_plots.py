"""The PNG plots of ``smartfed report`` (matplotlib on its file-only Agg backend): accuracy per
round and per cumulative byte, the mean accuracy-bytes trade-off, validation accuracy of chosen
rates, EEQA quotas per matrix and expert usage by source adapter."""

import re

from smartfed.experiments.selection import mean_std


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
            for record in run.validation_records:
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

    records = [r for r in run.completed if r.get("quotas")]
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

    records = [r for r in run.completed if r.get("expert_usage")]
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
