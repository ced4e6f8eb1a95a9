"""The C route of the MoRE CPU inference forward, and the ctypes entry points of more_cpu.c.

:func:`forward` runs a call: the base product by ``F.linear``, the router logits by one GEMM (or,
for one token, in the kernel) and the rest -- selection, gates, the k selected shrink values and
the expand onto the base product -- in C. Each entry point reads the tensors in place (any row
stride, unit column stride; others are copied; B in any layout). None means the kernels did not
run and nothing usable was written: some token's logits hold a NaN or an infinity (the PyTorch
ops then answer as the reference does).

A call costs a few microseconds of Python, which at decode sizes is most of the call: the problem
goes to C as one int64 array (pointers included, in the order of abi.FIELDS), packed in one
struct.pack_into into a per-thread buffer, and the fields fixed by the call's CallSpec are
computed once per spec. Threads: the C side opens a parallel region only when every thread gets
``GRAIN`` multiply-adds and a token of its own (``more_threads_for``), so decode-sized calls run
in the caller's thread, their logits included (up to FEW_TOKENS tokens).
"""

import ctypes
import struct
import threading

import torch
import torch.nn.functional as F

from smartfed_kernels.cpu import abi
from smartfed_kernels.cpu.build import fall_back, load_library
from smartfed_kernels.forms import gate_form, router_form

_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}
_NON_FINITE, _NO_MEMORY = 1, 2
# A thread's share of a call should hold at least this many multiply-adds (k selected shrink dot
# products and k expand rows per token): fewer do not pay for waking the thread.
GRAIN = 2 ** 20
_Problem = abi.problem_type()
# Writes the int64 fields into a problem buffer (faster than a ctypes slice assignment).
_PACK = struct.Struct(f"={len(abi.FIELDS)}q")
_buffers = threading.local()
_enabled = True


def enabled() -> bool:
    return _enabled


