"""The two messages of a round; ``smartfed.federated.messages`` gives their Flower records.

Server -> client: ``ClientInstructions`` (global trainable state, the client's quotas, the local
training settings, the client's derived seed). Client -> server: ``ClientResult`` (trained state,
number of examples, importance statistics, metrics).

Before the first round, the setup query (``setup_content``) carries the run configuration as JSON
and its reply the node's partition and example count (``NODE`` record) and pool fingerprint
(``POOL`` record). A
train message of the fault harness may carry an ``INJECTED`` record (``smartfed.federated.client``).
The names are torch-free, for the Flower ClientApp's light process (``smartfed.experiments``).
"""

from dataclasses import dataclass, field
from typing import Optional

from flwr.app import ConfigRecord, RecordDict

RUN_CONFIG = "run-config"
CONFIG_JSON = "json"
NODE = "node"
POOL = "pool"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
POOL_FINGERPRINT = "pool-fingerprint"
# Node config keys of a SuperNode whose client holds its own data (task.data.train null): its
# training file, and optionally its own held-out file.
DATA_PATH = "data-path"
EVAL_PATH = "eval-path"
INJECTED = "injected-fault"
INJECTED_TIME_LIMIT_S = "time-limit-s"
INJECTED_DELAY_S = "delay-s"


def setup_content(config_json: str) -> RecordDict:
    """The setup query's content: the run configuration as JSON."""
    return RecordDict({RUN_CONFIG: ConfigRecord({CONFIG_JSON: config_json})})


def setup_config_json(content: RecordDict) -> str:
    return content.config_records[RUN_CONFIG][CONFIG_JSON]


@dataclass
class ClientInstructions:
    round: int
    state: dict
    quotas: Optional[dict]
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    fedprox_mu: float = 0.0
    seed: int = 0

    def settings(self):
        return {
            "round": self.round, "quotas": self.quotas, "local_steps": self.local_steps,
            "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
            "fedprox_mu": self.fedprox_mu, "seed": self.seed,
        }


@dataclass
class ClientResult:
    state: dict
    num_examples: int
    importance: Optional[dict] = None  # ImportanceStats.to_dict()
    metrics: dict = field(default_factory=dict)

