"""Minimum work of one benchmarked call: FLOPs and bytes a provider cannot avoid (a roofline).

Counts multiply-adds as 2 FLOPs and every tensor read or written once at the benchmark dtype;
the MoRE expand counts only the k selected columns. Backward covers the inputs each provider
trains in the benchmark: x and W for the linear, x and the LoRA factors for peft, x and the
router for MoRE (base and experts frozen).
"""

from smartfed.benchmarking.shapes import Shape

# Dense peak throughput and memory bandwidth of known GPUs (vendor data sheets, SXM parts);
# matched against torch.cuda.get_device_name. CPUs have no entry: the linear's own TFLOP/s
# in the same table is their practical ceiling.
GPU_PEAKS = {  # name fragment: {dtype: FLOP/s, "bandwidth": bytes/s}
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "bandwidth": 4.8e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "bandwidth": 3.35e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "bandwidth": 2.0e12},
}


def gpu_peaks(device_name: str):
    for fragment, peaks in GPU_PEAKS.items():
        if fragment in device_name:
            return peaks
    return None


def _forward(kind, s: Shape):
    t, di, do, n, k = s.tokens, s.d_in, s.d_out, s.experts, s.top_k
    base_flops = 2 * t * di * do
    base_elems = t * di + di * do + do + t * do
    if kind == "linear":
        return base_flops, base_elems
    if kind == "lora":
        return base_flops + 2 * t * k * (di + do), base_elems + k * (di + do)
    return base_flops + 2 * t * n * 2 * di + 2 * t * k * do, base_elems + n * (2 * di + 1 + do)


def _backward(kind, s: Shape):
    t, di, do, n, k = s.tokens, s.d_in, s.d_out, s.experts, s.top_k
    grad_x_flops = 2 * t * di * do
    io_elems = t * do + t * di + di * do + t * di  # read gy, x, W; write dx
    if kind == "linear":
        return 2 * grad_x_flops, io_elems + di * do
    if kind == "lora":
        return grad_x_flops + 4 * t * k * (di + do), io_elems + 2 * k * (di + do)
    router = 2 * t * do * k + 2 * t * di * (n + k) + 2 * t * n * di
    return grad_x_flops + router, io_elems + n * (2 * di + 1 + do) + n * (di + 1)


def minimum_work(kind: str, shape: Shape, mode: str, element_bytes: int):
    """(FLOPs, bytes) for provider kind "linear", "lora" or "more" in mode fwd, bwd or full."""
    parts = {"fwd": [_forward], "bwd": [_backward], "full": [_forward, _backward]}[mode]
    flops = elements = 0
    for part in parts:
        f, e = part(kind, shape)
        flops, elements = flops + f, elements + e
    return flops, elements * element_bytes
