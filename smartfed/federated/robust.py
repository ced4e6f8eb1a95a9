"""Robust aggregation: what hostile clients can still do once their replies passed screening.

- ``bound_updates``: every kept update (client state minus global state, L2 over all tensors) is
  held to a norm bound: ``max_norm`` when configured, else ``multiple`` times the round's lower
  median update norm (the lower of the two middle values, so that with two clients a huge update
  cannot set its own bound). "clip" scales a longer update back onto the bound, "reject" drops
  its client; either way the client is flagged with its norm.
- ``AGGREGATORS``: every ``robustness.aggregator`` by name; ``build_aggregator`` makes the
  configured one and refuses any other name. An aggregator first ``check``s the screened updates
  (it may drop some, before the norm bound), then aggregates the kept ones:

  - ``Weighted``: an ``aggregate(states, weights)`` (the method's FedAvg; Flower's FedTrimmedAvg
    / FedMedian / Krum / MultiKrum through ``flower_aggregator``, any Flower message-API strategy
    whose aggregation depends on the replies alone); its check keeps every update and records
    each one's cosine to the coordinate-wise median.
  - ``FilteredMean`` ("filtered_mean", "filtered_mean_root"): an update whose cosine to the
    round's centre is <= 0 is dropped; the kept ones are clipped to their median norm and
    averaged with partition weights capped at their median. It combines FLTrust's trust score
    (ReLU of the cosine to a centre, Cao et al. NDSS 2021), FLAME's median-norm clipping (Nguyen
    et al. USENIX Security 2022) and DP-FedAvg's per-client weight cap (McMahan et al. ICLR
    2018): no update outweighs a median one and none pulls against the centre. The centre is the
    coordinate-wise median of the updates (``median_centre``; Yin et al. ICML 2018), which, while
    the attackers are fewer than the honest clients, lies in every coordinate within the range of
    the honest values, taken a second time without the updates that point away from the first
    (one step of the filtering of robust mean estimation, Diakonikolas et al. FOCS 2016: large
    identical attacks drag the first median far enough that honest updates point away from it,
    not from the second); or the server's own update on a root set it holds (``root_centre``,
    FLTrust's own centre), which does not depend on the clients at all.

  Record fields of a round: ``centre_cosines`` (each checked client's cosine to the centre) and,
  for ``FilteredMean``, ``aggregation_weights`` (the normalised weights of the mean) and
  ``clip_norm``.
- ``combine_importance``: the clients' EEQA importance means per module, each clipped to
  ``clip`` times the round's lower median of that module, combined by median or trimmed mean,
  so that one client's statistics cannot steer the quotas.
"""

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
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


def flat_updates(states, reference):
    """[clients, values] float64: each state minus ``reference``, over its names in sorted order."""
    names = sorted(reference)
    return np.stack([
        np.concatenate([(state[n].double() - reference[n].double()).numpy().ravel() for n in names])
        for state in states
    ])


def state_from_update(update, reference):
    """``reference`` plus the flat ``update`` (as ``flat_updates`` orders it), float32."""
    state, start = {}, 0
    for name in sorted(reference):
        tensor = reference[name]
        end = start + tensor.numel()
        delta = torch.from_numpy(update[start:end].copy()).view(tensor.shape)
        state[name] = (tensor.double() + delta).float()
        start = end
    return state


def cosines(updates, centre):
    """The cosine of each row of ``updates`` to ``centre``; 0 where either is zero."""
    lengths = np.linalg.norm(updates, axis=1) * np.linalg.norm(centre)
    dots = updates @ centre
    return np.divide(dots, lengths, out=np.zeros_like(dots), where=lengths > 0)


def by_client(values, clients):
    return {str(c): round(float(v), 6) for c, v in zip(clients, values)}


def median_centre(updates, server, round_index):
    """The coordinate-wise median of ``updates`` (a ``flat_updates`` array)."""
    return np.median(updates, axis=0)


def root_centre(root_update):
    """A centre: the server's own update ``root_update(server, round_index)`` (a state) as a flat
    update."""

    def centre(updates, server, round_index):
        return flat_updates([root_update(server, round_index)], server.global_state)[0]

    return centre


@dataclass
class Checked:
    """The updates an aggregator's check left: ``kept`` (client -> state), ``dropped`` ([{"client",
    "reason"}]) and ``record`` (fields for the round's record)."""

    kept: dict
    dropped: list = field(default_factory=list)
    record: dict = field(default_factory=dict)


