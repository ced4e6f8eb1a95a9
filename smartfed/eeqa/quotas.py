"""Expert quotas: how many experts (k) each adapted matrix may activate (docs/design.md §5.2).

Given importances ``I_m`` and a total budget ``K``, the quota of matrix m is

    t_m = clip(c * I_m^tau, k_min, N_m)       with c chosen so that sum_m t_m = K

(water-filling: ``c`` is found exactly on the piecewise-linear, nondecreasing sum), then rounded by
largest remainder so the integers sum exactly to ``K``. Clipping first and rounding second keeps
both the bounds and the exact sum; ``round(K * I_m^tau / sum I^tau)`` followed by a clip would lose
one or the other. Remainder ties go to the more important matrix, then to the lower name, so
identical inputs always give identical quotas and more importance never gets fewer experts
(for matrices with the same bounds).
"""

import math
from collections.abc import Iterable, Mapping

import numpy as np

# Real quotas this close to an integer are that integer: the water level is found in floating
# point, and 2.9999999999 must not lose its expert to the remainder ordering.
_SNAP = 1e-9
# Weights (importance / max importance, to the power tau) below this count as zero: they could not
# move a quota by one expert at any realistic budget, and their reciprocals would overflow.
_NEGLIGIBLE_WEIGHT = 1e-12


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_importance(importance):
    if not isinstance(importance, Mapping) or not importance:
        raise ValueError("importance must be a non-empty mapping module_name -> float")
    names = sorted(importance)
    values = []
    for name in names:
        value = float(importance[name])
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"importance must be finite and >= 0 for every module, got {value} for {name!r}"
            )
        values.append(value)
    return names, np.asarray(values, dtype=np.float64)


def _check_bounds(names, max_per_matrix, k_min):
    if not isinstance(max_per_matrix, Mapping):
        raise TypeError("max_per_matrix must be a mapping module_name -> int (the pool's N per matrix)")
    missing = sorted(set(names) - set(max_per_matrix))
    extra = sorted(set(max_per_matrix) - set(names))
    if missing or extra:
        raise ValueError(
            "max_per_matrix must name exactly the modules of importance: "
            f"missing {missing}, extra {extra}"
        )
    upper = np.asarray(
        [_check_int(f"max_per_matrix[{name!r}]", max_per_matrix[name], 1) for name in names],
        dtype=np.float64,
    )
    too_small = [name for name, hi in zip(names, upper) if hi < k_min]
    if too_small:
        raise ValueError(
            f"k_min={k_min} exceeds max_per_matrix (the number of experts) of {too_small}"
        )
    return upper


def _check_budget(total_budget, k_min, upper):
    total_budget = _check_int("total_budget", total_budget, 1)
    lowest, highest = k_min * len(upper), int(upper.sum())
    if not lowest <= total_budget <= highest:
        raise ValueError(
            f"total_budget={total_budget} is infeasible for {len(upper)} matrices: it must lie in "
            f"[k_min * matrices, sum of max_per_matrix] = [{lowest}, {highest}]"
        )
    return total_budget


def _water_level(weights, lower, upper, total):
    """Real quotas ``clip(c * w, lower, upper)`` summing to ``total`` (w > 0 everywhere).

    The sum is piecewise linear and nondecreasing in c with breakpoints at lower/w and upper/w;
    find the segment that contains ``total`` and solve it linearly.
    """
    breakpoints = np.unique(np.concatenate([lower / weights, upper / weights]))
    sums = np.clip(np.outer(breakpoints, weights), lower, upper).sum(axis=1)
    segment = int(np.searchsorted(sums, total, side="left"))
    if segment == 0:
        return lower.copy()
    if segment == len(breakpoints):
        return upper.copy()
    c_lo, c_hi = breakpoints[segment - 1], breakpoints[segment]
    s_lo, s_hi = sums[segment - 1], sums[segment]
    level = c_lo + (c_hi - c_lo) * (total - s_lo) / (s_hi - s_lo)
    return np.clip(level * weights, lower, upper)


def _real_quotas(weights, lower, upper, total):
    """Water-filling over the weighted matrices; matrices with zero weight stay at ``lower``
    unless the weighted ones are all full, and then share what is left uniformly."""
    quotas = lower.copy()
    weighted = weights > _NEGLIGIBLE_WEIGHT
    if not weighted.any():
        return _water_level(np.ones_like(weights), lower, upper, total)
    capacity = upper[weighted].sum() + lower[~weighted].sum()
    if total <= capacity:
        rest = lower[~weighted].sum()
        quotas[weighted] = _water_level(weights[weighted], lower[weighted], upper[weighted], total - rest)
        return quotas
    quotas[weighted] = upper[weighted]
    quotas[~weighted] = _water_level(
        np.ones(int((~weighted).sum())), lower[~weighted], upper[~weighted], total - upper[weighted].sum()
    )
    return quotas


