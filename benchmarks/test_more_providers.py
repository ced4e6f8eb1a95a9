"""Every MoRE provider on the docs/design.md §8 shapes of this machine, grouped per shape and mode.

The same providers and cases as `smartfed bench` (smartfed.benchmarking.providers), timed by
pytest-benchmark; compare within a group (`--benchmark-group-by=group`, the default here).
"""

import pytest
import torch

from smartfed.benchmarking.providers import PROVIDERS, make_case, timed_call
from smartfed.benchmarking.shapes import parse_shapes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = parse_shapes(["llama7b:T4096:N64:k8", "llama7b:T16:N64:k8"] if CUDA
                      else ["smollm2:T2048:N64:k8", "2048:T2048:N64:k8", "smollm2:T1,16:N64:k8", "64x64:T1:N16:k8"])
PROVIDER_NAMES = (["linear", "peft-lora", "more-reference", "more-torch"] + (["more-triton"] if CUDA else [])
                  + ["more-layer", "dense-masked"])


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.label.replace(" ", "-") for s in SHAPES])
@pytest.mark.parametrize("provider_name", PROVIDER_NAMES)
def test_provider(benchmark, provider_name, shape, mode):
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable_reason(torch.device(DEVICE), explicit=False)
    if reason:
        pytest.skip(reason)
    case = make_case(shape, DTYPE, DEVICE)
    run = timed_call(provider.build(case), mode, case.grad_out)
    if CUDA:
        def run_synchronized():
            run()
            torch.cuda.synchronize()
        target = run_synchronized
    else:
        target = run
    benchmark.group = f"{shape.label} {mode}"
    benchmark.extra_info.update(shape.as_dict(), mode=mode, dtype=str(DTYPE))
    benchmark(target)