def direction_check(states, server, round_index, centre, label, *, drop, refine=False) -> Checked:
    """The cosine of every update of ``states`` (client -> state) around ``server.global_state``
    to ``centre(updates, server, round_index)`` (``centre_cosines``); with ``drop``, the updates
    at cosine <= 0 are dropped, their reason naming ``label``. With ``refine`` (a centre taken
    from the updates), once some but not all point away: the centre is taken again from the
    updates that point along it, and every update is checked against that one instead."""
    if not states:
        return Checked({})
    clients = sorted(states)
    updates = flat_updates([states[c] for c in clients], server.global_state)
    cos = cosines(updates, centre(updates, server, round_index))
    along = cos > 0
    if drop and refine and 0 < along.sum() < len(clients):
        cos = cosines(updates, centre(updates[along], server, round_index))
    away = {c: value for c, value in zip(clients, cos) if drop and value <= 0}
    dropped = [{"client": c, "reason": f"update points away from the {label} (cosine {value:.3f})"}
               for c, value in away.items()]
    kept = {c: states[c] for c in clients if c not in away}
    return Checked(kept, dropped, {"centre_cosines": by_client(cos, clients)})


class Weighted:
    """``aggregate(states, weights)`` (lists in client order: the method's FedAvg, a Flower
    strategy's) as an aggregator: its check keeps every update and records each one's cosine to
    the coordinate median."""

    def __init__(self, aggregate):
        self.aggregate = aggregate

    def check(self, states, server, round_index) -> Checked:
        return direction_check(states, server, round_index, median_centre, "coordinate median", drop=False)

    def __call__(self, states, weights, reference):
        """(the aggregate of ``states`` weighted by ``weights``, both client -> value; no record fields)."""
        clients = sorted(states)
        return self.aggregate([states[c] for c in clients], [weights[c] for c in clients]), {}


class FilteredMean:
    """The direction check against ``centre(updates, server, round_index)`` (named ``label`` in
    the reasons; ``refine``: re-taken once without the updates pointing away, for a centre taken
    from the updates), then the norm-clipped, weight-capped mean of the kept updates."""

    def __init__(self, centre, label, *, refine=False):
        self.centre = centre
        self.label = label
        self.refine = refine

    def check(self, states, server, round_index) -> Checked:
        return direction_check(states, server, round_index, self.centre, self.label, drop=True, refine=self.refine)

    def __call__(self, states, weights, reference):
        """(the mean, {"aggregation_weights", "clip_norm"})."""
        clients = sorted(states)
        updates = flat_updates([states[c] for c in clients], reference)
        norms = np.linalg.norm(updates, axis=1)
        clip_norm = float(np.median(norms))
        scale = np.minimum(1.0, np.divide(clip_norm, norms, out=np.ones_like(norms), where=norms > 0))
        sizes = np.array([float(weights[c]) for c in clients])
        capped = np.minimum(sizes, np.median(sizes))
        share = capped / capped.sum()
        record = {"aggregation_weights": by_client(share, clients), "clip_norm": clip_norm}
        return state_from_update((share * scale) @ updates, reference), record


def _root_filtered_mean(robustness, default, root_update):
    if root_update is None:
        raise ValueError("robustness.aggregator 'filtered_mean_root' needs the server's root set: "
                         "robustness.root_examples > 0")
    return FilteredMean(root_centre(root_update), "server's root update")


def _flower(make):
    return lambda robustness, default, root_update: Weighted(flower_aggregator(make(robustness)))


# name -> (robustness section, the method's FedAvg, the server's root update or None) -> aggregator
AGGREGATORS = {
    "fedavg": lambda robustness, default, root_update: Weighted(default),
    "trimmed_mean": _flower(lambda robustness: FedTrimmedAvg(beta=robustness.trim_fraction)),
    "median": _flower(lambda robustness: FedMedian()),
    "krum": _flower(lambda robustness: Krum(num_malicious_nodes=robustness.krum_malicious)),
    "multi_krum": _flower(lambda robustness: MultiKrum(
        num_malicious_nodes=robustness.krum_malicious, num_nodes_to_select=robustness.multi_krum_select)),
    "filtered_mean": lambda robustness, default, root_update: FilteredMean(median_centre, "coordinate median",
                                                                           refine=True),
    "filtered_mean_root": _root_filtered_mean,
}


def build_aggregator(robustness, default, *, root_update=None):
    """The aggregator named by ``robustness.aggregator`` (see ``AGGREGATORS``); ``default`` is
    the method's FedAvg ``aggregate(states, weights)``, ``root_update(server, round_index)`` the
    server's own update on its root set, needed by "filtered_mean_root" only."""
    name = robustness.aggregator
    if name not in AGGREGATORS:
        raise ValueError(f"robustness.aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")
    return AGGREGATORS[name](robustness, default, root_update)


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
