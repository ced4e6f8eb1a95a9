"""``smartfed sweep``: federated runs of text tasks (smartfed.tasks), one or a whole grid of them.

A run config names its text task in ``task.name`` / ``task.options``; this driver writes the
task's splits, client label counts and the base model's and majority class's accuracy
(smartfed.experiments.task_baselines) beside the run's metrics (``text_task.json``) and makes
the default SmolLM2 folder on first use. A config with a top-level ``sweep`` section
(configs/paper_small.yaml, schema ``smartfed.config.SweepConfig``) runs every (seed, task,
method) of it, one run folder each (``DIR/<task>/<method>/seed<k>``), seeds outermost so that a
sweep cut short holds whole seeds; a method with an ``lr_grid`` runs once per rate, in folders
``<method>@lr=<rate>`` (smartfed.experiments.selection chooses among them on validation). Every
run is validated, and every run folder checked, before the first run starts; finished runs are
skipped, interrupted ones continue from their checkpoint.
"""

import sys
from pathlib import Path

from smartfed.experiments.train import (
    add_run_arguments,
    check_inputs,
    check_output,
    completed_round,
    prepare_model,
    set_threads,
)


def configure_parser(parser):
    add_run_arguments(parser, config_help="YAML sweep config (configs/paper_small.yaml) or run config of a text task",
                      output_help="root of the run folders (the run folder for a run config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run only these seeds of sweep.seeds")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="run only these entries of sweep.tasks")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="run only these entries of sweep.methods (an lr_grid entry: all its rates, or "
                             "one rate named <method>@lr=<rate>)")
    parser.add_argument("--no-items", action="store_true",
                        help="skip the per-item evaluation after each run (evaluation_items.json, which the "
                             "intervals of smartfed report need)")
    parser.add_argument("--extend-grids", default=None, metavar="SELECTION_JSON",
                        help="add to each entry's lr_grid on each task the rates smartfed report saw run there "
                             "(its selection.json) and the rate it named beyond a choice at a grid edge")


def run_text_experiment(config, output_dir, *, progress=True, device="cpu", resume=False, resume_changes=None,
                        resumed_round=None):
    """Run the federated experiment of ``config`` (a RunConfig or its mapping; a text task) into
    ``output_dir`` and record the task's splits and client label counts beside its metrics; with
    ``resume``, continue the run there (``resume_changes``: what check_resume allowed to change)."""
    from smartfed.config import RunConfig, config_from_dict
    from smartfed.experiments.runs import open_run
    from smartfed.experiments.task_baselines import task_baselines
    from smartfed.federated.run_dir import TEXT_TASK_FILE, RunDir

    if not isinstance(config, RunConfig):
        config = config_from_dict(config)
    _require_text_task(config)
    check_inputs(config)
    prepare_model(config)
    run = open_run(config, output_dir, resume=resume, progress=progress, device=device)
    run_dir = RunDir(output_dir)
    run_dir.record_resume(config, resume_changes or {}, at_round=resumed_round)
    task = run.layout
    if getattr(config.task, "data", None) is not None:
        summary = file_task_summary(config, task, run.data)
    else:
        summary = {
            **task.summary(), "options": config.task.options, "description": task.description,
            "client_sizes": [len(part) for part in run.data.partitions],
            "client_label_counts": [
                [int((examples.labels == label).sum()) for label in range(task.num_labels)]
                for examples in run.data.clients
            ],
            "baselines": task_baselines(config, task, run.data.evaluation),
        }
    run_dir.write_json(TEXT_TASK_FILE, summary)
    run.start_in_process()
    return run


def file_task_summary(config, task, data):
    """``text_task.json`` of a file task (``task.data``): its summary, the clients' sizes and the
    base model's per-item mean on the test examples (smartfed.experiments.item_scores)."""
    from smartfed.experiments.item_scores import base_model_means

    return {**task.summary(), "data": config.task.data.model_dump(), "client_sizes": [len(part) for part in
                                                                                      data.partitions],
            "baselines": base_model_means(config, task, data.evaluation)}


