"""The Python mirror of ``struct more_problem`` (more_cpu.c) and the check that holds it to the C one.

kernels.py fills the struct as an array of int64 in the order of :data:`FIELDS` (the last field,
``gamma``, a double, goes in by the entry points' argument). A library whose ``more_abi()``
reports another version, other fields, other offsets or another gate numbering is refused at
load with the difference named, instead of reading its arguments from the wrong places.
"""

import ctypes
from typing import Optional

from smartfed_kernels.options import GATES

VERSION = 2
# The 8-byte fields of struct more_problem, in order; gamma (a double) follows them.
FIELDS = (
    "tokens", "num_experts", "top_k", "d_out", "logits", "logits_stride", "router_bias", "shrink",
    "shrink_stride", "expert_bt", "bt_stride", "bt_column_stride", "out", "out_stride", "indices", "gates",
    "gate", "threads", "grain", "x", "x_stride", "router_weight", "router_weight_stride",
    "expert_a", "expert_a_stride", "d_in", "expert_space",
)
LAST_FIELD = "gamma"
FIELD_BYTES = 8


def _expected():
    names = (*FIELDS, LAST_FIELD)
    return names, [FIELD_BYTES * i for i in range(len(names))], FIELD_BYTES * len(names)


def mismatch(library) -> Optional[str]:
    """What differs between the library's ``more_abi()`` and this mirror, or None when they agree."""
    try:
        more_abi = library.more_abi
    except AttributeError:
        return "it exports no more_abi() (built from other sources)"
    names, offsets, size = _expected()
    layout = (ctypes.c_int64 * (len(names) + 1))()
    more_abi.argtypes = (ctypes.POINTER(ctypes.c_int64), ctypes.c_int64)
    more_abi.restype = ctypes.c_char_p
    version, c_fields, c_gates = more_abi(layout, len(layout)).decode().split(";")
    c_names = tuple(c_fields.rstrip(",").split(","))
    if version != str(VERSION):
        return f"ABI version {version}, the Python side expects {VERSION}"
    if c_names != names:
        return f"struct more_problem has fields {c_names}, the Python mirror (abi.FIELDS) {names}"
    if list(layout[1:]) != offsets or layout[0] != size:
        return (f"struct more_problem has size {layout[0]} and offsets {list(layout[1:])}, the Python mirror "
                f"expects {size} and {offsets}")
    if tuple(c_gates.rstrip(",").split(",")) != GATES:
        return f"the C gates are numbered {c_gates.rstrip(',')}, smartfed_kernels.options.GATES is {GATES}"
    return None


def problem_type():
    """The ctypes array type kernels.py fills: FIELDS, then one slot for gamma."""
    return ctypes.c_int64 * (len(FIELDS) + 1)
