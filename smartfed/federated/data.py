"""What the engine trains and scores: examples answered at the last position, and their split
across clients.

An example is a fixed-length prompt whose answer is one label token predicted at the last
position. Loss is cross-entropy over the whole vocabulary there; accuracy is the argmax over the
label tokens only (exact match within the label set). Tasks (``smartfed.tasks``) produce the
tensors; the experiment layer hands them to ``split_clients``.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from smartfed.federated.partition import partition_labels
from smartfed.federated.seeding import STREAM_PARTITION, derived_seed


@dataclass
class Examples:
    input_ids: torch.Tensor  # [M, L], int64; the answer is predicted at the last position
    labels: torch.Tensor  # [M] class ids in [0, num_labels)

    def __len__(self):
        return int(self.labels.shape[0])

    def subset(self, indices):
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index])


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
    validation: Examples = None  # held out of the training examples before the split; None: none
    root: Examples = None  # the server's root set, held out after the validation split; None: none


def split_clients(train: Examples, evaluation: Examples, federation, *, seed, validation=None) -> FederatedData:
    """``train`` split across ``federation.num_clients`` clients by label (``federation.partition``:
    Dirichlet(``alpha``) or IID, at least ``min_examples_per_client`` each), deterministic by ``seed``;
    ``validation`` is passed through for the server."""
    parts = partition_labels(
        train.labels.numpy(), federation.num_clients, method=federation.partition, alpha=federation.alpha,
        seed=derived_seed(seed, STREAM_PARTITION), min_per_client=federation.min_examples_per_client,
    )
    return FederatedData(clients=[train.subset(part) for part in parts], evaluation=evaluation, partitions=parts,
                         validation=validation)
