"""Enrolment keys with live revocation: who may sign messages to this daemon, re-checked without a restart.

An enrolment directory (`fediomt pki enrol`) holds `{id}.pub` (the Ed25519 key its messages are signed with),
`{id}.crt` (its TLS certificate, whose serial the consortium CRL may list) and, at an edge enrolled with `--edge`,
`{id}.mac` (the device's HMAC key toward this edge). The edge gateway checks device updates
against its devices' directory, the cloud checks edge aggregates against its edges' directory; both refuse an
identity whose files were removed or whose certificate was revoked within `check_s` seconds (docs/deployment.md).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from protocol import signing
from protocol.errors import ProtocolError, Reason
from protocol.logs import event
from protocol.topics import check_id

Stamp = tuple[int, int, int]   # (mtime_ns, size, inode): changes when a file is rewritten or replaced (rename)
ENROLMENT_FILES = (".pub", ".crt", ".mac")


def stamp(path: str | os.PathLike | os.DirEntry) -> Stamp | None:
    """The file's stamp, or None when it is missing or unreadable."""
    try:
        st = path.stat() if isinstance(path, os.DirEntry) else os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def stamps(directory: Path) -> dict[str, Stamp]:
    """{file name: stamp} of the enrolment files in `directory` (empty when it is missing): one stat per file."""
    try:
        with os.scandir(directory) as entries:
            found = {e.name: stamp(e) for e in entries if e.name.endswith(ENROLMENT_FILES)}
    except OSError:
        return {}
    return {name: s for name, s in found.items() if s is not None}


def changed_ids(old: dict[str, Stamp], new: dict[str, Stamp]) -> set[str]:
    """Device ids with an enrolment file added, removed, rewritten or replaced between two snapshots."""
    return {name.rsplit(".", 1)[0] for name in old.keys() | new.keys() if old.get(name) != new.get(name)}


def revoked_serials(path: Path) -> frozenset[int]:
    """Serial numbers in a PEM CRL (the one the brokers' `crlfile` names). ValueError when unreadable or malformed.
    Its nextUpdate is not enforced here: an expired CRL already locks every client out at the broker."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(str(exc)) from None
    return frozenset(revoked.serial_number for revoked in x509.load_pem_x509_crl(data))


@dataclass(frozen=True)
class Enrolled:
    """One enrolled sender's credentials: its signature key, its TLS certificate serial (for the CRL), its MAC key."""

    key: Ed25519PublicKey
    serial: int | None   # of the device's TLS certificate ({id}.crt), checked against the CRL; None = no .crt
    mac: bytes | None = None  # its MAC key toward this edge ({id}.mac); None = signatures only


def load_enrolled(directory: Path, device_id: str) -> Enrolled:
    """`{id}.pub` and, when present, `{id}.crt` (whose CN must be the id) and `{id}.mac`. FileNotFoundError when
    the device is not enrolled, ValueError when a file is unusable."""
    key = signing.load_public_key(directory / f"{device_id}.pub")
    return Enrolled(key, _serial(directory, device_id), _optional_mac(directory / f"{device_id}.mac"))


def _serial(directory: Path, device_id: str) -> int | None:
    try:
        cert = x509.load_pem_x509_certificate((directory / f"{device_id}.crt").read_bytes())
    except FileNotFoundError:
        return None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise ValueError(f"{device_id}.crt is issued to {names}")
    return cert.serial_number


def _optional_mac(path: Path) -> bytes | None:
    try:
        return signing.load_mac_key(path)
    except FileNotFoundError:
        return None


class KeyRing:
    """Enrolled senders' keys (devices at an edge, edges at the cloud), cached for the hot path, which costs one
    monotonic-clock comparison per message.

    At most every `check_s` seconds (or on the next `get` after `expire()`, e.g. on SIGHUP) the ring re-stats the
    enrolment directory and the CRL: rewritten or replaced files are reloaded, removed ones forgotten, and devices
    whose certificate serial the CRL lists are refused (REVOKED), so removal, revocation and key replacement take
    effect within `check_s` without a restart. A device not seen before is loaded on its first update, so
    enrolling needs no wait. A file that fails to load is logged and the previous good state is kept.
    """

    def __init__(self, directory: str | os.PathLike, crl: str | os.PathLike | None = None, check_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, log: logging.Logger | None = None) -> None:
        self.directory = Path(directory)
        self.crl = None if crl is None else Path(crl)
        self.check_s, self.clock = check_s, clock
        self.log = log or logging.getLogger("fediomt.keyring")
        self._keys: dict[str, Enrolled] = {}
        self._usable: dict[str, Enrolled] = {}   # the hot path's view: enrolled and not revoked
        self._stamps: dict[str, Stamp] = {}
        self._crl_stamp: Stamp | None = None
        self._revoked: frozenset[int] = frozenset()
        self.revalidate()

    def get(self, device_id: str) -> Ed25519PublicKey:
        return self.entry(device_id).key

    def entry(self, device_id: str) -> Enrolled:
        """The sender's enrolled keys (signature and, when enrolled, MAC), or ProtocolError."""
        if self.clock() >= self._next_check:
            self.revalidate()
        entry = self._usable.get(device_id)
        return entry if entry is not None else self._admit(device_id)

    def enrolled(self) -> set[str]:
        return {p.stem for p in self.directory.glob("*.pub")} if self.directory.is_dir() else set()

    def expire(self) -> None:
        """Revalidate on the next `get`. Safe in a signal handler: it only assigns a number."""
        self._next_check = -math.inf

    def revalidate(self) -> None:
        """Re-read the CRL and the enrolment files whose stamp changed since the last check."""
        self._next_check = self.clock() + self.check_s
        self._reload_crl()
        current = stamps(self.directory)
        changed = changed_ids(self._stamps, current) & self._keys.keys()
        self._stamps = current
        if changed:
            self._usable = {}
        for device_id in changed:
            try:
                self._keys[device_id] = load_enrolled(self.directory, device_id)
            except FileNotFoundError:
                del self._keys[device_id]
                event(self.log, "device enrolment removed", device=device_id)
            except ValueError as exc:
                event(self.log, "enrolment file unusable, keeping the previous key", logging.ERROR,
                      device=device_id, error=str(exc))

    def _reload_crl(self) -> None:
        if self.crl is None or stamp(self.crl) == self._crl_stamp:
            return
        self._crl_stamp = stamp(self.crl)
        try:
            self._revoked, self._usable = revoked_serials(self.crl), {}
        except ValueError as exc:
            event(self.log, "CRL unusable, keeping the previous revocations", logging.ERROR, path=str(self.crl),
                  error=str(exc))
            return
        event(self.log, "CRL loaded", path=str(self.crl), revoked=len(self._revoked))

    def _admit(self, device_id: str) -> Enrolled:
        """The slow path: load a device not seen before, refuse a revoked one, else cache its keys for `entry`."""
        entry = self._keys.get(device_id) or self._load(device_id)
        if entry.serial in self._revoked:
            raise ProtocolError(Reason.REVOKED, f"{device_id}: certificate {entry.serial:x} is revoked")
        self._usable[device_id] = entry
        return entry

    def _load(self, device_id: str) -> Enrolled:
        try:
            entry = self._keys[device_id] = load_enrolled(self.directory, check_id(device_id))
        except FileNotFoundError:
            raise ProtocolError(Reason.UNKNOWN_SENDER, f"{device_id} is not enrolled") from None
        except ValueError as exc:
            raise ProtocolError(Reason.UNKNOWN_SENDER, f"{device_id}: unusable enrolment key: {exc}") from None
        return entry
