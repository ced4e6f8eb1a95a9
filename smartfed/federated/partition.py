"""Split example indices across clients, deterministic by seed.

- ``partition_examples`` (tasks read from files): flwr-datasets' partitioners on a
  ``datasets.Dataset`` of the examples' labels and groups: ``IidPartitioner``,
  ``DirichletPartitioner`` by label (it resamples up to 10 times until every client has the
  minimum, then gives up: a clear ``DatasetError``), ``NaturalIdPartitioner`` by a column (one
  client per distinct value, in sorted order of the values).
- ``partition_labels`` (the built-in tasks): the project's own IID and Dirichlet(alpha) split,
  kept because the committed results of the built-in tasks depend on its exact split, and because
  its deterministic top-up meets the minimum per client where flwr-datasets' resampling fails
  (small alpha, few examples).
"""

import contextlib
import io
import warnings

import numpy as np

from smartfed.data_errors import DatasetError


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


def _check_parts(parts, method, min_per_client, total):
    for client, part in enumerate(parts):
        if len(part) < max(1, min_per_client):
            what = "no examples" if len(part) == 0 else f"{len(part)} examples, fewer than {min_per_client}"
            raise DatasetError(f"federation.partition: client {client} has {what} after the {method} partition of "
                               f"{total} examples over {len(parts)} clients (fewer clients, more data, or a larger "
                               "alpha)")
    return parts


def partition_examples(labels, num_clients, *, method, seed, alpha=0.5, groups=None, min_per_client=1):
    """Indices of the examples of each client (sorted), by flwr-datasets' partitioners: ``method``
    "iid", "dirichlet" (by ``labels``, concentration ``alpha``) or "natural" (one client per
    distinct value of ``groups``, in sorted order; there must be exactly ``num_clients``). A client
    with fewer than ``min_per_client`` examples (or none) is a ``DatasetError``."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    labels = np.asarray(labels)
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DatasetError(f"federation.num_clients must be an int >= 1, got {num_clients!r}")
    columns = {"index": np.arange(len(labels)), "label": labels}
    if method == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif method == "dirichlet":
        if not alpha > 0:
            raise DatasetError(f"federation.alpha must be > 0, got {alpha!r}")
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                           min_partition_size=max(1, min_per_client), self_balancing=False,
                                           shuffle=True, seed=seed)
    elif method == "natural":
        if groups is None:
            raise DatasetError("federation.partition: 'natural' needs task.data.partition_column, the column that "
                               "names each example's client")
        values = sorted({str(value) for value in groups})
        if len(values) != num_clients:
            raise DatasetError(f"task.data.partition_column has {len(values)} distinct values {values[:5]}"
                               f"{'...' if len(values) > 5 else ''}, but federation.num_clients is {num_clients}")
        # Client i holds the i-th value in sorted order, whatever order the rows came in.
        columns["group"] = np.searchsorted(values, np.asarray([str(value) for value in groups]))
        partitioner = NaturalIdPartitioner(partition_by="group")
    else:
        raise DatasetError(f"federation.partition must be 'iid', 'dirichlet' or 'natural', got {method!r}")
    if len(labels) < num_clients:
        raise DatasetError(f"federation.partition: {len(labels)} training examples cannot give each of "
                           f"{num_clients} clients one")
    datasets.disable_progress_bars()
    partitioner.dataset = datasets.Dataset.from_dict(columns)
    # The Dirichlet resampling warns on every try (a failure after the last one is reported
    # instead) and the natural partitioner draws a progress bar on stderr whatever is configured.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        parts = _load_partitions(partitioner, method, num_clients, min_per_client)
    parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    return _check_parts(parts, method, min_per_client, len(labels))


def _load_partitions(partitioner, method, num_clients, min_per_client):
    try:
        if method == "natural":
            partitioner.num_partitions  # builds the partition id -> natural id map
            by_id = {partitioner.partition_id_to_natural_id[i]: i for i in range(num_clients)}
            return [partitioner.load_partition(by_id[client])["index"] for client in range(num_clients)]
        return [partitioner.load_partition(client)["index"] for client in range(num_clients)]
    except ValueError as error:
        if method == "dirichlet":
            raise DatasetError(f"federation.partition: the dirichlet partition left a client with fewer than "
                               f"{max(1, min_per_client)} examples in every one of flwr-datasets' tries (raise "
                               "federation.alpha, or lower federation.num_clients or min_examples_per_client)") from None
        raise DatasetError(f"federation.partition: the {method} partition failed: "
                           f"{str(error).splitlines()[0][:200]}") from None
