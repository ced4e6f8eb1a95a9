"""Importance of each adapted matrix, measured from the MoRE layers' own forward (and backward)
passes (docs/design.md §5.1).

For a token x of matrix m, with ``y0 = W0 x + b0`` and ``delta`` the MoRE contribution:

    cosine     1 - cos(y0, y0 + delta)      how far the experts turn the output (default)
    magnitude  ||delta|| / ||y0||           how far they push it
    gradient   |gy . delta|                 first-order change of the loss if delta were removed,
                                            gy = dL/dy (needs a backward pass)

``I_m`` is the mean over tokens. With ``per_expert=True`` every estimator sees ``delta / gamma``
(the gate-weighted mean of the selected experts' contributions, as ``sum_S g_i = 1``) instead of
``delta``. The mixture scale ``gamma`` defaults to the layer's own quota k, so the plain ``delta``
grows with the quota it is meant to decide: a matrix given more experts then looks more important
and gets more still, and within a few EEQA updates most matrices sit at ``k_min`` while a few
take all N (seen on SmolLM2, docs/experiment.md). Dividing by gamma measures the matrix, not its
quota. Statistics are kept as (sum, token count) per module, so the
server can average clients by adding sums and counts, which weights every client by its tokens.
All values are computed on detached tensors in float32 under ``no_grad``; sums stay on the
layer's device until read, so tracking never forces a device synchronisation.
"""

import math
from collections.abc import Mapping

import torch

from smartfed.choices import ESTIMATORS


def _rows(tensor):
    return tensor.detach().reshape(-1, tensor.shape[-1]).float()


def cosine_importance(y0, delta):
    """Per-token ``1 - cos(y0, y0 + delta)`` [T], computed as ``||u - v||^2 / 2`` on the unit
    vectors, which keeps its precision where ``1 - cos`` would cancel to zero in float32.
    A zero vector's unit vector is zero: a token with ``y0 = delta = 0`` scores 0."""
    base = _rows(y0)
    out = base + _rows(delta)
    tiny = torch.finfo(torch.float32).tiny
    unit_base = base / base.norm(dim=-1, keepdim=True).clamp_min(tiny)
    unit_out = out / out.norm(dim=-1, keepdim=True).clamp_min(tiny)
    return 0.5 * (unit_base - unit_out).pow(2).sum(dim=-1)


def magnitude_importance(y0, delta):
    """Per-token ``||delta|| / ||y0||`` [T] (a zero ``y0`` counts as the smallest float)."""
    tiny = torch.finfo(torch.float32).tiny
    return _rows(delta).norm(dim=-1) / _rows(y0).norm(dim=-1).clamp_min(tiny)


def gradient_importance(grad_output, delta):
    """Per-token ``|gy . delta|`` [T]."""
    return (_rows(grad_output) * _rows(delta)).sum(dim=-1).abs()


class ImportanceStats:
    """Per-module running sums and token counts of one estimator; plain data, mergeable."""

    def __init__(self, estimator, sums, counts):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if set(sums) != set(counts):
            raise ValueError(
                f"sums and counts must name the same modules: {sorted(set(sums) ^ set(counts))} differ"
            )
        self.estimator = estimator
        self.sums = {}
        self.counts = {}
        for name in sorted(sums):
            total, count = float(sums[name]), counts[name]
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"counts[{name!r}] must be an int >= 0, got {count!r}")
            if not math.isfinite(total) or total < 0:
                raise ValueError(f"sums[{name!r}] must be finite and >= 0, got {total}")
            self.sums[name], self.counts[name] = total, count

    def mean(self):
        """{module_name: I_m}; every module must have seen at least one token."""
        unseen = sorted(name for name, count in self.counts.items() if count == 0)
        if unseen:
            raise ValueError(f"no tokens observed for modules {unseen}: run a forward pass first")
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def to_dict(self):
        return {"estimator": self.estimator, "sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, Mapping) or set(data) != {"estimator", "sums", "counts"}:
            found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                "ImportanceStats data must be a mapping with exactly the keys "
                f"'estimator', 'sums', 'counts', got {found}"
            )
        return cls(data["estimator"], data["sums"], data["counts"])

    @classmethod
    def merge(cls, stats):
        """Pool several clients' statistics: sums and counts add, so means weight by tokens."""
        stats = list(stats)
        if not stats:
            raise ValueError("merge needs at least one ImportanceStats")
        first = stats[0]
        for other in stats[1:]:
            if other.estimator != first.estimator:
                raise ValueError(
                    f"cannot merge estimators {first.estimator!r} and {other.estimator!r}"
                )
            if set(other.sums) != set(first.sums):
                raise ValueError(
                    "cannot merge statistics of different modules: "
                    f"{sorted(set(other.sums) ^ set(first.sums))} differ"
                )
        sums = {name: math.fsum(s.sums[name] for s in stats) for name in first.sums}
        counts = {name: sum(s.counts[name] for s in stats) for name in first.counts}
        return cls(first.estimator, sums, counts)

    def __eq__(self, other):
        return isinstance(other, ImportanceStats) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"ImportanceStats({self.estimator!r}, modules={len(self.sums)})"


