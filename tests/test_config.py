"""smartfed.config: the one typed schema of a run, the public pool spec, a sweep and the Flower
run config; its one override mechanism; the resume check. No model is built here."""

import json
import typing

import pydantic
import pytest

from smartfed.config import (
    GATES,
    LAYER_ROUTERS,
    ROUTER_INITS,
    WIRE_DTYPES,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_fingerprint,
    config_from_dict,
    config_to_dict,
    load_config,
    validate,
    with_overrides,
)
from smartfed.experiments.flower_settings import FlowerRunSettings
from smartfed.experiments.pool_spec import PoolSpec
from smartfed.experiments.sweep_schema import SweepConfig


def error_of(data, schema=RunConfig):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data) if schema is RunConfig else validate(schema, data)
    return str(caught.value)


@pytest.mark.parametrize("data, expected", [
    ({"federaton": {}}, "federaton: unknown key; did you mean 'federation'?"),
    ({"federation": {"round": 3}}, "federation.round: unknown key; did you mean 'rounds'?"),
    ({"model": {"tiny": {"num_hiden_layers": 2}}},
     "model.tiny.num_hiden_layers: not an argument of transformers' LlamaConfig; did you mean 'num_hidden_layers'?"),
    ({"model": {"tiny": {"num_hidden_layers": "2"}}}, "model.tiny.num_hidden_layers: must be an integer"),
    ({"model": {"tiny": {"rms_norm_eps": float("nan")}}}, "model.tiny.rms_norm_eps: must be finite"),
    ({"federation": {"alpha": float("inf")}}, "federation.alpha: must be finite, got inf"),
    ({"federation": {"lr": "1e-2"}}, "federation.lr: must be a number, got the string '1e-2' (YAML reads an exponent"),
    ({"federation": {"fraction": "0.5"}}, "federation.fraction: must be a number, got the string '0.5' (remove the quotes)"),
    ({"federation": {"rounds": 2.0}}, "federation.rounds: must be an integer, got 2.0"),
    ({"federation": {"fraction": 1.5}}, "federation.fraction: must be <= 1, got 1.5"),
    ({"federation": {"min_clients": 5}}, "federation.min_clients: must be <= federation.num_clients (4), got 5"),
    ({"eeqa": {"per_expert": "yes"}}, "eeqa.per_expert: must be true or false, got the string 'yes'"),
    ({"eeqa": {"client_budgets": {1: 1.5}}}, "eeqa.client_budgets[1]: must be <= 1, got 1.5"),
    ({"more": {"router": "dense"}}, "more.router: must be one of 'linear', 'expert_space' or 'projected', got 'dense'"),
    ({"communication": {"wire_dtype": "int8"}}, "communication.wire_dtype: must be one of 'fp32' or 'bf16'"),
    ({"faults": {2: {0: "explode"}}}, "faults[2][0]: must be one of 'raise', 'nan'"),
    ({"pool": {"target_modules": []}}, "pool.target_modules: must not be empty"),
    ({"federation": [1]}, "federation: must be a mapping, got a list"),
    ({"label": " "}, "label: must not be blank"),
    ({"model": {"pretrained": "somewhere"}}, "model: needs exactly one of 'tiny'"),
    ({"task": {"name": "bbc_news"}}, "model.pretrained: task.name 'bbc_news' is a text task"),
    ({"task": {"signals_per_example": 20}}, "task.signals_per_example: must be <= task.seq_len (12), got 20"),
    ({"privacy": {"secagg": {"enabled": True}}},
     "robustness.norm_bound.mode: must be 'none' with privacy.secagg.enabled (the server never sees one update"),
    ({"privacy": {"secagg": {"enabled": True}}, "robustness": {"aggregator": "median"}},
     "robustness.aggregator: must be 'fedavg' with privacy.secagg.enabled, got 'median'"),
    ({"privacy": {"dp": {"enabled": True}}, "robustness": {"aggregator": "krum"}},
     "robustness.aggregator: must be 'fedavg' with privacy.dp.enabled (DP noises the mean of the clipped updates), got 'krum'"),
])
def test_run_config_errors_name_the_key_path(data, expected):
    assert error_of(data).startswith(expected)


