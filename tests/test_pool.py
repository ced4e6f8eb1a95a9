import hashlib
import json
import math
import re
import warnings

import pytest
import safetensors.torch
import torch

from smartfed import AdapterError, LoRAPool

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def file_tensors(folder):
    """module name -> (lora_A, lora_B) straight from the saved file."""
    tensors = safetensors.torch.load_file(folder / WEIGHTS)
    prefix = "base_model.model."
    modules = {}
    for key, tensor in tensors.items():
        module, part = key[len(prefix):].rsplit(".", 2)[:2]
        modules.setdefault(module, {})[part] = tensor
    return {module: (parts["lora_A"], parts["lora_B"]) for module, parts in modules.items()}


def rewrite_weights(folder, edit):
    path = folder / WEIGHTS
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path)


def rewrite_config(folder, **changes):
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def error_for(path, problem):
    return re.escape(str(path)) + ".*" + problem


def test_single_adapter_experts_equal_file_tensors_with_scale_folded(make_lora_adapter):
    folder = make_lora_adapter("solo", r=4, lora_alpha=8)
    pool = LoRAPool.from_pretrained([folder])
    saved = file_tensors(folder)
    assert list(pool.modules) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    for name, experts in pool.modules.items():
        lora_a, lora_b = saved[name]
        assert lora_b.abs().max() > 0
        torch.testing.assert_close(experts.expert_a, lora_a, rtol=0, atol=0)
        torch.testing.assert_close(experts.expert_b, lora_b * 2.0, rtol=1e-6, atol=0)
        assert experts.origins == [("solo", j) for j in range(4)]
    info = pool.adapters[0]
    assert info.sha256 == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    assert (info.name, info.r, info.lora_alpha, info.use_rslora) == ("solo", 4, 8, False)
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    assert info.module_scales[Q0] == 2.0


def test_rslora_scale_is_alpha_over_sqrt_rank(make_lora_adapter):
    folder = make_lora_adapter("rs", r=4, lora_alpha=8, use_rslora=True)
    pool = LoRAPool.from_pretrained(folder)
    lora_a, lora_b = file_tensors(folder)[Q0]
    assert pool.adapters[0].module_scales[Q0] == 8 / math.sqrt(4)
    torch.testing.assert_close(pool.modules[Q0].expert_b, lora_b * 4.0, rtol=1e-6, atol=0)


def test_rank_and_alpha_patterns_set_rank_and_scale_per_module(make_lora_adapter):
    folder = make_lora_adapter("pat", r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16})
    pool = LoRAPool.from_pretrained(folder)
    info = pool.adapters[0]
    assert info.module_ranks[Q0] == 4 and info.module_ranks[V1] == 2
    assert info.module_scales[Q0] == 2.0 and info.module_scales[V1] == 8.0
    _, lora_b = file_tensors(folder)[V1]
    assert pool.modules[V1].num_experts == 2
    torch.testing.assert_close(pool.modules[V1].expert_b, lora_b * 8.0, rtol=1e-6, atol=0)


def test_two_adapters_stack_ranks_only_where_targeted(make_lora_adapter):
    first = make_lora_adapter("first", target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8, seed=1)
    second = make_lora_adapter("second", target_modules=("q_proj", "k_proj"), r=2, lora_alpha=6, seed=2)
    pool = LoRAPool.from_pretrained([first, second], names=["alpha", "beta"])
    first_q, second_q = file_tensors(first)[Q0], file_tensors(second)[Q0]

    q = pool.modules[Q0]
    assert q.num_experts == 6
    assert q.origins == [("alpha", 0), ("alpha", 1), ("alpha", 2), ("alpha", 3), ("beta", 0), ("beta", 1)]
    torch.testing.assert_close(q.expert_a, torch.cat([first_q[0], second_q[0]]), rtol=0, atol=0)
    torch.testing.assert_close(q.expert_b, torch.cat([first_q[1] * 2.0, second_q[1] * 3.0], dim=1),
                               rtol=1e-6, atol=0)
    assert pool.modules["model.layers.0.self_attn.k_proj"].origins == [("beta", 0), ("beta", 1)]
    assert pool.modules[V1].origins == [("alpha", j) for j in range(4)]
    assert pool.num_experts == 2 * (6 + 2 + 4)

    provenance = json.loads(json.dumps(pool.provenance()))
    assert provenance["modules"][Q0]["sources"] == [["alpha", 4], ["beta", 2]]
    assert [a["name"] for a in provenance["adapters"]] == ["alpha", "beta"]
    text = pool.describe()
    assert "2 adapters, 6 modules, 24 experts" in text
    assert f"{Q0}: [32 x 32] N=6 (alpha:4, beta:2)" in text