def _largest_remainder(names, real, values, upper, total):
    nearest = np.round(real)
    real = np.where(np.abs(real - nearest) < _SNAP, nearest, real)
    quotas = np.floor(real).astype(np.int64)
    remainder = total - int(quotas.sum())
    fractions = real - quotas
    order = sorted(
        (i for i in range(len(names)) if quotas[i] < upper[i]),
        key=lambda i: (-fractions[i], -values[i], names[i]),
    )
    for i in order[:remainder]:
        quotas[i] += 1
    return {name: int(k) for name, k in zip(names, quotas)}


def allocate_quotas(importance, total_budget, *, k_min=1, tau=1.0, max_per_matrix):
    """Quotas {module_name: k} proportional to ``importance ** tau``, each in
    ``[k_min, max_per_matrix[m]]``, summing exactly to ``total_budget``.

    All-zero importance gives the uniform allocation; ``tau=0`` does too. Importances are
    divided by their maximum first, so their scale never matters (nor overflows ``** tau``).
    """
    names, values = _check_importance(importance)
    k_min = _check_int("k_min", k_min, 1)
    tau = float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    upper = _check_bounds(names, max_per_matrix, k_min)
    total_budget = _check_budget(total_budget, k_min, upper)
    peak = values.max()
    weights = (values / peak) ** tau if peak > 0 else np.ones_like(values)
    lower = np.full(len(names), float(k_min))
    real = _real_quotas(weights, lower, upper, float(total_budget))
    return _largest_remainder(names, real, values, upper, total_budget)


def uniform_quotas(modules, total_budget, *, k_min=1, max_per_matrix):
    """The same total spread evenly over ``modules`` (ablation against importance-driven quotas);
    the remainder goes to the lower names."""
    if isinstance(modules, str) or not isinstance(modules, Iterable):
        raise TypeError("modules must be an iterable of module names")
    names = list(modules)
    if len(set(names)) != len(names):
        raise ValueError(f"modules must not repeat a name, got {sorted(names)}")
    return allocate_quotas(
        {name: 1.0 for name in names}, total_budget, k_min=k_min, max_per_matrix=max_per_matrix
    )


def client_budget(total_budget, budget_fraction, num_matrices, *, k_min=1):
    """A client's share ``round(budget_fraction * total_budget)`` (halves round up) of the budget,
    checked to leave every one of its ``num_matrices`` matrices at least ``k_min`` experts."""
    total_budget = _check_int("total_budget", total_budget, 1)
    num_matrices = _check_int("num_matrices", num_matrices, 1)
    fraction = float(budget_fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"budget_fraction must lie in (0, 1], got {budget_fraction}")
    budget = math.floor(fraction * total_budget + 0.5)
    if budget < k_min * num_matrices:
        raise ValueError(
            f"budget_fraction={budget_fraction} gives a budget of {budget} experts, below "
            f"k_min * matrices = {k_min} * {num_matrices} = {k_min * num_matrices}"
        )
    return budget


def client_quotas(importance, total_budget, budget_fraction, *, k_min=1, tau=1.0, max_per_matrix):
    """Quotas of a client holding ``budget_fraction`` of the compute: the same allocation rule
    applied to its budget ``round(budget_fraction * total_budget)``."""
    budget = client_budget(total_budget, budget_fraction, len(importance), k_min=k_min)
    return allocate_quotas(importance, budget, k_min=k_min, tau=tau, max_per_matrix=max_per_matrix)


def apply_quotas(model, quotas):
    """Set each MoRE layer's ``top_k`` to its quota, in place and without rebuilding anything.

    ``quotas`` must name exactly the model's MoRE layers (``smartfed.more_layers``).
    """
    from smartfed.inject import more_layers

    layers = more_layers(model)
    missing = sorted(set(layers) - set(quotas))
    extra = sorted(set(quotas) - set(layers))
    if missing or extra:
        raise ValueError(
            f"quotas must name exactly the model's MoRE layers: missing {missing}, extra {extra}"
        )
    for name, layer in layers.items():
        k = _check_int(f"quotas[{name!r}]", quotas[name], 1)
        if k > layer.num_experts:
            raise ValueError(
                f"quotas[{name!r}]={k} exceeds that layer's number of experts {layer.num_experts}"
            )
    for name, layer in layers.items():
        layer.top_k = int(quotas[name])
    return model

