"""The v2 experiment suite: three target tasks and the public pool's source tasks, as rows.

Targets (file tasks: ``task.data`` reads the JSONL files ``write_suite`` writes):

- ``bbc_topic`` (classification, 5 single-token labels): the first 30 words of a BBC article in a
  template -> its topic. Clients train on the federated share; the test holds every test article,
  each under one ``federated`` template (seen) and one ``unseen`` template.
- ``spelled_sums`` (instruction, generated answer): a two-digit sum or difference -> its result in
  words (smartfed.tasks.spelled_sums). 1,500 federated problems; 600 test problems, half under a
  seen template and half under an unseen one.
- ``headlines`` (instruction, generated answer): an article's lead paragraph (40 words) -> its
  headline. Clients train on the federated share; every test article once, half seen, half unseen.

Pool sources (the public adapters, ``smartfed build-pool`` with ``task: suite_source``): BBC topic
and headline adapters on two topic subsets of the public share, arithmetic on the public problems,
number words on 0..999, and the distractor next_letter, each over several ``pool`` templates
(smartfed.tasks.templates), with a check split of items it did not train on (or, for the letters,
all of them) under a ``pool`` template (seen) and a ``check`` template (unseen).

Every row records its ``template`` id, whether that template was ``seen`` in training, and its
``item`` (the article key, the problem group, the number or the letter), which is what the
leakage checks (``leakage``) compare: no target test item is in any training row, and no test
article has a near-duplicate among the training articles.
"""

import string
from dataclasses import dataclass, field

import numpy as np

from smartfed.tasks import bbc_corpus, near_duplicates, spelled_sums
from smartfed.tasks.bbc_news import TOPICS
from smartfed.tasks.templates import templates

ARTICLE_WORDS = 30
LEAD_WORDS = 40
BBC_SOURCES = {"bpt": ("business", "politics", "tech"), "est": ("entertainment", "sports", "tech")}
SKILL_SIZES = {"test": 600, "federated": 1500, "public": 3000}
CHECK_ITEMS = 100
SUITE_VERSION = 1


@dataclass
class TaskRows:
    """One task's rows: ``train`` and ``held`` (a target's test rows, a source's check rows)."""

    name: str
    shape: str  # "classification" or "instruction"
    train: list
    held: list
    labels: tuple = ()
    description: str = ""
    generation_tokens: int = 0  # instruction: the longest answer, in words, for max_new_tokens
    extra: dict = field(default_factory=dict)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _row(shape, template, seen, item, answer, **fields_):
    prompt = template.render(**fields_)
    content = {"text": prompt, "label": answer} if shape == "classification" else {"prompt": prompt,
                                                                                    "response": answer}
    return {**content, "template": template.id, "seen": seen, "item": item}


