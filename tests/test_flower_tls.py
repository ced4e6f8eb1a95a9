"""The authenticated, encrypted Flower deployment (docs/flower.md), on 127.0.0.1 only.

- ``smartfed federation-keys`` (``smartfed.experiments.federation_keys``) writes a CA, a server
  certificate that verifies for 127.0.0.1 and localhost, and SuperNode key pairs that Flower's own
  loaders read; private keys are mode 600; nothing is overwritten without --force.
- A SuperLink with TLS and ``--enable-supernode-auth`` (``smartfed.experiments.local_federation``)
  lets in the SuperNodes whose public keys were registered with ``flwr supernode register`` and
  refuses one with an unregistered key and one with no key: each exits with status 1 (its log says
  Flower's code 305) and the SuperLink's refusal in its log, and ``flwr supernode list`` shows only
  the registered nodes.
- ``smartfed federation --run`` from the repository writes nothing into it (issue 25 item 2), and
  the docs' recipes keep every key, database and run under ``$FED``.
- The SmartFed Flower app runs over this same setup in tests/test_flower.py's loopback
  deployment test, which also checks its routers against the in-process run.
- ``--insecure`` only with ``insecure=True``, which warns.
"""

import argparse
import ipaddress
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from smartfed.experiments import federation_keys
from smartfed.experiments.federation_keys import make_federation_keys
from smartfed.experiments.local_federation import INSECURE_WARNING, LocalFederation

