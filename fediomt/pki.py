"""The consortium PKI: one CA, TLS client certificates whose CN is the MQTT username, Ed25519 signing keys, a CRL.

Mosquitto runs with `use_identity_as_username`, so the certificate's CN *is* the identity every ACL rule and every
signed message refers to. The CA is therefore the authority on the identity namespace: it refuses to give a device
the name of an edge or of the cloud. Client certificates carry the clientAuth extended key usage only and broker
certificates serverAuth only, so a broker's certificate can never log in as a client.

Layout of a PKI directory (everything public is 0644; private keys 0600; the CA key lives in `private/`, 0700, and
never leaves the CA host — `export` copies what one host needs without it):

    ca.crt  crl.pem  index.json  private/ca.key
    devices/ID/  edges/ID/  cloud/cloud/     tls.crt tls.key sign.key sign.pub  (+ mac.key for devices)
    edges/ID/, cloud/cloud/                  ROLE.crt ROLE.key, one per extra connection (CN "ID.ROLE")
    servers/NAME/                            tls.crt tls.key
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import signing
from protocol.atomic import atomic_write
from protocol.tls import CLIENT_KINDS, KINDS, ROLES, Identity, ca_cert_path, crl_path, identity, role_cn
from protocol.topics import check_id

CLOUD_ID = "cloud"
ORGANISATION = "FedIoMT consortium"


class PkiError(RuntimeError):
    """A refused PKI operation (name clash, unknown identity, missing CA); the message says what to do."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@contextmanager
def _locked(directory: Path) -> Iterator[dict]:
    """Serialise issue/revoke on one PKI directory; yields the index, saved atomically on success."""
    if not (directory / "private" / "ca.key").exists():
        raise PkiError(f"{directory} has no CA: run `fediomt pki init --dir {directory}` first")
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads((directory / "index.json").read_text())
        yield index
        atomic_write(directory / "index.json", json.dumps(index, indent=1).encode())


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca_cert_path(directory).read_bytes())
    key = serialization.load_pem_private_key((directory / "private" / "ca.key").read_bytes(), password=None)
    return cert, key


