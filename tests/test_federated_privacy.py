"""Central differential privacy of the router updates (issue 12 item 3)."""

import json
import math

import pytest
import torch
from flwr.app import MessageType

from smartfed.config import ConfigError, load_config, with_overrides
from smartfed.experiments.runs import in_process_grid, open_run, run_in_process
from smartfed.federated.messages import content_to_result
from smartfed.federated.privacy import CentralDP, clip_update, gaussian_epsilon
from smartfed.federated.robust import update_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dp_settings(**values):
    return with_overrides(load_config("configs/tiny.yaml"), privacy={"dp": {"enabled": True, **values}}).privacy.dp


def test_clip_update_bounds_the_distance_from_the_reference():
    reference = {"a": torch.ones(3), "b": torch.zeros(2)}
    far = {"a": torch.full((3,), 5.0), "b": torch.full((2,), 4.0)}
    clipped = clip_update(far, reference, 2.0)
    assert update_norm(clipped, reference) == pytest.approx(2.0, rel=1e-6)
    near = {"a": torch.full((3,), 1.1), "b": torch.zeros(2)}
    assert all(torch.allclose(clip_update(near, reference, 2.0)[n], near[n]) for n in near)


def test_noise_has_the_recorded_scale_around_the_clipped_equal_weight_mean():
    generator = torch.Generator().manual_seed(0)
    reference = {"w": torch.zeros(40_000)}
    states = [{"w": torch.randn(40_000, generator=generator) * 0.01 * (k + 1)} for k in range(4)]
    dp = CentralDP(dp_settings(clipping_norm=1.0, noise_multiplier=0.5))
    noised, record = dp.aggregate(states, reference)
    clipped_mean = torch.stack([clip_update(s, reference, 1.0)["w"] for s in states]).mean(dim=0)
    assert record["noise_stdv"] == pytest.approx(0.5 * 1.0 / 4)
    assert (noised["w"] - clipped_mean).std().item() == pytest.approx(record["noise_stdv"], rel=0.03)
    assert record["clipping_norm"] == 1.0 and record["releases"] == 1 and math.isfinite(record["epsilon"])
    without_noise, record = CentralDP(dp_settings(noise_multiplier=0.0)).aggregate(states, reference)
    assert torch.allclose(without_noise["w"], clipped_mean) and record["epsilon"] is None


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert gaussian_epsilon(1.0, 0, 1e-5) == 0.0
    assert gaussian_epsilon(1.0, 1, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    # The Gaussian mechanism's RDP bound at sigma = 1, one release, delta = 1e-5 (Mironov 2017).
    assert gaussian_epsilon(1.0, 1, 1e-5) == pytest.approx(min(
        a / 2 + math.log(1e5) / (a - 1) for a in [1 + x / 10 for x in range(1, 100)] + list(range(11, 257))
    ))


def test_dp_run_records_its_parameters_and_noises_the_aggregate(cache_dir, tmp_path):
    config = with_overrides(
        load_config("configs/tiny.yaml"), pool={"cache_dir": str(cache_dir)},
        privacy={"dp": {"enabled": True, "clipping_norm": 0.5, "noise_multiplier": 0.1}},
    )
    run = open_run(config, tmp_path, progress=False)
    grid = in_process_grid(run)
    updates, send_and_receive = [], grid.send_and_receive

    def recording(messages, *, timeout=None):
        replies = list(send_and_receive(messages, timeout=timeout))
        if any(r.metadata.message_type == MessageType.TRAIN for r in replies):
            updates.append([content_to_result(r.content).state for r in replies])
        return replies

    grid.send_and_receive = recording
    initial = {name: tensor.clone() for name, tensor in run.state.global_state.items()}
    run.start(grid, stop_after_round=1)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["privacy"]["clipping_norm"] == 0.5 and record["privacy"]["noise_multiplier"] == 0.1
    assert record["privacy"]["noise_stdv"] == pytest.approx(0.1 * 0.5 / 4) and record["privacy"]["clients"] == 4
    assert record["privacy"]["epsilon"] > 0
    # Round 1 moved the global state to the clipped equal-weight mean plus noise of that scale.
    clipped = [clip_update(state, initial, 0.5) for state in updates[0]]
    residual = torch.cat([
        (run.state.global_state[name] - torch.stack([c[name] for c in clipped]).mean(dim=0)).flatten()
        for name in sorted(initial)
    ])
    assert residual.std().item() == pytest.approx(record["privacy"]["noise_stdv"], rel=0.15)
    assert abs(residual.mean().item()) < 4 * record["privacy"]["noise_stdv"] / math.sqrt(residual.numel())
    resumed = open_run(config, tmp_path, resume=True, progress=False)
    assert resumed.strategy.aggregation.dp.releases == 1
    resumed.start_in_process()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["privacy"]["releases"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["privacy"]["epsilon"] > records[0]["privacy"]["epsilon"]
    assert 0.0 <= records[-1]["accuracy"] <= 1.0


def secagg_config(cache_dir, **overrides):
    return with_overrides(
        load_config("configs/tiny.yaml"), pool={"cache_dir": str(cache_dir)},
        robustness={"norm_bound": {"mode": "none"}}, **overrides,
    )


def test_secagg_sum_equals_plain_fedavg_within_the_quantization_step(cache_dir, tmp_path):
    plain = run_in_process(secagg_config(cache_dir), tmp_path / "plain", progress=False, stop_after_round=1)
    secure = run_in_process(secagg_config(cache_dir, privacy={"secagg": {"enabled": True}}), tmp_path / "secure",
                            progress=False, stop_after_round=1)
    settings = secure.config.privacy.secagg
    step = 2 * settings.clipping_range / settings.quantization_range
    for name, tensor in plain.state.global_state.items():
        assert torch.allclose(secure.state.global_state[name], tensor, rtol=0, atol=2 * step), name
    record = secure.history[-1]
    assert record["privacy"]["mechanism"].startswith("SecAgg+") and record["privacy"]["clients"] == 4
    assert record["clients_used"] == [0, 1, 2, 3] and record["clients_dropped"] == []
    assert record["quotas"] == plain.history[-1]["quotas"] and record["bytes_up"] > plain.history[-1]["bytes_up"]


def test_secagg_runs_again_without_a_client_whose_clear_text_is_bad(cache_dir, tmp_path):
    faults = {1: {0: "poison"}, 2: {1: "malformed"}}
    config = secagg_config(cache_dir, privacy={"secagg": {"enabled": True}}, faults=faults)
    run = run_in_process(config, tmp_path, progress=False)
    records = run.history
    assert [r["status"] for r in records] == ["completed"] * 4
    assert [r["clients_used"] for r in records[:2]] == [[1, 2, 3], [0, 2, 3]]
    assert "claimed 1000000000 examples" in records[0]["clients_dropped"][0]["reason"]
    assert "metrics missing" in records[1]["clients_dropped"][0]["reason"]
    assert all("SecAgg+ run again without it" in r["clients_dropped"][0]["reason"] for r in records[:2])
    assert records[-1]["accuracy"] > 0.5


def test_secagg_refuses_what_needs_single_updates():
    with pytest.raises(ConfigError, match="robustness.aggregator: must be 'fedavg' with privacy.secagg.enabled"):
        with_overrides(load_config("configs/tiny.yaml"), privacy={"secagg": {"enabled": True}},
                       robustness={"aggregator": "median"})
    with pytest.raises(ConfigError, match="privacy.dp.enabled: cannot be combined with privacy.secagg.enabled"):
        with_overrides(load_config("configs/tiny.yaml"), privacy={"secagg": {"enabled": True}, "dp": {"enabled": True}})


def test_secagg_run_resumes_bit_identical(cache_dir, tmp_path):
    config = secagg_config(cache_dir, privacy={"secagg": {"enabled": True}}, federation={"rounds": 3})
    whole = run_in_process(config, tmp_path / "whole", progress=False)
    run_in_process(config, tmp_path / "resumed", progress=False, stop_after_round=1)
    resumed = run_in_process(config, tmp_path / "resumed", progress=False, resume=True)
    for name, tensor in whole.state.global_state.items():
        assert torch.equal(resumed.state.global_state[name], tensor), name