def set_enabled(value: bool) -> bool:
    """Turns the kernels on or off for the process (see smartfed_kernels.cpu.disabled); returns
    the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(value)
    return previous


def supports(x2: torch.Tensor) -> bool:
    """Whether the kernels take a call with this (flattened) input: CPU fp32/fp64, outside
    torch.compile's tracing (a ctypes call cannot be traced), enabled, and the library built.
    A library that is missing for any reason but a deliberate switch-off goes through
    build.fall_back (a warning once, or an error under SMARTFED_REQUIRE_CPU_KERNELS=1)."""
    if not (_enabled and x2.is_cpu and x2.dtype in _SUFFIXES) or torch.compiler.is_compiling():
        return False
    if load_library() is None:
        fall_back()
        return False
    return True


_ENTRY_NAMES = ("more_route_expand", "more_tokens")
_entry_points = {}
# CallSpec -> its fields below, by identity (hashing the frozen dataclass on every call would
# cost more than the lookup saves); the spec is kept in the entry so its id cannot be reused.
_spec_cache = {}
_SPEC_CACHE_SIZE = 4096


def _entry_points_for(dtype):
    """(more_route_expand, more_tokens) of the library for this dtype, typed once."""
    library = load_library()
    functions = _entry_points.get((id(library), dtype))
    if functions is None:
        functions = []
        for name in _ENTRY_NAMES:
            function = getattr(library, f"{name}_{_SUFFIXES[dtype]}")
            function.argtypes = (ctypes.POINTER(_Problem), ctypes.c_double)
            function.restype = ctypes.c_int
            functions.append(function)
        functions = _entry_points[(id(library), dtype)] = tuple(functions)
    return functions


def _spec_fields(spec):
    """(num_experts, top_k, d_out), (gate code,), grain and (d_in, router reads shrink) of a spec."""
    entry = _spec_cache.get(id(spec))
    if entry is not None and entry[0] is spec:
        return entry[1]
    if len(_spec_cache) >= _SPEC_CACHE_SIZE:
        _spec_cache.clear()
    fields = ((spec.num_experts, spec.top_k, spec.d_out), (gate_form(spec.gate).code,), GRAIN,
              (spec.d_in, int(router_form(spec.router).reads_shrink)))
    _spec_cache[id(spec)] = (spec, fields)
    return fields


def _rows(t):
    """``t`` if its columns are adjacent in memory, else a contiguous copy."""
    return t if t.is_contiguous() or t.stride()[-1] == 1 else t.contiguous()


def _run(entry, head, tail, spec, fields, expert_b, out, with_routing):
    """Runs entry point ``entry`` (0: more_route_expand, 1: more_tokens) on the fields ``head``
    (tokens to shrink_stride) + the output fields + ``tail`` (x to expert_space): (indices, gates),
    (None, None) without ``with_routing``, or None. Every microsecond here counts at decode."""
    b_strides = expert_b.stride()
    tokens = head[0]
    if b_strides[0] != 1 and tokens * spec.top_k >= spec.num_experts:
        # The expand reads k rows of B^T per token, vectorised only where they are contiguous
        # (MoRELinear keeps B column-major); a few tokens read them strided rather than copy B.
        expert_b = expert_b.t().contiguous().t()
        b_strides = expert_b.stride()
    indices = gates = None
    pointers = (0, 0)
    if with_routing:
        indices = torch.empty(tokens, spec.top_k, dtype=torch.int64)
        gates = out.new_empty(tokens, spec.top_k)
        pointers = (indices.data_ptr(), gates.data_ptr())
    try:
        problem = _buffers.problem
    except AttributeError:
        problem = _buffers.problem = _Problem()
    _PACK.pack_into(problem, 0, *head, expert_b.data_ptr(), b_strides[1], b_strides[0], out.data_ptr(),
                    out.stride()[0], *pointers, *fields[1], torch.get_num_threads(), fields[2], *tail)
    status = _entry_points_for(out.dtype)[entry](problem, spec.gamma)
    if status:
        if status == _NO_MEMORY:
            raise MemoryError("smartfed_kernels.cpu: the MoRE CPU kernel could not allocate its scratch")
        return None
    return indices, gates


def route_expand(logits, router_bias, shrink, expert_b, out, spec, with_routing, x2=None, expert_a=None):
    """``out += gamma * sum_j g_j h[i_j] B[:, i_j]`` over the top-k of ``logits + router_bias``.

    ``logits`` [T, N] may be a row-strided view. h is ``shrink`` [T, N] or, when that is None,
    ``A x`` of the k selected experts alone, from ``x2`` [T, d_in] and ``expert_a``. Returns
    (indices, gates) [T, k], (None, None) without ``with_routing``, or None (nothing written).
    """
    logits = _rows(logits)
    router_bias = None if router_bias is None else _rows(router_bias)
    fields = _spec_fields(spec)
    if shrink is None:
        x2, expert_a = _rows(x2), _rows(expert_a)
        shrink_fields = (0, 0)
        tail = (x2.data_ptr(), x2.stride()[0], 0, 0, expert_a.data_ptr(), expert_a.stride()[0], *fields[3])
    else:
        shrink = _rows(shrink)
        shrink_fields = (shrink.data_ptr(), shrink.stride()[0])
        tail = (0,) * 8
    head = (logits.shape[0], *fields[0], logits.data_ptr(), logits.stride()[0],
            0 if router_bias is None else router_bias.data_ptr(), *shrink_fields)
    return _run(0, head, tail, spec, fields, expert_b, out, with_routing)


def few_tokens(x2, router_weight, router_bias, expert_a, expert_b, out, spec, with_routing):
    """As :func:`route_expand` for a few tokens (``x2`` [T, d_in], T <= FEW_TOKENS), their logits
    and A x computed in the kernel (for the linear router, A x of the k selected experts alone)."""
    x2, router_weight, expert_a = _rows(x2), _rows(router_weight), _rows(expert_a)
    router_bias = None if router_bias is None else _rows(router_bias)
    fields = _spec_fields(spec)
    head = (x2.shape[0], *fields[0], 0, 0, 0 if router_bias is None else router_bias.data_ptr(), 0, 0)
    tail = (x2.data_ptr(), x2.stride()[0], router_weight.data_ptr(), router_weight.stride()[0], expert_a.data_ptr(),
            expert_a.stride()[0], *fields[3])
    return _run(1, head, tail, spec, fields, expert_b, out, with_routing)


# Up to this many tokens (decode) a call computes its logits in the kernel, in the caller's thread.
FEW_TOKENS = 16


def forward(x2, weight, bias, router_weight, router_bias, expert_a, expert_b, spec, with_routing):
    """(y, indices, gates) of a flattened call by the C kernels, or None where they decline.

    The kernel selects, gates and adds the k chosen experts of each token onto the base product
    (F.linear, bias included) in one pass over the token's logits, computing A x for the k
    selected experts alone when the router reads x (a router that reads the shrink values needs
    all N). Up to FEW_TOKENS tokens (decode) compute their logits in the kernel too, in the
    caller's thread: the base product is then the call's only multi-threaded operation, as in
    nn.Linear, and one GEMM fewer waits at a barrier beside a busy neighbour. More tokens take
    their logits from one GEMM, which the kernel reads in place and adds the router bias to; it
    goes first, so that the base product, written last, is still in cache when the kernel adds
    onto it.
    """
    def base_product():
        return x2.new_zeros(x2.shape[0], spec.d_out) if weight is None else F.linear(x2, weight, bias)

    if 0 < x2.shape[0] <= FEW_TOKENS:
        y = base_product()
        routing = few_tokens(x2, router_weight, router_bias, expert_a, expert_b, y, spec, with_routing)
    elif _spec_fields(spec)[3][1]:
        shrink = F.linear(x2, expert_a)
        logits = F.linear(shrink, router_weight, router_bias)
        y = base_product()
        routing = route_expand(logits, None, shrink, expert_b, y, spec, with_routing)
    else:
        logits = F.linear(x2, router_weight)
        y = base_product()
        routing = route_expand(logits, router_bias, None, expert_b, y, spec, with_routing, x2=x2, expert_a=expert_a)
    return None if routing is None else (y, *routing)


def _counter(name: str) -> int:
    library = load_library()
    if library is None:
        return 0
    function = getattr(library, name)
    function.restype = ctypes.c_int64
    return function()


def openmp() -> bool:
    """Whether the library was built with OpenMP (can split a call over threads)."""
    return bool(_counter("more_openmp"))


def parallel_regions() -> int:
    """How many parallel regions the library has opened in this process (0 without it)."""
    return _counter("more_parallel_regions")


def threads_for(tokens: int, work_per_token: int, threads: int, grain: int = GRAIN) -> int:
    """The C side's choice of threads for a call (``more_threads_for``)."""
    function = load_library().more_threads_for
    function.argtypes = (ctypes.c_int64,) * 4
    function.restype = ctypes.c_int64
    return function(tokens, work_per_token, threads, grain)
