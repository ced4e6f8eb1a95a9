"""A deployment's ClientApp hands each message to its SuperNode's persistent worker
(smartfed.experiments.client_worker), which keeps the client of a run between messages: the
same worker answers every message of a run, as the client handlers would in-process, reports a
client's failure as an error, and lives in a folder only its user may enter."""

import json
import os
import signal
import stat
import time

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from smartfed.config import config_to_dict, load_config, with_overrides
from smartfed.experiments import client_worker
from smartfed.federated import messages
from smartfed.federated.flower_compat import recorddict_from_bytes, recorddict_to_bytes
from smartfed.federated.protocol import ClientInstructions, setup_content

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started = []
    yield started
    for pid in started:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def header(config_json, message_type, group_id="", partition_id=1):
    return {"run_id": 5, "node_id": 77, "partition_id": partition_id, "device": "cpu", "message_type": message_type,
            "group_id": group_id, "config_json": config_json}


def test_one_worker_answers_every_message_of_a_run(runtime, cache_dir):
    config = with_overrides(load_config("configs/tiny.yaml"), pool={"cache_dir": str(cache_dir)},
                            federation={"num_clients": 2})
    config_json = json.dumps(config_to_dict(config))
    reply_header, payload = client_worker.forward(recorddict_to_bytes(setup_content(config_json)),
                                                  header(config_json, MessageType.QUERY))
    runtime.append(reply_header["pid"])
    assert reply_header["ok"] and recorddict_from_bytes(payload).metric_records["node"]["partition-id"] == 1
    folder = client_worker.runtime_folder()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(client_worker.socket_path(77, "cpu").stat().st_mode) == 0o600

    from smartfed.experiments.runs import build_trainer

    trainer, _ = build_trainer(config)
    instructions = ClientInstructions(round=1, state=trainer.initial_state(), quotas=None, local_steps=2,
                                      batch_size=8, lr=0.01, seed=3)
    content = messages.instructions_to_content(instructions, "fp32")
    for _ in range(2):
        second, payload = client_worker.forward(recorddict_to_bytes(content), header(config_json, MessageType.TRAIN,
                                                                                     "1.0"))
        assert second["pid"] == reply_header["pid"]
        result = messages.content_to_result(recorddict_from_bytes(payload))
        assert sorted(result.state) == sorted(instructions.state) and result.num_examples > 0
    broken, _ = client_worker.forward(recorddict_to_bytes(RecordDict({"x": ConfigRecord({"a": 1})})),
                                      header(config_json, MessageType.TRAIN, "1.0"))
    assert broken["pid"] == reply_header["pid"]
    assert broken["error"].startswith("ValueError: a train message needs the record 'state'")


def test_the_worker_ends_with_the_process_it_watches(runtime, tmp_path):
    import subprocess
    import sys

    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = client_worker.socket_path(78, "cpu")
    worker = subprocess.Popen([sys.executable, "-m", "smartfed.experiments.client_worker", "--socket", str(path),
                               "--watch-pid", str(watched.pid)])
    runtime.append(worker.pid)
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    watched.kill()
    watched.wait()
    assert worker.wait(timeout=30) == 0 and not path.exists()


def test_a_socket_folder_others_may_enter_is_refused(runtime, tmp_path):
    folder = tmp_path / "smartfed"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with pytest.raises(client_worker.WorkerError, match="must be a folder of this user with mode 700"):
        client_worker.runtime_folder()


def test_a_frame_larger_than_its_bound_is_refused():
    import socket

    left, right = socket.socketpair()
    with left, right:
        left.sendall((client_worker.HEADER_LIMIT + 1).to_bytes(4, "big"))
        with pytest.raises(client_worker.WorkerError, match="a frame header of .* bytes"):
            client_worker.read_frame(right)
