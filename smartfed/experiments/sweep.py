"""Runs the federated harness (smartfed.federated) on a text task of smartfed.tasks, and sweeps.

A run config names its text task in ``task.name`` / ``task.options``, which the harness reads
itself (``smartfed train`` runs such a config too); this runner also materializes the default
SmolLM2 folder on first use and writes the task's splits beside the metrics:

    python -m smartfed.experiments.sweep --config configs/demo.yaml --output DIR

A config with a top-level ``sweep`` section (configs/paper_small.yaml) runs every
(seed, task, method) of it, one run folder each (``DIR/<task>/<method>/seed<k>``), seeds
outermost so that a sweep cut short holds whole seeds; finished runs are skipped.
"""

import argparse
import json
import sys
from pathlib import Path

TASK_FILE = "text_task.json"


def prepare_model_dir(model_config):
    """Materialize the default SmolLM2 folder when the config points at it and it is missing."""
    from smartfed.tasks.models import DEFAULT_MODEL_DIR, materialize_gguf

    if model_config.pretrained and Path(model_config.pretrained) == DEFAULT_MODEL_DIR \
            and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        materialize_gguf()


def run_text_experiment(data, output_dir, *, progress=True, device="cpu"):
    """Run the federated experiment of the config dict ``data`` (a text task) into ``output_dir``
    and record the task's splits and client label counts beside its metrics."""
    from smartfed.federated.config import config_from_dict
    from smartfed.federated.simulation import Simulation
    from smartfed.federated.task import ClientTrainer

    config = config_from_dict(data)
    if config.task.name == "synthetic":
        raise ValueError("task.name must name a smartfed.tasks text task (e.g. bbc_news) for this runner")
    prepare_model_dir(config.model)
    trainer = ClientTrainer(config, device=device, progress=progress)
    simulation = Simulation(config, output_dir, progress=progress, trainer=trainer)
    task = trainer.layout
    summary = {
        **task.summary(), "options": config.task.options, "description": task.description,
        "client_sizes": [len(part) for part in simulation.data.partitions],
        "client_label_counts": [
            [int((examples.labels == label).sum()) for label in range(task.num_labels)]
            for examples in simulation.data.clients
        ],
    }
    (Path(output_dir) / TASK_FILE).write_text(json.dumps(summary, indent=1))
    return simulation.run()


SWEEP_KEYS = {"seeds", "tasks", "methods"}


def _merged(base, override):
    merged = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def sweep_runs(data):
    """(relative run folder, run config dict) for every (seed, task, method) of a sweep config:
    ``base`` (a run config), ``sweep.seeds``, ``sweep.tasks`` and ``sweep.methods`` (name -> the
    config values that differ from ``base``). A method entry may hold ``per_task`` (task name ->
    values for that task only, e.g. another pool) and may name a ``method`` of its own, which
    makes it an ablation of that method: its runs get the entry's name as their ``label``."""
    sweep, base = data.get("sweep"), data.get("base") or {}
    if not isinstance(sweep, dict) or set(sweep) != SWEEP_KEYS:
        raise ValueError(f"sweep must be a mapping with exactly the keys {sorted(SWEEP_KEYS)}, got {sweep!r}")
    unknown = sorted(set(data) - {"sweep", "base"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown} in a sweep config; expected 'sweep' and 'base'")
    methods = {}
    for method, method_override in sweep["methods"].items():
        method_override = dict(method_override or {})
        per_task = method_override.pop("per_task", None) or {}
        unknown_tasks = sorted(set(per_task) - set(sweep["tasks"]))
        if unknown_tasks:
            raise ValueError(f"sweep.methods.{method}.per_task names task(s) {unknown_tasks} that sweep.tasks lacks")
        methods[method] = method_override, per_task
    runs = []
    for seed in sweep["seeds"]:
        for task, task_override in sweep["tasks"].items():
            for method, (method_override, per_task) in methods.items():
                config = _merged(_merged(base, task_override), method_override)
                config = _merged(config, per_task.get(task))
                config = {**config, "seed": seed, "method": config.get("method", method)}
                if config["method"] != method:
                    config["label"] = method
                runs.append((Path(task) / method / f"seed{seed}", config))
    return runs


def run_sweep(data, output_root, *, progress=True, seeds=None, tasks=None, methods=None):
    """Run every run of the sweep config ``data`` not yet finished under ``output_root``
    (only ``seeds`` / ``tasks`` / ``methods`` when given)."""
    import shutil

    for relative, config in sweep_runs(data):
        task, method, seed = relative.parts
        if ((seeds is not None and int(seed[len("seed"):]) not in seeds) or (tasks is not None and task not in tasks)
                or (methods is not None and method not in methods)):
            continue
        folder = Path(output_root) / relative
        rounds = (config.get("federation") or {}).get("rounds")
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            done = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if done and done[-1].get("round") == rounds and done[-1].get("status") == "completed":
                continue
            shutil.rmtree(folder)
        print(f"== {relative}", flush=True)
        run_text_experiment(config, folder, progress=progress)


def main(argv=None) -> int:
    import torch
    import yaml

    parser = argparse.ArgumentParser(prog="python -m smartfed.experiments.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config with task.name / task.options")
    parser.add_argument("--output", required=True, help="run directory (metrics.jsonl, checkpoint/, text_task.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method=fedit --set seed=1 --set federation.rounds=4")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="sweep: run only these seeds")
    parser.add_argument("--tasks", nargs="+", default=None, help="sweep: run only these tasks of sweep.tasks")
    parser.add_argument("--methods", nargs="+", default=None, help="sweep: run only these entries of sweep.methods")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with open(args.config, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    try:
        for assignment in args.set:
            key, separator, value = assignment.partition("=")
            if not separator:
                raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
            node = data
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = yaml.safe_load(value)
        if "sweep" in data:
            run_sweep(data, args.output, progress=not args.no_progress, seeds=args.seeds, tasks=args.tasks,
                      methods=args.methods)
            return 0
        outcome = run_text_experiment(data, args.output, progress=not args.no_progress)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"smartfed sweep: {error}", file=sys.stderr)
        return 2
    last = outcome.history[-1]
    print(f"{last['method']}: round {last['round']} accuracy {last['accuracy']:.4f} loss {last['loss']:.4f} "
          f"bytes up {last['total_bytes_up']} down {last['total_bytes_down']} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