def init_ca(directory: str | os.PathLike, common_name: str = "FedIoMT consortium CA", days: int = 3650,
            crl_days: int = 365) -> Path:
    """Create the CA (EC P-256) and an empty CRL; refuses to overwrite an existing CA. Returns ca.crt's path."""
    directory = Path(directory)
    if (directory / "private" / "ca.key").exists():
        raise PkiError(f"{directory} already holds a CA; refusing to overwrite it")
    (directory / "private").mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    os.chmod(directory / "private", 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name, "ca")
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    atomic_write(directory / "private" / "ca.key", _pem_key(key), mode=0o600)
    atomic_write(ca_cert_path(directory), cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(directory / "index.json", json.dumps({"crl_number": 0, "certs": []}).encode())
    write_crl(directory, days=crl_days)
    return ca_cert_path(directory)


def _check_namespace(index: dict, kind: str, name: str) -> None:
    """One MQTT username, one kind: a device called like an edge (or `cloud`) would inherit its ACL rights."""
    if kind == "cloud" and name != CLOUD_ID:
        raise PkiError(f"the cloud's identity is always {CLOUD_ID!r}")
    if kind in CLIENT_KINDS and kind != "cloud" and name == CLOUD_ID:
        raise PkiError(f"{CLOUD_ID!r} is reserved for the cloud aggregator")
    for entry in index["certs"]:
        if entry["name"] == name and entry["kind"] != kind and entry["kind"] in CLIENT_KINDS and kind in CLIENT_KINDS:
            raise PkiError(f"{name!r} is taken by a certificate of kind {entry['kind']}; MQTT usernames are unique")


def _valid_entries(index: dict, kind: str, name: str) -> list[dict]:
    return [e for e in index["certs"] if e["kind"] == kind and e["name"] == name and e["revoked_at"] is None]


def issue(directory: str | os.PathLike, kind: str, name: str = CLOUD_ID, hosts: Sequence[str] = (), days: int = 825,
          rotate: bool = False) -> Identity:
    """Issue a TLS certificate (CN = `name`) and, for clients, an Ed25519 signing keypair; for devices also a MAC
    master secret (`mac.key`), from which `enrolment(..., edge=E)` derives the key the device may tag updates to E.
    Edges and the cloud also get a certificate per extra connection (protocol.tls.ROLES, CN "NAME.ROLE"); a live
    identity issued before those existed gets just its missing role certificates.

    `server` certificates are for brokers: SAN localhost, 127.0.0.1, ::1 plus `hosts` (DNS names or IPs).
    Re-issuing a live identity needs `rotate=True`: new keys, and the old certificates are revoked (the CRL is
    rewritten; brokers pick it up on restart).
    """
    directory = Path(directory)
    ident = identity(directory, kind, name)
    roles = ROLES.get(kind, ())
    with _locked(directory) as index:
        _check_namespace(index, kind, name)
        live = _valid_entries(index, kind, name)
        have = {e.get("role") for e in live}
        if None in have and not rotate:
            wanted = [role for role in roles if role not in have]
            if not wanted:
                raise PkiError(f"{kind} {name!r} already has a valid certificate; use --rotate to replace its keys")
            live = []
        else:
            wanted = [None, *roles]
        ca_cert, ca_key = _load_ca(directory)
        now = _now()
        for role in wanted:
            cert_path, key_path = (ident.cert, ident.key) if role is None else ident.role(role)
            cert = _client_or_server_cert(ca_cert, ca_key, kind, name if role is None else role_cn(name, role),
                                          key_path, hosts, now, days)
            atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            index["certs"].append({"kind": kind, "name": name, "role": role, "serial": cert.serial_number,
                                   "not_after": cert.not_valid_after_utc.isoformat(), "revoked_at": None})
        if None in wanted and ident.sign_key is not None:
            signing_key = signing.generate_signing_key()
            signing.save_private_key(signing_key, ident.sign_key)
            signing.save_public_key(signing_key.public_key(), ident.sign_pub)
        if None in wanted and ident.mac_key is not None:
            signing.save_mac_key(signing.generate_mac_key(), ident.mac_key)
        for entry in live:
            entry["revoked_at"] = now.isoformat()
    if live:
        write_crl(directory)
    return ident


def _client_or_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, kind: str,
                           common_name: str, key_path: Path, hosts: Sequence[str], now: dt.datetime,
                           days: int) -> x509.Certificate:
    """A fresh key (written to `key_path`, 0600) and its certificate, for a client (clientAuth) or a broker
    (serverAuth, with SANs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(common_name, kind)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if kind == "server":
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(hosts)), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(key_path, _pem_key(key), mode=0o600)
    return builder.sign(ca_key, hashes.SHA256())


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in ("localhost", "127.0.0.1", "::1", *hosts):
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            general = x509.DNSName(host)
        if general not in names:
            names.append(general)
    return names


def revoke(directory: str | os.PathLike, name: str, kind: str | None = None) -> int:
    """Revoke every valid certificate of `name` and rewrite the CRL. Returns how many were revoked."""
    directory = Path(directory)
    with _locked(directory) as index:
        hits = [e for e in index["certs"]
                if e["name"] == name and e["revoked_at"] is None and kind in (None, e["kind"])]
        if not hits:
            raise PkiError(f"no valid certificate named {name!r}")
        for entry in hits:
            entry["revoked_at"] = _now().isoformat()
    write_crl(directory)
    return len(hits)


def write_crl(directory: str | os.PathLike, days: int = 365) -> Path:
    """Sign a fresh CRL of every revoked serial.

    Mosquitto's `crlfile` makes OpenSSL refuse *every* client once the CRL's nextUpdate has passed, so re-run this
    (a timer, or after each revoke) well before `days` run out.
    """
    directory = Path(directory)
    with _locked(directory) as index:
        ca_cert, ca_key = _load_ca(directory)
        index["crl_number"] += 1
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days))
                   .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        for entry in index["certs"]:
            if entry["revoked_at"] is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(entry["serial"])
                    .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"])).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        atomic_write(crl_path(directory), crl.public_bytes(serialization.Encoding.PEM))
    return crl_path(directory)


def export(directory: str | os.PathLike, out: str | os.PathLike, members: Sequence[tuple[str, str]]) -> Path:
    """Copy what one host needs (ca.crt, crl.pem, the listed (kind, name) identities) into `out`, never the CA key.

    The result is itself a valid `--pki` directory for `fediomt broker config` and the daemons.
    """
    directory, out = Path(directory), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for src in (ca_cert_path(directory), crl_path(directory)):
        shutil.copy2(src, out / src.name)
    for kind, name in members:
        src, dst = identity(directory, kind, name), identity(out, kind, name)
        if not src.cert.exists():
            raise PkiError(f"{kind} {name!r} is not issued in {directory}")
        dst.cert.parent.mkdir(parents=True, exist_ok=True)
        roles = [pair for role in ROLES.get(kind, ()) for pair in zip(src.role(role), dst.role(role))]
        for a, b in ((src.cert, dst.cert), (src.key, dst.key), (src.sign_key, dst.sign_key),
                     (src.sign_pub, dst.sign_pub), (src.mac_key, dst.mac_key), *roles):
            if a is not None and a.exists():  # older identities may lack mac.key and role certificates
                shutil.copy2(a, b)  # copy2 keeps the 0600 mode of private keys
    return out


def enrolment(directory: str | os.PathLike, out: str | os.PathLike, kind: str = "device",
              edge: str | None = None) -> list[str]:
    """Sync `out` to `{id}.pub` (Ed25519) and `{id}.crt` (its TLS certificate) of every `kind` identity with a
    valid certificate: the enrolment directory the edge gateway (device keys) or the cloud (edge keys) verifies
    signatures with. Revoked identities' files are removed, so revocation also stops their signed messages; the
    certificate lets an edge with `crl_file` refuse a revoked device before this is re-run. With `edge` (devices
    only) it also writes `{id}.mac`, the device's MAC key toward that edge alone (derived, never the master), so
    the edge can accept MAC-tagged updates. Returns the enrolled ids."""
    if edge is not None and kind != "device":
        raise PkiError("--edge derives device MAC keys: it needs --kind device")
    directory, out = Path(directory), Path(out)
    with _locked(directory) as index:
        valid = sorted({e["name"] for e in index["certs"] if e["kind"] == kind and e["revoked_at"] is None})
        revoked = {e["name"] for e in index["certs"] if e["kind"] == kind} - set(valid)
    out.mkdir(parents=True, exist_ok=True)
    for name in valid:
        ident = identity(directory, kind, name)
        atomic_write(out / f"{name}.pub", ident.sign_pub.read_bytes())   # key first: an edge that reads the two
        atomic_write(out / f"{name}.crt", ident.cert.read_bytes())       # mid-rotation refuses, never accepts
        if edge is not None:
            _enrol_mac(ident, check_id(edge), out / f"{name}.mac")
    for name in revoked:
        for suffix in (".pub", ".crt", ".mac"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    return valid


def _enrol_mac(ident: Identity, edge: str, path: Path) -> None:
    """Write the device's key toward `edge`; a device issued before MAC keys existed gets none (signatures only)."""
    try:
        master = signing.load_mac_key(ident.mac_key)
    except FileNotFoundError:
        path.unlink(missing_ok=True)
        return
    signing.save_mac_key(signing.derive_mac_key(master, ident.name, edge), path)


