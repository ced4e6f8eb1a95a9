"""MoRE against peft on the model families users bring: a pool of one adapter with k = r and a
zero router must reproduce peft's own output; peft models and LoRA variants MoRE cannot
reproduce are refused with a message that says what to do.

Models are tiny random ones built from transformers config classes (no download); adapters get
random lora_A/lora_B (as if trained; peft's inits leave lora_B or lora_A zero), are saved with
peft's ``save_pretrained`` and loaded back through ``LoRAPool.from_pretrained``.
"""

import json
import re
import warnings

import pytest
import torch
from torch import nn

from smartfed import AdapterError, LoRAPool, MoREConfig, MoRELinear, inject_more, more_layers
from smartfed_kernels.testing import relative_error
from tiny_models import TINY_LLAMA

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64}
# family -> (transformers config class, model class, config, LoRA targets, number of adapted modules)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY_LLAMA, DECODER_TARGETS, 14),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY_LLAMA, DECODER_TARGETS, 14),
    "mistral": ("MistralConfig", "MistralForCausalLM", TINY_LLAMA, DECODER_TARGETS, 14),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2, ("c_attn", "c_proj", "c_fc"), 8),
}
RANK = 4
CONFIG = "adapter_config.json"


def build(family, seed=0):
    import transformers

    config_class, model_class, options, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**options)
    return getattr(transformers, model_class)(config).float().eval()


def save_adapter(folder, family="llama", target_modules=None, **lora_options):
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or FAMILIES[family][3])
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=0.0,
                        fan_in_fan_out=family == "gpt2", **lora_options)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build(family), config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    parameter.normal_(std=0.3)
        model.save_pretrained(folder)
    return folder


def peft_model(family, folder):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build(family), folder).eval()


def logits(model, token_ids):
    with torch.no_grad():
        return model(input_ids=token_ids).logits


def more_model(family, folder, **options):
    config = MoREConfig(top_k=RANK, router_init="zeros", **options)
    return inject_more(build(family), LoRAPool.from_pretrained(folder), config)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_single_adapter_pool_reproduces_peft(family, tmp_path, random_token_ids, one_torch_thread):
    folder = save_adapter(tmp_path / family, family)
    expected = logits(peft_model(family, folder), random_token_ids)
    assert relative_error(logits(build(family), random_token_ids), expected) > 0.1

    model = more_model(family, folder)
    assert len(more_layers(model)) == FAMILIES[family][4]
    assert relative_error(logits(model, random_token_ids), expected) <= 1e-5