def _merged(base, override):
    merged = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def sweep_runs(data, *, source=None, extra_rates=None):
    """(relative run folder, run config mapping) for every (seed, task, method) of a sweep config:
    ``base`` (a run config), ``sweep.seeds``, ``sweep.tasks`` and ``sweep.methods`` (name -> the
    config values that differ from ``base``). A method entry may hold ``per_task`` (task name ->
    values for that task only, e.g. another pool) and may name a ``method`` of its own, which
    makes it an ablation of that method: its runs get the entry's name as their ``label``. An
    entry with ``lr_grid`` becomes one run per rate, named (folder and ``label``)
    ``<entry>@lr=<rate>`` (smartfed.experiments.selection.point_name), setting ``federation.lr``;
    ``extra_rates`` ({(task, entry): [rate, ...]}, from ``--extend-grids``) adds rates to an
    entry's grid on one task only."""
    from smartfed.config import validate
    from smartfed.experiments.sweep_schema import SweepConfig
    from smartfed.experiments.selection import point_name

    sweep = validate(SweepConfig, data, source=source)
    grid = sweep.sweep
    extra_rates = extra_rates or {}
    unknown = sorted({task for task, _ in extra_rates} - set(grid.tasks))
    if unknown:
        from smartfed.config import ConfigError

        raise ConfigError(f"names task(s) {unknown} that this sweep does not have; it has {sorted(grid.tasks)}",
                          key="--extend-grids", source=source)

    def methods(task):
        """(family, run name, the entry's values for that run, per_task) of every run of ``task``."""
        found = []
        for family, entry in grid.methods.items():
            entry = dict(entry or {})
            per_task = entry.pop("per_task", None) or {}
            rates = entry.pop("lr_grid", None)
            if rates is None:
                found.append((family, family, entry, per_task))
                continue
            rates = list(rates) + [lr for lr in extra_rates.get((task, family), ()) if lr not in rates]
            found += [(family, point_name(family, lr), _merged(entry, {"federation": {"lr": lr}}), per_task)
                      for lr in rates]
        return found

    runs = []
    for seed in grid.seeds:
        for task, task_override in grid.tasks.items():
            for family, name, method_override, per_task in methods(task):
                config = _merged(_merged(sweep.base, task_override), method_override)
                config = _merged(config, per_task.get(task))
                config = {**config, "seed": seed, "method": config.get("method", family)}
                if config["method"] != name:
                    config["label"] = name
                runs.append((Path(task) / name / f"seed{seed}", config))
    return runs


def _method_names(name):
    """The names ``--methods`` selects the run ``name`` by: itself, and its lr_grid entry's name."""
    from smartfed.experiments.selection import grid_point

    point = grid_point(name)
    return {name} if point is None else {name, point[0]}


def _selected(runs, *, seeds, tasks, methods):
    from smartfed.config import ConfigError

    available = {"--seeds": {int(r.parts[2][len("seed"):]) for r, _ in runs},
                 "--tasks": {r.parts[0] for r, _ in runs},
                 "--methods": {name for r, _ in runs for name in _method_names(r.parts[1])}}
    for option, wanted in (("--seeds", seeds), ("--tasks", tasks), ("--methods", methods)):
        unknown = sorted(set(wanted or ()) - available[option], key=str)
        if unknown:
            raise ConfigError(f"{unknown} not in this sweep; it has {sorted(available[option], key=str)}", key=option)
    return [(relative, config) for relative, config in runs
            if (seeds is None or int(relative.parts[2][len("seed"):]) in seeds)
            and (tasks is None or relative.parts[0] in tasks)
            and (methods is None or _method_names(relative.parts[1]) & set(methods))]


def _check_grid_overrides(runs, overrides):
    """Refuse a ``--set`` of federation.lr over lr_grid runs: it would give every rate the same one."""
    from smartfed.config import ConfigError, override_key
    from smartfed.experiments.selection import grid_point

    grid_runs = [relative for relative, _ in runs if grid_point(relative.parts[1]) is not None]
    for assignment in overrides or ():
        key = override_key(assignment)
        if grid_runs and key in ("federation", "federation.lr"):
            raise ConfigError(f"would set the learning rate of every lr_grid run (e.g. {grid_runs[0]}); "
                              f"change the sweep's lr_grid instead", key=key, source=f"--set {assignment}")


def _require_text_task(config):
    from smartfed.config import SYNTHETIC_TASK, ConfigError

    if config.task.name == SYNTHETIC_TASK and getattr(config.task, "data", None) is None:
        raise ConfigError("must name a text task of smartfed.tasks (e.g. bbc_news), or task.data a task from "
                          "files, for smartfed sweep; smartfed train runs the synthetic task", key="task.name")


def _sweep_task(entry):
    """The sweep's name for the task of a ``selection.json`` entry: the folder its candidate runs
    sit in (a sweep lays runs out as <task>/<entry>/seed<n>), which for a task from files differs
    from the name the report gives it (the train file's folder and stem); the report's name when
    no run path is recorded."""
    folders = {Path(path).parts[-3] for candidate in entry.get("candidates") or ()
               for path in candidate.get("paths") or () if len(Path(path).parts) >= 3}
    return folders.pop() if len(folders) == 1 else entry["task"]


