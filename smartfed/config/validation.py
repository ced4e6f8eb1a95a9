"""Validate plain data (from YAML, JSON, ``--set`` or a Flower run config) against a schema,
with one ConfigError for the first problem, named by its key path."""

import difflib
import types
import typing
from typing import Annotated, Union

from pydantic import BaseModel, ValidationError

from smartfed.config.errors import ConfigError, describe, join_key, number_hint
from smartfed.config.limits import MAX_DEPTH, MAX_NODES


def check_size(data, *, source=None):
    """Raise unless ``data`` (nested dicts and lists) is at most ``MAX_DEPTH`` deep and holds at
    most ``MAX_NODES`` values, counting a value reached twice (a YAML alias) twice; iterative, so
    a hostile nesting cannot exhaust the stack, and it stops at the first bound crossed."""
    nodes = 0
    stack = [(data, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(f"holds more than {MAX_NODES} values (YAML aliases count as what they expand to)",
                              source=source)
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ConfigError(f"nests deeper than {MAX_DEPTH} levels", key=join_key(*path[:4]) or None,
                                  source=source)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((child, depth + 1, (*path, key)) for key, child in items)


def unwrap(annotation):
    """The model class, dict type or leaf type behind Optional[...] / Annotated[...]."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def is_schema(node) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _model_at(schema, path):
    """The model class reached by following ``path`` (field names) from ``schema``, or None."""
    node = schema
    for part in path:
        if not is_schema(node):
            return None
        field = node.model_fields.get(part)
        if field is None:
            return None
        node = unwrap(field.annotation)
        if typing.get_origin(node) is list:
            node = unwrap(typing.get_args(node)[0])
    return node if is_schema(node) else None


def _field_key(schema, name):
    field = schema.model_fields.get(name) if schema is not None else None
    return field.alias if field is not None and field.alias else name


def unknown_key_message(name, expected) -> str:
    close = difflib.get_close_matches(str(name), expected, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}expected one of {expected}"


_SIGNS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(error, schema) -> ConfigError:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    ctx = error.get("ctx") or {}
    parent = _model_at(schema, [p for p in loc[:-1] if isinstance(p, str)])
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
        inner = ctx["error"]
        return ConfigError(inner.message, key=join_key(*loc, inner.key))
    if kind == "extra_forbidden":
        expected = sorted(_field_key(parent, n) for n in parent.model_fields) if parent is not None else []
        message = unknown_key_message(loc[-1], expected)
    elif kind == "missing":
        message = "is required"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"must be an integer, got {describe(value)}{number_hint(value)}"
    elif kind in ("bool_type", "bool_parsing"):
        message = f"must be true or false, got {describe(value)}"
    elif kind == "string_type":
        message = f"must be a string, got {describe(value)}"
    elif kind in ("list_type", "tuple_type"):
        message = f"must be a list, got {describe(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        message = f"must be a mapping, got {describe(value)}"
    elif kind == "literal_error":
        message = f"must be one of {ctx['expected']}, got {value!r}"
    elif kind in _SIGNS:
        bound = next(iter(ctx.values()))
        message = f"must be {_SIGNS[kind]} {bound}, got {describe(value)}"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "too_long":
        message = f"must hold at most {ctx.get('max_length')} items"
    elif kind == "string_pattern_mismatch":
        message = "must not be blank"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {describe(value)}"
    return ConfigError(message, key=join_key(*loc))


def validate(schema, data, *, source=None):
    """``schema.model_validate(data)``, a ConfigError (first problem, key path, ``source``) if
    invalid. The data's size is checked first; then the schema's own checks; then, if the schema
    has them, its ``deferred_checks`` (those that import a library, e.g. transformers for
    ``model.tiny``), so that a mistake anywhere else is reported without paying for that import."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"must hold a mapping at top level, got {describe(data)}", source=source)
    check_size(data, source=source)
    try:
        result = schema.model_validate(data)
        deferred = getattr(result, "deferred_checks", None)
        if deferred is not None:
            deferred()
        return result
    except ValidationError as error:
        problems = error.errors()
        first = _message(problems[0], schema)
        if len(problems) > 1:
            first = ConfigError(f"{first.message} (and {len(problems) - 1} more problem(s))", key=first.key)
        raise first.located(source=source) from None
    except ConfigError as error:
        raise error.located(source=source) from None
