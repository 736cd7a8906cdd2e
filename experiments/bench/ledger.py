"""`fediomt bench ledger`: the contribution ledger's costs.

Measures what a consortium sizes its deployment by: how close GTG-Shapley gets to exact Shapley for a given number
of utility evaluations, how fast blocks are appended (3 Ed25519 signatures, fsync'd SQLite WAL) and audited, and the
latency of one MQTT commit round (proposal -> votes -> committed block) through a real Mosquitto.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.mosquitto import MosquittoBroker
from ledger.chain import Membership, make_genesis, quorum_for, sign_block, verify_chain
from ledger.replication import MqttNode, Proposer, Validator
from ledger.scoring import (
    Contribution,
    RewardPolicy,
    coalition_value,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
)
from ledger.store import Ledger, propose_block
from protocol import signing
from protocol.mqtt import ConnectionConfig
from protocol.table import print_table


def _toy_game(n: int, d: int, seed: int):
    """Honest deltas of decreasing accuracy on a linear-regression validation set (utility = -MSE)."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    x = rng.normal(size=(256, d)) / math.sqrt(d)
    y = x @ w_true
    updates = [w_true + rng.normal(scale=0.3 * (i + 1), size=d) for i in range(n)]
    return coalition_value(np.zeros(d), updates, [100] * n, lambda w: -float(np.mean((x @ w - y) ** 2)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def shapley_accuracy(quick: bool) -> list[dict]:
    """GTG-Shapley (and leave-one-out) against exact Shapley on the same game; then GTG's cost where exact is out
    of reach."""
    n, d = (6, 256) if quick else (10, 1024)
    exact = exact_shapley(n, _toy_game(n, d, 0))
    rows = []
    loo_value = _toy_game(n, d, 0)
    loo = leave_one_out(n, loo_value)
    rows.append({"method": "leave-one-out", "players": n, "permutations": "-", "evaluations": len(loo_value.cache),
                 "exact_evaluations": 2**n, "rel_l1_error": float(np.abs(loo - exact).sum() / np.abs(exact).sum()),
                 "spearman": _spearman(loo, exact)})
    for budget in ([20, 100] if quick else [20, 50, 100, 200, 500, None]):
        value = _toy_game(n, d, 0)
        kwargs = {"max_permutations": budget, "tolerance": 0.0} if budget else {}
        approx = gtg_shapley(n, value, np.random.default_rng(1), **kwargs)
        rows.append({"method": "gtg", "players": n, "permutations": budget or "converged",
                     "evaluations": len(value.cache), "exact_evaluations": 2**n,
                     "rel_l1_error": float(np.abs(approx - exact).sum() / np.abs(exact).sum()),
                     "spearman": _spearman(approx, exact)})
    if not quick:
        value = _toy_game(30, d, 0)
        gtg_shapley(30, value, np.random.default_rng(1), truncation=1e-4)
        rows.append({"method": "gtg truncated", "players": 30, "permutations": "converged",
                     "evaluations": len(value.cache), "exact_evaluations": 2**30, "rel_l1_error": "n/a",
                     "spearman": "n/a"})
    return rows


def _consortium(names: list[str]):
    keys = {v: signing.generate_signing_key() for v in names}
    membership = Membership({v: signing.public_key_bytes(k.public_key()) for v, k in keys.items()},
                            quorum_for(len(names)), RewardPolicy())
    return keys, make_genesis(membership)


def _contributions(r: int, participants: int) -> list[Contribution]:
    return [Contribution(f"dev-{i}", 100 + i, True, False, 0.5, 0.01, 0.01 * (1 + (i + r) % 7))
            for i in range(participants)]


def ledger_throughput(workdir: Path, quick: bool) -> dict:
    blocks, participants = (30, 20) if quick else (300, 50)
    names = ["cloud", "edge-a", "edge-b", "edge-c"]
    keys, genesis = _consortium(names)
    ledger = Ledger.open(workdir / "bench.db")
    ledger.append(genesis)
    signers = names[:genesis.membership.quorum]
    t = time.perf_counter()
    for r in range(blocks):
        block = propose_block(ledger, r, r, _contributions(r, participants))
        ledger.append(block.with_signatures({v: sign_block(block, v, keys[v]) for v in signers}))
    append_s = time.perf_counter() - t
    raw = ledger.raw_blocks()
    t = time.perf_counter()
    verdict = verify_chain(raw)
    verify_s = time.perf_counter() - t
    ledger.close()
    assert verdict.ok
    return {"blocks": blocks, "records_per_block": participants, "signatures_per_block": len(signers),
            "append_blocks_per_s": blocks / append_s, "verify_blocks_per_s": len(raw) / verify_s,
            "bytes_per_block": sum(map(len, raw[1:])) / blocks}


def commit_latency(workdir: Path, quick: bool) -> dict:
    rounds = 5 if quick else 30
    names = ["cloud", "edge-a", "edge-b", "edge-c"]
    keys, genesis = _consortium(names)
    with MosquittoBroker(workdir=workdir / "mosquitto") as broker:
        nodes = []
        for v in names:
            ledger = Ledger.open(workdir / f"{v}.db")
            ledger.append(genesis)
            core = Proposer(v, keys[v], ledger) if v == "cloud" else Validator(v, keys[v], ledger)
            nodes.append(MqttNode(core, ConnectionConfig(host=broker.host, port=broker.port)).start())
        cloud = nodes[0]
        latencies = []
        for r in range(rounds):
            block = propose_block(cloud.node.ledger, r, r, _contributions(r, 20))
            t = time.perf_counter()
            cloud.commit(block)
            latencies.append(time.perf_counter() - t)
        deadline = time.monotonic() + 10
        while len({n.node.ledger.head.hash for n in nodes}) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        converged = len({n.node.ledger.head.hash for n in nodes}) == 1
        for node in nodes:
            node.stop()
            node.node.ledger.close()
    return {"validators": len(names), "quorum": genesis.membership.quorum, "rounds": rounds,
            "commit_p50_ms": 1000 * float(np.median(latencies)), "commit_max_ms": 1000 * max(latencies),
            "replicas_converged": converged}


def run(args: argparse.Namespace) -> dict:
    shapley = shapley_accuracy(args.quick)
    print_table(shapley, file=sys.stdout)
    with tempfile.TemporaryDirectory(prefix="fediomt-ledger-bench-") as tmp:
        throughput = ledger_throughput(Path(tmp), args.quick)
        latency = commit_latency(Path(tmp), args.quick)
    print()
    print_table([throughput], file=sys.stdout)
    print()
    print_table([latency], file=sys.stdout)
    return {"shapley": shapley, "ledger": throughput, "replication": latency}

