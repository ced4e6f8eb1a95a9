"""A Flower federation on 127.0.0.1 for tests and demonstrations: a SuperLink, SuperNodes and
the ``flwr`` CLI, each process in its own ``FLWR_HOME``, with TLS and SuperNode authentication.

What it runs is the setup of docs/flower.md, with the files of ``smartfed federation-keys``
(``smartfed.experiments.federation_keys``) and free ports::

    flower-superlink --host 127.0.0.1 --port P --ssl-ca-certfile ca.pem --ssl-certfile server.pem \\
        --ssl-keyfile server.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation --database superlink.db
    flwr supernode register supernode-I.pub loopback          # for each node, before it starts
    flower-supernode --superlink 127.0.0.1:P --root-certificates ca.pem \\
        --auth-supernode-private-key supernode-I.key --host 127.0.0.1 --port Q_I \\
        --node-config "partition-id=I num-partitions=N [data-path='/its/own/data.jsonl']"

and the CLI's connection (``$FLWR_HOME/config.toml``) names ``root-certificates`` instead of
``insecure``. ``insecure=True`` runs everything in plaintext without authentication, with a
warning: any process that reaches the port can then join the federation.

Every process is started in its own process group and ``stop()`` (or leaving the ``with``
block) ends them by PID, SuperNodes first; every wait is bounded.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from smartfed.federated.protocol import DATA_PATH
from smartfed.federated.run_dir import OUTPUT_ROOT_ENV

HOST = "127.0.0.1"
TASK_POLL_S = 0.1
CONNECTION = "loopback"
BIN = Path(sys.executable).parent
# The folder that holds the smartfed package: Flower never installs the app, so the SuperLink's
# ServerApp and the SuperNodes' ClientApps import smartfed from here.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
INSECURE_WARNING = ("insecure local federation: no TLS and no SuperNode authentication, so any process that "
                    "reaches the SuperLink's port can join the federation and read every message")


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class FlowerCommandError(RuntimeError):
    """A ``flwr`` command failed; the message holds its output and the federation's logs."""


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, authenticated with ``keys``
    (a ``federation_keys.FederationKeys``) unless ``insecure=True``.

    ``env`` adds variables to every process (for example ``OMP_NUM_THREADS``); the ServerApp's
    runs go under ``output_root`` (default ``root/runs``; ``$SMARTFED_OUTPUT_ROOT`` of the
    SuperLink)."""

    def __init__(self, root, keys=None, *, insecure=False, env=None, output_root=None):
        if insecure and keys is not None:
            raise ValueError("give keys for TLS and authentication, or insecure=True, not both")
        if not insecure and keys is None:
            raise ValueError("a local federation needs keys (smartfed federation-keys), or insecure=True")
        if insecure:
            warnings.warn(INSECURE_WARNING, stacklevel=2)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        self.insecure = insecure
        self.extra_env = dict(env or {})
        self.output_root = Path(output_root) if output_root is not None else self.root / "runs"
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.processes = {}  # name -> (Popen, log path), in start order
        self.node_ids = []  # the node ids ``flwr supernode register`` gave the keys of ``start``
        self.cli_env = self.env("cli")
        trust = "insecure = true" if insecure else f"root-certificates = {json.dumps(str(keys.ca_certificate))}"
        (Path(self.cli_env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n{trust}\n'
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def env(self, name):
        """The environment of process ``name``: its own FLWR_HOME, no telemetry and no update
        check (which would look up a host name), smartfed importable, and an app process started
        within ``TASK_POLL_S`` of its message (Flower's executor polls once a second by default)."""
        home = self.root / f"flwr_home_{name}"
        home.mkdir(exist_ok=True)
        python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        return dict(
            os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(TASK_POLL_S), PYTHONPATH=python_path,
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **self.extra_env,
        )

    def superlink_env(self):
        return dict(self.env("superlink"), **{OUTPUT_ROOT_ENV: str(self.output_root)})

    def superlink_command(self):
        trust = ["--insecure"] if self.insecure else [
            "--ssl-ca-certfile", str(self.keys.ca_certificate), "--ssl-certfile", str(self.keys.server_certificate),
            "--ssl-keyfile", str(self.keys.server_key), "--enable-supernode-auth",
        ]
        return ["flower-superlink", *trust, "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation", "--database", str(self.root / "superlink.db")]

    def supernode_command(self, index, node_config, *, authenticate=True):
        """Node ``index`` with its key pair (``authenticate=False``: with none, as an intruder would)."""
        if self.insecure:
            trust = ["--insecure"]
        else:
            trust = ["--root-certificates", str(self.keys.ca_certificate)]
            if authenticate:
                trust += ["--auth-supernode-private-key", str(self.keys.node_private_key(index))]
        return ["flower-supernode", *trust, "--superlink", self.address, "--host", HOST,
                "--port", str(free_port()), "--node-config", node_config]

    def start(self, num_nodes, *, wait_s=60, node_data=None):
        """The SuperLink, then for each node its registration and its SuperNode with
        ``partition-id=I num-partitions=num_nodes`` (and ``data-path`` when ``node_data``, {I:
        path}, names node I's own data file); returns once all are online. The node ids of the
        registered keys are ``node_ids`` (a run lists them as its ``nodes``)."""
        self.start_superlink(wait_s=wait_s)
        for index in range(num_nodes):
            if not self.insecure:
                self.node_ids.append(self.register(index))
            self.start_supernode(index, node_config(index, num_nodes, (node_data or {}).get(index)))
        self.wait_for_online(num_nodes, wait_s=wait_s)

    def nodes_run_config(self):
        """The ``nodes`` item of a run config: only the SuperNodes this federation registered take
        part in the run ("" when insecure: no registration, no node ids to list)."""
        return f"nodes='{' '.join(str(node_id) for node_id in self.node_ids)}'"

    def start_superlink(self, *, wait_s=60):
        self._start("superlink", self.superlink_command(), env=self.superlink_env())
        deadline = time.monotonic() + wait_s
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.processes["superlink"][0].poll() is not None:
                    raise RuntimeError(f"SuperLink not listening on {self.address} after {wait_s} s:\n{self.logs()}")
                time.sleep(0.2)

    def register(self, index):
        """``flwr supernode register`` of node ``index``'s public key; returns its node id."""
        result = self.flwr("supernode", "register", str(self.keys.node_public_key(index)), CONNECTION,
                           "--format", "json")
        return int(self._json(result, "flwr supernode register")["node-id"])

    def start_supernode(self, index, node_config, *, authenticate=True, name=None):
        name = name or f"supernode{index}"
        return self._start(name, self.supernode_command(index, node_config, authenticate=authenticate))

    def nodes(self):
        """``flwr supernode list``: the SuperLink's registered nodes, each a dict with
        ``node-id`` and ``status`` (``online`` once connected)."""
        listed = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return self._json(listed, "flwr supernode list")["nodes"]

    def wait_for_online(self, count, *, wait_s=60):
        deadline = time.monotonic() + wait_s
        while True:
            online = [node for node in self.nodes() if node["status"] == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(online)} of {count} SuperNodes online after {wait_s} s:\n{self.logs()}")
            time.sleep(1)

    def run_app(self, app_dir, run_config, *, timeout_s=600, echo=None):
        """``flwr run APP_DIR loopback --stream --run-config ...``, then the run's status from
        ``flwr ls`` (``flwr run`` exits 0 even when the run fails): ``(run_id, status, output)``;
        ``echo(line)`` sees each line of the stream as it comes."""
        command = [str(BIN / "flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config]
        with subprocess.Popen(command, env=self.cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as launched:
            timer = threading.Timer(timeout_s, launched.kill)
            timer.start()
            try:
                lines = []
                for line in launched.stdout:
                    lines.append(line)
                    if echo is not None:
                        echo(line)
            finally:
                timer.cancel()
        output = "".join(lines)
        found = re.search(r"Successfully started run (\d+)", output)
        if found is None:
            raise FlowerCommandError(f"flwr run started no run:\n{output[-6000:]}\n{self.logs()}")
        run_id = int(found.group(1))
        listed = self._json(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"), "flwr ls")
        statuses = [run["status"] for run in listed.get("runs", [])]
        return run_id, (statuses[0] if len(statuses) == 1 else None), output

    def flwr(self, *args, timeout_s=60):
        return subprocess.run([str(BIN / "flwr"), *args], env=self.cli_env, capture_output=True, text=True,
                              timeout=timeout_s)

    def log(self, name):
        return self.processes[name][1].read_text(errors="replace")

    def logs(self, tail=3000):
        return "\n".join(f"--- {name}:\n{path.read_text(errors='replace')[-tail:]}"
                         for name, (_, path) in self.processes.items())

    def stop(self, *, wait_s=15):
        """SuperNodes first, then the SuperLink: each process group (the node or link and the app
        processes it started) gets SIGTERM, SIGKILL after ``wait_s``, then SIGKILL for any member
        that outlived its leader."""
        nodes = [process for name, (process, _) in self.processes.items() if name != "superlink"]
        links = [process for name, (process, _) in self.processes.items() if name == "superlink"]
        for group in (nodes, links):
            for process in group:
                _signal_group(process, signal.SIGTERM)
            for process in group:
                try:
                    process.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    _signal_group(process, signal.SIGKILL)
                    process.wait(timeout=wait_s)
                _signal_group(process, signal.SIGKILL)

    def _start(self, name, command, *, env=None):
        if name in self.processes:
            raise ValueError(f"a process named {name!r} was already started")
        log_path = self.root / f"{name}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env or self.env(name), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = (process, log_path)
        return process

    def _json(self, result, what):
        try:
            answer = json.loads(result.stdout)
        except json.JSONDecodeError:
            answer = {}
        if result.returncode != 0 or answer.get("success") is not True:
            raise FlowerCommandError(f"{what} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                     f"{result.stderr[-3000:]}\n{self.logs()}")
        return answer


def node_config(index, num_nodes, data_path=None) -> str:
    """The ``--node-config`` of SuperNode ``index``: its partition and, when given, its own data file."""
    config = f"partition-id={index} num-partitions={num_nodes}"
    return config if data_path is None else f"{config} {DATA_PATH}='{data_path}'"


def _signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
