import json

import pytest
import torch

from smartfed import LoRAPool
from smartfed.baselines.adapter_mixture import AdapterMixtureMethod
from smartfed.baselines.linear_merge import WEIGHTS_NAME, LinearMergeMethod
from smartfed.config import config_from_dict
from smartfed.experiments.assets import build_base_model
from smartfed.experiments.runs import build_trainer, run_in_process


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(cache_dir, method):
    return config_from_dict({
        "seed": 5,
        "method": method,
        "task": {"train_examples": 96, "eval_examples": 32, "seq_len": 8},
        "pool": {"cache_dir": str(cache_dir), "train_steps": 5, "batch_size": 16},
        "federation": {"num_clients": 3, "rounds": 1, "min_clients": 2, "local_steps": 2, "batch_size": 8,
                       "min_examples_per_client": 4},
        "communication": {"wire_dtype": "bf16"},
    })


TRAVELLING = {
    "fedit": lambda name: ".lora_A." in name or ".lora_B." in name,
    "ffa_lora": lambda name: ".lora_B." in name,
    "adapter_mixture": lambda name: ".gate." in name,
    "linear_merge": lambda name: name == WEIGHTS_NAME,
}


@pytest.mark.parametrize("method", sorted(TRAVELLING))
def test_baseline_runs_one_round_through_the_harness(cache_dir, tmp_path, method):
    config = tiny_config(cache_dir, method)
    trainer, _ = build_trainer(config)
    initial = trainer.initial_state()
    assert initial and all(TRAVELLING[method](name) for name in initial)
    outcome = run_in_process(config, tmp_path, progress=False, trainer=trainer)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["method"] == method and record["clients_used"] == [0, 1, 2]
    values = sum(t.numel() for t in initial.values())
    # bf16 on the wire: 2 bytes per travelling value per client, plus headers and statistics.
    assert record["tensor_bytes_up"] >= 3 * 2 * values and record["bytes_up"] > record["tensor_bytes_up"]
    assert record["quotas"] is None and all(v > 0 for v in record["client_active_flops"].values())
    final = outcome.state.global_state
    assert sorted(final) == sorted(initial)
    assert any(not torch.equal(final[name], initial[name]) for name in initial)


def test_ffa_lora_keeps_a_frozen_at_its_seeded_init(cache_dir):
    fedit, _ = build_trainer(tiny_config(cache_dir, "fedit"))
    ffa, _ = build_trainer(tiny_config(cache_dir, "ffa_lora"))
    a_names = [name for name in fedit.initial_state() if ".lora_A." in name]
    parameters = dict(ffa.model.named_parameters())
    for name in a_names:
        assert not parameters[name].requires_grad
        assert torch.equal(parameters[name], fedit.initial_state()[name])


def _single_adapter_pool(tmp_path, config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        build_base_model(config.model, config.seed),
        LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(str(tmp_path / "only"))
    return peft_model.eval(), LoRAPool.from_pretrained([tmp_path / "only"])


@pytest.mark.parametrize("method_class", [AdapterMixtureMethod, LinearMergeMethod])
def test_single_adapter_mixture_and_merge_reproduce_peft(tmp_path, method_class):
    config = tiny_config(tmp_path, "adapter_mixture")
    peft_model, pool = _single_adapter_pool(tmp_path, config)
    model = method_class(config).build(build_base_model(config.model, config.seed), pool).eval()
    input_ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        reference = build_base_model(config.model, config.seed)(input_ids=input_ids).logits
        actual = model(input_ids=input_ids).logits
    assert not torch.allclose(expected, reference, atol=1e-3)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_every_configurable_method_is_registered():
    from smartfed.config import METHODS
    from smartfed.experiments.method_registry import METHOD_CLASSES

    assert sorted(METHOD_CLASSES) == sorted(METHODS)
