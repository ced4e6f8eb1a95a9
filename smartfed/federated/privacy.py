"""Central differential privacy of the router updates (``privacy.dp``), the math of Flower's
``DifferentialPrivacyServerSideFixedClipping``: each update (client state minus global state) is
clipped to ``clipping_norm`` C (Flower's ``compute_clip_model_update``), the clipped states are
averaged with EQUAL weights and Gaussian noise of standard deviation ``noise_multiplier * C / n``
(Flower's ``compute_stdv``, n the clients aggregated) is added to every value.

Why not the wrapper itself: it wraps a message-API strategy whose ``configure_train`` it calls,
draws its noise from numpy's global generator (which a checkpoint records and restores, so anyone
who knows the run's seed could predict the noise) and weights clients by their example counts
(then one client's sensitivity is its share of the examples, not 1/n). Here the noise comes from
the operating system's entropy, never from the run's seed: a DP run is not bit-identical on resume.

Epsilon: with equal weights one client changes the noised mean by at most C/n, so each round is a
Gaussian mechanism of noise multiplier sigma, Renyi-DP ``alpha / (2 sigma^2)`` at order alpha
(add-or-remove-one neighbours, no credit taken for client sampling); rounds compose additively
and ``epsilon(delta) = min_alpha rdp(alpha) + log(1/delta) / (alpha - 1)`` (Mironov 2017), a
conservative bound. Flower's own RDP accountant needs the optional ``dp-accounting`` package.
"""

import math

import numpy as np
import torch

from smartfed.federated.flower_compat import compute_clip_model_update, compute_stdv

ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 257)))


def gaussian_epsilon(noise_multiplier, releases, delta):
    """Epsilon at ``delta`` after ``releases`` Gaussian mechanisms of ``noise_multiplier``
    (inf without noise)."""
    if noise_multiplier <= 0:
        return math.inf
    if releases == 0:
        return 0.0
    return min(
        releases * alpha / (2 * noise_multiplier ** 2) + math.log(1 / delta) / (alpha - 1) for alpha in ORDERS
    )


def clip_update(state, reference, clipping_norm):
    """``state`` with its update ``state - reference`` clipped to L2 norm ``clipping_norm``."""
    names = sorted(reference)
    arrays = [state[name].double().numpy() for name in names]
    compute_clip_model_update(arrays, [reference[name].double().numpy() for name in names], clipping_norm)
    return {name: torch.from_numpy(np.asarray(array)).float() for name, array in zip(names, arrays)}


class CentralDP:
    """Central DP for one run with ``settings`` (``privacy.dp``); ``releases`` counts the noised
    aggregates so far (restored from the run's history on resume)."""

    def __init__(self, settings, *, releases=0):
        self.settings = settings
        self.releases = releases
        self._rng = np.random.default_rng()

    def aggregate(self, states, reference):
        """The noised equal-weight mean of ``states`` clipped around ``reference``; returns
        (state, record of the parameters for metrics.jsonl)."""
        clipping_norm, multiplier = self.settings.clipping_norm, self.settings.noise_multiplier
        clipped = [clip_update(state, reference, clipping_norm) for state in states]
        stdv = compute_stdv(multiplier, clipping_norm, len(clipped))
        noised = {}
        for name in sorted(reference):
            mean = torch.stack([state[name].double() for state in clipped]).mean(dim=0)
            noise = torch.from_numpy(self._rng.normal(0.0, stdv, size=tuple(mean.shape)))
            noised[name] = (mean + noise).float()
        self.releases += 1
        epsilon = gaussian_epsilon(multiplier, self.releases, self.settings.target_delta)
        record = {
            "mechanism": "central gaussian, server-side fixed clipping, equal weights",
            "clipping_norm": clipping_norm, "noise_multiplier": multiplier, "noise_stdv": stdv,
            "clients": len(clipped), "releases": self.releases, "target_delta": self.settings.target_delta,
            "epsilon": epsilon if math.isfinite(epsilon) else None,
        }
        return noised, record
