"""Near-duplicate texts by word shingles: the leakage check of the experiment suites.

Two texts are near-duplicates when the Jaccard similarity of their sets of ``SHINGLE_WORDS``-word
shingles (lower-cased words, punctuation dropped) is at least ``THRESHOLD`` (the audit of issue 22
used 8 words and 0.8). A text shorter than a shingle is one shingle of all its words, so two short
texts are near-duplicates only when their words are equal. Candidate pairs come from an inverted
index over the shingles (only texts sharing a shingle are compared), so a corpus of thousands of
articles is checked in seconds without comparing every pair.
"""

import re

SHINGLE_WORDS = 8
THRESHOLD = 0.8
_WORD = re.compile(r"\w+")


def shingles(text, size=SHINGLE_WORDS):
    """The set of ``size``-word shingles of ``text`` (words: lower-cased runs of letters and digits)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def jaccard(first, second):
    """Jaccard similarity of two shingle sets (0 when both are empty)."""
    union = len(first | second)
    return len(first & second) / union if union else 0.0


def _index(shingle_sets):
    index = {}
    for position, found in enumerate(shingle_sets):
        for shingle in found:
            index.setdefault(shingle, []).append(position)
    return index


def cross_pairs(queries, corpus, *, threshold=THRESHOLD, size=SHINGLE_WORDS):
    """[(query index, corpus index, Jaccard)] of every query text with a near-duplicate in
    ``corpus`` (similarity >= ``threshold``), in query then corpus order."""
    corpus_sets = [shingles(text, size) for text in corpus]
    index = _index(corpus_sets)
    pairs = []
    for position, text in enumerate(queries):
        found = shingles(text, size)
        candidates = sorted({other for shingle in found for other in index.get(shingle, ())})
        for other in candidates:
            similarity = jaccard(found, corpus_sets[other])
            if similarity >= threshold:
                pairs.append((position, other, similarity))
    return pairs


def groups(texts, *, threshold=THRESHOLD, size=SHINGLE_WORDS, same=()):
    """A group id per text: texts linked by a chain of near-duplicate pairs share one (union-find;
    ids are the smallest member's index). ``same``: more (i, j) pairs to link, e.g. articles with
    one headline."""
    parent = list(range(len(texts)))

    def root(item):
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def link(first, second):
        first, second = root(first), root(second)
        if first != second:
            parent[max(first, second)] = min(first, second)

    for first, second, _ in cross_pairs(texts, texts, threshold=threshold, size=size):
        if first < second:
            link(first, second)
    for first, second in same:
        link(first, second)
    return [root(item) for item in range(len(texts))]
