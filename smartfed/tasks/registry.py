"""The built-in text tasks by name: ``load_task(name, tokenizer, **options)``."""


from smartfed.tasks import bbc_news, skills
from smartfed.tasks.text_task import TextTask

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

