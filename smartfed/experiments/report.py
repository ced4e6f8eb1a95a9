"""``smartfed report RUN_DIR... --output DIR``: tables and plots from federated runs.

Reads every ``metrics.jsonl`` under the given folders (a run folder, or a folder of run folders)
with the ``config.json`` and, for text tasks, ``text_task.json`` beside it. Writes
``report.md`` (one row per run, one row per task and method averaged over seeds, and the
docs/design.md §8 target check: does SmartFed reach FedIT's final accuracy within a third of FedIT's rounds
and half its bytes, per task and seed) and PNG plots: accuracy vs round, accuracy vs cumulative
bytes (up + down), EEQA quota per matrix over rounds (one heatmap per run that has quotas), and
expert usage by source adapter: a plot for runs whose records carry ``expert_usage`` per round,
a table for runs with an ``expert_usage.json`` (final routers, smartfed.experiments.expert_usage).

Runs of different configurations are never averaged together: within a task and method, runs
are keyed by their configuration minus the seed (``config_identity``), and runs whose configs
differ are reported as separate methods, each named with the values that set it apart. Beside
each run stand the base model's and the majority class's accuracy on the evaluation split when
the run recorded them (``text_task.json`` of ``smartfed sweep`` runs) or ``--baselines`` gives
them (benchmarks/results/experiment_zero_shot.json: keyed by task name and options).

Runs of a sweep entry with ``lr_grid`` (``<method>@lr=<rate>``) are first narrowed to the rate
chosen on validation (smartfed.experiments.selection): ``selection.json`` and ``selection.md``
record every rate's validation numbers, ``validation_accuracy_chosen.png`` plots the chosen
rates' validation accuracy per round, and every other table and plot shows only the chosen runs,
under the entry's name. Runs that kept per-item results get 95% intervals and paired tests
against FedIT, and SmartFed's forms against adapter mixture
(smartfed.experiments.report_statistics; ``statistics.json``).
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from smartfed.experiments.intervals import NO_CONCLUSION, bootstrap_interval, unpaired_difference
from smartfed.experiments.report_runs import (  # noqa: F401 (the names report users import from here)
    REPORT_IGNORED, Run, attach_baselines, config_identity, find_runs, load_run,
    method_label, separate_configurations,
)
from smartfed.experiments.report_statistics import (
    STATISTICS_FILE, WHOLE_ADAPTERS, interval_text, read_items, run_statistics,
)
from smartfed.experiments.selection import ReportError, mean_std  # noqa: F401
from smartfed.federated.run_dir import EXPERT_USAGE_FILE

BASELINE_COLUMNS = ["base model acc", "majority class acc"]
BASELINES_NOTE = ("Base model acc: the frozen base model without any adapter, scored like the runs (argmax over the "
                  "label tokens); majority class acc: the share of the most frequent label in the evaluation split.")
LOSS_NOTE = ("Loss is the cross-entropy of the answer token over the model's whole vocabulary at the answer "
             "position, so with a vocabulary of V tokens it stays near log V while accuracy, the argmax over the "
             "task's label tokens only, rises.")
THIRD_NOTE = ("Round at a third: the run's last test round within a third of FedIT's rounds; its accuracy minus "
              "FedIT's final, with a 95% interval over the test items and what the interval supports. Paired "
              "(a bootstrap over items of the per-item differences) where both rounds' per-item results exist "
              "(recorded by the round, or for FedIT's final by the re-score of its final state); otherwise "
              "unpaired (the normal approximation for two independent proportions, wider than "
              "a paired interval on the same items).")
THIRD_COLUMNS = ["round at a third", "acc there - FedIT final [95% CI]", "beyond noise"]
ABOVE, BELOW = "above FedIT's final", "below FedIT's final"
TRADEOFF_PLOT = "accuracy_vs_bytes_mean.png"
USAGE_PLOT = "expert_usage_final.png"


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
            **_at_a_third(run, base),
        })
    return checks


def _item_results(record):
    """The 0/1 per-item test results a round recorded (``test_correct``), or None when it has
    none or they are not a string of 0s and 1s."""
    recorded = record.get("test_correct")
    if not isinstance(recorded, str) or not recorded or set(recorded) - {"0", "1"}:
        return None
    return np.frombuffer(recorded.encode("ascii"), dtype=np.uint8).astype(np.float64) - ord("0")


def _final_item_results(run):
    """The 0/1 per-item test results of ``run``'s last round: recorded by the round itself, or by
    ``smartfed evaluate`` re-scoring the final state of that same round (``evaluation_items.json``,
    the same items in the same order), or None."""
    recorded = _item_results(run.records[-1])
    if recorded is not None:
        return recorded
    rescored = read_items(run)
    if rescored is None or rescored.get("round") != run.rounds[-1] or rescored.get("metric") != "correct":
        return None
    return np.asarray(rescored["correct"], dtype=np.float64)


def _at_a_third(run, base):
    """The run's accuracy at its last test round within a third of FedIT's rounds, minus FedIT's
    final accuracy, with its 95% interval and what the interval supports: is the target's
    accuracy reached beyond noise? Paired over the test items when both rounds' per-item results
    exist, else the unpaired normal approximation over the items counted."""
    early = [record for record in run.records if record["round"] <= base.rounds[-1] / 3]
    none = {"third_round": None, "difference_at_third": None, "interval": None, "at_third": None}
    if not early:
        return none
    items, reference_items = _item_results(early[-1]), _final_item_results(base)
    if items is not None and reference_items is not None and items.shape == reference_items.shape:
        difference, kind = bootstrap_interval(items - reference_items), "paired"
    elif run.test_items and base.test_items:
        difference = unpaired_difference(early[-1]["accuracy"], run.test_items, base.accuracy[-1], base.test_items)
        kind = "unpaired"
    else:
        return none
    verdict = ABOVE if difference.low > 0 else BELOW if difference.high < 0 else NO_CONCLUSION
    return {"third_round": early[-1]["round"], "difference_at_third": difference.as_dict(), "interval": kind,
            "at_third": verdict}


def _third_cells(check):
    difference = check["difference_at_third"]
    if difference is None:
        return ["-", "-", "-"]
    return [check["third_round"], f"{interval_text(difference)} ({check['interval']})", check["at_third"]]


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


def _baseline_cells(run):
    baselines = run.baselines or {}
    return [f"{baselines[key]:.3f}" if isinstance(baselines.get(key), (int, float)) else "-"
            for key in ("base_accuracy", "majority_accuracy")]


def _chosen_lr(run):
    return "-" if run.chosen_lr is None else repr(run.chosen_lr)


def markdown_report(runs, plots, selections=(), configurations=None, statistics=None):
    """report.md of ``runs``; with ``selections`` (smartfed.experiments.selection), ``runs`` are
    the chosen ones (:func:`headline_runs`) and the report opens with how they were chosen, and
    with ``configurations`` the target section says how the entry chosen among SmartFed's fares."""
    # Only runs with a validation split log val_accuracy; reports of the others keep their columns.
    with_validation = any("val_accuracy" in run.records[-1] for run in runs)
    # Likewise the baselines: recorded by smartfed sweep, or given with --baselines.
    with_baselines = any(run.baselines for run in runs)
    run_rows = [
        [run.path.name, run.task, run.method, *([_chosen_lr(run)] if selections else []), run.seed, run.rounds[-1],
         f"{run.accuracy[-1]:.3f}",
         *([f"{run.records[-1]['val_accuracy']:.3f}" if "val_accuracy" in run.records[-1] else "-"]
           if with_validation else []),
         *(_baseline_cells(run) if with_baselines else []),
         f"{max(run.accuracy):.3f}", _megabytes(run.records[-1]["total_bytes_up"]),
         _megabytes(run.cumulative_bytes[-1]), f"{run.wall_seconds:.0f}"]
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
                           f"{final_mean:.3f} ± {final_std:.3f}",
                           *(_baseline_cells(next((m for m in members if m.baselines), members[0]))
                             if with_baselines else []),
                           f"{best_mean:.3f}",
                           _megabytes(bytes_mean), _megabytes(per_round), reached_rounds, reached_megabytes,
                           f"{_median(steps):.2f}" if steps else "-"])
    checks = target_checks(runs)
    with_thirds = any(check["difference_at_third"] is not None for check in checks)
    check_rows = [
        [c["task"], c["seed"], c["method"], f"{c['fedit_final_accuracy']:.3f}", c["fedit_rounds"],
         _megabytes(c["fedit_bytes"]), c["reached_round"] if c["reached_round"] is not None else "not reached",
         _megabytes(c["reached_bytes"]) if c["reached_bytes"] is not None else "-",
         "yes" if target_met(c) else "no", *_third_cells(c)]
        for c in checks
    ]
    parts = [
        "# Federated runs", "",
        "Accuracy is on each task's fixed evaluation split after the round's aggregation; bytes are the "
        "serialized payloads (MB = 1e6 bytes), up + down unless marked. " + LOSS_NOTE, "",
        *([BASELINES_NOTE, ""] if with_baselines else []),
        *([selection_markdown(selections, configurations), ""] if selections else []),
        "## Runs", "",
        _table(["run", "task", "method", *(["chosen lr"] if selections else []), "seed", "rounds", "final acc",
                *(["final val acc"] if with_validation else []), *(BASELINE_COLUMNS if with_baselines else []),
                "best acc", "MB up", "MB up+down", "wall s"], run_rows),
        "", "## Mean over seeds", "",
        "Round reached: the first round at or above FedIT's final accuracy of the same task and seed, "
        "per seed in seed order ('-': never); MB at reach: mean over the seeds that reached it. "
        "Client step: median seconds per local optimizer step over every sampled client and round.", "",
        _table(["task", "method", *(["chosen lr"] if selections else []), "seeds", "final acc (mean ± std)",
                *(BASELINE_COLUMNS if with_baselines else []), "best acc", "MB up+down", "MB per round",
                "round reached FedIT final", "MB at reach", "client step s"], group_rows),
        "", "## Target (docs/design.md §8): reach FedIT's final accuracy in <= 1/3 of its rounds with <= 1/2 of its bytes", "",
        *([THIRD_NOTE, ""] if with_thirds else []),
        _table(["task", "seed", "method", "FedIT final acc", "FedIT rounds", "FedIT MB", "round reached",
                "MB at reach", "target met", *(THIRD_COLUMNS if with_thirds else [])], check_rows) if check_rows
        else "No task and seed has both a FedIT and a SmartFed run.",
        *(["", verdict] if (verdict := _verdict_markdown(checks, configurations or {})) else []),
        *(["", _statistics_markdown(statistics)] if statistics is not None else []),
        "", "## Plots", "",
    ]
    parts += [f"![{name}]({name})" for name in plots]
    usage_rows = []
    for run in sorted(runs, key=lambda r: (r.task, r.method, r.seed)):
        if (run.path / EXPERT_USAGE_FILE).is_file():
            usage = json.loads((run.path / EXPERT_USAGE_FILE).read_text())
            usage_rows.append([run.task, run.method, run.seed, usage["round"], usage["prompts"],
                               ", ".join(f"{name} {share:.2f}" for name, share in usage["selections"].items()),
                               ", ".join(f"{name} {share:.2f}" for name, share in usage["gate_mass"].items())])
    instruction_rows = _instruction_rows(runs)
    if instruction_rows:
        parts += ["", "## Instruction scores", "",
                  "Loss and perplexity: held-out response tokens, last round. Exact match, F1 (SQuAD-normalised) "
                  "and ROUGE-L: greedy answers at the last round that generated them (docs/data.md).", "",
                  _table(["run", "task", "method", "seed", "round", "loss", "perplexity", "generated at round",
                          "exact match", "F1", "ROUGE-L"], instruction_rows)]
    if usage_rows:
        parts += ["", "## Expert usage by source adapter (final routers, every token of the evaluation prompts)", "",
                  _table(["task", "method", "seed", "round", "prompts", "share of top-k selections",
                          "share of gate mass"], usage_rows)]
    elif not any("expert_usage" in r for run in runs for r in run.completed):
        parts += ["", "Expert usage by source adapter: not recorded for these runs."]
    return "\n".join(parts) + "\n"


