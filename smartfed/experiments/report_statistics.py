"""The intervals and paired tests of ``smartfed report``, from each run's per-item results.

Every reported run that kept ``evaluation_items.json`` (``smartfed evaluate``, run by ``smartfed
sweep`` after each run) contributes one row per test item. Per (task, method, metric) the seeds'
rows form a [seeds, items] matrix (smartfed.experiments.intervals): its mean with a 95%
bootstrap interval over seeds and items, the same on the items shown under a template the
federation trained on (seen) and under one neither the pool nor the federation saw (unseen), and
the paired difference against FedIT on the seeds both ran, with its interval, sign-flip p-value
and verdict ("no conclusion" whenever the interval holds zero). Every SmartFed form is also paired
against adapter-level mixture: rank-wise experts against whole adapters, the comparison that tests
the paper's idea, beside the bytes each sent; and every SmartFed form with EEQA against the same
form with a uniform quota (its sweep entry equal but for ``eeqa.enabled`` and the rate it chose).
"""

import json

from smartfed.experiments import intervals as st
from smartfed.federated.run_dir import EVALUATION_ITEMS_FILE

METRICS = ("correct", "exact_match", "f1", "rouge_l")
STATISTICS_FILE = "statistics.json"
REFERENCE = "fedit"
WHOLE_ADAPTERS = "adapter_mixture"
RANK_WISE = "smartfed"  # the method every SmartFed form trains (config "method")
# What may set a uniform-quota entry apart from the EEQA form it ablates: the switch and the rate
# chosen for each on validation.
QUOTA_ABLATION_KEYS = ("eeqa.enabled", "federation.lr")


def read_items(run):
    """The per-item record of ``run`` (its ``evaluation_items.json``), or None."""
    path = run.path / EVALUATION_ITEMS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("split") == "test" else None


def _matrix(records, metric, mask=None):
    rows = [[value for index, value in enumerate(record[metric]) if mask is None or mask[index]]
            for record in records]
    return st.score_matrix(rows, metric)


def _same_items(records):
    """Whether ``records`` scored the same items in the same order (by their ``item`` and
    ``template`` columns when they have them, else by their count)."""
    keys = {json.dumps([record.get("item"), record.get("template"), len(record.get("prediction", ()))])
            for record in records}
    return len(keys) == 1


def _group(records, metric, seeds, resamples):
    by_seed = dict(zip(seeds, records))
    record = records[0]
    entry = {"seeds": seeds, "items": len(record[metric]),
             "all": st.bootstrap_interval(_matrix(records, metric), resamples=resamples).as_dict()}
    if "seen" in record:
        for name, flag in (("seen", True), ("unseen", False)):
            mask = [value is flag for value in record["seen"]]
            if any(mask):
                entry[name] = st.bootstrap_interval(_matrix(records, metric, mask), resamples=resamples).as_dict()
    return entry, by_seed


def _versus(row, by_key, reference, resamples):
    """The paired difference of ``row``'s method against ``reference`` on the seeds both ran, or
    None when they share no seed scored on the same items."""
    base = by_key.get((row["task"], reference, row["metric"]))
    if row["method"] == reference or base is None:
        return None
    own = by_key[(row["task"], row["method"], row["metric"])]
    common = sorted(set(own) & set(base))
    if not common or not _same_items([own[common[0]], base[common[0]]]):
        return None
    paired = st.paired_difference(_matrix([own[s] for s in common], row["metric"]),
                                  _matrix([base[s] for s in common], row["metric"]), resamples=resamples)
    return {"reference": reference, "seeds": common, **paired.as_dict()}


def run_statistics(runs, *, reference=REFERENCE, resamples=st.RESAMPLES):
    """{"rows": [...], "skipped": [...]} for ``runs`` (the headline runs of a report). Each row
    carries the bytes (up + down, whole run) its seeds sent, their mean."""
    groups, base_methods, identities = {}, {}, {}
    for run in runs:
        record = read_items(run)
        if record is not None:
            groups.setdefault((run.task, run.method), []).append((run.seed, record, run.cumulative_bytes[-1]))
            base_methods[run.task, run.method] = run.base_method
            identities[run.task, run.method] = run.identity
    uniform_quota = _uniform_quota_counterparts(
        {key: identity for key, identity in identities.items() if base_methods[key] == RANK_WISE})
    rows, skipped, by_key = [], [], {}
    for (task, method), members in sorted(groups.items()):
        seeds, records, totals = (list(column) for column in zip(*sorted(members, key=lambda member: member[0])))
        if not _same_items(records):
            skipped.append(f"{task} {method}: its seeds scored different items")
            continue
        sent = sum(totals) / len(totals)
        for metric in METRICS:
            if metric in records[0]:
                entry, by_seed = _group(records, metric, seeds, resamples)
                by_key[(task, method, metric)] = by_seed
                rows.append({"task": task, "method": method, "metric": metric, "bytes_up_down": sent, **entry})
    for row in rows:
        key = (row["task"], row["method"])
        references = {"versus_reference": reference}
        if base_methods[key] == RANK_WISE:
            references["versus_whole_adapters"] = WHOLE_ADAPTERS
        if key in uniform_quota:
            references["versus_uniform_quota"] = uniform_quota[key]
        for name, other in references.items():
            versus = _versus(row, by_key, other, resamples)
            if versus is not None:
                row[name] = versus
    return {"rows": rows, "skipped": skipped, "level": st.LEVEL, "resamples": resamples}


def _uniform_quota_counterparts(identities):
    """{(task, EEQA form): its uniform-quota entry} among the rank-wise ``identities`` ({(task,
    method): config identity}): the entry with ``eeqa.enabled`` false whose identity is otherwise
    the form's, up to the rate each chose."""
    def without_ablation(identity):
        return json.dumps({key: value for key, value in identity.items() if key not in QUOTA_ABLATION_KEYS},
                          sort_keys=True, default=str)

    uniform = {(task, without_ablation(identity)): method for (task, method), identity in identities.items()
               if identity.get("eeqa.enabled") is False}
    pairs = {}
    for (task, method), identity in identities.items():
        counterpart = uniform.get((task, without_ablation(identity)))
        if identity.get("eeqa.enabled") is not False and counterpart is not None:
            pairs[task, method] = counterpart
    return pairs


def interval_text(entry):
    """An interval of a statistics record as the report shows it; "-" when there is none."""
    return "-" if entry is None else st.Interval(**entry).text()
