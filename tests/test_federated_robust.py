"""Screening, example counts, the norm bound, robust aggregators and the faults that test them
(issue 12 items 2 and 5, and the hung client of item 4)."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from smartfed.config import AGGREGATORS as CONFIG_AGGREGATORS
from smartfed.config import load_config, with_overrides
from smartfed.eeqa import ImportanceStats
from smartfed.experiments.runs import in_process_grid, open_run, run_in_process
from smartfed.federated import client as client_records
from smartfed.federated.checkpoint import load_checkpoint
from smartfed.federated.grid import NODE_ID_BASE
from smartfed.federated.protocol import ClientResult
from smartfed.federated.robust import AGGREGATORS, bound_updates, build_aggregator, combine_importance, update_norm
from smartfed.federated.screening import check_importance, check_metrics, screen_replies
from smartfed.federated.server import fedavg, initial_server_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POISON_EVERY_ROUND = {round_index: {0: "poison"} for round_index in range(1, 5)}
NO_SCREENING = {"norm_bound": {"mode": "none"}, "example_counts": "claimed"}


def tiny_yaml(cache_dir, **overrides):
    return with_overrides(load_config("configs/tiny.yaml"), pool={"cache_dir": str(cache_dir)}, **overrides)


def read_metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def honest(cache_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("honest")
    return run_in_process(tiny_yaml(cache_dir), output, progress=False), output


GOOD_METRICS = {"loss": 1.2, "compute_s": 0.5, "active_flops": 10, "peak_memory_bytes": 0,
                "peak_memory_source": "ru_maxrss_delta"}


def test_metrics_are_checked_for_presence_type_and_value():
    assert check_metrics(GOOD_METRICS) is None
    assert check_metrics({k: v for k, v in GOOD_METRICS.items() if k != "loss"}) == "metrics missing ['loss']"
    assert "metrics missing ['compute_s']" == check_metrics({k: v for k, v in GOOD_METRICS.items() if k != "compute_s"})
    assert "metric 'loss' must be a finite number >= 0, got str" in check_metrics({**GOOD_METRICS, "loss": "low"})
    assert "got float nan" in check_metrics({**GOOD_METRICS, "loss": float("nan")})
    assert "metric 'compute_s'" in check_metrics({**GOOD_METRICS, "compute_s": -1.0})
    assert "metric 'peak_memory_bytes' must be an int" in check_metrics({**GOOD_METRICS, "peak_memory_bytes": 1.5})
    assert "metric 'peak_memory_source' must be a string" in check_metrics({**GOOD_METRICS, "peak_memory_source": 3})


def test_importance_statistics_are_checked_before_use():
    modules = ["a", "b"]

    def check(estimator="cosine", sums=None, counts=None, **kwargs):
        data = {"estimator": estimator, "sums": sums or {"a": 1.0, "b": 2.0}, "counts": counts or {"a": 8, "b": 8}}
        return check_importance(data, **{"estimator": "cosine", "modules": modules, "max_count": 100, **kwargs})

    assert check() is None
    assert "importance estimator 'entropy', the run uses 'cosine'" in check(estimator="entropy")
    assert "importance sum of a must be a finite number >= 0, got -1.0" in check(sums={"a": -1.0, "b": 1.0})
    assert "importance sum of b" in check(sums={"a": 1.0, "b": float("inf")})
    assert "importance count of a must be an int in [1, 100], got 0" in check(counts={"a": 0, "b": 8})
    assert "got 1000000000" in check(counts={"a": 10**9, "b": 8})
    assert "unexpected ['c']" in check(sums={"a": 1.0, "b": 1.0, "c": 1.0}, counts={"a": 1, "b": 1, "c": 1})
    assert "without EEQA quotas" in check(modules=None)
    assert check_importance(None, estimator="cosine", modules=modules, max_count=100) is None


def test_screening_weighs_clients_by_their_partition_and_flags_claims():
    state = initial_server_state({"w": torch.zeros(2)}, seed=0)
    results = {
        0: ClientResult(state={"w": torch.ones(2)}, num_examples=10**9, metrics=GOOD_METRICS),
        1: ClientResult(state={"w": torch.ones(2)}, num_examples=30, metrics=GOOD_METRICS),
        2: ClientResult(state={"w": torch.ones(2)}, num_examples=30, metrics={**GOOD_METRICS, "loss": "low"}),
        3: ClientResult(state={"w": torch.ones(3)}, num_examples=30, metrics=GOOD_METRICS),
    }
    sizes = {0: 20, 1: 30, 2: 40, 3: 50}
    screened = screen_replies(state, results, partition_sizes=sizes, example_counts="partition",
                              estimator="cosine", max_count=100)
    assert sorted(screened.valid) == [0, 1] and screened.weights == {0: 20, 1: 30}
    assert screened.flags == [{"client": 0, "reason": "claimed 1000000000 examples, its partition holds 20: weighted by 20"}]
    assert [d["client"] for d in screened.dropped] == [2, 3]
    claimed = screen_replies(state, results, partition_sizes=sizes, example_counts="claimed",
                             estimator="cosine", max_count=100)
    assert claimed.weights == {0: 10**9, 1: 30} and claimed.flags == []


def test_norm_bound_clips_or_rejects_outliers_around_the_lower_median():
    reference = {"w": torch.zeros(4)}
    states = {c: {"w": torch.full((4,), 0.5 * (c + 1))} for c in range(3)}
    states[3] = {"w": torch.full((4,), 1000.0)}
    kept, summary, flags, dropped = bound_updates(states, reference, mode="clip", multiple=3.0)
    # Norms 1, 2, 3 and 2000: the lower median is 2, the bound 6.
    assert summary["norm_bound"] == pytest.approx(6.0) and summary["update_norms"]["3"] == pytest.approx(2000.0)
    assert update_norm(kept[3], reference) == pytest.approx(6.0) and dropped == []
    assert flags == [{"client": 3, "reason": "update norm 2000 clipped to the bound 6"}]
    assert all(torch.equal(kept[c]["w"], states[c]["w"]) for c in range(3))
    kept, _, flags, dropped = bound_updates(states, reference, mode="reject", multiple=3.0)
    assert sorted(kept) == [0, 1, 2] and flags == [] and "update norm 2000 exceeds the bound 6" in dropped[0]["reason"]
    kept, summary, flags, dropped = bound_updates(states, reference, mode="clip", multiple=3.0, max_norm=1.5)
    assert summary["norm_bound"] == 1.5 and [f["client"] for f in flags] == [1, 2, 3]
    kept, summary, flags, dropped = bound_updates(states, reference, mode="none", multiple=3.0)
    assert summary["norm_bound"] is None and flags == dropped == [] and kept == states
    # Two clients: the lower median is the honest one's norm, so the huge update cannot set its own bound.
    _, summary, flags, _ = bound_updates({0: states[0], 3: states[3]}, reference, mode="clip", multiple=3.0)
    assert summary["norm_bound"] == pytest.approx(3.0) and [f["client"] for f in flags] == [3]


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_registered_aggregator_resists_one_outlier(name):
    robustness = with_overrides(load_config("configs/tiny.yaml"), robustness={
        "aggregator": name, "root_examples": 8 if name == "filtered_mean_root" else 0}).robustness
    generator = torch.Generator().manual_seed(0)
    server = initial_server_state({"w": torch.zeros(3)}, seed=0)
    states = {c: {"w": torch.randn(3, generator=generator) * 0.1 + 1.0} for c in range(5)}
    states[5] = {"w": torch.full((3,), 1e6)}
    root_update = (lambda server_state, round_index: {"w": torch.ones(3)}) if name == "filtered_mean_root" else None
    aggregator = build_aggregator(robustness, fedavg, root_update=root_update)
    checked = aggregator.check(states, server, 1)
    assert sorted(checked.kept) == list(range(6)) and checked.dropped == []  # the outlier points the honest way
    assert sorted(checked.record["centre_cosines"]) == [str(c) for c in range(6)]
    aggregated, _ = aggregator(checked.kept, dict.fromkeys(states, 10), server.global_state)
    if name == "fedavg":
        assert aggregated["w"].min() > 1e5  # FedAvg alone has no defence: the norm bound runs before it
    else:
        assert aggregated["w"].abs().max() < 2.0
    if name == "median":
        expected = np.median(np.stack([s["w"].numpy() for s in states.values()]), axis=0)
        assert torch.equal(aggregated["w"], torch.from_numpy(expected))


def test_an_unknown_aggregator_name_is_refused():
    robustness = load_config("configs/tiny.yaml").robustness
    assert set(AGGREGATORS) == set(CONFIG_AGGREGATORS)
    with pytest.raises(ValueError, match="robustness.aggregator must be one of .*got 'multi-krum'"):
        build_aggregator(robustness.model_copy(update={"aggregator": "multi-krum"}), fedavg)
    with pytest.raises(ValueError, match="'filtered_mean_root' needs the server's root set"):
        build_aggregator(robustness.model_copy(update={"aggregator": "filtered_mean_root"}), fedavg)


def test_importance_is_combined_robustly():
    honest_stats = [ImportanceStats("cosine", {"a": 1.0 * n, "b": 3.0 * n}, {"a": n, "b": n}) for n in (10, 20, 30)]
    hostile = ImportanceStats("cosine", {"a": 1e300, "b": 0.0}, {"a": 1, "b": 1})
    combined = combine_importance(honest_stats + [hostile], how="median", clip=3.0)
    assert combined == pytest.approx({"a": 1.0, "b": 3.0})
    trimmed = combine_importance(honest_stats + [hostile], how="trimmed_mean", clip=3.0, trim_fraction=0.25)
    assert trimmed == pytest.approx({"a": 1.0, "b": 3.0})
    pooled = combine_importance(honest_stats + [hostile], how="mean")
    assert pooled["a"] > 1e290


def test_poisoned_client_is_flagged_and_the_run_stays_near_the_honest_one(honest, cache_dir, tmp_path):
    honest_run, _ = honest
    honest_accuracy = honest_run.history[-1]["accuracy"]
    poisoned = run_in_process(tiny_yaml(cache_dir, faults=POISON_EVERY_ROUND), tmp_path / "screened", progress=False)
    records = read_metrics(tmp_path / "screened")
    assert abs(poisoned.history[-1]["accuracy"] - honest_accuracy) <= 0.05
    for record in records:
        reasons = [flag["reason"] for flag in record["clients_flagged"] if flag["client"] == 0]
        assert "claimed 1000000000 examples, its partition holds" in reasons[0]
        assert "clipped to the bound" in reasons[1]
        assert record["update_norms"]["0"] > 100 * record["norm_bound"]
        assert [flag["client"] for flag in record["clients_flagged"]] == [0, 0]
    router_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in poisoned.state.global_state.values()))
    honest_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in honest_run.state.global_state.values()))
    assert router_norm < 2 * honest_norm
    # The same attack with the screening off: the claimed count and the unbounded update win.
    unscreened = run_in_process(tiny_yaml(cache_dir, faults=POISON_EVERY_ROUND, robustness=NO_SCREENING),
                                tmp_path / "unscreened", progress=False)
    assert unscreened.history[-1]["accuracy"] < honest_accuracy - 0.3


def test_median_aggregator_alone_withstands_the_poisoned_update(honest, cache_dir, tmp_path):
    honest_run, _ = honest
    robustness = {"aggregator": "median", "norm_bound": {"mode": "none"}}
    run = run_in_process(tiny_yaml(cache_dir, faults=POISON_EVERY_ROUND, robustness=robustness), tmp_path, progress=False)
    assert abs(run.history[-1]["accuracy"] - honest_run.history[-1]["accuracy"]) <= 0.1
    assert read_metrics(tmp_path)[0]["aggregator"] == "median"


def test_malformed_replies_are_dropped_and_every_round_completes(cache_dir, tmp_path):
    faults = {1: {0: "malformed"}, 2: {1: "malformed"}, 3: {2: "malformed", 3: "malformed"}, 4: {0: "malformed"}}
    run_in_process(tiny_yaml(cache_dir, faults=faults), tmp_path, progress=False)
    records = read_metrics(tmp_path)
    assert [r["status"] for r in records] == ["completed"] * 4
    assert [r["clients_used"] for r in records] == [[1, 2, 3], [0, 2, 3], [0, 1], [1, 2, 3]]
    for record in records:
        for drop in record["clients_dropped"]:
            assert drop["reason"].startswith("metrics missing ['active_flops', 'compute_s', 'peak_memory_bytes']")


def test_hung_client_is_cut_at_its_timeout_and_cannot_touch_later_rounds(cache_dir, tmp_path):
    # The hung worker wakes while later rounds run and trains on its own replica of the model; the run must
    # end exactly where the same run with that client failing outright ends.
    timeout = 2.0
    settings = {"client_timeout_s": timeout}
    hung = run_in_process(tiny_yaml(cache_dir, federation=settings, faults={1: {0: "hang"}}), tmp_path / "hung",
                          progress=False)
    failed = run_in_process(tiny_yaml(cache_dir, federation=settings, faults={1: {0: "raise"}}), tmp_path / "failed",
                            progress=False)
    records = read_metrics(tmp_path / "hung")
    assert [r["status"] for r in records] == ["completed"] * 4 and records[0]["clients_used"] == [1, 2, 3]
    reason = records[0]["clients_dropped"][0]["reason"]
    assert "no reply within federation.client_timeout_s=2.0 s; the client step was abandoned" in reason
    assert records[0]["wall_s"] < 4 * timeout
    for name, tensor in failed.state.global_state.items():
        assert torch.equal(hung.state.global_state[name], tensor), name
    with pytest.raises(ValueError, match="a 'hang' fault needs federation.client_timeout_s"):
        run_in_process(tiny_yaml(cache_dir, federation={"client_timeout_s": None}, faults={1: {0: "hang"}}),
                       tmp_path / "forever", progress=False)


def test_an_extra_node_claiming_a_partition_is_refused_and_the_run_goes_on(cache_dir, tmp_path):
    run = open_run(tiny_yaml(cache_dir, federation={"rounds": 2}), tmp_path, progress=False)
    grid = in_process_grid(run)
    rogue = NODE_ID_BASE + 99
    handle = grid._reply

    def reply(msg):
        if msg.metadata.dst_node_id != rogue:
            return handle(msg)
        content = RecordDict({
            client_records.NODE: MetricRecord({client_records.PARTITION_ID: 0, client_records.NUM_PARTITIONS: 4}),
            client_records.POOL: ConfigRecord({client_records.POOL_FINGERPRINT: run.trainer.pool_fingerprint}),
        })
        return Message(content, reply_to=msg)

    grid._partitions[rogue] = 0
    grid._reply = reply
    run.start(grid)
    assert run.strategy.contested == {0: [NODE_ID_BASE, rogue]}
    records = read_metrics(tmp_path)
    assert [r["status"] for r in records] == ["completed"] * 2
    for record in records:
        assert record["clients_used"] == [1, 2, 3]
        assert "all claimed this partition and were refused at setup" in record["clients_dropped"][0]["reason"]
    assert load_checkpoint(tmp_path).round == 2
