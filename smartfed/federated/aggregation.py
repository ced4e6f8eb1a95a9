"""What happens to the screened updates of one attempt, as pieces the strategy composes:

1. ``NormBound`` (``robustness.norm_bound``): every update held to the norm bound of
   ``smartfed.federated.robust`` (clipped and flagged, or rejected).
2. an aggregation, chosen by ``build_aggregation``:

   - ``WeightedAggregation``: the method's FedAvg by examples, or a Flower strategy's
     (``robustness.aggregator``, ``robust.build_aggregator``);
   - ``PrivateAggregation`` (``privacy.dp``): central DP in the manner of Flower's
     ``DifferentialPrivacyServerSideFixedClipping``: each update clipped, the clipped states
     averaged with equal weights, Gaussian noise added (``smartfed.federated.privacy``). It
     replaces the weighted mean (the config refuses a robust aggregator with it), and reports
     the parameters of every release for the round's record.

SecAgg+ (``smartfed.federated.secure_round``) sums the updates inside the protocol instead: no
piece here sees one client's update there.
"""

from dataclasses import dataclass

from smartfed.federated.privacy import CentralDP
from smartfed.federated.robust import bound_updates, build_aggregator


@dataclass
class Bounded:
    """The updates left after the norm bound: ``states`` (client -> state), ``summary`` (the
    update norms and the bound, for the round's record), ``flags`` and ``dropped`` ([{"client",
    "reason"}])."""

    states: dict
    summary: dict
    flags: list
    dropped: list


class NormBound:
    """``robustness.norm_bound``: ``mode`` clip / reject / none, the bound ``max_norm`` or
    ``multiple`` x the round's lower median update norm."""

    def __init__(self, settings):
        self.mode = settings.mode
        self.multiple = settings.multiple
        self.max_norm = settings.max_norm

    def __call__(self, states, reference) -> Bounded:
        kept, summary, flags, dropped = bound_updates(
            states, reference, mode=self.mode, multiple=self.multiple, max_norm=self.max_norm,
        )
        return Bounded(kept, summary, flags, dropped)


class WeightedAggregation:
    """``aggregate(states, weights)`` (the method's FedAvg, or a Flower strategy's) as a piece."""

    def __init__(self, aggregate):
        self.aggregate = aggregate

    def __call__(self, states, weights, reference):
        """(the aggregate state, None: nothing for the round's privacy record)."""
        return self.aggregate(states, weights), None


class PrivateAggregation:
    """Central DP (``privacy.dp``): the clipped, equal-weight, noised mean; ``releases`` counts
    the noised aggregates so far (a resumed run carries them over)."""

    def __init__(self, settings, *, releases=0):
        self.dp = CentralDP(settings, releases=releases)

    def __call__(self, states, weights, reference):
        """(the noised state, the release's parameters); ``weights`` are ignored: with equal
        weights one client moves the mean by at most ``clipping_norm / n``."""
        return self.dp.aggregate(states, reference)


def build_aggregation(config, method_aggregate, *, override=None, history=()):
    """The aggregation piece of ``config``: ``override`` (an ``aggregate(states, weights)``)
    when given, else ``robustness.aggregator`` over ``method_aggregate``; with ``privacy.dp`` the
    private one, its releases counted from the run's ``history``."""
    if config.privacy.dp.enabled:
        released = [record["privacy"]["releases"] for record in history if record.get("privacy")]
        return PrivateAggregation(config.privacy.dp, releases=max(released, default=0))
    return WeightedAggregation(override if override is not None else build_aggregator(config.robustness,
                                                                                    method_aggregate))
