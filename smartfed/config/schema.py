"""The schema of one run (``RunConfig``) and its sections.

Every mapping forbids unknown keys at every depth; choices are ``Literal``s over the one tuple
that names them (smartfed.config.vocabularies); numbers are finite and every size or count is
bounded (smartfed.config.limits); values keep their YAML type (``lr: "1e-2"`` is a string, not a
number). ``RunConfig.deferred_checks`` holds the one check that imports a library (``model.tiny``
against transformers' LlamaConfig); smartfed.config.validation.validate runs it last.
"""

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, PlainValidator, field_validator, model_validator

from smartfed.choices import MAX_TOP_K
from smartfed.config.data import DataSection
from smartfed.config.errors import ConfigError, describe
from smartfed.config.limits import (
    MAX_ADAPTERS, MAX_ATTACK_PARAM, MAX_BATCH, MAX_CLIENTS, MAX_EXAMPLES, MAX_LABELS, MAX_LORA_ALPHA,
    MAX_QUOTA_BUDGET, MAX_RANK, MAX_RETRIES, MAX_ROUNDS, MAX_SEED, MAX_SEQ_LEN, MAX_SOURCE_TASKS, MAX_STEPS,
    MAX_TASK_TOKENS, MAX_TIMEOUT_S,
)
from smartfed.config.llama import DEFAULT_TINY, check_llama_arguments, check_tiny_sizes
from smartfed.config.more import MoRESection
from smartfed.config.number_types import (
    Fraction, IntKey, NonEmptyStr, NonNegative, Positive, Section, count, number,
)
from smartfed.config.vocabularies import (
    AGGREGATORS, ATTACK_PARAMS, ESTIMATORS, EXAMPLE_COUNTS, FAULT_KINDS, IMPORTANCE_AGGREGATIONS, METHODS,
    NORM_BOUND_MODES, PARTITIONS, SYNTHETIC_TASK, WIRE_DTYPES,
)


def _fault_kind(value):
    """A fault kind, or an attack with its parameter ("<name>:<number>", finite, > 0, at most
    ``MAX_ATTACK_PARAM``)."""
    if value in FAULT_KINDS:
        return value
    name, colon, param = value.partition(":") if isinstance(value, str) else ("", "", "")
    needs = ATTACK_PARAMS.get(name, "unknown")
    if needs == "unknown" or (needs is None and colon) or (needs and not param):
        forms = {True: "{}:<number>", False: "{}[:<number>]", None: "{}"}
        attacks = ", ".join(forms[required].format(attack) for attack, required in ATTACK_PARAMS.items())
        raise ConfigError(f"must be one of {', '.join(map(repr, FAULT_KINDS))} or an attack {attacks}, "
                          f"got {describe(value)}")
    if param:
        try:
            number = float(param)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and 0 < number <= MAX_ATTACK_PARAM):
            raise ConfigError(f"the parameter of attack {name!r} must be a finite number in "
                              f"(0, {MAX_ATTACK_PARAM}], got {param!r}")
    return value


FaultKind = Annotated[str, PlainValidator(_fault_kind)]


def _is_attack(kind) -> bool:
    return kind.partition(":")[0] in ATTACK_PARAMS