def test_defaults_round_trip_through_json_and_stay_frozen():
    config = config_from_dict({"faults": {"2": {"1": "nan"}}, "eeqa": {"client_budgets": {"1": 0.5}}})
    assert config.faults == {2: {1: "nan"}} and config.eeqa.client_budgets == {1: 0.5}
    assert config.federation.rounds == 3 and config.model.tiny["num_hidden_layers"] == 2
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    with pytest.raises(pydantic.ValidationError):
        config.seed = 3
    changed = with_overrides(config, federation={"rounds": 9}, method="fedit")
    assert (changed.federation.rounds, changed.method, config.federation.rounds) == (9, "fedit", 3)


def test_numbers_keep_their_type_so_existing_hashes_hold():
    config = config_from_dict({"baseline": {"lora_alpha": 16}, "federation": {"client_timeout_s": 60}})
    assert config_to_dict(config)["baseline"]["lora_alpha"] == 16
    assert isinstance(config.federation.client_timeout_s, int)


def test_fingerprint_ignores_only_what_may_change_across_a_resume():
    config = config_from_dict({})
    same = with_overrides(config, federation={"rounds": 9, "max_retries": 3}, faults={1: {0: "raise"}}, label="x")
    assert config_fingerprint(config) == config_fingerprint(same)
    assert config_fingerprint(config) != config_fingerprint(with_overrides(config, federation={"lr": 0.5}))


def test_vocabulary_is_defined_once():
    from smartfed.federated import messages
    from smartfed_kernels import validation
    from smartfed_kernels.triton import configs

    assert configs.GATES is validation.GATES is GATES and configs.ROUTERS is validation.ROUTERS
    assert LAYER_ROUTERS == (*validation.ROUTERS, "projected")
    fields = RunConfig.model_fields["more"].annotation.model_fields
    assert typing.get_args(fields["gate"].annotation) == GATES
    assert typing.get_args(fields["router"].annotation) == LAYER_ROUTERS
    assert typing.get_args(fields["router_init"].annotation) == ROUTER_INITS
    wire = RunConfig.model_fields["communication"].annotation.model_fields["wire_dtype"].annotation
    assert typing.get_args(wire) == WIRE_DTYPES == tuple(messages.WIRE_DTYPES)


