"""What travels between server and clients: Flower records <-> the objects of
smartfed.federated.protocol, both directions, and their size on the wire.

Server -> client (train, evaluate): ``ArrayRecord "state"`` (global trainable tensors in the
wire dtype), ``ConfigRecord "instructions"`` (round, local training settings, seed) and, for
methods with EEQA quotas, ``ConfigRecord "quotas"`` (module -> k).
Client -> server (train): ``ArrayRecord "state"`` (trained tensors, wire dtype), ``MetricRecord
"metrics"`` (``num-examples``, the numeric training metrics, importance sums and token counts per
module under ``importance-sum.<module>`` / ``importance-count.<module>``) and ``ConfigRecord
"info"`` (the non-numeric metrics and the importance estimator).

fp32 tensors travel as numpy arrays (Flower's own format); bf16 has no numpy dtype, so its raw
little-endian bytes travel with ``stype = RAW_STYPE`` and dtype ``"bfloat16"``. Either way the
receiver gets float32 tensors. Bytes up and down are Flower's ``count_bytes`` of the records a
message carries (``wire_size``), whatever the transport.

A client's reply is decoded strictly (``decode_state``): only the run's wire dtype is accepted,
from the ``.npy`` header the bytes really carry (not only the dtype the record claims), and the
data must be exactly as long as the shape says; anything else (float64, float16, int8, bool,
complex, uint64, a header claiming more than the bytes hold) is refused with the reason, never
cast, and nothing is allocated from a claimed shape.
"""

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from smartfed.federated.protocol import ClientInstructions, ClientResult

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

STATE = "state"
INSTRUCTIONS = "instructions"
QUOTAS = "quotas"
METRICS = "metrics"
INFO = "info"
NUM_EXAMPLES = "num-examples"
IMPORTANCE_SUM = "importance-sum."
IMPORTANCE_COUNT = "importance-count."
IMPORTANCE_ESTIMATOR = "importance-estimator"
RAW_STYPE = "raw-little-endian"
NUMPY_STYPE = "numpy.ndarray"


@dataclass(frozen=True)
class WireSize:
    """Bytes of one message as Flower counts them (``count_bytes`` of its records), as
    ``accounting.RoundAccounting`` adds them up."""

    tensor_bytes: int
    meta_bytes: int

    @property
    def num_bytes(self) -> int:
        return self.tensor_bytes + self.meta_bytes


def wire_size(content: RecordDict) -> WireSize:
    tensor_bytes = sum(record.count_bytes() for record in content.array_records.values())
    meta_bytes = sum(record.count_bytes() for record in content.config_records.values())
    meta_bytes += sum(record.count_bytes() for record in content.metric_records.values())
    return WireSize(tensor_bytes=tensor_bytes, meta_bytes=meta_bytes)


