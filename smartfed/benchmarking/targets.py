"""The kernel targets of docs/design.md §8, as checks on a finished benchmark table.

Each target names the device type, dtype, provider, mode and shapes it applies to, and a
comparison against another provider timed in the same run.
"""

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Target:
    label: str
    device_type: str
    dtype: str
    provider: str
    modes: tuple
    applies: Callable  # Shape -> bool
    against: str       # provider timed in the same run
    bound: float       # provider_time / against_time must be <= bound

    def verdict(self, ratio: float) -> dict:
        return {"target": self.label, "against": self.against, "bound": self.bound, "ratio": round(ratio, 3),
                "met": ratio <= self.bound}


def _is(d, tokens, experts=64, top_k=8):
    return lambda s: s.d_in == d and s.d_out == d and s.tokens in tokens and s.experts == experts and s.top_k == top_k


TARGETS = (
    Target("fwd <= 1.40x linear", "cpu", "fp32", "more-torch", ("fwd",), _is(576, (2048,)), "linear", 1.40),
    Target("fwd <= 1.15x linear", "cpu", "fp32", "more-torch", ("fwd",), _is(2048, (2048,)), "linear", 1.15),
    Target("fwd <= 1.40x linear", "cpu", "fp32", "more-layer", ("fwd",), _is(576, (2048,)), "linear", 1.40),
    Target("fwd <= 1.15x linear", "cpu", "fp32", "more-layer", ("fwd",), _is(2048, (2048,)), "linear", 1.15),
    Target("decode <= 1.5x linear", "cpu", "fp32", "more-layer", ("fwd",), _is(576, (1,)), "linear", 1.5),
    Target("decode <= 1.3x linear", "cpu", "fp32", "more-layer", ("fwd",), _is(2048, (1,)), "linear", 1.3),
    Target("per call <= 3x linear", "cpu", "fp32", "more-layer", ("fwd",), _is(64, (1,), experts=16), "linear", 3.0),
    Target("large pool <= dense-masked", "cpu", "fp32", "more-torch", ("fwd",), _is(576, (2048,), experts=256),
           "dense-masked", 1.0),
    Target("large pool <= dense-masked", "cpu", "fp32", "more-layer", ("fwd",), _is(576, (2048,), experts=256),
           "dense-masked", 1.0),
    Target("fwd+bwd <= 2x linear", "cpu", "fp32", "more-torch", ("full",),
           lambda s: _is(576, (2048,))(s) or _is(2048, (2048,))(s), "linear", 2.0),
    Target("fwd+bwd <= 2x linear", "cpu", "fp32", "more-layer", ("full",),
           lambda s: _is(576, (2048,))(s) or _is(2048, (2048,))(s), "linear", 2.0),
    Target("fwd <= 1.10x linear", "cuda", "bf16", "more-triton", ("fwd",), _is(4096, (4096,)), "linear", 1.10),
    Target("fwd+bwd <= 1.25x linear", "cuda", "bf16", "more-triton", ("full",), _is(4096, (4096,)), "linear", 1.25),
    Target("decode <= 1.5x linear", "cuda", "bf16", "more-triton", ("fwd",),
           _is(4096, tuple(range(1, 17))), "linear", 1.5),
    Target(">= 4x faster than reference", "cuda", "bf16", "more-triton", ("fwd", "bwd", "full"),
           _is(4096, (4096,)), "more-reference", 0.25),
    Target("never slower than peft LoRA", "cuda", "bf16", "more-triton", ("fwd", "bwd", "full"),
           lambda s: True, "peft-lora", 1.0),
)


def evaluate(device_type, dtype, provider, mode, shape, ratio_to):
    """Verdicts of every target that applies to one timed row.

    ``ratio_to(other)`` is the row's median time ratio to another provider of the same run
    (None when that provider was not timed).
    """
    verdicts = []
    for target in TARGETS:
        if (target.device_type, target.dtype, target.provider) != (device_type, dtype, provider):
            continue
        if mode not in target.modes or not target.applies(shape):
            continue
        ratio = ratio_to(target.against)
        if ratio is not None:
            verdicts.append(target.verdict(ratio))
    return verdicts
