"""Mutual-TLS identities on disk and the one client-side TLS context built from them.

`fediomt pki` issues certificates into this layout; the tiers only read it (the ledger replica's `--pki`, the
broker configuration), so the layout and the context live here, below every tier, and the issuing stays in fediomt.
    DIR/ca.crt, DIR/crl.pem
    DIR/{devices,edges,cloud,servers}/NAME/tls.crt, tls.key (+ sign.key, sign.pub; mac.key for devices)
    DIR/{edges,cloud}/NAME/ROLE.crt, ROLE.key   (role certificates, CN "NAME.ROLE": see ROLES)
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from protocol.topics import check_id

CLIENT_KINDS = ("device", "edge", "cloud")
KINDS = (*CLIENT_KINDS, "server")
_SUBDIR = {"device": "devices", "edge": "edges", "cloud": "cloud", "server": "servers"}
# The connections an identity holds besides its main one, each with a certificate of its own (CN "NAME.ROLE"):
# the brokers make every client id the certificate's CN, so two connections never share a certificate, and nobody
# can connect under another's client id to take its place (issue 18). A "." never occurs in an id (check_id), so
# no device, edge or cloud can be issued a role's name.
ROLES = {"cloud": ("secagg", "ledger", "push"), "edge": ("ledger",)}


@dataclass(frozen=True)
class Identity:
    """Paths of one issued identity. `sign_key`/`sign_pub` are None for broker (server) certificates; `mac_key`
    (the device's MAC master secret) is None except for devices."""

    kind: str
    name: str
    cert: Path
    key: Path
    ca: Path
    sign_key: Path | None
    sign_pub: Path | None
    mac_key: Path | None

    def role(self, role: str) -> tuple[Path, Path]:
        """The certificate and key of one of this identity's extra connections (ROLES), beside its own."""
        if role not in ROLES.get(self.kind, ()):
            raise ValueError(f"a {self.kind} has no {role!r} connection: roles are {ROLES.get(self.kind, ())}")
        return role_files(self.cert, role)


def role_files(cert: str | os.PathLike, role: str) -> tuple[Path, Path]:
    """The `role` certificate and key that live beside an identity's own certificate `cert`: ROLE.crt, ROLE.key."""
    return Path(cert).with_name(f"{role}.crt"), Path(cert).with_name(f"{role}.key")


def role_cn(name: str, role: str) -> str:
    """The CN (MQTT username and, on the brokers, client id) of `name`'s `role` certificate."""
    return f"{check_id(name)}.{role}"


def ca_cert_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / "ca.crt"


def crl_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / "crl.pem"


def identity(directory: str | os.PathLike, kind: str, name: str) -> Identity:
    """The paths where `kind`/`name` lives (it need not be issued yet)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    d = Path(directory) / _SUBDIR[kind] / check_id(name)
    signs = kind != "server"
    return Identity(kind, name, d / "tls.crt", d / "tls.key", ca_cert_path(directory),
                    d / "sign.key" if signs else None, d / "sign.pub" if signs else None,
                    d / "mac.key" if kind == "device" else None)


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client-side TLS 1.3 context (the brokers accept nothing older) for paho's `tls_set_context` or a raw socket:
    verifies the broker against `ca`, including its host name or IP, and presents `cert` when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def identity_context(ident: Identity) -> ssl.SSLContext:
    """Mutual TLS as `ident`: the consortium CA and `ident`'s own certificate."""
    return client_context(ident.ca, ident.cert, ident.key)
