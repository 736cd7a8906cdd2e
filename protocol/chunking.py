"""Payloads larger than the broker's message cap (AWS IoT: 128 KB, some brokers 64 KB) travel as Chunk messages.

The receiver's Reassembler tolerates reordering and duplicates (MQTT QoS 1 redelivers, retained chunks replay),
checks every chunk against the first one of its transfer, verifies the SHA-256 of the whole, times out incomplete
sets, and bounds its memory: at most `max_transfers` open transfers holding at most `max_total_bytes` between
them, where each part also costs a fixed overhead so that a flood of one-byte chunks is bounded too.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

from protocol.errors import ProtocolError, Reason
from protocol.messages import Chunk, encode

PART_OVERHEAD = 128  # bytes charged per stored part on top of its data (dict slot, bytes object)
TRANSFER_ID_BYTES = 16


@lru_cache(maxsize=1)
def chunk_envelope_bytes() -> int:
    """CBOR bytes of a Chunk around its data, at the largest index/total/size values the schema allows."""
    worst = Chunk(transfer_id=b"\0" * 16, index=999_999, total=1_000_000, total_size=1 << 31, sha256=b"\0" * 32,
                  data=b"")
    return len(encode(worst)) + 4  # a byte string's length prefix grows from 1 to at most 5 bytes


def chunk_data_size(message_cap: int) -> int:
    """Data bytes per chunk so that every encoded Chunk fits a broker's message cap."""
    size = message_cap - chunk_envelope_bytes()
    if size < 1:
        raise ValueError(f"message cap {message_cap} cannot hold a chunk")
    return size


def split_payload(payload: bytes, max_chunk_bytes: int, transfer_id: bytes) -> list[Chunk]:
    """Chunks of at most max_chunk_bytes data each (all full but the last); one empty chunk for b""."""
    if len(transfer_id) != TRANSFER_ID_BYTES:
        raise ValueError("transfer_id must be 16 bytes")
    if max_chunk_bytes < 1:
        raise ValueError("max_chunk_bytes must be positive")
    digest = hashlib.sha256(payload).digest()
    total = max(1, -(-len(payload) // max_chunk_bytes))
    return [Chunk(transfer_id=transfer_id, index=i, total=total, total_size=len(payload), sha256=digest,
                  data=bytes(payload[i * max_chunk_bytes:(i + 1) * max_chunk_bytes])) for i in range(total)]


@dataclass
class _Transfer:
    total: int
    total_size: int
    sha256: bytes
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0

    def cost(self) -> int:
        return self.size + PART_OVERHEAD * len(self.parts)


class Reassembler:
    """Collects chunks per transfer_id; `add` returns the verified payload when the last missing part arrives."""

    def __init__(self, timeout_s: float = 60.0, max_total_bytes: int = 64 * 1024 * 1024, max_transfers: int = 16):
        self.timeout_s = timeout_s
        self.max_total_bytes = max_total_bytes
        self.max_transfers = max_transfers
        self._open: dict[bytes, _Transfer] = {}
        self._completed: OrderedDict[bytes, None] = OrderedDict()  # late duplicates of finished transfers
        self._cost = 0

    @property
    def buffered_bytes(self) -> int:
        return self._cost

    @property
    def open_transfers(self) -> int:
        return len(self._open)

    def add(self, chunk: Chunk, now: float | None = None) -> bytes | None:
        now = time.monotonic() if now is None else now
        self._check(chunk)
        tid = bytes(chunk.transfer_id)
        if tid in self._completed:
            return None
        t = self._open.get(tid)
        if t is None:
            self.expire(now)
            if len(self._open) >= self.max_transfers:
                raise ProtocolError(Reason.TOO_LARGE, f"{len(self._open)} transfers already open")
            t = _Transfer(chunk.total, chunk.total_size, bytes(chunk.sha256), now)
        elif (t.total, t.total_size, t.sha256) != (chunk.total, chunk.total_size, chunk.sha256):
            raise ProtocolError(Reason.MALFORMED, "chunk disagrees with the first chunk of its transfer")
        data = bytes(chunk.data)
        if chunk.index in t.parts:
            if t.parts[chunk.index] != data:
                raise ProtocolError(Reason.MALFORMED, f"conflicting copies of chunk {chunk.index}")
            return None
        missing_after = t.total - len(t.parts) - 1
        if t.size + len(data) + missing_after > t.total_size and t.total_size:
            raise ProtocolError(Reason.BAD_SHAPE, "chunks hold more data than total_size")
        if self._cost + len(data) + PART_OVERHEAD > self.max_total_bytes:
            raise ProtocolError(Reason.TOO_LARGE, "reassembly buffer full")
        self._open[tid] = t
        t.parts[chunk.index] = data
        t.size += len(data)
        self._cost += len(data) + PART_OVERHEAD
        if len(t.parts) < t.total:
            return None
        self._drop(tid)
        payload = b"".join(t.parts[i] for i in range(t.total))
        if len(payload) != t.total_size:
            raise ProtocolError(Reason.BAD_SHAPE, f"{len(payload)} bytes reassembled, {t.total_size} announced")
        if hashlib.sha256(payload).digest() != t.sha256:
            raise ProtocolError(Reason.BAD_HASH, "reassembled payload does not match its SHA-256")
        self._completed[tid] = None
        while len(self._completed) > 8 * self.max_transfers:
            self._completed.popitem(last=False)
        return payload

    def expire(self, now: float | None = None) -> list[bytes]:
        """Drop transfers older than timeout_s (counted from their first chunk, so a slow drip cannot keep one
        alive); returns their ids (the caller reports Reason.INCOMPLETE)."""
        now = time.monotonic() if now is None else now
        old = [tid for tid, t in self._open.items() if now - t.started >= self.timeout_s]
        for tid in old:
            self._drop(tid)
        return old

    def _drop(self, tid: bytes) -> None:
        t = self._open.pop(tid)
        self._cost -= t.cost()

    def _check(self, chunk: Chunk) -> None:
        """Chunk objects may come from anywhere (not only protocol.messages.decode): re-check what matters."""
        if len(chunk.transfer_id) != TRANSFER_ID_BYTES or len(chunk.sha256) != 32:
            raise ProtocolError(Reason.MALFORMED, "transfer_id must be 16 bytes and sha256 32")
        if not 0 <= chunk.index < chunk.total:
            raise ProtocolError(Reason.BAD_INDEX, f"chunk index {chunk.index} of {chunk.total}")
        if chunk.total_size > self.max_total_bytes:
            raise ProtocolError(Reason.TOO_LARGE, f"transfer of {chunk.total_size} bytes")
        if chunk.total > max(1, chunk.total_size) or len(chunk.data) > chunk.total_size:
            raise ProtocolError(Reason.BAD_SHAPE, "more chunks or data than total_size allows")
        if chunk.total_size and not chunk.data:
            raise ProtocolError(Reason.BAD_SHAPE, "empty chunk in a non-empty transfer")
