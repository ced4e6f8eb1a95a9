"""What identifies a run's configuration, and what may change when a run continues.

Pure functions of configs and plain mappings (no file is read or written here): the run folder's
owner reads ``config.json`` and the recorded fingerprints and asks these.

``config_fingerprint`` hashes the schema version and the values that differ from their defaults,
minus ``RESUMABLE_CHANGES``: a field added later with a default leaves every existing fingerprint
as it was, so no compatibility list is kept. ``FINGERPRINT_SCHEMA`` goes up when the meaning or
the default of an existing field changes (tests/test_fingerprint.py pins the defaults of the
current schema). Its fingerprints read ``v2-<16 hex>``.

Runs recorded before the schema version carry a bare 16-hex fingerprint, the hash of their
``config.json`` minus the resumable keys of the time: ``legacy_fingerprints`` reproduces it
exactly from the saved mapping, and ``fingerprint_matches`` accepts either scheme.
"""

import functools
import hashlib
import json

from pydantic import BaseModel

from smartfed.config.errors import ConfigError, join_key
from smartfed.config.schema import RunConfig
from smartfed.config.validation import validate

FINGERPRINT_SCHEMA = 2
FINGERPRINT_PREFIX = f"v{FINGERPRINT_SCHEMA}-"
# What may change across a resume without changing the result of a completed round: the number
# of rounds, the retry and timeout policy, injected faults, where the pool is cached (the pool
# itself is checked by its own fingerprint) and the report label.
RESUMABLE_CHANGES = (
    "federation.rounds", "federation.max_retries", "federation.client_timeout_s", "faults", "pool.cache_dir", "label",
)
# The legacy scheme, frozen: the resumable keys it dropped (without "label" for runs recorded
# while the label was not yet resumable) and the keys added later that it dropped at their defaults.
_LEGACY_IGNORED = (RESUMABLE_CHANGES, RESUMABLE_CHANGES[:-1])
_LEGACY_LATER_DEFAULTS = {"task.validation_fraction": 0, "more.router_dim": 32, "more.projection_seed": 0}


def _plain(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value))


@functools.cache
def _defaults(schema) -> BaseModel:
    return schema()


def _non_default(config: BaseModel, default: BaseModel, prefix=""):
    for name in type(config).model_fields:
        value, default_value = getattr(config, name), getattr(default, name)
        key = join_key(prefix, name)
        if isinstance(value, BaseModel) and type(default_value) is type(value):
            yield from _non_default(value, default_value, key)
        elif _plain(value) != _plain(default_value):
            yield key, _plain(value)


def non_default_values(config: RunConfig, *, ignore=RESUMABLE_CHANGES) -> dict:
    """{dotted key: JSON value} of every field of ``config`` that differs from its default, minus
    the keys of ``ignore`` and everything under them. Mappings (``model.tiny``, ``task.options``)
    are compared whole."""
    return {key: value for key, value in _non_default(config, _defaults(type(config)))
            if not any(key == dropped or key.startswith(dropped + ".") for dropped in ignore)}


def config_fingerprint(config: RunConfig, *, ignore=RESUMABLE_CHANGES) -> str:
    """``v2-`` and 16 hex digits of the hash of the schema version and the non-default values of
    ``config`` minus ``ignore`` (what may change across a resume)."""
    identity = {"schema": FINGERPRINT_SCHEMA, "values": non_default_values(config, ignore=ignore)}
    return FINGERPRINT_PREFIX + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _value_at(data, dotted):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _without(data, dotted_keys):
    data = _plain(data)
    for dotted in dotted_keys:
        node = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def legacy_fingerprints(saved: dict) -> set:
    """The fingerprints a run recorded before ``FINGERPRINT_SCHEMA`` may carry for the
    ``config.json`` mapping ``saved``: the hash of that mapping minus the resumable keys of the
    time (and the later keys at their defaults)."""
    later = tuple(key for key, value in _LEGACY_LATER_DEFAULTS.items() if _value_at(saved, key) == value)
    return {hashlib.sha256(json.dumps(_without(saved, ignored + later), sort_keys=True).encode()).hexdigest()[:16]
            for ignored in _LEGACY_IGNORED}


def fingerprint_matches(recorded, config: RunConfig, saved=None) -> bool:
    """Whether the fingerprint ``recorded`` with a state identifies ``config``. A legacy one (no
    ``v2-``) needs ``saved``, the run's ``config.json`` mapping, which must then describe
    ``config`` up to resumable changes."""
    if not isinstance(recorded, str):
        return False
    if recorded.startswith(FINGERPRINT_PREFIX):
        return recorded == config_fingerprint(config)
    if saved is None or recorded not in legacy_fingerprints(saved):
        return False
    try:
        resume_changes(saved, config)
    except ConfigError:
        return False
    return True


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), join_key(prefix, key))
    elif old != new:
        yield prefix, old, new


def is_resumable(key) -> bool:
    """Whether the dotted ``key`` may change when a run continues."""
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)


def resume_changes(saved: dict, config: RunConfig, *, source=None) -> dict:
    """The changes ``{key: (old, new)}`` from the run config mapping ``saved`` (a ``config.json``)
    to ``config``; a ConfigError (naming ``source``) for the first key that differs outside
    ``RESUMABLE_CHANGES``. ``saved`` is validated first, so keys added to the schema later
    compare at their defaults."""
    old = _plain(validate(RunConfig, saved, source=source).model_dump())
    changes = {}
    for key, before, after in _differences(old, _plain(config.model_dump())):
        if not is_resumable(key):
            raise ConfigError(
                f"is {after!r} now but {before!r} in the run already there; only {', '.join(RESUMABLE_CHANGES)} "
                "may change when a run continues (start a new output folder instead)", key=key, source=source)
        changes[key] = (before, after)
    return changes
