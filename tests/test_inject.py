import warnings

import pytest
import torch
from torch import nn

import smartfed
from smartfed import LoRAPool, MoREConfig, MoRELinear, inject_more, more_layers

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"


def peft_logits(base, folder, token_ids):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        return model(input_ids=token_ids).logits


def logits(model, token_ids):
    with torch.no_grad():
        return model(input_ids=token_ids).logits


EQUIVALENCE_CASES = {
    "q_v_alpha_2r": ({"r": 4, "lora_alpha": 8}, 4),
    "q_k_v_o_alpha_eq_r": ({"r": 4, "lora_alpha": 4, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}, 4),
    "alpha_4r_mlp": ({"r": 4, "lora_alpha": 16, "target_modules": ("q_proj", "gate_proj", "down_proj")}, 4),
    "rslora": ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4),
    "rank_alpha_patterns": ({"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                            {"*.q_proj": 4, "*.v_proj": 2}),
}


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_single_adapter_pool_reproduces_peft(make_lora_adapter, make_tiny_llama, random_token_ids, case):
    adapter_options, top_k = EQUIVALENCE_CASES[case]
    folder = make_lora_adapter(case, **adapter_options)
    expected = peft_logits(make_tiny_llama(), folder, random_token_ids)
    base_only = logits(make_tiny_llama(), random_token_ids)
    assert (expected - base_only).abs().max() > 1e-3

    pool = LoRAPool.from_pretrained(folder)
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=top_k, router_init="zeros"))
    assert len(more_layers(model)) == len(pool.modules)
    torch.testing.assert_close(logits(model, random_token_ids), expected, rtol=1e-5, atol=1e-5)


def test_only_routers_train_and_describe_counts_them(make_lora_adapter, tiny_llama):
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4, steps=0))
    model = inject_more(tiny_llama, pool, MoREConfig(top_k=2))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}.{t}" for i in range(2) for m in ("q_proj", "v_proj")
                         for t in ("router_weight", "router_bias")}
    # 4 layers x (router [4, 32] + bias [4]) = 4 x 132
    text = smartfed.describe(model)
    assert "trainable parameters: 528 of " in text
    assert f"{V0}: [16 x 32] N=4 k=2 router=linear gate=topk_softmax gamma=k router parameters=132" in text


def test_train_experts_and_expert_space_counts(make_lora_adapter, make_tiny_llama):
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4, steps=0))
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, router="expert_space", router_bias=False))
    assert "trainable parameters: 64 of " in smartfed.describe(model)
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, train_experts=True))
    # routers 528 + q experts 2 x (4*32 + 32*4) + v experts 2 x (4*32 + 16*4)
    assert "trainable parameters: 1424 of " in smartfed.describe(model)


def test_suffix_match_ambiguity_missing_and_shape_errors(make_lora_adapter, make_tiny_llama, random_token_ids):
    folder = make_lora_adapter("a", r=4)
    pool = LoRAPool.from_pretrained(folder)
    wrapper = nn.Module()
    wrapper.backbone = make_tiny_llama()
    inject_more(wrapper, pool, MoREConfig(top_k=4, router_init="zeros"))
    assert isinstance(wrapper.backbone.model.layers[0].self_attn.q_proj, MoRELinear)
    assert f"backbone.{Q0}" in more_layers(wrapper)
    torch.testing.assert_close(logits(wrapper.backbone, random_token_ids),
                               peft_logits(make_tiny_llama(), folder, random_token_ids), rtol=1e-5, atol=1e-5)

    twins = nn.Module()
    twins.left, twins.right = make_tiny_llama(), make_tiny_llama()
    with pytest.raises(ValueError, match=f"pool module '{Q0}': ambiguous, it matches 2 modules"):
        inject_more(twins, pool, MoREConfig(top_k=4))
    assert not more_layers(twins)

    with pytest.raises(ValueError, match="pool module 'model.layers.1.self_attn.q_proj': no module of the model"):
        inject_more(make_tiny_llama(num_hidden_layers=1), pool, MoREConfig(top_k=4))
    wide = make_tiny_llama(hidden_size=48)
    with pytest.raises(ValueError, match=rf"model module '{Q0}': Linear weight is \[48, 48\] but the pool's "
                                         r"experts for .* need \[32, 32\]"):
        inject_more(wide, pool, MoREConfig(top_k=4))
    assert not more_layers(wide)


