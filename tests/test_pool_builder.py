"""smartfed build-pool on a tiny random Llama with a word-level tokenizer (no download), and
one end-to-end federated run of a text task on the pool it builds (through the sweep driver)."""

import json
import string

import pytest
import torch

from smartfed import LoRAPool
from smartfed.config import ConfigError
from smartfed.experiments import pool_builder
from smartfed.tasks.skills import NUMBER_WORDS

VOCAB_WORDS = (
    ["[UNK]", "Write", "as", "word", "Letter", "after", "+", "-", "=", ":"]
    + [str(d) for d in range(10)] + list(NUMBER_WORDS) + list(string.ascii_lowercase)
)


def make_model_dir(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(VOCAB_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(directory))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def pool_spec(model_dir, output_dir, *, arithmetic_steps=20):
    return pool_builder.validate_spec({
        "seed": 0, "model_dir": str(model_dir), "output_dir": str(output_dir),
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"steps": 4, "batch_size": 8, "lr": 0.05},
        "adapters": [
            {"name": "arithmetic", "task": "skills_arithmetic", "steps": arithmetic_steps},
            {"name": "number_words", "task": "skills_number_words"},
            {"name": "next_letter", "task": "skills_next_letter"},
        ],
    })


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    model_dir = make_model_dir(root / "model")
    spec = pool_spec(model_dir, root / "pool")
    return spec, pool_builder.build_pool(spec, progress=False)


def test_build_pool_writes_peft_adapters_and_provenance(built):
    spec, manifest = built
    assert [r["name"] for r in manifest["adapters"]] == ["arithmetic", "number_words", "next_letter"]
    assert all(r["rebuilt"] for r in manifest["adapters"])
    arithmetic = manifest["adapters"][0]
    assert arithmetic["steps"] == 20 and arithmetic["final_loss_mean_last_20pct"] < arithmetic["first_loss"]
    assert len(arithmetic["inputs_hash"]) == 16 and arithmetic["task_summary"]["train_examples"] == 110
    assert arithmetic["environment"] == pool_builder.training_environment()
    written = json.loads((pool_builder.Path(spec["output_dir"]) / pool_builder.MANIFEST_FILE).read_text())
    assert [r["inputs_hash"] for r in written["adapters"]] == [r["inputs_hash"] for r in manifest["adapters"]]
    pool = LoRAPool.from_pretrained([r["path"] for r in manifest["adapters"]])
    experts = pool.modules["model.layers.0.self_attn.q_proj"]
    assert experts.expert_a.shape == (6, 32) and {name for name, _ in experts.origins} == {
        "arithmetic", "number_words", "next_letter"}


def test_build_pool_reuses_cached_adapters_and_retrains_changed_ones(built):
    spec, manifest = built
    weights = pool_builder.Path(manifest["adapters"][1]["path"]) / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    again = pool_builder.build_pool(spec, progress=False)
    assert not any(r["rebuilt"] for r in again["adapters"])
    assert weights.stat().st_mtime_ns == before
    changed = pool_spec(spec["model_dir"], spec["output_dir"], arithmetic_steps=6)
    third = pool_builder.build_pool(changed, progress=False)
    assert [r["rebuilt"] for r in third["adapters"]] == [True, False, False]
    assert third["adapters"][0]["inputs_hash"] != manifest["adapters"][0]["inputs_hash"]
    assert third["adapters"][0]["steps"] == 6


@pytest.mark.parametrize("change, message", [
    ({"adapters": [{"name": "x", "task": "imdb"}]}, r"^adapters\[0\]\.task: must be one of \['bbc_news'"),
    ({"adapters": [{"name": "x", "task": "skills_arithmetic"}] * 2}, r"^adapters\[1\]\.name: 'x' is repeated$"),
    ({"lora": {"rank": 4}}, r"^lora\.rank: unknown key; expected one of \['lora_alpha', 'r', 'target_modules'\]$"),
    ({"training": {"steps": 0}}, r"^training\.steps: must be >= 1, got 0$"),
    ({"training": {"lr": "3e-3"}}, r"^training\.lr: must be a number, got the string '3e-3'"),
    ({"epochs": 3}, r"^epochs: unknown key; expected one of \['adapters', 'lora', 'model_dir'"),
])
def test_validate_spec_names_the_bad_key(change, message):
    spec = {"adapters": [{"name": "a", "task": "skills_arithmetic"}], **change}
    with pytest.raises(ConfigError, match=message):
        pool_builder.validate_spec(spec)


