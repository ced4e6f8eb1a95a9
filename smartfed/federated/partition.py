"""Split example indices across clients: Dirichlet(alpha) label skew or IID, deterministic by seed.

In-house rather than ``flwr_datasets.partitioner``: flwr-datasets is not installed here, its
partitioners work on Hugging Face ``datasets.Dataset`` objects (another heavy dependency) while
our examples are in-memory tensors, and it enforces a minimum partition size by resampling up to
a fixed number of tries, which fails for small alpha; here a deterministic top-up guarantees the
minimum instead.
"""

import numpy as np


def _check_common(labels, num_clients, min_per_client):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if not isinstance(min_per_client, (int, np.integer)) or min_per_client < 0:
        raise ValueError(f"min_per_client must be an int >= 0, got {min_per_client!r}")
    if num_clients * min_per_client > len(labels):
        raise ValueError(
            f"num_clients * min_per_client = {num_clients * min_per_client} exceeds the "
            f"{len(labels)} examples"
        )
    return labels


def iid_partition(labels, num_clients, *, seed, min_per_client=1):
    """Shuffle and deal out: client sizes differ by at most one."""
    labels = _check_common(labels, num_clients, min_per_client)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def _top_up(parts, min_per_client, rng):
    """Move random examples from the largest client to the smallest until all have the minimum."""
    while True:
        sizes = [len(part) for part in parts]
        smallest = int(np.argmin(sizes))
        if sizes[smallest] >= min_per_client:
            return parts
        largest = int(np.argmax(sizes))
        pick = int(rng.integers(sizes[largest]))
        parts[smallest].append(parts[largest].pop(pick))


def dirichlet_partition(labels, num_clients, *, alpha, seed, min_per_client=1):
    """For each label, split its examples across clients by proportions ~ Dirichlet(alpha).

    Small alpha gives each client few labels; large alpha approaches IID. Clients left below
    ``min_per_client`` are topped up from the largest client (deterministically).
    """
    labels = _check_common(labels, num_clients, min_per_client)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(int(i) for i in chunk)
    parts = _top_up(parts, min_per_client, rng)
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def partition_labels(labels, num_clients, *, method, seed, alpha=0.5, min_per_client=1):
    if method == "iid":
        return iid_partition(labels, num_clients, seed=seed, min_per_client=min_per_client)
    if method == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha=alpha, seed=seed, min_per_client=min_per_client)
    raise ValueError(f"method must be 'dirichlet' or 'iid', got {method!r}")


def label_counts(labels, parts, num_labels):
    """Matrix [clients, labels] of example counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[part], minlength=num_labels) for part in parts])


def label_skew(labels, parts, num_labels):
    """Mean total-variation distance between each client's label distribution and the global one
    (0 = every client looks like the whole data set)."""
    counts = label_counts(labels, parts, num_labels).astype(np.float64)
    local = counts / counts.sum(axis=1, keepdims=True)
    overall = np.bincount(np.asarray(labels), minlength=num_labels) / len(labels)
    return float(0.5 * np.abs(local - overall).sum(axis=1).mean())
