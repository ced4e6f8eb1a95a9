"""What a round cost: bytes on the wire, client compute time, adapter FLOPs, peak memory.

Peak memory on CPU is the growth of the process's resident-set high-water mark
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux) during a client's training: it
counts every allocation, torch's included (tracemalloc sees only Python's own allocator), but it
only grows when a new process-wide peak is reached, so later clients often report 0. On CUDA it is
``torch.cuda.max_memory_allocated`` since a reset at the client's start. Each record names its
source.
"""

import resource
import sys
from dataclasses import dataclass, field

import torch


class PeakMemory:
    """Context manager measuring the peak memory of a block (see the module docstring)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.source = "cuda_max_memory_allocated" if self.device.type == "cuda" else "ru_maxrss_delta"

    @staticmethod
    def _maxrss_bytes():
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = self._maxrss_bytes()
        return self

    def __exit__(self, *exc_info):
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = int(self._maxrss_bytes() - self._start)
        return False


def more_forward_flops_per_token(d_in, d_out, num_experts, top_k, router):
    """Forward FLOPs of one MoRE layer's adapter path per token, base product excluded:
    router logits (linear: N*d_in MACs; expert_space: all N shrinks N*d_in plus N*N), the k
    active experts' shrink (k*d_in, already paid by expert_space) and expand (k*d_out).
    ``router`` is the op's form: a projected router runs as the linear router U P (its N*m*d_in
    MACs to form U P are paid once per call, not per token). One multiply-add = 2 FLOPs."""
    if router == "linear":
        macs = num_experts * d_in + top_k * d_in + top_k * d_out
    elif router == "expert_space":
        macs = num_experts * d_in + num_experts * num_experts + top_k * d_out
    else:
        raise ValueError(f"router must be 'linear' or 'expert_space', got {router!r}")
    return 2 * macs


@dataclass
class RoundAccounting:
    """Totals of one round, filled as payloads are produced."""

    bytes_down: int = 0
    bytes_up: int = 0
    tensor_bytes_up: int = 0
    meta_bytes_up: int = 0
    client_compute_s: dict = field(default_factory=dict)
    client_flops: dict = field(default_factory=dict)
    client_peak_memory: dict = field(default_factory=dict)

    def add_download(self, payload):
        self.bytes_down += payload.num_bytes

    def add_upload(self, payload):
        self.bytes_up += payload.num_bytes
        self.tensor_bytes_up += payload.tensor_bytes
        self.meta_bytes_up += payload.meta_bytes

    def add_client(self, client_id, compute_s, flops, peak_memory_bytes):
        self.client_compute_s[str(client_id)] = compute_s
        self.client_flops[str(client_id)] = flops
        self.client_peak_memory[str(client_id)] = peak_memory_bytes

    def as_dict(self):
        return {
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "tensor_bytes_up": self.tensor_bytes_up,
            "meta_bytes_up": self.meta_bytes_up,
            "client_compute_s": self.client_compute_s,
            "client_active_flops": self.client_flops,
            "client_peak_memory_bytes": self.client_peak_memory,
        }
