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
All values are computed on detached tensors under ``no_grad`` (float32 results; the cosine's
row dot products in float64), without full-size temporaries; sums stay on the layer's device
until read, so tracking never forces a device synchronisation. Padded positions are no tokens:
see ``ImportanceTracker``.
"""

import inspect
import math
from collections.abc import Mapping

import torch

from smartfed.choices import ESTIMATORS


# Bound on the float64 buffer of one block of the cosine estimator. Under it a call is one block,
# so its few ops run once: on a shared CPU every op's parallel region costs, whatever its size.
# The buffer (16 bytes per element) is below the five float32 temporaries of the form it replaced.
_BLOCK_BYTES = 2 ** 24


def _rows(tensor):
    return tensor.detach().reshape(-1, tensor.shape[-1])


def _row_norms(tensor):
    """Euclidean norm of each row [T], a fused reduction: float32 for float32 and narrower
    inputs, float64 for float64 ones."""
    rows = _rows(tensor)
    if rows.dtype == torch.float64:
        return torch.linalg.vector_norm(rows, dim=-1)
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)


def _check_pair(first_name, first, second_name, second):
    if first.shape != second.shape:
        raise ValueError(f"{first_name} and {second_name} must have the same shape, "
                         f"got {tuple(first.shape)} and {tuple(second.shape)}")


def _row_grams(y0, delta, scale):
    """Per-row Gram matrices [T, 2, 2] (float64) of ``(y0, scale * delta)``.

    Blocks of rows (as few as ``_BLOCK_BYTES`` allows, evenly split) are copied into one float64
    buffer, exact for float32 and narrower data, and multiplied by their own transpose: the
    products are exact and only the sums round, in float64."""
    base, contribution = _rows(y0), _rows(delta)
    tokens, width = base.shape
    grams = torch.empty(tokens, 2, 2, dtype=torch.float64, device=base.device)
    blocks = max(1, -(-tokens * width * 16 // _BLOCK_BYTES))
    step = max(1, -(-tokens // blocks))
    with torch.no_grad():
        for start in range(0, tokens, step):
            stop = min(start + step, tokens)
            block = torch.empty(stop - start, 2, width, dtype=torch.float64, device=base.device)
            block[:, 0].copy_(base[start:stop])
            block[:, 1].copy_(contribution[start:stop])
            torch.bmm(block, block.transpose(1, 2), out=grams[start:stop])
    if scale != 1:
        grams[:, 0, 1].mul_(scale)
        grams[:, 1, 1].mul_(scale * scale)
    return grams


def cosine_importance(y0, delta, *, scale=1.0):
    """Per-token ``1 - cos(y0, y0 + scale * delta)`` [T] in float32, without forming the sum in
    float32 or any full-size temporary.

    With ``b = y0``, ``d = scale * delta``, ``o = b + d`` and the row dot products ``b.b``,
    ``b.d``, ``d.d`` taken in float64 (exact products of the float32 inputs),
    ``1 - cos = (|b|^2 |d|^2 - (b.d)^2) / (n (n + b.o))`` with ``n = |b| |o|`` where ``b.o > 0``,
    and ``1 - b.o / n`` otherwise (``b.o = b.b + b.d``, ``o.o = b.b + 2 b.d + d.d``): the
    numerator is the squared area spanned by b and d (Lagrange's identity), so a small or nearly
    parallel contribution never leaves ``1 - cos`` to a float32 cancellation. Precision: within
    2^-24 relative (the final rounding to float32) plus an absolute ``~1e-15 (|d| / |o|)^2`` from
    the float64 sums, for outputs not cancelled below ``1e-4 |y0|`` -- below the
    ``~6e-8 * angle`` of the float32 unit-vector difference ``||u - v||^2 / 2`` it replaces, for
    any angle above 1e-7. A zero vector's unit vector is zero, as in that form: a token with one
    of ``y0``, ``y0 + delta`` zero scores 0.5, with both zero 0."""
    _check_pair("y0", y0, "delta", delta)
    grams = _row_grams(y0, delta, float(scale))
    base_sq, base_delta, delta_sq = grams[:, 0, 0], grams[:, 0, 1], grams[:, 1, 1]
    base_out = base_sq + base_delta
    out_sq = (base_out + base_delta + delta_sq).clamp_min(0)
    norms = (base_sq * out_sq).sqrt()
    area = (base_sq * delta_sq - base_delta * base_delta).clamp_min(0)
    turned = torch.where(base_out > 0, area / (norms * (norms + base_out)), 1 - base_out / norms)
    one_zero = 0.5 * ((base_sq > 0).double() + (out_sq > 0).double())
    return torch.where(norms > 0, turned, one_zero).float()


def magnitude_importance(y0, delta, *, scale=1.0):
    """Per-token ``||scale * delta|| / ||y0||`` [T] (a zero ``y0`` counts as the smallest float)."""
    _check_pair("y0", y0, "delta", delta)
    tiny = torch.finfo(torch.float32).tiny
    return (_row_norms(delta).mul_(abs(float(scale))) / _row_norms(y0).clamp_min(tiny)).float()


def gradient_importance(grad_output, delta, *, scale=1.0):
    """Per-token ``|gy . scale * delta|`` [T] (the dot product as a batched matrix product, no
    elementwise temporary)."""
    _check_pair("grad_output", grad_output, "delta", delta)
    rows, values = _rows(grad_output).float(), _rows(delta).float()
    dots = torch.bmm(rows.unsqueeze(1), values.unsqueeze(2)).view(-1)
    return dots.abs_().mul_(abs(float(scale)))


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

    Padding is not a token: when ``model`` is called with a 2-D ``attention_mask`` [B, S] (as
    the examples of ``smartfed.federated.data`` call it), only the tokens it marks count, in sums
    and counts alike. A layer sees the last positions of the mask's rows (its input is [B, S'],
    S' <= S, as with ``logits_to_keep`` or a KV cache); any other token layout is an error while a
    mask is given. A call without a 2-D mask counts every token.
    """

    def __init__(self, model, estimator="cosine", *, per_expert=False):
        from smartfed.inject import more_layers

        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if not isinstance(per_expert, bool):
            raise TypeError(f"per_expert: expected a bool, got {type(per_expert).__name__}")
        self.estimator = estimator
        self.per_expert = per_expert
        self.model = model
        self.layers = more_layers(model)
        if not self.layers:
            raise ValueError("model has no MoRE layers to track: call smartfed.inject_more first")
        self._mask_position = _parameter_position(model, "attention_mask")
        self._mask = None
        self._kept = {}
        self._handles = []
        self.reset()

    def reset(self):
        self._sums = {name: None for name in self.layers}
        self._counts = {name: 0 for name in self.layers}

    def attach(self):
        if self._handles:
            raise RuntimeError("ImportanceTracker is already attached")
        self._handles = [
            self.model.register_forward_pre_hook(self._take_mask, with_kwargs=True),
            self.model.register_forward_hook(self._drop_mask, always_call=True),
        ] + [layer.add_observer(self._observer(name)) for name, layer in self.layers.items()]
        return self

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._drop_mask()

    @property
    def attached(self):
        return bool(self._handles)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc_info):
        self.detach()

    def _take_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._kept = {}

    def _drop_mask(self, *unused):
        self._mask, self._kept = None, {}

    def _kept_tokens(self, x):
        """(keep [T] bool, its count) for a layer input ``x`` under the model call's mask, or
        None when every token counts. Computed once per token layout and model call."""
        mask = self._mask
        if mask is None:
            return None
        lead = tuple(x.shape[:-1])
        if lead not in self._kept:
            if len(lead) != 2 or lead[0] != mask.shape[0] or lead[1] > mask.shape[1]:
                raise ValueError(
                    f"attention_mask of shape {tuple(mask.shape)} does not line up with the tokens "
                    f"{lead} a MoRE layer sees: expected [batch, positions <= {mask.shape[1]}]")
            keep = (mask[:, mask.shape[1] - lead[1]:] != 0).reshape(-1)
            count = keep.sum()
            self._kept[lead] = keep, (int(count) if count.device.type == "cpu" else count)
        return self._kept[lead]

    def _accumulate(self, name, values, kept):
        if kept is None:
            total, count = values.sum(dtype=torch.float64), values.numel()
        else:
            keep, count = kept
            total = torch.where(keep.to(values.device), values, 0).sum(dtype=torch.float64)
        previous = self._sums[name]
        self._sums[name] = total if previous is None else previous + total
        self._counts[name] = self._counts[name] + count

    def _scale(self, layer):
        """What delta is measured in: 1 / gamma with ``per_expert``, applied to the statistic
        rather than to a full-size copy of delta."""
        if not self.per_expert:
            return 1.0
        return 1.0 / (layer.top_k if layer.gamma is None else layer.gamma)

    def _observer(self, name):
        if self.estimator == "gradient":
            def observe(layer, x, y0, delta):
                if not delta.requires_grad:
                    return
                kept, scale, contribution = self._kept_tokens(x), self._scale(layer), delta.detach()

                def on_grad(grad_output):
                    if self.attached:
                        with torch.no_grad():
                            values = gradient_importance(grad_output, contribution, scale=scale)
                            self._accumulate(name, values, kept)

                delta.register_hook(on_grad)
            return observe

        estimate = cosine_importance if self.estimator == "cosine" else magnitude_importance

        def observe(layer, x, y0, delta):
            with torch.no_grad():
                self._accumulate(name, estimate(y0, delta, scale=self._scale(layer)), self._kept_tokens(x))
        return observe

    def stats(self):
        """The statistics so far as plain floats and ints (one device synchronisation)."""
        sums = {
            name: 0.0 if total is None else float(total.item()) for name, total in self._sums.items()
        }
        counts = {name: int(count) for name, count in self._counts.items()}
        return ImportanceStats(self.estimator, sums, counts)

    def importance(self):
        """{module_name: I_m} from the tokens seen since the last reset."""
        return self.stats().mean()


def _parameter_position(module, name):
    """The position of ``module.forward``'s parameter ``name`` when it can be passed positionally
    (None otherwise)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for position, parameter in enumerate(parameters):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return None
        if parameter.name == name:
            return position
    return None
