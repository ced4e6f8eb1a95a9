"""A task read from files (``smartfed.tasks.file_task``) handed to the engine: its examples, their
split over the simulated clients, and a summary and plot of that split; or, where each client
holds its own data (``task.data.train`` null), a SuperNode's own files and the server's held-out one.

``file_federated_data`` is what ``runs.federated_data`` does for the built-in tasks: the
validation split held out of the training examples first (stratified by label), then the rest
partitioned over ``federation.num_clients`` by flwr-datasets' partitioners
(``smartfed.federated.partition.partition_examples``: IID, Dirichlet by label, or natural by
``task.data.partition_column``), deterministic by the run's seed. The partition is cached beside the
task's tokenized examples.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from smartfed.config.data import GENERATION_METRICS
from smartfed.data_errors import DatasetError
from smartfed.federated.data import ClassificationSequences, FederatedData, InstructionExamples
from smartfed.federated.evaluation import GenerationSettings
from smartfed.federated.partition import label_counts, label_skew, partition_examples
from smartfed.federated.protocol import DATA_PATH, EVAL_PATH
from smartfed.federated.seeding import STREAM_PARTITION, STREAM_VALIDATION, derived_seed
from smartfed.tasks.files import resolve_path


def task_examples(task, split="train", *, generate=True):
    """The examples of ``task``'s ``split`` ("train" or "eval"); the held-out instruction
    examples carry the task's generation settings (unless ``generate`` is false)."""
    tokens = task.train if split == "train" else task.evaluation
    if task.shape == "classification":
        longest = max(len(ids) for ids in task.label_token_ids) if task.multi_token_labels else 1
        return ClassificationSequences.build(tokens.token_ids, tokens.labels, pad_token_id=task.pad_token_id,
                                             answer_tokens=longest, groups=tokens.groups)
    generation = None
    if split == "eval" and generate and task.generation is not None:
        settings = task.generation
        generation = GenerationSettings(
            every_rounds=settings.every_rounds, max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size, decode=task.decode, stop_token_ids=task.stop_token_ids,
            max_examples=settings.max_examples, metrics=tuple(settings.metrics),
        )
    return InstructionExamples.build(tokens.token_ids, tokens.prompt_lengths, pad_token_id=task.pad_token_id,
                                     references=tokens.references, generation=generation, groups=tokens.groups)


def file_federated_data(task, federation, *, seed, validation_size=0) -> FederatedData:
    """``task``'s training examples (less ``validation_size`` held out for validation) split over
    ``federation.num_clients`` clients by ``federation.partition`` ("iid", "dirichlet" with
    ``federation.alpha``, or "natural"), each with at least ``federation.min_examples_per_client``;
    a ``DatasetError`` when a client would have too few."""
    from smartfed.experiments.runs import hold_out

    train, evaluation = task_examples(task, "train"), task_examples(task, "eval")
    validation = None
    if validation_size:
        train, validation = hold_out(train, validation_size, seed=derived_seed(seed, STREAM_VALIDATION))
    settings = {"task": task.fingerprint, "validation_size": validation_size, "seed": seed,
                "num_clients": federation.num_clients, "partition": federation.partition, "alpha": federation.alpha,
                "min_examples_per_client": federation.min_examples_per_client}
    parts = _cached_partition(task, settings, lambda: partition_examples(
        train.labels.numpy(), federation.num_clients, method=federation.partition, alpha=federation.alpha,
        seed=derived_seed(seed, STREAM_PARTITION), groups=train.groups,
        min_per_client=federation.min_examples_per_client,
    ))
    return FederatedData(clients=[train.subset(part) for part in parts], evaluation=evaluation, partitions=parts,
                         validation=validation)


# What an instruction task adds to a round's scores (metrics.jsonl), in the order they are shown.
INSTRUCTION_SCORES = ("perplexity", *GENERATION_METRICS)


def scores_text(record, loss_note="") -> str:
    """``loss L accuracy A`` of a round's (or an evaluation's) ``record``, with the instruction
    scores it holds; ``loss_note`` follows the loss."""
    def shown(value):
        return "-" if value is None else f"{value:.4f}"

    extra = "".join(f" {key} {shown(record[key])}" for key in INSTRUCTION_SCORES if key in record)
    return f"loss {shown(record.get('loss'))}{loss_note} accuracy {shown(record.get('accuracy'))}{extra}"


def file_task_summary(task, data: FederatedData) -> dict:
    """The file task's summary (``FileTask.summary``) with its split over the clients
    (``partition_summary``) and one ``line`` saying both."""
    summary = {**task.summary(), "partition": partition_summary(data, task.label_words)}
    sizes = [client["examples"] for client in summary["partition"]["clients"]]
    truncated = summary["truncated_train_examples"] + summary["truncated_eval_examples"]
    summary["line"] = (f"task {task.name}: {summary['train_examples']} training examples over {len(sizes)} clients "
                       f"{sizes}, {summary['eval_examples']} held out; {truncated} cut to task.data.max_length; "
                       f"tokenized ids {'read from' if task.cache_hit else 'written to'} {task.cache_file}")
    return summary


