"""Every Flower internal SmartFed relies on, in one place (checked with flwr 1.42; setup.py pins
the range that was tested).

Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, the strategies,
``flwr.client.mod``, ``flwr.server.workflow``, ``flwr.common``'s legacy records) is imported where
it is used. What lives below it, and may move or change in any release, is imported here only:

- the in-process grid plays the SuperLink's part: a ``Run`` record, the task identity Flower stamps
  on every new message, the SuperLink's node id, the error code of a ClientApp's exception, and a
  message id written into ``Metadata`` (which has no setter; Flower's own grids do the same);
- SecAgg+ drives Flower's ``SecAggPlusWorkflow``, which speaks the legacy ``FitIns``/``FitRes``
  records through a ``LegacyContext`` and its workflow constants;
- central DP uses Flower's clipping and noise-scale functions;
- the persistent ClientApp worker sends records between processes in Flower's own protobuf form,
  and is needed because a deployment runs each message in a fresh ``flwr-clientapp`` process.

``tests/test_flower_compat.py`` exercises each name, so a Flower release that moves one fails
there, with the name, rather than deep inside a run.
"""

import sys
from pathlib import Path

import flwr.compat.common.recorddict_compat as _recorddict_compat
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as _RecordDictProto
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_RAISED_EXCEPTION = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
# The process a SuperNode's executor starts for ONE message and that exits after it
# (flwr/supernode/runtime/run_clientapp.py); the simulation engine's actors live on instead.
CLIENTAPP_COMMAND = "flwr-clientapp"
recorddict_to_fitins = _recorddict_compat.recorddict_to_fitins
fitres_to_recorddict = _recorddict_compat.fitres_to_recorddict

__all__ = [
    "CLIENT_APP_RAISED_EXCEPTION", "CLIENTAPP_COMMAND", "LegacyContext", "MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "RECORD_KEY_CONFIGS",
    "SUPERLINK_NODE_ID", "WorkflowKey", "clientapp_runs_per_message", "compute_clip_model_update", "compute_stdv",
    "empty_run",
    "fitres_to_recorddict", "recorddict_from_bytes", "recorddict_to_bytes", "recorddict_to_fitins",
    "set_message_id", "set_task_identity",
]


def empty_run(run_id: int) -> Run:
    """The ``Run`` record of a grid with no SuperLink behind it."""
    return Run.create_empty(run_id)


def set_task_identity(*, run_id: int, node_id: int, task_id: int = 1) -> None:
    """The identity Flower stamps on every message this process creates (its runtime sets it for a
    ServerApp or ClientApp; a process that plays the SuperLink's part sets its own)."""
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def set_message_id(message, message_id: str) -> None:
    """Give a pushed message its id; ``Metadata`` has no setter for it."""
    message.metadata.__dict__["_message_id"] = message_id


def recorddict_to_bytes(content) -> bytes:
    """A ``RecordDict`` in Flower's protobuf wire form."""
    return recorddict_to_proto(content).SerializeToString()


def recorddict_from_bytes(data: bytes):
    """The ``RecordDict`` of ``recorddict_to_bytes``; protobuf refuses malformed input with an error."""
    return recorddict_from_proto(_RecordDictProto.FromString(data))


def clientapp_runs_per_message() -> bool:
    """Whether this process is a deployment's ClientApp process, started for one message."""
    return Path(sys.argv[0]).name == CLIENTAPP_COMMAND
