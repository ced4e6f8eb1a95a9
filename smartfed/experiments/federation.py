"""``smartfed federation``: the local TLS + authenticated Flower deployment of docs/flower.md in
one line.

In ``--dir`` (default ``~/.smartfed/federation``, outside any repository): the credentials
(``keys/``, made once by ``smartfed federation-keys``, private keys mode 600), one folder per start
(``session-<time>/``: the SuperLink's database, each process's ``FLWR_HOME`` and log) and the runs
(``runs/``, the ServerApp's output root). Then a SuperLink on 127.0.0.1 with TLS and SuperNode
authentication (its Control API, on the same port, reachable from this machine only), the
registration of each SuperNode's key and the SuperNodes (``smartfed.experiments.local_federation``).

Without ``--run`` it prints how to start runs with ``flwr`` and keeps the federation up until
Ctrl-C. With ``--run CONFIG`` it runs that SmartFed config once, on exactly the SuperNodes it
registered (``nodes``), prints where the run was written and how it ended, and stops everything.
"""

import sys
import time
from datetime import datetime
from pathlib import Path

DEFAULT_DIR = "~/.smartfed/federation"
DEFAULT_NODES = 2
RUN_TIMEOUT_S = 3600


def configure_parser(parser):
    parser.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                        help=f"keys, session state and runs (default: {DEFAULT_DIR})")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, metavar="N",
                        help=f"SuperNodes, one client each (default: {DEFAULT_NODES})")
    parser.add_argument("--run", metavar="CONFIG", default=None,
                        help="run this SmartFed YAML config once (federation.num_clients set to N), then stop")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="with --run: override one config value, as smartfed train --set; repeatable")
    parser.add_argument("--output-dir", default=None, metavar="NAME",
                        help="with --run: the run's folder under DIR/runs (default: run-<time>)")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="OMP_NUM_THREADS of every process (default: torch's choice)")
    parser.add_argument("--node-data", nargs="+", default=[], metavar="I=PATH",
                        help="SuperNode I's own data file, its node config's data-path (for a run whose "
                             "task.data.train is null: each client reads only its own file), e.g. "
                             "--node-data 0=/p/a.jsonl 1=/p/b.jsonl")


def _keys(folder, num_nodes):
    """The federation's credentials in ``folder``: reused when all are there, else made."""
    from smartfed.experiments.federation_keys import FederationKeys, make_federation_keys

    keys = FederationKeys(folder, num_nodes)
    if all(path.is_file() for path in keys.paths):
        return keys
    return make_federation_keys(folder, num_nodes)


def _run_config(args, run_name):
    from smartfed.config import ConfigError

    items = [f"federation.num_clients={args.nodes}", *args.overrides]
    if any("'" in item for item in items):
        raise ConfigError("a value may not contain a single quote", key="--set")
    config = Path(args.run).expanduser().resolve()
    if not config.is_file():
        raise ConfigError(f"{config} is not a file", key="--run")
    return f"config='{config}' overrides='{' '.join(items)}' output-dir='{run_name}'"


def node_data_paths(items, num_nodes) -> dict:
    """{node index: resolved path} of ``--node-data I=PATH ...``. A path is not required to
    exist here: it is the node's to open (a node whose file is missing is screened by the server)."""
    from smartfed.config import ConfigError

    paths = {}
    for item in items:
        index, separator, path = item.partition("=")
        if not separator or not index.strip().isdigit() or not path.strip():
            raise ConfigError(f"expected I=PATH with I a node index, got {item!r}", key="--node-data")
        index = int(index)
        if index >= num_nodes:
            raise ConfigError(f"node {index} is not one of the {num_nodes} SuperNodes (0 to {num_nodes - 1})",
                              key="--node-data")
        if index in paths:
            raise ConfigError(f"node {index} is given twice", key="--node-data")
        if "'" in path:
            raise ConfigError(f"a path may not contain a single quote, got {path!r}", key="--node-data")
        paths[index] = Path(path).expanduser().resolve()
    return paths


def run(args) -> int:
    from smartfed.config import ConfigError
    from smartfed.experiments.local_federation import PROJECT_ROOT, LocalFederation

    if args.nodes < 1:
        raise ConfigError(f"must be at least 1, got {args.nodes}", key="--nodes")
    node_data = node_data_paths(args.node_data, args.nodes)
    folder = Path(args.dir).expanduser().resolve()
    run_name = args.output_dir or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run_config = _run_config(args, run_name) if args.run else None
    keys = _keys(folder / "keys", args.nodes)
    env = {} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
    session = folder / datetime.now().strftime("session-%Y%m%d-%H%M%S-%f")
    app = PROJECT_ROOT / "flower_app"
    with LocalFederation(session, keys, env=env, output_root=folder / "runs") as federation:
        federation.start(args.nodes, node_data=node_data)
        cli_home = federation.cli_env["FLWR_HOME"]
        print(f"SuperLink {federation.address} (TLS, SuperNode authentication; Control API on 127.0.0.1 only), "
              f"SuperNodes {federation.node_ids} online; logs in {session}", flush=True)
        if run_config is None:
            print(f"start a run:  FLWR_HOME={cli_home} flwr run {app} loopback --stream --run-config "
                  f"\"config='/abs/run.yaml' overrides='federation.num_clients={args.nodes}' output-dir='NAME' "
                  f"{federation.nodes_run_config()}\"\nruns are written to {folder / 'runs'}/NAME; Ctrl-C stops "
                  "the federation", flush=True)
            while all(process.poll() is None for process, _ in federation.processes.values()):
                time.sleep(1)
            print(f"smartfed federation: a process of the federation exited; its log:\n{federation.logs()}",
                  file=sys.stderr)
            return 1
        run_id, status, _ = federation.run_app(app, f"{run_config} {federation.nodes_run_config()}",
                                               timeout_s=RUN_TIMEOUT_S, echo=lambda line: print(line, end="",
                                                                                                 flush=True))
    print(f"run {run_id}: {status} -> {folder / 'runs' / run_name}")
    if status != "finished:completed":
        print(f"smartfed federation: run {run_id} ended {status}; the ServerApp's log is in "
              f"{session / 'superlink.log'}", file=sys.stderr)
        return 3
    return 0