def to_wire_dtype(tensors, wire_dtype) -> dict:
    """``tensors`` (name -> floating tensor) as contiguous CPU tensors in ``wire_dtype``."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    dtype = WIRE_DTYPES[wire_dtype]
    converted = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"tensor {name!r} must be a floating torch.Tensor, got {type(tensor).__name__}")
        converted[name] = tensor.detach().to("cpu", dtype).contiguous()
    return converted


def state_to_record(state, wire_dtype) -> ArrayRecord:
    """``state`` (name -> floating tensor) as an ArrayRecord in ``wire_dtype`` ("fp32" or "bf16")."""
    arrays = {}
    for name, converted in to_wire_dtype(state, wire_dtype).items():
        if converted.dtype == torch.float32:
            arrays[name] = Array(converted.numpy())
        else:
            raw = converted.view(torch.int16).numpy().tobytes()
            arrays[name] = Array(dtype="bfloat16", shape=tuple(converted.shape), stype=RAW_STYPE, data=raw)
    return ArrayRecord(arrays)


WIRE_NUMPY_DTYPE = np.dtype("<f4")
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _declared_shape(name, array):
    shape = tuple(array.shape)
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r:.60} is not a tuple of sizes")
    return shape


def _decode_fp32(name, array) -> torch.Tensor:
    shape = _declared_shape(name, array)
    if array.stype != NUMPY_STYPE or array.dtype != "float32":
        raise ValueError(f"tensor {name!r}: the run's wire dtype is fp32 (stype {NUMPY_STYPE!r}, dtype 'float32'), "
                         f"got stype {array.stype!r:.40} with dtype {array.dtype!r:.40}")
    data = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(data)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
        header = NPY_HEADER_READERS[version](data)
    except (ValueError, SyntaxError, OverflowError) as error:
        raise ValueError(f"tensor {name!r}: not a .npy array ({error})") from None
    real_shape, fortran_order, dtype = header
    if dtype != WIRE_NUMPY_DTYPE or fortran_order or tuple(real_shape) != shape:
        raise ValueError(f"tensor {name!r}: its bytes hold a {dtype} array of shape {tuple(real_shape)!r:.60}"
                         f"{' in Fortran order' if fortran_order else ''}, not the little-endian float32 array of "
                         f"shape {shape!r:.60} the record declares")
    payload = memoryview(array.data)[data.tell():]
    expected = math.prod(shape) * WIRE_NUMPY_DTYPE.itemsize
    if len(payload) != expected:
        raise ValueError(f"tensor {name!r}: {len(payload)} bytes of data for shape {shape!r:.60} ({expected} expected)")
    return torch.from_numpy(np.frombuffer(payload, dtype=WIRE_NUMPY_DTYPE).reshape(shape).copy())


def _decode_bf16(name, array) -> torch.Tensor:
    shape = _declared_shape(name, array)
    if array.stype != RAW_STYPE or array.dtype != "bfloat16":
        raise ValueError(f"tensor {name!r}: the run's wire dtype is bf16 (stype {RAW_STYPE!r}, dtype 'bfloat16'), "
                         f"got stype {array.stype!r:.40} with dtype {array.dtype!r:.40}")
    expected = math.prod(shape) * 2
    if len(array.data) != expected:
        raise ValueError(f"tensor {name!r}: {len(array.data)} bytes of data for shape {shape!r:.60} "
                         f"({expected} expected)")
    raw = torch.frombuffer(bytearray(array.data), dtype=torch.bfloat16) if expected else torch.empty(0, dtype=torch.bfloat16)
    return raw.reshape(shape).to(torch.float32)


def decode_state(record: ArrayRecord, wire_dtype) -> dict:
    """A record from an untrusted sender as name -> float32 tensor, accepting only ``wire_dtype``
    ("fp32" or "bf16"; see the module docstring). Raises ValueError naming the tensor."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    decode = _decode_fp32 if wire_dtype == "fp32" else _decode_bf16
    return {name: decode(name, array) for name, array in record.items()}


def record_to_state(record: ArrayRecord) -> dict:
    """Inverse of ``state_to_record``: name -> float32 tensor. For records the server made itself
    (its own arrays, a Flower strategy's aggregate); a client's reply goes through ``decode_state``."""
    state = {}
    for name, array in record.items():
        if array.stype == NUMPY_STYPE:
            state[name] = torch.from_numpy(array.numpy()).to(torch.float32)
        elif array.stype == RAW_STYPE and array.dtype == "bfloat16":
            raw = torch.frombuffer(bytearray(array.data), dtype=torch.bfloat16)
            state[name] = raw.reshape(array.shape).to(torch.float32)
        else:
            raise ValueError(
                f"tensor {name!r}: expected stype {NUMPY_STYPE!r} or {RAW_STYPE!r} with dtype 'bfloat16', "
                f"got stype {array.stype!r} with dtype {array.dtype!r}"
            )
    return state


def _quotas_record(quotas):
    return ConfigRecord({name: int(k) for name, k in quotas.items()})


def _quotas_from(content: RecordDict):
    if QUOTAS not in content.config_records:
        return None
    return {name: int(k) for name, k in content.config_records[QUOTAS].items()}


