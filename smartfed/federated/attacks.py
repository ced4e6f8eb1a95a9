"""Byzantine attacks for the fault harness (``faults: {round: {client: "<name>[:<param>]"}}``):
what an omniscient attacker uploads once it has seen every honest update of the round
(docs/reliability.md, "Byzantine clients").

``ATTACKS[name](byzantine, honest, reference, param, rng)`` returns the states the Byzantine
clients upload instead of their honest ones: ``byzantine`` and ``honest`` map client ids to the
states those clients trained this round, ``reference`` is the global state the round started
from, ``param`` the number after the colon (or None) and ``rng`` a ``numpy.random.Generator``
derived from (seed, round, attempt). Updates are states minus ``reference``, computed in float64;
the states come back in float32. Where the round has no honest update (all failed), an attacker
knows only its own clients' updates and uses those. ``smartfed.federated.faults.FaultInjectingGrid``
calls them on the replies before the strategy sees any; the config names them
(``smartfed.config.ATTACK_PARAMS``, held to these names by a test).

- ``sign_flip`` (param c): every Byzantine update is -c times the honest mean update.
- ``inner_product`` (param scale): inner-product manipulation (Xie, Koyejo and Gupta, "Fall of
  empires", UAI 2019): minus the honest mean direction, scaled to ``scale`` times the lower median
  honest update norm, so that it stays under a norm bound set by the honest clients.
- ``free_ride``: no update at all (the reference sent back), while still claiming its examples.
- ``collude``: every Byzantine client sends the one update of "A little is enough" (Baruch,
  Baruch and Goldberg, NeurIPS 2019): the honest mean minus ``z`` honest standard deviations per
  coordinate; without param, the paper's largest ``z`` that a majority-based aggregator still
  takes for honest: ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f`` for ``n`` clients
  of which ``f`` are Byzantine.

The attacks are deterministic; ``rng`` is there for attacks that draw.
"""

import statistics
from collections.abc import Callable

import numpy as np
import torch

from smartfed.federated.robust import lower_median, update_norm


def _updates(states, reference):
    return {c: {name: state[name].double() - tensor.double() for name, tensor in reference.items()}
            for c, state in states.items()}


def _mean(updates):
    count = len(updates)
    names = next(iter(updates.values()))
    return {name: sum(update[name] for update in updates.values()) / count for name in names}


def _norm(update):
    return float(sum(tensor.pow(2).sum() for tensor in update.values())) ** 0.5


def _apply(update, reference, clients):
    """The state ``reference + update`` (float32), uploaded by each of ``clients``."""
    state = {name: (tensor.double() + update[name]).float() for name, tensor in reference.items()}
    return {c: {name: tensor.clone() for name, tensor in state.items()} for c in clients}


def _known(byzantine, honest):
    # What the attacker can see: every honest update, or its own clients' when there is none.
    return honest if honest else byzantine


def _positive(param, name):
    if param is None or not (isinstance(param, (int, float)) and np.isfinite(param) and param > 0):
        raise ValueError(f"attack {name!r} needs a finite parameter > 0 (written {name}:<value>), got {param!r}")
    return float(param)


def sign_flip(byzantine, honest, reference, param, rng):
    scale = -_positive(param, "sign_flip")
    mean = _mean(_updates(_known(byzantine, honest), reference))
    return _apply({name: scale * tensor for name, tensor in mean.items()}, reference, byzantine)


def inner_product(byzantine, honest, reference, param, rng):
    scale = _positive(param, "inner_product")
    known = _known(byzantine, honest)
    mean = _mean(_updates(known, reference))
    length = _norm(mean)
    target = scale * lower_median([update_norm(state, reference) for state in known.values()])
    factor = -target / length if length > 0 else 0.0
    return _apply({name: factor * tensor for name, tensor in mean.items()}, reference, byzantine)


def free_ride(byzantine, honest, reference, param, rng):
    if param is not None:
        raise ValueError(f"attack 'free_ride' takes no parameter, got {param!r}")
    return _apply({name: torch.zeros_like(tensor, dtype=torch.float64) for name, tensor in reference.items()},
                  reference, byzantine)


def alie_z(num_clients, num_byzantine):
    """Baruch et al.'s largest z for ``num_clients`` clients of which ``num_byzantine`` attack:
    the Byzantine value must still sit among the ``n - s`` clients a majority-based rule keeps."""
    supporters = num_clients // 2 + 1 - num_byzantine
    if supporters < 1:
        raise ValueError(f"attack 'collude' without a parameter needs fewer than half of the clients Byzantine "
                         f"(got {num_byzantine} of {num_clients}); write collude:<z>")
    return statistics.NormalDist().inv_cdf((num_clients - supporters) / num_clients)


def collude(byzantine, honest, reference, param, rng):
    z = alie_z(len(byzantine) + len(honest), len(byzantine)) if param is None else _positive(param, "collude")
    updates = _updates(_known(byzantine, honest), reference)
    mean = _mean(updates)
    update = {}
    for name, centre in mean.items():
        stacked = torch.stack([u[name] for u in updates.values()])
        update[name] = centre - z * stacked.std(dim=0, correction=0)
    return _apply(update, reference, byzantine)


ATTACKS: dict[str, Callable] = {
    "sign_flip": sign_flip, "inner_product": inner_product, "free_ride": free_ride, "collude": collude,
}
