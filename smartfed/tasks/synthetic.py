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
    """``num_examples`` examples of source task ``task`` (0-based) or of ``TARGET_TASK``:
    (input_ids [M, seq_len + 1] int64, the last column the separator; labels [M] class ids)."""
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
    input_ids = torch.from_numpy(np.concatenate([tokens, separator], axis=1)).long()
    return input_ids, torch.from_numpy(labels).long()
