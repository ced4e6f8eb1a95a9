"""The Byzantine attack matrix of docs/reliability.md: each attack of ``smartfed.federated.attacks``
by a set of clients in every round, against each aggregator setting, next to the run without
those clients (they fail every round, so the others train alone) and the honest run.

    python -m smartfed.experiments.byzantine --out DIR [--config configs/tiny.yaml]
        [--clients 9] [--rounds 4] [--seeds 0 1] [--sets first largest] [--byzantine 3]
        [--settings LABEL...] [--honest-only]

writes ``DIR/byzantine.json`` (one record per run) and ``DIR/byzantine.md``: with attacks, the
final accuracy of each case by aggregator, per seed and set, and ``DIR/byzantine.png``, the worst
gap to the run without the Byzantine clients per attack and aggregator; with ``--honest-only``,
the honest runs per seed and each setting's honest cost (its mean paired difference to the first
setting), and ``DIR/byzantine.png``, those differences per seed. The tests
(tests/test_byzantine.py) build their runs with the same helpers.
"""

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smartfed.config import load_config, with_overrides
from smartfed.experiments.assets import task_layout
from smartfed.experiments.runs import federated_data, run_in_process

ATTACKS = ("sign_flip:1", "sign_flip:5", "inner_product:0.99", "free_ride", "collude")
HONEST, WITHOUT = "honest", "without the Byzantine clients"
AWAY = "points away from the"  # the reason of a client the direction check dropped
# label -> robustness settings; the norm bound stays at its default (clip at 3x the lower median).
SETTINGS = {
    "fedavg": {"aggregator": "fedavg"},
    "median": {"aggregator": "median"},
    "trimmed_mean 0.34": {"aggregator": "trimmed_mean", "trim_fraction": 0.34},
    "krum f=3": {"aggregator": "krum", "krum_malicious": 3},
    "multi_krum f=3 m=6": {"aggregator": "multi_krum", "krum_malicious": 3, "multi_krum_select": 6},
    "filtered_mean": {"aggregator": "filtered_mean"},
    "filtered_mean_root 32": {"aggregator": "filtered_mean_root", "root_examples": 32},
}


def byzantine_clients(config, which, count):
    """The ids of ``count`` Byzantine clients: "first" (0, 1, ...) or "largest" (the clients of
    the largest partitions, as ``config`` splits its data)."""
    if which == "first":
        return list(range(count))
    if which != "largest":
        raise ValueError(f"which must be 'first' or 'largest', got {which!r}")
    sizes = [len(examples) for examples in federated_data(config, task_layout(config)).clients]
    return sorted(sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))[:count])


def with_fault(config, kind, clients):
    """``config`` with ``clients`` faulting ``kind`` in every round (``kind`` None: none)."""
    if kind is None:
        return with_overrides(config, faults={})
    rounds = range(1, config.federation.rounds + 1)
    return with_overrides(config, faults={r: {c: kind for c in clients} for r in rounds})


