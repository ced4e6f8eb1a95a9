"""A small synthetic classification task answered by a causal LM, for tiny federated runs.

Token layout of a vocabulary of V ids: the last ``num_labels`` ids are label tokens, the one
before them is the separator, the rest are content. Every source task s owns, for each label c,
a few *signal* tokens; the remaining content ids are filler. An example is ``seq_len`` content
tokens, ``signals_per_example`` of which are signal tokens of its label, followed by the
separator; the answer is the label token, predicted at the separator position.

- Source task s (what a public adapter was trained on): signals come from task s's sets only.
- Target task (the federated task): each signal token comes from a random source task's set for
  the label, so every source adapter knows part of the target's vocabulary of signals.

Loss is cross-entropy over the whole vocabulary at the answer position; accuracy is the argmax
over the label tokens only.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from smartfed.federated.config import SYNTHETIC_TASK
from smartfed.federated.partition import partition_labels
from smartfed.federated.seeding import STREAM_EVAL_DATA, STREAM_PARTITION, STREAM_TRAIN_DATA, derived_seed

TARGET_TASK = -1


@dataclass(frozen=True)
class TokenLayout:
    vocab_size: int
    label_token_ids: tuple
    separator_id: int
    signal_tokens: tuple  # [source_task][label] -> tuple of token ids
    filler_ids: tuple

    @property
    def num_labels(self):
        return len(self.label_token_ids)


@dataclass
class Examples:
    input_ids: torch.Tensor  # [M, seq_len + 1], int64, last column the separator
    labels: torch.Tensor  # [M] class ids in [0, num_labels)

    def __len__(self):
        return int(self.labels.shape[0])

    def subset(self, indices):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index])


def make_layout(vocab_size, num_labels, num_source_tasks, signal_tokens_per_class, *, seed):
    content = vocab_size - num_labels - 1
    needed = num_source_tasks * num_labels * signal_tokens_per_class
    if content - needed < 2:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {num_labels} label tokens, a separator and "
            f"{needed} signal tokens ({num_source_tasks} tasks x {num_labels} labels x "
            f"{signal_tokens_per_class}) leave fewer than 2 filler tokens"
        )
    order = np.random.default_rng(seed).permutation(content)
    signal = order[:needed].reshape(num_source_tasks, num_labels, signal_tokens_per_class)
    return TokenLayout(
        vocab_size=vocab_size,
        label_token_ids=tuple(range(vocab_size - num_labels, vocab_size)),
        separator_id=vocab_size - num_labels - 1,
        signal_tokens=tuple(tuple(tuple(int(t) for t in row) for row in task) for task in signal),
        filler_ids=tuple(int(t) for t in np.sort(order[needed:])),
    )


def generate_examples(layout, task, num_examples, *, seq_len, signals_per_example, seed):
    """``num_examples`` examples of source task ``task`` (0-based) or of ``TARGET_TASK``."""
    num_tasks = len(layout.signal_tokens)
    if task != TARGET_TASK and not 0 <= task < num_tasks:
        raise ValueError(f"task must be TARGET_TASK or a source task in [0, {num_tasks}), got {task!r}")
    if not 1 <= signals_per_example <= seq_len:
        raise ValueError(f"signals_per_example must lie in [1, seq_len={seq_len}], got {signals_per_example!r}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(layout.num_labels, size=num_examples)
    filler = np.asarray(layout.filler_ids)
    signal = np.asarray(layout.signal_tokens)  # [tasks, labels, per_class]
    tokens = filler[rng.integers(len(filler), size=(num_examples, seq_len))]
    for row in range(num_examples):
        positions = rng.choice(seq_len, size=signals_per_example, replace=False)
        if task == TARGET_TASK:
            sources = rng.integers(num_tasks, size=signals_per_example)
        else:
            sources = np.full(signals_per_example, task)
        picks = rng.integers(signal.shape[2], size=signals_per_example)
        tokens[row, positions] = signal[sources, labels[row], picks]
    separator = np.full((num_examples, 1), layout.separator_id)
    return Examples(
        input_ids=torch.from_numpy(np.concatenate([tokens, separator], axis=1)).long(),
        labels=torch.from_numpy(labels).long(),
    )


def answer_logits(model, input_ids):
    """Logits [B, V] at the answer (last) position."""
    return model(input_ids=input_ids, logits_to_keep=1).logits[:, -1, :]


def answer_loss(logits, labels, label_token_ids):
    targets = torch.as_tensor(label_token_ids, device=logits.device)[labels]
    return F.cross_entropy(logits.float(), targets)


def answer_accuracy_count(logits, labels, label_token_ids):
    index = torch.as_tensor(label_token_ids, device=logits.device)
    return int((logits[:, index].argmax(dim=-1) == labels).sum())


def batch_indices(num_examples, batch_size, generator):
    """A random batch (without replacement within the batch) of example indices."""
    size = min(batch_size, num_examples)
    return torch.randperm(num_examples, generator=generator)[:size]


@dataclass
class FederatedData:
    clients: list  # Examples per client id
    evaluation: Examples  # held-out examples of the target task for the global model
    partitions: list  # indices into the training examples, per client


def federated_data(config, layout):
    """Target-task training examples split across ``config.federation.num_clients`` clients
    (Dirichlet or IID by label) and a held-out evaluation set; deterministic by ``config.seed``."""
    if config.task.name != SYNTHETIC_TASK:
        return federated_text_data(config, layout)
    task, fed = config.task, config.federation
    options = {"seq_len": task.seq_len, "signals_per_example": task.signals_per_example}
    train = generate_examples(
        layout, TARGET_TASK, task.train_examples, seed=derived_seed(config.seed, STREAM_TRAIN_DATA), **options
    )
    evaluation = generate_examples(
        layout, TARGET_TASK, task.eval_examples, seed=derived_seed(config.seed, STREAM_EVAL_DATA), **options
    )
    parts = partition_labels(
        train.labels.numpy(), fed.num_clients, method=fed.partition, alpha=fed.alpha,
        seed=derived_seed(config.seed, STREAM_PARTITION), min_per_client=fed.min_examples_per_client,
    )
    return FederatedData(clients=[train.subset(part) for part in parts], evaluation=evaluation, partitions=parts)


def federated_text_data(config, task):
    """FederatedData of a smartfed.tasks text task: its training split partitioned across clients
    like the synthetic task's (``config.federation``, seeded by ``config.seed``) and its
    evaluation split."""
    fed = config.federation
    train = Examples(task.train_input_ids, task.train_labels)
    parts = partition_labels(
        train.labels.numpy(), fed.num_clients, method=fed.partition, alpha=fed.alpha,
        seed=derived_seed(config.seed, STREAM_PARTITION), min_per_client=fed.min_examples_per_client,
    )
    return FederatedData(
        clients=[train.subset(part) for part in parts],
        evaluation=Examples(task.eval_input_ids, task.eval_labels),
        partitions=parts,
    )