def test_validate_spec_keeps_the_values_that_adapter_hashes_read():
    spec = pool_builder.validate_spec({"lora": {"lora_alpha": 16}, "adapters": [{"name": "a", "task": "skills_arithmetic"}]})
    assert spec["lora"] == {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    assert spec["adapters"] == [{"name": "a", "task": "skills_arithmetic", "options": {}}]


def test_cli_reports_bad_config(tmp_path, capsys):
    from smartfed.cli import main

    config = tmp_path / "pool.yaml"
    config.write_text("adapters: []\n")
    assert main(["build-pool", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"smartfed build-pool: {config}: adapters: must not be empty\n"


def test_text_task_runs_through_the_federated_harness(built, tmp_path):
    from smartfed.experiments.report import find_runs, target_checks
    from smartfed.experiments.sweep import run_text_experiment

    spec, manifest = built
    base = {
        "seed": 0, "model": {"tiny": None, "pretrained": spec["model_dir"]},
        "task": {"name": "skills_target", "options": {"split_seed": 0}},
        "pool": {"paths": [r["path"] for r in manifest["adapters"]], "target_modules": ["q_proj", "v_proj"]},
        "more": {"top_k": 2, "router": "expert_space"}, "eeqa": {"every_rounds": 1},
        "federation": {"num_clients": 3, "rounds": 2, "min_clients": 2, "local_steps": 2, "batch_size": 8,
                       "min_examples_per_client": 4, "lr": 0.01},
        "baseline": {"lora_rank": 2, "lora_alpha": 4},
    }
    outcomes = {}
    for method in ("smartfed", "fedit"):
        outcomes[method] = run_text_experiment({**base, "method": method}, tmp_path / method, progress=False)
    for method, outcome in outcomes.items():
        assert [r["round"] for r in outcome.history] == [1, 2]
        assert 0.0 <= outcome.history[-1]["accuracy"] <= 1.0 and outcome.history[-1]["total_bytes_up"] > 0
    summary = json.loads((tmp_path / "smartfed" / "text_task.json").read_text())
    assert summary["name"] == "skills_target" and summary["eval_examples"] == 44
    assert sum(summary["client_sizes"]) == 66
    assert outcomes["smartfed"].history[-1]["total_bytes_up"] < outcomes["fedit"].history[-1]["total_bytes_up"]
    runs = find_runs([tmp_path])
    assert {(run.task, run.method) for run in runs} == {("skills_target", "smartfed_expert_space"),
                                                        ("skills_target", "fedit")}
    assert len(target_checks(runs)) == 1


def test_smartfed_train_reads_a_text_task_from_its_config(built, tmp_path, capsys):
    import yaml

    from smartfed.cli import main

    spec, manifest = built
    config = {
        "seed": 0, "method": "smartfed", "model": {"tiny": None, "pretrained": spec["model_dir"]},
        "task": {"name": "skills_target", "options": {"split_seed": 0}},
        "pool": {"paths": [r["path"] for r in manifest["adapters"]], "target_modules": ["q_proj", "v_proj"]},
        "more": {"top_k": 2}, "eeqa": {"every_rounds": 1},
        "federation": {"num_clients": 2, "rounds": 1, "min_clients": 2, "local_steps": 1, "batch_size": 8,
                       "min_examples_per_client": 4},
    }
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1] and 0.0 <= rounds[0]["accuracy"] <= 1.0

    config["model"] = {"tiny": {"hidden_size": 32}}
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "refused"), "--no-progress"]) == 2
    assert f"{path}: model.pretrained: task.name 'skills_target' is a text task" in capsys.readouterr().err


def test_sweep_runs_merge_task_and_method_overrides():
    from smartfed.experiments.sweep import sweep_runs

    data = {
        "base": {"federation": {"rounds": 3, "lr": 0.01}, "more": {"top_k": 4}},
        "sweep": {
            "seeds": [0, 1],
            "tasks": {"skills": {"task": {"name": "skills_target"}}},
            "methods": {"smartfed": {}, "fedit": {"federation": {"lr": 0.003}}},
        },
    }
    runs = dict((str(path), config) for path, config in sweep_runs(data))
    assert list(runs) == ["skills/smartfed/seed0", "skills/fedit/seed0", "skills/smartfed/seed1", "skills/fedit/seed1"]
    fedit = runs["skills/fedit/seed1"]
    assert fedit["federation"] == {"rounds": 3, "lr": 0.003} and fedit["seed"] == 1 and fedit["method"] == "fedit"
    assert fedit["task"] == {"name": "skills_target"} and runs["skills/smartfed/seed0"]["federation"]["lr"] == 0.01
    with pytest.raises(ConfigError, match=r"^sweep\.tasks: is required"):
        sweep_runs({"sweep": {"seeds": [0]}})
    with pytest.raises(ConfigError, match=r"^extra: unknown key; expected one of \['base', 'sweep'\]"):
        sweep_runs({**data, "extra": 1})


