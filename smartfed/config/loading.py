"""A RunConfig from a YAML file, a mapping and ``--set a.b=value`` overrides, and back to JSON.

``apply_overrides`` is the one override mechanism of ``smartfed train``, ``smartfed sweep`` and
the Flower app's ``overrides`` run config; a problem names the file or the ``--set`` that
caused it. Models are frozen: copy with :func:`with_overrides`.
"""

import copy
import json
import typing
from typing import Any

from smartfed.config.errors import ConfigError
from smartfed.config.schema import RunConfig
from smartfed.config.validation import is_schema, union_members, unknown_key_message, unwrap, validate
from smartfed.config.yaml_input import parse_yaml, read_yaml


def _check_path(schema, parts, assignment):
    """Raise unless ``parts`` is a key path of ``schema`` (free below a mapping-valued field)."""
    node = schema
    for depth, part in enumerate(parts):
        key = ".".join(parts[:depth + 1])
        members = union_members(node)
        if members:
            # A discriminated union (task.data): a key of any of its shapes; the value decides which.
            node = next((m for m in members.values() if part in m.model_fields), next(iter(members.values())))
        if not is_schema(node):
            if typing.get_origin(node) is dict or node is Any:
                return
            raise ConfigError(f"{'.'.join(parts[:depth])} is a value, not a section", key=key,
                              source=f"--set {assignment}")
        if part not in node.model_fields:
            raise ConfigError(unknown_key_message(part, sorted(node.model_fields)), key=key,
                              source=f"--set {assignment}")
        node = unwrap(node.model_fields[part].annotation)


def override_key(assignment) -> str:
    """The dotted key of an ``"a.b=value"`` assignment, unchecked (for attributing and refusing)."""
    return str(assignment).partition("=")[0].strip()


def parse_override(assignment):
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML), the path checked against RunConfig."""
    key, separator, text = str(assignment).partition("=")
    parts = key.strip().split(".")
    if not separator or not all(parts):
        raise ConfigError("expected KEY=VALUE with a dotted KEY (e.g. federation.rounds=4)",
                          source=f"--set {assignment}")
    _check_path(RunConfig, parts, assignment)
    try:
        value = parse_yaml(text, key=key, source=f"--set {assignment}")
    except ConfigError as error:
        message = error.message.replace("malformed YAML", f"value {text[:40]!r} is not YAML", 1)
        raise ConfigError(message, key=key, source=error.source) from None
    return parts, value


def apply_overrides(data, overrides) -> dict:
    """A copy of the config mapping ``data`` with every ``a.b=value`` of ``overrides`` set."""
    data = copy.deepcopy(data or {})
    for assignment in overrides or ():
        parts, value = parse_override(assignment)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def blame_override(error, overrides):
    """``error`` attributed to the (last) ``--set`` that wrote its key, if one did."""
    for assignment in reversed(tuple(overrides)):
        key = override_key(assignment)
        if error.key == key or str(error.key).startswith((key + ".", key + "[")):
            return error.located(source=f"--set {assignment}")
    return error


def config_from_dict(data, overrides=(), *, source=None) -> RunConfig:
    """The RunConfig of the mapping ``data`` with ``--set`` style ``overrides`` applied; errors
    name ``source`` (the file ``data`` came from) or the override that caused them."""
    try:
        return validate(RunConfig, apply_overrides(data, overrides))
    except ConfigError as error:
        raise blame_override(error, overrides or ()).located(source=source) from None


def load_config(path, overrides=()) -> RunConfig:
    """The run config of the YAML file ``path`` with ``--set`` style ``overrides`` applied."""
    return config_from_dict(read_yaml(path), overrides, source=path)


def config_to_dict(config) -> dict:
    """The plain JSON-able mapping of a config (int mapping keys become strings, as in JSON)."""
    return json.loads(json.dumps(config.model_dump()))


def with_overrides(config: RunConfig, **sections) -> RunConfig:
    """A validated copy with some values replaced: ``with_overrides(c, federation={"rounds": 2},
    method="fedit")`` (a section's mapping updates that section; ``faults`` is replaced whole)."""
    data = config_to_dict(config)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "faults":
            data[key].update(value)
        else:
            data[key] = value
    return config_from_dict(data)
