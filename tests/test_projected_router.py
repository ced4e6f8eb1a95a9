"""The projected router z = U (P x) + br (issue 14): P fixed and rebuilt from its seed, U trained and
exchanged; every backend runs it as the linear router U P."""

import math

import pytest
import torch

from smartfed import LoRAPool, MoREConfig, inject_more, load_routers, more_layers, router_state_dict, save_routers
from smartfed.config import ConfigError, config_fingerprint, config_from_dict, config_to_dict, with_overrides
from smartfed.experiments.runs import run_in_process
from smartfed.layer import MoRELinear, router_projection
from smartfed_kernels import reference
from smartfed_kernels.testing import assert_close_for

Q0 = "model.layers.0.self_attn.q_proj"


def make_layer(router_init="normal", router_dim=5, backend="auto", seed=1, projection_seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(20, 12)
    with torch.no_grad():
        base.weight.copy_(torch.randn(12, 20, generator=generator) * 0.2)
        base.bias.copy_(torch.randn(12, generator=generator))
    expert_a = torch.randn(9, 20, generator=generator) * 0.3
    expert_b = torch.randn(12, 9, generator=generator) * 0.3
    layer = MoRELinear(base, expert_a, expert_b, 3, router="projected", router_dim=router_dim, router_init=router_init,
                       backend=backend, seed=seed, projection_seed=projection_seed, router_bias=bias)
    with torch.no_grad():
        layer.router_weight.copy_(torch.randn(layer.router_weight.shape, generator=generator))
        if bias:
            layer.router_bias.copy_(torch.randn(9, generator=generator) * 0.1)
    return layer


def layer_reference(layer, x, router_weight=None):
    """The reference op on the layer's composed router weight U P."""
    weight = layer.router_weight @ layer.router_projection if router_weight is None else router_weight
    return reference.more_linear(x, layer.base.weight, layer.base.bias, weight, layer.router_bias, layer.expert_a,
                                 layer.expert_b, layer.top_k, gate=layer.gate)


def test_projection_is_seeded_signs_with_unit_rows():
    projection = router_projection(7, 50, seed=4)
    assert projection.shape == (7, 50) and projection.dtype == torch.float32
    assert set((projection * math.sqrt(50)).round().unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(projection.norm(dim=1), torch.ones(7))
    assert torch.equal(projection, router_projection(7, 50, seed=4))
    assert not torch.equal(projection, router_projection(7, 50, seed=5))


def test_layer_shapes_and_what_is_trained():
    layer = make_layer(router_dim=5)
    assert layer.router_weight.shape == (9, 5) and layer.router_projection.shape == (5, 20)
    assert layer.op_router == "linear" and layer.num_router_parameters() == 9 * 5 + 9
    assert not layer.router_projection.requires_grad
    assert torch.equal(layer.router_projection, router_projection(5, 20, 0))
    assert "router_dim=5, projection_seed=0" in repr(layer)


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_linear_router_u_p(tokens, backend, bias):
    layer = make_layer(backend=backend, bias=bias)
    x = torch.randn(tokens, 20, generator=torch.Generator().manual_seed(tokens))
    want = layer_reference(layer, x)
    assert_close_for(layer(x), want)
    with torch.no_grad():  # the CPU inference shortcut composes U P itself
        assert_close_for(layer(x), want)


def test_router_gradient_flows_to_u_through_p():
    layer = make_layer()
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
    (layer(x) * upstream).sum().backward()
    u = layer.router_weight.detach().clone().requires_grad_()
    bias = layer.router_bias.detach().clone().requires_grad_()
    want = reference.more_linear(x, layer.base.weight, layer.base.bias, u @ layer.router_projection, bias,
                                 layer.expert_a, layer.expert_b, layer.top_k)
    (want * upstream).sum().backward()
    assert_close_for(layer.router_weight.grad, u.grad, what="grad U")
    assert_close_for(layer.router_bias.grad, bias.grad, what="grad router_bias")
    assert layer.router_projection.grad is None


def test_affinity_init_routes_each_expert_direction_to_its_expert():
    generator = torch.Generator().manual_seed(0)
    expert_a = torch.randn(8, 64, generator=generator)
    layer = MoRELinear(torch.nn.Linear(64, 16), expert_a, torch.randn(16, 8, generator=generator), 2,
                       router="projected", router_dim=64, router_init="affinity")
    directions = expert_a / expert_a.norm(dim=1, keepdim=True)
    logits = directions @ layer.effective_router_weight().detach().t()
    assert (logits.argmax(dim=1) == torch.arange(8)).sum() >= 7


def test_bad_sizes_and_forms_are_refused():
    base, expert_a, expert_b = torch.nn.Linear(20, 12), torch.randn(9, 20), torch.randn(12, 9)
    with pytest.raises(ValueError, match="router_dim: expected an int >= 1, got 0"):
        MoRELinear(base, expert_a, expert_b, 3, router="projected", router_dim=0)
    with pytest.raises(ValueError, match="projection_seed: expected an int >= 0, got -1"):
        MoREConfig(router="projected", projection_seed=-1)
    with pytest.raises(ValueError, match="router: expected one of .*'projected'"):
        MoREConfig(router="sideways")
    layer = MoRELinear(base, expert_a, expert_b, 3)
    layer.router = "projected"
    with pytest.raises(ValueError, match="needs the layer to be built with it"):
        layer(torch.randn(2, 20))


@pytest.fixture
def pool(make_lora_adapter):
    return LoRAPool.from_pretrained(make_lora_adapter("a", r=4))


def test_exchange_sends_u_and_checkpoints_refuse_another_projection(pool, make_tiny_llama, tmp_path):
    projected = MoREConfig(top_k=2, router="projected", router_dim=3)
    trained = inject_more(make_tiny_llama(), pool, projected)
    state = router_state_dict(trained)
    assert state[f"{Q0}.router_weight"].shape == (4, 3)
    with torch.no_grad():
        for layer in more_layers(trained).values():
            layer.router_weight.normal_()
    save_routers(trained, tmp_path / "ckpt", pool)
    again = inject_more(make_tiny_llama(), pool, projected)
    load_routers(again, tmp_path / "ckpt", pool)
    for key, value in router_state_dict(trained).items():
        assert torch.equal(router_state_dict(again)[key], value)
    for other, field in ((MoREConfig(top_k=2, router="projected", router_dim=2), "router_dim"),
                         (MoREConfig(top_k=2, router="projected", router_dim=3, projection_seed=1), "projection_seed"),
                         (MoREConfig(top_k=2), "router")):
        model = inject_more(make_tiny_llama(), pool, other)
        with pytest.raises(ValueError, match=f"module '{Q0}' was saved with {field}="):
            load_routers(model, tmp_path / "ckpt", pool)


def test_config_takes_the_form_and_keeps_old_fingerprints():
    config = config_from_dict({"more": {"router": "projected", "router_dim": 16, "projection_seed": 2}})
    assert (config.more.router, config.more.router_dim, config.more.projection_seed) == ("projected", 16, 2)
    with pytest.raises(ConfigError, match="more.router_dim"):
        config_from_dict({"more": {"router_dim": 0}})
    default = config_from_dict({})
    recorded_before = config_to_dict(default)
    del recorded_before["more"]["router_dim"], recorded_before["more"]["projection_seed"]
    assert config_fingerprint(config_from_dict(recorded_before)) == config_fingerprint(default)
    assert config_fingerprint(with_overrides(default, more={"router_dim": 8})) != config_fingerprint(default)


def test_federated_run_uploads_u_alone(cache_dir, tmp_path):
    def run(router, name):
        config = config_from_dict({
            "seed": 3,
            "task": {"train_examples": 64, "eval_examples": 16, "seq_len": 8},
            "pool": {"cache_dir": str(cache_dir), "train_steps": 5, "batch_size": 16},
            "more": {"top_k": 4, "router": router, "router_dim": 4},
            "eeqa": {"enabled": False},
            "federation": {"num_clients": 2, "rounds": 1, "min_clients": 2, "local_steps": 1, "batch_size": 8,
                           "min_examples_per_client": 4},
        })
        outcome = run_in_process(config, tmp_path / name, progress=False)
        return outcome.history[-1]

    linear, projected = run("linear", "linear"), run("projected", "projected")
    assert projected["status"] == "completed"
    assert 0 < projected["tensor_bytes_up"] < linear["tensor_bytes_up"] / 3
