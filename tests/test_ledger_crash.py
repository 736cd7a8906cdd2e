"""The cloud killed (SIGKILL) while a ledger proposal is in flight, with real replica daemons: after any number of
crashes every round has exactly one block and `fediomt ledger verify` passes (docs/ledger.md "Recovery after a
crash"); a round whose block timed out still gets it, before the next round's."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cloud.contributions import ContributionRecorder, LedgerConfig
from ledger.chain import Block
from ledger.consortium import load_consortium, open_ledger
from ledger.replication import MqttNode, Validator
from ledger.scoring import Contribution
from ledger.store import Ledger
from protocol.errors import ProtocolError
from protocol.logs import setup
from protocol.mqtt import ConnectionConfig
from protocol.signing import generate_signing_key, save_private_key, save_public_key
from protocol.topics import LEDGER_PROPOSALS

from .harness import MLP_PARAMS as N_PARAMS
from .harness import REPO, cloud_process, rounds_of, wait_for
from .test_cloud_daemon import Edges, federation  # noqa: F401 (a fixture)
from .test_ledger import VALIDATORS, build_ledger, contributions, signed

ROUNDS = 4
CRASHES = {1, 2, 4}  # the n-th proposal seen: round 1's, its re-proposal after the restart, then round 2's


def respond(edges: Edges, stop: threading.Event) -> None:
    """Both edges answer every announcement, also a round the restarted cloud announces again."""
    while not stop.is_set():
        try:
            ann = edges.next_round(timeout=0.2)
        except queue.Empty:
            continue
        for edge in ("edge1", "edge2"):
            edges.send(edge, edges.aggregate(edge, ann, np.full(N_PARAMS, 0.01 * ann.round_id)))


def write_consortium(path: Path, public_keys: dict[str, Path]) -> Path:
    """Every validator must sign (quorum 3 of 3), so a proposal stays in flight until the last vote arrives."""
    path.write_text("quorum = 3\n[validators]\n" + "".join(f'{v} = "{p}"\n' for v, p in public_keys.items()))
    return path


def chain(db: Path) -> list[Block]:
    with Ledger.open(db) as ledger:
        return [Block.from_cbor(raw) for raw in ledger.raw_blocks()]


def test_cloud_killed_mid_proposal_re_proposes_the_same_block(federation, broker, tmp_path, daemons,  # noqa: F811
                                                               recorder):
    write_config, edges = federation
    keys = {"cloud": tmp_path / "cloud.pub", **{e: tmp_path / "edges" / f"{e}.pub" for e in ("edge1", "edge2")}}
    save_public_key(edges.cloud_pub, keys["cloud"])
    write_consortium(tmp_path / "consortium.toml", keys)
    for edge in ("edge1", "edge2"):
        save_private_key(edges.keys[edge], tmp_path / f"{edge}.key")
        daemons.process("ledger", "replica", str(tmp_path / f"{edge}.db"), "--consortium",
                        str(tmp_path / "consortium.toml"), "--id", edge, "--key", str(tmp_path / f"{edge}.key"),
                        "--port", str(broker.port), log=tmp_path / f"{edge}.log")
    config = write_config(f'rounds = {ROUNDS}\nround_timeout_s = 60.0\n[strategy]\nname = "fedavg"\n'
                          f'[ledger]\ndb = "{tmp_path / "cloud.db"}"\nconsortium = "{tmp_path / "consortium.toml"}"\n'
                          "timeout_s = 5.0\n")
    proc: list[subprocess.Popen] = []
    proposed: dict[int, set[bytes]] = defaultdict(set)  # round -> hashes of the blocks proposed for it
    seen, killed = [0], []

    def kill_mid_proposal(_topic: str, payload: bytes) -> None:
        block = Block.from_cbor(payload)
        proposed[block.round_id].add(block.hash)
        seen[0] += 1
        if seen[0] in CRASHES:
            os.kill(proc[-1].pid, signal.SIGKILL)  # the validators have it; the cloud never sees their votes
            killed.append(seen[0])

    recorder([LEDGER_PROPOSALS], client_id="killer", hook=kill_mid_proposal)
    stop = threading.Event()
    threading.Thread(target=respond, args=(edges, stop), daemon=True).start()
    log_path = tmp_path / "cloud.log"
    try:
        with open(log_path, "ab") as log:
            for _ in range(len(CRASHES) + 1):
                proc.append(cloud_process(config, log))
                proc[-1].wait(90)
        assert proc[-1].returncode == 0 and killed == sorted(CRASHES), log_path.read_text()[-3000:]
    finally:
        stop.set()
        if proc and proc[-1].poll() is None:
            proc[-1].kill()

    assert [r["round"] for r in rounds_of(tmp_path / "run")] == list(range(1, ROUNDS + 1))
    blocks = chain(tmp_path / "cloud.db")
    assert [b.round_id for b in blocks] == [-1, *range(1, ROUNDS + 1)], log_path.read_text()[-3000:]
    assert all(len(b.signatures) == 3 for b in blocks[1:])
    assert {b.round_id: {b.hash} for b in blocks[1:]} == proposed  # every re-proposal was exactly the stored block
    verify = subprocess.run([sys.executable, "-m", "fediomt", "ledger", "verify", str(tmp_path / "cloud.db"),
                             "--validators", str(tmp_path / "consortium.toml")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stdout + verify.stderr
    head = blocks[-1].hash
    wait_for(lambda: all(chain(tmp_path / f"{e}.db")[-1].hash == head for e in ("edge1", "edge2")), 20)
    replica_logs = "".join((tmp_path / f"{e}.log").read_text() for e in ("edge1", "edge2"))
    assert "already signed another block" not in replica_logs


def test_a_round_whose_block_timed_out_gets_it_after_a_restart_and_no_round_is_recorded_twice(broker, tmp_path,
                                                                                               recorder):
    keys = {v: generate_signing_key() for v in ("cloud", "edge1", "edge2")}
    for v, key in keys.items():
        save_public_key(key.public_key(), tmp_path / f"{v}.pub")
    cfg = LedgerConfig(tmp_path / "cloud.db", write_consortium(tmp_path / "consortium.toml",
                                                               {v: tmp_path / f"{v}.pub" for v in keys}), timeout_s=1.0)
    conn = ConnectionConfig(host=broker.host, port=broker.port)
    proposals = recorder([LEDGER_PROPOSALS], client_id="spy")
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=16).astype(np.float32) for _ in range(2)]

    def record(cloud: ContributionRecorder, round_id: int) -> dict | None:
        return cloud.record(round_id, round_id + 1, ["edge1", "edge2"], deltas, [10, 20], np.zeros(16, np.float32),
                            lambda w: -float(np.sum((w - 1) ** 2)), np.random.default_rng(round_id))

    first = ContributionRecorder(cfg, keys["cloud"], conn, setup("cloud-test"))
    assert record(first, 1) is None  # no validator is up: round 1 closes unrecorded, its block stays queued
    proposed = Block.from_cbor(proposals.wait(lambda m: m, 5)[0][1]).hash
    first.node.conn.close()  # the cloud goes away without a goodbye (its database is as a kill -9 leaves it)

    membership = load_consortium(cfg.consortium)
    validators = [MqttNode(Validator(v, keys[v], open_ledger(tmp_path / f"{v}.db", membership)), conn).start()
                  for v in ("edge1", "edge2")]
    cloud = ContributionRecorder(cfg, keys["cloud"], conn, setup("cloud-test"))
    try:
        rewards = record(cloud, 2)
        assert rewards is not None and sum(rewards.values()) in (0, 1000)
        blocks = [Block.from_cbor(raw) for raw in cloud.ledger.raw_blocks()]
        assert [b.round_id for b in blocks] == [-1, 1, 2] and blocks[1].hash == proposed  # the same block, first
        assert record(cloud, 2) == rewards  # round 2 re-run (a crash before its checkpoint): no second block
        assert cloud.ledger.height == 3
    finally:
        cloud.close()
        first.ledger.close()
        for node in validators:
            node.stop()
            node.node.ledger.close()


def test_the_outbox_keeps_the_first_record_and_drops_one_no_block_can_carry(tmp_path):
    keys = {v: generate_signing_key() for v in VALIDATORS}
    with build_ledger(tmp_path / "cloud.db", keys, rounds=0) as ledger:
        nan = [Contribution("edge-a", 10, True, False, float("nan"), 0.0, 0.1)]
        assert ledger.enqueue(1, 2, nan) and not ledger.enqueue(1, 2, contributions(1))  # first record wins
        assert ledger.enqueue(2, 3, contributions(2))
        with pytest.raises(ProtocolError, match="round 1 dropped"):
            ledger.next_proposal()
        block = ledger.next_proposal()
        assert block.round_id == 2 and ledger.next_proposal() == block  # stored: the same block until it commits
        ledger.append(signed(block, keys))
        assert ledger.next_proposal() is None and not ledger.enqueue(2, 3, contributions(2))
        assert ledger.round_block(2) == signed(block, keys) and ledger.round_block(1) is None