def _held_variants(rng, count, mode):
    """Per held item, the template roles it is shown under: "both" (a seen and an unseen row
    each), or "one" (half of the items seen, half unseen, at random)."""
    if mode == "both":
        return [(True, False)] * count
    flags = np.zeros(count, dtype=bool)
    flags[rng.permutation(count)[:count // 2]] = True
    return [(bool(flag),) for flag in flags]


def _target(name, shape, family, train_items, test_items, render, *, seed, variants, labels=(), description=""):
    """Rows of a target: each training item under a random federated template, each test item
    under the roles ``_held_variants`` gives (seen: a federated template, unseen: an unseen one)."""
    rng = np.random.default_rng(seed)
    federated, unseen = templates(family, "federated"), templates(family, "unseen")
    train = [render(_pick(rng, federated), True, item) for item in train_items]
    held = [render(_pick(rng, federated if seen else unseen), seen, item)
            for item, roles in zip(test_items, _held_variants(rng, len(test_items), variants)) for seen in roles]
    return TaskRows(name=name, shape=shape, train=train, held=held, labels=tuple(labels), description=description)


def _source(name, shape, family, train_items, check_items, render, *, seed, copies=1, labels=(), description=""):
    """Rows of a pool source: each training item under ``copies`` distinct random pool templates;
    each check item under a pool template (seen) and the check template (unseen)."""
    rng = np.random.default_rng(seed)
    pool, check = templates(family, "pool"), templates(family, "check")
    train = [render(pool[i], True, item) for item in train_items for i in rng.permutation(len(pool))[:copies]]
    held = [row for item in check_items for row in (render(_pick(rng, pool), True, item), render(check[0], False, item))]
    return TaskRows(name=name, shape=shape, train=train, held=held, labels=tuple(labels), description=description)


def _article_renderers():
    def topic(template, seen, article):
        return _row("classification", template, seen, f"bbc:{article.key}", article.topic,
                    text=article.words(ARTICLE_WORDS))

    def headline(template, seen, article):
        lead = " ".join(article.lead.split()[:LEAD_WORDS])
        row = _row("instruction", template, seen, f"bbc:{article.key}", f" {article.title}", lead=lead)
        return {**row, "topic": article.topic}

    return topic, headline


def _problem_row(template, seen, problem, answer):
    return {**_row("instruction", template, seen, f"sum:{problem.group}", answer, **problem.fields()),
            "op": problem.op}


def bbc_tasks(*, split_seed=0):
    """{name: TaskRows} of the BBC targets (topic, headlines) and their pool sources."""
    shares = bbc_corpus.shares(split_seed=split_seed)
    topic, headline = _article_renderers()
    tasks = {
        "bbc_topic": _target("bbc_topic", "classification", "bbc_topic", shares["federated"], shares["test"], topic,
                             seed=split_seed + 11, variants="both", labels=TOPICS,
                             description=f"BBC topic: first {ARTICLE_WORDS} words of an article -> topic"),
        "headlines": _target("headlines", "instruction", "headline", shares["federated"], shares["test"], headline,
                             seed=split_seed + 12, variants="one",
                             description=f"BBC headline: lead paragraph ({LEAD_WORDS} words) -> headline"),
    }
    for suffix, topics in BBC_SOURCES.items():
        public = [article for article in shares["public"] if article.topic in topics]
        held = max(1, len(public) // 5)
        train, check = public[:-held], public[-held:]
        tasks[f"bbc_topic_{suffix}"] = _source(
            f"bbc_topic_{suffix}", "classification", "bbc_topic", train, check, topic, seed=split_seed + 21,
            labels=topics, description=f"BBC topic over {', '.join(topics)} (public share)")
        tasks[f"headlines_{suffix}"] = _source(
            f"headlines_{suffix}", "instruction", "headline", train, check, headline, seed=split_seed + 22,
            description=f"BBC headline over {', '.join(topics)} articles (public share)")
    tasks["headlines"].generation_tokens = max(len(row["response"].split()) for row in tasks["headlines"].train)
    return tasks


def skill_tasks(*, split_seed=0):
    """{name: TaskRows} of the spelled-sums target and its sources (arithmetic, number words,
    the next_letter distractor)."""
    shares = spelled_sums.split_groups(split_seed=split_seed, **SKILL_SIZES)
    words = spelled_sums.number_words

    def spelled(template, seen, problem):
        return _problem_row(template, seen, problem, f" {words(problem.result)}")

    def digits(template, seen, problem):
        return _problem_row(template, seen, problem, f" {problem.result}")

    def number(template, seen, n):
        return _row("instruction", template, seen, f"n:{n}", f" {words(n)}", n=n)

    def letter(template, seen, x):
        return _row("instruction", template, seen, f"letter:{x}", f" {chr(ord(x) + 1)}", x=x)

    rng = np.random.default_rng(split_seed + 31)
    check_numbers = sorted(int(n) for n in rng.choice(np.arange(200, 1000), size=CHECK_ITEMS, replace=False))
    train_numbers = sorted(set(range(1000)) - set(check_numbers))
    # The check problems are whole groups the adapter never trains on (a sum's commuted twin included).
    public = shares["public"]
    check_groups = list(dict.fromkeys(p.group for p in public))[-CHECK_ITEMS:]
    check = [next(p for p in public if p.group == group) for group in check_groups]
    public_train = [p for p in public if p.group not in set(check_groups)]
    letters = list(string.ascii_lowercase[:25])
    tasks = {
        "spelled_sums": _target("spelled_sums", "instruction", "spelled_sum", shares["federated"], shares["test"],
                                spelled, seed=split_seed + 13, variants="one",
                                description="two-digit a+b or a-b -> the result in words"),
        "arithmetic": _source("arithmetic", "instruction", "arithmetic", public_train, check,
                              digits, seed=split_seed + 32, description="two-digit a+b or a-b -> the result in digits"),
        "number_words": _source("number_words", "instruction", "number_words", train_numbers, check_numbers, number,
                                seed=split_seed + 33, copies=2, description="a number 0..999 -> it in words"),
        "next_letter": _source("next_letter", "instruction", "next_letter", letters, letters, letter,
                               seed=split_seed + 34, copies=3, description="a letter a..y -> the next one (distractor)"),
    }
    for name in ("spelled_sums", "arithmetic", "number_words", "next_letter"):
        tasks[name].generation_tokens = max(len(row["response"].split()) for row in tasks[name].train)
    return tasks


def suite_tasks(*, split_seed=0):
    """Every task of the suite: {name: TaskRows}."""
    return {**bbc_tasks(split_seed=split_seed), **skill_tasks(split_seed=split_seed)}


TARGETS = ("bbc_topic", "spelled_sums", "headlines")


def leakage(tasks):
    """Per target: the test items found in any training rows of the suite (the target's own and
    every source's), and the test articles with a near-duplicate among the training articles.
    Every count is zero for a clean suite."""
    train_items = {row["item"] for rows in tasks.values() for row in rows.train}
    articles = {article.key: article for article in bbc_corpus.deduplicated()[0]}
    trained_articles = sorted(item[len("bbc:"):] for item in train_items if item.startswith("bbc:"))
    report = {}
    for name in TARGETS:
        test_items = sorted({row["item"] for row in tasks[name].held})
        found = sorted(set(test_items) & train_items)
        entry = {"test_items": len(test_items), "test_items_in_training": len(found), "examples": found[:5]}
        test_articles = [item[len("bbc:"):] for item in test_items if item.startswith("bbc:")]
        if test_articles:
            pairs = near_duplicates.cross_pairs([articles[key].text for key in test_articles],
                                                [articles[key].text for key in trained_articles])
            entry["test_articles_with_near_duplicate_in_training"] = len({query for query, _, _ in pairs})
        report[name] = entry
    return report