def test_top_k_mapping_exact_and_globs(make_lora_adapter, make_tiny_llama):
    first = make_lora_adapter("first", r=4, seed=1)
    second = make_lora_adapter("second", r=2, target_modules=("q_proj",), seed=2)
    pool = LoRAPool.from_pretrained([first, second])
    top_k = {Q0: 5, "*q_proj": 6, "*": 3}
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=top_k))
    assert {name: layer.top_k for name, layer in more_layers(model).items()} == {
        Q0: 5, "model.layers.1.self_attn.q_proj": 6, V0: 3, "model.layers.1.self_attn.v_proj": 3,
    }
    cases = [
        ({"*q_proj": 6}, "top_k: no key matches module 'model.layers.0.self_attn.v_proj'"),
        ({"*": 2, "*.mlp.*": 1}, r"top_k: keys \['\*.mlp.\*'\] match no targeted module"),
        ({"*q_proj": 7, "*": 2}, "top_k\\['\\*q_proj'\\]: k=7 exceeds the N=6 experts of module"),
        (5, "top_k: k=5 exceeds the N=4 experts of module 'model.layers.0.self_attn.v_proj'"),
    ]
    for bad, message in cases:
        model = make_tiny_llama()
        with pytest.raises(ValueError, match=message):
            inject_more(model, pool, MoREConfig(top_k=bad))
        assert not more_layers(model)
    with pytest.raises(ValueError, match=r"top_k\['\*'\]: expected k >= 1, got 0"):
        MoREConfig(top_k={"*": 0})


def test_target_modules_seed_and_reinjection(make_lora_adapter, make_tiny_llama):
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4, steps=0))
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, target_modules=["*q_proj"], seed=3))
    assert sorted(more_layers(model)) == [Q0, "model.layers.1.self_attn.q_proj"]
    assert isinstance(model.model.layers[0].self_attn.v_proj, nn.Linear)
    again = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, seed=3))
    other = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, seed=4))
    weight = more_layers(model)[Q0].router_weight
    assert torch.equal(weight, more_layers(again)[Q0].router_weight)
    assert not torch.equal(weight, more_layers(other)[Q0].router_weight)
    assert not torch.equal(weight, more_layers(again)["model.layers.1.self_attn.q_proj"].router_weight)
    with pytest.raises(ValueError, match="model: already holds MoRE layers"):
        inject_more(model, pool, MoREConfig(top_k=2))
    with pytest.raises(ValueError, match=r"target_modules: \['\*k_proj'\] match no module of the pool"):
        inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, target_modules=["*k_proj"]))


def test_config_validation():
    cases = [
        ({"router": "mlp"}, ValueError, "router: expected one of"),
        ({"gate": "sigmoid"}, ValueError, "gate: expected one of"),
        ({"router_init": "ones"}, ValueError, "router_init: expected one of"),
        ({"backend": "cuda"}, ValueError, "backend: expected one of"),
        ({"top_k": 2.5}, TypeError, "top_k: expected an int, got float"),
        ({"top_k": {}}, ValueError, "top_k: expected a non-empty mapping"),
        ({"gamma": float("inf")}, ValueError, "gamma: expected a finite number"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            MoREConfig(**options)


def test_bfloat16_model(make_lora_adapter, make_tiny_llama, random_token_ids):
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4))
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, seed=1))
    expected = logits(model, random_token_ids)
    model.to(torch.bfloat16)
    assert more_layers(model)[Q0].expert_a.dtype == torch.bfloat16
    got = logits(model, random_token_ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)


