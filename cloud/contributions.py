"""Per-round contribution records on the consortium ledger (the cloud is the proposer, the edges validate).

After each round the cloud scores every edge that sent an aggregate: quality (cosine to the others), leave-one-out
and Shapley value of the game v(S) = accuracy of (previous model + FedAvg of S's aggregates) on the cloud's held-out
set (ledger/scoring.py), proposes a block with the rewards of the consortium's policy and waits for a quorum of
validator signatures over MQTT (ledger/replication.py). A round the validators do not sign in time is logged and
left out of the chain; training never waits on the ledger beyond `timeout_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.consortium import load_consortium, open_ledger
from ledger.replication import MqttNode, Proposer
from ledger.scoring import score_round
from ledger.store import propose_block
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.mqtt import ConnectionConfig


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
                 log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.ledger = open_ledger(cfg.db, load_consortium(cfg.consortium))
        self.node = MqttNode(Proposer(cfg.validator_id, key, self.ledger), broker).start()

    def record(self, round_id: int, model_version: int, edges: Sequence[str], deltas: Sequence[np.ndarray],
               samples: Sequence[int], base: np.ndarray, utility: Callable[[np.ndarray], float],
               rng: np.random.Generator) -> dict | None:
        """Score the round's edges, commit the block; returns {edge: reward} or None when it was not committed."""
        contributions = score_round(list(edges), list(deltas), list(samples), [True] * len(edges),
                                    [False] * len(edges), base, utility, rng)
        block = propose_block(self.ledger, round_id, model_version, contributions)
        try:
            committed = self.node.commit(block, self.cfg.timeout_s)
        except ProtocolError as exc:
            event(self.log, "ledger: round not recorded", logging.WARNING, round=round_id, reason=str(exc))
            return None
        rewards = {r.participant: r.reward for r in committed.records}
        event(self.log, "ledger block committed", round=round_id, index=committed.index, rewards=rewards,
              shapley={c.participant: round(c.shapley, 5) for c in contributions})
        return rewards

    def close(self) -> None:
        self.node.stop()
        self.ledger.close()
