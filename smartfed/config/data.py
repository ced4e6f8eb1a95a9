"""The ``task.data`` section of a run config: a task read from the user's own files (docs/data.md).

Torch-free, like the rest of the config package. Two shapes, told apart by ``shape``:

- ``classification``: a text column and a label column over a fixed label set; the model answers
  ``prompt_template`` (``{text}`` filled in) with one of the label words, each scored by its
  full log-likelihood.
- ``instruction``: prompt / response columns, or one chat ``messages`` column, formatted with the
  tokenizer's chat template or a plain template; the loss is on the response tokens only, and
  the held-out examples are also scored by greedy generation at the rounds ``generation`` names.

Every mapping forbids unknown keys; values are strict (no "3" for 3) and bounded.

``train`` names the one file split over the simulated clients (``smartfed train``, Flower's
simulation engine). Left null, every client reads its own data: on a Flower deployment each
SuperNode names its file in its node config (``data-path``), so the run config carries no client
data and no client path; ``eval`` is then the server's own held-out file (optional).
"""

import string
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from smartfed.config.errors import ConfigError
from smartfed.config.limits import MAX_DATA_LABELS, MAX_DATA_ROWS, MAX_EXAMPLE_TOKENS
from smartfed.config.number_types import Section

SHAPES = ("classification", "instruction")
# "arrow": a folder written by ``datasets.Dataset.save_to_disk``.
FORMATS = ("auto", "jsonl", "csv", "parquet", "arrow")
TEMPLATES = ("auto", "chat", "plain")
GENERATION_METRICS = ("exact_match", "f1", "rouge_l")

Name = Annotated[str, Field(min_length=1, max_length=200)]
PathText = Annotated[str, Field(min_length=1, max_length=4096)]
Template = Annotated[str, Field(min_length=1, max_length=10_000)]


def check_template(template, field):
    """``template`` with exactly one ``{field}`` and no other replacement field (``{{``/``}}``
    stand for literal braces)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError(f"is not a valid template ({error}); write literal braces as {{{{ and }}}}") from None
    if names != [field]:
        raise ConfigError(f"must hold {{{field}}} exactly once and no other {{...}} field, got {names}")
    return template


class GenerationSection(Section):
    """Greedy generation on the held-out examples, scored against their responses: at every round
    divisible by ``every_rounds`` (0: never during training; ``smartfed evaluate`` generates
    whenever it is not 0), on the first ``max_examples`` held-out examples (all when null)."""

    every_rounds: Annotated[int, Field(ge=0, le=100_000)] = 0
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 32
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    max_examples: Optional[Annotated[int, Field(ge=1, le=MAX_DATA_ROWS)]] = None
    metrics: Annotated[list[Literal[GENERATION_METRICS]], Field(min_length=1, max_length=3)] = Field(
        default_factory=lambda: list(GENERATION_METRICS))


class _DataBase(Section):
    """What both shapes share: where the examples are and how they are cut and split."""

    # A JSONL, CSV or Parquet file, or a save_to_disk folder; null: each client's own (a node's data-path).
    train: Optional[PathText] = None
    # The held-out examples; null: ``eval_fraction`` of ``train`` (of a node's own file when
    # ``train`` is null, and the server then holds none: the clients' scores are the round's).
    eval: Optional[PathText] = None
    format: Literal[FORMATS] = "auto"  # auto: by suffix (.jsonl/.json, .csv, .parquet; a folder is arrow)
    eval_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.2
    split_seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    max_examples: Optional[Annotated[int, Field(ge=1, le=MAX_DATA_ROWS)]] = None  # the first N rows of each file
    max_length: Annotated[int, Field(ge=2, le=MAX_EXAMPLE_TOKENS)] = 512  # tokens of prompt + answer
    truncation: bool = True  # false: an example longer than max_length is an error
    partition_column: Optional[Name] = None  # the client of each row, for a "natural" partition


class ClassificationData(_DataBase):
    shape: Literal["classification"]
    text_column: Name = "text"
    label_column: Name = "label"
    labels: Annotated[list[Name], Field(min_length=2, max_length=MAX_DATA_LABELS)]
    # The answer text of each label (default: " " + label); several tokens each is fine.
    label_words: Optional[Annotated[list[Name], Field(min_length=2, max_length=MAX_DATA_LABELS)]] = None
    prompt_template: Template = "{text}\nAnswer:"

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"must be distinct, {repeated} repeat")
        return labels

    @field_validator("prompt_template")
    @classmethod
    def _text_field(cls, template):
        return check_template(template, "text")

    @model_validator(mode="after")
    def _one_word_per_label(self):
        if self.label_words is not None and len(self.label_words) != len(self.labels):
            raise ConfigError(f"must give one word per label: {len(self.label_words)} words for "
                              f"{len(self.labels)} labels", key="label_words")
        return self

    def answer_words(self):
        return list(self.label_words) if self.label_words is not None else [f" {label}" for label in self.labels]


class InstructionData(_DataBase):
    shape: Literal["instruction"]
    prompt_column: Name = "prompt"
    response_column: Name = "response"
    # A chat column (a list of {"role", "content"} turns ending on the assistant's); when set it
    # replaces prompt_column / response_column and needs the tokenizer's chat template.
    messages_column: Optional[Name] = None
    # auto: the tokenizer's chat template when it has one, else plain_template.
    template: Literal[TEMPLATES] = "auto"
    plain_template: Template = "{prompt}\n"
    generation: GenerationSection = Field(default_factory=GenerationSection)

    @field_validator("plain_template")
    @classmethod
    def _prompt_field(cls, template):
        return check_template(template, "prompt")

    @model_validator(mode="after")
    def _messages_need_chat(self):
        if self.messages_column is not None and self.template == "plain":
            raise ConfigError("needs a chat template: set template to 'auto' or 'chat'", key="messages_column")
        return self


DataSection = Annotated[Union[ClassificationData, InstructionData], Field(discriminator="shape")]

__all__ = [
    "ClassificationData", "DataSection", "FORMATS", "GENERATION_METRICS", "GenerationSection", "InstructionData",
    "SHAPES", "TEMPLATES", "check_template",
]
