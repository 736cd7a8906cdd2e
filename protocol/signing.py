"""Ed25519 identity keys and signatures (devices, edges, the cloud, model bundles, ledger validators), and the
devices' MAC master secrets with the per-(device, edge) keys derived from them (SECURITY.md)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.atomic import atomic_write
from protocol.errors import ProtocolError, Reason

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAC_KEY_BYTES = 32
MAC_INFO = b"fediomt update mac v1|"


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike) -> None:
    """PEM (PKCS#8, unencrypted: the file mode 0600 is the protection on a device)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)


def save_public_key(key: Ed25519PublicKey, path: str | os.PathLike) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(path, pem, mode=0o644)


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ProtocolError(Reason.MALFORMED, f"public key of {len(raw)} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Raise ProtocolError(BAD_SIGNATURE) unless `signature` is `public_key`'s signature of `data`."""
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"signature of {len(signature)} bytes")
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise ProtocolError(Reason.BAD_SIGNATURE, "signature does not verify") from None


def generate_mac_key() -> bytes:
    return os.urandom(MAC_KEY_BYTES)


def save_mac_key(key: bytes, path: str | os.PathLike) -> None:
    """Raw 32 bytes, mode 0600 (a master secret on a device, a derived key in an edge's enrolment directory)."""
    atomic_write(path, key, mode=0o600)


def load_mac_key(path: str | os.PathLike) -> bytes:
    key = Path(path).read_bytes()
    if len(key) != MAC_KEY_BYTES:
        raise ValueError(f"{path}: a MAC key is {MAC_KEY_BYTES} bytes, not {len(key)}")
    return key


def derive_mac_key(master: bytes, device_id: str, edge_id: str) -> bytes:
    """K_{d,E} = HKDF-SHA256(master, info = MAC_INFO | d | E): the key device d tags its updates to edge E with.
    Ids cannot contain "|" (protocol.topics.check_id), so the info string is unambiguous."""
    info = MAC_INFO + device_id.encode() + b"|" + edge_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=MAC_KEY_BYTES, salt=None, info=info).derive(master)
