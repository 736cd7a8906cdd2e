"""The edge's SQLite store: one statement per accepted update, duplicates and replays told apart, old state migrated."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from edge.store import Store, Stored
from protocol.errors import ProtocolError, Reason


def stored(device: str = "d00", round_id: int = 1) -> Stored:
    return Stored(device, round_id, 1, 32, 0.5, "pi", 0, 1.0, 10, 100, np.array([1, 5], np.int32),
                  np.array([0.5, -1.0], np.float32))


def test_an_accepted_update_is_one_statement_and_a_refused_one_says_why(tmp_path):
    store = Store(tmp_path / "edge.db")
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    store.add(stored(), b"n1")
    assert len(statements) == 1 and statements[0].startswith("INSERT")
    for u, nonce, reason in [(stored(), b"n2", Reason.DUPLICATE),          # same (device, round)
                             (stored(), b"n1", Reason.DUPLICATE),          # both: a redelivery
                             (stored(round_id=2), b"n1", Reason.REPLAY),   # a nonce used again
                             (stored("d01"), b"n1", None)]:                # nonces are per device
        if reason is None:
            store.add(u, nonce)
            continue
        with pytest.raises(ProtocolError) as err:
            store.add(u, nonce)
        assert err.value.reason == reason
    assert [(u.device_id, u.round_id) for u in store.pending()] == [("d00", 1), ("d01", 1)]


def test_state_from_before_the_nonce_column_is_migrated(tmp_path):
    path = tmp_path / "edge.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE updates (device_id TEXT NOT NULL, round_id INTEGER NOT NULL, batch INTEGER,
            base_version INTEGER NOT NULL, num_samples INTEGER NOT NULL, train_loss REAL NOT NULL,
            compute_class TEXT NOT NULL, staleness INTEGER NOT NULL, epsilon REAL NOT NULL,
            local_steps INTEGER NOT NULL, nbytes INTEGER NOT NULL, indices BLOB, vals BLOB, control BLOB,
            received REAL NOT NULL, PRIMARY KEY (device_id, round_id));
        CREATE TABLE nonces (device_id TEXT NOT NULL, nonce BLOB NOT NULL, round_id INTEGER NOT NULL,
            PRIMARY KEY (device_id, nonce));
        INSERT INTO updates VALUES ('d00', 1, NULL, 1, 32, 0.5, 'pi', 0, 1.0, 10, 100, NULL, x'0000803f', NULL, 0);
        INSERT INTO nonces VALUES ('d00', x'6e31', 1);
    """)
    old.close()
    store = Store(path)
    assert [(u.device_id, u.values.tolist()) for u in store.pending()] == [("d00", [1.0])]
    with pytest.raises(ProtocolError) as err:
        store.add(stored(round_id=2), b"n1")
    assert err.value.reason == Reason.REPLAY
    store.close()
    assert Store(path).pending()[0].device_id == "d00"   # a second open finds nothing left to migrate
