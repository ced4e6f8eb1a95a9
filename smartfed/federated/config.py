"""Run configuration of a federated experiment: nested dataclasses loaded from YAML and validated.

Every section is optional in the YAML file; unknown keys are errors (a typo must not silently
fall back to a default). ``load_config(path)`` / ``config_from_dict(data)`` build and validate a
``RunConfig``; ``config_to_dict`` gives the plain dict back (stored in checkpoints so a resumed run
can refuse a changed configuration).
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

METHODS = ("smartfed", "fedit", "ffa_lora", "adapter_mixture", "linear_merge")
ROUTER_FORMS = ("linear", "expert_space")
GATES = ("topk_softmax", "softmax_topk")
ROUTER_INITS = ("zeros", "normal", "affinity")
WIRE_DTYPES = ("fp32", "bf16")
PARTITIONS = ("dirichlet", "iid")
IMPORTANCE_METRICS = ("cosine", "magnitude", "gradient")
FAULT_KINDS = ("raise", "nan", "shape", "timeout")


SYNTHETIC_TASK = "synthetic"


@dataclass
class ModelConfig:
    """The frozen base model: a tiny random Llama built from ``tiny`` (LlamaConfig keyword
    arguments) and ``seed``, or a pretrained directory (``pretrained``, optional ``gguf_file``)."""

    tiny: Optional[dict] = field(default_factory=lambda: {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 64,
    })
    pretrained: Optional[str] = None
    gguf_file: Optional[str] = None


@dataclass
class TaskConfig:
    """The target task. ``name="synthetic"`` (default): the synthetic classification task of
    smartfed.federated.data, sequences of ``seq_len`` content tokens whose label is shown by
    ``signals_per_example`` signal tokens (the fields below). Any other ``name`` is a text task of
    smartfed.tasks (e.g. ``bbc_news``, ``skills_target``) built with ``options`` as its keyword
    arguments and the tokenizer of ``model.pretrained``; the synthetic fields are then unused."""

    name: str = SYNTHETIC_TASK
    options: dict = field(default_factory=dict)
    num_labels: int = 4
    seq_len: int = 12
    signal_tokens_per_class: int = 2
    signals_per_example: int = 3
    train_examples: int = 512
    eval_examples: int = 128


@dataclass
class PoolConfig:
    """The public LoRA pool: one peft adapter per source task, trained once and cached."""

    cache_dir: Optional[str] = None
    source_tasks: int = 3
    rank: int = 4
    lora_alpha: float = 8.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    train_steps: int = 40
    lr: float = 1e-2
    batch_size: int = 32
    paths: Optional[list] = None


@dataclass
class MoREOptions:
    """MoRE layers of the "smartfed" method (smartfed.MoREConfig); ``gamma`` null means k."""

    top_k: int = 4
    router: str = "linear"
    gate: str = "topk_softmax"
    router_init: str = "normal"
    router_bias: bool = True
    gamma: Optional[float] = None
    backend: str = "auto"


@dataclass
class EEQAConfig:
    enabled: bool = True
    every_rounds: int = 2
    ema: float = 0.5
    importance: str = "cosine"
    # Measure delta / gamma (see smartfed.eeqa.importance): the plain delta grows with the quota.
    per_expert: bool = True
    total_budget: Optional[int] = None
    # With top-k softmax gates a matrix at k = 1 has a constant gate of 1: its router gets no gradient.
    k_min: int = 2
    tau: float = 1.0
    client_budgets: dict = field(default_factory=dict)


@dataclass
class FederationConfig:
    num_clients: int = 4
    rounds: int = 3
    fraction: float = 1.0
    min_clients: int = 2
    partition: str = "dirichlet"
    alpha: float = 0.5
    min_examples_per_client: int = 8
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.0
    fedprox_mu: float = 0.0
    client_timeout_s: Optional[float] = None
    max_retries: int = 1
    eval_batch_size: int = 64


@dataclass
class CommunicationConfig:
    wire_dtype: str = "fp32"


@dataclass
class BaselineConfig:
    """Settings of the baselines (smartfed.baselines): rank of the LoRA that FedIT and FFA-LoRA
    train from scratch on the pool's target modules."""

    lora_rank: int = 4
    lora_alpha: float = 8.0


