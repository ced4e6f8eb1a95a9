"""smartfed.experiments.intervals against cases whose answer is known."""

import numpy as np
import pytest

from smartfed.experiments import intervals as st


def test_constant_scores_give_a_point_interval():
    interval = st.bootstrap_interval(np.full((3, 50), 0.25), resamples=500)
    assert (interval.mean, interval.low, interval.high) == (0.25, 0.25, 0.25)
    assert (interval.seeds, interval.items) == (3, 50)


def test_one_seed_of_bernoulli_items_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    scores = (rng.random(2000) < 0.7).astype(float)
    interval = st.bootstrap_interval(scores, resamples=4000, seed=3)
    half = st.normal_half_width(scores.mean(), scores.size)
    assert interval.low < scores.mean() < interval.high
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.1)


def test_seed_noise_widens_the_interval():
    rng = np.random.default_rng(2)
    items = (rng.random((1, 1000)) < 0.5).astype(float)
    # Three seeds that agree item for item, and three whose accuracy swings by 0.3.
    steady = np.repeat(items, 3, axis=0)
    swinging = np.stack([np.where(rng.random(1000) < shift, 1.0, items[0]) for shift in (0.0, 0.3, 0.6)])
    steady_width = np.ptp([st.bootstrap_interval(steady, resamples=2000).low,
                           st.bootstrap_interval(steady, resamples=2000).high])
    swinging_interval = st.bootstrap_interval(swinging, resamples=2000)
    assert swinging_interval.high - swinging_interval.low > 3 * steady_width


def test_the_interval_is_reproducible_by_its_seed():
    scores = np.random.default_rng(4).random((2, 100))
    assert st.bootstrap_interval(scores, resamples=300, seed=5) == st.bootstrap_interval(scores, resamples=300, seed=5)
    assert st.bootstrap_interval(scores, resamples=300, seed=5) != st.bootstrap_interval(scores, resamples=300, seed=6)


def test_identical_methods_draw_no_conclusion():
    scores = (np.random.default_rng(5).random((3, 400)) < 0.6).astype(float)
    result = st.paired_difference(scores, scores, resamples=500, permutations=500)
    assert result.difference.mean == 0 and result.p_value == 1.0 and result.verdict == st.NO_CONCLUSION


def test_a_method_right_on_more_items_is_better_and_the_mirror_worse():
    rng = np.random.default_rng(6)
    reference = (rng.random((3, 500)) < 0.5).astype(float)
    method = reference.copy()
    wrong = np.argwhere(reference == 0)
    fixed = wrong[rng.permutation(len(wrong))[:120]]
    method[fixed[:, 0], fixed[:, 1]] = 1.0
    better = st.paired_difference(method, reference, resamples=2000, permutations=2000)
    assert better.verdict == "better" and better.difference.low > 0
    assert better.difference.mean == pytest.approx(120 / 1500)
    assert better.p_value < 0.002
    worse = st.paired_difference(reference, method, resamples=2000, permutations=2000)
    assert worse.verdict == "worse" and worse.difference.high < 0


def test_a_small_difference_on_few_items_is_no_conclusion():
    # 44 items, one seed, the method right on 2 more: the interval holds zero (issue 22's skills case).
    reference = np.zeros(44)
    reference[:25] = 1
    method = reference.copy()
    method[30:32] = 1
    result = st.paired_difference(method, reference, resamples=4000, permutations=4000)
    assert result.difference.low <= 0 <= result.difference.high
    assert result.verdict == st.NO_CONCLUSION and result.p_value > 0.2


def test_the_sign_flip_p_value_matches_the_exact_binomial_case():
    # Every difference is +1 on n cells: each flip gives an extreme mean only when all signs match,
    # so the exact two-sided p-value is 2 / 2**n.
    differences = np.ones((1, 6))
    p_value = st.sign_flip_p_value(differences, permutations=20_000, seed=1)
    assert p_value == pytest.approx(2 / 2 ** 6, abs=0.006)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="method and reference must be scored on the same seeds and items"):
        st.paired_difference(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"scores must be \[seeds, items\]"):
        st.bootstrap_interval(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="scores holds non-finite values"):
        st.bootstrap_interval([0.5, float("nan")])
    with pytest.raises(ValueError, match="resamples must be an int >= 100"):
        st.bootstrap_interval([0.5, 1.0], resamples=10)
    with pytest.raises(ValueError, match="level must lie in"):
        st.bootstrap_interval([0.5, 1.0], level=1.5)
