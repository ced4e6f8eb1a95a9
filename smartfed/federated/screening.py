"""Is a client's train reply usable? Every check the server makes on a decoded reply before any
of it touches the global state, the quotas or the accounting.

A reply crosses the trust boundary: a faulty or hostile client may send anything a Flower record
can hold. ``screen_replies`` keeps a client only when its tensors have the global state's names
and shapes and are finite (``server.check_update``), its claimed example count is a positive
int, every metric the server reads is present with its type and a finite, sane value, and its
EEQA importance statistics (when the run has quotas) name the configured estimator and exactly
the quota modules, with finite non-negative sums and token counts no larger than its local steps
could have seen. A client failing any check is dropped with the reason; the round goes on under
the ``min_clients`` rule.

Example counts are the server's own: a client is weighted by the size of the partition the server
assigned it, whatever it claims (``example_counts="partition"``); a claim that differs is flagged.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from smartfed.federated.server import WIRE_INT_LIMIT, screen_results, shown

# The metrics the server reads from every train reply, with the check each value must pass.
NUMBER = "a finite number"
NON_NEGATIVE = "a finite number >= 0"
COUNT = "an int >= 0"
TEXT = "a string"
REQUIRED_METRICS = {
    "loss": NON_NEGATIVE,
    "compute_s": NON_NEGATIVE,
    "active_flops": NON_NEGATIVE,
    "peak_memory_bytes": COUNT,
    "peak_memory_source": TEXT,
}


def _is_int(value):
    # An int is compared, never converted: float(10**400) raises, and the wire carries 64 bits.
    return isinstance(value, int) and not isinstance(value, bool) and -WIRE_INT_LIMIT <= value < WIRE_INT_LIMIT


def _is_number(value):
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _passes(value, kind):
    if kind == TEXT:
        return isinstance(value, str)
    if kind == COUNT:
        return _is_int(value) and value >= 0
    return _is_number(value) and (kind == NUMBER or value >= 0)


def check_metrics(metrics) -> Optional[str]:
    """Why ``metrics`` (a train reply's, decoded) cannot be used, or None."""
    missing = sorted(key for key in REQUIRED_METRICS if key not in metrics)
    if missing:
        return f"metrics missing {missing}"
    for key, kind in REQUIRED_METRICS.items():
        if not _passes(metrics[key], kind):
            return f"metric {key!r} must be {kind}, got {type(metrics[key]).__name__} {shown(metrics[key])}"
    return None


def check_scores(scores) -> Optional[str]:
    """Why an evaluate reply's metrics (``loss``, ``accuracy``) cannot be used, or None."""
    for key in ("loss", "accuracy"):
        if key not in scores:
            return f"metrics missing {key!r}"
        if not _passes(scores[key], NON_NEGATIVE) or (key == "accuracy" and scores[key] > 1):
            return f"metric {key!r} must be a finite number in range, got {shown(scores[key])}"
    return None


def check_importance(importance, *, estimator, modules, max_count) -> Optional[str]:
    """Why a reply's importance statistics cannot be used, or None. ``modules``: the quota
    modules (None: the run has no quotas, so a reply must carry none); ``max_count``: the most
    tokens one module can have seen in the client's local steps."""
    if importance is None:
        return None
    if modules is None:
        return "importance statistics in a run without EEQA quotas"
    if importance["estimator"] != estimator:
        return f"importance estimator {shown(importance['estimator'])}, the run uses {estimator!r}"
    sums, counts = importance["sums"], importance["counts"]
    if set(sums) != set(modules) or set(counts) != set(modules):
        unexpected = sorted((set(sums) | set(counts)) - set(modules))
        return f"importance statistics must name the quota modules: unexpected {unexpected[:3]}, missing " \
               f"{sorted(set(modules) - (set(sums) & set(counts)))[:3]}"
    for module in sorted(modules):
        total, count = sums[module], counts[module]
        if not _passes(total, NON_NEGATIVE):
            return f"importance sum of {module} must be {NON_NEGATIVE}, got {shown(total)}"
        if not (_passes(count, COUNT) and 1 <= count <= max_count):
            return f"importance count of {module} must be an int in [1, {max_count}], got {shown(count)}"
    return None


def check_values(result, *, quotas, estimator, max_count) -> Optional[str]:
    """Why a reply's metrics or importance statistics cannot be used, or None. ``quotas``: the
    run's (None: no quotas); ``estimator`` and ``max_count`` as for ``check_importance``."""
    return check_metrics(result.metrics) or check_importance(
        result.importance, estimator=estimator, modules=None if quotas is None else sorted(quotas),
        max_count=max_count,
    )


@dataclass
class Screened:
    """The outcome of screening one attempt's replies: the usable results, each client's weight
    (examples), the dropped clients and the flags raised on kept ones (both [{"client", "reason"}])."""

    valid: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    dropped: list = field(default_factory=list)
    flags: list = field(default_factory=list)


def screen_replies(state, results, *, partition_sizes, example_counts, estimator, max_count) -> Screened:
    """Screen decoded results ({client_id: ClientResult}) against the global ``state``.
    ``partition_sizes``: client id -> examples the server assigned it; ``example_counts``:
    "partition" (weight by those) or "claimed"; ``estimator`` and ``max_count`` as for
    ``check_importance``."""
    structural, dropped = screen_results(state, results)
    screened = Screened(dropped=dropped)
    for client_id, result in structural.items():
        reason = check_values(result, quotas=state.quotas, estimator=estimator, max_count=max_count)
        if reason is not None:
            screened.dropped.append({"client": client_id, "reason": reason})
            continue
        screened.valid[client_id] = result
        known = partition_sizes[client_id]
        if example_counts == "claimed":
            screened.weights[client_id] = result.num_examples
        else:
            screened.weights[client_id] = known
            if result.num_examples != known:
                screened.flags.append({
                    "client": client_id,
                    "reason": f"claimed {result.num_examples} examples, its partition holds {known}: weighted by {known}",
                })
    screened.dropped.sort(key=lambda record: record["client"])
    return screened