def node_data_section(data, node_config):
    """``data`` (a ``task.data`` section without ``train``) with a SuperNode's own files: its
    node config's ``data-path`` (and ``eval-path`` when given; else ``eval_fraction`` of its file
    is held out). The server's held-out file, ``data.eval``, is never the node's to open."""
    path = node_config.get(DATA_PATH)
    if not isinstance(path, str) or not path.strip():
        raise DatasetError(f"node config {DATA_PATH}: missing; this run's clients hold their own data (task.data.train "
                           f"is null): start the SuperNode with --node-config \"partition-id=I num-partitions=N "
                           f"{DATA_PATH}='/path/to/its/data.jsonl'\"")
    held = node_config.get(EVAL_PATH)
    if held is not None and (not isinstance(held, str) or not held.strip()):
        raise DatasetError(f"node config {EVAL_PATH}: must be a path, got {held!r:.40}")
    return data.model_copy(update={
        "train": str(resolve_path(path, f"node config {DATA_PATH}")),
        "eval": None if held is None else str(resolve_path(held, f"node config {EVAL_PATH}")),
    })


def held_out_data(task) -> FederatedData:
    """The server's side of a run whose clients hold their own data: no client examples, and the
    server's own held-out examples (``task.data.eval``) when it has them."""
    evaluation = task_examples(task, "eval") if len(task.evaluation) else None
    return FederatedData(clients=None, evaluation=evaluation, partitions=None)


def own_data(task, client_id) -> FederatedData:
    """A SuperNode's side of such a run: client ``client_id`` holds its own file's training
    examples and scores the global state on its own held-out ones (loss, accuracy, perplexity:
    generating answers is the server's, on its own held-out file)."""
    train = task_examples(task, "train")
    return FederatedData(clients={client_id: train}, evaluation=None, partitions=None,
                         held_out={client_id: task_examples(task, "eval", generate=False)})


def _cached_partition(task, settings, compute):
    """The partition of ``settings`` from the cache beside the task's tokenized examples, or
    ``compute()``d and cached: a second run on the same files loads neither datasets nor
    flwr-datasets (whose import alone takes seconds)."""
    if task.cache_file is None:
        return compute()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(task.cache_file).parent / "partitions" / f"{key}.json"
    try:
        return [np.asarray(part, dtype=np.int64) for part in json.loads(path.read_text())["parts"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: computed again
    parts = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".partition-", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump({"settings": settings, "parts": [part.tolist() for part in parts]}, stream)
    os.replace(staging, path)
    return parts


def partition_summary(data: FederatedData, label_names=()) -> dict:
    """Each client's example count and label histogram (classification: by ``label_names``;
    instruction: one "examples" bar), the mean label skew, and the token lengths per client."""
    names = list(label_names) or ["examples"]
    labels = np.concatenate([client.labels.numpy() for client in data.clients])
    parts, start = [], 0
    for client in data.clients:
        parts.append(np.arange(start, start + len(client)))
        start += len(client)
    counts = label_counts(labels, parts, len(names))
    clients = []
    for client_id, (client, row) in enumerate(zip(data.clients, counts)):
        lengths = client.lengths.numpy() if hasattr(client, "lengths") else np.full(len(client),
                                                                                    client.input_ids.shape[1])
        clients.append({"client": client_id, "examples": len(client),
                        "labels": {name: int(count) for name, count in zip(names, row)},
                        "tokens": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                                   "max": int(lengths.max())}})
    return {"clients": clients, "total": int(len(labels)), "labels": names,
            "label_skew": label_skew(labels, parts, len(names)) if len(names) > 1 else 0.0}


def format_partition(summary) -> str:
    """The summary as a plain table: one line per client."""
    names = summary["labels"] if len(summary["labels"]) > 1 else []  # one label: the examples column says it
    header = ["client", "examples", *names, "tokens min/median/max"]
    rows = [[str(c["client"]), str(c["examples"]), *(str(c["labels"][n]) for n in names),
             f"{c['tokens']['min']}/{c['tokens']['median']:g}/{c['tokens']['max']}"] for c in summary["clients"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines + [f"{summary['total']} examples; label skew {summary['label_skew']:.3f}"])


def plot_partition(summary, path) -> Path:
    """A stacked bar chart of each client's examples by label, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    clients = [c["client"] for c in summary["clients"]]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(clients) + 2), 3.5))
    bottom = np.zeros(len(clients))
    for name in summary["labels"]:
        heights = np.array([c["labels"][name] for c in summary["clients"]], dtype=float)
        axis.bar(clients, heights, bottom=bottom, label=name)
        bottom += heights
    axis.set_xlabel("client")
    axis.set_ylabel("examples")
    axis.set_xticks(clients)
    axis.set_title(f"{summary['total']} examples over {len(clients)} clients (label skew {summary['label_skew']:.2f})")
    if len(summary["labels"]) > 1:
        axis.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