def instruction_scores(run):
    """The instruction scores of ``run`` (None when its rounds logged none): loss and perplexity
    of its last round, and the generated answers' scores of the last round that generated them."""
    from smartfed.config.data import GENERATION_METRICS

    last = run.records[-1]
    if "perplexity" not in last:
        return None
    generated = [r for r in run.records if any(key in r for key in GENERATION_METRICS)]
    scores = {"round": last["round"], "loss": last["loss"], "perplexity": last["perplexity"]}
    if generated:
        scores.update({"generated_round": generated[-1]["round"],
                       **{key: generated[-1][key] for key in GENERATION_METRICS if key in generated[-1]}})
    return scores


def _instruction_rows(runs):
    from smartfed.config.data import GENERATION_METRICS

    rows = []
    for run in sorted(runs, key=lambda r: (r.task, r.method, r.seed)):
        scores = instruction_scores(run)
        if scores is not None:
            rows.append([run.path.name, run.task, run.method, run.seed, scores["round"], f"{scores['loss']:.3f}",
                         f"{scores['perplexity']:.2f}", scores.get("generated_round", "-"),
                         *(f"{scores[key]:.3f}" if key in scores else "-" for key in GENERATION_METRICS)])
    return rows


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
    from smartfed.experiments.selection import CONFIGURATION_RULE, LAST_ROUNDS, MIN_SELECTION_SEEDS, RULE

    rows = [[selection.task, selection.family, repr(candidate.lr),
             ", ".join(str(seed) for seed in candidate.selection_seeds),
             f"{candidate.mean:.3f} ± {candidate.std:.3f}",
             " / ".join(f"{score:.3f}" for score in candidate.scores),
             ("**chosen**, runs seeds " + ", ".join(str(run.seed) for run in candidate.runs))
             if candidate is selection.chosen else "",
             _edge_cell(selection) if candidate is selection.chosen else ""]
            for selection in selections for candidate in selection.candidates]
    parts = [
        "## Learning rates chosen on validation", "",
        f"Rule: {RULE}. Every other table and plot shows only the chosen rate's runs, under the method's name.", "",
        _table(["task", "method", "lr", "seeds scored", f"val acc, last {LAST_ROUNDS} rounds (mean ± std)",
                "per seed", "chosen", "grid edge"], rows),
    ]
    flagged = [selection for selection in selections if selection.edge or not selection.enough_seeds]
    if flagged:
        parts += ["", f"{len(flagged)} of {len(selections)} choices are flagged: a rate at an edge of its grid may "
                  "not be the best one (`smartfed sweep --extend-grids selection.json` runs the rate named), and a "
                  f"choice on fewer than {MIN_SELECTION_SEEDS} seeds rests on one run's noise."]
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


