"""Ledger replication through a real Mosquitto: replicas converge, catch up, and all refuse bad blocks."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.chain import Block, make_genesis, sign_block, verify_chain
from ledger.consortium import load_consortium, open_ledger
from ledger.replication import MqttNode, Proposer, Validator
from ledger.store import Ledger, propose_block
from protocol import signing
from protocol.errors import ProtocolError, Reason
from protocol.mqtt import ConnectionConfig
from protocol.topics import LEDGER_BLOCKS as BLOCKS
from protocol.topics import LEDGER_PROPOSALS as PROPOSALS

from .harness import REPO, wait_for
from .test_ledger import VALIDATORS, contributions, membership

EDGES = VALIDATORS[1:]


@pytest.fixture
def cluster(broker, tmp_path):
    keys = {v: signing.generate_signing_key() for v in VALIDATORS}
    genesis = make_genesis(membership(keys))
    nodes: dict[str, MqttNode] = {}

    def ledger(name: str, seeded: bool = True) -> Ledger:
        lg = Ledger.open(tmp_path / f"{name}.db")
        if seeded and lg.height == 0:
            lg.append(genesis)
        return lg

    def start(name: str, seeded: bool = True) -> MqttNode:
        if name == "cloud":
            core = Proposer(name, keys[name], ledger(name))
        else:
            core = Validator(name, keys[name], ledger(name, seeded), genesis_hash=genesis.hash)
        nodes[name] = MqttNode(core, ConnectionConfig(host=broker.host, port=broker.port)).start()
        return nodes[name]

    yield start, nodes, keys
    for node in nodes.values():
        node.stop()
        node.node.ledger.close()


def stored_blocks(db) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM blocks").fetchone()[0]


def round_block(cloud: MqttNode, r: int):
    return propose_block(cloud.node.ledger, r, 100 + r, contributions(r))


def test_replicas_converge_and_catch_up(cluster):
    start, nodes, _ = cluster
    cloud = start("cloud")
    start("edge-a")
    start("edge-b")
    for r in range(2):
        committed = cloud.commit(round_block(cloud, r))
        assert len(committed.signatures) >= 3
    wait_for(lambda: all(nodes[v].node.ledger.height == 3 for v in ("edge-a", "edge-b")))
    # edge-c joins with an empty database and only the pinned genesis hash: it fetches everything
    start("edge-c", seeded=False)
    wait_for(lambda: nodes["edge-c"].node.ledger.height == 3)
    cloud.commit(round_block(cloud, 2))
    # edge-b goes offline for a round (quorum is 3 of 4: cloud, edge-a, edge-c), then catches up on reconnect
    nodes["edge-b"].stop()
    cloud.commit(round_block(cloud, 3))
    nodes["edge-b"] = MqttNode(nodes["edge-b"].node, cloud.conn.cfg, client_id="ledger-edge-b-2").start()
    wait_for(lambda: len({n.node.ledger.head.hash for n in nodes.values()}) == 1
             and nodes["edge-b"].node.ledger.height == 5)
    for node in nodes.values():
        verdict = verify_chain(node.node.ledger.raw_blocks())
        assert verdict.ok and verdict.height == 5
        assert verdict.balances == cloud.node.ledger.balances()
        assert not [e for e in node.node.refused if e.reason != Reason.DUPLICATE]


def test_bad_blocks_are_refused_by_every_validator(cluster, recorder):
    start, nodes, keys = cluster
    cloud = start("cloud")
    for v in EDGES:
        start(v)
    cloud.commit(round_block(cloud, 0))
    wait_for(lambda: all(nodes[v].node.ledger.height == 2 for v in EDGES))
    heads = {v: nodes[v].node.ledger.head.hash for v in EDGES}

    # the proposer's own check stops a wrong total before it reaches the network
    good = round_block(cloud, 1)
    bad = replace(good, minted=good.minted + 7)
    with pytest.raises(ProtocolError, match="rewards sum"):
        cloud.commit(bad)

    # a compromised proposer publishes it anyway: every validator votes no
    spy = recorder(["fl/ledger/signatures/+"], client_id="spy")
    spy.publish(PROPOSALS, bad.to_cbor())
    votes = [cbor2.loads(p) for _, p in spy.wait(lambda m: len(m) >= len(EDGES) and list(m), 10, "every edge's vote")]
    assert sorted(v["validator"] for v in votes) == EDGES
    assert all(v["refused"] == Reason.BAD_VALUE and v["sig"] == b"" for v in votes)

    # a committed block with forged signatures (keys outside the consortium) is refused by every replica
    outsiders = {v: signing.generate_signing_key() for v in VALIDATORS[:3]}
    forged = good.with_signatures({v: sign_block(good, v, k) for v, k in outsiders.items()})
    before = {v: len(nodes[v].node.refused) for v in EDGES}
    spy.publish(BLOCKS, forged.to_cbor(), retain=True)
    wait_for(lambda: all(len(nodes[v].node.refused) > before[v] for v in EDGES))
    assert all(nodes[v].node.refused[-1].reason == Reason.BAD_SIGNATURE for v in EDGES)
    assert {v: nodes[v].node.ledger.head.hash for v in EDGES} == heads

    # a block below quorum (2 genuine signatures of 4, quorum 3) is refused as well
    weak = good.with_signatures({v: sign_block(good, v, keys[v]) for v in VALIDATORS[:2]})
    spy.publish(BLOCKS, weak.to_cbor())
    wait_for(lambda: all("quorum" in nodes[v].node.refused[-1].detail for v in EDGES))
    assert {v: nodes[v].node.ledger.head.hash for v in EDGES} == heads

    # the honest path still works afterwards, and everyone agrees
    cloud.commit(good)
    wait_for(lambda: len({n.node.ledger.head.hash for n in nodes.values()}) == 1
             and nodes["edge-a"].node.ledger.height == 3)


@contextlib.contextmanager
def replica_daemon(broker, tmp_path) -> Iterator[tuple[subprocess.Popen, MqttNode, Ledger]]:
    """`fediomt ledger replica` for validator edge-a (started whether or not the broker is up), and the cloud's
    proposer node with its ledger (started once the broker is up: call its `start()`); both stopped on exit."""
    keys = {v: signing.generate_signing_key() for v in ("cloud", "edge-a")}
    for v, k in keys.items():
        signing.save_public_key(k.public_key(), tmp_path / f"{v}.pub")
    signing.save_private_key(keys["edge-a"], tmp_path / "edge-a.key")
    consortium = tmp_path / "consortium.toml"
    consortium.write_text('quorum_fraction = 1.0\n[validators]\ncloud = "cloud.pub"\nedge-a = "edge-a.pub"\n'
                          "[policy]\ntokens_per_round = 50\n")
    cloud_ledger = open_ledger(tmp_path / "cloud.db", load_consortium(consortium))
    cloud = MqttNode(Proposer("cloud", keys["cloud"], cloud_ledger),
                     ConnectionConfig(host=broker.host, port=broker.port))
    daemon = subprocess.Popen([sys.executable, "-m", "fediomt", "ledger", "replica", str(tmp_path / "edge-a.db"),
                               "--consortium", str(consortium), "--id", "edge-a", "--key", str(tmp_path / "edge-a.key"),
                               "--host", broker.host, "--port", str(broker.port)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        yield daemon, cloud, cloud_ledger
    finally:
        if daemon.poll() is None:
            daemon.kill()
        cloud.stop()


def signed_by_daemon(daemon: subprocess.Popen, cloud: MqttNode, cloud_ledger: Ledger, tmp_path) -> None:
    """The cloud commits a block that needs the daemon's signature, the block reaches the daemon's database, and
    SIGTERM stops the daemon cleanly."""
    def commit() -> Block | None:
        """None while the daemon starts and subscribes: the block lacks its signature."""
        try:
            return cloud.commit(propose_block(cloud_ledger, 0, 1, contributions(0)), timeout=1.0)
        except ProtocolError as exc:
            assert exc.reason == Reason.INCOMPLETE and daemon.poll() is None
            return None

    block = wait_for(commit, 30, interval=0, message="the replica daemon's signature")
    assert set(block.signatures) == {"cloud", "edge-a"}
    wait_for(lambda: stored_blocks(tmp_path / "edge-a.db") == 2)  # the committed block reached the replica
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    logs = [json.loads(line) for line in daemon.stderr.read().splitlines() if line.startswith("{")]
    assert logs[-1]["msg"] == "replica stopped" and logs[-1]["height"] == 2
    with Ledger.open(tmp_path / "edge-a.db") as replica:
        assert replica.head.hash == cloud_ledger.head.hash


def test_replica_daemon_signs_replicates_and_stops_on_sigterm(broker, tmp_path):
    with replica_daemon(broker, tmp_path) as (daemon, cloud, cloud_ledger):
        cloud.start()
        signed_by_daemon(daemon, cloud, cloud_ledger, tmp_path)


def test_replica_daemon_outlasts_a_broker_that_is_down_when_it_starts(broker, tmp_path):
    """A replica restarted while the broker is down (the chaos run kills both) waits for it instead of exiting
    after the 10 s a test's or tool's MqttNode.start allows."""
    broker.stop()
    with replica_daemon(broker, tmp_path) as (daemon, cloud, cloud_ledger):
        time.sleep(12)
        assert daemon.poll() is None, daemon.stderr.read()
        broker.start()
        cloud.start()
        signed_by_daemon(daemon, cloud, cloud_ledger, tmp_path)


def test_node_start_times_out_or_stops_while_the_broker_is_down(broker, tmp_path):
    broker.stop()
    ledger = open_ledger(tmp_path / "v.db", membership({v: signing.generate_signing_key() for v in VALIDATORS}))
    node = MqttNode(Validator(VALIDATORS[1], signing.generate_signing_key(), ledger),
                    ConnectionConfig(host=broker.host, port=broker.port, reconnect_min_s=0.2, reconnect_max_s=0.5))
    with pytest.raises(TimeoutError, match="no SUBACK"):
        node.start(timeout=1.0)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    assert node.start(timeout=None, stop=stop) is node and 1.0 <= time.monotonic() - started < 5
    assert not node.conn.subscribed.is_set()
    node.stop()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_block_decoder_raises_only_protocol_errors(data):
    with contextlib.suppress(ProtocolError):
        Block.from_cbor(data)


def test_handlers_never_raise_on_hostile_messages(tmp_path):
    keys = {v: signing.generate_signing_key() for v in VALIDATORS}
    genesis = make_genesis(membership(keys))
    cores = []
    for v in ("cloud", "edge-a"):
        ledger = Ledger.open(tmp_path / f"{v}.db")
        ledger.append(genesis)
        cores.append(Proposer(v, keys[v], ledger) if v == "cloud" else Validator(v, keys[v], ledger))
    cloud, edge = cores
    garbage = [b"", b"\xff", cbor2.dumps({"validator": "edge-a"}), cbor2.dumps([1, 2, 3]), b"\xa1" * 100]
    topics = [PROPOSALS, BLOCKS, "fl/ledger/catchup/edge-a", "fl/ledger/signatures/edge-a", "fl/ledger/sync/edge-a",
              "fl/ledger/other", "fl/ledger/signatures/a+b"]
    for core in cores:
        for topic in topics:
            for payload in garbage:
                assert core.handle(topic, payload) == []
    assert len(edge.refused) >= 3 * len(garbage)
    # a vote published on another validator's topic, and a vote from outside the consortium
    block = propose_block(cloud.ledger, 0, 1, contributions(0))
    assert cloud.propose(block)[0].topic == PROPOSALS
    (vote,) = edge.handle(PROPOSALS, block.to_cbor())
    assert cloud.handle("fl/ledger/signatures/edge-b", vote.payload) == []
    assert cloud.refused[-1].reason == Reason.WRONG_SENDER
    assert cloud.handle(vote.topic, vote.payload) == []  # 2 of 3 signatures: not yet committed
    assert cloud.ledger.height == 1
    # a sync request is answered in batches of stored blocks
    (reply,) = cloud.handle("fl/ledger/sync/edge-b", cbor2.dumps({"validator": "edge-b", "start": 0}))
    assert reply.topic == "fl/ledger/catchup/edge-b" and len(cbor2.loads(reply.payload)["blocks"]) == 1


def test_validator_signs_at_most_one_block_per_index_even_after_restart(tmp_path):
    keys = {v: signing.generate_signing_key() for v in VALIDATORS}
    genesis = make_genesis(membership(keys))
    ledger = Ledger.open(tmp_path / "edge-a.db")
    ledger.append(genesis)
    edge = Validator("edge-a", keys["edge-a"], ledger)
    first = propose_block(ledger, 0, 1, contributions(0))
    other = propose_block(ledger, 0, 2, contributions(0))  # same index, different content
    (vote,) = edge.handle(PROPOSALS, first.to_cbor())
    assert cbor2.loads(vote.payload)["refused"] == 0
    (again,) = edge.handle(PROPOSALS, first.to_cbor())  # a retried proposal is signed again
    assert cbor2.loads(again.payload)["sig"] == cbor2.loads(vote.payload)["sig"]
    ledger.close()
    edge = Validator("edge-a", keys["edge-a"], Ledger.open(tmp_path / "edge-a.db"))
    (refusal,) = edge.handle(PROPOSALS, other.to_cbor())
    assert cbor2.loads(refusal.payload)["refused"] == Reason.DUPLICATE and cbor2.loads(refusal.payload)["sig"] == b""
