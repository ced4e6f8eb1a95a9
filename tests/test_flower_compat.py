"""Every Flower internal SmartFed uses sits in smartfed/federated/flower_compat.py, and each one
still does what the engine needs from it: a Flower release that moves or changes one fails here,
naming it (setup.py pins the release line these tests passed on)."""

import ast
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from smartfed.federated import flower_compat as compat

ROOT = Path(__file__).resolve().parent.parent
# Flower's public API; anything else under flwr is an internal, imported by flower_compat only.
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation",
          "flwr.client.mod", "flwr.common", "flwr.server.workflow")


def flwr_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "flwr")


def test_only_the_compatibility_module_imports_flower_internals():
    offenders = {}
    for path in sorted((ROOT / "smartfed").rglob("*.py")):
        if path.name == "flower_compat.py":
            continue
        internal = sorted(set(module for module in flwr_imports(path) if module not in PUBLIC))
        if internal:
            offenders[str(path.relative_to(ROOT))] = internal
    assert offenders == {}
    writes = [str(p.relative_to(ROOT)) for p in (ROOT / "smartfed").rglob("*.py")
              if "__dict__[" in p.read_text() and p.name != "flower_compat.py"]
    assert writes == []


def test_a_grid_without_a_superlink_stamps_its_own_identity_and_message_ids():
    assert compat.empty_run(7).run_id == 7
    compat.set_task_identity(run_id=7, node_id=compat.SUPERLINK_NODE_ID)
    message = Message(RecordDict({"c": ConfigRecord({"a": 1})}), 1003, MessageType.TRAIN, group_id="1.0")
    assert message.metadata.run_id == 7 and message.metadata.src_node_id == compat.SUPERLINK_NODE_ID
    compat.set_message_id(message, "in-process-1")
    assert message.metadata.message_id == "in-process-1"
    reply = Message(RecordDict(), reply_to=message)
    assert reply.metadata.reply_to_message_id == "in-process-1" and reply.metadata.src_node_id == 1003
    assert isinstance(compat.CLIENT_APP_RAISED_EXCEPTION, int)


def test_records_cross_processes_in_flowers_wire_form():
    content = RecordDict({
        "state": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
        "metrics": MetricRecord({"num-examples": 5, "loss": 0.25}),
        "info": ConfigRecord({"source": "test", "flags": [True, False]}),
    })
    back = compat.recorddict_from_bytes(compat.recorddict_to_bytes(content))
    assert np.array_equal(back.array_records["state"]["w"].numpy(), content.array_records["state"]["w"].numpy())
    assert dict(back.metric_records["metrics"]) == {"num-examples": 5, "loss": 0.25}
    assert dict(back.config_records["info"]) == {"source": "test", "flags": [True, False]}
    assert compat.clientapp_runs_per_message() is False  # pytest is not flwr-clientapp


def test_secagg_speaks_the_legacy_records_through_a_legacy_context():
    arrays = [np.ones((2, 2), dtype=np.float32)]
    fitins = FitIns(ndarrays_to_parameters(arrays), {"round": 1})
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict  # the inverse, to build a record

    content = fitins_to_recorddict(fitins, keep_input=True)
    back = compat.recorddict_to_fitins(content, keep_input=True)
    assert np.array_equal(parameters_to_ndarrays(back.parameters)[0], arrays[0]) and back.config == {"round": 1}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 3, {"loss": 0.5})
    record = compat.fitres_to_recorddict(fitres, keep_input=True)
    assert record.metric_records["fitres.num_examples"]["num_examples"] == 3
    state = RecordDict({compat.MAIN_CONFIGS_RECORD: ConfigRecord({compat.WorkflowKey.CURRENT_ROUND: 2}),
                        compat.MAIN_PARAMS_RECORD: ArrayRecord()})
    context = compat.LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}))
    assert context.state.config_records[compat.MAIN_CONFIGS_RECORD][compat.WorkflowKey.CURRENT_ROUND] == 2
    assert isinstance(compat.RECORD_KEY_CONFIGS, str)


def test_central_dp_uses_flowers_clipping_and_noise_scale():
    update = [np.full(4, 3.0)]
    compat.compute_clip_model_update(update, [np.zeros(4)], 2.0)
    assert np.isclose(np.linalg.norm(update[0]), 2.0)
    assert compat.compute_stdv(0.5, 2.0, 4) == 0.5 * 2.0 / 4