def ema_importance(previous, current, *, decay):
    """Server-side smoothing ``decay * previous + (1 - decay) * current`` per module;
    ``previous=None`` (the first update) returns ``current``."""
    decay = float(decay)
    if not 0 <= decay < 1:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    if previous is None:
        return dict(current)
    if set(previous) != set(current):
        raise ValueError(
            f"previous and current must name the same modules: {sorted(set(previous) ^ set(current))} differ"
        )
    return {name: decay * previous[name] + (1 - decay) * current[name] for name in sorted(current)}


class ImportanceTracker:
    """Collects an estimator for every MoRE layer of ``model`` while attached.

    Use as a context manager (``with ImportanceTracker(model) as tracker: ...``) or with
    attach()/detach(). While attached, MoRE layers compute the base and expert products
    separately (see ``MoRELinear.add_observer``). The "gradient" estimator records during
    backward passes only, for layers whose expert contribution requires grad (trainable routers).
    """

    def __init__(self, model, estimator="cosine", *, per_expert=False):
        from smartfed.inject import more_layers

        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(per_expert, bool):
            raise TypeError(f"per_expert: expected a bool, got {type(per_expert).__name__}")
        self.estimator = estimator
        self.per_expert = per_expert
        self.layers = more_layers(model)
        if not self.layers:
            raise ValueError("model has no MoRE layers to track: call smartfed.inject_more first")
        self._handles = []
        self.reset()

    def reset(self):
        self._sums = {name: None for name in self.layers}
        self._counts = {name: 0 for name in self.layers}

    def attach(self):
        if self._handles:
            raise RuntimeError("ImportanceTracker is already attached")
        self._handles = [
            layer.add_observer(self._observer(name)) for name, layer in self.layers.items()
        ]
        return self

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self):
        return bool(self._handles)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc_info):
        self.detach()

    def _accumulate(self, name, values):
        total = values.sum(dtype=torch.float64)
        previous = self._sums[name]
        self._sums[name] = total if previous is None else previous + total
        self._counts[name] += values.numel()

    def _measured(self, layer, delta):
        if not self.per_expert:
            return delta
        gamma = layer.top_k if layer.gamma is None else layer.gamma
        return delta / gamma

    def _observer(self, name):
        if self.estimator == "gradient":
            def observe(layer, x, y0, delta):
                if not delta.requires_grad:
                    return
                kept = self._measured(layer, delta.detach())

                def on_grad(grad_output):
                    if self.attached:
                        with torch.no_grad():
                            self._accumulate(name, gradient_importance(grad_output, kept))

                delta.register_hook(on_grad)
            return observe

        estimate = cosine_importance if self.estimator == "cosine" else magnitude_importance

        def observe(layer, x, y0, delta):
            with torch.no_grad():
                self._accumulate(name, estimate(y0, self._measured(layer, delta)))
        return observe

    def stats(self):
        """The statistics so far as plain floats and ints (one device synchronisation)."""
        sums = {
            name: 0.0 if total is None else float(total.item()) for name, total in self._sums.items()
        }
        return ImportanceStats(self.estimator, sums, dict(self._counts))

    def importance(self):
        """{module_name: I_m} from the tokens seen since the last reset."""
        return self.stats().mean()