def test_sweep_ablations_get_a_label_and_per_task_values():
    from smartfed.experiments.sweep import sweep_runs

    data = {
        "base": {"more": {"top_k": 4}, "pool": {"paths": ["a", "b", "distractor"]}},
        "sweep": {
            "seeds": [0],
            "tasks": {"skills": {"task": {"name": "skills_target"}}, "bbc": {"task": {"name": "bbc_news"}}},
            "methods": {
                "smartfed": {},
                "no_distractor": {"method": "smartfed", "per_task": {"skills": {"pool": {"paths": ["a", "b"]}}}},
            },
        },
    }
    runs = dict((str(path), config) for path, config in sweep_runs(data))
    assert "label" not in runs["skills/smartfed/seed0"]
    ablation = runs["skills/no_distractor/seed0"]
    assert ablation["method"] == "smartfed" and ablation["label"] == "no_distractor"
    assert ablation["pool"] == {"paths": ["a", "b"]}
    assert runs["bbc/no_distractor/seed0"]["pool"] == {"paths": ["a", "b", "distractor"]}
    data["sweep"]["methods"]["no_distractor"]["per_task"] = {"news": {}}
    with pytest.raises(ConfigError, match=r"^sweep\.methods\.no_distractor\.per_task: names task\(s\) \['news'\]"):
        sweep_runs(data)


def test_expert_usage_counts_selections_by_source_adapter(built):
    from smartfed import MoREConfig, inject_more, more_layers
    from smartfed.experiments.expert_usage import expert_usage_by_adapter
    from smartfed.models import load_frozen_model

    spec, manifest = built
    pool = LoRAPool.from_pretrained([r["path"] for r in manifest["adapters"]])
    model = inject_more(load_frozen_model(spec["model_dir"]), pool, MoREConfig(top_k=2, router="expert_space"))
    input_ids = torch.randint(0, len(VOCAB_WORDS), (5, 6), generator=torch.Generator().manual_seed(0))
    usage = expert_usage_by_adapter(model, input_ids, batch_size=2)
    assert set(usage["selections"]) == {"arithmetic", "number_words", "next_letter"}
    assert sum(usage["selections"].values()) == pytest.approx(1.0)
    assert sum(usage["gate_mass"].values()) == pytest.approx(1.0)
    with torch.no_grad():
        for layer in more_layers(model).values():
            favoured = torch.tensor([origin[0] == "number_words" for origin in layer.origins])
            layer.router_bias.copy_(favoured.float() * 100.0)
    forced = expert_usage_by_adapter(model, input_ids)
    assert forced["selections"] == pytest.approx({"arithmetic": 0.0, "next_letter": 0.0, "number_words": 1.0})
    assert set(forced["by_projection"]) == {"q_proj", "v_proj"}


class StepCounter:
    """Stands in for tqdm: records each bar's total and how far it was advanced."""

    bars = []

    def __init__(self, iterable=None, total=None, **kwargs):
        self.iterable, self.total, self.done = iterable, total, 0
        StepCounter.bars.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count=1):
        self.done += count


def test_only_builds_the_named_adapters_and_the_eta_counts_steps(built, tmp_path, monkeypatch):
    import tqdm.auto

    spec = pool_spec(built[0]["model_dir"], tmp_path / "pool", arithmetic_steps=6)
    monkeypatch.setattr(tqdm.auto, "tqdm", StepCounter)
    StepCounter.bars.clear()
    first = pool_builder.build_pool(pool_builder.select_adapters(spec, ["number_words"]), progress=False)
    assert [(r["name"], r["rebuilt"]) for r in first["adapters"]] == [("number_words", True)]
    StepCounter.bars.clear()
    second = pool_builder.build_pool(pool_builder.select_adapters(spec, None), progress=False)
    assert [(r["name"], r["rebuilt"]) for r in second["adapters"]] == [
        ("arithmetic", True), ("number_words", False), ("next_letter", True)]
    overall = StepCounter.bars[0]
    assert overall.total == overall.done == 6 + 4
    forced = pool_builder.build_pool(pool_builder.select_adapters(spec, ["next_letter"]), force=True, progress=False)
    assert [(r["name"], r["rebuilt"]) for r in forced["adapters"]] == [
        ("arithmetic", False), ("number_words", False), ("next_letter", True)]
    with pytest.raises(ConfigError, match=r"--only: no adapter named 'numbr_words'; did you mean 'number_words'\?"):
        pool_builder.select_adapters(spec, ["numbr_words"])


