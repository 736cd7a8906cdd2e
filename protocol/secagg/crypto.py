"""Key agreement, share encryption and the mask PRG of the protocol (all from `cryptography`).

- X25519 agreement, then HKDF-SHA256 with a purpose label and the round context: the key that encrypts shares and
  the seed of a pairwise mask are independent even though they come from per-round ephemeral keys.
- Shares travel under ChaCha20-Poly1305 with associated data (context, sender, recipient): a share moved to another
  round, sender or recipient fails authentication, as does any flipped bit.
- Masks are the ChaCha20 keystream under a 32-byte seed, read as little-endian uint32 (uniform on Z_2^32).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import ProtocolError, Reason

KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
_PRG_NONCE = bytes(16)  # every seed is used for exactly one keystream


def context(edge_id: str, round_id: int) -> bytes:
    """Binds every derived key and ciphertext to one edge's round (ids cannot contain '|')."""
    return f"fediomt-secagg|{edge_id}|{round_id}".encode()


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def agree(key: X25519PrivateKey, peer_public: bytes, purpose: bytes, ctx: bytes) -> bytes:
    """A 32-byte key shared by the two ends of (key, peer_public), specific to `purpose` and the round."""
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # wrong length or a low-order point (all-zero shared secret)
        raise ProtocolError(Reason.SECAGG_ABORT, "unusable X25519 public key") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=purpose + b"|" + ctx).derive(shared)


def _ad(ctx: bytes, sender: str, recipient: str) -> bytes:
    return b"|".join((ctx, sender.encode(), recipient.encode()))


def seal(key: bytes, plaintext: bytes, ctx: bytes, sender: str, recipient: str) -> tuple[bytes, bytes]:
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce, ChaCha20Poly1305(key).encrypt(nonce, plaintext, _ad(ctx, sender, recipient))


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, ctx: bytes, sender: str, recipient: str) -> bytes:
    if len(nonce) != AEAD_NONCE_BYTES:
        raise ProtocolError(Reason.MALFORMED, "AEAD nonce of the wrong size")
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, _ad(ctx, sender, recipient))
    except InvalidTag:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"share from {sender} fails authentication") from None


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 values expanded from a 32-byte seed."""
    encryptor = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), "<u4")
