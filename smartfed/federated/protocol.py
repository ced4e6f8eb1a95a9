"""The two messages of a round and their wire form (smartfed.federated.serialization).

Server -> client: ``ClientInstructions`` (global trainable state, the client's quotas, the local
training settings, the client's derived seed). Client -> server: ``ClientResult`` (trained state,
number of examples, importance statistics, metrics). Tensors travel in the wire dtype; the rest is
JSON, and all of it is counted.
"""

from dataclasses import dataclass, field
from typing import Optional

from smartfed.federated.serialization import decode_payload, encode_payload


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


def encode_instructions(instructions: ClientInstructions, wire_dtype):
    return encode_payload(instructions.state, instructions.settings(), wire_dtype)


def decode_instructions(data) -> ClientInstructions:
    state, meta = decode_payload(data)
    return ClientInstructions(state=state, **meta)


def encode_result(result: ClientResult, wire_dtype):
    meta = {"num_examples": result.num_examples, "importance": result.importance, "metrics": result.metrics}
    return encode_payload(result.state, meta, wire_dtype)


def decode_result(data) -> ClientResult:
    state, meta = decode_payload(data)
    return ClientResult(state=state, num_examples=meta["num_examples"], importance=meta["importance"],
                        metrics=meta["metrics"])