def copy_model(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_the_model_fingerprint_follows_weights_and_tokens_not_library_versions(built, tmp_path):
    import safetensors.torch

    from smartfed.experiments.model_identity import legacy_model_fingerprint, model_fingerprint

    model_dir = copy_model(built[0]["model_dir"], tmp_path / "model")
    fingerprint, legacy = model_fingerprint(model_dir), legacy_model_fingerprint(model_dir)
    assert fingerprint.startswith("v2-")
    config = json.loads((model_dir / "config.json").read_text())
    config["transformers_version"] = "9.99.0"
    config["torch_dtype"] = config.pop("dtype", "float32")
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    theta = config.pop("rope_parameters", {}).get("rope_theta", 10000.0)
    config["rope_theta"] = theta
    (model_dir / "config.json").write_text(json.dumps(config, indent=4))
    weights = model_dir / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt", "written_by": "a newer release"})
    assert model_fingerprint(model_dir) == fingerprint
    assert legacy_model_fingerprint(model_dir) != legacy
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    safetensors.torch.save_file(tensors, weights)
    assert model_fingerprint(model_dir) != fingerprint
    other = copy_model(built[0]["model_dir"], tmp_path / "tokens")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert model_fingerprint(other) != fingerprint


def test_adapters_recorded_under_the_legacy_model_fingerprint_stay_cached(built, tmp_path):
    from smartfed.experiments.model_identity import legacy_model_fingerprint
    from smartfed.tasks import load_task
    from smartfed.models import load_tokenizer

    spec = pool_spec(built[0]["model_dir"], tmp_path / "pool", arithmetic_steps=4)
    manifest = pool_builder.build_pool(spec, progress=False)
    legacy = legacy_model_fingerprint(spec["model_dir"])
    tokenizer = load_tokenizer(spec["model_dir"])
    for adapter, record in zip(spec["adapters"], manifest["adapters"]):
        task = load_task(adapter["task"], tokenizer, **adapter["options"])
        path = pool_builder.Path(record["path"]) / pool_builder.PROVENANCE_FILE
        provenance = json.loads(path.read_text())
        provenance.update(inputs_hash=pool_builder._inputs_hash(legacy, task, adapter, spec), model_fingerprint=legacy)
        path.write_text(json.dumps(provenance))
    again = pool_builder.build_pool(spec, progress=False)
    assert not any(record["rebuilt"] for record in again["adapters"])


def test_the_pool_cache_never_touches_a_users_files(tmp_path, monkeypatch):
    """--set pool.cache_dir=/abs/U: a crashed build and a finished one leave U/.pool-backup/ and
    U/.pool-notes.txt byte-identical (cleanup removes only folders holding this project's marker);
    the cache folder is resolved (".." and symlinks) before anything is checked."""
    from smartfed.config import config_from_dict
    from smartfed.experiments import assets

    users = tmp_path / "U"
    (users / ".pool-backup").mkdir(parents=True)
    (users / ".pool-backup" / "adapter.safetensors").write_bytes(b"\x00user weights")
    (users / ".pool-notes.txt").write_text("my notes")
    (users / f"{assets.POOL_STAGING_PREFIX}mine").mkdir()
    (tmp_path / "link").symlink_to(users)
    before = {path: path.read_bytes() for path in users.rglob("*") if path.is_file()}
    cache_dir = tmp_path / "missing" / ".." / "link"
    config = config_from_dict({"pool": {"cache_dir": str(cache_dir), "train_steps": 2, "batch_size": 8}})

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(assets, "_train_source_adapter", crash)
        with pytest.raises(RuntimeError):
            assets.build_tiny_pool(config, progress=False)
    paths = assets.build_tiny_pool(config, progress=False)
    assert all(path.is_relative_to(users) for path in paths)
    assert {path: path.read_bytes() for path in before} == before
    assert (users / f"{assets.POOL_STAGING_PREFIX}mine").is_dir()
    assert sorted(entry.name for entry in users.iterdir()) == sorted(
        [".pool-backup", ".pool-notes.txt", f"{assets.POOL_STAGING_PREFIX}mine", paths[0].parent.name])
