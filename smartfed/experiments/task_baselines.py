"""What a run's accuracy is compared with: the frozen base model without any adapter, and always
answering the evaluation split's most frequent label. Both are scored as the runs are (argmax
over the task's label tokens at the answer position) on the run's own evaluation examples, once
per base model and task in a process; ``smartfed sweep`` records them in ``text_task.json``."""

import hashlib
import json

import torch

from smartfed.experiments.assets import build_base_model
from smartfed.federated.data import answer_accuracy_count, answer_logits

_scored = {}


def majority_accuracy(labels, num_labels) -> float:
    """The share of the most frequent label among ``labels``."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_labels)
    return float(counts.max()) / max(1, len(labels))


def base_model_accuracy(model, examples, label_token_ids, *, batch_size) -> float:
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            input_ids = examples.input_ids[start:start + batch_size]
            labels = examples.labels[start:start + batch_size]
            hits += answer_accuracy_count(answer_logits(model, input_ids), labels, label_token_ids)
    return hits / max(1, len(examples))


def task_baselines(config, layout, evaluation) -> dict:
    """{"base_accuracy", "majority_accuracy", "eval_examples"} of ``config``'s base model on the
    ``evaluation`` examples of ``layout`` (its ``label_token_ids``, ``num_labels``)."""
    key = hashlib.sha256(json.dumps([config.model.model_dump(), config.seed, evaluation.input_ids.shape[0],
                                     layout.label_token_ids], default=str).encode()
                         + evaluation.input_ids.numpy().tobytes()).hexdigest()
    if key not in _scored:
        model = build_base_model(config.model, config.seed)
        _scored[key] = {
            "base_accuracy": base_model_accuracy(model, evaluation, layout.label_token_ids,
                                                 batch_size=config.federation.eval_batch_size),
            "majority_accuracy": majority_accuracy(evaluation.labels, len(layout.label_token_ids)),
            "eval_examples": len(evaluation),
        }
    return dict(_scored[key])
