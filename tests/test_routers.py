import hashlib
import json

import pytest
import safetensors.torch
import torch
from torch import nn

from smartfed import (
    LoRAPool, MoREConfig, inject_more, load_router_state_dict, load_routers, more_layers, router_state_dict,
    save_routers,
)

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def pool(make_lora_adapter):
    return LoRAPool.from_pretrained(make_lora_adapter("a", r=4))


def randomize_routers(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in more_layers(model).values():
            layer.router_weight.copy_(torch.randn(layer.router_weight.shape, generator=generator))
            layer.router_bias.copy_(torch.randn(layer.router_bias.shape, generator=generator))


def logits(model, token_ids):
    with torch.no_grad():
        return model(input_ids=token_ids).logits


def test_router_state_dict_round_trip(pool, make_tiny_llama, random_token_ids):
    trained = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    randomize_routers(trained, seed=1)
    state = router_state_dict(trained)
    assert sorted(state) == sorted(f"model.layers.{i}.self_attn.{m}.{t}" for i in range(2)
                                   for m in ("q_proj", "v_proj") for t in ("router_weight", "router_bias"))
    assert state[f"{Q0}.router_weight"].shape == (4, 32) and not state[f"{Q0}.router_weight"].requires_grad
    assert state[f"{Q0}.router_bias"].data_ptr() != more_layers(trained)[Q0].router_bias.data_ptr()

    fresh = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    assert not torch.allclose(logits(fresh, random_token_ids), logits(trained, random_token_ids))
    load_router_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, random_token_ids), logits(trained, random_token_ids), rtol=0, atol=0)


def test_load_router_state_dict_is_strict_and_atomic(pool, make_tiny_llama):
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    before = router_state_dict(model)
    good = {key: torch.randn_like(value) for key, value in before.items()}
    weight_key = f"{Q0}.router_weight"
    cases = [
        ({k: v for k, v in good.items() if k != weight_key}, KeyError, rf"missing keys \['{weight_key}'\]"),
        ({**good, "lm_head.router_weight": torch.zeros(2)}, KeyError, r"unexpected keys \['lm_head.router_weight'\]"),
        ({**good, weight_key: torch.zeros(4, 16)}, ValueError,
         rf"state\['{weight_key}'\]: expected shape \(4, 32\), got \(4, 16\)"),
        ({**good, weight_key: [[0.0]]}, TypeError, "expected a tensor, got list"),
        ({**good, weight_key: torch.full((4, 32), float("nan"))}, ValueError, "expected finite floating-point"),
    ]
    for state, error, message in cases:
        with pytest.raises(error, match=message):
            load_router_state_dict(model, state)
        for key, value in router_state_dict(model).items():
            assert torch.equal(value, before[key])
    with pytest.raises(ValueError, match="model: holds no MoRE layers"):
        router_state_dict(make_tiny_llama())


def test_save_and_load_routers_round_trip_with_top_k(pool, make_tiny_llama, random_token_ids, tmp_path):
    trained = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, seed=5))
    randomize_routers(trained, seed=2)
    more_layers(trained)[Q0].top_k = 3
    save_routers(trained, tmp_path / "ckpt", pool)
    meta = json.loads((tmp_path / "ckpt" / "routers.json").read_text())
    assert meta["pool_fingerprint"] == pool.fingerprint
    assert meta["pool"]["adapters"][0]["sha256"] == pool.adapters[0].sha256
    assert meta["config"]["top_k"] == 2 and meta["config"]["seed"] == 5
    assert meta["layers"][Q0]["top_k"] == 3

    wrapper = nn.Module()
    wrapper.backbone = make_tiny_llama()
    inject_more(wrapper, pool, MoREConfig(top_k=2))
    load_routers(wrapper, tmp_path / "ckpt", pool)
    assert more_layers(wrapper)[f"backbone.{Q0}"].top_k == 3
    torch.testing.assert_close(logits(wrapper.backbone, random_token_ids), logits(trained, random_token_ids),
                               rtol=0, atol=0)


