"""What travels between server and clients (smartfed.federated.messages): tensors, instructions
and results survive the Flower records exactly (fp32) or as bf16 rounds them, their size is
counted, and bad input is refused by name."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from smartfed.eeqa import ImportanceStats
from smartfed.federated import messages
from smartfed.federated.protocol import ClientInstructions, ClientResult


def random_state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.router_weight": torch.randn(12, 32, generator=generator),
        "model.layers.0.self_attn.q_proj.router_bias": torch.randn(12, generator=generator),
        "model.layers.1.self_attn.v_proj.router_weight": torch.randn(12, 32, generator=generator) * 1e-3,
    }


@pytest.mark.parametrize("wire_dtype", ["fp32", "bf16"])
def test_state_round_trip_in_the_wire_dtype(wire_dtype):
    state = random_state()
    received = messages.record_to_state(messages.state_to_record(state, wire_dtype))
    assert list(received) == list(state)
    for name, tensor in state.items():
        assert received[name].dtype == torch.float32
        expected = tensor if wire_dtype == "fp32" else tensor.to(torch.bfloat16).float()
        assert torch.equal(received[name], expected), name


def test_bf16_halves_the_tensor_bytes():
    state = random_state()
    values = sum(t.numel() for t in state.values())
    names = sum(len(name) for name in state)
    half = messages.state_to_record(state, "bf16").count_bytes()
    full = messages.state_to_record(state, "fp32").count_bytes()
    # bf16 travels as raw bytes; fp32 as numpy arrays, each with its .npy header.
    assert half == 2 * values + names
    assert 4 * values + names < full <= 4 * values + names + 128 * len(state)


def test_result_round_trip_with_importance_statistics():
    result = ClientResult(
        state=random_state(3), num_examples=33,
        importance=ImportanceStats("cosine", {"m": 1.5}, {"m": 40}).to_dict(), metrics={"loss": 0.25},
    )
    back = messages.content_to_result(messages.result_to_content(result, "fp32"))
    assert back.num_examples == 33 and back.importance == result.importance and back.metrics == {"loss": 0.25}


def test_state_record_refuses_bad_input():
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        messages.state_to_record(random_state(), "fp16")
    with pytest.raises(TypeError, match="tensor 'ids' must be a floating torch.Tensor"):
        messages.state_to_record({"ids": torch.arange(3)}, "fp32")
    record = ArrayRecord({"w": Array(dtype="float16", shape=(2,), stype="raw-little-endian", data=b"\0" * 4)})
    with pytest.raises(ValueError, match="tensor 'w': expected stype"):
        messages.record_to_state(record)


def test_instructions_and_results_round_trip():
    instructions = ClientInstructions(
        round=3, state=random_state(1), quotas={"model.layers.0.self_attn.q_proj": 5, "model.layers.1.self_attn.v_proj": 3},
        local_steps=4, batch_size=8, lr=0.02, weight_decay=0.1, fedprox_mu=0.01, seed=(1 << 62) + 12345,
    )
    received = messages.content_to_instructions(messages.instructions_to_content(instructions, "fp32"))
    assert received.settings() == instructions.settings()
    assert all(torch.equal(received.state[k], instructions.state[k]) for k in instructions.state)

    without_quotas = ClientInstructions(round=1, state=random_state(2), quotas=None, local_steps=1, batch_size=2, lr=0.1)
    assert messages.content_to_instructions(messages.instructions_to_content(without_quotas, "bf16")).quotas is None

    importance = {"estimator": "cosine", "sums": {"a.q_proj": 1.25, "b.v_proj": 0.5}, "counts": {"a.q_proj": 96, "b.v_proj": 96}}
    metrics = {"loss": 1.5, "compute_s": 0.25, "peak_memory_bytes": 4096, "peak_memory_source": "ru_maxrss_delta", "tokens": 96}
    result = ClientResult(state=random_state(3), num_examples=37, importance=importance, metrics=metrics)
    back = messages.content_to_result(messages.result_to_content(result, "fp32"))
    assert back.num_examples == 37
    assert back.importance == importance
    assert back.metrics == metrics
    assert all(torch.equal(back.state[k], result.state[k]) for k in result.state)
    assert messages.content_to_result(messages.result_to_content(
        ClientResult(state=random_state(4), num_examples=5), "fp32")).importance is None


def test_wire_size_counts_tensors_and_metadata():
    state = random_state()
    content = messages.instructions_to_content(
        ClientInstructions(round=1, state=state, quotas={"m": 2}, local_steps=1, batch_size=2, lr=0.1), "fp32"
    )
    size = messages.wire_size(content)
    tensor_elements = sum(t.numel() for t in state.values())
    assert size.tensor_bytes >= 4 * tensor_elements
    assert size.meta_bytes > 0
    assert size.num_bytes == size.tensor_bytes + size.meta_bytes
    bf16 = messages.wire_size(messages.instructions_to_content(
        ClientInstructions(round=1, state=state, quotas=None, local_steps=1, batch_size=2, lr=0.1), "bf16"))
    assert 2 * tensor_elements <= bf16.tensor_bytes < size.tensor_bytes


def test_malformed_messages_are_refused_by_name():
    with pytest.raises(ValueError, match="a train message needs the record 'instructions'"):
        messages.content_to_instructions(RecordDict({"state": messages.state_to_record(random_state(), "fp32")}))
    with pytest.raises(ValueError, match="a train reply needs the record 'metrics'"):
        messages.content_to_result(RecordDict({"state": messages.state_to_record(random_state(), "fp32")}))
    with pytest.raises(ValueError, match="an evaluate message needs the record 'state'"):
        messages.content_to_evaluation(RecordDict())


# --------------------------------------------------------------------------- hostile replies


@pytest.mark.parametrize("wire_dtype", ["fp32", "bf16"])
def test_a_reply_in_the_wire_dtype_decodes_exactly(wire_dtype):
    state = random_state(5)
    decoded = messages.decode_state(messages.state_to_record(state, wire_dtype), wire_dtype)
    assert list(decoded) == list(state)
    for name, tensor in state.items():
        expected = tensor if wire_dtype == "fp32" else tensor.to(torch.bfloat16).float()
        assert decoded[name].dtype == torch.float32 and torch.equal(decoded[name], expected)


@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.bool_, np.float16, np.complex64, np.uint64])
def test_a_reply_in_another_dtype_is_refused_not_cast(dtype):
    record = ArrayRecord({"w": Array(np.ones((3, 4), dtype=dtype))})
    with pytest.raises(ValueError, match=rf"tensor 'w': the run's wire dtype is fp32 .*got stype 'numpy.ndarray' "
                                         rf"with dtype '{np.dtype(dtype)}'"):
        messages.decode_state(record, "fp32")
    with pytest.raises(ValueError, match="the run's wire dtype is bf16"):
        messages.decode_state(record, "bf16")
    fp32 = messages.state_to_record({"w": torch.ones(3, 4)}, "fp32")
    with pytest.raises(ValueError, match="the run's wire dtype is bf16"):
        messages.decode_state(fp32, "bf16")


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_record_whose_bytes_disagree_with_its_claims_is_refused():
    float64_bytes = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=_npy(np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"its bytes hold a float64 array of shape \(2, 3\), not the little-endian"):
        messages.decode_state(ArrayRecord({"w": float64_bytes}), "fp32")
    other_shape = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=_npy(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*shape \(3, 2\) the record declares"):
        messages.decode_state(ArrayRecord({"w": other_shape}), "fp32")
    big_endian = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=_npy(np.zeros(2, ">f4")))
    with pytest.raises(ValueError, match="not the little-endian float32 array"):
        messages.decode_state(ArrayRecord({"w": big_endian}), "fp32")
    # A header claiming 2**40 values over 8 bytes of data: refused before anything is allocated.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    claim = Array(dtype="float32", shape=(2**40,), stype="numpy.ndarray", data=header.getvalue() + bytes(8))
    with pytest.raises(ValueError, match=r"tensor 'w': 8 bytes of data for shape \(1099511627776,\)"):
        messages.decode_state(ArrayRecord({"w": claim}), "fp32")
    raw = Array(dtype="bfloat16", shape=(4,), stype=messages.RAW_STYPE, data=bytes(6))
    with pytest.raises(ValueError, match=r"6 bytes of data for shape \(4,\) \(8 expected\)"):
        messages.decode_state(ArrayRecord({"w": raw}), "bf16")
    pickled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b"\x80\x04")
    with pytest.raises(ValueError, match="the run's wire dtype is fp32"):
        messages.decode_state(ArrayRecord({"w": pickled}), "fp32")
