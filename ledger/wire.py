"""Strict decoding of the ledger's CBOR objects with the wire codec's rules.

Ledger objects are not registered wire messages (they have their own `fl/ledger/...` topics and their own schema
version), so they are decoded straight into their dataclass by the codec's builder: exact keys and CBOR types,
finite floats, field limits, no tags, no trailing bytes. Anything else is a ProtocolError.
"""

from __future__ import annotations

import io
from typing import TypeVar

import cbor2

from protocol import codec
from protocol.errors import ProtocolError, Reason

T = TypeVar("T")


def from_cbor(cls: type[T], data: bytes, max_bytes: int) -> T:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.MALFORMED, "not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(Reason.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream, tag_hook=codec._reject_tags).decode()
    except Exception as exc:  # cbor2 raises many types on garbage
        raise ProtocolError(Reason.MALFORMED, f"not CBOR: {type(exc).__name__}") from None
    if stream.tell() != len(data):
        raise ProtocolError(Reason.MALFORMED, "trailing bytes")
    return codec._build(cls, obj, cls.__name__)