NUM_NODES = 2
REPO = Path(__file__).resolve().parent.parent


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_verify_load_in_flower_and_stay_private(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from cryptography.x509.verification import PolicyBuilder, Store
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = make_federation_keys(tmp_path / "keys", 3)
    ca = x509.load_pem_x509_certificate(keys.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_certificate.read_bytes())
    verifier = PolicyBuilder().store(Store([ca]))
    for name in (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")):
        chain = verifier.build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(x509.verification.VerificationError):
        verifier.build_server_verifier(x509.DNSName("example.org")).verify(server, [])

    for index in range(3):
        private = load_ssh_private_key(keys.node_private_key(index).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert try_load_public_key(keys.node_public_key(index)) == public_key_to_bytes(private.public_key())
    assert len({keys.node_public_key(i).read_bytes() for i in range(3)}) == 3

    assert _mode(keys.folder) == 0o700
    assert all(_mode(path) == 0o600 for path in keys.private_keys)
    assert len(keys.private_keys) == 5
    public = [keys.ca_certificate, keys.server_certificate, *(keys.node_public_key(i) for i in range(3))]
    assert all(_mode(path) == 0o644 for path in public)


def test_keys_are_never_overwritten_without_force(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    federation_keys.configure_parser(parser)
    folder = tmp_path / "keys"
    assert federation_keys.run(parser.parse_args([str(folder), "--nodes", "2", "--host", "127.0.0.1"])) == 0
    printed = capsys.readouterr().out
    assert str(folder / "supernode-1.key") in printed and "flwr supernode register" in printed
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert len(before) == 8

    with pytest.raises(FileExistsError, match="already holds ca.pem, ca.key, .*supernode-1.pub; pass --force"):
        federation_keys.run(parser.parse_args([str(folder), "--nodes", "3"]))
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before

    (folder / "ca.key").unlink()
    with pytest.raises(FileExistsError, match="already holds ca.pem, server.pem"):
        make_federation_keys(folder, 2)
    assert not (folder / "ca.key").exists()

    keys = make_federation_keys(folder, 2, force=True)
    assert keys.ca_certificate.read_bytes() != before["ca.pem"]
    assert keys.node_private_key(0).read_bytes() != before["supernode-0.key"]
    assert all(_mode(path) == 0o600 for path in keys.private_keys)

    with pytest.raises(ValueError, match="--nodes must be at least 1"):
        make_federation_keys(tmp_path / "none", 0)


def test_insecure_needs_the_explicit_flag_and_warns(tmp_path):
    with pytest.raises(ValueError, match="needs keys"):
        LocalFederation(tmp_path / "a")
    with pytest.warns(UserWarning, match="no TLS and no SuperNode authentication"):
        federation = LocalFederation(tmp_path / "b", insecure=True)
    assert "insecure = true" in (Path(federation.cli_env["FLWR_HOME"]) / "config.toml").read_text()
    assert federation.superlink_command()[1] == "--insecure"
    assert INSECURE_WARNING.startswith("insecure local federation")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink with TLS and SuperNode authentication and two registered SuperNodes; one
    torch thread per process, as on CI's 2 cores."""
    root = tmp_path_factory.mktemp("flower_tls")
    keys = make_federation_keys(root / "keys", NUM_NODES + 1)
    with LocalFederation(root / "federation", keys, env={"OMP_NUM_THREADS": "1"}) as local:
        local.start(NUM_NODES)
        yield local


def test_superlink_serves_tls_and_connects_only_registered_nodes(federation):
    assert f"Uvicorn running on https://{federation.address}" in federation.log("superlink")
    config = (Path(federation.cli_env["FLWR_HOME"]) / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    registered = {node["node-id"] for node in federation.nodes()}
    assert len(registered) == NUM_NODES

    # Index NUM_NODES holds a key pair that was never registered; "intruder" presents no key.
    unregistered = federation.start_supernode(NUM_NODES, "partition-id=1 num-partitions=2")
    intruder = federation.start_supernode(NUM_NODES, "partition-id=0 num-partitions=2", authenticate=False,
                                          name="intruder")
    # Flower logs its own code 305, but the process exits with status 1 (docs/flower.md).
    assert unregistered.wait(timeout=60) == 1 and intruder.wait(timeout=60) == 1
    unregistered_log = federation.log(f"supernode{NUM_NODES}")
    assert "Exit Code: 305" in unregistered_log and "[code: 2004] Failed to activate SuperNode" in unregistered_log
    assert "[code: 2001] SuperNode authentication is enabled" in federation.log("intruder")
    link_log = federation.log("superlink")
    assert "[/v1/fleet/activate-node][ApiError:2004]" in link_log
    assert "No SuperNode found with the given public key" in link_log
    assert "[/v1/fleet/register-node][ApiError:2001]" in link_log

    nodes = federation.nodes()
    assert {node["node-id"] for node in nodes} == registered
    assert all(node["status"] == "online" for node in nodes)


def _repository_state():
    """What ``git status`` would show, ignored files included (keys in an ignored folder count),
    less Python's byte-code caches."""
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(line for line in listed if "__pycache__" not in line and ".pytest_cache" not in line)


def test_the_one_line_deployment_writes_nothing_into_the_repository(tmp_path):
    """``smartfed federation --run`` (the recipe of docs/flower.md: keys, SuperLink database, node
    registrations, SuperNodes, ``flwr run``) started from the repository: keys, database, logs and
    the run all land under --dir, private keys 0600, and ``git status`` is unchanged."""
    before = _repository_state()
    folder = tmp_path / "federation"
    finished = subprocess.run(
        [sys.executable, "-m", "smartfed.cli", "federation", "--dir", str(folder), "--nodes", "2", "--threads", "1",
         "--run", str(REPO / "configs" / "tiny.yaml"), "--output-dir", "tiny", "--set", "federation.rounds=2",
         "--set", f"pool.cache_dir={tmp_path / 'pool'}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"finished:completed -> {folder / 'runs' / 'tiny'}" in finished.stdout
    assert "SmartFed train 1.0: 2/2 replies after" in finished.stdout  # a round's progress in the stream
    assert [json.loads(line)["round"] for line in (folder / "runs" / "tiny" / "metrics.jsonl").open()] == [1, 2]
    keys = federation_keys.FederationKeys(folder / "keys", 2)
    assert all(_mode(path) == 0o600 for path in keys.private_keys)
    assert list(folder.glob("session-*/superlink.db"))
    assert _repository_state() == before


def test_the_docs_keep_keys_databases_and_runs_outside_the_repository():
    """Every path docs/flower.md's recipes write is under $FED (outside the repository) or absolute."""
    text = (REPO / "docs" / "flower.md").read_text()
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    written = re.findall(r"(?:--database|--ssl-certfile|--ssl-keyfile|--ssl-ca-certfile|--root-certificates|"
                         r"--auth-supernode-private-key|federation-keys|register)\s+(\S+)", commands)
    assert written and all(path.startswith(("$FED/", "/")) for path in written), written
    assert "output-dir='/" not in text
