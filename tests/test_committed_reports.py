"""The committed reports are what `smartfed report` makes today from the committed runs: tables,
summaries, selections and intervals byte for byte (the plots are drawn by matplotlib, whose
bytes vary by version, so only their names are compared)."""

from pathlib import Path

import pytest

from smartfed.cli import main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXPERIMENTS = sorted(path.parent for path in RESULTS.glob("experiment_*/report"))


def test_every_committed_experiment_has_a_report():
    assert [path.name for path in EXPERIMENTS] == ["experiment_demo", "experiment_large_pool",
                                                   "experiment_paper_small", "experiment_protocol", "experiment_v2"]


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda path: path.name)
def test_the_committed_report_regenerates_identically(experiment, tmp_path, capsys, monkeypatch):
    runs = experiment / "run" if (experiment / "run").is_dir() else experiment / "runs"
    # The reports name their runs as the command was given, from the repository's root.
    monkeypatch.chdir(ROOT)
    runs = runs.relative_to(ROOT)
    output = tmp_path / "report"
    assert main(["report", str(runs), "--output", str(output)]) == 0, capsys.readouterr().err
    committed = experiment / "report"
    assert sorted(path.name for path in output.iterdir()) == sorted(path.name for path in committed.iterdir())
    texts = [path.name for path in committed.iterdir() if path.suffix in (".md", ".json")]
    assert "report.md" in texts and "summary.json" in texts
    for name in texts:
        assert (output / name).read_bytes() == (committed / name).read_bytes(), name
