"""YAML input, bounded: a config file or a ``--set`` value becomes plain data only within the
limits of smartfed.config.limits (file size, nesting depth while parsing, values counted with
aliases expanded), so a hostile file is one ConfigError, never a RecursionError or a hang."""

import functools
from pathlib import Path

from smartfed.config.errors import ConfigError, describe
from smartfed.config.limits import MAX_CONFIG_BYTES, MAX_DEPTH
from smartfed.config.validation import check_size


class _TooDeep(Exception):
    def __init__(self, mark):
        super().__init__()
        self.mark = mark


@functools.cache
def _yaml_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """PyYAML's safe loader that refuses a repeated key (PyYAML keeps the last of two equal
        keys; a config must not silently lose the first) and nesting deeper than MAX_DEPTH
        (checked while composing, before Python's recursion limit is near)."""

        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH + 1:
                    raise _TooDeep(self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node, deep=deep)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return BoundedLoader


def _where(mark) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def parse_yaml(text, *, source=None, key=None):
    """The plain data of the YAML ``text``; a ConfigError naming ``source`` (and the line) when it
    is malformed or past a limit."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"is {len(text)} characters, more than the {MAX_CONFIG_BYTES} a config may hold",
                          key=key, source=source)
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except _TooDeep as error:
        raise ConfigError(f"nests deeper than {MAX_DEPTH} levels{_where(error.mark)}", key=key,
                          source=source) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"malformed YAML{_where(mark)}: {problem}", key=key, source=source) from None
    except RecursionError:
        raise ConfigError(f"nests deeper than {MAX_DEPTH} levels", key=key, source=source) from None
    check_size(data, source=source)
    return data


def read_yaml(path):
    """The YAML file's top-level mapping ({} for an empty file); ConfigError naming the file (and
    the line) when it is missing, malformed or too large, or when a mapping repeats a key."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"is {path.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} a config may hold",
                              source=path)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", source=path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read: {error}", source=path) from None
    data = parse_yaml(text, source=path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"must hold a mapping at top level, got {describe(data)}", source=path)
    return data
