"""One client of the federation as message handlers: a Flower message in, its reply out.

The Flower ``ClientApp`` (``smartfed.experiments.flower_apps``) and the in-process grid
(``smartfed.federated.grid``) both call these handlers, so a client computes the same reply
whatever carried the message. A handler that raises is the transport's to report: both turn the
exception into an error reply, which the strategy drops with its reason.

- query (once per run): the setup handshake. The server sends the run configuration (JSON, for
  ClientApps that build themselves from it); the client answers its partition and the
  fingerprint of its pool, which must be the server's.
- train: ``ClientTrainer.train`` on this client's partition.
- evaluate: loss and accuracy of the received state and quotas on this client's partition.

A train message may carry an ``INJECTED`` record, put there by the fault harness
(``smartfed.federated.faults``): a wall-clock limit that replaces ``federation.client_timeout_s``
(``time-limit-s``), or a wait before training (``delay-s``, taken in short slices so that the
in-process grid can cancel an abandoned step).
"""

import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from smartfed.federated.messages import (
    NUM_EXAMPLES,
    content_to_evaluation,
    content_to_instructions,
    result_to_content,
)
from smartfed.federated.protocol import (
    CONFIG_JSON,
    INJECTED,
    INJECTED_DELAY_S,
    INJECTED_TIME_LIMIT_S,
    NODE,
    NUM_PARTITIONS,
    PARTITION_ID,
    POOL,
    POOL_FINGERPRINT,
    RUN_CONFIG,
    setup_config_json,
    setup_content,
)
from smartfed.federated.secagg import is_secure, secure_train

__all__ = [
    "CONFIG_JSON", "INJECTED", "INJECTED_DELAY_S", "INJECTED_TIME_LIMIT_S", "NODE", "NUM_PARTITIONS", "PARTITION_ID",
    "POOL", "POOL_FINGERPRINT", "RUN_CONFIG", "FederatedClient", "pause", "setup_config_json", "setup_content",
]
PAUSE_SLICE_S = 0.05
# What a client's evaluation reply carries (besides its example count); perplexity: instruction tasks.
CLIENT_SCORES = ("loss", "accuracy", "perplexity")


def pause(seconds) -> None:
    """Sleep ``seconds`` in slices, so that an exception raised into this thread lands promptly."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, PAUSE_SLICE_S))



class FederatedClient:
    """The handlers of every client of one run: the trainer, the clients' examples (``data``,
    a ``FederatedData``) and the run's ``config`` (federation and communication settings)."""

    def __init__(self, trainer, data, config, *, contexts=None):
        self.trainer = trainer
        self.data = data
        self.config = config
        self.names = sorted(trainer.initial_state())  # the trainable tensors, as SecAgg+ orders them
        # partition id -> the Context of that in-process node (its SecAgg+ state between stages)
        self.contexts = {} if contexts is None else contexts

    def replica(self) -> "FederatedClient":
        """The same clients on their own copy of the model (``ClientTrainer.replica``)."""
        return FederatedClient(self.trainer.replica(), self.data, self.config, contexts=self.contexts)

    def handle(self, msg: Message, partition_id) -> Message:
        """The reply of client ``partition_id`` to ``msg``, by its message type."""
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return self.setup(msg, partition_id)
        if kind == MessageType.TRAIN:
            return self.train(msg, partition_id)
        if kind == MessageType.EVALUATE:
            return self.evaluate(msg, partition_id)
        raise ValueError(f"a SmartFed client answers query, train and evaluate messages, not {kind!r}")

    def setup(self, msg: Message, partition_id) -> Message:
        reply = RecordDict({
            NODE: MetricRecord({PARTITION_ID: int(partition_id), NUM_PARTITIONS: self.config.federation.num_clients,
                                NUM_EXAMPLES: self.claimed(len(self.data.clients[partition_id]))}),
            POOL: ConfigRecord({POOL_FINGERPRINT: self.trainer.pool_fingerprint}),
        })
        return Message(reply, reply_to=msg)

    def claimed(self, count) -> int:
        """The example count this client reports: its own, capped where the clients hold their
        data at ``robustness.max_claimed_examples``, the most the server weights any client by (so
        an honest large client is not flagged every round, and under SecAgg+, where the client
        weights its own update inside the sum, is not refused)."""
        if self.config.task.clients_hold_their_data:
            return min(count, self.config.robustness.max_claimed_examples)
        return count

    def _train(self, instructions, examples, limit):
        result = self.trainer.train(instructions, examples, time_limit_s=limit)
        return replace(result, num_examples=self.claimed(result.num_examples))

    def train(self, msg: Message, partition_id, *, context=None) -> Message:
        """The reply to a train message, or to a stage of SecAgg+ (``context``: the node's
        Flower context, which keeps the protocol's state; in-process, ``contexts``)."""
        examples = self.data.clients[partition_id]
        limit = self.config.federation.client_timeout_s
        injected = msg.content.config_records.get(INJECTED)
        if injected is not None:
            del msg.content[INJECTED]
            limit = injected.get(INJECTED_TIME_LIMIT_S, limit)
            pause(injected.get(INJECTED_DELAY_S, 0.0))
        if is_secure(msg):
            if context is None:
                context = self.contexts.setdefault(partition_id, Context(
                    run_id=0, node_id=int(partition_id), node_config={}, state=RecordDict(), run_config={}
                ))
            return secure_train(
                msg, context, names=self.names,
                train=lambda instructions: self._train(instructions, examples, limit),
            )
        result = self._train(content_to_instructions(msg.content), examples, limit)
        return Message(result_to_content(result, self.config.communication.wire_dtype), reply_to=msg)

    def evaluate(self, msg: Message, partition_id) -> Message:
        state, quotas = content_to_evaluation(msg.content)
        scores = self.trainer.evaluate(
            state, quotas, self.data.client_evaluation(partition_id), batch_size=self.config.federation.eval_batch_size
        )
        metrics = MetricRecord({NUM_EXAMPLES: scores["num_examples"],
                                **{key: scores[key] for key in CLIENT_SCORES if key in scores}})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)
