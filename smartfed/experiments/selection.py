"""Choosing each method's learning rate on the validation split (docs/experiment.md, "Protocol:
choosing settings on validation").

A ``sweep.methods`` entry with ``lr_grid`` runs once per rate, each run named
``<entry>@lr=<rate>`` (:func:`point_name`). For every (task, entry) with such runs,
:func:`select_by_validation` scores each run by its validation accuracy averaged over its last
``LAST_ROUNDS`` evaluated rounds, averages that over the selection seeds (those every rate of the
entry ran), and chooses the rate with the highest mean (ties: the lower rate). The chosen rate may
have run more seeds: a sweep can run the whole grid on one seed and only the chosen rate on the
others. :func:`choose_configuration` then picks, among the entries of one method (SmartFed's
router forms), the one whose chosen rate scores highest on validation. Only ``val_accuracy`` is
read here: the test accuracy of a rate that is not chosen plays no part, and ``smartfed report``
shows test numbers of the chosen rate only.

A chosen rate at the edge of its grid (the lowest or the highest rate tried) may not be the best
one: :func:`grid_edge` flags it, :func:`extended_rate` names the next rate beyond it (one grid
step further, rounded to one significant digit), and ``smartfed sweep --extend-grids
selection.json`` runs that rate for exactly those (task, entry) pairs (and keeps every rate the
report saw run on its grid), so the grid grows until its choice is interior. A choice made on
fewer than ``MIN_SELECTION_SEEDS`` seeds is flagged too.
"""

import math
import statistics
from dataclasses import dataclass

from smartfed.errors import SmartFedError

LAST_ROUNDS = 3
MIN_SELECTION_SEEDS = 2
SELECTION_FILE = "selection.json"
SELECTION_TABLE = "selection.md"
VALIDATION_PLOT = "validation_accuracy_chosen.png"
RULE = (f"per task and method, the learning rate whose validation accuracy, averaged over each run's last "
        f"{LAST_ROUNDS} evaluated rounds and then over the seeds every rate of the method ran, is highest; ties "
        f"go to the lower rate; the test split is read only for the chosen rate, on every seed it ran")
CONFIGURATION_RULE = ("per task and method, among its sweep entries (e.g. SmartFed's router forms), the entry whose "
                      "chosen rate has the highest validation score on the seeds every entry's rates ran; ties go to "
                      "the entry named first in alphabetical order")


class ReportError(SmartFedError, ValueError):
    """Runs that cannot be reported or chosen among as given (a missing folder, a metrics file
    that is not one, runs that cannot be compared)."""


def point_name(family, lr) -> str:
    """The run name of rate ``lr`` of the ``lr_grid`` entry ``family``: the rate as Python's
    shortest text that reads back as the same float (0.003, 0.01, 1e-05, 1.0), so that two rates
    never share a name and 3e-3 and 0.003 get the same one."""
    from smartfed.experiments.sweep_schema import LR_GRID_MARK  # pydantic stays out of `smartfed --help`

    return f"{family}{LR_GRID_MARK}{float(lr)!r}"


def grid_point(name):
    """(entry, rate) of a run named by :func:`point_name`, or None for any other run."""
    from smartfed.experiments.sweep_schema import LR_GRID_MARK

    family, mark, rate = name.partition(LR_GRID_MARK)
    return (family, float(rate)) if mark else None