class ModelSection(Section):
    """The frozen base model: a tiny random Llama built from ``tiny`` (LlamaConfig keyword
    arguments: sizes bounded here, names checked against its signature by ``deferred_checks``)
    or a pretrained folder (``pretrained``, optional ``gguf_file``)."""

    tiny: Optional[dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_TINY))
    pretrained: Optional[NonEmptyStr] = None
    gguf_file: Optional[NonEmptyStr] = None

    @field_validator("tiny")
    @classmethod
    def _tiny_sizes(cls, tiny):
        if tiny is not None:
            check_tiny_sizes(tiny)
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
    tokenizer of ``model.pretrained``; the synthetic fields are then unused. ``data`` instead
    reads the task from the user's own files (``smartfed.config.data``, docs/data.md).
    ``validation_fraction`` of the training examples (any task) are held out, before the client
    partition, as a validation split for choosing settings; the test split is never touched."""

    name: NonEmptyStr = SYNTHETIC_TASK
    options: dict[str, Any] = Field(default_factory=dict)
    num_labels: count(2, MAX_LABELS) = 4
    seq_len: count(2, MAX_SEQ_LEN) = 12
    signal_tokens_per_class: count(1, MAX_LABELS) = 2
    signals_per_example: count(1, MAX_SEQ_LEN) = 3
    train_examples: count(1, MAX_EXAMPLES) = 512
    eval_examples: count(1, MAX_EXAMPLES) = 128
    validation_fraction: number(ge=0, lt=0.5) = 0.0
    data: Optional[DataSection] = None

    @property
    def clients_hold_their_data(self) -> bool:
        """Each client reads its own data (a SuperNode's ``data-path``): ``data`` names no
        training file."""
        return self.data is not None and self.data.train is None

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
        if self.data is not None and (self.name != SYNTHETIC_TASK or self.options):
            raise ConfigError(f"reads the task from files, but task.name ({self.name!r}) or task.options name "
                              "another task: leave them out", key="data")
        tokens = (self.train_examples + self.eval_examples) * self.seq_len
        if self.name == SYNTHETIC_TASK and self.data is None and tokens > MAX_TASK_TOKENS:
            raise ConfigError(f"(train_examples + eval_examples) x seq_len is {tokens} tokens, more than "
                              f"{MAX_TASK_TOKENS}", key="seq_len")
        return self


class PoolSection(Section):
    """The public LoRA pool: ``paths`` (peft adapter folders, e.g. built by ``smartfed
    build-pool``) or, when null, one adapter per synthetic source task, trained once and cached."""

    cache_dir: Optional[NonEmptyStr] = None
    source_tasks: count(1, MAX_SOURCE_TASKS) = 3
    rank: count(1, MAX_RANK) = 4
    lora_alpha: number(gt=0, le=MAX_LORA_ALPHA) = 8.0
    target_modules: Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "v_proj"])
    train_steps: count(0, MAX_STEPS) = 40
    lr: Positive = 1e-2
    batch_size: count(1, MAX_BATCH) = 32
    paths: Optional[Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_ADAPTERS)]] = None


class EEQASection(Section):
    enabled: bool = True
    every_rounds: count(1, MAX_ROUNDS) = 2
    ema: number(ge=0, lt=1) = 0.5
    importance: Literal[ESTIMATORS] = "cosine"
    # Measure delta / gamma (see smartfed.eeqa.importance): the plain delta grows with the quota.
    per_expert: bool = True
    total_budget: Optional[count(1, MAX_QUOTA_BUDGET)] = None
    # With top-k softmax gates a matrix at k = 1 has a constant gate of 1: its router gets no gradient.
    k_min: count(1, MAX_TOP_K) = 2
    tau: number(gt=0, le=1e6) = 1.0
    # client id -> share of the quota budget that client can afford
    client_budgets: dict[IntKey, Fraction] = Field(default_factory=dict)


class FederationSection(Section):
    num_clients: count(1, MAX_CLIENTS) = 4
    rounds: count(1, MAX_ROUNDS) = 3
    fraction: Fraction = 1.0
    min_clients: count(1, MAX_CLIENTS) = 2
    partition: Literal[PARTITIONS] = "dirichlet"
    alpha: number(gt=0, le=1e6) = 0.5
    min_examples_per_client: count(1, MAX_EXAMPLES) = 8
    local_steps: count(1, MAX_STEPS) = 5
    batch_size: count(1, MAX_BATCH) = 16
    lr: Positive = 1e-2
    weight_decay: NonNegative = 0.0
    fedprox_mu: NonNegative = 0.0
    client_timeout_s: Optional[number(gt=0, le=MAX_TIMEOUT_S)] = None
    max_retries: count(0, MAX_RETRIES) = 1
    eval_batch_size: count(1, MAX_BATCH) = 64
    # The server scores its test split at rounds divisible by this and at the last round (the
    # validation split, which chooses the settings, every round): scoring a large test split is
    # most of a round's time on a CPU, and the target ("FedIT's final accuracy within a third of
    # its rounds") needs only the rounds it names. A round without a test score records null.
    test_every_rounds: count(1, MAX_ROUNDS) = 1

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
    multiple: number(ge=1, le=1e6) = 3.0
    max_norm: Optional[number(gt=0, le=1e12)] = None


class RobustnessSection(Section):
    """Server-side defences against faulty or hostile clients (smartfed.federated.robust).

    ``aggregator``: "fedavg"; "filtered_mean" (updates pointing away from the coordinate-wise
    median are dropped, the rest clipped to their median norm and averaged with partition weights
    capped at their median); "filtered_mean_root" (the same around the server's own update on
    the ``root_examples`` training examples it holds back: FLTrust-style); or Flower's
    FedTrimmedAvg (cutting ``trim_fraction`` at each end), FedMedian, Krum / MultiKrum (assuming
    ``krum_malicious`` hostile clients; multi-Krum averages ``multi_krum_select`` of them).
    ``example_counts``: "partition" weights every client by the size of the partition the server
    assigned it, "claimed" by its own claim (no defence: for ablations); where each client holds
    its own data, "partition" is the count its node declared at setup, capped at
    ``max_claimed_examples``. ``importance``: how the
    clients' EEQA importance means combine, after each is clipped to ``importance_clip`` times the
    round's median per module ("mean": the token-weighted mean of the raw statistics, no clipping)."""

    aggregator: Literal[AGGREGATORS] = "fedavg"
    # Flower cuts int(trim_fraction * clients) at each end: 0.25 still cuts one of four clients.
    trim_fraction: number(ge=0, lt=0.5) = 0.25
    krum_malicious: count(0, MAX_CLIENTS) = 1
    multi_krum_select: count(1, MAX_CLIENTS) = 2
    norm_bound: NormBoundSection = Field(default_factory=NormBoundSection)
    example_counts: Literal[EXAMPLE_COUNTS] = "partition"
    importance: Literal[IMPORTANCE_AGGREGATIONS] = "median"
    importance_clip: number(ge=1, le=1e6) = 3.0
    # Where each client holds its own data (task.data without train) the server cannot count a
    # client's examples: it weights each by the count its node declared at setup, capped here.
    max_claimed_examples: count(1, MAX_EXAMPLES) = 1000
    # Training examples held out (after task.validation_fraction) as the server's root set.
    root_examples: count(0, MAX_EXAMPLES) = 0

    @model_validator(mode="after")
    def _a_root_set_for_the_root_centre_only(self):
        if self.aggregator == "filtered_mean_root" and self.root_examples == 0:
            raise ConfigError("must be > 0 with aggregator 'filtered_mean_root' (the server's root set)",
                              key="root_examples")
        if self.aggregator != "filtered_mean_root" and self.root_examples > 0:
            raise ConfigError(f"must be 0 unless aggregator is 'filtered_mean_root' (only it uses the server's "
                              f"root set, which the clients would lose), got {self.root_examples}",
                              key="root_examples")
        return self


class DifferentialPrivacySection(Section):
    """Central differential privacy of the router updates (smartfed.federated.privacy): each
    update clipped to ``clipping_norm``, the unweighted mean noised with a Gaussian of standard
    deviation ``noise_multiplier * clipping_norm / clients``; epsilon is reported at ``target_delta``."""

    enabled: bool = False
    clipping_norm: number(gt=0, le=1e6) = 1.0
    noise_multiplier: number(ge=0, le=1e6) = 1.0
    target_delta: number(gt=0, lt=1) = 1e-5


class SecureAggregationSection(Section):
    """Flower's SecAgg+ for the router updates (smartfed.federated.secagg): the server sees only
    the weighted sum of the clients' updates. Each client shares its masks with
    ``share_fraction`` of the sampled clients, ``threshold_fraction`` of those must stay to
    unmask, every update value is clipped to +-``clipping_range`` and quantized into
    ``quantization_range`` levels."""

    enabled: bool = False
    share_fraction: Fraction = 1.0
    threshold_fraction: Fraction = 0.7
    clipping_range: number(gt=0, le=1e6) = 8.0
    quantization_range: Annotated[int, Field(ge=2**8, le=2**24)] = 2**22


class PrivacySection(Section):
    dp: DifferentialPrivacySection = Field(default_factory=DifferentialPrivacySection)
    secagg: SecureAggregationSection = Field(default_factory=SecureAggregationSection)


class BaselineSection(Section):
    """Settings of the baselines (smartfed.baselines): rank of the LoRA that FedIT and FFA-LoRA
    train from scratch on the pool's target modules."""

    lora_rank: count(1, MAX_RANK) = 4
    lora_alpha: number(gt=0, le=MAX_LORA_ALPHA) = 8.0


class RunConfig(Section):
    """One federated run: ``method`` on ``task`` with ``model`` and ``pool``, over ``federation``."""

    seed: count(0, MAX_SEED) = 0
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
    faults: dict[IntKey, dict[IntKey, FaultKind]] = Field(default_factory=dict)

    def deferred_checks(self) -> None:
        """The checks that import a library, run after every other check passed."""
        if self.model.tiny is not None:
            try:
                check_llama_arguments(self.model.tiny)
            except ConfigError as error:
                raise error.located(prefix="model.tiny") from None

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
            attacks = sorted({kind for kinds in self.faults.values() for kind in kinds.values() if _is_attack(kind)})
            if attacks:
                raise ConfigError(f"cannot hold Byzantine attacks with privacy.secagg.enabled (an attack rewrites "
                                  f"a client's update, which SecAgg+ masks on the client), got {attacks}",
                                  key="faults")
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
        if self.task.data is not None:
            return self._files_consistent()
        if self.federation.partition == "natural":
            raise ConfigError("'natural' splits a file task by task.data.partition_column; a built-in task is "
                              "split 'dirichlet' or 'iid'", key="federation.partition")
        needed = self.federation.min_examples_per_client * self.federation.num_clients
        held_out = self.task.validation_size(self.task.train_examples) + self.robustness.root_examples
        if needed > self.task.train_examples - held_out:
            left = (f" less the {held_out} of task.validation_fraction and robustness.root_examples"
                    if held_out else "")
            raise ConfigError(f"times federation.num_clients is {needed}, more than task.train_examples "
                              f"({self.task.train_examples}){left}", key="federation.min_examples_per_client")
        return self

    def _files_consistent(self):
        data = self.task.data
        if self.model.pretrained is None:
            raise ConfigError("task.data is tokenized by the model's tokenizer: model.pretrained must name a model "
                              "folder", key="model.pretrained")
        natural = self.federation.partition == "natural"
        if natural and data.partition_column is None:
            raise ConfigError("'natural' needs task.data.partition_column, the column naming each row's client",
                              key="federation.partition")
        if self.task.clients_hold_their_data and self.task.validation_fraction:
            raise ConfigError("holds validation examples out of one training file; with task.data.train null each "
                              "client holds its own data, which the server never sees", key="task.validation_fraction")
        if self.robustness.root_examples:
            raise ConfigError(f"must be 0 with task.data (the root set is held out of a built-in task's training "
                              f"examples), got {self.robustness.root_examples}", key="robustness.root_examples")
        return self
