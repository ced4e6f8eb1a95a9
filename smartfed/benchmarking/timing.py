"""Side-by-side timing: providers interleaved round by round, medians, ratios within a round.

Interleaving means a burst of load from elsewhere hits every provider of a round alike, and a
ratio taken inside each round before the median cancels most of it. On CUDA each sample is
``triton.testing.do_bench`` (its own warm-up, L2 flush and median); on CPU each sample times
enough back-to-back calls to last ``min_sample_s``.
"""

import math
import statistics
import time


def _seconds(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def time_cpu(fns: dict, budget_s: float, min_rounds: int, max_rounds: int, min_sample_s: float = 2e-3) -> dict:
    """Seconds per call of each callable, one sample per round: name -> list of floats."""
    calls = {}
    for name, fn in fns.items():
        fn()
        calls[name] = max(1, math.ceil(min_sample_s / max(_seconds(fn, 3), 1e-9)))
    round_s = sum(_seconds(fn, calls[name]) * calls[name] for name, fn in fns.items())
    rounds = min(max_rounds, max(min_rounds, int(budget_s / max(round_s, 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, calls[name]))
    return samples


def time_cuda(fns: dict, rounds: int, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """Seconds per call on CUDA via triton.testing.do_bench, ``rounds`` interleaved samples each."""
    from triton.testing import do_bench

    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3)
    return samples


def summarize(samples: dict, baseline: str) -> dict:
    """name -> {"median_ms", "ratio" (median over rounds of time / baseline time, or None), "samples"}."""
    return {name: {"median_ms": statistics.median(values) * 1e3, "ratio": median_ratio(samples, name, baseline),
                   "samples": len(values)} for name, values in samples.items()}


def median_ratio(samples: dict, name: str, other: str):
    """Median over rounds of name's time / other's time (None if either was not timed)."""
    if name not in samples or other not in samples:
        return None
    return statistics.median(v / o for v, o in zip(samples[name], samples[other]))
