"""``smartfed federation-keys DIR --nodes N``: the credentials of a TLS + authenticated federation.

Writes into DIR (docs/flower.md shows where each file goes):

- ``ca.pem`` / ``ca.key``: a private certificate authority (EC P-384, self-signed). ``ca.pem`` is
  what every SuperNode and every ``flwr`` CLI trusts (``--root-certificates``, ``root-certificates``
  in config.toml); ``ca.key`` is needed only to sign another server certificate: keep it offline.
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for the
  addresses the SuperNodes and the CLI dial (``--host``, default ``127.0.0.1`` and ``localhost``):
  ``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key``.
- ``supernode-I.key`` / ``supernode-I.pub`` for I in 0..N-1: one EC P-384 key pair per SuperNode in
  OpenSSH format, the format Flower reads: ``flwr supernode register supernode-I.pub`` on the CLI's
  side, ``flower-supernode --auth-supernode-private-key supernode-I.key`` on the node.

Private keys are created with mode 600 (never readable by others, not even for a moment) in a
folder of mode 700. Nothing is overwritten: when any of these files exists the command writes
nothing and exits 2, unless ``--force``, which replaces them all (and with them the trust of every
node and CLI configured with the old ones).
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

CA_CERTIFICATE = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERTIFICATE = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class FederationKeys:
    """Where the files of one federation's credentials lie (``make_federation_keys`` writes them)."""

    folder: Path
    num_nodes: int

    @property
    def ca_certificate(self) -> Path:
        return self.folder / CA_CERTIFICATE

    @property
    def ca_key(self) -> Path:
        return self.folder / CA_KEY

    @property
    def server_certificate(self) -> Path:
        return self.folder / SERVER_CERTIFICATE

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def node_private_key(self, index) -> Path:
        return self.folder / f"supernode-{index}.key"

    def node_public_key(self, index) -> Path:
        return self.folder / f"supernode-{index}.pub"

    @property
    def paths(self):
        nodes = [path for index in range(self.num_nodes)
                 for path in (self.node_private_key(index), self.node_public_key(index))]
        return [self.ca_certificate, self.ca_key, self.server_certificate, self.server_key, *nodes]

    @property
    def private_keys(self):
        return [self.ca_key, self.server_key, *(self.node_private_key(i) for i in range(self.num_nodes))]


def _subject_alternative_name(host):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    # P-384: the curve of Flower's own examples; `flwr supernode register` takes any NIST curve.
    return ec.generate_private_key(ec.SECP384R1())


def _certificate(subject, issuer, public_key, signing_key, *, days, extensions):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    # A minute's slack so that a node whose clock runs a little behind still accepts it.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def _pem_private_key(key):
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode):
    # O_EXCL with the final mode: a private key is never, even briefly, readable by others.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(path, mode)  # the umask may have narrowed the mode of a public file


def make_federation_keys(folder, num_nodes, *, hosts=DEFAULT_HOSTS, days=DEFAULT_DAYS, force=False):
    """Write a CA, a server certificate for ``hosts`` and ``num_nodes`` SuperNode key pairs into
    ``folder``; raise FileExistsError, having written nothing, when one of the files exists and
    ``force`` is false."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if num_nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {num_nodes}")
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    if not hosts or not all(hosts):
        raise ValueError(f"the server certificate needs one or more non-empty --host, got {list(hosts)}")
    keys = FederationKeys(Path(folder), num_nodes)
    existing = [path for path in keys.paths if path.exists() or path.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"{keys.folder} already holds {', '.join(p.name for p in existing)}; "
                              "pass --force to replace all of them")
    ca_key = _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SmartFed federation CA")])
    ca_public = ca_key.public_key()
    ca = _certificate(ca_name, ca_name, ca_public, ca_key, days=days, extensions=[
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_public), False),
    ])

    server_key = _new_key()
    server_public = server_key.public_key()
    server = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name, server_public, ca_key, days=days,
        extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName([_subject_alternative_name(host) for host in hosts]), False),
            (x509.SubjectKeyIdentifier.from_public_key(server_public), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), False),
        ],
    )

    node_keys = [_new_key() for _ in range(num_nodes)]

    keys.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    _write(keys.ca_certificate, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(keys.ca_key, _pem_private_key(ca_key), PRIVATE_MODE)
    _write(keys.server_certificate, server.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(keys.server_key, _pem_private_key(server_key), PRIVATE_MODE)
    for index, node_key in enumerate(node_keys):
        _write(keys.node_private_key(index), node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption(),
        ), PRIVATE_MODE)
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(keys.node_public_key(index), public + f" smartfed-supernode-{index}\n".encode(), 0o644)
    return keys


def configure_parser(parser):
    parser.add_argument("folder", metavar="DIR", help="where the files go (created with mode 700 if missing)")
    parser.add_argument("--nodes", type=int, required=True, metavar="N", help="how many SuperNode key pairs")
    parser.add_argument("--host", action="append", dest="hosts", metavar="ADDRESS",
                        help="an address the SuperNodes and the flwr CLI dial, as IP or DNS name; repeat for "
                             f"several (default: {' and '.join(DEFAULT_HOSTS)})")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS,
                        help=f"validity of the certificates (default: {DEFAULT_DAYS})")
    parser.add_argument("--force", action="store_true", help="replace existing files of DIR (new CA, new node keys)")


def run(args) -> int:
    keys = make_federation_keys(args.folder, args.nodes, hosts=tuple(args.hosts or DEFAULT_HOSTS), days=args.days,
                                force=args.force)
    for path in keys.paths:
        print(path)
    print(f"next: flower-superlink --ssl-ca-certfile {keys.ca_certificate} --ssl-certfile {keys.server_certificate} "
          f"--ssl-keyfile {keys.server_key} --enable-supernode-auth ...; then flwr supernode register "
          f"{keys.node_public_key(0)} <connection> per node (docs/flower.md)")
    return 0
