"""Choosing each method's learning rate on the validation split (docs/experiment.md, "Protocol:
choosing settings on validation").

A ``sweep.methods`` entry with ``lr_grid`` runs once per rate, each run named
``<entry>@lr=<rate>`` (:func:`point_name`). For every (task, entry) with such runs,
:func:`select_by_validation` scores each run by its validation accuracy averaged over its last
``LAST_ROUNDS`` evaluated rounds, averages that over seeds, and chooses the rate with the highest
mean (ties: the lower rate). Only ``val_accuracy`` is read here: the test accuracy of a rate
that is not chosen plays no part, and ``smartfed report`` shows test numbers of the chosen rate only.
"""

import math
import statistics
from dataclasses import dataclass

from smartfed.config import LR_GRID_MARK

LAST_ROUNDS = 3
SELECTION_FILE = "selection.json"
SELECTION_TABLE = "selection.md"
VALIDATION_PLOT = "validation_accuracy_chosen.png"
RULE = (f"per task and method, the learning rate whose validation accuracy, averaged over each run's last "
        f"{LAST_ROUNDS} evaluated rounds and then over seeds, is highest; ties go to the lower rate; the test "
        f"split is read only for the chosen rate")


def point_name(family, lr) -> str:
    """The run name of rate ``lr`` of the ``lr_grid`` entry ``family``: the rate as Python's
    shortest text that reads back as the same float (0.003, 0.01, 1e-05, 1.0), so that two rates
    never share a name and 3e-3 and 0.003 get the same one."""
    return f"{family}{LR_GRID_MARK}{float(lr)!r}"


def grid_point(name):
    """(entry, rate) of a run named by :func:`point_name`, or None for any other run."""
    family, mark, rate = name.partition(LR_GRID_MARK)
    return (family, float(rate)) if mark else None


@dataclass
class Candidate:
    lr: float
    runs: list  # the rate's runs (smartfed.experiments.report.Run), in seed order
    scores: list  # validation score of each run

    @property
    def mean(self):
        return math.fsum(self.scores) / len(self.scores)

    @property
    def std(self):
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


@dataclass
class Selection:
    task: str
    family: str  # the sweep.methods entry
    candidates: list  # one Candidate per rate, ascending
    chosen: Candidate


def validation_score(run):
    """Mean ``val_accuracy`` over the last LAST_ROUNDS rounds of ``run`` that were scored on validation."""
    scores = [record["val_accuracy"] for record in run.records if "val_accuracy" in record]
    if not scores:
        raise ValueError(f"{run.path} has no val_accuracy in its metrics: choosing a learning rate on validation "
                         f"needs a sweep run with task.validation_fraction > 0")
    last = scores[-LAST_ROUNDS:]
    return math.fsum(last) / len(last)


def _check_comparable(task, family, by_rate):
    """Refuse rates that ran different seeds or stopped at different rounds: their scores would
    average different things."""
    seeds = {lr: [run.seed for run in members] for lr, members in by_rate.items()}
    for lr, listed in seeds.items():
        if len(set(listed)) < len(listed):
            raise ValueError(f"{task}: {point_name(family, lr)} has seeds {sorted(listed)}, one of them twice; "
                             f"report each sweep folder on its own")
    if len({tuple(sorted(listed)) for listed in seeds.values()}) > 1:
        ran = "; ".join(f"lr {lr!r}: seeds {sorted(listed)}" for lr, listed in sorted(seeds.items()))
        raise ValueError(f"{task}: the rates of {family} ran different seeds ({ran}); rates are compared on the "
                         f"same seeds, so finish the sweep first")
    last_rounds = {lr: sorted({run.rounds[-1] for run in members}) for lr, members in by_rate.items()}
    if len({round_ for rounds in last_rounds.values() for round_ in rounds}) > 1:
        ended = "; ".join(f"lr {lr!r}: {rounds}" for lr, rounds in sorted(last_rounds.items()))
        raise ValueError(f"{task}: the runs of {family} end at different rounds ({ended}); rates are compared "
                         f"after the same rounds, so finish the sweep first")


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
            raise ValueError(f"{task}: runs of {family} both with and without an lr_grid; report them separately")
        _check_comparable(task, family, by_rate)
        candidates = []
        for lr, members in sorted(by_rate.items()):
            members = sorted(members, key=lambda run: run.seed)
            candidates.append(Candidate(lr=lr, runs=members, scores=[validation_score(run) for run in members]))
        chosen = max(candidates, key=lambda candidate: (candidate.mean, -candidate.lr))
        selections.append(Selection(task=task, family=family, candidates=candidates, chosen=chosen))
    return selections


def selection_record(selections):
    """The JSON-able record of ``selections``: the rule, and per (task, entry) every rate's
    validation scores and which rate was chosen."""
    return {
        "rule": RULE, "last_rounds": LAST_ROUNDS,
        "selections": [{
            "task": selection.task, "method": selection.family, "chosen_lr": selection.chosen.lr,
            "chosen_run": point_name(selection.family, selection.chosen.lr),
            "candidates": [{
                "lr": candidate.lr, "run": point_name(selection.family, candidate.lr),
                "chosen": candidate is selection.chosen, "seeds": [run.seed for run in candidate.runs],
                "paths": [str(run.path) for run in candidate.runs],
                "val_accuracy_last_rounds": candidate.scores,
                "val_accuracy_mean": candidate.mean, "val_accuracy_std": candidate.std,
            } for candidate in selection.candidates],
        } for selection in selections],
    }
