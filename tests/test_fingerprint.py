"""Config fingerprints: non-default values plus a schema version, so a field added with a default
leaves every fingerprint as it was; every fingerprint recorded in benchmarks/results verifies
against its own config.json (the legacy scheme reproduced exactly); the model fingerprint
ignores what a newer transformers writes differently for the same weights."""

import json
import struct
from pathlib import Path

import pytest
from pydantic import BaseModel, create_model

from smartfed.config import (
    FINGERPRINT_SCHEMA, RESUMABLE_CHANGES, ConfigError, RunConfig, Section, config_fingerprint, config_from_dict,
    config_to_dict, fingerprint_matches, legacy_fingerprints, load_config, non_default_values, resume_changes,
    with_overrides,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULTS = Path(__file__).resolve().parent / "data" / f"run_config_defaults_v{FINGERPRINT_SCHEMA}.json"


def recorded_fingerprints():
    """(state file, recorded config fingerprint, the run's config.json mapping) of every committed
    checkpoint state.json and final_state.safetensors (metadata read from the header)."""
    found = []
    for path in sorted(RESULTS.rglob("state.json")):
        found.append((path, json.loads(path.read_text())["config_fingerprint"], path.parent.parent))
    for path in sorted(RESULTS.rglob("final_state.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        found.append((path, header["__metadata__"]["config_fingerprint"], path.parent))
    return [(path, fingerprint, json.loads((run / "config.json").read_text())) for path, fingerprint, run in found]


def test_every_committed_fingerprint_verifies_against_its_own_config():
    records = recorded_fingerprints()
    assert len(records) >= 46
    failures = [str(path.relative_to(RESULTS)) for path, fingerprint, saved in records
                if not fingerprint_matches(fingerprint, config_from_dict(saved), saved)]
    assert not failures


def test_a_committed_fingerprint_no_longer_verifies_once_its_config_changes():
    path, fingerprint, saved = recorded_fingerprints()[0]
    config = config_from_dict(saved)
    assert fingerprint in legacy_fingerprints(saved)
    changed = {**saved, "federation": {**saved["federation"], "lr": saved["federation"]["lr"] * 2}}
    assert not fingerprint_matches(fingerprint, config_from_dict(changed), changed)
    assert not fingerprint_matches(fingerprint, with_overrides(config, seed=config.seed + 1), saved)
    assert not fingerprint_matches(fingerprint, config, None)
    assert not fingerprint_matches("v2-" + fingerprint, config, saved)


def test_the_defaults_hash_to_nothing_but_the_schema_version():
    assert non_default_values(RunConfig()) == {}
    config = config_from_dict({"federation": {"lr": 0.05}, "more": {"router": "projected"}, "label": "x"})
    assert non_default_values(config) == {"federation.lr": 0.05, "more.router": "projected"}
    fingerprint = config_fingerprint(config)
    assert fingerprint.startswith(f"v{FINGERPRINT_SCHEMA}-") and len(fingerprint) == 3 + 16


def test_a_field_added_with_a_default_keeps_every_fingerprint():
    class Later(Section):
        enabled: bool = False

    extended = create_model("ExtendedRunConfig", __base__=RunConfig, later=(Later, Later()))
    for data in ({}, {"federation": {"lr": 0.05}, "seed": 3}, {"more": {"top_k": 2}, "task": {"seq_len": 9}}):
        assert config_fingerprint(extended.model_validate(data)) == config_fingerprint(config_from_dict(data))
    assert config_fingerprint(extended.model_validate({"later": {"enabled": True}})) != config_fingerprint(RunConfig())


def test_a_value_equal_to_its_default_is_the_default_whatever_its_type():
    assert config_fingerprint(config_from_dict({"pool": {"lora_alpha": 8}})) == config_fingerprint(RunConfig())
    assert config_fingerprint(config_from_dict({"model": {"tiny": {"hidden_size": 32}}})) != config_fingerprint(
        RunConfig())


def flat_defaults(model, prefix=""):
    values = {}
    for name in type(model).model_fields:
        value, key = getattr(model, name), f"{prefix}.{name}" if prefix else name
        values.update(flat_defaults(value, key) if isinstance(value, BaseModel) else {key: value})
    return json.loads(json.dumps(values))


def test_no_default_of_this_schema_version_changed():
    """A changed default would make old runs' fingerprints name the new value: bump
    FINGERPRINT_SCHEMA (and write a new snapshot) instead. New keys are free."""
    pinned = json.loads(DEFAULTS.read_text())
    current = flat_defaults(RunConfig())
    changed = {key: (value, current.get(key, "<removed>")) for key, value in pinned.items()
               if current.get(key, "<removed>") != value}
    assert not changed


def test_committed_configs_keep_their_fingerprints():
    assert config_fingerprint(load_config(ROOT / "configs" / "tiny.yaml")) == "v2-03e1c00c74033466"
    assert config_fingerprint(load_config(ROOT / "configs" / "demo.yaml")) == "v2-82ac5bd89260a379"


def test_resume_changes_allow_only_the_resumable_keys():
    saved = config_to_dict(RunConfig())
    config = with_overrides(RunConfig(), federation={"rounds": 9, "max_retries": 3}, label="again")
    assert resume_changes(saved, config) == {"federation.max_retries": (1, 3), "federation.rounds": (3, 9),
                                             "label": (None, "again")}
    with pytest.raises(ConfigError, match="federation.lr: is 0.5 now but 0.01 in the run already there"):
        resume_changes(saved, with_overrides(RunConfig(), federation={"lr": 0.5}), source="x/config.json")
    assert config_fingerprint(config) == config_fingerprint(RunConfig())
    assert "label" in RESUMABLE_CHANGES