def test_fingerprint_is_stable_and_tracks_names_order_and_weights(make_lora_adapter):
    first = make_lora_adapter("first", seed=1)
    second = make_lora_adapter("second", seed=2)
    fingerprint = LoRAPool.from_pretrained([first, second]).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert LoRAPool.from_pretrained([first, second]).fingerprint == fingerprint
    assert LoRAPool.from_pretrained([second, first]).fingerprint != fingerprint
    assert LoRAPool.from_pretrained([first, second], names=["x", "second"]).fingerprint != fingerprint
    rewrite_weights(second, lambda t: t.update({k: v * 1.5 for k, v in t.items()}))
    assert LoRAPool.from_pretrained([first, second]).fingerprint != fingerprint


def test_rejects_missing_folder_and_files(make_lora_adapter, tmp_path):
    with pytest.raises(AdapterError, match=error_for(tmp_path / "nowhere", "not a directory")):
        LoRAPool.from_pretrained(tmp_path / "nowhere")
    folder = make_lora_adapter("a", steps=0)
    (folder / WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, f"missing {WEIGHTS}")):
        LoRAPool.from_pretrained(folder)
    (folder / CONFIG).unlink()
    with pytest.raises(AdapterError, match=error_for(folder / CONFIG, f"missing {CONFIG}")):
        LoRAPool.from_pretrained(folder)


def test_rejects_bad_json(make_lora_adapter):
    folder = make_lora_adapter("a", steps=0)
    (folder / CONFIG).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(AdapterError, match=error_for(folder / CONFIG, "not valid JSON")):
        LoRAPool.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_rejects_corrupt_safetensors(make_lora_adapter, damage):
    folder = make_lora_adapter("a", steps=0)
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(AdapterError, match=error_for(path, "corrupt or truncated safetensors")):
        LoRAPool.from_pretrained(folder)


def test_rejects_non_lora_adapter_type(tiny_llama, tmp_path):
    from peft import IA3Config, get_peft_model

    folder = tmp_path / "ia3"
    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(tiny_llama, config).save_pretrained(folder)
    with pytest.raises(AdapterError, match=error_for(folder / CONFIG, "peft_type is 'IA3', expected 'LORA'")):
        LoRAPool.from_pretrained(folder)


def test_rejects_dora(make_lora_adapter):
    folder = make_lora_adapter("dora", steps=0, use_dora=True)
    with pytest.raises(AdapterError, match=error_for(folder / CONFIG, "use_dora is true")):
        LoRAPool.from_pretrained(folder)
    rewrite_config(folder, use_dora=False)
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, "lora_magnitude_vector")):
        LoRAPool.from_pretrained(folder)


def test_rejects_embedding_lora(make_lora_adapter):
    folder = make_lora_adapter("emb", steps=0, target_modules=("embed_tokens",))
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, "embedding LoRA")):
        LoRAPool.from_pretrained(folder)


def test_rejects_shapes_inconsistent_between_adapters(make_lora_adapter):
    small = make_lora_adapter("small", steps=0)
    wide = make_lora_adapter("wide", steps=0, target_modules=("q_proj",), model_overrides={"hidden_size": 48})
    with pytest.raises(AdapterError, match=error_for(wide / WEIGHTS, f"module '{Q0}' has d_in=48, d_out=48 "
                                                     "but adapter 'small'")):
        LoRAPool.from_pretrained([small, wide])


def test_rejects_rank_mismatch_between_lora_a_and_lora_b(make_lora_adapter):
    folder = make_lora_adapter("a", steps=1)
    key = f"base_model.model.{Q0}.lora_B.weight"
    rewrite_weights(folder, lambda t: t.update({key: t[key][:, :3].contiguous()}))
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, "rank mismatch, lora_A .* has rank 4 "
                                                     "but lora_B .* has rank 3")):
        LoRAPool.from_pretrained(folder)


def test_rejects_rank_that_contradicts_the_config(make_lora_adapter):
    folder = make_lora_adapter("a", steps=0)
    rewrite_config(folder, r=8)
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, r"lora_A has rank 4 but .* says 8")):
        LoRAPool.from_pretrained(folder)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_rejects_non_finite_weights(make_lora_adapter, bad_value):
    folder = make_lora_adapter("a", steps=1)
    key = f"base_model.model.{V1}.lora_A.weight"

    def poison(tensors):
        tensors[key][1, 2] = bad_value

    rewrite_weights(folder, poison)
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, f"module '{V1}': lora_A holds non-finite")):
        LoRAPool.from_pretrained(folder)


