"""pytest-benchmark suite of the MoRE providers: run with `pytest benchmarks --benchmark-only`.

A plain `pytest` run that reaches this folder skips these items: they time, they do not test.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks --benchmark-only`")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)
