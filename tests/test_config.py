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
    FlowerRunSettings,
    PoolSpec,
    RunConfig,
    SweepConfig,
    apply_overrides,
    config_fingerprint,
    config_from_dict,
    config_to_dict,
    load_config,
    validate,
    with_overrides,
)


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
