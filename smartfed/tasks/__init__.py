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
it is built from a vocabulary layout, not by ``load_task``.
"""

from smartfed.tasks import bbc_news, skills
from smartfed.tasks.text_task import TextTask, encode_fixed_length, label_token_ids

TASK_BUILDERS = {
    "bbc_news": bbc_news.target_task,
    "bbc_news_source": bbc_news.source_task,
    "skills_target": skills.target_task,
    "skills_arithmetic": skills.arithmetic_task,
    "skills_number_words": skills.number_words_task,
    "skills_next_letter": skills.next_letter_task,
    "skills_previous_letter": skills.previous_letter_task,
}


def load_task(name, tokenizer, **options) -> TextTask:
    """The task ``name`` (one of ``TASK_BUILDERS``) tokenized with ``tokenizer``."""
    if name not in TASK_BUILDERS:
        raise ValueError(f"task name must be one of {sorted(TASK_BUILDERS)}, got {name!r}")
    return TASK_BUILDERS[name](tokenizer, **options)


__all__ = ["TASK_BUILDERS", "TextTask", "encode_fixed_length", "label_token_ids", "load_task"]