def _statistics_markdown(record):
    """The intervals section of report.md (smartfed.experiments.report_statistics)."""
    if not record["rows"]:
        return ("## Intervals and paired tests\n\nNo run kept per-item results (`evaluation_items.json`, written by "
                "`smartfed evaluate`), so no interval is given.")
    rows = []
    for row in record["rows"]:
        versus = row.get("versus_reference")
        rows.append([row["task"], row["method"], row["metric"], len(row["seeds"]), row["items"],
                     interval_text(row["all"]), interval_text(row.get("seen")), interval_text(row.get("unseen")),
                     "-" if versus is None else interval_text(versus["difference"]),
                     "-" if versus is None else f"{versus['p_value']:.4f}", "-" if versus is None else versus["verdict"]])
    lines = ["## Intervals and paired tests", "",
             f"Mean over seeds and test items with its {record['level']:.0%} bootstrap interval (items and seeds "
             "resampled); seen / unseen: the items under a template the federation trained on / one that neither the "
             "pool nor the federation saw. Versus FedIT: the paired difference on the seeds both ran (same items), its "
             "interval, the sign-flip p-value, and the verdict the interval supports.", "",
             _table(["task", "method", "metric", "seeds", "items", "mean [95% CI]", "seen", "unseen", "vs FedIT", "p",
                     "verdict"], rows)]
    lines += [f"- not compared: {reason}" for reason in record["skipped"]]
    return "\n".join(lines + _whole_adapters_markdown(record["rows"]) + _uniform_quota_markdown(record["rows"]))