def test_load_routers_refuses_another_pool(pool, make_lora_adapter, make_tiny_llama, tmp_path):
    trained = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    save_routers(trained, tmp_path / "ckpt", pool)
    other_pool = LoRAPool.from_pretrained(make_lora_adapter("b", r=4, seed=9))
    other_model = inject_more(make_tiny_llama(), other_pool, MoREConfig(top_k=2))
    before = router_state_dict(other_model)
    with pytest.raises(ValueError, match=rf"checkpoint was made against pool {pool.fingerprint[:16]} "
                                         rf"\(adapters \['a'\]\), not the given pool {other_pool.fingerprint[:16]}"):
        load_routers(other_model, tmp_path / "ckpt", other_pool)
    with pytest.raises(ValueError, match=rf"built from pool {other_pool.fingerprint[:16]}, not from the given pool"):
        load_routers(other_model, tmp_path / "ckpt", pool)
    with pytest.raises(ValueError, match="not from the given pool"):
        save_routers(other_model, tmp_path / "other", pool)
    for key, value in router_state_dict(other_model).items():
        assert torch.equal(value, before[key])


def test_load_routers_refuses_other_router_form_and_missing_files(pool, make_tiny_llama, tmp_path):
    trained = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    save_routers(trained, tmp_path / "ckpt", pool)
    space = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, router="expert_space"))
    with pytest.raises(ValueError, match=f"module '{Q0}' was saved with router='linear' but the model's layer "
                                         "has router='expert_space'"):
        load_routers(space, tmp_path / "ckpt", pool)
    partial = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, target_modules=["*q_proj"]))
    with pytest.raises(KeyError, match="checkpoint modules .* differ from the model's MoRE modules"):
        load_routers(partial, tmp_path / "ckpt", pool)
    with pytest.raises(FileNotFoundError, match="routers.json: missing"):
        load_routers(trained, tmp_path / "nowhere", pool)


# --------------------------------------------------------------------------- untrusted router files


def model_snapshot(model):
    """Router tensors and top_k of every MoRE layer, to show a refused load changed nothing."""
    return router_state_dict(model), {name: layer.top_k for name, layer in more_layers(model).items()}


def assert_unchanged(model, snapshot):
    tensors, top_ks = snapshot
    for key, value in router_state_dict(model).items():
        assert torch.equal(value, tensors[key]), key
    assert {name: layer.top_k for name, layer in more_layers(model).items()} == top_ks


