"""The prompt templates of the v2 suite, by task family and role.

Public adapters are trained on several paraphrases of their task, so every family has a few
templates per role, and the roles never share a template:

- ``pool``: what the public adapters of the family train on;
- ``federated``: what the target task's clients train on (and half of its test items);
- ``unseen``: test items only: neither the pool nor the federation saw them;
- ``check``: a pool adapter's own check of how it does on a wording it did not train on.

A template's id (``<family>/<role>-<n>``) is recorded on every item, so evaluation reports
accuracy on seen and unseen templates separately. Fields: ``{text}`` (the start of an article),
``{lead}`` (an article's first paragraph), ``{a}``, ``{b}``, ``{op}`` (``+``/``-``), ``{opword}``
(``plus``/``minus``), ``{n}`` (a number), ``{x}`` (a letter).
"""

import string
from dataclasses import dataclass

ROLES = ("pool", "federated", "unseen", "check")


@dataclass(frozen=True)
class Template:
    family: str
    role: str
    number: int
    text: str

    @property
    def id(self):
        return f"{self.family}/{self.role}-{self.number}"

    def render(self, **fields):
        return self.text.format(**fields)


TEXTS = {
    "bbc_topic": {
        "pool": ["{text}\nTopic:", "Article: {text}\nCategory:", "{text}\n\nThis news story belongs to the section:",
                 "Classify this BBC story by topic.\n{text}\nAnswer:"],
        "federated": ["News item: {text}\nIts subject area is", "{text}\nWhich topic is this? The topic is",
                      "Headline and opening: {text}\nLabel:"],
        "unseen": ["Read the following text.\n{text}\nQuestion: what kind of news is this?\nAnswer:",
                   "{text}\n(Filed under:"],
        "check": ["{text}\nSection of the paper:"],
    },
    "headline": {
        "pool": ["{lead}\nHeadline:", "Write a headline for this story.\n{lead}\nHeadline:", "Story: {lead}\nTitle:"],
        "federated": ["Summarise the news in a short title.\n{lead}\nTitle:", "{lead}\nA fitting headline would be:"],
        "unseen": ["Give this article a headline.\nArticle: {lead}\nAnswer:",
                   "{lead}\n\nIn a few words, the BBC headlined it:"],
        "check": ["{lead}\nSuggested headline:"],
    },
    "arithmetic": {
        "pool": ["{a}{op}{b}=", "What is {a} {opword} {b}? Answer:", "Calculate {a}{op}{b}.\nResult:",
                 "Q: {a} {op} {b}\nA:"],
        "check": ["Compute the value of {a} {opword} {b}:"],
    },
    "number_words": {
        "pool": ["Write {n} in words:", "The number {n} spelled out:", "How is {n} written in English? Answer:",
                 "{n} in letters:"],
        "check": ["Express {n} using words only:"],
    },
    "next_letter": {
        "pool": ["Letter after {x}:", "Which letter comes after {x}? Answer:",
                 "The next letter of the alphabet after {x} is"],
        "check": ["Following {x} in the alphabet:"],
    },
    "spelled_sum": {
        "federated": ["Compute {a}{op}{b} and write the answer in words:", "{a} {opword} {b}, in words:",
                      "Say the result of {a}{op}{b} in English words:"],
        "unseen": ["Tell me {a} {opword} {b} as a spelled-out number:", "Result of {a}{op}{b} (in words):"],
    },
}


def templates(family, role):
    """The templates of ``family`` in ``role`` (a KeyError names what exists)."""
    if family not in TEXTS:
        raise KeyError(f"no template family {family!r}; families: {sorted(TEXTS)}")
    if role not in TEXTS[family]:
        raise KeyError(f"template family {family!r} has no {role!r} templates; roles: {sorted(TEXTS[family])}")
    return [Template(family, role, number, text) for number, text in enumerate(TEXTS[family][role])]


def all_templates():
    return [template for family in TEXTS for role in TEXTS[family] for template in templates(family, role)]


def fields(text):
    return sorted({name for _, name, _, _ in string.Formatter().parse(text) if name is not None})
