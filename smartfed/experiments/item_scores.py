"""Per-item results of an evaluation: what the paired statistics of ``smartfed report`` compare.

``item_scores(model, examples, ...)`` is each held-out example's own result, one value per
example in the examples' order, from the examples' own ``evaluate`` (the same batches, so each
item's result is the one inside the aggregate the run recorded; smartfed.federated.data):

- classification (``Examples``, ``ClassificationSequences``): ``prediction`` (class id),
  ``correct`` (0/1) and ``margin`` (the best label's score minus the runner-up's);
- instruction (``InstructionExamples`` with generation settings): ``prediction`` (the greedy
  answer's text), ``exact_match``, ``f1`` and ``rouge_l`` of each answer, for every held-out
  example (``max_examples`` bounds the generation during training only).

``item_metadata`` adds the ``template``, ``seen`` and ``item`` columns a v2 suite file carries.
"""

import torch

from smartfed.federated.data import ClassificationSequences, Examples, InstructionExamples

METADATA_COLUMNS = ("template", "seen", "item")


@torch.no_grad()
def item_scores(model, examples, *, label_token_ids, batch_size, device="cpu"):
    """Per-item columns of ``examples`` scored by ``model`` (in eval mode, its state loaded)."""
    if isinstance(examples, InstructionExamples):
        return examples.answer_items(model, device)
    if isinstance(examples, (Examples, ClassificationSequences)):
        return examples.evaluate(model, label_token_ids=label_token_ids, batch_size=batch_size, device=device,
                                 items=True)["items"]
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