def mean_std(values):
    """(mean, sample standard deviation; 0 for one value) of ``values``."""
    values = list(values)
    return math.fsum(values) / len(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Candidate:
    lr: float
    runs: list  # the rate's runs (smartfed.experiments.report.Run), in seed order
    selection_seeds: tuple  # the seeds every rate of the entry ran: the only ones scored

    @property
    def scored_runs(self):
        return [run for run in self.runs if run.seed in self.selection_seeds]

    @property
    def scores(self):
        """Validation score of each run on a selection seed, in seed order."""
        return [validation_score(run) for run in self.scored_runs]

    @property
    def mean(self):
        return mean_std(self.scores)[0]

    @property
    def std(self):
        return mean_std(self.scores)[1]

    def score_on(self, seeds):
        return mean_std(validation_score(run) for run in self.runs if run.seed in seeds)[0]


@dataclass
class Selection:
    task: str
    family: str  # the sweep.methods entry
    method: str  # the method its runs train (smartfed for every router form)
    candidates: list  # one Candidate per rate, ascending
    chosen: Candidate

    @property
    def selection_seeds(self):
        return self.chosen.selection_seeds

    @property
    def edge(self):
        return grid_edge([candidate.lr for candidate in self.candidates], self.chosen.lr)

    @property
    def extend_with(self):
        return extended_rate([candidate.lr for candidate in self.candidates], self.chosen.lr)

    @property
    def enough_seeds(self):
        return len(self.selection_seeds) >= MIN_SELECTION_SEEDS


def grid_edge(rates, chosen):
    """"lowest" or "highest" when ``chosen`` is that end of the grid ``rates`` (a grid of one rate
    is both: "only"), None when it is interior."""
    rates = sorted(rates)
    if len(rates) == 1:
        return "only"
    if chosen == rates[0]:
        return "lowest"
    if chosen == rates[-1]:
        return "highest"
    return None


def extended_rate(rates, chosen):
    """The rate one grid step beyond ``chosen`` at an edge of ``rates`` (the step is the ratio to
    its neighbour; x10 for a grid of one rate), rounded to one significant digit; None when the
    choice is interior."""
    edge = grid_edge(rates, chosen)
    if edge is None:
        return None
    rates = sorted(rates)
    if edge == "only":
        ratio, direction = 10.0, 1
    elif edge == "lowest":
        ratio, direction = rates[1] / rates[0], -1
    else:
        ratio, direction = rates[-1] / rates[-2], 1
    rate = chosen * ratio ** direction
    rounded = float(f"{rate:.0e}")
    # Rounding must not land back on a rate of the grid (or on the wrong side of it).
    beyond = rounded < rates[0] if direction < 0 else rounded > rates[-1]
    return rounded if beyond else rate


@dataclass
class Configuration:
    """The entry chosen among a method's lr_grid entries on one task (:func:`choose_configuration`)."""

    task: str
    method: str
    seeds: tuple  # the seeds the entries were compared on
    scores: dict  # entry -> validation score of its chosen rate on ``seeds``
    chosen: Selection


def validation_score(run):
    """Mean ``val_accuracy`` over the last LAST_ROUNDS rounds of ``run`` that were scored on validation."""
    scores = [record["val_accuracy"] for record in run.validation_records]
    if not scores:
        raise ReportError(f"{run.path} has no val_accuracy in its metrics: choosing a learning rate on validation "
                         f"needs a sweep run with task.validation_fraction > 0")
    last = scores[-LAST_ROUNDS:]
    return math.fsum(last) / len(last)


def _selection_seeds(task, family, by_rate):
    """The seeds every rate of ``family`` ran, refusing a seed run twice, none in common, or runs
    that stopped at different rounds: their scores would average different things."""
    seeds = {lr: [run.seed for run in members] for lr, members in by_rate.items()}
    for lr, listed in seeds.items():
        if len(set(listed)) < len(listed):
            raise ReportError(f"{task}: {point_name(family, lr)} has seeds {sorted(listed)}, one of them twice; "
                             f"report each sweep folder on its own")
    common = set.intersection(*(set(listed) for listed in seeds.values()))
    if not common:
        ran = "; ".join(f"lr {lr!r}: seeds {sorted(listed)}" for lr, listed in sorted(seeds.items()))
        raise ReportError(f"{task}: the rates of {family} share no seed ({ran}); rates are compared on the "
                         f"seeds they all ran, so finish the sweep first")
    last_rounds = {lr: sorted({run.rounds[-1] for run in members}) for lr, members in by_rate.items()}
    if len({round_ for rounds in last_rounds.values() for round_ in rounds}) > 1:
        ended = "; ".join(f"lr {lr!r}: {rounds}" for lr, rounds in sorted(last_rounds.items()))
        raise ReportError(f"{task}: the runs of {family} end at different rounds ({ended}); rates are compared "
                         f"after the same rounds, so finish the sweep first")
    return tuple(sorted(common))


def select_by_validation(runs):
    """[Selection] of every (task, lr_grid entry) among ``runs`` (smartfed.experiments.report.Run),
    sorted by task and entry; [] when no run belongs to an lr_grid."""
    grid_runs = {}
    for run in runs:
        point = grid_point(run.method)
        if point is not None:
            family, lr = point
            grid_runs.setdefault((run.task, family), {}).setdefault(lr, []).append(run)
    plain = {(run.task, run.method) for run in runs if grid_point(run.method) is None}
    selections = []
    for (task, family), by_rate in sorted(grid_runs.items()):
        if (task, family) in plain:
            raise ReportError(f"{task}: runs of {family} both with and without an lr_grid; report them separately")
        seeds = _selection_seeds(task, family, by_rate)
        candidates = [Candidate(lr=lr, runs=sorted(members, key=lambda run: run.seed), selection_seeds=seeds)
                      for lr, members in sorted(by_rate.items())]
        chosen = max(candidates, key=lambda candidate: (candidate.mean, -candidate.lr))
        methods = {run.base_method for candidate in candidates for run in candidate.runs}
        if len(methods) > 1:
            raise ReportError(f"{task}: the runs of {family} train different methods {sorted(methods)}")
        selections.append(Selection(task=task, family=family, method=methods.pop(), candidates=candidates,
                                    chosen=chosen))
    return selections


def choose_configuration(selections, method):
    """{task: Configuration} choosing, per task, among the ``method`` entries of ``selections``
    (two or more), the one whose chosen rate scores best on validation on the seeds all of them
    ran (ties: the first entry by name); tasks with fewer than two such entries are left out."""
    by_task = {}
    for selection in selections:
        if selection.method == method:
            by_task.setdefault(selection.task, []).append(selection)
    configurations = {}
    for task, entries in sorted(by_task.items()):
        if len(entries) < 2:
            continue
        seeds = tuple(sorted(set.intersection(*(set(entry.selection_seeds) for entry in entries))))
        if not seeds:
            ran = "; ".join(f"{entry.family}: seeds {list(entry.selection_seeds)}" for entry in entries)
            raise ReportError(f"{task}: the {method} entries share no selection seed ({ran}); finish the sweep first")
        entries = sorted(entries, key=lambda entry: entry.family)
        scores = {entry.family: entry.chosen.score_on(seeds) for entry in entries}
        chosen = max(entries, key=lambda entry: scores[entry.family])
        configurations[task] = Configuration(task=task, method=method, seeds=seeds, scores=scores, chosen=chosen)
    return configurations


def selection_record(selections, configurations=None):
    """The JSON-able record of ``selections``: the rule, per (task, entry) every rate's
    validation scores and which rate was chosen, and the ``configurations`` chosen among a
    method's entries (:func:`choose_configuration`)."""
    return {
        "rule": RULE, "last_rounds": LAST_ROUNDS,
        "selections": [{
            "task": selection.task, "method": selection.family, "trains": selection.method,
            "chosen_lr": selection.chosen.lr, "chosen_run": point_name(selection.family, selection.chosen.lr),
            "selection_seeds": list(selection.selection_seeds),
            "chosen_seeds": [run.seed for run in selection.chosen.runs],
            "edge": selection.edge, "extend_with": selection.extend_with,
            "enough_seeds": selection.enough_seeds, "min_selection_seeds": MIN_SELECTION_SEEDS,
            "candidates": [{
                "lr": candidate.lr, "run": point_name(selection.family, candidate.lr),
                "chosen": candidate is selection.chosen, "seeds": [run.seed for run in candidate.scored_runs],
                "paths": [str(run.path) for run in candidate.scored_runs],
                "val_accuracy_last_rounds": candidate.scores,
                "val_accuracy_mean": candidate.mean, "val_accuracy_std": candidate.std,
            } for candidate in selection.candidates],
        } for selection in selections],
        "configuration_rule": CONFIGURATION_RULE,
        "configurations": [{
            "task": task, "method": configuration.method, "seeds": list(configuration.seeds),
            "val_accuracy_by_entry": configuration.scores, "chosen": configuration.chosen.family,
            "chosen_lr": configuration.chosen.chosen.lr,
        } for task, configuration in sorted((configurations or {}).items())],
    }
