"""``smartfed report`` reads each run's per-item results: intervals, seen / unseen templates, the
paired test against FedIT, with "no conclusion" where the interval holds zero, SmartFed's forms
against adapter mixture beside the bytes each sent, and each EEQA form against its uniform quota."""

import json

import numpy as np
import pytest

from smartfed.experiments import report
from smartfed.experiments.report_statistics import STATISTICS_FILE, run_statistics
from smartfed.federated.run_dir import EVALUATION_ITEMS_FILE, METRICS_FILE

ITEMS = 400


def write_scored_run(root, method, seed, correct, *, seen=None, task="bbc_topic", base_method=None, sent=20,
                     settings=None):
    folder = root / task / method / f"seed{seed}"
    folder.mkdir(parents=True)
    config = {"method": base_method or method, "label": method, "seed": seed, **(settings or {})}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "text_task.json").write_text(json.dumps({"name": task}))
    record = {"round": 1, "status": "completed", "accuracy": float(np.mean(correct)), "loss": 1.0,
              "total_bytes_up": sent // 2, "total_bytes_down": sent - sent // 2}
    (folder / METRICS_FILE).write_text(json.dumps(record) + "\n")
    items = {"split": "test", "round": 1, "metric": "correct", "correct": [int(c) for c in correct],
             "prediction": [0] * len(correct), "item": [f"a{i // 2}" for i in range(len(correct))],
             "template": ["t0" if i % 2 else "u0" for i in range(len(correct))]}
    if seen is not None:
        items["seen"] = seen
    (folder / EVALUATION_ITEMS_FILE).write_text(json.dumps(items))
    return folder


def scored_runs(tmp_path):
    rng = np.random.default_rng(0)
    seen = [bool(i % 2) for i in range(ITEMS)]
    for seed in (0, 1, 2):
        fedit = (rng.random(ITEMS) < 0.5).astype(int)
        write_scored_run(tmp_path, "fedit", seed, fedit, seen=seen)
        # Right wherever FedIT is, and on 60 more items, all of them seen: better overall and on seen.
        better = fedit.copy()
        wrong_seen = [i for i in range(ITEMS) if fedit[i] == 0 and seen[i]]
        better[wrong_seen[:60]] = 1
        write_scored_run(tmp_path, "ffa_lora", seed, better, seen=seen)
        # FedIT's results with 3 items flipped: within noise.
        close = fedit.copy()
        close[:3] = 1 - close[:3]
        write_scored_run(tmp_path, "adapter_mixture", seed, close, seen=seen)
    return report.find_runs([tmp_path])


def test_intervals_paired_tests_and_seen_unseen_groups(tmp_path):
    record = run_statistics(scored_runs(tmp_path), resamples=1000)
    rows = {(row["method"], row["metric"]): row for row in record["rows"]}
    assert set(rows) == {("fedit", "correct"), ("ffa_lora", "correct"), ("adapter_mixture", "correct")}
    fedit, ffa, mixture = rows["fedit", "correct"], rows["ffa_lora", "correct"], rows["adapter_mixture", "correct"]
    assert (fedit["seeds"], fedit["items"]) == ([0, 1, 2], ITEMS) and "versus_reference" not in fedit
    assert fedit["all"]["low"] < fedit["all"]["mean"] < fedit["all"]["high"]
    assert ffa["versus_reference"]["verdict"] == "better" and ffa["versus_reference"]["difference"]["low"] > 0
    assert ffa["versus_reference"]["difference"]["mean"] == pytest.approx(60 / ITEMS)
    # The gain is on seen items only: the unseen items' interval is FedIT's.
    assert ffa["seen"]["mean"] > fedit["seen"]["mean"] and ffa["unseen"] == fedit["unseen"]
    assert mixture["versus_reference"]["verdict"] == "no conclusion"
    low, high = (mixture["versus_reference"]["difference"][key] for key in ("low", "high"))
    assert low <= 0 <= high


def test_the_report_writes_the_statistics_and_says_so(tmp_path):
    scored_runs(tmp_path / "runs")
    text = report.write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "## Intervals and paired tests" in text
    assert "| bbc_topic | ffa_lora | correct | 3 | 400 |" in text and "| better |" in text
    assert "| no conclusion |" in text
    saved = json.loads((tmp_path / "out" / STATISTICS_FILE).read_text())
    assert len(saved["rows"]) == 3 and saved["level"] == 0.95


def test_seeds_scored_on_other_items_are_not_compared(tmp_path):
    write_scored_run(tmp_path, "fedit", 0, [1, 0, 1, 0])
    write_scored_run(tmp_path, "fedit", 1, [1, 0, 1])
    record = run_statistics(report.find_runs([tmp_path]), resamples=200)
    assert record["rows"] == [] and record["skipped"] == ["bbc_topic fedit: its seeds scored different items"]


def test_runs_without_items_get_no_interval(tmp_path):
    folder = write_scored_run(tmp_path / "runs", "fedit", 0, [1, 0])
    (folder / EVALUATION_ITEMS_FILE).unlink()
    text = report.write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "No run kept per-item results" in text


def test_smartfed_forms_are_paired_against_whole_adapters_beside_their_bytes(tmp_path):
    rng = np.random.default_rng(1)
    for seed in (0, 1):
        mixture = (rng.random(ITEMS) < 0.6).astype(int)
        write_scored_run(tmp_path / "runs", "adapter_mixture", seed, mixture, sent=3_000_000)
        worse = mixture.copy()
        worse[np.flatnonzero(mixture)[:50]] = 0
        write_scored_run(tmp_path / "runs", "smartfed_projected_72", seed, worse, base_method="smartfed",
                         sent=1_000_000 + seed)
        write_scored_run(tmp_path / "runs", "ffa_lora", seed, mixture, sent=4_000_000)
    record = run_statistics(report.find_runs([tmp_path / "runs"]), resamples=1000)
    rows = {row["method"]: row for row in record["rows"]}
    versus = rows["smartfed_projected_72"]["versus_whole_adapters"]
    assert versus["reference"] == "adapter_mixture" and versus["seeds"] == [0, 1]
    assert versus["verdict"] == "worse" and versus["difference"]["mean"] == pytest.approx(-50 / ITEMS)
    assert rows["smartfed_projected_72"]["bytes_up_down"] == pytest.approx(1_000_000.5)
    # Only rank-wise forms are compared with whole adapters; nothing here is compared with FedIT (none ran).
    assert all("versus_whole_adapters" not in rows[name] for name in ("ffa_lora", "adapter_mixture"))
    assert all("versus_reference" not in row for row in rows.values())
    text = report.write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    section = text.split("## Rank-wise experts against whole adapters", 1)[1]
    assert "| bbc_topic | smartfed_projected_72 | correct | 2 | 1.000 | 3.000 |" in section
    assert "| worse |" in section and "ffa_lora" not in section


def test_no_whole_adapter_section_without_both_kinds(tmp_path):
    scored_runs(tmp_path / "runs")
    text = report.write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "Rank-wise experts against whole adapters" not in text and "EEQA against a uniform quota" not in text


def test_an_eeqa_form_is_paired_against_its_uniform_quota_entry_only(tmp_path):
    rng = np.random.default_rng(2)
    projected = {"more": {"router": "projected", "router_dim": 32}}
    for seed in (0, 1):
        eeqa = (rng.random(ITEMS) < 0.6).astype(int)
        write_scored_run(tmp_path / "runs", "smartfed", seed, eeqa, base_method="smartfed",
                         settings={"more": {"router": "expert_space"}})
        uniform = eeqa.copy()
        uniform[np.flatnonzero(eeqa)[:40]] = 0
        # The same form with EEQA off, at the rate chosen for it: the counterpart, 40 items worse.
        write_scored_run(tmp_path / "runs", "smartfed_uniform_quota", seed, uniform, base_method="smartfed",
                         settings={"more": {"router": "expert_space"}, "eeqa": {"enabled": False},
                                   "federation": {"lr": 0.003}})
        # Another router form: not the uniform quota's counterpart.
        write_scored_run(tmp_path / "runs", "smartfed_projected", seed, eeqa, base_method="smartfed", settings=projected)
    rows = {row["method"]: row for row in run_statistics(report.find_runs([tmp_path / "runs"]), resamples=1000)["rows"]}
    versus = rows["smartfed"]["versus_uniform_quota"]
    assert versus["reference"] == "smartfed_uniform_quota" and versus["seeds"] == [0, 1]
    assert versus["verdict"] == "better" and versus["difference"]["mean"] == pytest.approx(40 / ITEMS)
    assert all("versus_uniform_quota" not in rows[name] for name in ("smartfed_projected", "smartfed_uniform_quota"))
    text = report.write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    section = text.split("## EEQA against a uniform quota", 1)[1]
    assert "| bbc_topic | smartfed | smartfed_uniform_quota | correct | 2 |" in section and "| better |" in section
    assert "smartfed_projected" not in section
