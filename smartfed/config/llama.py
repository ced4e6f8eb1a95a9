"""``model.tiny``: the keyword arguments of the random Llama a run builds, checked in two steps.

The cheap step (with the rest of the schema) bounds the sizes that allocate. The step that reads transformers' ``LlamaConfig`` signature (names and simple
types of its arguments, with a did-you-mean) imports transformers, so it runs only after every
other check of the config passed (``RunConfig.deferred_checks``), with the parameter count the
sizes imply: a typo elsewhere is reported without that import.
"""

import difflib
import functools
import inspect
import math
import types
import typing

from smartfed.config.errors import ConfigError, describe, number_hint
from smartfed.config.limits import MAX_TINY_PARAMETERS, MAX_TINY_SIZES

DEFAULT_TINY = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
    "max_position_embeddings": 64,
}
# LlamaConfig's own defaults for the sizes a config leaves out (transformers 4.x and 5.x).
_LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000}


def check_tiny_sizes(tiny: dict) -> None:
    """Bound every size that allocates (without importing transformers)."""
    for name, maximum in MAX_TINY_SIZES.items():
        value = tiny.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {describe(value)}{number_hint(value)}", key=name)
        if not 1 <= value <= maximum:
            raise ConfigError(f"must be in [1, {maximum}], got {describe(value)}", key=name)


def check_tiny_parameters(tiny: dict) -> None:
    """Bound the parameter count of embeddings, attention and MLP (LlamaConfig's defaults for the
    sizes ``tiny`` leaves out)."""
    size = {name: tiny.get(name) or default for name, default in _LLAMA_DEFAULTS.items()}
    hidden, layers = size["hidden_size"], size["num_hidden_layers"]
    parameters = 2 * size["vocab_size"] * hidden + layers * (4 * hidden * hidden + 3 * hidden * size["intermediate_size"])
    if parameters > MAX_TINY_PARAMETERS:
        raise ConfigError(f"describes about {parameters:.3g} parameters, more than the {MAX_TINY_PARAMETERS:.0e} a "
                          "random model may hold (use model.pretrained for a real model)")


@functools.cache
def llama_arguments():
    """{argument: annotation} of transformers' LlamaConfig, including PretrainedConfig's own."""
    from transformers import LlamaConfig, PretrainedConfig

    arguments = {}
    for cls in (PretrainedConfig, LlamaConfig):
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self":
                arguments[name] = parameter.annotation
    return arguments


_SIMPLE_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_simple(name, annotation, value):
    """Type-check ``value`` against a plain (int / float / bool / str, optionally None) annotation."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in options and value is None:
        return
    simple = [option for option in options if option is not type(None)]
    if not simple or any(option not in _SIMPLE_TYPES for option in simple):
        return
    ok = any(isinstance(value, bool) == (option is bool)
             and isinstance(value, (int, float) if option is float else option) for option in simple)
    if not ok:
        expected = " or ".join(_SIMPLE_TYPES[option] for option in simple)
        raise ConfigError(f"must be {expected}, got {describe(value)}{number_hint(value)}", key=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be finite, got {value!r}", key=name)


def check_llama_arguments(tiny: dict) -> None:
    """Raise unless every key of ``tiny`` is a LlamaConfig argument of a fitting simple type, and
    the model it describes is within the parameter bound."""
    known = llama_arguments()
    for name, value in tiny.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"not an argument of transformers' LlamaConfig{hint}", key=name)
        _check_simple(name, known[name], value)
    check_tiny_parameters(tiny)
