"""What a round cost: bytes on the wire, client compute time, adapter FLOPs, peak memory.

Peak memory of a client's training is measured for real on every device:

- CUDA: ``torch.cuda.max_memory_allocated`` since a reset at the client's start
  (``cuda_max_memory_allocated``).
- CPU on glibc (Linux): the peak, over the block, of the bytes the C allocator has handed out and
  not yet taken back (``mallinfo2``: heap chunks in use plus mmapped chunks), minus its value at
  the start (``malloc_in_use_peak``). torch allocates CPU tensors with malloc, so this is what the
  client's step itself allocated at its worst: activations, gradients, AdamW's moments and
  temporaries, plus Python objects. A thread samples it every ``SAMPLE_INTERVAL_S``, the measured
  code reads it at its known high points (``sample()``: the trainer after each forward and each
  optimizer step, since a thread starved of CPU on a loaded machine may not sample a short block
  at all), and it is read once more at the end; a spike between reads can still be missed.
- CPU elsewhere: the peak of the resident set (``/proc/self/statm`` or ``ru_maxrss``) over the
  block minus its start (``rss_peak``), which counts pages only, not freed-and-reused memory.

The resident-set high-water mark alone (``ru_maxrss``) only grows with a new process-wide peak,
so after the first client it reported 0. Each record names its source.
"""

import ctypes
import ctypes.util
import os
import resource
import sys
import threading
from dataclasses import dataclass, field

import torch

SAMPLE_INTERVAL_S = 0.001


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use_reader():
    """A function returning the bytes malloc has in use, or None where glibc's mallinfo2 is missing."""
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2

    def read():
        info = function()
        return int(info.uordblks + info.hblkhd)

    return read


def _resident_bytes():
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_MALLOC_IN_USE = _malloc_in_use_reader()


class PeakMemory:
    """Context manager measuring the peak memory of a block (see the module docstring)."""

    def __init__(self, device, *, interval_s=SAMPLE_INTERVAL_S):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.interval_s = interval_s
        if self.device.type == "cuda":
            self.source, self._read = "cuda_max_memory_allocated", None
        elif _MALLOC_IN_USE is not None:
            self.source, self._read = "malloc_in_use_peak", _MALLOC_IN_USE
        else:
            self.source, self._read = "rss_peak", _resident_bytes

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._read())

    def sample(self):
        """Read the memory in use now (a no-op on CUDA, whose allocator keeps its own peak)."""
        if self.device.type != "cuda":
            self._caller_peak = max(self._caller_peak, self._read())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        # Two maxima, one per writer: the sampling thread's and the caller's, so neither loses
        # the other's update.
        self._start = self._peak = self._caller_peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return False
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(0, int(max(self._peak, self._caller_peak, self._read()) - self._start))
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