def rewrite_tensors(folder, tensors, metadata):
    """Replace routers.safetensors and record its sha256, as a consistent but altered save would."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    (folder / "routers.safetensors").write_bytes(data)
    edit_meta(folder, lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))


def edit_meta(folder, change):
    meta = json.loads((folder / "routers.json").read_text())
    change(meta)
    (folder / "routers.json").write_text(json.dumps(meta))


@pytest.fixture
def saved(pool, make_tiny_llama, tmp_path):
    """A router folder of a topk_softmax / gamma=k model with random routers, and a fresh model of
    the same settings with other random routers and a non-default top_k, ready to refuse loads."""
    trained = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2))
    randomize_routers(trained, seed=3)
    folder = save_routers(trained, tmp_path / "ckpt", pool)
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=3))
    randomize_routers(model, seed=4)
    return folder, model


def test_load_routers_refuses_other_gate_or_gamma_and_leaves_the_model_untouched(saved, pool, make_tiny_llama):
    folder, _ = saved
    cases = [
        (MoREConfig(top_k=2, gate="softmax_topk", gamma=2.0), "gate='topk_softmax' but the model's layer has "
                                                              "gate='softmax_topk'"),
        (MoREConfig(top_k=2, gamma=2.0), r"gamma=None but the model's layer has gamma=2.0 \(gamma None means k\)"),
        (MoREConfig(top_k=2, router_bias=False), "router_bias=True but the model's layer has router_bias=False"),
    ]
    for config, message in cases:
        model = inject_more(make_tiny_llama(), pool, config)
        snapshot = model_snapshot(model)
        with pytest.raises(ValueError, match=rf"routers.json: module '{Q0}' was saved with {message}"):
            load_routers(model, folder, pool)
        assert_unchanged(model, snapshot)


@pytest.mark.parametrize("top_k, shown", [(True, "True"), (0, "0"), (5, "5"), ("2", "'2'"), (2.0, "2.0")])
def test_load_routers_refuses_a_bad_top_k_before_writing_any_tensor(saved, pool, top_k, shown):
    folder, model = saved
    edit_meta(folder, lambda meta: meta["layers"][Q0].update(top_k=top_k))
    snapshot = model_snapshot(model)
    with pytest.raises(ValueError, match=rf"routers.json: module '{Q0}': top_k {shown} is not an int in 1..4"):
        load_routers(model, folder, pool)
    assert_unchanged(model, snapshot)


def test_load_routers_refuses_disagreeing_pool_fingerprints(saved, pool):
    folder, model = saved
    snapshot = model_snapshot(model)
    tensors = safetensors.torch.load_file(folder / "routers.safetensors")
    rewrite_tensors(folder, tensors, {"pool_fingerprint": "f" * 64})
    with pytest.raises(ValueError, match=r"routers.safetensors: metadata pool_fingerprint 'ffffffffffffffff' "
                                         rf"disagrees with pool_fingerprint '{pool.fingerprint[:16]}' in routers.json"):
        load_routers(model, folder, pool)
    rewrite_tensors(folder, tensors, {})
    with pytest.raises(ValueError, match="metadata pool_fingerprint 'None' disagrees"):
        load_routers(model, folder, pool)
    rewrite_tensors(folder, tensors, {"pool_fingerprint": pool.fingerprint})
    edit_meta(folder, lambda meta: meta["pool"].update(fingerprint="e" * 64))
    with pytest.raises(ValueError, match=r"routers.json: pool.fingerprint 'eeeeeeeeeeeeeeee' disagrees with its "
                                         rf"pool_fingerprint '{pool.fingerprint[:16]}'"):
        load_routers(model, folder, pool)
    assert_unchanged(model, snapshot)


def test_load_routers_refuses_truncated_or_flipped_tensors(saved, pool):
    folder, model = saved
    snapshot = model_snapshot(model)
    path = folder / "routers.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"routers.safetensors: damaged or replaced: its sha256 is not the "
                                         "tensors_sha256"):
        load_routers(model, folder, pool)
    edit_meta(folder, lambda meta: meta.pop("tensors_sha256"))  # as written before the hash was recorded
    with pytest.raises(ValueError, match="routers.safetensors: corrupt or truncated safetensors file"):
        load_routers(model, folder, pool)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    edit_meta(folder, lambda meta: meta.update(tensors_sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(ValueError, match="damaged or replaced"):
        load_routers(model, folder, pool)
    assert_unchanged(model, snapshot)


def test_load_routers_refuses_bad_tensors_and_metadata(saved, pool):
    folder, model = saved
    snapshot = model_snapshot(model)
    good = safetensors.torch.load_file(folder / "routers.safetensors")
    metadata = {"pool_fingerprint": pool.fingerprint}
    weight = f"{Q0}.router_weight"
    cases = [
        ({**good, weight: torch.full((4, 32), float("inf"))}, ValueError, "expected finite floating-point"),
        ({**good, weight: torch.zeros(4, 32, dtype=torch.int32)}, ValueError, "got torch.int32"),
        ({**good, weight: torch.zeros(4, 31)}, ValueError, r"expected shape \(4, 32\), got \(4, 31\)"),
        ({k: v for k, v in good.items() if k != weight}, KeyError, "missing keys"),
        ({**good, "extra.router_weight": torch.zeros(1)}, KeyError, "unexpected keys"),
    ]
    for tensors, error, message in cases:
        rewrite_tensors(folder, tensors, metadata)
        with pytest.raises(error, match=rf"routers.safetensors.*{message}"):
            load_routers(model, folder, pool)
    rewrite_tensors(folder, good, metadata)
    for change, message in [
        (lambda meta: meta.update(version=True), "routers.json: version: expected 1, got True"),
        (lambda meta: meta["layers"][Q0].pop("gate"), rf"module '{Q0}': gate is missing"),
        (lambda meta: meta["layers"][Q0].update(num_experts=8), "was saved with num_experts=8"),
        (lambda meta: meta.update(layers=[]), "routers.json: layers: expected an object of modules, got list"),
        (lambda meta: meta.update(pool_fingerprint=None), "routers.json: pool_fingerprint: expected the pool's"),
    ]:
        original = (folder / "routers.json").read_text()
        edit_meta(folder, change)
        with pytest.raises(ValueError, match=message):
            load_routers(model, folder, pool)
        (folder / "routers.json").write_text(original)
    (folder / "routers.json").write_text('{"format": "smartfed-rou')
    with pytest.raises(ValueError, match="routers.json: not valid JSON"):
        load_routers(model, folder, pool)
    assert_unchanged(model, snapshot)
