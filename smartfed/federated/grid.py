"""``InProcessGrid``: a Flower ``Grid`` whose clients live in this process (the embedded
default: no Ray, no network, deterministic).

Each message is handed straight to the client handlers the Flower ClientApp uses
(``smartfed.federated.client.FederatedClient``), in the order sent; an exception becomes an
error reply, as the Flower runtime makes one of a ClientApp's exception. Client ``c`` is node
``NODE_ID_BASE + c``, so that node ids and client ids never pass for each other.

With ``client_timeout_s`` every train message runs in a worker thread that the grid waits on for
at most that long: a client step that hangs is cut there and answered as a timeout, and the run
goes on. A thread cannot be stopped, so an abandoned one must never share a model with anyone:
the clients train on their own replica of the model (``FederatedClient.replica``), never on the
server's, and an abandoned worker keeps the replica it had while the grid makes a fresh one from
the server's (idle) model. Whatever the abandoned worker computes later is discarded.

Faults for tests (``faults``: {round: {client_id: kind}}; the same fault hits every attempt of
that round's train messages) are injected here, on the client side of the transport: "raise"
raises inside the client, "timeout" gives the client a 0-second wall-clock limit so its check
fires after its first step, "hang" sleeps 1.25 times ``client_timeout_s`` before training (so that
the abandoned worker trains while later rounds run), "nan" and
"shape" corrupt the trained tensors before upload, "poison" uploads its update (trained minus
received state) times 1000 and claims 10**9 examples, "malformed" sends a reply whose metrics record holds only the
example count and whose ``loss`` is a string. Under SecAgg+ only the clear-text part of the
masked-update reply can be corrupted (``corrupt_secure_reply``); the other faults act the same.
"""

import copy
import threading
import time
from collections.abc import Iterable

import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from smartfed.federated.messages import (
    INFO,
    METRICS,
    NUM_EXAMPLES,
    STATE,
    record_to_state,
    state_to_record,
)
from smartfed.federated.trainer import ClientTimeout

NODE_ID_BASE = 1000
IN_PROCESS_RUN_ID = 1
POISON_SCALE = 1000.0
POISON_EXAMPLES = 10**9
HANG_FACTOR = 1.25
# Where a legacy FitRes record (SecAgg+ replies) keeps the example count and the metrics.
SECURE_EXAMPLES, SECURE_EXAMPLES_KEY, SECURE_METRICS = "fitres.num_examples", "num_examples", "fitres.metrics"


class InjectedFault(RuntimeError):
    """The failure a "raise" fault makes a client throw."""


def corrupt_state(state, kind):
    """The tensors a faulty client would upload: "nan" poisons one value, "shape" adds a row."""
    corrupted = dict(state)
    name = sorted(corrupted)[0]
    tensor = corrupted[name].clone()
    if kind == "nan":
        tensor.view(-1)[0] = float("nan")
    else:
        tensor = torch.cat([tensor, tensor[:1]], dim=0)
    corrupted[name] = tensor
    return corrupted


def poison_content(content: RecordDict, received: RecordDict, wire_dtype):
    """A "poison" fault's reply: the update (trained minus received state) times
    ``POISON_SCALE`` and a claim of ``POISON_EXAMPLES`` examples."""
    state = record_to_state(content.array_records[STATE])
    start = record_to_state(received.array_records[STATE])
    poisoned = {name: start[name] + POISON_SCALE * (tensor - start[name]) for name, tensor in state.items()}
    content[STATE] = state_to_record(poisoned, wire_dtype)
    content.metric_records[METRICS][NUM_EXAMPLES] = POISON_EXAMPLES


def malform_content(content: RecordDict):
    """A "malformed" fault's reply: no metrics but the example count, and a string ``loss``."""
    metrics = content.metric_records[METRICS]
    content[METRICS] = MetricRecord({NUM_EXAMPLES: metrics[NUM_EXAMPLES]})
    info = dict(content.config_records[INFO])
    info["loss"] = "low"
    content[INFO] = ConfigRecord(info)


def corrupt_secure_reply(content: RecordDict, kind):
    """A SecAgg+ masked-update reply with what a "poison" or "malformed" client can still change
    in the clear: its example count (10**9), or its metrics (only a string ``loss``). Its masked
    update is the honest one: the mod masks it before any fault could touch it."""
    if kind == "poison":
        content.metric_records[SECURE_EXAMPLES][SECURE_EXAMPLES_KEY] = POISON_EXAMPLES
    else:
        content[SECURE_METRICS] = ConfigRecord({"loss": "low"})