def _paired_cells(versus):
    """The difference with its interval, the p-value and the verdict of a paired comparison."""
    return [interval_text(versus["difference"]), f"{versus['p_value']:.4f}", versus["verdict"]]


def _whole_adapters_markdown(rows):
    """The rank-wise against adapter-level section: each SmartFed form paired against adapter
    mixture, beside the bytes each sent; nothing when no run of both kept per-item results."""
    mixture = {(row["task"], row["metric"]): row for row in rows if row["method"] == WHOLE_ADAPTERS}
    compared = [row for row in rows if "versus_whole_adapters" in row]
    if not compared:
        return []
    table = [[row["task"], row["method"], row["metric"], len(row["versus_whole_adapters"]["seeds"]),
              _megabytes(row["bytes_up_down"]), _megabytes(mixture[row["task"], row["metric"]]["bytes_up_down"]),
              *_paired_cells(row["versus_whole_adapters"])] for row in compared]
    return ["", "## Rank-wise experts against whole adapters", "",
            "Each SmartFed form against adapter-level mixture (a learned gate over the same pool's whole adapters), "
            "paired on the seeds both ran: the comparison that tests rank-wise experts. MB: bytes up + down over "
            "a whole run, mean over seeds; a difference at fewer bytes is the stronger claim.", "",
            _table(["task", "SmartFed form", "metric", "seeds", "MB", "adapter mixture MB", "difference [95% CI]",
                    "p", "verdict"], table)]


