"""The runs ``smartfed report`` reads: each run folder's ``metrics.jsonl`` with the
``config.json`` and ``text_task.json`` beside it, keyed by configuration (``config_identity``:
the config's non-default values minus the seed and what does not change a run's numbers), with
the baselines it recorded or a baselines file gives."""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from smartfed.experiments.selection import ReportError
from smartfed.federated.run_dir import CONFIG_FILE, EXPERT_USAGE_FILE, METRICS_FILE, TEXT_TASK_FILE
# What may differ between the seeds of one reported method: the seed itself, and what does not
# change a run's numbers (its label, where the pool is cached, the retry and timeout policy).
REPORT_IGNORED = ("seed", "label", "pool.cache_dir", "federation.max_retries", "federation.client_timeout_s")


@dataclass
class Run:
    path: Path
    task: str
    method: str  # method label: the method, with the router form for SmartFed
    seed: int
    base_method: str = ""  # the method the run trained (config "method"): smartfed for every router form
    # Every completed round, in order: also those federation.test_every_rounds did not score on
    # the test split (their time, client compute and validation scores count).
    completed: list = field(default_factory=list)
    local_steps: int = 1  # optimizer steps per client and round, to turn client compute into step time
    chosen_lr: Optional[float] = None  # a run of an lr_grid entry: its rate, chosen on validation
    identity: dict = field(default_factory=dict)  # its config's non-default values minus REPORT_IGNORED
    baselines: Optional[dict] = None  # base_accuracy, majority_accuracy on the evaluation split
    test_items: Optional[int] = None  # examples in the evaluation split, when text_task.json says
    task_options: dict = field(default_factory=dict)

    @property
    def rounds(self):
        return [r["round"] for r in self.records]

    @property
    def accuracy(self):
        return [r["accuracy"] for r in self.records]

    @property
    def records(self):
        """The completed rounds with a test score."""
        return with_test_scores(self.completed)

    @property
    def validation_records(self):
        """The completed rounds scored on the validation split."""
        return [r for r in self.completed if r.get("val_accuracy") is not None]

    @property
    def wall_seconds(self):
        return sum(r.get("wall_s", 0.0) for r in self.completed)

    @property
    def cumulative_bytes(self):
        return [r["total_bytes_up"] + r["total_bytes_down"] for r in self.records]

    @property
    def client_step_seconds(self):
        """Seconds per local step of every (round, client), or [] when not recorded."""
        return [seconds / self.local_steps for r in self.completed
                for seconds in (r.get("client_compute_s") or {}).values()]


def with_test_scores(records):
    """``records`` with a test score: a round the clients scored when none of them could, or one
    the test split skipped (federation.test_every_rounds), has no accuracy to report."""
    return [r for r in records if r.get("accuracy", 0) is not None]


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
    completed = []
    for number, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{metrics_path}:{number} is not JSON ({error})") from error
        if record.get("status", "completed") == "completed":
            completed.append(record)
    records = with_test_scores(completed)
    if not records:
        raise ReportError(f"{metrics_path} holds no completed round")
    for key in ("round", "accuracy", "total_bytes_up", "total_bytes_down"):
        if key not in records[0]:
            raise ReportError(f"{metrics_path}: records lack {key!r}; is this a smartfed train metrics file?")
    completed.sort(key=lambda r: r["round"])
    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    task_file = folder / TEXT_TASK_FILE
    summary = json.loads(task_file.read_text()) if task_file.is_file() else {}
    task = summary.get("name") or _task_name(config.get("task") or {})
    method = method_label(config) if config else records[0].get("method", "unknown")
    local_steps = int((config.get("federation") or {}).get("local_steps", 1))
    return Run(path=folder, task=task, method=method, seed=int(config.get("seed", 0)), completed=completed,
               local_steps=local_steps, base_method=config.get("method", records[0].get("method", "unknown")),
               identity=config_identity(config), baselines=summary.get("baselines"),
               test_items=summary.get("eval_examples"),
               task_options=summary.get("options", (config.get("task") or {}).get("options") or {}))


def _task_name(task) -> str:
    data = task.get("data")
    if isinstance(data, dict):
        from smartfed.tasks.file_task import task_name

        return task_name(data.get("shape"), data.get("train"), data.get("eval"))
    return task.get("name", "synthetic")


def config_identity(config) -> dict:
    """{dotted key: value} of the run config mapping ``config`` that differ from the defaults,
    minus ``REPORT_IGNORED``: equal for the seeds of one configuration."""
    from smartfed.config import RunConfig, non_default_values

    try:
        return non_default_values(RunConfig.model_validate(config), ignore=REPORT_IGNORED)
    except ValueError:  # a config of an older schema: compared as recorded
        return {key: value for key, value in config.items() if key not in REPORT_IGNORED}


def separate_configurations(runs):
    """``runs`` with the method of every run renamed where one task and method holds runs of
    different configurations: ``method [key=value, ...]`` with the values that set it apart."""
    groups = {}
    for run in runs:
        groups.setdefault((run.task, run.method), []).append(run)
    renamed = {}
    for members in groups.values():
        identities = {json.dumps(run.identity, sort_keys=True) for run in members}
        if len(identities) < 2:
            continue
        keys = sorted(set().union(*(run.identity for run in members)))
        differing = [key for key in keys if len({json.dumps(run.identity.get(key)) for run in members}) > 1]
        for run in members:
            values = ", ".join(f"{key}={json.dumps(run.identity.get(key, _default(key)))}" for key in differing)
            renamed[id(run)] = f"{run.method} [{values}]"
    return [replace(run, method=renamed[id(run)]) if id(run) in renamed else run for run in runs]


def _default(dotted):
    """The default of a run config key (what a config that leaves it out holds)."""
    from smartfed.config import RunConfig, config_to_dict

    value = config_to_dict(RunConfig())
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def attach_baselines(runs, baselines_file):
    """Runs without recorded baselines take them from ``baselines_file`` (keys ``"<task> <options
    as JSON>"``, values with ``accuracy`` and ``majority_class_share``), when it has their task."""
    table = json.loads(Path(baselines_file).read_text(encoding="utf-8"))
    attached = []
    for run in runs:
        entry = table.get(f"{run.task} {json.dumps(run.task_options)}")
        if run.baselines is None and isinstance(entry, dict):
            run = replace(run, baselines={"base_accuracy": entry.get("accuracy"),
                                          "majority_accuracy": entry.get("majority_class_share")})
        attached.append(run)
    return attached


def find_runs(paths):
    """Every run under ``paths`` (folders holding metrics.jsonl, searched recursively)."""
    runs = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ReportError(f"run folder {path} does not exist")
        found = [path / METRICS_FILE] if (path / METRICS_FILE).is_file() else sorted(path.rglob(METRICS_FILE))
        if not found:
            raise ReportError(f"no {METRICS_FILE} under {path}")
        runs.extend(load_run(metrics) for metrics in found)
    return runs