# ---- CLI -------------------------------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    print(init_ca(args.dir, days=args.days))
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    for kind in ("device", "edge", "server"):
        if getattr(args, kind) is not None:
            name = getattr(args, kind)
            break
    else:
        kind, name = "cloud", CLOUD_ID
    ident = issue(args.dir, kind, name, hosts=args.host, days=args.days, rotate=args.rotate)
    roles = [path for role in ROLES.get(kind, ()) for path in ident.role(role)]
    for path in (ident.cert, ident.key, ident.sign_key, ident.sign_pub, ident.mac_key, *roles):
        if path is not None:
            print(path)  # paths only: key material is never printed or logged
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    count = revoke(args.dir, args.id, kind=args.kind)
    print(f"revoked {count} certificate(s) of {args.id}; CRL: {crl_path(args.dir)}")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    print(write_crl(args.dir, days=args.days))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    members = [(kind, name) for kind in ("device", "edge", "server") for name in getattr(args, kind) or ()]
    members += [("cloud", CLOUD_ID)] if args.cloud else []
    print(export(args.dir, args.out, members))
    return 0


def _cmd_enrol(args: argparse.Namespace) -> int:
    ids = enrolment(args.dir, args.out, args.kind, args.edge)
    macs = f", with MAC keys toward edge {args.edge}" if args.edge else ""
    print(f"{len(ids)} {args.kind}(s) enrolled in {args.out}{macs}")
    return 0


