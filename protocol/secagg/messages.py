"""Wire messages of the secure-aggregation protocol (one kind per step, `secagg.<step>`).

Device -> edge messages are signed by the device's Ed25519 identity key and carry a fresh nonce; edge -> device
messages need no signature of their own: the roster relays the devices' signed key adverts, and shares are
authenticated end to end by their AEAD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.messages import Scalar, limit, register

ID = limit(max_len=64, min_len=1)
IDS = limit(max_len=100_000, items=ID)
KEY = limit(max_len=32, min_len=32)
NONCE = limit(max_len=16, min_len=16)
SIG = limit(max_len=64)
ROUND = limit(min_value=0)


@register("secagg.open")
@dataclass(frozen=True)
class RoundOpen:
    """Edge -> devices (retained while the round runs): SecAgg for this round is listening; advertise keys now.
    `length` is how many coordinates each device masks (the model size, or k under random-k sparsification)."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    length: int = field(metadata=limit(min_value=1, max_value=100_000_000))


@register("secagg.advertise")
@dataclass(frozen=True)
class AdvertiseKeys:
    """Step 0, device -> edge: this round's X25519 keys (c: share encryption, s: masks) and a commitment to the
    self-mask seed, so that the edge can check the seed it reconstructs instead of trusting the shares."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    device_id: str = field(metadata=ID)
    c_pk: bytes = field(metadata=KEY)
    s_pk: bytes = field(metadata=KEY)
    seed_commit: bytes = field(metadata=KEY)
    nonce: bytes = field(metadata=NONCE)
    sig: bytes = field(default=b"", metadata=SIG)


@register("secagg.roster")
@dataclass(frozen=True)
class Roster:
    """Edge -> devices: the signed adverts of the cohort, the settings and the length of the masked vector."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    config: dict[str, Scalar] = field(metadata=limit(max_len=32))
    length: int = field(metadata=limit(min_value=1, max_value=100_000_000))
    adverts: list[AdvertiseKeys] = field(metadata=limit(max_len=100_000))


@dataclass(frozen=True)
class SealedShare:
    """Shares of one device's two secrets for one recipient, under ChaCha20-Poly1305."""

    sender: str = field(metadata=ID)
    recipient: str = field(metadata=ID)
    nonce: bytes = field(metadata=limit(max_len=12, min_len=12))
    ciphertext: bytes = field(metadata=limit(max_len=256))


@register("secagg.shares")
@dataclass(frozen=True)
class ShareKeys:
    """Step 1, device -> edge: one sealed share per neighbour."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    device_id: str = field(metadata=ID)
    shares: list[SealedShare] = field(metadata=limit(max_len=100_000))
    nonce: bytes = field(metadata=NONCE)
    sig: bytes = field(default=b"", metadata=SIG)


@register("secagg.inbox")
@dataclass(frozen=True)
class ShareInbox:
    """Edge -> one device: the sealed shares addressed to it; their senders are the neighbours it masks with."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    device_id: str = field(metadata=ID)
    shares: list[SealedShare] = field(metadata=limit(max_len=100_000))


@register("secagg.masked")
@dataclass(frozen=True)
class MaskedInput:
    """Step 2, device -> edge: the masked, quantized vector (R-bit packed) and the neighbours whose share failed
    authentication or was replayed (the edge drops those devices)."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    device_id: str = field(metadata=ID)
    data: bytes
    bad_senders: list[str] = field(metadata=IDS)
    nonce: bytes = field(metadata=NONCE)
    sig: bytes = field(default=b"", metadata=SIG)


@register("secagg.unmask")
@dataclass(frozen=True)
class UnmaskRequest:
    """Edge -> surviving devices: whose input is in the sum (reveal self-mask seed shares) and who dropped
    (reveal mask-key shares). A device answers one request per round and refuses overlapping sets."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    survivors: list[str] = field(metadata=IDS)
    dropped: list[str] = field(metadata=IDS)


@register("secagg.reveal")
@dataclass(frozen=True)
class UnmaskShares:
    """Step 3, device -> edge: shares of survivors' self-mask seeds and of dropped devices' mask keys."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    device_id: str = field(metadata=ID)
    seed_shares: dict[str, bytes] = field(metadata=limit(max_len=100_000, items=limit(max_len=64)))
    key_shares: dict[str, bytes] = field(metadata=limit(max_len=100_000, items=limit(max_len=64)))
    nonce: bytes = field(metadata=NONCE)
    sig: bytes = field(default=b"", metadata=SIG)


@register("secagg.outcome")
@dataclass(frozen=True)
class Outcome:
    """Edge -> devices: the round's end (whose inputs are in the sum) or its abort, so nobody waits in vain."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=ROUND)
    aborted: bool
    survivors: list[str] = field(metadata=IDS)
    detail: str = field(default="", metadata=limit(max_len=256))
