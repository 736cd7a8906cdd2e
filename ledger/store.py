"""The ledger on disk: SQLite in WAL mode, one transaction per appended block.

A kill -9 at any instant leaves the chain as it was before or after the append (SQLite's atomic commit); the
database holds each block's canonical CBOR as it was signed, so an audit (`verify_chain`) needs nothing else.
Opening a ledger decodes the chain to recover the head and balances; it does not re-check signatures (that is what
`fediomt ledger verify` is for).

The proposer's outbox lives in the same database: each round's contributions, queued once, and the block proposed
for the oldest queued round, stored before it is published. After a crash the proposer re-proposes exactly that
block (validators have signed it and refuse any other at its index) until it commits, then the next round's.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import cbor2

from ledger.chain import Block, Membership, apply, build_block, check_block
from ledger.scoring import Contribution
from protocol.errors import ProtocolError, Reason

SCHEMA = "CREATE TABLE IF NOT EXISTS blocks (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL)"
VOTES = "CREATE TABLE IF NOT EXISTS votes (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL)"
OUTBOX = ("CREATE TABLE IF NOT EXISTS outbox (round_id INTEGER PRIMARY KEY, model_version INTEGER NOT NULL, "
          "contributions BLOB NOT NULL, block BLOB)")


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SCHEMA)
    conn.execute(VOTES)
    conn.execute(OUTBOX)
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

    def enqueue(self, round_id: int, model_version: int, contributions: Iterable[Contribution]) -> bool:
        """Queue one round's record for the chain (durably). The first call for a round wins, so a round re-run
        after a crash keeps the record a proposal may already carry; False when it is queued or past the head."""
        data = cbor2.dumps([[c.participant, int(c.samples), bool(c.on_time), bool(c.flagged), float(c.quality),
                             float(c.loo), float(c.shapley)] for c in contributions], canonical=True)
        with self._lock:
            if self._head is not None and round_id <= self._head.round_id:
                return False
            cur = self._conn.execute("INSERT OR IGNORE INTO outbox (round_id, model_version, contributions) "
                                     "VALUES (?, ?, ?)", (round_id, model_version, data))
            return cur.rowcount == 1

    def next_proposal(self) -> Block | None:
        """The block to propose next: the stored proposal of the oldest queued round while it still extends the
        head, else one built now and stored before anyone sees it. None when every queued round is on the chain;
        ProtocolError (the round is dropped) when its record cannot make a valid block."""
        with self._lock:
            head = self._head
            if head is None:
                return None
            self._conn.execute("DELETE FROM outbox WHERE round_id <= ?", (head.round_id,))  # committed
            row = self._conn.execute("SELECT round_id, model_version, contributions, block FROM outbox "
                                     "ORDER BY round_id LIMIT 1").fetchone()
            if row is None:
                return None
            round_id, model_version, contributions, stored = row
            if stored is not None:
                block = Block.from_cbor(stored)
                if block.index == head.index + 1 and block.prev_hash == head.hash:
                    return block
            try:
                block = propose_block(self, round_id, model_version,
                                      [Contribution(*c) for c in cbor2.loads(contributions)])
            except ProtocolError as exc:  # e.g. a NaN score: no block can carry it, and it must not block the rest
                self.drop(round_id)
                raise ProtocolError(exc.reason, f"round {round_id} dropped: {exc.detail}") from None
            self._conn.execute("UPDATE outbox SET block = ? WHERE round_id = ?", (block.to_cbor(), round_id))
            return block

    def drop(self, round_id: int) -> None:
        """Give up a queued round (its block was refused: it can never commit)."""
        with self._lock:
            self._conn.execute("DELETE FROM outbox WHERE round_id = ?", (round_id,))

    def round_block(self, round_id: int) -> Block | None:
        """The block that records `round_id` (round ids increase along the chain: a short walk back from the head)."""
        with self._lock:
            for index in range(self.height - 1, 0, -1):
                block = self.block(index)
                if block is None or block.round_id <= round_id:
                    return block if block is not None and block.round_id == round_id else None
        return None

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
