"""The consortium file (who validates, the quorum, the reward policy) and opening a ledger against it.

    # consortium.toml
    quorum_fraction = 0.667            # or `quorum = 3` (a count); default 2/3 of the validators
    [validators]                       # id = hex raw Ed25519 public key, or a PEM path (relative to this file),
    cloud = "cloud/cloud/sign.pub"     #      e.g. the `sign.pub` files that `fediomt pki issue` writes
    edge-a = "edges/edge-a/sign.pub"
    [policy]                           # RewardPolicy: tokens_per_round = 1000, min_score = 1e-9, min_quality = 0.05
    tokens_per_round = 1000

Every validator builds the same genesis block from the same file; its hash is what they pin.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomllib

from ledger.chain import Membership, make_genesis, quorum_for
from ledger.scoring import RewardPolicy
from ledger.store import Ledger
from protocol import signing
from protocol.errors import ProtocolError, Reason


def _public_key(value: str, base: Path) -> bytes:
    if len(value) == 2 * signing.PUBLIC_KEY_BYTES and all(c in "0123456789abcdefABCDEF" for c in value):
        return bytes.fromhex(value)
    return signing.public_key_bytes(signing.load_public_key(base / value))


PROVISIONING = {"federation", "cloud", "edges", "devices"}   # `fediomt provision`'s tables, in the same file


def load_consortium(path: str | os.PathLike) -> Membership:
    path = Path(path)
    table = tomllib.loads(path.read_text())
    unknown = set(table) - {"quorum", "quorum_fraction", "validators", "policy"} - PROVISIONING
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    validators = {vid: _public_key(value, path.parent) for vid, value in table.get("validators", {}).items()}
    if not validators:
        raise ValueError(f"{path}: a [validators] table is required")
    quorum = table.get("quorum", quorum_for(len(validators), table.get("quorum_fraction", 2 / 3)))
    return Membership(validators, quorum, RewardPolicy.from_mapping(table.get("policy", {})))


def open_ledger(path: str | os.PathLike, membership: Membership) -> Ledger:
    """Open (creating with the genesis of `membership` if new) and refuse a ledger of another consortium."""
    ledger = Ledger.open(path)
    genesis = make_genesis(membership)
    if ledger.height == 0:
        ledger.append(genesis)
    elif ledger.block(0).hash != genesis.hash:
        ledger.close()
        raise ProtocolError(Reason.BAD_HASH, f"{path} belongs to another consortium (genesis differs)")
    return ledger
