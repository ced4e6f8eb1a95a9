"""A task read from the user's own files (``task.data``, smartfed.config.data): its training and
held-out examples as token ids, tokenized once per content and cached.

``load_file_task(data, tokenizer)`` returns a ``FileTask``: the shape, the two
``TokenizedSplit`` s, the answer tokens (``label_token_ids``: one id per label when every label
word is one token, which keeps the one-forward scoring of the built-in tasks; a tuple of ids per
label otherwise; empty for instruction), the pad and stop tokens, and the generation settings.

The token ids are cached under ``SMARTFED_CACHE`` (default ``~/.cache/smartfed``)
``/tokenized/KEY.safetensors``, KEY a hash of the files' bytes, the data settings and the
tokenizer: a second run on the same files hashes them and reads the ids back without loading
``datasets`` or tokenizing. The cache file is written atomically and only after every check passed.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smartfed.tasks.files import (
    DatasetError, check_labels, check_messages, check_texts, locate, read_columns,
)
from smartfed.tasks.formatting import (
    TokenizedSplit, classification_split, instruction_split, label_sequences, resolve_template,
)

# Bump when the tokenization below changes what it produces for the same inputs.
TOKENIZATION_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMARTFED_CACHE", Path.home() / ".cache" / "smartfed")) / "tokenized"


@dataclass
class FileTask:
    name: str
    shape: str  # "classification" or "instruction"
    train: TokenizedSplit
    evaluation: TokenizedSplit
    label_words: tuple = ()
    label_token_ids: tuple = ()  # ints (every label one token) or tuples of ints; () for instruction
    pad_token_id: int = 0
    stop_token_ids: tuple = ()  # generation ends on any of these
    tokenizer: object = field(default=None, repr=False)  # decodes generated answers
    generation: object = None  # the GenerationSection of an instruction task
    template: str = "plain"
    cache_file: str = None
    cache_hit: bool = False
    fingerprint: str = ""

    @property
    def num_labels(self):
        return len(self.label_token_ids)

    @property
    def multi_token_labels(self):
        return bool(self.label_token_ids) and isinstance(self.label_token_ids[0], tuple)

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def summary(self) -> dict:
        def lengths(split):
            values = [len(ids) for ids in split.token_ids]
            return {"min": min(values), "median": int(np.median(values)), "max": max(values)} if values else None

        return {
            "name": self.name, "shape": self.shape, "template": self.template, "labels": list(self.label_words),
            "train_examples": len(self.train), "eval_examples": len(self.evaluation),
            "truncated_train_examples": self.train.truncated, "truncated_eval_examples": self.evaluation.truncated,
            "train_tokens": lengths(self.train), "fingerprint": self.fingerprint, "cache_file": self.cache_file,
            "cache_hit": self.cache_hit,
        }


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides how the tokenizer encodes and renders text."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items())).encode())
    special = {"chat_template": getattr(tokenizer, "chat_template", None), "eos": tokenizer.eos_token_id,
               "pad": tokenizer.pad_token_id, "bos": getattr(tokenizer, "bos_token_id", None)}
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _columns(data, *, partition=True):
    if data.shape == "classification":
        columns = [data.text_column, data.label_column]
    elif data.messages_column is not None:
        columns = [data.messages_column]
    else:
        columns = [data.prompt_column, data.response_column]
    if partition and data.partition_column is not None and data.partition_column not in columns:
        columns.append(data.partition_column)
    return columns


ROW = "__row__"  # the file's 1-based row number of each example, carried through the split


def _tokenize(data, tokenizer, rows, path, *, template, answer_tokens):
    numbers = rows[ROW]
    groups = None
    if data.partition_column is not None and data.partition_column in rows:
        groups = [None if value is None else str(value) for value in rows[data.partition_column]]
        if None in groups:
            raise DatasetError(f"{path}: row {numbers[groups.index(None)]}: column {data.partition_column!r} "
                               "(task.data.partition_column) is empty")
    checked = {"path": path, "numbers": numbers}
    options = {"max_length": data.max_length, "truncation": data.truncation, "groups": groups, **checked}
    if data.shape == "classification":
        texts = check_texts(rows[data.text_column], column=data.text_column, **checked)
        labels = check_labels(rows[data.label_column], data.labels, column=data.label_column, **checked)
        return classification_split(tokenizer, texts, labels, prompt_template=data.prompt_template,
                                    answer_tokens=answer_tokens, **options)
    eos = tokenizer.eos_token_id
    if data.messages_column is not None:
        messages = check_messages(rows[data.messages_column], column=data.messages_column, **checked)
        return instruction_split(tokenizer, None, None, template=template, plain_template=data.plain_template,
                                 eos_token_id=eos, messages=messages, **options)
    prompts = check_texts(rows[data.prompt_column], column=data.prompt_column, **checked)
    responses = check_texts(rows[data.response_column], column=data.response_column, **checked)
    return instruction_split(tokenizer, prompts, responses, template=template, plain_template=data.plain_template,
                             eos_token_id=eos, **options)


def _numbered(rows):
    return {**rows, ROW: list(range(1, len(next(iter(rows.values()))) + 1))}


def _held_out(rows, fraction, seed, path):
    """(training rows, held-out rows): a seeded random ``fraction`` of the rows held out."""
    count = len(next(iter(rows.values())))
    held = int(round(fraction * count))
    if held < 1 or held >= count:
        raise DatasetError(f"{path}: {count} rows cannot give task.data.eval_fraction={fraction} of them as held-out "
                           "examples and keep the rest for training (name a task.data.eval file)")
    order = np.random.default_rng(seed).permutation(count)

    def pick(index):
        return {name: [values[i] for i in np.sort(index)] for name, values in rows.items()}

    return pick(order[held:]), pick(order[:held])


def _save(path: Path, splits, meta):
    import safetensors.numpy

    tensors, info = {}, {}
    for name, split in splits.items():
        tensors[f"{name}.tokens"] = np.asarray([t for ids in split.token_ids for t in ids], dtype=np.int64)
        tensors[f"{name}.lengths"] = np.asarray([len(ids) for ids in split.token_ids], dtype=np.int64)
        tensors[f"{name}.prompt_lengths"] = np.asarray(split.prompt_lengths, dtype=np.int64)
        tensors[f"{name}.labels"] = np.asarray(split.labels, dtype=np.int64)
        info[name] = {"groups": split.groups, "references": split.references, "truncated": split.truncated}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".tokenized-", dir=path.parent)
    os.close(handle)
    try:
        safetensors.numpy.save_file(tensors, staging, metadata={"splits": json.dumps(info), "meta": json.dumps(meta)})
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _load_cached(path: Path):
    import safetensors
    import safetensors.numpy

    try:
        tensors = safetensors.numpy.load_file(str(path))
        with safetensors.safe_open(str(path), framework="np") as handle:
            info = json.loads(handle.metadata()["splits"])
    except (OSError, ValueError, KeyError, safetensors.SafetensorError):
        return None  # a damaged cache entry is rebuilt, never trusted
    splits = {}
    for name, extra in info.items():
        ends = np.cumsum(tensors[f"{name}.lengths"])
        tokens = tensors[f"{name}.tokens"].tolist()
        starts = np.concatenate([[0], ends[:-1]])
        splits[name] = TokenizedSplit(
            token_ids=[tokens[s:e] for s, e in zip(starts, ends)],
            prompt_lengths=tensors[f"{name}.prompt_lengths"].tolist(), labels=tensors[f"{name}.labels"].tolist(),
            groups=extra["groups"], references=extra["references"], truncated=extra["truncated"],
        )
    return splits


def task_name(shape, train=None, eval=None) -> str:
    """How reports name a file task: its training (else held-out) file's folder and stem."""
    path = train or eval
    return f"{Path(path).parent.name}/{Path(path).stem}" if path else f"{shape} (each client's own data)"


