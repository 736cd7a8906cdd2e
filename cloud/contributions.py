"""Per-round contribution records on the consortium ledger (the cloud is the proposer, the edges validate).

After each round the cloud scores every edge that sent an aggregate: quality (cosine to the others), leave-one-out
and Shapley value of the game v(S) = accuracy of (previous model + FedAvg of S's aggregates) on the cloud's held-out
set (ledger/scoring.py), proposes a block with the rewards of the consortium's policy and waits for a quorum of
validator signatures over MQTT (ledger/replication.py). Training never waits on the ledger beyond `timeout_s`: a
round the validators do not sign in time stays queued in the ledger database and its stored block is proposed
again, unchanged, before the next round's, also after a crash (docs/ledger.md "Recovery after a crash").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.consortium import load_consortium, open_ledger
from ledger.replication import MqttNode, Proposer
from ledger.scoring import score_round
from protocol.errors import ProtocolError, Reason
from protocol.logs import event
from protocol.mqtt import ConnectionConfig, role_connection


@dataclass(frozen=True)
class LedgerConfig:
    """`[ledger]` of cloud.toml: where the chain lives and who signs it."""

    db: Path                      # SQLite file (WAL) of the chain; created with the consortium's genesis
    consortium: Path              # consortium.toml: [validators] keys, quorum, [policy] (docs/ledger.md)
    validator_id: str = "cloud"   # the cloud's id among the validators (its signing key is the cloud's)
    timeout_s: float = 10.0       # how long a round's block may wait for a quorum of signatures


class ContributionRecorder:
    """Puts each round's per-edge contribution scores on the consortium ledger, the cloud proposing the block."""

    def __init__(self, cfg: LedgerConfig, key: Ed25519PrivateKey, broker: ConnectionConfig,
                 log: logging.Logger, stop: threading.Event | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.ledger = open_ledger(cfg.db, load_consortium(cfg.consortium))
        self.node = MqttNode(Proposer(cfg.validator_id, key, self.ledger),
                             role_connection(broker, "ledger")).start(timeout=None, stop=stop)

    def record(self, round_id: int, model_version: int, edges: Sequence[str], deltas: Sequence[np.ndarray],
               samples: Sequence[int], base: np.ndarray, utility: Callable[[np.ndarray], float],
               rng: np.random.Generator) -> dict | None:
        """Score the round's edges, queue the record, commit what is queued; returns {edge: reward} once the
        round's block is on the chain (also when it got there before a crash), None while it is not."""
        contributions = score_round(list(edges), list(deltas), list(samples), [True] * len(edges),
                                    [False] * len(edges), base, utility, rng)
        self.ledger.enqueue(round_id, model_version, contributions)
        self._commit_queued()
        block = self.ledger.round_block(round_id)
        return None if block is None else {r.participant: r.reward for r in block.records}

    def _commit_queued(self) -> None:
        """Commit the queued rounds in order; stop at the first without a quorum in time (it stays queued)."""
        while True:
            try:
                block = self.ledger.next_proposal()
            except ProtocolError as exc:
                event(self.log, "ledger: round not recorded", logging.WARNING, reason=str(exc), queued=False)
                continue
            if block is None:
                return
            try:
                committed = self.node.commit(block, self.cfg.timeout_s)
            except ProtocolError as exc:
                event(self.log, "ledger: round not recorded", logging.WARNING, round=block.round_id,
                      index=block.index, reason=str(exc), queued=exc.reason == Reason.INCOMPLETE)
                if exc.reason == Reason.INCOMPLETE:
                    return
                self.ledger.drop(block.round_id)  # refused by validators: this block can never commit
                continue
            event(self.log, "ledger block committed", round=committed.round_id, index=committed.index,
                  rewards={r.participant: r.reward for r in committed.records},
                  shapley={r.participant: round(r.shapley, 5) for r in committed.records})

    def close(self) -> None:
        self.node.stop()
        self.ledger.close()
