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


def _member_tag(member):
    """The tag of a member of a discriminated union: the value of its one single-valued Literal field."""
    for field in member.model_fields.values():
        literal = unwrap(field.annotation)
        if typing.get_origin(literal) is typing.Literal and len(typing.get_args(literal)) == 1:
            return typing.get_args(literal)[0]
    return None


def union_members(annotation):
    """{tag: model} of a discriminated union ``annotation`` ({} for anything else)."""
    if typing.get_origin(annotation) not in (Union, types.UnionType):
        return {}
    members = [unwrap(member) for member in typing.get_args(annotation)]
    return {_member_tag(member): member for member in members if is_schema(member)}


def _tagged_member(annotation, tag):
    """The model of a discriminated union ``annotation`` whose tag is ``tag``, or None."""
    return union_members(annotation).get(tag)


def _resolve(schema, loc):
    """(``loc`` without the tags pydantic puts after a discriminated union, the model class
    reached by the field names of ``loc`` but its last part, or None)."""
    node, path = schema, []
    for depth, part in enumerate(loc):
        member = _tagged_member(node, part) if isinstance(part, str) else None
        if member is not None:
            node = member
            continue
        path.append(part)
        if depth == len(loc) - 1:
            break
        if isinstance(part, int) or not is_schema(node):
            node = None if not isinstance(part, int) else node
            continue
        field = node.model_fields.get(part)
        node = None if field is None else unwrap(field.annotation)
        if typing.get_origin(node) is list:
            node = unwrap(typing.get_args(node)[0])
    return tuple(path), node if is_schema(node) else None


def _tags(parent, name):
    """The tags of the discriminated union field ``name`` of the model ``parent``."""
    field = parent.model_fields.get(name) if parent is not None else None
    return sorted(union_members(unwrap(field.annotation))) if field is not None else []


def _field_key(schema, name):
    field = schema.model_fields.get(name) if schema is not None else None
    return field.alias if field is not None and field.alias else name


def unknown_key_message(name, expected) -> str:
    close = difflib.get_close_matches(str(name), expected, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}expected one of {expected}"


_SIGNS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(error, schema) -> ConfigError:
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    loc, parent = _resolve(schema, error["loc"])
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
        least = ctx.get("min_length", 1)
        given = len(value) if isinstance(value, (list, str)) else describe(value)
        message = "must not be empty" if least == 1 else f"must hold at least {least} items, got {given}"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        loc = (*loc, ctx["discriminator"].strip("'"))
        tags = ctx.get("expected_tags", "")
        message = f"must be one of {tags}, got {ctx['tag']!r}" if kind == "union_tag_invalid" \
            else f"is required: one of the shapes {', '.join(sorted(_tags(parent, loc[-2])))}"
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