def test_rejects_half_pairs_and_foreign_tensors(make_lora_adapter):
    folder = make_lora_adapter("a", steps=0)
    key = f"base_model.model.{Q0}.lora_B.weight"
    rewrite_weights(folder, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, "has lora_A but no lora_B")):
        LoRAPool.from_pretrained(folder)
    rewrite_weights(folder, lambda t: t.update({"base_model.model.lm_head.weight": torch.randn(4, 4)}))
    with pytest.raises(AdapterError, match=error_for(folder / WEIGHTS, "unexpected tensor 'base_model.model.lm_head")):
        LoRAPool.from_pretrained(folder)


def test_rejects_duplicate_names(make_lora_adapter):
    first = make_lora_adapter("one/adapter", steps=0)
    second = make_lora_adapter("two/adapter", steps=0)
    with pytest.raises(AdapterError, match=error_for(second, "duplicate adapter name 'adapter'")):
        LoRAPool.from_pretrained([first, second])
    with pytest.raises(AdapterError, match=error_for(second, "duplicate adapter name 'x'")):
        LoRAPool.from_pretrained([first, second], names=["x", "x"])
    assert [a.name for a in LoRAPool.from_pretrained([first, second], names=["x", "y"]).adapters] == ["x", "y"]
    with pytest.raises(ValueError, match="names: expected 2 names"):
        LoRAPool.from_pretrained([first, second], names=["x"])


@pytest.mark.parametrize("changes, problem", [
    ({"rank_pattern": {"(": 4}}, r"rank_pattern '\(' is not a valid regular expression"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
    ({"alpha_pattern": {"[": 2.0}}, r"alpha_pattern '\[' is not a valid regular expression"),
    ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be an integer, got 2.5"),
    ({"rank_pattern": ["q_proj"]}, r"rank_pattern must be a JSON object"),
    ({"target_modules": 5}, r"target_modules must be null, a regular expression or a list of module names, got 5"),
    ({"target_modules": "(q_proj"}, r"target_modules '\(q_proj' is not a valid regular expression"),
    ({"target_modules": ["q_proj", 3]}, r"target_modules must be null, a regular expression or a list"),
    ({"exclude_modules": "*"}, r"exclude_modules '\*' is not a valid regular expression"),
    ({"lora_alpha": 1e300}, r"lora_alpha must be a finite number in \(0, 1e\+06\], got 1e\+300"),
    ({"lora_alpha": 10**400}, r"lora_alpha must be at most 1e\+06, got an integer of 1329 bits"),
    ({"lora_alpha": "16"}, r"lora_alpha must be a number, got '16'"),
    ({"r": 0}, r"r must be a finite number in \(0, 4096\], got 0"),
    ({"r": True}, r"r must be an integer, got True"),
    ({"lora_dropout": 2}, r"lora_dropout must be a number in \[0, 1\], got 2"),
    ({"use_rslora": "yes"}, r"use_rslora must be true or false, got 'yes'"),
    ({"fan_in_fan_out": 1}, r"fan_in_fan_out must be true or false"),
    ({"init_lora_weights": 3}, r"init_lora_weights must be true, false or a string, got 3"),
    ({"layers_to_transform": "0"}, r"layers_to_transform must be null, an integer or a list of integers"),
    ({"base_model_name_or_path": ["x"]}, r"base_model_name_or_path must be a string or null"),
])
def test_every_config_field_peft_accepts_is_checked(make_lora_adapter, changes, problem):
    folder = make_lora_adapter("a", r=4, steps=0)
    rewrite_config(folder, **changes)
    with pytest.raises(AdapterError, match=error_for(folder / CONFIG, problem)) as caught:
        LoRAPool.from_pretrained(folder)
    assert "\n" not in str(caught.value)


def test_alphas_within_their_bound_give_finite_scales(make_lora_adapter):
    folder = make_lora_adapter("a", r=4, steps=0)
    rewrite_config(folder, lora_alpha=900_000.0, rank_pattern={"q_proj": 4}, alpha_pattern={})
    pool = LoRAPool.from_pretrained(folder)
    assert max(pool.adapters[0].module_scales.values()) == 225_000.0
    rewrite_config(folder, lora_alpha=4.0, use_rslora=True, alpha_pattern={"v_proj": 999_999.0})
    pool = LoRAPool.from_pretrained(folder)
    assert max(pool.adapters[0].module_scales.values()) == pytest.approx(499_999.5)


def test_adapter_errors_are_smartfed_errors_and_one_line_from_the_cli(make_lora_adapter, tmp_path, capsys):
    from pathlib import Path

    from smartfed.cli import main
    from smartfed.errors import SmartFedError

    assert issubclass(AdapterError, SmartFedError) and issubclass(AdapterError, ValueError)
    folder = make_lora_adapter("a", r=4, steps=0)
    rewrite_config(folder, lora_alpha=1e300)
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    status = main(["train", "--config", str(tiny), "--output", str(tmp_path / "run"), "--no-progress",
                   "--set", f"pool.paths=[{folder}]"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "lora_alpha must be a finite number" in err