def outcome(config):
    """(final accuracy, how many (round, client) updates the direction check dropped) of a run
    of ``config`` in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        history = run_in_process(config, Path(folder) / "run", progress=False).history
    away = sum(AWAY in drop["reason"] for record in history for drop in record["clients_dropped"])
    return history[-1]["accuracy"], away


def matrix(base, *, seeds, sets, count, settings=SETTINGS, attacks=ATTACKS, progress=True):
    """One record per (seed, set, setting, case): the honest run (run once per seed and
    setting), the run without the Byzantine clients ("raise" faults) and each attack."""
    cases = ((WITHOUT, "raise"), *((a, a) for a in attacks))
    total = len(seeds) * len(settings) * (1 + len(sets) * len(cases))
    records = []
    with tqdm(total=total, desc="byzantine runs", disable=not progress) as bar:
        for seed in seeds:
            for label, robustness in settings.items():
                config = with_overrides(base, seed=seed, robustness=robustness)
                honest, away = outcome(config)
                bar.update()
                common = {"seed": seed, "setting": label}
                if not sets:
                    records.append({**common, "set": None, "byzantine": [], "case": HONEST, "accuracy": honest,
                                    "dropped_away": away})
                for which in sets:
                    clients = byzantine_clients(config, which, count)
                    placed = {**common, "set": which, "byzantine": clients}
                    records.append({**placed, "case": HONEST, "accuracy": honest, "dropped_away": away})
                    for case, kind in cases:
                        accuracy, dropped = outcome(with_fault(config, kind, clients))
                        records.append({**placed, "case": case, "accuracy": accuracy, "dropped_away": dropped})
                        bar.update()
    return records


def _table(header, rows):
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def tables(records):
    """Markdown: per (seed, set) the Byzantine clients and the final accuracy of each case (rows)
    under each setting (columns)."""
    settings = list(dict.fromkeys(r["setting"] for r in records))
    cases = list(dict.fromkeys(r["case"] for r in records))
    accuracy = {(r["seed"], r["set"], r["setting"], r["case"]): r["accuracy"] for r in records}
    clients = {(r["seed"], r["set"], r["setting"]): r["byzantine"] for r in records}
    lines = []
    for seed, which in dict.fromkeys((r["seed"], r["set"]) for r in records):
        rows = [["Byzantine clients", *(str(clients[(seed, which, s)]) for s in settings)]]
        rows += [[case, *(f"{accuracy[(seed, which, s, case)]:.3f}" for s in settings)] for case in cases]
        lines += [f"seed {seed}, Byzantine: the {which} clients", "", *_table(["case", *settings], rows), ""]
    return "\n".join(lines)


def worst_gaps(records):
    """{(setting, attack): the lowest accuracy minus that of the run without the Byzantine clients}."""
    without = {(r["seed"], r["set"], r["setting"]): r["accuracy"] for r in records if r["case"] == WITHOUT}
    gaps = {}
    for r in records:
        if r["case"] in (HONEST, WITHOUT):
            continue
        gap = r["accuracy"] - without[(r["seed"], r["set"], r["setting"])]
        key = (r["setting"], r["case"])
        gaps[key] = min(gap, gaps.get(key, gap))
    return gaps


def honest_differences(records):
    """{setting: [its honest accuracy minus the first setting's, per seed in order]}."""
    honest = {(r["seed"], r["setting"]): r["accuracy"] for r in records if r["case"] == HONEST}
    settings = list(dict.fromkeys(setting for _, setting in honest))
    seeds = list(dict.fromkeys(seed for seed, _ in honest))
    return {s: [honest[(seed, s)] - honest[(seed, settings[0])] for seed in seeds] for s in settings}


def honest_costs(records):
    """{setting: {"mean", "cost" (the first setting's mean minus its own: > 0 costs accuracy),
    "stderr" (of the paired differences), "worst", "best" (per seed), "seeds", "dropped_away"}}."""
    differences = honest_differences(records)
    baseline = statistics.fmean(r["accuracy"] for r in records if r["case"] == HONEST
                                and r["setting"] == next(iter(differences)))
    costs = {}
    for setting, diffs in differences.items():
        runs = [r for r in records if r["case"] == HONEST and r["setting"] == setting]
        mean = statistics.fmean(r["accuracy"] for r in runs)
        spread = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        costs[setting] = {
            "mean": mean, "cost": baseline - mean,
            "stderr": spread, "worst": min(diffs), "best": max(diffs), "seeds": len(diffs),
            "dropped_away": sum(r["dropped_away"] for r in runs),
        }
    return costs


def honest_tables(records):
    """Markdown: the honest accuracy per seed (rows) and setting (columns), then each setting's cost."""
    settings = list(dict.fromkeys(r["setting"] for r in records))
    accuracy = {(r["seed"], r["setting"]): r["accuracy"] for r in records if r["case"] == HONEST}
    seeds = list(dict.fromkeys(seed for seed, _ in accuracy))
    rows = [[str(seed), *(f"{accuracy[(seed, s)]:.4f}" for s in settings)] for seed in seeds]
    costs = honest_costs(records)
    summary = [[s, f"{c['mean']:.4f}", f"{c['cost']:+.4f}", f"{c['stderr']:.4f}", f"{c['worst']:+.3f}",
                f"{c['best']:+.3f}", str(c["dropped_away"])] for s, c in costs.items()]
    header = ["setting", "mean accuracy", f"cost vs {settings[0]}", "std. error", "worst seed", "best seed",
              "updates dropped by the direction check"]
    return "\n".join(["honest runs (no Byzantine client), final accuracy", "", *_table(["seed", *settings], rows), "",
                      f"honest cost over {len(seeds)} seeds (paired by seed)", "", *_table(header, summary), ""])


def plot_gaps(records, path):
    from smartfed.experiments.report_plots import _pyplot, _save

    plt = _pyplot()
    gaps = worst_gaps(records)
    settings = list(dict.fromkeys(s for s, _ in gaps))
    attacks = list(dict.fromkeys(a for _, a in gaps))
    values = [[gaps[(s, a)] for s in settings] for a in attacks]
    figure, axes = plt.subplots(figsize=(1.1 * len(settings) + 3.5, 0.55 * len(attacks) + 2.2))
    image = axes.imshow(values, cmap="RdYlGn", vmin=-0.5, vmax=0.05, aspect="auto")
    axes.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
    axes.set_yticks(range(len(attacks)), attacks)
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            axes.text(column, row, f"{value:+.2f}", ha="center", va="center", fontsize=8)
    axes.set_title("worst final accuracy minus the run without the Byzantine clients", fontsize=9)
    figure.colorbar(image)
    _save(figure, path)


def plot_honest_costs(records, path):
    from smartfed.experiments.report_plots import _pyplot, _save

    plt = _pyplot()
    differences = honest_differences(records)
    baseline, *settings = differences
    figure, axes = plt.subplots(figsize=(1.6 * len(settings) + 3.0, 3.6))
    for column, setting in enumerate(settings):
        diffs = differences[setting]
        axes.scatter([column] * len(diffs), diffs, s=14, alpha=0.6)
        axes.errorbar(column + 0.15, statistics.fmean(diffs), yerr=honest_costs(records)[setting]["stderr"],
                      fmt="D", color="black", capsize=3)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.axhline(-0.01, color="red", linewidth=0.8, linestyle="--", label="cost 0.01")
    axes.set_xticks(range(len(settings)), settings, rotation=20, ha="right")
    axes.set_ylabel(f"final accuracy minus {baseline}'s")
    axes.set_title("honest runs: per seed (dots), mean and its std. error (diamond)", fontsize=9)
    axes.legend(fontsize=8)
    _save(figure, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--clients", type=int, default=None, help="federation.num_clients (default: the config's)")
    parser.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the config's)")
    parser.add_argument("--byzantine", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sets", nargs="+", default=["first", "largest"], choices=["first", "largest"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--cache-dir", default=None, help="pool.cache_dir (default: the config's)")
    parser.add_argument("--honest-only", action="store_true", help="only the honest runs (the cost of a setting)")
    args = parser.parse_args(argv)
    # One torch thread, as the tests run: a tiny model gains nothing from more, and the pool adapters
    # trained here (cached per seed) differ in their last bits with the thread count.
    torch.set_num_threads(1)
    federation = {key: value for key, value in (("num_clients", args.clients), ("rounds", args.rounds))
                  if value is not None}
    base = with_overrides(load_config(args.config), federation=federation,
                          **({"pool": {"cache_dir": args.cache_dir}} if args.cache_dir else {}))
    records = matrix(base, seeds=args.seeds, sets=[] if args.honest_only else args.sets, count=args.byzantine,
                     settings={label: SETTINGS[label] for label in args.settings})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "byzantine.json").write_text(json.dumps(records, indent=1))
    if args.honest_only:
        (args.out / "byzantine.md").write_text(honest_tables(records))
        plot_honest_costs(records, args.out / "byzantine.png")
    else:
        (args.out / "byzantine.md").write_text(tables(records))
        plot_gaps(records, args.out / "byzantine.png")


if __name__ == "__main__":
    main()