def instructions_to_content(instructions: ClientInstructions, wire_dtype) -> RecordDict:
    settings = instructions.settings()
    quotas = settings.pop("quotas")
    content = RecordDict({
        STATE: state_to_record(instructions.state, wire_dtype),
        INSTRUCTIONS: ConfigRecord(settings),
    })
    if quotas is not None:
        content[QUOTAS] = _quotas_record(quotas)
    return content


def content_to_instructions(content: RecordDict) -> ClientInstructions:
    for name in (STATE, INSTRUCTIONS):
        if name not in content:
            raise ValueError(f"a train message needs the record {name!r}; it has {sorted(content)}")
    settings = dict(content.config_records[INSTRUCTIONS])
    return ClientInstructions(state=record_to_state(content.array_records[STATE]), quotas=_quotas_from(content), **settings)


def evaluation_to_content(state, quotas, wire_dtype) -> RecordDict:
    content = RecordDict({STATE: state_to_record(state, wire_dtype)})
    if quotas is not None:
        content[QUOTAS] = _quotas_record(quotas)
    return content


def content_to_evaluation(content: RecordDict):
    """(state, quotas) of an evaluate message."""
    if STATE not in content:
        raise ValueError(f"an evaluate message needs the record {STATE!r}; it has {sorted(content)}")
    return record_to_state(content.array_records[STATE]), _quotas_from(content)


def result_values(result: ClientResult) -> dict:
    """A result's metrics and importance statistics as one flat mapping of scalars (the keys as
    in a train reply, less ``num-examples``)."""
    values = dict(result.metrics)
    if result.importance is not None:
        values[IMPORTANCE_ESTIMATOR] = result.importance["estimator"]
        for module, total in result.importance["sums"].items():
            values[IMPORTANCE_SUM + module] = float(total)
        for module, count in result.importance["counts"].items():
            values[IMPORTANCE_COUNT + module] = int(count)
    return values


def result_parts(values: dict):
    """Inverse of ``result_values``: (importance or None, metrics). Values are not checked here
    (``smartfed.federated.screening`` does)."""
    sums, counts, metrics = {}, {}, {}
    for key, value in values.items():
        if key.startswith(IMPORTANCE_SUM):
            sums[key[len(IMPORTANCE_SUM):]] = value
        elif key.startswith(IMPORTANCE_COUNT):
            counts[key[len(IMPORTANCE_COUNT):]] = value
        elif key != IMPORTANCE_ESTIMATOR:
            metrics[key] = value
    if IMPORTANCE_ESTIMATOR not in values:
        return None, metrics
    return {"estimator": values[IMPORTANCE_ESTIMATOR], "sums": sums, "counts": counts}, metrics


def result_to_content(result: ClientResult, wire_dtype) -> RecordDict:
    numbers = {NUM_EXAMPLES: int(result.num_examples)}
    info = {}
    for key, value in result_values(result).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = value
        else:
            info[key] = value
    return RecordDict({
        STATE: state_to_record(result.state, wire_dtype),
        METRICS: MetricRecord(numbers),
        INFO: ConfigRecord(info),
    })


def content_to_result(content: RecordDict, wire_dtype="fp32") -> ClientResult:
    """A client's train reply, its tensors decoded strictly in ``wire_dtype`` (``decode_state``)."""
    for name in (STATE, METRICS, INFO):
        if name not in content:
            raise ValueError(f"a train reply needs the record {name!r}; it has {sorted(content)}")
    numbers = dict(content.metric_records[METRICS])
    info = dict(content.config_records[INFO])
    if NUM_EXAMPLES not in numbers:
        raise ValueError(f"the {METRICS!r} record of a train reply needs {NUM_EXAMPLES!r}; it has {sorted(numbers)}")
    num_examples = numbers.pop(NUM_EXAMPLES)
    importance, metrics = result_parts({**numbers, **info})
    return ClientResult(
        state=decode_state(content.array_records[STATE], wire_dtype), num_examples=num_examples,
        importance=importance, metrics=metrics,
    )
