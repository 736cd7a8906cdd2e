"""Ed25519 identity keys and signatures (devices, edges, the cloud, model bundles, ledger validators)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.atomic import atomic_write
from protocol.errors import ProtocolError, Reason

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


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
