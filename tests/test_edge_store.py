"""The edge's SQLite store: one statement per accepted update, duplicates and replays told apart."""

from __future__ import annotations

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