def error_reply(msg: Message, error: Exception) -> Message:
    """The reply the Flower runtime makes of a ClientApp's exception (same code, same reason format)."""
    reason = f"{type(error)}:<'{error}'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


class InProcessGrid(Grid):
    """The ``num_clients`` clients of ``client`` (a ``FederatedClient``) as nodes of a Grid;
    with ``client_timeout_s`` each train step is cut after that many seconds (see above)."""

    def __init__(self, client, num_clients, *, faults=None, client_timeout_s=None):
        self._faults = faults or {}
        self._timeout = client_timeout_s
        if self._timeout is None and any("hang" in kinds.values() for kinds in self._faults.values()):
            raise ValueError("a 'hang' fault needs federation.client_timeout_s, else the run would hang with it")
        self._origin = client
        self._client = client if self._timeout is None else client.replica()
        self._partitions = {NODE_ID_BASE + c: c for c in range(num_clients)}
        self._run = Run.create_empty(IN_PROCESS_RUN_ID)
        self._replies = {}
        self._sent = 0
        # Flower stamps new messages with the identity of the process's task; its runtime sets
        # it for a ServerApp, and here this process plays the SuperLink's part.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = IN_PROCESS_RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._partitions)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._partitions:
                raise ValueError(f"no in-process node {msg.metadata.dst_node_id}; nodes: {sorted(self._partitions)}")
            self._sent += 1
            message_id = f"in-process-{self._sent}"
            msg.metadata.__dict__["_message_id"] = message_id  # Metadata has no setter: Flower's own grids do this too
            self._replies[message_id] = self._reply(msg)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _reply(self, msg: Message) -> Message:
        partition_id = self._partitions[msg.metadata.dst_node_id]
        # Each node gets its own copy of the content, as over a wire: a client that changes what
        # it received (SecAgg+'s mod pops from its config record) must not change the server's
        # message or another node's.
        msg = Message(metadata=msg.metadata, content=copy.deepcopy(msg.content))
        fault = None
        if msg.metadata.message_type == MessageType.TRAIN:
            # Group ids start with the round: "round.attempt" (SmartFedStrategy), "round" (SecAgg+ stages).
            round_index = int(msg.metadata.group_id.split(".")[0])
            fault = self._faults.get(round_index, {}).get(partition_id)
        try:
            if fault == "raise":
                raise InjectedFault("injected fault: client raised before training")
            time_limit_s = 0.0 if fault == "timeout" else None
            if self._timeout is not None and msg.metadata.message_type == MessageType.TRAIN:
                reply = self._within_deadline(msg, partition_id, time_limit_s, hang=fault == "hang")
            else:
                reply = self._client.handle(msg, partition_id, time_limit_s=time_limit_s)
        except Exception as error:  # a client's failure is its reply, never the server's
            return error_reply(msg, error)
        wire_dtype = self._client.config.communication.wire_dtype
        if STATE not in reply.content.array_records:
            if fault in ("poison", "malformed") and SECURE_METRICS in reply.content.config_records:
                corrupt_secure_reply(reply.content, fault)
            return reply
        if fault in ("nan", "shape"):
            state = corrupt_state(record_to_state(reply.content.array_records[STATE]), fault)
            reply.content[STATE] = state_to_record(state, wire_dtype)
        elif fault == "poison":
            poison_content(reply.content, msg.content, wire_dtype)
        elif fault == "malformed":
            malform_content(reply.content)
        return reply

    def _within_deadline(self, msg, partition_id, time_limit_s, *, hang):
        """The client's reply to ``msg`` from a worker thread, or ``ClientTimeout`` once
        ``client_timeout_s`` has passed; an abandoned worker keeps its replica to itself."""
        client, outcome = self._client, {}
        threads = torch.get_num_threads()

        def work():
            # Intra-op thread counts are per OS thread under OpenMP; results must not depend on
            # which thread trains.
            torch.set_num_threads(threads)
            try:
                if hang:
                    time.sleep(HANG_FACTOR * self._timeout)
                outcome["reply"] = client.handle(msg, partition_id, time_limit_s=time_limit_s)
            except Exception as error:
                outcome["error"] = error

        worker = threading.Thread(target=work, name=f"smartfed-client-{partition_id}", daemon=True)
        worker.start()
        worker.join(self._timeout)
        if worker.is_alive():
            self._client = self._origin.replica()
            raise ClientTimeout(
                f"timeout: no reply within federation.client_timeout_s={self._timeout} s; the client step was abandoned"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["reply"]