def _safe(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except PkiError as exc:
            print(f"fediomt pki: {exc}", file=sys.stderr)
            return 1
    return run


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default="pki", help="PKI directory (default: ./pki)")

    p = sub.add_parser("init", parents=[common], help="create the consortium CA and an empty CRL")
    p.add_argument("--days", type=int, default=3650, help="CA validity (default 3650)")
    p.set_defaults(func=_safe(_cmd_init))

    p = sub.add_parser("issue", parents=[common], help="issue a TLS certificate (+ Ed25519 signing keys for clients, "
                                                   "role certificates for edges and the cloud)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", metavar="ID")
    who.add_argument("--edge", metavar="ID")
    who.add_argument("--cloud", action="store_true")
    who.add_argument("--server", metavar="NAME", help="a broker's server certificate")
    p.add_argument("--host", action="append", default=[],
                   help="extra DNS name or IP for a --server certificate (repeatable; localhost/127.0.0.1 always)")
    p.add_argument("--days", type=int, default=825, help="certificate validity (default 825)")
    p.add_argument("--rotate", action="store_true", help="replace the keys of a live identity, revoking the old cert")
    p.set_defaults(func=_safe(_cmd_issue))

    p = sub.add_parser("revoke", parents=[common], help="revoke every valid certificate of an identity")
    p.add_argument("id")
    p.add_argument("--kind", choices=KINDS, help="only certificates of this kind")
    p.set_defaults(func=_safe(_cmd_revoke))

    p = sub.add_parser("crl", parents=[common], help="re-sign the CRL (Mosquitto refuses everyone once it expires)")
    p.add_argument("--days", type=int, default=365, help="CRL validity (default 365)")
    p.set_defaults(func=_safe(_cmd_crl))

    p = sub.add_parser("export", parents=[common], help="copy one host's certificates and keys, without the CA key")
    p.add_argument("--out", required=True)
    p.add_argument("--device", action="append")
    p.add_argument("--edge", action="append")
    p.add_argument("--server", action="append")
    p.add_argument("--cloud", action="store_true")
    p.set_defaults(func=_safe(_cmd_export))

    p = sub.add_parser("enrol", parents=[common], help="sync a directory of {id}.pub signing keys (edge/cloud)")
    p.add_argument("--out", required=True, help="the edge's enrolment_dir (devices) or the cloud's (edges)")
    p.add_argument("--kind", choices=("device", "edge"), default="device")
    p.add_argument("--edge", metavar="ID", help="also write each device's MAC key toward this edge ({id}.mac, 0600)")
    p.set_defaults(func=_safe(_cmd_enrol))
