"""smartfed_kernels.testing: the shared MoRE inputs and tolerance of the tests, the bench and the GPU check."""

import pytest
import torch

from smartfed_kernels.testing import ARGUMENTS, TOLERANCES, assert_close_for, make_more_inputs, relative_error


def test_a_seed_gives_the_same_values_in_every_dtype_and_layout():
    plain = make_more_inputs((2, 3), 6, 5, 4, seed=3)
    assert list(plain) == list(ARGUMENTS)
    assert plain["x"].shape == (2, 3, 6) and plain["expert_b"].shape == (5, 4)
    half = make_more_inputs((2, 3), 6, 5, 4, seed=3, dtype=torch.bfloat16)
    strided = make_more_inputs((2, 3), 6, 5, 4, seed=3, non_contiguous=True)
    for name in ARGUMENTS:
        assert torch.equal(half[name], plain[name].to(torch.bfloat16)), name
        assert torch.equal(strided[name], plain[name]), name
        assert not strided[name].is_contiguous(), name
    assert not torch.equal(make_more_inputs((2, 3), 6, 5, 4, seed=4)["x"], plain["x"])


def test_options_leave_out_tensors_and_choose_what_trains():
    inputs = make_more_inputs(7, 6, 5, 4, router="expert_space", base=False, router_bias=False,
                              requires_grad=("x", "router_weight", "router_bias"))
    assert inputs["weight"] is None and inputs["bias"] is None and inputs["router_bias"] is None
    assert inputs["router_weight"].shape == (4, 4)
    assert [n for n, t in inputs.items() if t is not None and t.requires_grad] == ["x", "router_weight"]
    every = make_more_inputs(7, 6, 5, 4, requires_grad=True)
    assert all(t.requires_grad and t.is_leaf for t in every.values())
    with pytest.raises(ValueError, match="expected argument names"):
        make_more_inputs(7, 6, 5, 4, requires_grad=("router",))


def test_tolerance_is_relative_to_the_largest_element():
    expected = torch.tensor([128.0, 1e-3, -2.0])
    assert relative_error(expected + torch.tensor([0.0, 5e-4, 0.0]), expected) == pytest.approx(5e-4 / 128)
    assert_close_for(expected + torch.tensor([0.0, 5e-4, 0.0]), expected)
    with pytest.raises(AssertionError, match=r"output: max relative error 3\.052e-05 > 1e-05 \(torch.float32\)"):
        assert_close_for(expected + torch.tensor([2 ** -8, 0.0, 0.0]), expected, what="output")
    assert_close_for(expected.to(torch.bfloat16), expected, torch.bfloat16)
    assert relative_error(torch.zeros(0, 3), torch.zeros(0, 3)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == float("inf")
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