def test_target_modules_follow_peft_semantics(make_lora_adapter, make_tiny_llama):
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4, steps=0))
    q1, v1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    cases = [
        (["q_proj", "v_proj"], [Q0, V0, q1, v1]),
        (("q_proj",), [Q0, q1]),
        (["self_attn.v_proj"], [V0, v1]),
        ([Q0, "model.layers.1.*"], [Q0, q1, v1]),
        (["*v_proj"], [V0, v1]),
        (r".*\.1\.self_attn\.(q|v)_proj", [q1, v1]),
        (r"model\.layers\.0\..*", [Q0, V0]),
    ]
    for target_modules, expected in cases:
        assert pool.select(target_modules) == expected, target_modules
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, target_modules=["q_proj", "v_proj"]))
    assert sorted(more_layers(model)) == [Q0, V0, q1, v1]
    model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=2, target_modules=r".*\.1\.self_attn\.q_proj"))
    assert list(more_layers(model)) == [q1]
    assert MoREConfig(target_modules=r".*q_proj").to_dict()["target_modules"] == r".*q_proj"
    assert MoREConfig(target_modules=("q_proj",)).to_dict()["target_modules"] == ["q_proj"]

    failures = [
        (["proj"], ValueError, r"target_modules: \['proj'\] match no module of the pool \(expected each entry"),
        ("q_proj", ValueError, r"target_modules: the regex 'q_proj' matches no whole module name of the pool"),
    ]
    for target_modules, error, message in failures:
        model = make_tiny_llama()
        with pytest.raises(error, match=message):
            inject_more(model, pool, MoREConfig(top_k=2, target_modules=target_modules))
        assert not more_layers(model)
    invalid = [
        ("*q_proj", ValueError, r"target_modules: '\*q_proj' is not a valid regular expression \(.*\); a string is a "
                                r"regex matched against the whole module name, as in peft; for names, suffixes or "
                                r"globs pass a list, e.g. \['\*q_proj'\]"),
        ([], TypeError, r"target_modules: expected a regex string or a non-empty list of module names, suffixes or "
                        r"globs, got \[\]"),
        (["q_proj", ""], TypeError, r"target_modules: expected non-empty strings in the list, got ''"),
        ({"q_proj": 1}, TypeError, r"target_modules: expected a regex string or a non-empty list"),
    ]
    for target_modules, error, message in invalid:
        with pytest.raises(error, match=message):
            MoREConfig(target_modules=target_modules)


def test_top_k_mapping_accepts_peft_style_suffixes(make_lora_adapter, make_tiny_llama):
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4, steps=0))
    q1, v1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    cases = [
        ({"q_proj": 3, "self_attn.v_proj": 2}, {Q0: 3, q1: 3, V0: 2, v1: 2}),
        ({Q0: 4, "q_proj": 3, "*": 2}, {Q0: 4, q1: 3, V0: 2, v1: 2}),
        ({"*": 1, "v_proj": 2}, {Q0: 1, q1: 1, V0: 2, v1: 2}),
    ]
    for top_k, expected in cases:
        model = inject_more(make_tiny_llama(), pool, MoREConfig(top_k=top_k))
        assert {name: layer.top_k for name, layer in more_layers(model).items()} == expected
    with pytest.raises(ValueError, match=r"top_k: keys \['\*q_proj'\] match no targeted module"):
        inject_more(make_tiny_llama(), pool, MoREConfig(top_k={"q_proj": 3, "*q_proj": 1, "*": 2}))


def test_the_run_config_builds_the_layers_with_every_more_option(make_lora_adapter, make_tiny_llama):
    """The engine builds SmartFed's layers from the run config's more section: every option of the
    section (derived from MoREConfig) reaches the layers, so an option added to MoREConfig cannot
    be dropped on the way."""
    from smartfed.config import config_from_dict
    from smartfed.federated.methods import SmartFedMethod

    options = {"top_k": 3, "router": "projected", "router_dim": 8, "projection_seed": 3, "gate": "softmax_topk",
               "router_init": "zeros", "router_bias": False, "gamma": 2.0, "backend": "torch"}
    config = config_from_dict({"more": options})
    assert set(options) == set(config.more.model_dump())
    pool = LoRAPool.from_pretrained(make_lora_adapter("a", r=4, steps=0))
    model = SmartFedMethod(config).build(make_tiny_llama(), pool)
    built = model.more_config
    assert built == config.more.more_config(seed=built.seed)
    layer = more_layers(model)[Q0]
    assert (layer.top_k, layer.router, layer.router_dim, layer.gate, layer.gamma) == (3, "projected", 8,
                                                                                      "softmax_topk", 2.0)
