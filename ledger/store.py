"""The ledger on disk: SQLite in WAL mode, one transaction per appended block.

A kill -9 at any instant leaves the chain as it was before or after the append (SQLite's atomic commit); the
database holds each block's canonical CBOR as it was signed, so an audit (`verify_chain`) needs nothing else.
Opening a ledger decodes the chain to recover the head and balances; it does not re-check signatures (that is what
`fediomt ledger verify` is for).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ledger.chain import Block, Membership, apply, build_block, check_block
from ledger.scoring import Contribution
from protocol.errors import ProtocolError, Reason

SCHEMA = "CREATE TABLE IF NOT EXISTS blocks (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL)"
VOTES = "CREATE TABLE IF NOT EXISTS votes (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL)"


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SCHEMA)
    conn.execute(VOTES)
    return conn


class Ledger:
    """One validator's copy of the chain. Thread-safe (MQTT callbacks append while the owner reads)."""

    def __init__(self, path: str | os.PathLike, conn: sqlite3.Connection) -> None:
        self.path = Path(path)
        self._conn = conn
        self._lock = threading.RLock()
        self._head: Block | None = None
        self._membership: Membership | None = None
        self._balances: dict[str, int] = {}
        for data in self.raw_blocks():
            block = Block.from_cbor(data)
            if block.membership is not None:
                self._membership = block.membership
            apply(self._balances, block)
            self._head = block

    @classmethod
    def open(cls, path: str | os.PathLike) -> Ledger:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(path, connect(path))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def head(self) -> Block | None:
        return self._head

    @property
    def height(self) -> int:
        """Number of blocks, genesis included."""
        return 0 if self._head is None else self._head.index + 1

    @property
    def membership(self) -> Membership | None:
        return self._membership

    def balances(self) -> dict[str, int]:
        with self._lock:
            return dict(self._balances)

    def raw_blocks(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Stored bytes of blocks start <= index < stop, in order."""
        with self._lock:
            rows = self._conn.execute("SELECT data FROM blocks WHERE idx >= ? AND idx < ? ORDER BY idx",
                                      (start, 2**62 if stop is None else stop)).fetchall()
        return [r[0] for r in rows]

    def block(self, index: int) -> Block | None:
        raw = self.raw_blocks(index, index + 1)
        return Block.from_cbor(raw[0]) if raw else None

    def check(self, block: Block, require_quorum: bool = True) -> None:
        """Raise ProtocolError unless `block` may extend this chain (without the quorum: may be signed)."""
        with self._lock:
            check_block(block, self._head, self._membership, self._balances, require_quorum)

    def vote(self, block: Block) -> None:
        """Record that this validator endorses `block`; refuse to endorse a different block at the same index.

        Signing at most one block per index (durably, so also across restarts) is what stops a proposer that
        equivocates from getting two conflicting blocks signed by a quorum. Re-signing the same block is fine.
        """
        with self._lock:
            row = self._conn.execute("SELECT hash FROM votes WHERE idx = ?", (block.index,)).fetchone()
            if row is not None and row[0] != block.hash:
                raise ProtocolError(Reason.DUPLICATE, f"already signed another block at index {block.index}")
            self._conn.execute("INSERT OR IGNORE INTO votes (idx, hash) VALUES (?, ?)", (block.index, block.hash))

    def append(self, block: Block) -> None:
        """Validate `block` against this chain (links, quorum of known signatures, totals) and store it atomically.

        Raises ProtocolError (the chain is unchanged) when any rule fails, DUPLICATE when the block is already here.
        """
        data = block.to_cbor()
        block = Block.from_cbor(data)  # what is stored must pass the strict decoder that `verify` applies
        with self._lock:
            if self._head is not None and block.index <= self._head.index:
                stored = self.block(block.index)
                if stored is not None and stored.hash == block.hash:
                    raise ProtocolError(Reason.DUPLICATE, f"block {block.index} is already in the ledger")
            self.check(block)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                (top,) = self._conn.execute("SELECT coalesce(max(idx), -1) FROM blocks").fetchone()
                if top != block.index - 1:
                    raise ProtocolError(Reason.BAD_INDEX, f"another writer moved the ledger to block {top}")
                self._conn.execute("INSERT INTO blocks (idx, hash, data) VALUES (?, ?, ?)",
                                   (block.index, block.hash, data))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if block.membership is not None:
                self._membership = block.membership
            apply(self._balances, block)
            self._head = block


def propose_block(ledger: Ledger, round_id: int, model_version: int, contributions: Iterable[Contribution],
                  time_ms: int | None = None) -> Block:
    """The next block of `ledger` for one round (unsigned: collect a quorum with `sign_block`, then `append`)."""
    with ledger._lock:
        if ledger.head is None or ledger.membership is None:
            raise ProtocolError(Reason.INCOMPLETE, "the ledger has no genesis block")
        return build_block(ledger.head, ledger.membership.policy, ledger.balances(), round_id, model_version,
                           contributions, int(time.time() * 1000) if time_ms is None else time_ms)