def test_load_config_names_the_file_and_line_of_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("federation:\n  rounds: 3\n   lr: 0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: malformed YAML at line 3, column")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping at top level, got a list"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("federation: {rounds: 3}\nmore: {top_k: 2}\nfederation: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="malformed YAML at line 3, column 1: key 'federation' appears twice"):
        load_config(path)
    path.write_text("federation: {alpha: .inf}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: federation.alpha: must be finite, got inf"


def test_overrides_parse_yaml_values_at_checked_paths(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("federation: {rounds: 2}\n")
    config = load_config(path, ["federation.rounds=5", "pool.target_modules=[q_proj]", "more.gamma=null",
                                "model.tiny.hidden_size=64"])
    assert config.federation.rounds == 5 and config.pool.target_modules == ["q_proj"]
    assert config.more.gamma is None and config.model.tiny == {"hidden_size": 64}
    for assignment, expected in [
        ("federation.round=3", "--set federation.round=3: federation.round: unknown key; did you mean 'rounds'?"),
        ("federation.rounds.x=1", "--set federation.rounds.x=1: federation.rounds.x: federation.rounds is a value"),
        ("rounds", "--set rounds: expected KEY=VALUE"),
        ("federation.rounds=[", "--set federation.rounds=[: federation.rounds: value '[' is not YAML"),
    ]:
        with pytest.raises(ConfigError) as caught:
            apply_overrides({}, [assignment])
        assert str(caught.value).startswith(expected)
    with pytest.raises(ConfigError, match=r"^--set model\.tiny\.hidden_sise=64: model\.tiny\.hidden_sise: not an"):
        load_config(path, ["model.tiny.hidden_sise=64"])
    with pytest.raises(ConfigError, match=rf"^{path}: federation\.min_clients: must be <= federation\.num_clients"):
        load_config(path, ["federation.num_clients=1"])


def test_pool_spec_and_sweep_schemas():
    spec = validate(PoolSpec, {"adapters": [{"name": "a", "task": "skills_arithmetic", "steps": 3}]})
    assert spec.lora.r == 8 and spec.training.lr == 3e-3 and spec.adapters[0].steps == 3
    assert error_of({"adapters": [{"name": "a/b", "task": "t"}]}, PoolSpec)== (
        "adapters[0].name: must be a folder name (no path), got 'a/b'")
    assert error_of({"adapters": []}, PoolSpec) == "adapters: must not be empty"
    assert error_of({"lora": {"rank": 4}, "adapters": [{"name": "a", "task": "t"}]}, PoolSpec) == (
        "lora.rank: unknown key; expected one of ['lora_alpha', 'r', 'target_modules']")
    grid = {"seeds": [0], "tasks": {"t": {}}, "methods": {"m": {"per_task": {"u": {}}}}}
    assert error_of({"sweep": grid}, SweepConfig) == "sweep.methods.m.per_task: names task(s) ['u'] that sweep.tasks lacks"
    assert error_of({"sweep": {"seeds": [0], "tasks": {"t": {}}}}, SweepConfig) == "sweep.methods: is required"


def test_flower_run_settings_take_run_config_keys_and_set_overrides(tmp_path):
    assert FlowerRunSettings.from_run_config({}) == FlowerRunSettings()
    settings = FlowerRunSettings.from_run_config({
        "node-wait-s": 5, "resume": True, "overrides": "federation.rounds=7 'pool.target_modules=[q_proj, v_proj]'",
    })
    assert settings.node_wait_s == 5 and settings.resume and len(settings.overrides) == 2
    assert settings.run_config().federation.rounds == 7
    path = tmp_path / "run.yaml"
    path.write_text("seed: 4\n")
    config = FlowerRunSettings(config=str(path), overrides=["federation.rounds=2"]).run_config()
    assert (config.seed, config.federation.rounds) == (4, 2)
    for run_config, expected in [
        ({"rounds": 3}, "run config: rounds: unknown key"),
        ({"resume": "yes"}, "run config: resume: must be true or false"),
        ({"reply-timeout-s": 0}, "run config: reply-timeout-s: must be > 0, got 0"),
        ({"overrides": "federation.round=3"}, "--set federation.round=3: federation.round: unknown key"),
    ]:
        with pytest.raises(ConfigError) as caught:
            FlowerRunSettings.from_run_config(run_config).run_config()
        assert str(caught.value).startswith(expected)


def test_check_resume_allows_only_resumable_changes_and_records_them(tmp_path):
    from smartfed.federated.run_dir import RunDir

    config = config_from_dict({"federation": {"rounds": 2}})
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    longer = with_overrides(config, federation={"rounds": 4})
    changes = RunDir(tmp_path).check_resume(longer)
    assert changes == {"federation.rounds": (2, 4)}
    with pytest.raises(ConfigError) as caught:
        RunDir(tmp_path).check_resume(with_overrides(config, federation={"lr": 0.5}))
    assert str(caught.value).startswith(
        f"{tmp_path / 'config.json'}: federation.lr: is 0.5 now but 0.01 in the run already there")
    RunDir(tmp_path).record_resume(longer, changes, at_round=2)
    assert json.loads((tmp_path / "config.json").read_text())["federation"]["rounds"] == 4
    assert json.loads((tmp_path / "resumes.jsonl").read_text()) == {
        "at_round": 2, "changes": {"federation.rounds": [2, 4]}}
    assert RunDir(tmp_path).check_resume(longer) == {}


def alias_bomb(levels=9, width=9):
    """A YAML mapping whose last key expands to width**levels values in about 1.7 KB."""
    names = [f"l{index}" for index in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    lines += [f"{name}: &{name} [{', '.join(['*' + previous] * width)}]" for previous, name in zip(names, names[1:])]
    return "\n".join(lines)


@pytest.mark.parametrize("text, expected", [
    ("federation: " + "[" * 1000 + "]" * 1000, "nests deeper than 32 levels"),
    ("a: &a [*a]", "nests deeper than 32 levels"),
    ("x: 1\n" * 3 + "y: " + "{a: " * 40 + "1" + "}" * 40, "nests deeper than 32 levels"),
])
def test_hostile_yaml_is_one_config_error(tmp_path, text, expected):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_a_large_alias_bomb_under_model_tiny_is_refused_before_validation(tmp_path):
    bomb = alias_bomb()
    assert len(bomb) < 2000
    text = bomb + "\nmodel:\n  tiny:\n    hidden_size: 32\n    architectures: *l9\n"
    with pytest.raises(ConfigError, match="holds more than 100000 values"):
        config_from_dict(read_yaml_text(tmp_path, text))


def read_yaml_text(tmp_path, text):
    from smartfed.config import read_yaml

    path = tmp_path / "x.yaml"
    path.write_text(text)
    return read_yaml(path)


@pytest.mark.parametrize("assignment, expected", [
    ("task.seq_len=100000000", "task.seq_len: must be <= 8192, got 100000000"),
    ("federation.rounds=1000000000", "federation.rounds: must be <= 100000"),
    ("federation.local_steps=10000000000", "federation.local_steps: must be <= 1000000"),
    ("federation.batch_size=1000000", "federation.batch_size: must be <= 65536"),
    ("federation.num_clients=100000", "federation.num_clients: must be <= 10000"),
    ("more.top_k=1000000", "more.top_k: must be <= 65536"),
    ("model.tiny.hidden_size=10000000", "model.tiny.hidden_size: must be in [1, 65536]"),
    ("model.tiny.vocab_size=true", "model.tiny.vocab_size: must be an integer, got True"),
    (("task.train_examples=1000000", "task.seq_len=8192"), "task.seq_len: (train_examples + eval_examples) x seq_len"),
    (f"federation.rounds={10**400}", "federation.rounds: must be <= 100000, got an integer of about 400 digits"),
    (f"federation.lr={10**400}", "federation.lr: must be finite, got an integer of about 400 digits"),
    ("seed=-1", "seed: must be >= 0"),
])
def test_every_size_that_allocates_is_bounded(assignment, expected):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({}, [assignment] if isinstance(assignment, str) else assignment)
    assert expected in str(caught.value)


def test_the_parameter_count_of_model_tiny_is_bounded_after_its_names():
    with pytest.raises(ConfigError, match="model.tiny: describes about .* parameters, more than the 1e\\+09"):
        config_from_dict({"model": {"tiny": {"hidden_size": 16384, "num_hidden_layers": 64}}})


def integer_fields(schema, prefix=""):
    for name, field in schema.model_fields.items():
        annotation = field.annotation
        inner = typing.get_args(annotation) or (annotation,)
        for option in inner:
            if isinstance(option, type) and issubclass(option, pydantic.BaseModel):
                yield from integer_fields(option, f"{prefix}{name}.")
        if annotation is int or set(inner) == {int, type(None)}:
            yield f"{prefix}{name}", field


def test_every_integer_of_the_run_config_has_an_upper_bound():
    unbounded = [key for key, field in integer_fields(RunConfig)
                 if not any(getattr(item, "le", None) is not None for item in field.metadata)]
    assert not unbounded


def test_the_more_section_is_derived_from_more_config():
    import dataclasses

    from smartfed.choices import MoREConfig, more_options
    from smartfed.config import MoRESection
    from smartfed.config.more import DEFAULT_TOP_K, RUN_SUPPLIED

    config_fields = {item.name: item for item in dataclasses.fields(MoREConfig)}
    section_fields = MoRESection.model_fields
    assert set(section_fields) == {"top_k", *more_options()}
    assert set(config_fields) == set(section_fields) | set(RUN_SUPPLIED)
    for name, rule in more_options().items():
        assert section_fields[name].default == config_fields[name].default, name
        if rule.choices:
            assert typing.get_args(section_fields[name].annotation) == rule.choices, name
    assert section_fields["top_k"].default == DEFAULT_TOP_K
    section = config_from_dict({"more": {"router": "projected", "router_dim": 8, "gamma": 2.0, "top_k": 3}}).more
    built = section.more_config(seed=7)
    assert isinstance(built, MoREConfig) and built.seed == 7
    assert {name: getattr(built, name) for name in section_fields} == section.model_dump()
    with pytest.raises(ConfigError, match="more.router_dim: must be >= 1"):
        config_from_dict({"more": {"router_dim": 0}})
