"""The two messages of a round; ``smartfed.federated.messages`` gives their Flower records.

Server -> client: ``ClientInstructions`` (global trainable state, the client's quotas, the local
training settings, the client's derived seed). Client -> server: ``ClientResult`` (trained state,
number of examples, importance statistics, metrics).
"""

from dataclasses import dataclass, field
from typing import Optional


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