def test_gpt2_conv1d_layers_are_replaced_in_linear_orientation(tmp_path, random_token_ids, one_torch_thread):
    from transformers.pytorch_utils import Conv1D

    folder = save_adapter(tmp_path / "gpt2", "gpt2", target_modules=("c_attn",))
    assert json.loads((folder / CONFIG).read_text())["fan_in_fan_out"] is True
    pool = LoRAPool.from_pretrained(folder)
    experts = pool.modules["transformer.h.0.attn.c_attn"]
    assert (experts.d_out, experts.d_in) == (96, 32)

    model = more_model("gpt2", folder, target_modules=["c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MoRELinear) and isinstance(layer.base, Conv1D)
    assert (layer.out_features, layer.in_features) == (96, 32)
    assert layer.base_weight_out_in().shape == (96, 32)
    assert layer.base_weight_out_in().data_ptr() == layer.base.weight.data_ptr()
    assert isinstance(model.transformer.h[0].attn.c_proj, Conv1D)
    expected = logits(peft_model("gpt2", folder), random_token_ids)
    assert relative_error(logits(model, random_token_ids), expected) <= 1e-5


def test_conv1d_base_matches_linear_base_in_output_and_router_gradients():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        conv.bias.normal_()
        linear.bias.copy_(conv.bias)
    expert_a, expert_b = torch.randn(6, 16), torch.randn(24, 6)
    layers = [MoRELinear(base, expert_a, expert_b, 3, seed=5, backend="torch") for base in (conv, linear)]
    x = torch.randn(2, 5, 16)
    outputs, input_grads = [], []
    for layer in layers:
        x_in = x.clone().requires_grad_()
        y = layer(x_in)
        y.square().sum().backward()
        outputs.append(y.detach())
        input_grads.append(x_in.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(input_grads[0], input_grads[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers[0].router_weight.grad, layers[1].router_weight.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expert_a: expected shape \[N, d_in=16\] with N >= 1, got \(6, 24\)"):
        MoRELinear(conv, expert_b.t(), expert_b, 3)
    with pytest.raises(TypeError, match=re.escape("base: expected an nn.Linear, got Conv2d "
                                                  "(torch.nn.modules.conv.Conv2d; a transformers Conv1D is accepted")):
        MoRELinear(nn.Conv2d(16, 24, 1), expert_a, expert_b, 3)


def test_peft_model_is_refused_with_what_to_pass(tmp_path, random_token_ids, one_torch_thread):
    from peft import LoraConfig, inject_adapter_in_model

    folder = save_adapter(tmp_path / "llama", "llama", target_modules=("q_proj", "v_proj"))
    pool = LoRAPool.from_pretrained(folder)
    wrapped = peft_model("llama", folder)
    expected = logits(wrapped, random_token_ids)
    with pytest.raises(TypeError, match=re.escape("model: is a peft PeftModel; expected the plain base model")
                       + r".*pass peft_model\.unload\(\) \(after unmerge_adapter\(\) if merged\)"):
        inject_more(wrapped, pool, MoREConfig(top_k=RANK))
    assert not more_layers(wrapped)

    model = inject_more(wrapped.unload(), pool, MoREConfig(top_k=RANK, router_init="zeros"))
    assert relative_error(logits(model, random_token_ids), expected) <= 1e-5

    injected = inject_adapter_in_model(LoraConfig(r=2, target_modules=["k_proj"]), build("llama"))
    found = "model: holds peft adapter layers ('model.layers.0.self_attn.k_proj': peft.tuners.lora.layer.Linear)"
    with pytest.raises(TypeError, match=re.escape(found)):
        inject_more(injected, pool, MoREConfig(top_k=RANK))


def test_non_linear_target_names_its_full_type(tmp_path):
    folder = save_adapter(tmp_path / "llama", "llama", target_modules=("q_proj",))
    model = build("llama")
    model.model.layers[0].self_attn.q_proj = nn.Conv1d(32, 32, 1)
    with pytest.raises(TypeError, match=re.escape("model module 'model.layers.0.self_attn.q_proj': expected an "
                                                  "nn.Linear or a transformers Conv1D to replace, got "
                                                  "torch.nn.modules.conv.Conv1d")):
        inject_more(model, LoRAPool.from_pretrained(folder), MoREConfig(top_k=RANK))
    assert not more_layers(model)


def test_alora_adapter_saved_by_peft_is_refused(tmp_path):
    folder = save_adapter(tmp_path / "alora", "llama", target_modules=("q_proj",), task_type="CAUSAL_LM",
                          alora_invocation_tokens=[5, 6])
    with pytest.raises(AdapterError, match=re.escape(f"{folder / CONFIG}: alora_invocation_tokens is [5, 6], "
                                                     "expected null; MoRE cannot reproduce this LoRA variant "
                                                     "(an activated LoRA (aLoRA) acts only on the tokens after")):
        LoRAPool.from_pretrained(folder)


# field -> a value that switches the variant on, as peft writes it into adapter_config.json
REFUSED_VALUES = {
    "use_dora": True,
    "lora_bias": True,
    "bias": "lora_only",
    "target_parameters": ["experts.gate_up_proj"],
    "alora_invocation_tokens": [7],
    "use_qalora": True,
    "use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 0.0001},
    "megatron_config": {"tensor_model_parallel_size": 1},
    "layer_replication": [[0, 2], [1, 2]],
    "trainable_token_indices": [3, 4],
    "modules_to_save": ["lm_head"],
}


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("plain") / "llama", "llama", target_modules=("q_proj",))


def rewritten(folder, tmp_path, **changes):
    copy = tmp_path / "changed"
    copy.mkdir(parents=True)
    for name in ("adapter_model.safetensors", CONFIG):
        (copy / name).write_bytes((folder / name).read_bytes())
    config = json.loads((copy / CONFIG).read_text())
    config.update(changes)
    (copy / CONFIG).write_text(json.dumps(config))
    return copy


def test_every_forward_changing_lora_config_field_is_refused_by_name(plain_adapter, tmp_path):
    from peft import LoraConfig

    assert set(REFUSED_VALUES) <= set(LoraConfig.__dataclass_fields__)
    for index, (field, value) in enumerate(REFUSED_VALUES.items()):
        folder = rewritten(plain_adapter, tmp_path / str(index), **{field: value})
        with pytest.raises(AdapterError, match=re.escape(f"{folder / CONFIG}: {field} is {json.dumps(value)}, "
                                                         "expected ") + r".*MoRE cannot reproduce this LoRA variant"):
            LoRAPool.from_pretrained(folder)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "corda", "olora", "loftq", "lora_ga"])
def test_initialisations_that_change_the_base_weights_are_refused(plain_adapter, tmp_path, init):
    folder = rewritten(plain_adapter, tmp_path, init_lora_weights=init)
    with pytest.raises(AdapterError, match=re.escape(f"{folder / CONFIG}: init_lora_weights is {init!r}, expected "
                                                     "true, false or a plain initialisation; this initialisation "
                                                     "changed the base weights")):
        LoRAPool.from_pretrained(folder)


def test_unknown_config_fields_are_refused_unless_unset(plain_adapter, tmp_path):
    folder = rewritten(plain_adapter, tmp_path, use_future_variant=True, future_option=None)
    with pytest.raises(AdapterError, match=re.escape(f"{folder / CONFIG}: unknown LoraConfig fields "
                                                     "['use_future_variant'] are set, expected them unset or absent")):
        LoRAPool.from_pretrained(folder)
    unset = rewritten(plain_adapter, tmp_path / "unset", use_future_variant=False, future_option=None)
    assert LoRAPool.from_pretrained(unset).num_experts == 2 * RANK


def test_every_lora_config_field_is_classified():
    from peft import LoraConfig

    from smartfed.pool import NEUTRAL_CONFIG_FIELDS, REFUSED_CONFIG_FIELDS

    fields = set(LoraConfig.__dataclass_fields__)
    assert fields - NEUTRAL_CONFIG_FIELDS - set(REFUSED_CONFIG_FIELDS) == set()
    assert NEUTRAL_CONFIG_FIELDS & set(REFUSED_CONFIG_FIELDS) == set()


def variant_options(name):
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    return {
        "velora": {"velora_config": VeloraConfig()},
        "monteclora": {"monteclora_config": MontecloraConfig()},
        "mica": {"init_lora_weights": "mica"},
        "gaussian_excluding": {"init_lora_weights": "gaussian", "layers_to_transform": [0, 1],
                               "exclude_modules": ["model.layers.1.self_attn.v_proj"]},
    }[name]


@pytest.mark.parametrize("variant", ["velora", "monteclora", "mica", "gaussian_excluding"])
def test_variants_with_the_plain_lora_forward_are_accepted(variant, tmp_path, random_token_ids, one_torch_thread):
    folder = save_adapter(tmp_path / variant, "llama", target_modules=("q_proj", "v_proj"), **variant_options(variant))
    pool = LoRAPool.from_pretrained(folder)
    assert len(pool.modules) == (3 if variant == "gaussian_excluding" else 4)
    assert all(experts.num_experts == RANK for experts in pool.modules.values())
    model = more_model("llama", folder)
    expected = logits(peft_model("llama", folder), random_token_ids)
    assert relative_error(logits(model, random_token_ids), expected) <= 1e-5
