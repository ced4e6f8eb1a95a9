"""What happens to the screened updates of one attempt, as pieces the strategy composes, in order:

1. the aggregation's ``check`` (``robustness.aggregator``, ``smartfed.federated.robust``): every
   update's cosine to the aggregator's centre (``centre_cosines``); "filtered_mean" and
   "filtered_mean_root" drop the updates that point away from it, the others keep every one;
2. ``NormBound`` (``robustness.norm_bound``): every kept update held to the norm bound of
   ``smartfed.federated.robust`` (clipped and flagged, or rejected);
3. the aggregation itself, chosen by ``build_aggregation``:

   - the configured aggregator (``robust.build_aggregator``): the method's FedAvg by examples, a
     Flower strategy's, or the filtered mean; "filtered_mean_root" centres its check on
     ``RootUpdate``, the server's own update on the root set it holds back;
   - ``PrivateAggregation`` (``privacy.dp``): central DP in the manner of Flower's
     ``DifferentialPrivacyServerSideFixedClipping``: each update clipped, the clipped states
     averaged with equal weights, Gaussian noise added (``smartfed.federated.privacy``). It
     replaces the weighted mean (the config refuses a robust aggregator with it), checks nothing,
     and reports the parameters of every release for the round's record.

Each piece's record fields join the round's line of ``metrics.jsonl``. SecAgg+
(``smartfed.federated.secure_round``) sums the updates inside the protocol instead: no piece here
sees one client's update there.
"""

from dataclasses import dataclass, replace

from smartfed.federated.privacy import CentralDP
from smartfed.federated.robust import Checked, Weighted, bound_updates, build_aggregator
from smartfed.federated.seeding import STREAM_ROOT_UPDATE, derived_seed
from smartfed.federated.server import client_instructions


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


class PrivateAggregation:
    """Central DP (``privacy.dp``): the clipped, equal-weight, noised mean; ``releases`` counts
    the noised aggregates so far (a resumed run carries them over)."""

    def __init__(self, settings, *, releases=0):
        self.dp = CentralDP(settings, releases=releases)

    def check(self, states, server, round_index) -> Checked:
        return Checked(dict(states))

    def __call__(self, states, weights, reference):
        """(the noised state, {"privacy": the release's parameters}); ``weights`` are ignored:
        with equal weights one client moves the mean by at most ``clipping_norm / n``."""
        aggregated, privacy = self.dp.aggregate([states[c] for c in sorted(states)], reference)
        return aggregated, {"privacy": privacy}


class RootUpdate:
    """The server's own update on its root set (``robustness.root_examples``, held out of the
    training examples like the validation split): ``trainer`` trained from the global state on
    ``examples`` with the clients' local settings and the global quotas, seeded by (seed, round)
    on a stream of its own, so that a resumed run repeats it exactly."""

    def __init__(self, trainer, examples, config):
        if examples is None or len(examples) == 0:
            raise ValueError("the server's root set is empty: set robustness.root_examples > 0")
        self.trainer = trainer
        self.examples = examples
        self.config = config

    def __call__(self, server, round_index):
        instructions = replace(
            client_instructions(server, 0, round_index, self.config), quotas=server.quotas,
            seed=derived_seed(server.seed, STREAM_ROOT_UPDATE, round_index),
        )
        return self.trainer.train(instructions, self.examples).state


def build_aggregation(config, method_aggregate, *, override=None, history=(), root_update=None):
    """The aggregation piece of ``config``: ``override`` (an ``aggregate(states, weights)``)
    when given, else ``robustness.aggregator`` over ``method_aggregate`` (``root_update``: the
    server's ``RootUpdate`` for "filtered_mean_root"); with ``privacy.dp`` the private one, its
    releases counted from the run's ``history``."""
    if config.privacy.dp.enabled:
        released = [record["privacy"]["releases"] for record in history if record.get("privacy")]
        return PrivateAggregation(config.privacy.dp, releases=max(released, default=0))
    if override is not None:
        return Weighted(override)
    return build_aggregator(config.robustness, method_aggregate, root_update=root_update)