def _uniform_quota_markdown(rows):
    """The EEQA section: each SmartFed form with EEQA paired against its uniform-quota entry;
    nothing when no such pair kept per-item results."""
    compared = [row for row in rows if "versus_uniform_quota" in row]
    if not compared:
        return []
    table = [[row["task"], row["method"], row["versus_uniform_quota"]["reference"], row["metric"],
              len(row["versus_uniform_quota"]["seeds"]), *_paired_cells(row["versus_uniform_quota"])]
             for row in compared]
    return ["", "## EEQA against a uniform quota", "",
            "Each SmartFed form with EEQA against the same form with EEQA off, every matrix keeping the same "
            "top-k (the same total budget), each at the rate chosen for it, paired on the seeds both ran.", "",
            _table(["task", "SmartFed form (EEQA)", "uniform quota", "metric", "seeds", "difference [95% CI]", "p",
                    "verdict"], table)]


def _edge_cell(selection):
    notes = []
    if selection.edge:
        notes.append(f"**edge** ({selection.edge}): extend with {selection.extend_with!r}")
    if not selection.enough_seeds:
        notes.append(f"chosen on {len(selection.selection_seeds)} seed(s)")
    return "; ".join(notes) or "interior"


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
    judged = [check["at_third"] for check in pairs if check["at_third"] is not None]
    if judged:
        lines[0] += (f" At a third of FedIT's rounds its accuracy is above FedIT's final beyond noise in "
                     f"{judged.count(ABOVE)} of {len(judged)} pairs, below it in {judged.count(BELOW)}, and "
                     f"within noise (the interval holds zero) in {judged.count(NO_CONCLUSION)}.")
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


def write_report(run_paths, output_dir, *, baselines=None):
    """Write report.md, summary.json and the plots into ``output_dir`` (and, for runs of lr_grid
    entries, selection.json, selection.md and the chosen rates' validation plot); returns the
    report path. ``baselines``: a file of base model and majority class accuracies per task
    (see :func:`attach_baselines`) for runs that did not record them."""
    from smartfed.experiments.report_plots import (
        plot_accuracy, plot_expert_usage, plot_final_expert_usage, plot_quotas, plot_tradeoff, plot_validation,
    )
    from smartfed.experiments.selection import (
        SELECTION_FILE,
        SELECTION_TABLE,
        VALIDATION_PLOT,
        choose_configuration,
        select_by_validation,
        selection_record,
    )

    runs = separate_configurations(find_runs(run_paths))
    if baselines is not None:
        runs = attach_baselines(runs, baselines)
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
    usages = [(run, json.loads((run.path / EXPERT_USAGE_FILE).read_text())) for run in runs
              if (run.path / EXPERT_USAGE_FILE).is_file()]
    if usages:
        plots.append(USAGE_PLOT)
        plot_final_expert_usage(usages, output / USAGE_PLOT)
    for run in runs:
        # A file task's name holds a "/" (its folder and file): not in a file name.
        label = f"{run.task}_{run.method}_seed{run.seed}_{run.path.name}".replace("/", "-")
        if any(r.get("quotas") for r in run.completed):
            plots.append(f"quotas_{label}.png")
            plot_quotas(run, output / plots[-1])
        if any(r.get("expert_usage") for r in run.completed):
            plots.append(f"expert_usage_{label}.png")
            plot_expert_usage(run, output / plots[-1])
    statistics = run_statistics(runs)
    (output / STATISTICS_FILE).write_text(json.dumps(statistics, indent=1))
    report = output / "report.md"
    report.write_text(markdown_report(runs, plots, selections, configurations, statistics))
    checks = target_checks(runs)
    summary = {
        "runs": [{"path": str(r.path), "task": r.task, "method": r.method, "chosen_lr": r.chosen_lr, "seed": r.seed,
                  "rounds": r.rounds, "accuracy": r.accuracy, "cumulative_bytes": r.cumulative_bytes,
                  **({"baselines": r.baselines} if r.baselines else {}),
                  **({"instruction_scores": scores} if (scores := instruction_scores(r)) else {})}
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
    parser.add_argument("--baselines", default=None, metavar="FILE",
                        help="base model and majority class accuracy per task for runs that did not record them "
                             "(e.g. benchmarks/results/experiment_zero_shot.json)")


def run(args) -> int:
    from smartfed.config import ConfigError

    if args.baselines is not None and not Path(args.baselines).is_file():
        raise ConfigError("no such file", key="--baselines", source=args.baselines)
    output = Path(args.output).resolve()
    report = write_report(args.runs, output, baselines=args.baselines)
    plots = len(list(output.glob("*.png")))
    print(f"smartfed report: wrote {report}, {output / 'summary.json'} and {plots} plots into {output}")
    return 0

