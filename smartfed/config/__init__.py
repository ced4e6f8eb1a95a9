"""The typed configuration of a SmartFed run, torch-free: ``import smartfed.config`` imports
pydantic and PyYAML (on first load of a file), never torch or transformers.

The package, one job per module:

- ``errors``: :class:`ConfigError` (a :class:`smartfed.errors.SmartFedError`) and its wording;
  every problem names the file and the key path in one line::

      configs/x.yaml: federation.alpha: must be finite, got inf

- ``limits``: the upper bound of every size and count a config can set, and of the YAML itself;
- ``numbers``: the number types (finite, bounded, kept as given) and the ``Section`` base;
- ``vocabularies``: the names a run config chooses from;
- ``validation``: plain data against a schema, the first problem as a ConfigError;
- ``yaml_input``: YAML files and ``--set`` values, bounded in size, depth and aliases;
- ``llama``: ``model.tiny`` (sizes bounded; argument names checked against transformers'
  LlamaConfig only after everything else passed);
- ``more``: the ``more`` section, derived from :class:`smartfed.choices.MoREConfig`;
- ``schema``: :class:`RunConfig` and its sections;
- ``loading``: ``load_config(path, overrides)``, ``--set`` overrides, ``with_overrides``;
- ``fingerprint``: ``config_fingerprint`` and the resume rule (pure, no file I/O; the run folder's
  owner, smartfed.federated.run_dir.RunDir, applies it to a run's ``config.json``).

The pool spec (smartfed.experiments.pool_spec), the sweep schema (smartfed.experiments.sweep_schema)
and the Flower run settings (smartfed.experiments.flower_settings) live beside their owners and
are built from these pieces.
"""

from smartfed.config.errors import ConfigError
from smartfed.config.fingerprint import (
    FINGERPRINT_SCHEMA, RESUMABLE_CHANGES, config_fingerprint, fingerprint_matches, is_resumable,
    legacy_fingerprints, non_default_values, resume_changes,
)
from smartfed.config.loading import (
    apply_overrides, blame_override, config_from_dict, config_to_dict, load_config, override_key, parse_override,
    with_overrides,
)
from smartfed.config.more import MoRESection
from smartfed.config.number_types import (
    Fraction, IntKey, NonEmptyStr, NonNegative, NonNegativeInt, Positive, PositiveInt, Section, count, number,
)
from smartfed.config.schema import (
    BaselineSection, CommunicationSection, DifferentialPrivacySection, EEQASection, FederationSection, ModelSection,
    NormBoundSection, PoolSection, PrivacySection, RobustnessSection, RunConfig, SecureAggregationSection, TaskSection,
)
from smartfed.config.validation import validate
from smartfed.config.vocabularies import (
    AGGREGATORS, ATTACK_PARAMS, BACKENDS, ESTIMATORS, EXAMPLE_COUNTS, FAULT_KINDS, GATES, IMPORTANCE_AGGREGATIONS,
    LAYER_ROUTERS, METHODS, NORM_BOUND_MODES, PARTITIONS, ROUTER_INITS, SYNTHETIC_TASK, WIRE_DTYPES,
)
from smartfed.config.yaml_input import parse_yaml, read_yaml

__all__ = [
    "AGGREGATORS", "ATTACK_PARAMS", "BACKENDS", "ESTIMATORS", "EXAMPLE_COUNTS", "FAULT_KINDS", "FINGERPRINT_SCHEMA",
    "GATES", "IMPORTANCE_AGGREGATIONS", "LAYER_ROUTERS", "METHODS", "NORM_BOUND_MODES", "PARTITIONS",
    "RESUMABLE_CHANGES", "ROUTER_INITS", "SYNTHETIC_TASK", "WIRE_DTYPES",
    "BaselineSection", "CommunicationSection", "ConfigError", "DifferentialPrivacySection", "EEQASection",
    "FederationSection", "Fraction", "IntKey", "ModelSection", "MoRESection", "NonEmptyStr", "NonNegative",
    "NonNegativeInt", "NormBoundSection", "PoolSection", "Positive", "PositiveInt", "PrivacySection",
    "RobustnessSection", "RunConfig", "Section", "SecureAggregationSection", "TaskSection",
    "apply_overrides", "blame_override", "config_fingerprint", "config_from_dict", "config_to_dict",
    "count", "fingerprint_matches", "is_resumable", "legacy_fingerprints", "load_config", "non_default_values",
    "number", "override_key", "parse_override", "parse_yaml", "read_yaml",
    "resume_changes", "validate", "with_overrides",
]
