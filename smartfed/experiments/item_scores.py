"""Per-item results of an evaluation: what the paired statistics of ``smartfed report`` compare.

``item_scores(model, examples, ...)`` scores every held-out example as the engine's ``evaluate``
does, batch for batch (the same batches in the same order, so that each item's result is the one
inside the aggregate the run recorded), and returns columns, one value per example in the
examples' order:

- classification (``Examples``, ``ClassificationSequences``): ``prediction`` (class id),
  ``correct`` (0/1) and ``margin`` (the best label's score minus the runner-up's: a small margin
  is an answer that another CPU's rounding could flip);
- instruction (``InstructionExamples`` with generation settings): ``prediction`` (the greedy
  answer's text), ``exact_match``, ``f1`` and ``rouge_l`` of each answer, for every held-out
  example (``max_examples`` bounds the generation during training only; with it unset the answers
  are those of the engine's own generation, batch for batch).

``item_metadata`` adds the ``template``, ``seen`` and ``item`` columns a v2 suite file carries.
"""

import torch

from smartfed.federated.data import ClassificationSequences, Examples, InstructionExamples, answer_logits
from smartfed.federated.evaluation import exact_match, greedy_generate, token_f1

CLASSIFICATION_METRIC = "correct"
METADATA_COLUMNS = ("template", "seen", "item")


def _margins(scores):
    top = torch.topk(scores.float(), k=min(2, scores.shape[1]), dim=1).values
    return (top[:, 0] - top[:, 1]) if top.shape[1] == 2 else top[:, 0]


@torch.no_grad()
def _classification(model, examples, label_token_ids, batch_size, device):
    count = len(examples)
    prediction, correct, margin = [0] * count, [0] * count, [0.0] * count
    if isinstance(examples, Examples):
        batches = [torch.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    else:
        batches = examples._sorted_batches(batch_size)  # the batches ClassificationSequences.evaluate scores
    index_of_labels = torch.as_tensor(label_token_ids) if not isinstance(label_token_ids[0], tuple) else None
    for index in batches:
        if isinstance(examples, Examples):
            scores = answer_logits(model, examples.input_ids[index].to(device))[:, index_of_labels.to(device)]
        elif index_of_labels is None:
            scores = examples.label_scores(model, index, label_token_ids, device)
        else:
            scores = examples._last_logits(model, index, device)[:, index_of_labels.to(device)]
        chosen = scores.argmax(dim=1).cpu()
        gaps = _margins(scores).cpu()
        for row, example in enumerate(index.tolist()):
            prediction[example] = int(chosen[row])
            correct[example] = int(chosen[row] == examples.labels[example])
            margin[example] = float(gaps[row])
    return {"metric": CLASSIFICATION_METRIC, "prediction": prediction, "correct": correct, "margin": margin}


@torch.no_grad()
def _instruction(model, examples, device):
    """Greedy answers in the batches of ``InstructionExamples.generated_scores``, scored one by one."""
    from smartfed.federated.evaluation import _rouge_scorer

    settings = examples.generation
    if settings is None:
        raise ValueError("instruction examples without generation settings have no per-item answers to score")
    count = len(examples)
    order = torch.arange(count)
    order = order[torch.argsort(examples.lengths[:count] - examples.response_lengths[:count], stable=True)]
    predictions = [""] * count
    for start in range(0, count, settings.batch_size):
        index = order[start:start + settings.batch_size]
        answers = greedy_generate(model, examples.prompts(index), max_new_tokens=settings.max_new_tokens,
                                  stop_token_ids=settings.stop_token_ids, pad_token_id=examples.pad_token_id,
                                  device=device)
        for example, ids in zip(index.tolist(), answers):
            predictions[example] = settings.decode(ids)
    references = examples.references
    scorer = _rouge_scorer()
    columns = {"metric": "exact_match", "prediction": predictions}
    if "exact_match" in settings.metrics:
        columns["exact_match"] = [exact_match(p, r) for p, r in zip(predictions, references)]
    if "f1" in settings.metrics:
        columns["f1"] = [token_f1(p, r) for p, r in zip(predictions, references)]
    if "rouge_l" in settings.metrics:
        columns["rouge_l"] = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return columns


def item_scores(model, examples, *, label_token_ids, batch_size, device="cpu"):
    """Per-item columns of ``examples`` scored by ``model`` (in eval mode, its state loaded)."""
    if isinstance(examples, InstructionExamples):
        return _instruction(model, examples, device)
    if isinstance(examples, (Examples, ClassificationSequences)):
        return _classification(model, examples, label_token_ids, batch_size, device)
    raise TypeError(f"examples must be Examples, ClassificationSequences or InstructionExamples, got "
                    f"{type(examples).__name__}")


def item_metadata(path, count):
    """The ``template`` / ``seen`` / ``item`` columns of the held-out file ``path`` (a v2 suite
    file), its first ``count`` rows; {} when the file lacks them."""
    from smartfed.tasks.files import locate, read_columns

    resolved, format_name, _ = locate(path, "auto", "task.data.eval")
    try:
        columns = read_columns(resolved, format_name, list(METADATA_COLUMNS))
    except ValueError:
        return {}
    return {name: values[:count] for name, values in columns.items()}


_base_means = {}


def base_model_means(config, task, evaluation):
    """{"base_<metric>": mean} of the frozen base model (no adapter) on ``evaluation``, the
    per-item scores' means (accuracy for classification, as ``base_accuracy``); once per base
    model and task in a process."""
    from smartfed.experiments.assets import build_base_model

    key = (config.model.model_dump_json(), task.fingerprint, len(evaluation))
    if key not in _base_means:
        model = build_base_model(config.model, config.seed)
        columns = item_scores(model, evaluation, label_token_ids=task.label_token_ids,
                              batch_size=config.federation.eval_batch_size)
        names = {"correct": "base_accuracy"}
        _base_means[key] = {names.get(name, f"base_{name}"): sum(values) / len(values)
                            for name, values in columns.items() if name in ("correct", "exact_match", "f1", "rouge_l")}
    return dict(_base_means[key])
