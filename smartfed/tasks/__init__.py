"""Offline text tasks answered by a causal LM with one label token, for the real experiments.

Every task is a ``TextTask``: fixed-length prompts (token ids ``[M, L]``, the answer is predicted
at the last position), one single-token label word per class, and fixed train / evaluation
splits. That is exactly what the federated harness trains and scores (cross-entropy at the answer
position, accuracy = argmax over the label tokens, which for single-token answers is exact match
within the label set). ``load_task(name, tokenizer, **options)`` builds one by name:

- ``bbc_news``: BBC News topic (5 labels), the federated target task (smartfed.tasks.bbc_news)
- ``bbc_news_source``: BBC News topic over a subset of labels, on the articles kept public for
  the adapter pool (disjoint from the target's train and evaluation articles)
- ``skills_target``, ``skills_arithmetic``, ``skills_number_words``, ``skills_next_letter``,
  ``skills_previous_letter``:
  the skill-composition suite (smartfed.tasks.skills)

``smartfed.tasks.synthetic`` is the tiny token-level task of configs/tiny.yaml (no tokenizer);
it is built from a vocabulary layout, not by ``load_task``. ``smartfed.tasks.files`` reads a
task from the user's own files (classification or instruction, docs/data.md), configured by the
run config's ``task.data`` (``smartfed.config.data``); ``smartfed.tasks.headlines`` writes the
worked example's files (BBC headlines) into a folder the user names.

The names below load on first use, so that importing one task module loads no torch.
"""

_EXPORTS = {
    "TASK_BUILDERS": "smartfed.tasks.registry",
    "load_task": "smartfed.tasks.registry",
    "TextTask": "smartfed.tasks.text_task",
    "encode_fixed_length": "smartfed.tasks.text_task",
    "label_token_ids": "smartfed.tasks.text_task",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'smartfed.tasks' has no attribute {name!r}")
    if _EXPORTS[name] == "smartfed.tasks.registry":
        from smartfed.tasks import registry as module
    else:
        from smartfed.tasks import text_task as module
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
