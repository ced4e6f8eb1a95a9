"""Robust aggregation: what one hostile client can still do once its reply passed screening.

- ``bound_updates``: every update (client state minus global state, L2 over all tensors) is held
  to a norm bound: ``max_norm`` when configured, else ``multiple`` times the round's lower median
  update norm (the lower of the two middle values, so that with two clients a huge update cannot
  set its own bound). "clip" scales a longer update back onto the bound, "reject" drops its
  client; either way the client is flagged with its norm.
- ``flower_aggregator``: any Flower message-API strategy whose aggregation depends on the
  replies alone, as an ``aggregate(states, weights)``; ``build_aggregator``: the configured
  aggregator, Flower's FedTrimmedAvg / FedMedian / Krum / MultiKrum through it, FedAvg the
  method's own.
- ``combine_importance``: the clients' EEQA importance means per module, each clipped to
  ``clip`` times the round's lower median of that module, combined by median or trimmed mean,
  so that one client's statistics cannot steer the quotas.
"""

import math
import statistics

from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from smartfed.eeqa import ImportanceStats
from smartfed.federated.messages import NUM_EXAMPLES, record_to_state, state_to_record


def update_norm(state, reference) -> float:
    """L2 norm of ``state - reference`` over all tensors, in float64."""
    total = 0.0
    for name, tensor in reference.items():
        total += float((state[name].double() - tensor.double()).pow(2).sum())
    return math.sqrt(total)


def lower_median(values):
    return sorted(values)[(len(values) - 1) // 2]


def scaled_update(state, reference, scale):
    """``reference + scale * (state - reference)`` per tensor, float32."""
    return {
        name: (tensor.double() + scale * (state[name].double() - tensor.double())).float()
        for name, tensor in reference.items()
    }


def bound_updates(states, reference, *, mode, multiple, max_norm=None):
    """Hold ``states`` ({client_id: state}) to the norm bound around ``reference`` (the global
    state). Returns (kept states, {"update_norms", "norm_bound"}, flags, dropped), flags and
    dropped as [{"client", "reason"}]."""
    norms = {client_id: update_norm(state, reference) for client_id, state in states.items()}
    summary = {"update_norms": {str(c): norms[c] for c in sorted(norms)}, "norm_bound": None}
    if mode == "none" or not states:
        return dict(states), summary, [], []
    bound = float(max_norm) if max_norm is not None else multiple * lower_median(list(norms.values()))
    summary["norm_bound"] = bound
    kept, flags, dropped = {}, [], []
    for client_id in sorted(states):
        norm = norms[client_id]
        if norm <= bound:
            kept[client_id] = states[client_id]
        elif mode == "reject":
            dropped.append({"client": client_id, "reason": f"update norm {norm:.4g} exceeds the bound {bound:.4g}"})
        else:
            kept[client_id] = scaled_update(states[client_id], reference, bound / norm)
            flags.append({"client": client_id, "reason": f"update norm {norm:.4g} clipped to the bound {bound:.4g}"})
    return kept, summary, flags, dropped


def flower_aggregator(inner: Strategy):
    """An ``aggregate(states, weights)`` for ``SmartFedStrategy`` made of a Flower strategy's
    ``aggregate_train`` (FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan: the ones
    whose aggregation depends on the replies alone). Each screened update goes in as a reply
    holding its fp32 arrays and its ``num-examples``; the aggregated arrays come back as tensors."""

    def aggregate(states, weights):
        replies = []
        for index, (state, weight) in enumerate(zip(states, weights)):
            metadata = Metadata(
                run_id=0, message_id=str(index), src_node_id=index, dst_node_id=0,
                reply_to_message_id=str(index), group_id="", created_at=0.0, ttl=1.0,
                message_type=MessageType.TRAIN,
            )
            content = RecordDict({
                "arrays": state_to_record(state, "fp32"), "metrics": MetricRecord({NUM_EXAMPLES: int(weight)}),
            })
            replies.append(Message(metadata=metadata, content=content))
        arrays, _ = inner.aggregate_train(0, replies)  # the round plays no part in their aggregation
        if arrays is None:
            raise RuntimeError(f"{type(inner).__name__}.aggregate_train returned no arrays for {len(states)} updates")
        return record_to_state(arrays)

    return aggregate


def build_aggregator(robustness, default):
    """``aggregate(states, weights)`` for ``robustness.aggregator``: ``default`` (the method's
    FedAvg) for "fedavg", else Flower's strategy of that name."""
    name = robustness.aggregator
    if name == "fedavg":
        return default
    if name == "trimmed_mean":
        return flower_aggregator(FedTrimmedAvg(beta=robustness.trim_fraction))
    if name == "median":
        return flower_aggregator(FedMedian())
    if name == "krum":
        return flower_aggregator(Krum(num_malicious_nodes=robustness.krum_malicious))
    return flower_aggregator(MultiKrum(
        num_malicious_nodes=robustness.krum_malicious, num_nodes_to_select=robustness.multi_krum_select,
    ))


def trimmed_mean(values, fraction):
    ordered = sorted(values)
    cut = int(fraction * len(ordered))
    kept = ordered[cut:len(ordered) - cut] or ordered
    return math.fsum(kept) / len(kept)


def combine_importance(stats_list, *, how, clip=None, trim_fraction=0.25):
    """One importance value per module from several clients' ``ImportanceStats``: "mean" pools
    sums and counts (token-weighted, as ``ImportanceStats.merge``); "median" / "trimmed_mean"
    take each client's own mean, clip it to ``clip`` times the lower median of the module, and
    combine the clipped values."""
    if how == "mean":
        return ImportanceStats.merge(stats_list).mean()
    means = [stats.mean() for stats in stats_list]
    combined = {}
    for module in sorted(means[0]):
        values = [mean[module] for mean in means]
        ceiling = clip * lower_median(values)
        values = [min(value, ceiling) for value in values]
        combined[module] = statistics.median(values) if how == "median" else trimmed_mean(values, trim_fraction)
    return combined
