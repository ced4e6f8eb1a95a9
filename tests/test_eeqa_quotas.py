"""EEQA quota allocation: exact budgets, bounds, monotonicity, errors, runtime k."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smartfed.eeqa import (
    allocate_quotas,
    apply_quotas,
    client_budget,
    client_quotas,
    uniform_quotas,
)

NAMES = [f"layers.{i}.q_proj" for i in range(12)]


def bounds(names, n):
    return {name: n for name in names}


@st.composite
def allocation_problems(draw, same_bounds=False):
    count = draw(st.integers(1, 12))
    names = NAMES[:count]
    values = draw(st.lists(
        st.one_of(st.just(0.0), st.floats(1e-6, 1e3, allow_nan=False)), min_size=count, max_size=count,
    ))
    k_min = draw(st.integers(1, 3))
    if same_bounds:
        upper = [draw(st.integers(k_min, 16))] * count
    else:
        upper = draw(st.lists(st.integers(k_min, 16), min_size=count, max_size=count))
    budget = draw(st.integers(k_min * count, sum(upper)))
    tau = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    return dict(zip(names, values)), budget, k_min, tau, dict(zip(names, upper))


@settings(max_examples=300, deadline=None)
@given(allocation_problems())
def test_quotas_sum_exactly_and_respect_bounds(problem):
    importance, budget, k_min, tau, upper = problem
    quotas = allocate_quotas(importance, budget, k_min=k_min, tau=tau, max_per_matrix=upper)
    assert set(quotas) == set(importance)
    assert sum(quotas.values()) == budget
    assert all(k_min <= quotas[name] <= upper[name] for name in quotas)
    assert all(isinstance(k, int) for k in quotas.values())


@settings(max_examples=300, deadline=None)
@given(allocation_problems(same_bounds=True))
def test_more_importance_never_gets_fewer_experts(problem):
    importance, budget, k_min, tau, upper = problem
    quotas = allocate_quotas(importance, budget, k_min=k_min, tau=tau, max_per_matrix=upper)
    for a in importance:
        for b in importance:
            if importance[a] > importance[b]:
                assert quotas[a] >= quotas[b], (a, b)


@settings(max_examples=200, deadline=None)
@given(allocation_problems(same_bounds=True), st.integers(0, 11), st.floats(1.0, 50.0))
def test_raising_one_importance_never_lowers_its_quota(problem, index, factor):
    importance, budget, k_min, tau, upper = problem
    name = sorted(importance)[index % len(importance)]
    raised = dict(importance, **{name: max(importance[name], 1e-3) * factor})
    before = allocate_quotas(importance, budget, k_min=k_min, tau=tau, max_per_matrix=upper)
    after = allocate_quotas(raised, budget, k_min=k_min, tau=tau, max_per_matrix=upper)
    assert after[name] >= before[name]


def test_allocation_matches_proportional_share_when_no_bound_binds():
    importance = {"a": 1.0, "b": 3.0, "c": 4.0}
    quotas = allocate_quotas(importance, 16, max_per_matrix=bounds(importance, 32))
    assert quotas == {"a": 2, "b": 6, "c": 8}


def test_largest_remainder_and_clipping_by_water_filling():
    # Shares 20 * (0.05, 0.15, 0.8) = (1, 3, 16): c is capped at 8, its surplus of 8 is
    # re-spread 1:3 over a and b (real quotas 3, 9), never dropped or clipped after rounding.
    importance = {"a": 1.0, "b": 3.0, "c": 16.0}
    quotas = allocate_quotas(importance, 20, max_per_matrix={"a": 16, "b": 16, "c": 8})
    assert quotas == {"a": 3, "b": 9, "c": 8}
    # Real quotas (2.5, 2.5, 5) after k_min: the remainder tie goes to the lower name.
    tie = allocate_quotas({"b": 1.0, "a": 1.0, "c": 2.0}, 10, max_per_matrix=bounds("abc", 8))
    assert tie == {"a": 3, "b": 2, "c": 5}


def test_zero_importance_gets_k_min_and_all_zero_is_uniform():
    importance = {"dead": 0.0, "live": 0.7, "other": 0.2}
    quotas = allocate_quotas(importance, 12, k_min=2, max_per_matrix=bounds(importance, 8))
    assert quotas["dead"] == 2
    assert quotas == {"dead": 2, "live": 8, "other": 2}
    zeros = {name: 0.0 for name in "abcd"}
    assert allocate_quotas(zeros, 10, max_per_matrix=bounds(zeros, 8)) == {"a": 3, "b": 3, "c": 2, "d": 2}


def test_zero_importance_matrices_absorb_budget_once_the_others_are_full():
    importance = {"a": 1.0, "b": 0.0, "c": 0.0}
    quotas = allocate_quotas(importance, 11, max_per_matrix=bounds(importance, 4))
    assert quotas == {"a": 4, "b": 4, "c": 3}


def test_tau_sharpens_and_flattens():
    importance = {"a": 1.0, "b": 2.0, "c": 4.0}
    upper = bounds(importance, 32)
    assert allocate_quotas(importance, 21, tau=1.0, max_per_matrix=upper) == {"a": 3, "b": 6, "c": 12}
    assert allocate_quotas(importance, 21, tau=0.0, max_per_matrix=upper) == {"a": 7, "b": 7, "c": 7}
    assert allocate_quotas(importance, 21, tau=2.0, max_per_matrix=upper) == {"a": 1, "b": 4, "c": 16}


def test_identical_inputs_give_identical_quotas_whatever_the_key_order():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(10, generator=generator).tolist()
    importance = dict(zip(NAMES, values))
    upper = {name: 4 + i for i, name in enumerate(NAMES[:10])}
    reversed_importance = dict(reversed(list(importance.items())))
    first = allocate_quotas(importance, 47, tau=1.5, max_per_matrix=upper)
    assert allocate_quotas(importance, 47, tau=1.5, max_per_matrix=upper) == first
    assert allocate_quotas(reversed_importance, 47, tau=1.5, max_per_matrix=upper) == first


def test_scale_of_importance_does_not_matter():
    importance = {"a": 1e-30, "b": 3e-30, "c": 7e-30}
    scaled = {name: value * 1e60 for name, value in importance.items()}
    upper = bounds(importance, 16)
    assert allocate_quotas(importance, 20, max_per_matrix=upper) == allocate_quotas(scaled, 20, max_per_matrix=upper)


@pytest.mark.parametrize(
    "importance, budget, kwargs, error, match",
    [
        ({"a": 1.0, "b": 1.0}, 3, {"k_min": 2}, ValueError,
         r"total_budget=3 is infeasible for 2 matrices: it must lie in \[k_min \* matrices, sum of max_per_matrix\] = \[4, 16\]"),
        ({"a": 1.0, "b": 1.0}, 17, {}, ValueError, r"total_budget=17 is infeasible .* = \[2, 16\]"),
        ({"a": -1.0, "b": 1.0}, 4, {}, ValueError, r"importance must be finite and >= 0 .* -1.0 for 'a'"),
        ({"a": math.nan, "b": 1.0}, 4, {}, ValueError, r"importance must be finite and >= 0 .* nan for 'a'"),
        ({"a": math.inf, "b": 1.0}, 4, {}, ValueError, r"importance must be finite"),
        ({}, 4, {}, ValueError, r"importance must be a non-empty mapping"),
        ({"a": 1.0, "b": 1.0}, 4, {"k_min": 0}, ValueError, r"k_min must be >= 1, got 0"),
        ({"a": 1.0, "b": 1.0}, 4, {"tau": -1.0}, ValueError, r"tau must be finite and >= 0, got -1.0"),
        ({"a": 1.0, "b": 1.0}, 4.0, {}, TypeError, r"total_budget must be an int, got float"),
        ({"a": 1.0, "b": 1.0}, 4, {"k_min": 9}, ValueError, r"k_min=9 exceeds max_per_matrix .* \['a', 'b'\]"),
    ],
)
def test_bad_allocation_inputs_are_rejected(importance, budget, kwargs, error, match):
    with pytest.raises(error, match=match):
        allocate_quotas(importance, budget, max_per_matrix=bounds(importance, 8), **kwargs)


def test_max_per_matrix_must_name_the_same_modules():
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['z'\]"):
        allocate_quotas({"a": 1.0, "b": 1.0}, 4, max_per_matrix={"a": 8, "z": 8})
    with pytest.raises(ValueError, match=r"max_per_matrix\['a'\] must be >= 1, got 0"):
        allocate_quotas({"a": 1.0}, 1, max_per_matrix={"a": 0})


def test_uniform_quotas_spread_the_same_total():
    upper = {"a": 8, "b": 8, "c": 2}
    assert uniform_quotas(["c", "b", "a"], 13, max_per_matrix=upper) == {"a": 6, "b": 5, "c": 2}
    assert uniform_quotas(iter(["a", "b", "c"]), 6, max_per_matrix=upper) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match=r"modules must not repeat a name"):
        uniform_quotas(["a", "a"], 2, max_per_matrix={"a": 2})
    with pytest.raises(TypeError, match=r"modules must be an iterable of module names"):
        uniform_quotas(3, 2, max_per_matrix={"a": 2})
    with pytest.raises(TypeError, match=r"modules must be an iterable of module names"):
        uniform_quotas("a", 1, max_per_matrix={"a": 2})


def test_client_quotas_scale_the_budget():
    importance = {"a": 1.0, "b": 3.0, "c": 4.0}
    upper = bounds(importance, 32)
    assert client_budget(32, 0.5, 3) == 16
    assert client_budget(5, 0.5, 3) == 3  # 2.5 rounds up
    assert client_quotas(importance, 32, 1.0, max_per_matrix=upper) == allocate_quotas(
        importance, 32, max_per_matrix=upper
    )
    assert client_quotas(importance, 32, 0.5, max_per_matrix=upper) == {"a": 2, "b": 6, "c": 8}
    with pytest.raises(ValueError, match=r"budget_fraction=0.1 gives a budget of 3 experts, below k_min \* matrices = 2 \* 3 = 6"):
        client_quotas(importance, 32, 0.1, k_min=2, max_per_matrix=upper)
    for fraction in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"budget_fraction must lie in \(0, 1\]"):
            client_budget(32, fraction, 3)


@settings(max_examples=100, deadline=None)
@given(allocation_problems(same_bounds=True), st.floats(0.05, 1.0))
def test_client_quotas_never_exceed_the_full_budget_quotas_in_total(problem, fraction):
    importance, budget, k_min, tau, upper = problem
    scaled = math.floor(fraction * budget + 0.5)
    if scaled < k_min * len(importance):
        with pytest.raises(ValueError, match=r"gives a budget of"):
            client_quotas(importance, budget, fraction, k_min=k_min, tau=tau, max_per_matrix=upper)
        return
    quotas = client_quotas(importance, budget, fraction, k_min=k_min, tau=tau, max_per_matrix=upper)
    assert sum(quotas.values()) == scaled
    assert all(k_min <= k <= upper[name] for name, k in quotas.items())


def small_more_model():
    from torch import nn

    from smartfed import MoRELinear

    generator = torch.Generator().manual_seed(0)

    def layer(n):
        return MoRELinear(nn.Linear(8, 8), torch.randn(n, 8, generator=generator),
                          torch.randn(8, n, generator=generator), 2, seed=0)

    return nn.Sequential(layer(4), nn.ReLU(), layer(6))


def test_apply_quotas_sets_k_at_runtime_without_rebuilding():
    model = small_more_model()
    layers_before = [id(module) for module in model.modules()]
    router_before = model[0].router_weight
    apply_quotas(model, {"0": 3, "2": 6})
    assert (model[0].top_k, model[2].top_k) == (3, 6)
    assert [id(module) for module in model.modules()] == layers_before
    assert model[0].router_weight is router_before


def test_apply_quotas_rejects_mismatched_or_oversized_quotas():
    model = small_more_model()
    with pytest.raises(ValueError, match=r"quotas must name exactly the model's MoRE layers: missing \['2'\], extra \['9'\]"):
        apply_quotas(model, {"0": 1, "9": 1})
    with pytest.raises(ValueError, match=r"quotas\['0'\]=5 exceeds that layer's number of experts 4"):
        apply_quotas(model, {"0": 5, "2": 1})
    with pytest.raises(ValueError, match=r"quotas\['2'\] must be >= 1, got 0"):
        apply_quotas(model, {"0": 1, "2": 0})
    assert (model[0].top_k, model[2].top_k) == (2, 2)
