"""Wire format of every message between server and clients, and its exact size.

A payload is ``8-byte little-endian length of the tensor part | safetensors bytes | UTF-8 JSON``.
Tensors travel in the configured wire dtype (fp32 or bf16) and come back as float32; everything
else (quotas, importance statistics, metrics, number of examples) is JSON. Byte counts in the
accounting are ``len()`` of these bytes, so they are exactly what a transport would carry.
"""

import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HEADER = struct.Struct("<Q")


@dataclass(frozen=True)
class Payload:
    data: bytes
    tensor_bytes: int  # the safetensors part (its own header included)
    tensor_data_bytes: int  # raw tensor elements only: numel * itemsize
    meta_bytes: int

    @property
    def num_bytes(self) -> int:
        return len(self.data)


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


def encode_payload(tensors, meta, wire_dtype="fp32") -> Payload:
    """Serialise ``tensors`` (name -> floating tensor) in ``wire_dtype`` and ``meta`` (JSON-able)."""
    converted = to_wire_dtype(tensors, wire_dtype)
    tensor_part = safetensors_save(converted) if converted else b""
    meta_part = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    data_bytes = sum(t.numel() * t.element_size() for t in converted.values())
    return Payload(
        data=_HEADER.pack(len(tensor_part)) + tensor_part + meta_part,
        tensor_bytes=len(tensor_part),
        tensor_data_bytes=data_bytes,
        meta_bytes=len(meta_part),
    )


def decode_payload(data: bytes):
    """Inverse of ``encode_payload``: (tensors as float32, meta)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _HEADER.size:
        raise ValueError("payload must be bytes starting with an 8-byte tensor-length header")
    (tensor_length,) = _HEADER.unpack_from(data)
    if _HEADER.size + tensor_length > len(data):
        raise ValueError(
            f"payload header announces {tensor_length} tensor bytes but only "
            f"{len(data) - _HEADER.size} follow"
        )
    tensor_part = bytes(data[_HEADER.size:_HEADER.size + tensor_length])
    tensors = safetensors_load(tensor_part) if tensor_length else {}
    meta = json.loads(bytes(data[_HEADER.size + tensor_length:]).decode("utf-8"))
    return {name: tensor.to(torch.float32) for name, tensor in tensors.items()}, meta
