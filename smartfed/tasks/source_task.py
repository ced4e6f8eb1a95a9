"""A public adapter's source task of the v2 suite, tokenized for the pool builder.

``suite_source_task(tokenizer, source=NAME)`` tokenizes the rows ``smartfed.tasks.suite`` derives
for pool source ``NAME`` (the same rows ``python -m smartfed.tasks.suite_files`` writes to
``pool/NAME/{train,check}.jsonl``; ``train_sha256`` is that file's sha256) with the file tasks'
formatting: classification rows as ``{text}`` answered by one label word, instruction rows as
``{prompt}`` followed by the response and the end-of-sequence token. ``check_templates`` and
``check_seen`` say under which template each check row is shown and whether the adapter trained on it.
"""

import hashlib
import json
from dataclasses import dataclass, field

from smartfed.tasks.formatting import TokenizedSplit, classification_split, instruction_split, label_sequences

MAX_LENGTH = 256
PROMPT_TEMPLATE = "{text}"  # classification: the row's text is the whole prompt
PLAIN_TEMPLATE = "{prompt}"  # instruction: likewise


@dataclass
class SourceTask:
    name: str
    source: str
    shape: str  # "classification" or "instruction"
    train: TokenizedSplit
    check: TokenizedSplit
    check_templates: list
    check_seen: list
    train_sha256: str
    check_sha256: str
    templates: list  # the template ids the adapter trains on
    label_words: tuple = ()
    label_token_ids: tuple = ()  # one id per label (classification)
    pad_token_id: int = 0
    stop_token_ids: tuple = ()
    max_new_tokens: int = 0
    tokenizer: object = field(default=None, repr=False)
    description: str = ""

    @property
    def num_labels(self):
        return len(self.label_token_ids)

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self) -> str:
        """Hash of what an adapter trained on this task sees: the rows' hashes and their token ids."""
        digest = hashlib.sha256(json.dumps([self.name, self.source, self.shape, self.train_sha256, self.check_sha256,
                                            list(self.label_token_ids)]).encode())
        for split in (self.train, self.check):
            digest.update(json.dumps([split.token_ids, split.prompt_lengths, split.labels]).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        return {"name": self.name, "source": self.source, "shape": self.shape, "labels": list(self.label_words),
                "train_examples": len(self.train), "check_examples": len(self.check),
                "check_seen": sum(self.check_seen), "templates": self.templates,
                "train_sha256": self.train_sha256, "check_sha256": self.check_sha256,
                "fingerprint": self.fingerprint()}


def _tokenized(rows, tokenizer, shape, labels, where):
    options = {"max_length": MAX_LENGTH, "truncation": True, "path": where,
               "numbers": list(range(1, len(rows) + 1))}
    if shape == "classification":
        index = {label: position for position, label in enumerate(labels)}
        return classification_split(tokenizer, [row["text"] for row in rows], [index[row["label"]] for row in rows],
                                    prompt_template=PROMPT_TEMPLATE, answer_tokens=1, **options)
    return instruction_split(tokenizer, [row["prompt"] for row in rows], [row["response"] for row in rows],
                             template="plain", plain_template=PLAIN_TEMPLATE, eos_token_id=tokenizer.eos_token_id,
                             **options)


def suite_source_task(tokenizer, *, source, split_seed=0) -> SourceTask:
    """The pool source ``source`` of the v2 suite (smartfed.tasks.suite), tokenized."""
    from smartfed.tasks import suite
    from smartfed.tasks.suite_files import rows_sha256

    tasks = suite.suite_tasks(split_seed=split_seed)
    if source not in tasks or source in suite.TARGETS:
        sources = sorted(set(tasks) - set(suite.TARGETS))
        raise ValueError(f"source must be one of the suite's pool sources {sources}, got {source!r}")
    rows = tasks[source]
    label_ids = ()
    words = tuple(f" {label}" for label in rows.labels)
    if rows.shape == "classification":
        sequences = label_sequences(tokenizer, words)
        if any(len(ids) != 1 for ids in sequences):
            raise ValueError(f"source {source!r}: every label word must be one token, got {sequences}")
        label_ids = tuple(ids[0] for ids in sequences)
    longest = max(len(tokenizer.encode(row["response"], add_special_tokens=False)) for row in rows.train + rows.held) \
        if rows.shape == "instruction" else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SourceTask(
        name="suite_source", source=source, shape=rows.shape,
        train=_tokenized(rows.train, tokenizer, rows.shape, rows.labels, f"pool/{source}/train.jsonl"),
        check=_tokenized(rows.held, tokenizer, rows.shape, rows.labels, f"pool/{source}/check.jsonl"),
        check_templates=[row["template"] for row in rows.held], check_seen=[row["seen"] for row in rows.held],
        train_sha256=rows_sha256(rows.train), check_sha256=rows_sha256(rows.held),
        templates=sorted({row["template"] for row in rows.train}), label_words=words, label_token_ids=label_ids,
        pad_token_id=int(pad if pad is not None else 0),
        stop_token_ids=() if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),),
        max_new_tokens=longest + 2, tokenizer=tokenizer, description=rows.description,
    )


SOURCE_BUILDERS = {"suite_source": suite_source_task}
