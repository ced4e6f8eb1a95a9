"""One attempt at a round under SecAgg+ (``privacy.secagg``), the piece the strategy runs in place
of its plain train messages: the server gets the example-weighted mean update of the clients that
stayed in the protocol (``smartfed.federated.secagg.secure_mean``) and each one's metrics,
importance statistics and example count in the clear.

A client whose clear-text part fails screening is inside the sum and cannot be taken out of it:
the protocol runs again without it (the clients train again, to the same result). A client whose
count differs from its partition is refused the same way, since its weight is already inside the
sum. The server never holds one client's update, so there is no norm bound and no robust
aggregator (the config refuses both with SecAgg+).
"""

from dataclasses import dataclass, field, replace

from smartfed.federated.secagg import fitres_to_result, secure_mean
from smartfed.federated.server import shown

MECHANISM = "SecAgg+ (Flower SecAggPlusWorkflow + secaggplus_mod)"


@dataclass
class SecureOutcome:
    """``valid``: client -> ``ClientResult`` whose state is the aggregate (empty when the protocol
    halted); ``aggregate``: the new global state or None; ``dropped``: [{"client", "reason"}];
    ``privacy``: the round's privacy record."""

    valid: dict = field(default_factory=dict)
    aggregate: dict = None
    dropped: list = field(default_factory=list)
    privacy: dict = None


class SecureRound:
    """SecAgg+ with ``settings`` (``privacy.secagg``) over clients weighted by the server's
    ``partition_sizes``; ``check_values(result)`` -> why a clear-text part is unusable, or None."""

    def __init__(self, settings, *, partition_sizes, timeout, check_values):
        self.settings = settings
        self.partition_sizes = partition_sizes
        self.timeout = timeout
        self.check_values = check_values

    def _problem(self, client_id, result):
        known = self.partition_sizes[client_id]
        if result.num_examples != known:
            return f"claimed {shown(result.num_examples)} examples, its partition holds {known}"
        return self.check_values(result)

    def run(self, grid, fitins, nodes, *, round_index, reference, accounting) -> SecureOutcome:
        """The protocol over ``fitins`` (client id -> FitIns; ``nodes``: client id -> node id)
        around the global state ``reference``."""
        outcome = SecureOutcome()
        names = sorted(reference)
        while True:
            mean, replies = secure_mean(
                grid, {nodes[c]: f for c, f in fitins.items()}, round_index=round_index, settings=self.settings,
                max_weight=max(self.partition_sizes.values()), timeout=self.timeout, accounting=accounting,
                names=names,
            )
            results = {c: fitres_to_result(replies[nodes[c]]) for c in fitins if nodes[c] in replies}
            if mean is None:
                outcome.dropped += [{"client": c, "reason": "SecAgg+ halted: too few clients stayed in the protocol"}
                                    for c in sorted(fitins)]
                return outcome
            bad = {c: reason for c, result in results.items() if (reason := self._problem(c, result))}
            if not bad:
                break
            outcome.dropped += [{"client": c, "reason": f"{reason} (SecAgg+ run again without it)"}
                                for c, reason in bad.items()]
            fitins = {c: f for c, f in fitins.items() if c not in bad}
        outcome.dropped += [{"client": c, "reason": "left the SecAgg+ protocol before the sum was unmasked"}
                            for c in sorted(fitins) if c not in results]
        outcome.aggregate = {name: tensor + mean[name] for name, tensor in reference.items()}
        outcome.valid = {
            c: replace(result, state=outcome.aggregate, num_examples=self.partition_sizes[c])
            for c, result in sorted(results.items())
        }
        outcome.privacy = {
            "mechanism": MECHANISM, "clients": len(outcome.valid),
            "clipping_range": self.settings.clipping_range, "quantization_range": self.settings.quantization_range,
        }
        return outcome