@dataclass
class RunConfig:
    seed: int = 0
    method: str = "smartfed"
    # The name reports give this run (an ablation of a method); None: the method's own name.
    label: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    more: MoREOptions = field(default_factory=MoREOptions)
    eeqa: EEQAConfig = field(default_factory=EEQAConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    # {round: {client_id: kind}}: injected client faults, for tests of the fault handling.
    faults: dict = field(default_factory=dict)


def _require(condition, message):
    if not condition:
        raise ValueError(message)


def _check_choice(name, value, choices):
    _require(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive_int(name, value, minimum=1):
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an int >= {minimum}, got {value!r}",
    )


def _build_section(cls, data, section):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"config section {section!r} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _require(not unknown, f"unknown key(s) {unknown} in config section {section!r}; expected some of {sorted(names)}")
    return cls(**data)


def _normalise_faults(faults):
    if not isinstance(faults, dict):
        raise ValueError(f"faults must be a mapping round -> {{client_id: kind}}, got {type(faults).__name__}")
    normalised = {}
    for round_key, per_client in faults.items():
        _require(
            isinstance(per_client, dict),
            f"faults[{round_key!r}] must be a mapping client_id -> kind, got {per_client!r}",
        )
        round_index = int(round_key)
        normalised[round_index] = {}
        for client_key, kind in per_client.items():
            _check_choice(f"faults[{round_key}][{client_key}]", kind, FAULT_KINDS)
            normalised[round_index][int(client_key)] = kind
    return normalised


def validate_config(config: RunConfig) -> RunConfig:
    """Check ranges and choices; return the config (faults and budgets with int keys)."""
    _check_choice("method", config.method, METHODS)
    model = config.model
    _require(
        (model.tiny is None) != (model.pretrained is None),
        "model needs exactly one of 'tiny' (LlamaConfig arguments) or 'pretrained' (a directory)",
    )
    task = config.task
    _require(isinstance(task.options, dict), f"task.options must be a mapping, got {task.options!r}")
    if task.name != SYNTHETIC_TASK:
        from smartfed.tasks import TASK_BUILDERS

        _check_choice("task.name", task.name, (SYNTHETIC_TASK, *TASK_BUILDERS))
        _require(model.pretrained is not None,
                 f"task.name={task.name!r} is a text task: model.pretrained must name a folder with a tokenizer")
    _check_positive_int("task.num_labels", task.num_labels, 2)
    _check_positive_int("task.seq_len", task.seq_len, 2)
    _check_positive_int("task.signal_tokens_per_class", task.signal_tokens_per_class)
    _check_positive_int("task.signals_per_example", task.signals_per_example)
    _require(
        task.signals_per_example <= task.seq_len,
        f"task.signals_per_example ({task.signals_per_example}) must be <= task.seq_len ({task.seq_len})",
    )
    _check_positive_int("task.train_examples", task.train_examples)
    _check_positive_int("task.eval_examples", task.eval_examples)
    pool = config.pool
    _check_positive_int("pool.source_tasks", pool.source_tasks)
    _check_positive_int("pool.rank", pool.rank)
    _check_positive_int("pool.train_steps", pool.train_steps, 0)
    _require(
        isinstance(pool.target_modules, list) and pool.target_modules,
        f"pool.target_modules must be a non-empty list of module names, got {pool.target_modules!r}",
    )
    more = config.more
    _check_positive_int("more.top_k", more.top_k)
    _check_choice("more.router", more.router, ROUTER_FORMS)
    _check_choice("more.gate", more.gate, GATES)
    _check_choice("more.router_init", more.router_init, ROUTER_INITS)
    _require(more.gamma is None or more.gamma > 0, f"more.gamma must be null or > 0, got {more.gamma!r}")
    eeqa = config.eeqa
    _check_positive_int("eeqa.every_rounds", eeqa.every_rounds)
    _require(0.0 <= eeqa.ema < 1.0, f"eeqa.ema must lie in [0, 1), got {eeqa.ema!r}")
    _check_choice("eeqa.importance", eeqa.importance, IMPORTANCE_METRICS)
    if eeqa.total_budget is not None:
        _check_positive_int("eeqa.total_budget", eeqa.total_budget)
    _check_positive_int("eeqa.k_min", eeqa.k_min)
    _require(isinstance(eeqa.per_expert, bool), f"eeqa.per_expert must be true or false, got {eeqa.per_expert!r}")
    _require(
        isinstance(eeqa.client_budgets, dict),
        f"eeqa.client_budgets must be a mapping client_id -> fraction, got {eeqa.client_budgets!r}",
    )
    eeqa.client_budgets = {int(key): float(value) for key, value in eeqa.client_budgets.items()}
    for client_id, fraction in eeqa.client_budgets.items():
        _require(0 < fraction <= 1, f"eeqa.client_budgets[{client_id}] must lie in (0, 1], got {fraction}")
    fed = config.federation
    _check_positive_int("federation.num_clients", fed.num_clients)
    _check_positive_int("federation.rounds", fed.rounds)
    _require(0 < fed.fraction <= 1, f"federation.fraction must lie in (0, 1], got {fed.fraction!r}")
    _check_positive_int("federation.min_clients", fed.min_clients)
    _require(
        fed.min_clients <= fed.num_clients,
        f"federation.min_clients ({fed.min_clients}) must be <= federation.num_clients ({fed.num_clients})",
    )
    _check_choice("federation.partition", fed.partition, PARTITIONS)
    _require(fed.alpha > 0, f"federation.alpha must be > 0, got {fed.alpha!r}")
    _check_positive_int("federation.min_examples_per_client", fed.min_examples_per_client)
    _require(
        fed.min_examples_per_client * fed.num_clients <= task.train_examples,
        f"federation.min_examples_per_client * num_clients = {fed.min_examples_per_client * fed.num_clients} "
        f"exceeds task.train_examples = {task.train_examples}",
    )
    _check_positive_int("federation.local_steps", fed.local_steps)
    _check_positive_int("federation.batch_size", fed.batch_size)
    _require(fed.lr > 0, f"federation.lr must be > 0, got {fed.lr!r}")
    _require(fed.fedprox_mu >= 0, f"federation.fedprox_mu must be >= 0, got {fed.fedprox_mu!r}")
    _require(
        fed.client_timeout_s is None or fed.client_timeout_s > 0,
        f"federation.client_timeout_s must be null or > 0, got {fed.client_timeout_s!r}",
    )
    _check_positive_int("federation.max_retries", fed.max_retries, 0)
    _check_positive_int("federation.eval_batch_size", fed.eval_batch_size)
    _check_choice("communication.wire_dtype", config.communication.wire_dtype, WIRE_DTYPES)
    _check_positive_int("baseline.lora_rank", config.baseline.lora_rank)
    config.faults = _normalise_faults(config.faults)
    return config


SECTIONS = {
    "model": ModelConfig, "task": TaskConfig, "pool": PoolConfig, "more": MoREOptions,
    "eeqa": EEQAConfig, "federation": FederationConfig, "communication": CommunicationConfig,
    "baseline": BaselineConfig,
}


def config_from_dict(data: Optional[dict]) -> RunConfig:
    data = dict(data or {})
    top_level = {"seed", "method", "label", "faults", *SECTIONS}
    unknown = sorted(set(data) - top_level)
    _require(not unknown, f"unknown top-level config key(s) {unknown}; expected some of {sorted(top_level)}")
    sections = {name: _build_section(cls, data.get(name), name) for name, cls in SECTIONS.items()}
    config = RunConfig(
        seed=data.get("seed", 0), method=data.get("method", "smartfed"), label=data.get("label"),
        faults=data.get("faults") or {}, **sections,
    )
    _check_positive_int("seed", config.seed, 0)
    _require(
        config.label is None or (isinstance(config.label, str) and config.label.strip()),
        f"label must be a non-empty string or null, got {config.label!r}",
    )
    return validate_config(config)


def load_config(path) -> RunConfig:
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return config_from_dict(data)


def config_to_dict(config: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def with_overrides(config: RunConfig, **sections: Union[dict, Any]) -> RunConfig:
    """A validated copy with some values replaced: ``with_overrides(c, federation={"rounds": 2},
    method="fedit")``."""
    data = config_to_dict(config)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "faults":
            data[key].update(value)
        else:
            data[key] = value
    return config_from_dict(data)


RESUMABLE_CHANGES = (
    "federation.rounds", "federation.max_retries", "federation.client_timeout_s", "faults", "pool.cache_dir", "label",
)


def config_fingerprint(config: RunConfig, *, ignore=RESUMABLE_CHANGES) -> str:
    """Hash of the configuration minus what may change across a resume without changing the
    result of a completed round (number of rounds, retry and timeout policy, injected faults,
    where the pool is cached: the pool itself is checked by its own fingerprint; the report label)."""
    data = config_to_dict(config)
    for dotted in ignore:
        node = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
