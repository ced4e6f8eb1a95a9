"""A SuperNode's persistent SmartFed client: the model stays loaded between the messages of a run.

In a Flower deployment (flwr 1.42) the SuperNode starts a fresh ``flwr-clientapp`` process for
every message, so a ClientApp that builds its client itself pays a torch import, the base model
and the pool on each one (25-30 s a round for the tiny run, a model load per message for a real
LLM). The SmartFed ClientApp (``smartfed.experiments.flower_apps``) is therefore a light proxy
there: it imports no torch and hands each message to this worker, one per SuperNode and device,
which it starts on first use. The worker builds the client of a run once (keyed by run id and
the hash of the run's configuration), keeps it while messages arrive, rebuilds it for another
run, and exits after ``idle_s`` seconds without a message or as soon as the SuperNode's executor
(the process that started the first proxy) is gone. It is started in the SuperNode's process
group, so stopping the SuperNode's group stops it too.

The worker listens on a Unix socket in a folder only this user can enter (``runtime_folder``,
mode 700); every frame is bounded before it is read. One request or reply is a frame: a 4-byte
length and a JSON header, an 8-byte length and a payload (a Flower ``RecordDict`` in Flower's
protobuf form). Request header: ``run_id``, ``node_id``, ``partition_id``, ``device``,
``message_type``, ``group_id``, ``config_json``, ``node_data`` (the node's own data files, where
its client holds them); reply header: ``{"ok": true, "pid": ...}`` with the
reply's content, or ``{"error": reason, "pid": ...}`` (``pid``: the worker's, for its log).
"""

import argparse
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smartfed.experiments.open_audit import audit_opens
from smartfed.staging import pid_alive

HEADER_LIMIT = 16 * 2**20
PAYLOAD_LIMIT = 8 * 2**30
CONNECT_WAIT_S = 60.0
IDLE_S = 600.0
ACCEPT_POLL_S = 1.0


class WorkerError(RuntimeError):
    """The worker could not be reached, or the client inside it failed (its reason follows)."""


