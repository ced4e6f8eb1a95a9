"""95% intervals and paired tests over per-item results, for ``smartfed report``.

A method's results on one task are a matrix ``scores[seed, item]`` (0/1 correctness, or a score in
[0, 1] such as ROUGE-L), every seed scored on the same test items. Two sources of noise are in it:
which items the test happens to hold, and the training run (client split, sampling and
initialisation vary by seed). ``bootstrap_interval`` resamples both: each resample draws the seeds
with replacement and, independently, the items with replacement, and takes the mean of the
drawn cells; the interval is the percentile interval of those means. With one seed it is the
ordinary bootstrap over items (the run's training noise is then not in the interval).

``paired_difference`` compares a method with a reference (FedIT) on the same seeds and items: the
per-cell differences ``method - reference`` are bootstrapped the same way (a paired bootstrap:
both methods are resampled together), and a sign-flip permutation test gives a two-sided
p-value (under the null hypothesis the method's and the reference's result of each cell are
exchangeable, so each difference is as likely to have either sign). The verdict reads only the
interval: "better" or "worse" when it excludes zero, otherwise "no conclusion".
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
PERMUTATIONS = 10_000
NO_CONCLUSION = "no conclusion"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    seeds: int
    items: int
    level: float = LEVEL

    def as_dict(self):
        return asdict(self)

    def excludes_zero(self):
        return self.low > 0 or self.high < 0

    def text(self, digits=3):
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Paired:
    difference: Interval  # method minus reference
    p_value: float
    verdict: str  # "better", "worse" or NO_CONCLUSION

    def as_dict(self):
        return {"difference": self.difference.as_dict(), "p_value": self.p_value, "verdict": self.verdict}


def score_matrix(scores, name="scores"):
    """``scores`` as a float array [seeds, items] (a 1-D sequence is one seed); a ValueError
    naming ``name`` for anything else."""
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"{name} must be [seeds, items] with at least one of each, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} holds non-finite values")
    return matrix


def _check_options(resamples, level):
    if not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")


def _resampled_means(matrix, resamples, rng):
    """Means of ``resamples`` two-stage resamples (seeds, then items, each with replacement)."""
    seeds, items = matrix.shape
    means = np.empty(resamples)
    # In chunks: the item counts of a chunk are [chunk, items].
    chunk = max(1, min(resamples, 2_000_000 // max(items, 1)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        seed_counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=size) if seeds > 1 else np.ones((size, 1))
        item_counts = rng.multinomial(items, np.full(items, 1 / items), size=size)
        means[start:start + size] = np.einsum("rs,si,ri->r", seed_counts, matrix, item_counts) / (seeds * items)
    return means


def bootstrap_interval(scores, *, resamples=RESAMPLES, level=LEVEL, seed=0) -> Interval:
    """Mean of ``scores`` [seeds, items] and its percentile bootstrap interval over seeds and items."""
    matrix = score_matrix(scores)
    _check_options(resamples, level)
    means = _resampled_means(matrix, resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(mean=float(matrix.mean()), low=float(low), high=float(high), seeds=matrix.shape[0],
                    items=matrix.shape[1], level=level)


def sign_flip_p_value(differences, *, permutations=PERMUTATIONS, seed=0):
    """Two-sided p-value of the mean of ``differences`` [seeds, items] under random sign flips
    of every cell ((1 + as extreme) / (1 + permutations), so never 0)."""
    matrix = score_matrix(differences, "differences")
    if not isinstance(permutations, int) or permutations < 100:
        raise ValueError(f"permutations must be an int >= 100, got {permutations!r}")
    values = matrix.ravel()
    observed = abs(values.mean())
    rng = np.random.default_rng(seed)
    extreme = 0
    chunk = max(1, 2_000_000 // values.size)
    for start in range(0, permutations, chunk):
        size = min(chunk, permutations - start)
        signs = rng.integers(0, 2, size=(size, values.size)) * 2 - 1
        # A tolerance for float sums: a flip that reproduces the observed mean counts as extreme.
        extreme += int((np.abs(signs @ values) / values.size >= observed - 1e-12).sum())
    return (1 + extreme) / (1 + permutations)


def paired_difference(method, reference, *, resamples=RESAMPLES, permutations=PERMUTATIONS, level=LEVEL,
                      seed=0) -> Paired:
    """``method`` against ``reference`` (both [seeds, items], the same seeds and items in the same
    order): the mean difference with its paired bootstrap interval, the sign-flip p-value, and
    the verdict the interval supports."""
    first, second = score_matrix(method, "method"), score_matrix(reference, "reference")
    if first.shape != second.shape:
        raise ValueError(f"method and reference must be scored on the same seeds and items, got shapes "
                         f"{first.shape} and {second.shape}")
    difference = bootstrap_interval(first - second, resamples=resamples, level=level, seed=seed)
    p_value = sign_flip_p_value(first - second, permutations=permutations, seed=seed)
    verdict = NO_CONCLUSION if not difference.excludes_zero() else ("better" if difference.low > 0 else "worse")
    return Paired(difference=difference, p_value=p_value, verdict=verdict)


def normal_half_width(proportion, items, level=LEVEL):
    """Half-width of the normal-approximation interval of a proportion over ``items`` items
    (what the bootstrap over items of 0/1 results should approach)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    return z * math.sqrt(proportion * (1 - proportion) / items)


def unpaired_difference(proportion, items, reference, reference_items, level=LEVEL) -> Interval:
    """``proportion - reference`` of two accuracies over ``items`` and ``reference_items`` items,
    with the normal-approximation interval of a difference of independent proportions. Where the
    per-item results of one side are not kept (a round before the last), this is the interval
    that can be had; on the same items it is wider than the paired one, so it errs towards "no
    conclusion"."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    spread = math.sqrt(proportion * (1 - proportion) / items + reference * (1 - reference) / reference_items)
    difference = proportion - reference
    return Interval(mean=difference, low=difference - z * spread, high=difference + z * spread, seeds=1,
                    items=min(items, reference_items), level=level)
