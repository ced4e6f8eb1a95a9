"""The checks on a peft LoRA adapter's ``adapter_config.json``, torch-free: every field peft
accepts is type-checked, its regexes (``target_modules`` as a string, ``exclude_modules``, the
keys of ``rank_pattern`` / ``alpha_pattern``) compiled, ranks and ``lora_alpha`` bounded and
each scale finite, before a tensor is read; a config is untrusted input.

An adapter whose peft LoRA variant has a forward other than ``s B A x`` on the unmodified base
layer (DoRA, aLoRA, QALoRA, PiSSA-style inits that change the base, ...: ``REFUSED_CONFIG_FIELDS``,
``BASE_MODIFYING_INITS``) is refused with an :class:`AdapterError` naming the config field, as is
any set config field this module does not know, so a variant added to peft later cannot slip through.
"""

import json
import math
import re
from pathlib import Path

from smartfed.errors import SmartFedError

CONFIG_FILE = "adapter_config.json"
MAX_RANK = 4096
MAX_LORA_ALPHA = 1e6
# alpha / r (or alpha / sqrt(r) with rslora) multiplies every expert's output.
MAX_SCALE = 1e6
MAX_PATTERN_ENTRIES = 10_000

# Config fields of peft's LoraConfig that change the adapter's forward away from x -> s B A x on
# the unmodified base layer: field -> (is it set?, why MoRE cannot reproduce it, the value expected).
REFUSED_CONFIG_FIELDS = {
    "use_dora": (bool, "DoRA rescales each output column by a learned magnitude, which is not rank-wise", "false"),
    "lora_bias": (bool, "a bias on lora_B is not a rank-wise expert", "false"),
    "bias": (lambda value: value not in (None, "none"),
             "trained base biases are not rank-wise experts", '"none"'),
    "target_parameters": (bool, "LoRA on raw parameters is not LoRA on a Linear layer", "null"),
    "alora_invocation_tokens": (
        lambda value: value is not None,
        "an activated LoRA (aLoRA) acts only on the tokens after its invocation sequence, MoRE experts act on "
        "every token", "null"),
    "use_qalora": (bool, "QALoRA feeds lora_A a group-pooled input, not x", "false"),
    "use_bdlora": (bool, "BD-LoRA stores block-diagonal lora_A/lora_B blocks, not LoRA factors", "null"),
    "arrow_config": (lambda value: value is not None, "Arrow routes among its adapters with its own router", "null"),
    "astra_config": (lambda value: value is not None,
                     "Astra builds the adapter layers its own way from a preprocessed base model", "null"),
    "kasa_config": (lambda value: value is not None,
                    "KaSA truncates the base weight and scales the rank by a learned diagonal", "null"),
    "megatron_config": (lambda value: value is not None,
                        "the LoRA layers are Megatron tensor-parallel layers", "null"),
    "layer_replication": (bool, "the adapter was trained on a model whose layers peft duplicated", "null"),
    "trainable_token_indices": (bool, "trained token embeddings change the embedding layer", "null"),
    "modules_to_save": (bool, "trained full copies of these modules replace the base model's", "null"),
}
# init_lora_weights values whose initialisation subtracts the initial adapter from the base weights:
# the saved adapter then fits only that modified base.
BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# LoraConfig fields known not to change the forward (selection, scaling handled here, training-time
# only, or sub-configs of an initialisation); any other field set to a non-empty value is refused.
NEUTRAL_CONFIG_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out",
    "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "runtime_config", "ensure_weight_tying", "velora_config", "monteclora_config",
}


class AdapterError(SmartFedError, ValueError):
    """An adapter folder that cannot become rank-wise experts; the message names the file and the problem."""