def load_file_task(data, tokenizer, *, cache_dir=None, name=None) -> FileTask:
    """The ``FileTask`` of ``data`` (a ``ClassificationData`` or ``InstructionData``) tokenized
    with ``tokenizer``; every problem is a ``DatasetError`` (one line naming the file, column or
    setting). Where ``data.train`` is null (each client reads its own data) only ``data.eval``
    is read, the server's held-out file: the training split is empty, and so is the held-out one
    without it."""
    train = locate(data.train, data.format, "task.data.train") if data.train is not None else None
    held = locate(data.eval, data.format, "task.data.eval") if data.eval is not None else None
    template = "plain" if data.shape == "classification" else resolve_template(data.template, tokenizer)
    label_ids = ()
    if data.shape == "classification":
        words = tuple(data.answer_words())
        label_ids = label_sequences(tokenizer, words)
        if all(len(ids) == 1 for ids in label_ids):
            label_ids = tuple(ids[0] for ids in label_ids)
    settings = data.model_dump(exclude={"generation", "train", "eval"})
    key_source = {"version": TOKENIZATION_VERSION, "data": settings, "train": None if train is None else train[2],
                  "eval": None if held is None else held[2], "tokenizer": tokenizer_fingerprint(tokenizer),
                  "template": template}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.safetensors"
    splits = _load_cached(cache_file) if cache_file.is_file() else None
    hit = splits is not None
    if not hit and (train is not None or held is not None):
        answer_tokens = max((len(ids) if isinstance(ids, tuple) else 1) for ids in label_ids) if label_ids else 0
        splits = _read_splits(data, tokenizer, train, held, template=template, answer_tokens=answer_tokens)
        _save(cache_file, splits, key_source)
    splits = splits or {}
    empty = TokenizedSplit(token_ids=[], prompt_lengths=[], labels=[])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return FileTask(
        name=task_name(data.shape, data.train, data.eval) if name is None else name, shape=data.shape,
        train=splits.get("train", empty), evaluation=splits.get("eval", empty),
        label_words=tuple(data.answer_words()) if data.shape == "classification" else (),
        label_token_ids=label_ids, pad_token_id=int(pad if pad is not None else 0),
        stop_token_ids=() if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),),
        tokenizer=tokenizer, generation=getattr(data, "generation", None), template=template,
        cache_file=str(cache_file) if splits else None, cache_hit=hit, fingerprint=key,
    )


def _read_splits(data, tokenizer, train, held, *, template, answer_tokens):
    """{"train", "eval"} tokenized from the files ``train`` and ``held`` (each ``locate``'s
    (path, format, hash), or None): without ``held`` the held-out split is ``eval_fraction`` of
    ``train``; without ``train`` there is only the held-out one."""
    options = {"template": template, "answer_tokens": answer_tokens}
    splits, eval_rows = {}, None
    if train is not None:
        rows = _numbered(read_columns(train[0], train[1], _columns(data), max_rows=data.max_examples))
        if held is None:
            rows, eval_rows = _held_out(rows, data.eval_fraction, data.split_seed, train[0])
        splits["train"] = _tokenize(data, tokenizer, rows, train[0], **options)
    if held is not None:
        # Only the training examples are partitioned: the held-out file needs no partition column.
        eval_rows = _numbered(read_columns(held[0], held[1], _columns(data, partition=False),
                                           max_rows=data.max_examples))
    splits["eval"] = _tokenize(data, tokenizer, eval_rows, (held or train)[0], **options)
    return splits
