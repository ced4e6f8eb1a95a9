"""The v2 skill-composition suite: two-digit sums and differences, answered in words.

- arithmetic (source skill 1): ``"47+38="`` -> ``" 85"``, answered in digits;
- number words (source skill 2): ``"Write 85 in words:"`` -> ``" eighty-five"``;
- spelled sums (the target): ``"Compute 47+38 and write the answer in words:"`` -> ``" eighty-five"``:
  compute, then spell; the answers are several tokens, so the target is an instruction task
  scored on generated answers (exact match).

A problem is ``a op b`` with ``a, b`` in 10..99 and ``op`` ``+`` or ``-`` (``a >= b`` for ``-``,
so results lie in 0..198): 8,100 sums and 4,095 differences, 12,195 problems. ``a+b`` and ``b+a``
are one problem *group* (the same question), so every split here is by group: a test problem's
commuted twin is never trained on, as digits or in words.
"""

from dataclasses import dataclass

import numpy as np

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
OPERAND_RANGE = (10, 99)
OPERATIONS = {"+": "plus", "-": "minus"}


def number_words(n):
    """``n`` (0..999) in English words, US style: 85 -> "eighty-five", 105 -> "one hundred five"."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= 999:
        raise ValueError(f"n must be an int in 0..999, got {n!r}")
    n = int(n)
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = ONES[rest]
    else:
        tens, ones = divmod(rest, 10)
        tail = TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    if not hundreds:
        return tail
    return f"{ONES[hundreds]} hundred" + (f" {tail}" if rest else "")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def result(self):
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def group(self):
        """The problem's group: a sum and its commuted twin share one."""
        first, second = (min(self.a, self.b), max(self.a, self.b)) if self.op == "+" else (self.a, self.b)
        return f"{first}{self.op}{second}"

    @property
    def key(self):
        return f"{self.a}{self.op}{self.b}"

    def fields(self):
        return {"a": self.a, "b": self.b, "op": self.op, "opword": OPERATIONS[self.op]}


def problems():
    """Every problem, in a fixed order."""
    low, high = OPERAND_RANGE
    items = [Problem(a, "+", b) for a in range(low, high + 1) for b in range(low, high + 1)]
    items += [Problem(a, "-", b) for a in range(low, high + 1) for b in range(low, a + 1)]
    return items


def split_groups(*, split_seed, test, federated, public):
    """{"test", "federated", "public": [Problem]}: problem groups drawn without overlap (seeded),
    ``test`` groups contributing one problem each (a random orientation of a sum), the
    ``federated`` and ``public`` groups all their problems, truncated to the counts asked for."""
    items = problems()
    by_group = {}
    for problem in items:
        by_group.setdefault(problem.group, []).append(problem)
    names = sorted(by_group)
    rng = np.random.default_rng(split_seed)
    order = [names[i] for i in rng.permutation(len(names))]
    if test + federated + public > len(items):
        raise ValueError(f"test + federated + public = {test + federated + public} problems, more than the "
                         f"{len(items)} there are")
    chosen = {"test": [], "federated": [], "public": []}
    position = 0
    for share, count in (("test", test), ("federated", federated), ("public", public)):
        while len(chosen[share]) < count:
            if position == len(order):
                raise ValueError(f"the {len(names)} problem groups do not hold {test} test, {federated} federated and "
                                 f"{public} public problems")
            members = by_group[order[position]]
            position += 1
            if share == "test":
                chosen[share].append(members[int(rng.integers(len(members)))])
            else:
                chosen[share].extend(members[:count - len(chosen[share])])
    return chosen
