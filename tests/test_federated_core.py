import json

import pytest
import torch

from smartfed.eeqa import ImportanceStats
from smartfed.federated.checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from smartfed.config import ConfigError, config_fingerprint, config_from_dict, load_config, with_overrides
from smartfed.federated.protocol import ClientResult
from smartfed.federated.server import (
    check_update,
    client_instructions,
    fedavg,
    finish_round,
    initial_server_state,
    sample_clients,
    screen_results,
    update_quotas,
)


def _router_state(generator, modules=3, experts=6, width=10):
    state = {}
    for m in range(modules):
        state[f"layers.{m}.q_proj.router_weight"] = torch.randn(experts, width, generator=generator)
        state[f"layers.{m}.q_proj.router_bias"] = torch.randn(experts, generator=generator)
    return state


def test_fedavg_weights_by_examples_exactly():
    first = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, 10.0])}
    second = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([4.0, -2.0])}
    third = {"w": torch.tensor([[9.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([8.0, 1.0])}
    averaged = fedavg([first, second, third], [1, 3, 4])
    # (1*1 + 3*5 + 4*9) / 8 = 6.5, (2 + 18 + 0) / 8 = 2.5, (3 + 21 + 0) / 8 = 3, (4 + 24 + 4) / 8 = 4
    assert torch.equal(averaged["w"], torch.tensor([[6.5, 2.5], [3.0, 4.0]]))
    # (0 + 12 + 32) / 8 = 5.5, (10 - 6 + 4) / 8 = 1
    assert torch.equal(averaged["b"], torch.tensor([5.5, 1.0]))
    assert averaged["w"].dtype == torch.float32


def test_fedavg_matches_float64_reference_on_random_states():
    generator = torch.Generator().manual_seed(0)
    states = [_router_state(generator) for _ in range(4)]
    weights = [17, 3, 40, 8]
    averaged = fedavg(states, weights)
    for name in states[0]:
        reference = sum(s[name].double() * w for s, w in zip(states, weights)) / sum(weights)
        torch.testing.assert_close(averaged[name], reference.float(), rtol=1e-6, atol=1e-7)


def test_fedavg_rejects_bad_weights():
    state = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="one weight per state"):
        fedavg([state, state], [1])
    with pytest.raises(ValueError, match="not all zero"):
        fedavg([state], [0])


def test_check_update_names_the_problem():
    reference = {"a": torch.zeros(2, 3), "b": torch.zeros(2)}
    assert check_update({"a": torch.randn(2, 3), "b": torch.randn(2)}, reference) is None
    assert "wrong shape for a" in check_update({"a": torch.randn(3, 3), "b": torch.randn(2)}, reference)
    poisoned = torch.randn(2)
    poisoned[1] = float("nan")
    assert "non-finite values in b" in check_update({"a": torch.randn(2, 3), "b": poisoned}, reference)
    assert "missing ['b']" in check_update({"a": torch.randn(2, 3)}, reference)


def test_sampling_respects_fraction_minimum_and_seed():
    chosen = sample_clients(10, fraction=0.3, min_clients=2, seed=5, round_index=1)
    assert len(chosen) == 3 and chosen == sorted(set(chosen))
    assert len(sample_clients(10, fraction=0.1, min_clients=4, seed=5, round_index=1)) == 4
    assert chosen == sample_clients(10, fraction=0.3, min_clients=2, seed=5, round_index=1)
    rounds = {tuple(sample_clients(10, fraction=0.3, min_clients=2, seed=5, round_index=r)) for r in range(1, 9)}
    assert len(rounds) > 1
    with pytest.raises(ValueError, match="min_clients must lie in"):
        sample_clients(3, fraction=0.5, min_clients=4, seed=0, round_index=1)


def test_quota_update_every_r_rounds_from_merged_importance():
    state = initial_server_state(
        {"w": torch.zeros(1)}, seed=0, max_per_matrix={"a": 8, "b": 8, "c": 8}, top_k=4
    )
    assert state.quotas == {"a": 4, "b": 4, "c": 4}
    # Client 1 saw 10 tokens, client 2 saw 30: merged means are token-weighted.
    stats = [
        ImportanceStats("cosine", {"a": 1.0, "b": 3.0, "c": 0.5}, {"a": 10, "b": 10, "c": 10}),
        ImportanceStats("cosine", {"a": 3.0, "b": 33.0, "c": 1.5}, {"a": 30, "b": 30, "c": 30}),
    ]
    assert not update_quotas(state, stats, round_index=1, every_rounds=2, ema=0.5)
    assert state.quotas == {"a": 4, "b": 4, "c": 4}
    assert state.importance_ema == pytest.approx({"a": 0.1, "b": 0.9, "c": 0.05})
    assert update_quotas(state, stats, round_index=2, every_rounds=2, ema=0.5)
    assert sum(state.quotas.values()) == 12
    assert state.quotas["b"] == 8 and state.quotas["a"] >= state.quotas["c"]
    assert state.quota_history[-1] == [3, state.quotas]


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="more.rounds: unknown key"):
        config_from_dict({"more": {"rounds": 3}})
    with pytest.raises(ConfigError, match="communication.wire_dtype: must be one of"):
        config_from_dict({"communication": {"wire_dtype": "int8"}})
    with pytest.raises(ConfigError, match="more.router: must be one of"):
        config_from_dict({"more": {"router": "dense"}})
    with pytest.raises(ConfigError, match="federation.min_clients: must be <= federation.num_clients \\(4\\), got 5"):
        config_from_dict({"federation": {"min_clients": 5}})
    with pytest.raises(ConfigError, match="faults\\[2\\]\\[0\\]: must be one of"):
        config_from_dict({"faults": {2: {0: "explode"}}})
    with pytest.raises(ConfigError, match="round: unknown key"):
        config_from_dict({"round": 3})
    with pytest.raises(ConfigError, match="eeqa.per_expert: must be true or false"):
        config_from_dict({"eeqa": {"per_expert": "yes"}})
    with pytest.raises(ConfigError, match="label: must not be blank"):
        config_from_dict({"label": ""})
    assert config_from_dict({"label": "smartfed_uniform_quota"}).label == "smartfed_uniform_quota"
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  rounds: 7\nfaults:\n  '2': {'1': nan}\n")
    config = load_config(path)
    assert config.federation.rounds == 7 and config.faults == {2: {1: "nan"}}


def test_fingerprint_ignores_rounds_faults_and_label_only():
    config = config_from_dict({})
    assert config_fingerprint(config) == config_fingerprint(with_overrides(config, federation={"rounds": 9}, faults={1: {0: "raise"}}))
    assert config_fingerprint(config) == config_fingerprint(with_overrides(config, label="ablation"))
    assert config_fingerprint(config) != config_fingerprint(with_overrides(config, eeqa={"per_expert": False}))
    assert config_fingerprint(config) != config_fingerprint(with_overrides(config, federation={"lr": 0.5}))


def test_checkpoint_round_trip_and_atomic_replacement(tmp_path):
    generator = torch.Generator().manual_seed(4)
    first = Checkpoint(round=1, global_state=_router_state(generator), quotas={"a": 2},
                       history=[{"round": 1}], config_fingerprint="abc", extra={"seed": 3})
    save_checkpoint(tmp_path, first)
    second = Checkpoint(round=2, global_state=_router_state(generator),
                        quotas={"a": 3}, history=[{"round": 1}, {"round": 2}], config_fingerprint="abc", extra={"seed": 3})
    save_checkpoint(tmp_path, second)
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.quotas == {"a": 3} and loaded.history == second.history
    for name, tensor in second.global_state.items():
        assert torch.equal(loaded.global_state[name], tensor)
    # The previous round stays on disk until the next checkpoint is written and verified.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.previous"]
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert set(state["rng"]) == {"python", "numpy"} and "fresh AdamW" in state["optimizer"]


def test_checkpoint_falls_back_to_previous_after_interrupted_swap(tmp_path):
    checkpoint = Checkpoint(round=3, global_state={"w": torch.randn(2)}, quotas=None,
                            history=[], config_fingerprint="f")
    save_checkpoint(tmp_path, checkpoint)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.previous")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.previous"
    assert load_checkpoint(tmp_path).round == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        load_checkpoint(tmp_path / "elsewhere")


def test_client_budgets_scale_that_clients_quotas_only():
    config = config_from_dict({"more": {"top_k": 4}, "eeqa": {"client_budgets": {1: 0.5}}})
    state = initial_server_state(
        {"w": torch.zeros(1)}, seed=0, max_per_matrix={"a": 8, "b": 8, "c": 8, "d": 8}, top_k=4
    )
    full = client_instructions(state, 0, 1, config)
    half = client_instructions(state, 1, 1, config)
    assert full.quotas == {"a": 4, "b": 4, "c": 4, "d": 4}
    assert sum(half.quotas.values()) == 8 and all(k >= 1 for k in half.quotas.values())
    assert full.seed != half.seed and full.seed == client_instructions(state, 0, 1, config).seed
    assert full.seed != client_instructions(state, 0, 2, config).seed


def test_screen_and_finish_round_aggregate_only_valid_results():
    reference = {"w": torch.zeros(2)}
    state = initial_server_state(reference, seed=0)
    results = {
        0: ClientResult(state={"w": torch.tensor([1.0, 2.0])}, num_examples=1),
        1: ClientResult(state={"w": torch.tensor([4.0, 8.0])}, num_examples=3),
        2: ClientResult(state={"w": torch.tensor([9.0, 9.0])}, num_examples=0),
        3: ClientResult(state={"w": torch.tensor([float("inf"), 0.0])}, num_examples=5),
    }
    valid, dropped = screen_results(state, results)
    assert sorted(valid) == [0, 1]
    assert [(d["client"], d["reason"][:20]) for d in dropped] == [(2, "num_examples must be"), (3, "non-finite values in")]
    config = config_from_dict({})
    finish_round(state, valid, aggregate=fedavg, round_index=1, eeqa=config.eeqa)
    assert state.round == 1 and torch.equal(state.global_state["w"], torch.tensor([3.25, 6.5]))


def test_in_process_grid_delivers_like_a_flower_grid():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from smartfed.federated.grid import NODE_ID_BASE, InProcessGrid

    class EchoClient:
        config = SimpleNamespace(communication=SimpleNamespace(wire_dtype="fp32"))

        def handle(self, msg, partition_id, *, time_limit_s=None):
            if partition_id == 1:
                raise RuntimeError("client 1 is down")
            return Message(RecordDict({"echo": ConfigRecord({"partition": partition_id})}), reply_to=msg)

    grid = InProcessGrid(EchoClient(), 3)
    assert sorted(grid.get_node_ids()) == [NODE_ID_BASE, NODE_ID_BASE + 1, NODE_ID_BASE + 2]
    sent = [Message(RecordDict(), node, MessageType.QUERY) for node in sorted(grid.get_node_ids())]
    ids = list(grid.push_messages(sent))
    assert len(set(ids)) == 3
    replies = {reply.metadata.src_node_id: reply for reply in grid.pull_messages(ids)}
    assert replies[NODE_ID_BASE + 2].content.config_records["echo"]["partition"] == 2
    assert replies[NODE_ID_BASE + 2].metadata.reply_to_message_id == ids[2]
    assert replies[NODE_ID_BASE + 1].has_error() and "client 1 is down" in replies[NODE_ID_BASE + 1].error.reason
    assert list(grid.pull_messages(ids)) == []
    with pytest.raises(ValueError, match="no in-process node 7"):
        grid.push_messages([Message(RecordDict(), 7, MessageType.QUERY)])
