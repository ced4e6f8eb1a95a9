"""``InProcessGrid``: a Flower ``Grid`` whose clients live in this process (the embedded
default: no Ray, no network, deterministic).

Each message is handed straight to the client handlers the Flower ClientApp uses
(``smartfed.federated.client.FederatedClient``), in the order sent; an exception becomes an
error reply, as the Flower runtime makes one of a ClientApp's exception. Client ``c`` is node
``NODE_ID_BASE + c``, so that node ids and client ids never pass for each other. Faults for tests
are injected around it by ``smartfed.federated.faults.FaultInjectingGrid``, as around any grid.

With ``client_timeout_s`` every train message runs in a worker thread that the grid waits on for
at most that long: a client step that hangs is cut there and answered as a timeout, and the run
goes on. A thread cannot be stopped, so an abandoned one must never share a model with anyone:
the clients train on their own replica of the model (``FederatedClient.replica``), never on the
server's, and an abandoned worker keeps the replica it had while the grid makes a fresh one from
the server's (idle) model. Whatever the abandoned worker computes later is discarded.

No worker outlives the grid: ``close`` (also on leaving a ``with`` block, when Ctrl-C interrupts
the wait for a worker, and at interpreter exit) raises ``StepCancelled`` inside every worker still
running, which lands at its next Python instruction (a client's wait is taken in short slices for
this), and waits for each to finish. A worker left running while Python finalizes would be torn
down inside torch's C++ code and abort the process ("terminate called without an active
exception"). Each worker reports its end through its own event: after Ctrl-C interrupts
``Thread.join``, CPython 3.11 reports the still running thread as stopped.
"""

import atexit
import copy
import ctypes
import threading
import weakref
from collections.abc import Iterable

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from smartfed.federated.faults import error_reply
from smartfed.federated.flower_compat import SUPERLINK_NODE_ID, empty_run, set_message_id, set_task_identity
from smartfed.federated.trainer import ClientTimeout

NODE_ID_BASE = 1000
IN_PROCESS_RUN_ID = 1
CANCEL_WAIT_S = 10.0


class StepCancelled(BaseException):
    """Raised inside a client step the grid stops (a BaseException: no client code catches it)."""


def _raise_in(thread: threading.Thread, exception_type) -> None:
    # CPython's documented way to raise in another thread; it lands when that thread next runs
    # Python code (after the torch op in flight returns).
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception_type))


_open_grids = weakref.WeakSet()


@atexit.register
def _close_open_grids():
    for grid in list(_open_grids):
        grid.close()


class InProcessGrid(Grid):
    """The ``num_clients`` clients of ``client`` (a ``FederatedClient``) as nodes of a Grid;
    with ``client_timeout_s`` each train step is cut after that many seconds (see above)."""

    def __init__(self, client, num_clients, *, client_timeout_s=None):
        self._timeout = client_timeout_s
        self._origin = client
        self._client = client if self._timeout is None else client.replica()
        self._partitions = {NODE_ID_BASE + c: c for c in range(num_clients)}
        self._run = empty_run(IN_PROCESS_RUN_ID)
        self._replies = {}
        self._sent = 0
        self._workers = []
        _open_grids.add(self)
        # Flower stamps new messages with the identity of the process's task; its runtime sets
        # it for a ServerApp, and here this process plays the SuperLink's part.
        set_task_identity(run_id=IN_PROCESS_RUN_ID, node_id=SUPERLINK_NODE_ID)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
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
            set_message_id(msg, message_id)
            self._replies[message_id] = self._reply(msg)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def close(self, *, wait_s=CANCEL_WAIT_S) -> None:
        """Stop every worker still running (the step in flight, abandoned ones) and wait for it."""
        running = [(worker, done) for worker, done in self._workers if not done.is_set()]
        for worker, _ in running:
            _raise_in(worker, StepCancelled)
        for _, done in running:
            done.wait(wait_s)
        self._workers = [(worker, done) for worker, done in running if not done.is_set()]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _reply(self, msg: Message) -> Message:
        partition_id = self._partitions[msg.metadata.dst_node_id]
        # Each node gets its own copy of the content, as over a wire: a client that changes what
        # it received (SecAgg+'s mod pops from its config record) must not change the server's
        # message or another node's.
        msg = Message(metadata=msg.metadata, content=copy.deepcopy(msg.content))
        try:
            if self._timeout is not None and msg.metadata.message_type == MessageType.TRAIN:
                return self._within_deadline(msg, partition_id)
            return self._client.handle(msg, partition_id)
        except Exception as error:  # a client's failure is its reply, never the server's
            return error_reply(msg, error)

    def _within_deadline(self, msg, partition_id):
        """The client's reply to ``msg`` from a worker thread, or ``ClientTimeout`` once
        ``client_timeout_s`` has passed; an abandoned worker keeps its replica to itself."""
        client, outcome, done = self._client, {}, threading.Event()
        threads = torch.get_num_threads()

        def work():
            # Intra-op thread counts are per OS thread under OpenMP; results must not depend on
            # which thread trains.
            try:
                torch.set_num_threads(threads)
                outcome["reply"] = client.handle(msg, partition_id)
            except StepCancelled:
                outcome["error"] = ClientTimeout("the client step was cancelled")
            except Exception as error:
                outcome["error"] = error
            finally:
                done.set()

        worker = threading.Thread(target=work, name=f"smartfed-client-{partition_id}", daemon=True)
        self._workers = [(w, d) for w, d in self._workers if not d.is_set()] + [(worker, done)]
        worker.start()
        try:
            finished = done.wait(self._timeout)
        except BaseException:
            # Ctrl-C while waiting: the step must not outlive the process.
            self.close()
            raise
        if not finished:
            self._client = self._origin.replica()
            raise ClientTimeout(
                f"timeout: no reply within federation.client_timeout_s={self._timeout} s; the client step was abandoned"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["reply"]
