import numpy as np
import pytest

from smartfed.federated.partition import dirichlet_partition, iid_partition, label_counts, label_skew, partition_labels


def _labels(num_examples=600, num_labels=5, seed=3):
    return np.random.default_rng(seed).integers(num_labels, size=num_examples)


def _assert_exact_cover(parts, num_examples):
    joined = np.concatenate(parts)
    assert len(joined) == num_examples
    assert np.array_equal(np.sort(joined), np.arange(num_examples))


def test_dirichlet_small_alpha_is_far_more_skewed_than_iid():
    labels = _labels()
    skewed = dirichlet_partition(labels, 6, alpha=0.1, seed=0, min_per_client=10)
    iid = iid_partition(labels, 6, seed=0, min_per_client=10)
    _assert_exact_cover(skewed, len(labels))
    _assert_exact_cover(iid, len(labels))
    assert label_skew(labels, skewed, 5) > 0.4
    assert label_skew(labels, iid, 5) < 0.1
    broad = dirichlet_partition(labels, 6, alpha=100.0, seed=0, min_per_client=10)
    assert label_skew(labels, broad, 5) < 0.1


def test_dirichlet_small_alpha_leaves_clients_with_few_labels():
    labels = _labels()
    def dominant_share(parts):
        counts = label_counts(labels, parts, 5)
        return np.median(counts.max(axis=1) / counts.sum(axis=1))

    assert dominant_share(dirichlet_partition(labels, 6, alpha=0.05, seed=1, min_per_client=5)) > 0.5
    assert dominant_share(iid_partition(labels, 6, seed=1, min_per_client=5)) < 0.3


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0])
def test_dirichlet_meets_the_minimum_per_client(alpha):
    labels = _labels(num_examples=200)
    parts = dirichlet_partition(labels, 10, alpha=alpha, seed=7, min_per_client=15)
    assert min(len(part) for part in parts) >= 15
    _assert_exact_cover(parts, 200)


def test_iid_sizes_differ_by_at_most_one():
    parts = iid_partition(_labels(num_examples=103), 4, seed=2)
    sizes = sorted(len(part) for part in parts)
    assert sizes == [25, 26, 26, 26]


@pytest.mark.parametrize("method", ["dirichlet", "iid"])
def test_partitions_are_deterministic_by_seed(method):
    labels = _labels()
    first = partition_labels(labels, 5, method=method, seed=11, alpha=0.3, min_per_client=4)
    again = partition_labels(labels, 5, method=method, seed=11, alpha=0.3, min_per_client=4)
    other = partition_labels(labels, 5, method=method, seed=12, alpha=0.3, min_per_client=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_bad_arguments_are_named():
    labels = _labels(num_examples=20)
    with pytest.raises(ValueError, match="num_clients \\* min_per_client = 30 exceeds the 20 examples"):
        dirichlet_partition(labels, 3, alpha=0.5, seed=0, min_per_client=10)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(labels, 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="labels must be a 1-D array"):
        iid_partition(labels.reshape(4, 5), 2, seed=0)
    with pytest.raises(ValueError, match="method must be 'dirichlet' or 'iid'"):
        partition_labels(labels, 2, method="shards", seed=0)