def grid_extensions(path):
    """{(sweep task, entry): [rate, ...]} from a report's ``selection.json``: the rates its runs
    ran (so a rate an earlier extension added stays runnable, e.g. its choice on a further seed)
    and, for a choice at a grid edge, the rate beyond it; a ConfigError for a file that is not one."""
    import json

    from smartfed.config import ConfigError

    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        extensions = {}
        for entry in record["selections"]:
            rates = sorted({float(candidate["lr"]) for candidate in entry.get("candidates") or ()})
            if entry.get("extend_with") is not None:
                rates.append(float(entry["extend_with"]))
            if rates:
                extensions[(_sweep_task(entry), entry["method"])] = rates
        return extensions
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"is not a selection.json of smartfed report ({type(error).__name__}: {error})",
                          key="--extend-grids", source=str(path)) from None


def plan_runs(data, output_root, *, overrides=(), seeds=None, tasks=None, methods=None, source=None,
              extra_rates=None):
    """[(relative folder, RunConfig, round checkpointed or None, resumable changes)] of every
    selected run, each validated (with ``overrides``) and its folder checked against it (a folder
    holding a run of another config is an error, whether that run finished or not); nothing is
    built or written."""
    from smartfed.config import ConfigError, config_from_dict

    if "sweep" in data:
        runs = _selected(sweep_runs(data, source=source, extra_rates=extra_rates), seeds=seeds, tasks=tasks,
                         methods=methods)
        _check_grid_overrides(runs, overrides)
    else:
        for option, value in (("--seeds", seeds), ("--tasks", tasks), ("--methods", methods),
                              ("--extend-grids", extra_rates)):
            if value is not None:
                raise ConfigError(f"needs a config with a sweep section; {source} is one run config", key=option)
        runs = [(Path("."), data)]
    plan = []
    for relative, values in runs:
        where = source if str(relative) == "." else f"{source}: run {relative}"
        try:
            config = config_from_dict(values, overrides, source=where)
            _require_text_task(config)
            check_inputs(config)
        except ConfigError as error:
            raise error.located(source=where) from None
        folder = Path(output_root) / relative
        done = completed_round(folder)
        # A fresh run may not start in a folder holding a user's files or another config's run.
        changes = check_output(folder, config, resume=done is not None)
        plan.append((relative, config, done, changes))
    return plan


def run(args) -> int:
    from smartfed.config import read_yaml
    from smartfed.federated.run_dir import EVALUATION_ITEMS_FILE, RunDir
    from smartfed.federated.strategy import RoundFailed

    data = read_yaml(args.config)
    output_root = Path(args.output).resolve()
    extra_rates = None if args.extend_grids is None else grid_extensions(args.extend_grids)
    plan = plan_runs(data, output_root, overrides=args.overrides, seeds=args.seeds, tasks=args.tasks,
                     methods=args.methods, source=args.config, extra_rates=extra_rates)
    set_threads(args.threads)
    progress = not args.no_progress
    for relative, config, done, changes in plan:
        folder = output_root / relative
        if done == config.federation.rounds:
            RunDir(folder).record_resume(config, changes, at_round=done)
            print(f"== {folder}: finished", flush=True)
            if not args.no_items and not (folder / EVALUATION_ITEMS_FILE).is_file():
                record_items(folder, device=args.device, progress=progress)
            continue
        print(f"== {folder}{'' if done is None else f' (continued after round {done})'}", flush=True)
        try:
            outcome = run_text_experiment(config, folder, progress=progress, device=args.device,
                                          resume=done is not None, resume_changes=changes, resumed_round=done)
        except RoundFailed as error:
            print(f"smartfed sweep: {folder}: {' '.join(str(error).split())}", file=sys.stderr)
            return 3
        last = outcome.history[-1]
        print(f"{config.label or config.method}: round {last['round']} accuracy {last['accuracy']:.4f} "
              f"loss {last['loss']:.4f} bytes up {last['total_bytes_up']} down {last['total_bytes_down']}", flush=True)
        if not args.no_items:
            record_items(folder, device=args.device, progress=progress)
    return 0


def record_items(folder, *, device, progress):
    """Re-score the finished run in ``folder`` with ``smartfed evaluate`` (its ``evaluation.json``
    and per-item ``evaluation_items.json``) and say when the re-score differs from the run's record."""
    from smartfed.experiments.evaluate import evaluate_run, write_evaluation
    from smartfed.federated.run_dir import RunDir

    record = evaluate_run(folder, device=device, progress=progress)
    write_evaluation(folder, record)
    recorded = [r for r in RunDir(folder).read_metrics() if r.get("status", "completed") == "completed"][-1]["accuracy"]
    if record["accuracy"] != recorded:
        print(f"smartfed sweep: {folder}: warning: re-scored accuracy {record['accuracy']!r} differs from the "
              f"recorded {recorded!r}", file=sys.stderr)
    return record