def runtime_folder() -> Path:
    """This user's private folder for worker sockets: ``$XDG_RUNTIME_DIR/smartfed`` or
    ``<tmp>/smartfed-<uid>``, created with mode 700; refused when another user owns it or others
    may enter it."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(base) / ("smartfed" if os.environ.get("XDG_RUNTIME_DIR") else f"smartfed-{os.getuid()}")
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerError(f"{folder} must be a folder of this user with mode 700 (it holds the client workers' "
                          "sockets)")
    return folder


def socket_path(node_id, device) -> Path:
    safe_device = "".join(ch if ch.isalnum() else "_" for ch in str(device))
    return runtime_folder() / f"client-{int(node_id)}-{safe_device}.sock"


def _read_exact(conn, size) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 2**20))
        if not chunk:
            raise WorkerError(f"the connection closed {left} bytes short of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_frame(conn, header: dict, payload: bytes = b"") -> None:
    encoded = json.dumps(header).encode("utf-8")
    conn.sendall(struct.pack(">I", len(encoded)) + encoded + struct.pack(">Q", len(payload)))
    conn.sendall(payload)


def read_frame(conn):
    """(header, payload) of one frame, each bounded before it is read."""
    (header_size,) = struct.unpack(">I", _read_exact(conn, 4))
    if header_size > HEADER_LIMIT:
        raise WorkerError(f"a frame header of {header_size} bytes (at most {HEADER_LIMIT})")
    header = json.loads(_read_exact(conn, header_size).decode("utf-8"))
    (payload_size,) = struct.unpack(">Q", _read_exact(conn, 8))
    if payload_size > PAYLOAD_LIMIT:
        raise WorkerError(f"a frame payload of {payload_size} bytes (at most {PAYLOAD_LIMIT})")
    return header, _read_exact(conn, payload_size)


# --------------------------------------------------------------------------- the proxy's side


def _connect(path: Path, *, wait_s):
    deadline = time.monotonic() + wait_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                raise WorkerError(f"no client worker listening on {path} after {wait_s} s "
                                  f"(its log: {path.with_suffix('.log')})") from None
            time.sleep(0.05)


def _start_worker(path: Path) -> None:
    """Start the worker of ``path`` (a stale socket of a dead one removed first), watching the
    process that started this proxy: the SuperNode's executor."""
    path.unlink(missing_ok=True)
    with open(path.with_suffix(".log"), "ab") as log:
        subprocess.Popen(  # noqa: S603 - our own module, this interpreter
            [sys.executable, "-m", __name__, "--socket", str(path), "--watch-pid", str(os.getppid())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
        )


def forward(content_bytes: bytes, header: dict):
    """The worker's reply to one message (``header`` as in the module docstring, ``content_bytes``
    its content): (reply header, reply payload); starts the worker when none listens."""
    path = socket_path(header["node_id"], header["device"])
    try:
        conn = _connect(path, wait_s=0.0)
    except WorkerError:
        _start_worker(path)
        conn = _connect(path, wait_s=CONNECT_WAIT_S)
    with conn:
        send_frame(conn, header, content_bytes)
        return read_frame(conn)


# --------------------------------------------------------------------------- the worker's side


class Worker:
    """Holds the client of one run at a time and answers messages with it."""

    def __init__(self):
        self.key = None
        self.client = None

    def _client_for(self, header):
        node_data = header.get("node_data") or {}
        key = (header["run_id"], hashlib.sha256(header["config_json"].encode("utf-8")).hexdigest(), header["device"],
               int(header["partition_id"]), json.dumps(node_data, sort_keys=True))
        if key != self.key:
            from smartfed.config import config_from_dict
            from smartfed.experiments.runs import build_client

            self.client = None  # the previous run's model goes before the next is built
            config = config_from_dict(json.loads(header["config_json"]))
            self.client = build_client(config, device=header["device"], client_id=int(header["partition_id"]),
                                       node_config=node_data)
            self.key = key
        return self.client

    def answer(self, header, payload):
        """(reply header, reply payload) of one request."""
        from flwr.app import Message

        from smartfed.federated.flower_compat import recorddict_from_bytes, recorddict_to_bytes, set_task_identity

        try:
            client = self._client_for(header)
            set_task_identity(run_id=int(header["run_id"]), node_id=int(header["node_id"]))
            msg = Message(recorddict_from_bytes(payload), int(header["node_id"]), header["message_type"],
                          group_id=header["group_id"])
            reply = client.handle(msg, int(header["partition_id"]))
        except Exception as error:  # the proxy turns it into the ClientApp's error reply
            return {"error": f"{type(error).__name__}: {error}", "pid": os.getpid()}, b""
        return {"ok": True, "pid": os.getpid()}, recorddict_to_bytes(reply.content)


def serve(path, *, watch_pid, idle_s=IDLE_S) -> None:
    """Answer requests on the Unix socket ``path`` until idle for ``idle_s`` or ``watch_pid`` exits."""
    audit_opens("client-worker")
    path = Path(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    server.listen(4)
    server.settimeout(ACCEPT_POLL_S)
    worker, last = Worker(), time.monotonic()
    # SIGTERM (the SuperNode's group being stopped) ends the loop through ``finally``.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while time.monotonic() - last < idle_s and pid_alive(watch_pid):
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    header, payload = read_frame(conn)
                except (WorkerError, ValueError) as error:
                    send_frame(conn, {"error": f"unreadable request: {error}"})
                    continue
                send_frame(conn, *worker.answer(header, payload))
            last = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        log = path.with_suffix(".log")
        if log.is_file() and log.stat().st_size == 0:
            log.unlink()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smartfed.experiments.client_worker", description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-s", type=float, default=IDLE_S)
    args = parser.parse_args(argv)
    serve(args.socket, watch_pid=args.watch_pid, idle_s=args.idle_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
