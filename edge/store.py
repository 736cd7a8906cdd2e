"""Crash-safe round state in SQLite (WAL): an update is stored, with its nonce, by one INSERT that makes it count,
before the broker gets its PUBACK; closing a round (outbox entry + rows marked aggregated) is one transaction. After
kill -9 the gateway reloads exactly the rows that were committed: nothing lost, nothing counted twice.

Duplicate and replay checks are the INSERT's own constraints (the (device, round) primary key, a unique
(device, nonce) index), so an accepted update costs one statement and no read; only a refused one is read back to
say which constraint refused it.

`synchronous = NORMAL` (default): a WAL commit is a write() into the OS page cache, fsynced at checkpoints, so a
committed update survives kill -9 of the edge but not power loss; `full` also survives power loss, at an fsync per
commit (per group commit in the gateway).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.errors import ProtocolError, Reason

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS updates (
    device_id TEXT NOT NULL, round_id INTEGER NOT NULL, batch INTEGER,
    base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, train_loss REAL NOT NULL,
    compute_class TEXT NOT NULL, staleness INTEGER NOT NULL, epsilon REAL NOT NULL, local_steps INTEGER NOT NULL,
    nbytes INTEGER NOT NULL, indices BLOB, vals BLOB, control BLOB, received REAL NOT NULL, nonce BLOB NOT NULL,
    PRIMARY KEY (device_id, round_id));
CREATE TABLE IF NOT EXISTS outbox (batch INTEGER PRIMARY KEY, payload BLOB NOT NULL, published INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS statuses (device_id TEXT PRIMARY KEY, state TEXT NOT NULL, round_id INTEGER);
CREATE INDEX IF NOT EXISTS updates_pending ON updates (batch);
CREATE UNIQUE INDEX IF NOT EXISTS updates_nonce ON updates (device_id, nonce);
"""
INSERT = ("INSERT INTO updates (device_id, round_id, base_version, num_samples, train_loss, compute_class, staleness,"
          " epsilon, local_steps, nbytes, indices, vals, control, received, nonce)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True)
class Stored:
    """One accepted update as the aggregate needs it."""

    device_id: str
    round_id: int
    base_version: int
    num_samples: int
    train_loss: float
    compute_class: str
    staleness: int
    epsilon: float
    local_steps: int
    nbytes: int
    indices: np.ndarray | None   # int32, None for a dense update
    values: np.ndarray           # float32
    control: np.ndarray | None = None  # SCAFFOLD control-variate delta (dense float32), when sent


class Store:
    """The edge's crash-safe SQLite round store: an update counts once its INSERT commits, nothing is counted twice."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"store synchronous {synchronous!r} not in ('normal', 'full')")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """All or nothing: its own transaction, or a savepoint inside a `group()`."""
        self.db.execute("SAVEPOINT tx")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK TO tx")
            self.db.execute("RELEASE tx")
            raise
        self.db.execute("RELEASE tx")

    @contextmanager
    def group(self) -> Iterator[None]:
        """Group commit: everything inside becomes durable in one commit (the caller acknowledges nothing it
        received inside before the block has exited)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ key/value state
    def get(self, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------ device statuses
    def set_status(self, device_id: str, state: str, round_id: int | None) -> None:
        """A device's last known status: it outlives rounds and restarts (an offline device stays excused)."""
        self.db.execute("INSERT OR REPLACE INTO statuses VALUES (?, ?, ?)", (device_id, state, round_id))

    def statuses(self) -> dict[str, tuple[str, int | None]]:
        return {d: (state, r) for d, state, r in self.db.execute("SELECT device_id, state, round_id FROM statuses")}

    # ------------------------------------------------------------ updates
    def has(self, device_id: str, round_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM updates WHERE device_id = ? AND round_id = ?",
                               (device_id, round_id)).fetchone() is not None

    def add(self, u: Stored, nonce: bytes) -> None:
        """Store an update and its nonce (one statement: atomic, and a commit of its own outside `group()`);
        ProtocolError(DUPLICATE) when (device, round) is already stored, REPLAY when the device used the nonce
        before."""
        idx = None if u.indices is None else u.indices.astype("<i4", copy=False).tobytes()
        try:
            self.db.execute(INSERT, (
                u.device_id, u.round_id, u.base_version, u.num_samples, u.train_loss, u.compute_class, u.staleness,
                u.epsilon, u.local_steps, u.nbytes, idx, u.values.astype("<f4", copy=False).tobytes(),
                None if u.control is None else u.control.astype("<f4", copy=False).tobytes(), time.time(), nonce))
        except sqlite3.IntegrityError:  # the row is validated: only the two uniqueness constraints can refuse it
            if self.has(u.device_id, u.round_id):
                raise ProtocolError(Reason.DUPLICATE, f"{u.device_id} already counted in round {u.round_id}") from None
            raise ProtocolError(Reason.REPLAY, f"nonce from {u.device_id} seen before") from None

    def pending(self) -> list[Stored]:
        """Accepted updates not yet aggregated, in arrival order."""
        rows = self.db.execute(
            "SELECT device_id, round_id, base_version, num_samples, train_loss, compute_class, staleness, epsilon,"
            " local_steps, nbytes, indices, vals, control FROM updates WHERE batch IS NULL ORDER BY rowid").fetchall()
        return [Stored(*r[:10], None if r[10] is None else np.frombuffer(r[10], dtype="<i4"),
                       np.frombuffer(r[11], dtype="<f4"), None if r[12] is None else np.frombuffer(r[12], dtype="<f4"))
                for r in rows]

    # ------------------------------------------------------------ closing
    def close_batch(self, batch: int, devices: list[tuple[str, int]], payload: bytes, state: dict[str, bytes]) -> None:
        """One transaction: queue the aggregate, mark its updates aggregated (their deltas dropped, their
        (device, round) kept for duplicate detection) and save the gateway state that goes with it."""
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?, 0)", (batch, payload))
            self.db.executemany("UPDATE updates SET batch = ?, indices = NULL, vals = x'', control = NULL"
                                " WHERE device_id = ? AND round_id = ?", [(batch, d, r) for d, r in devices])
            self.db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", list(state.items()))

    def undelivered(self) -> list[tuple[int, bytes]]:
        """The outbox's aggregates that the cloud has not receipted (and that are not abandoned)."""
        return [(b, bytes(p)) for b, p in
                self.db.execute("SELECT batch, payload FROM outbox WHERE published = 0 ORDER BY batch")]

    def mark_delivered(self, batch: int) -> None:
        """Receipted by the cloud, or abandoned (its round closed): never sent again (the column's name is older)."""
        self.db.execute("UPDATE outbox SET published = 1 WHERE batch = ?", (batch,))

    RUN_KEYS = ("announcement", "model", "model_weights", "opened", "closed_round", "last_forwarded", "residual")

    def new_run(self, run_id: str) -> None:
        """One transaction: forget the previous run (its open and closed rounds, stored updates and their nonces,
        aggregates not yet published, forwarding residuals) and follow `run_id`; device statuses stay."""
        with self._tx():
            self.db.execute("DELETE FROM updates")
            self.db.execute("DELETE FROM outbox")
            self.db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in self.RUN_KEYS])
            self.put("run_id", run_id.encode())

    def end_run(self) -> str:
        """`fediomt edge new-run`: forget the run followed so far and accept only later runs; returns its id."""
        ended = (self.get("run_id") or b"").decode()
        with self._tx():
            self.new_run(ended)
            self.put("after_run", ended.encode())
        return ended

    def prune(self, before_round: int) -> None:
        """Forget aggregated updates (with their nonces) of rounds before `before_round`, and delivered aggregates."""
        with self._tx():
            self.db.execute("DELETE FROM updates WHERE round_id < ? AND batch IS NOT NULL", (before_round,))
            self.db.execute("DELETE FROM outbox WHERE published = 1")