def _shown(value, limit=60) -> str:
    """repr of a value from the file, cut short (a hostile file may hold anything)."""
    text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _regex(path, key, pattern):
    if not isinstance(pattern, str) or not pattern:
        raise AdapterError(f"{path}: {key} must hold non-empty strings (regular expressions), got {_shown(pattern)}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise AdapterError(f"{path}: {key} {_shown(pattern)} is not a valid regular expression ({error})") from None
    except RecursionError:
        raise AdapterError(f"{path}: {key} {_shown(pattern)} nests too deeply to compile") from None


def _number(path, key, value, *, integer=False, minimum=0.0, maximum):
    """A number > ``minimum`` (an int >= 1 when ``integer``) and <= ``maximum``."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise AdapterError(f"{path}: {key} must be {'an integer' if integer else 'a number'}, got {_shown(value)}")
    if isinstance(value, int) and abs(value) > maximum:
        raise AdapterError(f"{path}: {key} must be at most {maximum:g}, got an integer of {value.bit_length()} bits")
    if not math.isfinite(value) or not value > minimum or value > maximum:
        raise AdapterError(f"{path}: {key} must be a finite number in ({minimum:g}, {maximum:g}], got {value!r}")
    return value


def _names(path, key, value, *, optional=True):
    """None, a regex string (matched against whole module names) or a list of names."""
    if value is None and optional:
        return
    if isinstance(value, str):
        _regex(path, key, value)
        return
    if not isinstance(value, list) or not all(isinstance(entry, str) and entry for entry in value):
        raise AdapterError(f"{path}: {key} must be null, a regular expression or a list of module names, got "
                           f"{json.dumps(value)[:80]}")


def _patterns(path, key, value, *, integer, maximum):
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: {key} must be a JSON object, got {_shown(value)}")
    if len(value) > MAX_PATTERN_ENTRIES:
        raise AdapterError(f"{path}: {key} has {len(value)} entries, more than {MAX_PATTERN_ENTRIES}")
    for pattern, number in value.items():
        _regex(path, key, pattern)
        _number(path, f"{key}[{_shown(pattern)}]", number, integer=integer, maximum=maximum)


def _of_type(path, key, value, kinds, expected):
    if value is not None and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
        raise AdapterError(f"{path}: {key} must be {expected}, got {_shown(value)}")


def _check_fields(config: dict, path: Path) -> None:
    """Type- and range-check every field peft's LoraConfig accepts (others are refused by
    :func:`_refuse_variants` when set)."""
    _number(path, "r", config.get("r"), integer=True, maximum=MAX_RANK)
    _number(path, "lora_alpha", config.get("lora_alpha"), maximum=MAX_LORA_ALPHA)
    _names(path, "target_modules", config.get("target_modules"))
    _names(path, "exclude_modules", config.get("exclude_modules"))
    _patterns(path, "rank_pattern", config.get("rank_pattern") or {}, integer=True, maximum=MAX_RANK)
    _patterns(path, "alpha_pattern", config.get("alpha_pattern") or {}, integer=False, maximum=MAX_LORA_ALPHA)
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise AdapterError(f"{path}: lora_dropout must be a number in [0, 1], got {_shown(dropout)}")
    for key in ("fan_in_fan_out", "use_rslora", "inference_mode", "ensure_weight_tying"):
        if not isinstance(config.get(key, False), bool):
            raise AdapterError(f"{path}: {key} must be true or false, got {_shown(config[key])}")
    _of_type(path, "init_lora_weights", config.get("init_lora_weights"), (bool, str), "true, false or a string")
    for key in ("task_type", "peft_version", "base_model_name_or_path", "revision", "megatron_core"):
        _of_type(path, key, config.get(key), (str,), "a string or null")
    for key in ("auto_mapping", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
                "velora_config", "monteclora_config"):
        _of_type(path, key, config.get(key), (dict,), "a JSON object or null")
    _of_type(path, "qalora_group_size", config.get("qalora_group_size"), (int,), "an integer or null")
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or isinstance(layers, list)
                                   and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise AdapterError(f"{path}: layers_to_transform must be null, an integer or a list of integers, got "
                           f"{_shown(layers)}")
    pattern = config.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or isinstance(pattern, list)
                                    and all(isinstance(x, str) for x in pattern)):
        raise AdapterError(f"{path}: layers_pattern must be null, a string or a list of strings, got "
                           f"{_shown(pattern)}")


def read_adapter_config(folder: Path) -> dict:
    """The checked ``adapter_config.json`` of the peft LoRA adapter ``folder``."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing {CONFIG_FILE} (expected a peft adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise AdapterError(f"{config_path}: not valid JSON ({' '.join(str(error).split())[:200]})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{config_path}: peft_type is {_shown(peft_type)}, expected 'LORA' "
            "(only LoRA adapters split into rank-wise experts)"
        )
    _refuse_variants(config, config_path)
    _check_fields(config, config_path)
    return config


def pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: first key matching a dotted suffix of the module."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_scale(path, module, alpha, rank, use_rslora) -> float:
    """alpha / r (alpha / sqrt(r) with rslora), refused unless finite and at most ``MAX_SCALE``."""
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    if not math.isfinite(scale) or not 0 < scale <= MAX_SCALE:
        raise AdapterError(f"{path}: module {module!r}: scale {scale!r} (lora_alpha {alpha!r} over rank {rank}) "
                           f"must be finite and in (0, {MAX_SCALE:g}]")
    return float(scale)


def _refuse_variants(config: dict, config_path: Path) -> None:
    """Raise on any LoRA variant whose forward MoRE's rank-wise experts do not reproduce."""
    for key, (is_set, reason, expected) in REFUSED_CONFIG_FIELDS.items():
        value = config.get(key)
        if is_set(value):
            raise AdapterError(f"{config_path}: {key} is {json.dumps(value)}, expected {expected}; "
                               f"MoRE cannot reproduce this LoRA variant ({reason})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise AdapterError(
            f"{config_path}: init_lora_weights is {init!r}, expected true, false or a plain initialisation; this "
            "initialisation changed the base weights, so the adapter fits only that modified base (re-save it as "
            "a plain LoRA with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    unknown = sorted(key for key, value in config.items()
                     if key not in NEUTRAL_CONFIG_FIELDS and key not in REFUSED_CONFIG_FIELDS
                     and value not in (None, False, "", [], {}))
    if unknown:
        raise AdapterError(
            f"{config_path}: unknown LoraConfig fields {unknown} are set, expected them unset or absent; "
            "SmartFed cannot tell whether they change the LoRA forward (remove them only if they do not)"
        )
