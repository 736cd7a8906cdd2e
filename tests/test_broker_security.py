"""`fediomt broker config` against a real Mosquitto: mTLS identity, CRL, per-identity ACLs, the edge->cloud bridge.

Under TLS 1.3 a rejected client certificate does not make paho's connect() raise: the broker's alert arrives after
the client's handshake finished, as a disconnect. `open_session` therefore waits for CONNACK or a disconnect.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from experiments.mosquitto import MosquittoBroker, free_port, give_to_broker_user
from fediomt import broker as broker_config
from fediomt import pki
from protocol import signing, topics
from protocol.compression import decode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    Ack,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    bytes_to_floats,
    decode,
    verify_message,
)
from protocol.tls import ROLES, client_context, identity_context
from protocol.topics import matches

from .conftest import REPO
from .harness import MLP_OPTIONS, MLP_PARAMS, N_PARAMS, Fed, cloud_process, rounds_of, wait_for

EDGE = "edge1"  # the edge id of the scripted federation in test_edge.Fed
REPLICA = f"{EDGE}-r1"  # a second edge daemon of EDGE: a certificate of its own (client ids are CNs)
NOT_AUTHORIZED = 135
ACCEPTED = (0, 16)  # success; "no matching subscribers"


@pytest.fixture(scope="module")
def workdir():
    """Not pytest's tmp_path: Mosquitto started as root reads the ACL and keys as `mosquitto`, and pytest's tmp
    directories are 0700."""
    path = Path(tempfile.mkdtemp(prefix="fediomt-tls-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ca(workdir):
    directory = workdir / "pki"
    pki.init_ca(directory)
    devices = [("device", f"d{i}") for i in range(1, 5)]
    for kind, name in [*devices, ("edge", EDGE), ("edge", REPLICA), ("edge", "e2"), ("cloud", pki.CLOUD_ID),
                       ("server", f"broker-{EDGE}"), ("server", "broker-cloud")]:
        ident = pki.issue(directory, kind, name)
        give_to_broker_user(ident.key)
    pki.revoke(directory, "d3")
    return directory


def start_broker(workdir: Path, cfg_kwargs: dict, name: str) -> MosquittoBroker:
    port = free_port()
    cfg = broker_config.BrokerFilesConfig(port=port, bind="127.0.0.1", data_dir=workdir / name, **cfg_kwargs)
    conf, _ = broker_config.write(cfg, workdir / f"{name}.conf")
    return MosquittoBroker(workdir=workdir / name, port=port, config_file=conf).start()


@pytest.fixture(scope="module")
def edge_broker(workdir, ca):
    b = start_broker(workdir, {"role": "edge", "id": EDGE, "pki": ca, "replicas": [REPLICA]}, "edge")
    yield b
    b.close()


class Session:
    """A paho MQTT 5 client that records CONNACK/disconnect, PUBACK reason codes and received messages."""

    def __init__(self, client_id: str, context: ssl.SSLContext | None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if context is not None:
            self.client.tls_set_context(context)
        self.outcome = threading.Event()
        self.connected = False
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.filters: list[str] = []  # re-subscribed on every (re)connect: clean sessions forget them
        self.client.on_connect = self._on_connect
        self.drops = 0  # disconnects and failed (re)connects
        self.client.on_disconnect = self._on_drop
        self.client.on_connect_fail = self._on_drop
        self.client.on_publish = self._on_publish
        self.arrived = threading.Condition()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = not reason_code.is_failure
        if self.connected and self.filters:
            client.subscribe([(f, 1) for f in self.filters])
        self.outcome.set()

    def _on_drop(self, *_) -> None:
        self.drops += 1
        self.outcome.set()

    def _on_message(self, _c, _u, msg) -> None:
        with self.arrived:
            self.messages.append((msg.topic, msg.payload))
            self.arrived.notify_all()

    def received(self, pred, timeout: float) -> bool:
        """Whether `pred()` held within `timeout` (woken by each message): a probe, not an assertion."""
        with self.arrived:
            return self.arrived.wait_for(pred, timeout)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.acked:
            self.acks[mid] = reason_code.value
            self.acked.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """QoS 1 publish; returns the PUBACK reason code (ACCEPTED or NOT_AUTHORIZED)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, timeout=5), f"no PUBACK for {topic}"
            return self.acks[info.mid]

    def subscribe(self, topic_filter: str) -> None:
        self.subscribed.clear()
        self.filters.append(topic_filter)
        self.client.subscribe(topic_filter, qos=1)
        assert self.subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()  # first: it ends paho's reconnect loop, so loop_stop() returns at once
        self.client.loop_stop()


def open_session(port: int, client_id: str, context: ssl.SSLContext | None, session_expiry: int = 0) -> Session:
    """Connected (or refused) session; `session_expiry` > 0 keeps subscriptions and queued messages on the broker."""
    session = Session(client_id, context)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    try:
        session.client.connect("127.0.0.1", port, clean_start=session_expiry == 0, properties=props)
    except (OSError, ssl.SSLError):
        return session  # refused during the handshake (TLS 1.2 style)
    session.client.loop_start()
    assert session.outcome.wait(5), "neither CONNACK nor disconnect within 5 s"
    if not session.connected:
        session.close()
    return session


def connect_as(ca: Path, kind: str, name: str, port: int, client_id: str | None = None,
               session_expiry: int = 0) -> Session:
    """A session with `kind`/`name`'s certificate (the broker's certificate must match 127.0.0.1)."""
    return open_session(port, client_id or name, identity_context(pki.identity(ca, kind, name)), session_expiry)


@pytest.fixture
def sessions():
    opened: list[Session] = []
    yield opened
    for s in opened:
        s.close()


def test_device_with_a_consortium_certificate_connects(ca, edge_broker, sessions):
    s = connect_as(ca, "device", "d1", edge_broker.port)
    sessions.append(s)
    assert s.connected


def test_clients_without_a_certificate_are_refused(ca, edge_broker):
    no_cert = ssl.create_default_context(cafile=str(pki.ca_cert_path(ca)))
    assert not open_session(edge_broker.port, "anon-tls", no_cert).connected
    assert not open_session(edge_broker.port, "anon-plain", None).connected  # plaintext MQTT on the TLS port


def test_certificate_from_another_ca_is_refused(ca, edge_broker, workdir):
    rogue = workdir / "rogue-pki"
    pki.init_ca(rogue, common_name="FedIoMT consortium CA")  # same name, different key
    pki.issue(rogue, "device", "d1")
    context = ssl.create_default_context(cafile=str(pki.ca_cert_path(ca)))  # trusts the real broker...
    context.load_cert_chain(str(pki.identity(rogue, "device", "d1").cert), str(pki.identity(rogue, "device", "d1").key))
    assert not open_session(edge_broker.port, "rogue-d1", context).connected


def test_revoked_device_is_refused(ca, edge_broker, sessions):
    assert not connect_as(ca, "device", "d3", edge_broker.port).connected  # revoked before the broker started
    d4 = connect_as(ca, "device", "d4", edge_broker.port)
    sessions.append(d4)
    assert d4.connected
    probe = pki.issue(ca, "device", "d9")   # revoked with d4: it shows the reload without taking d4's client id
    give_to_broker_user(probe.key)
    pki.revoke(ca, "d4")
    pki.revoke(ca, "d9")
    edge_broker.process.send_signal(signal.SIGHUP)

    def refused() -> bool:
        again = connect_as(ca, "device", "d9", edge_broker.port)
        again.close()
        return not again.connected

    wait_for(refused, 5, message="the reloaded CRL to refuse a new connection of the revoked d9")
    again = connect_as(ca, "device", "d4", edge_broker.port, client_id="d4-again")
    again.close()
    assert not again.connected   # d4's certificate is refused for a new connection too
    assert d4.client.is_connected()  # SIGHUP reloads the CRL for new connections only...
    d4.client.reconnect_delay_set(min_delay=0.05, max_delay=0.1)
    edge_broker.restart()  # ...a restart cuts the live session, and its reconnects are refused
    up = d4.drops  # counted once the broker listens again: these are refusals, not a closed port
    wait_for(lambda: d4.drops >= up + 2, message="two refused reconnects of d4")
    assert not d4.client.is_connected()
    sessions.append(connect_as(ca, "device", "d2", edge_broker.port))
    assert sessions[-1].connected  # same CA, not revoked


def test_device_cannot_publish_as_another_device(ca, edge_broker, sessions):
    edge = connect_as(ca, "edge", EDGE, edge_broker.port, client_id="edge-gw")
    d1 = connect_as(ca, "device", "d1", edge_broker.port)
    sessions += [edge, d1]
    edge.subscribe(f"fl/{EDGE}/updates/+")
    assert d1.publish(topics.update_topic(EDGE, "d2"), b"forged") == NOT_AUTHORIZED
    assert d1.publish(topics.status_topic(EDGE, "d2"), b"forged") == NOT_AUTHORIZED
    assert d1.publish(topics.model_topic(EDGE), b"forged model") == NOT_AUTHORIZED
    assert d1.publish(topics.model_full_topic(EDGE), b"forged full model") == NOT_AUTHORIZED
    assert d1.publish(topics.aggregate_topic(EDGE), b"forged aggregate") == NOT_AUTHORIZED
    assert d1.publish(topics.update_topic(EDGE, "d1"), b"own") in ACCEPTED
    assert d1.publish(topics.secagg_topic(EDGE, "keys", "d1"), b"own") in ACCEPTED
    # d1's publishes reach a subscriber in order: once its last one is in, any forged one would be too
    wait_for(lambda: (topics.update_topic(EDGE, "d1"), b"own") in edge.messages)
    assert edge.messages == [(topics.update_topic(EDGE, "d1"), b"own")]


def test_device_reads_only_its_edges_downlink_and_its_own_acks(ca, edge_broker, sessions):
    edge = connect_as(ca, "edge", EDGE, edge_broker.port, client_id="edge-gw2")
    d1, d2 = connect_as(ca, "device", "d1", edge_broker.port), connect_as(ca, "device", "d2", edge_broker.port)
    sessions += [edge, d1, d2]
    d1.subscribe("fl/#")  # granted, but filtered per message at delivery
    allowed = [topics.round_topic(EDGE), topics.ack_topic(EDGE, "d1"), topics.bundle_manifest_topic(EDGE, "ecg"),
               topics.secagg_topic(EDGE, "roster"), topics.secagg_topic(EDGE, "inbox", "d1")]
    denied = [topics.ack_topic(EDGE, "d2"), topics.aggregate_topic(EDGE), topics.update_topic(EDGE, "e1"),
              topics.secagg_topic(EDGE, "inbox", "d2"), topics.secagg_topic(EDGE, "keys", "d2")]
    for topic in allowed + denied:
        assert edge.publish(topic, b"x") in ACCEPTED
    assert d2.publish(topics.update_topic(EDGE, "d2"), b"d2's update") in ACCEPTED  # others' updates stay private
    assert edge.publish(topics.round_topic("e2"), b"x") == NOT_AUTHORIZED  # the edge is confined to its own tree
    # Mosquitto queues to d1 in the order it handled the publishes: after the marker, nothing earlier is in flight
    assert edge.publish(topics.round_topic(EDGE), b"marker") in ACCEPTED
    wait_for(lambda: (topics.round_topic(EDGE), b"marker") in d1.messages)
    assert sorted(t for t, p in d1.messages if p != b"marker") == sorted(allowed)


def test_edge_bridges_its_aggregate_to_the_cloud_over_mtls(ca, workdir):
    cloud_broker = start_broker(workdir, {"role": "cloud", "id": pki.CLOUD_ID, "pki": ca}, "cloud")
    bridged = start_broker(workdir, {"role": "edge", "id": EDGE, "pki": ca, "cloud_host": "127.0.0.1",
                               "cloud_port": cloud_broker.port}, "edge-bridged")
    opened: list[Session] = []
    try:
        cloud = connect_as(ca, "cloud", pki.CLOUD_ID, cloud_broker.port)
        e2 = connect_as(ca, "edge", "e2", cloud_broker.port)
        edge = connect_as(ca, "edge", EDGE, bridged.port, client_id="edge-gw3")
        device_at_cloud = connect_as(ca, "device", "d1", cloud_broker.port)
        cloud_ident, e2_ident = pki.identity(ca, "cloud", pki.CLOUD_ID), pki.identity(ca, "edge", "e2")
        push = open_session(cloud_broker.port, "push", client_context(cloud_ident.ca, *cloud_ident.role("push")))
        e2_validator = open_session(cloud_broker.port, "v", client_context(e2_ident.ca, *e2_ident.role("ledger")))
        opened += [cloud, e2, edge, device_at_cloud, push, e2_validator]
        cloud.subscribe("fl/cloud/aggregates/+")
        e2.subscribe("fl/cloud/#")
        edge.subscribe(topics.CLOUD_MODEL)
        # The bridge connects asynchronously: publish until the cloud sees the aggregate through it.
        wait_for(lambda: edge.publish(topics.aggregate_topic(EDGE), b"agg") in ACCEPTED and
                 cloud.received(lambda: cloud.messages, 0.3), 10,
                 message=lambda: f"the bridge: {cloud_broker.log_tail()}")
        assert cloud.messages[0] == (topics.aggregate_topic(EDGE), b"agg")
        assert cloud.publish(topics.CLOUD_MODEL, b"global model", retain=True) in ACCEPTED
        wait_for(lambda: (topics.CLOUD_MODEL, b"global model") in edge.messages)
        manifest = topics.bundle_manifest_topic(EDGE, "ecg")  # OTA: the cloud publishes, the bridge brings it in
        device = connect_as(ca, "device", "d2", bridged.port)
        opened.append(device)
        device.subscribe(f"fl/{EDGE}/bundles/#")
        push.subscribe(topics.status_topic(topics.ANY, topics.ANY))   # the push's fleet watch (cloud/push.py)
        assert push.publish(manifest, b"bundle manifest", retain=True) in ACCEPTED   # `fediomt push`'s certificate
        wait_for(lambda: (manifest, b"bundle manifest") in device.messages)
        assert device.publish(topics.status_topic(EDGE, "d2"), b"installed") in ACCEPTED   # its outcome, bridged
        wait_for(lambda: (topics.status_topic(EDGE, "d2"), b"installed") in push.messages)
        assert e2.publish(topics.status_topic(EDGE, "d9"), b"forged status") == NOT_AUTHORIZED
        assert e2.publish(manifest, b"forged manifest") == NOT_AUTHORIZED
        # On the cloud broker an edge writes only its own aggregate and sees no other edge's; devices get nothing.
        assert e2.publish(topics.aggregate_topic(EDGE), b"forged") == NOT_AUTHORIZED
        assert e2_validator.publish(topics.ledger_vote_topic(EDGE), b"forged vote") == NOT_AUTHORIZED
        assert e2_validator.publish(topics.ledger_vote_topic("e2"), b"vote") in ACCEPTED
        assert device_at_cloud.publish(topics.aggregate_topic("d1"), b"x") == NOT_AUTHORIZED
        assert [t for t, _ in e2.messages] == [topics.CLOUD_MODEL]
    finally:
        for s in opened:
            s.close()
        bridged.close()
        cloud_broker.close()


def test_aggregates_wait_in_the_bridge_while_the_cloud_broker_is_down(ca, workdir):
    """The bridge's local session is persistent (`cleansession false`): an aggregate published while the cloud
    broker is down is delivered once it is back, to a cloud subscriber with a persistent session."""
    cloud_broker = start_broker(workdir, {"role": "cloud", "id": pki.CLOUD_ID, "pki": ca}, "outage-cloud")
    bridged = start_broker(workdir, {"role": "edge", "id": EDGE, "pki": ca, "cloud_host": "127.0.0.1",
                                     "cloud_port": cloud_broker.port}, "outage-edge")
    opened: list[Session] = []
    try:
        cloud = connect_as(ca, "cloud", pki.CLOUD_ID, cloud_broker.port, session_expiry=3600)
        edge = connect_as(ca, "edge", EDGE, bridged.port, client_id="edge-outage")
        opened += [cloud, edge]
        cloud.subscribe("fl/cloud/aggregates/+")
        wait_for(lambda: edge.publish(topics.aggregate_topic(EDGE), b"probe") in ACCEPTED and
                 cloud.received(lambda: cloud.messages, 0.3), 10, message="the bridge")
        cloud_broker.stop()
        assert edge.publish(topics.aggregate_topic(EDGE), b"sent during the outage") in ACCEPTED
        cloud_broker.start()
        wait_for(lambda: (topics.aggregate_topic(EDGE), b"sent during the outage") in cloud.messages, 40,
                 message=lambda: f"the queued aggregate: {bridged.log_tail()}")
    finally:
        for s in opened:
            s.close()
        bridged.close()
        cloud_broker.close()


def test_committed_examples_are_what_the_generator_writes():
    examples = REPO / "deploy" / "mosquitto"
    etc, pki_dir = Path("/etc/mosquitto/fediomt"), Path("/etc/fediomt/pki")
    var = Path("/var/lib/mosquitto")
    edge = broker_config.BrokerFilesConfig(role="edge", id="edge-a", pki=pki_dir, cloud_host="cloud.example.org",
                                      data_dir=var / "edge")
    cloud = broker_config.BrokerFilesConfig(role="cloud", id=pki.CLOUD_ID, pki=pki_dir, data_dir=var / "cloud")
    assert (examples / "edge.conf").read_text() == broker_config.render(edge, etc / "edge.acl")
    assert (examples / "cloud.conf").read_text() == broker_config.render(cloud, etc / "cloud.acl")
    assert (examples / "edge.acl").read_text() == broker_config.edge_acl("edge-a")
    assert (examples / "cloud.acl").read_text() == broker_config.cloud_acl(["edge-a", "edge-b"])


def test_config_has_the_documented_hardening(ca, workdir):
    conf, acl = broker_config.write(
        broker_config.BrokerFilesConfig(role="edge", id=EDGE, pki=ca, cloud_host="cloud.lan"), workdir / "check.conf")
    text = conf.read_text()
    for line in ["allow_anonymous false", "require_certificate true", "use_identity_as_username true",
                 "tls_version tlsv1.3", "set_tcp_nodelay true", "persistence true", "bridge_protocol_version mqttv50",
                 f"max_packet_size {broker_config.MAX_MESSAGE_BYTES + broker_config.PACKET_HEADROOM}",
                 f"topic {topics.aggregate_topic(EDGE)} out 1", f"topic {topics.CLOUD_MODEL} in 1"]:
        assert line in text.splitlines()
    assert f"pattern write fl/{EDGE}/updates/%u" in acl.read_text().splitlines()
    with pytest.raises(pki.PkiError, match="issue --server broker-nope"):
        broker_config.write(broker_config.BrokerFilesConfig(role="edge", id=EDGE, pki=ca, server="broker-nope"),
                            workdir / "x.conf")
    exported = pki.export(ca, workdir / "cloud-host", [("server", "broker-cloud")])  # no index: edges must be named
    with pytest.raises(pki.PkiError, match="--edge"):
        broker_config.write(broker_config.BrokerFilesConfig(role="cloud", id="cloud", pki=exported), workdir / "y.conf")


def test_edge_replicas_split_updates_through_a_shared_subscription(ca, edge_broker, sessions):
    replicas = [connect_as(ca, "edge", cn, edge_broker.port) for cn in (EDGE, REPLICA)]  # one certificate each
    d1 = connect_as(ca, "device", "d1", edge_broker.port)
    sessions += [*replicas, d1]
    for replica in replicas:
        replica.subscribe(topics.shared("k3Xq9wTzR2", f"fl/{EDGE}/updates/+"))  # a secret group name
    sent = [f"update {i}".encode() for i in range(10)]
    for payload in sent:
        assert d1.publish(topics.update_topic(EDGE, "d1"), payload) in ACCEPTED
    wait_for(lambda: sum(len(r.messages) for r in replicas) >= len(sent))
    got = [p for r in replicas for _, p in r.messages]
    assert sorted(got) == sorted(sent)  # each update exactly once...
    assert all(r.messages for r in replicas)  # ...and both replicas took a share


def test_a_device_using_the_edges_client_id_neither_kicks_the_edge_nor_takes_its_queue(ca, edge_broker, sessions):
    """Issue 18: a device connecting as `fediomt-edge-edge-a-0` took the edge's place and its clean start destroyed
    the edge's 3 queued updates. The broker now makes every client id the certificate's CN."""
    edge_id = f"fediomt-edge-{EDGE}-0"  # what edge/gateway.py asks for
    edge = connect_as(ca, "edge", EDGE, edge_broker.port, client_id=edge_id, session_expiry=3600)
    sessions.append(edge)
    edge.subscribe(f"fl/{EDGE}/updates/+")
    for stolen in (edge_id, EDGE):
        sessions.append(connect_as(ca, "device", "d2", edge_broker.port, client_id=stolen))
        assert sessions[-1].connected
    time.sleep(0.5)
    assert edge.drops == 0 and edge.client.is_connected()  # not kicked
    edge.close()  # away: its persistent session queues the updates
    d1 = connect_as(ca, "device", "d1", edge_broker.port)
    sessions.append(d1)
    for i in range(3):
        assert d1.publish(topics.update_topic(EDGE, "d1"), f"queued {i}".encode()) == 0
    for stolen in (edge_id, EDGE):  # a clean start under the edge's id would discard its session
        sessions.append(connect_as(ca, "device", "d2", edge_broker.port, client_id=stolen))
        sessions[-1].close()
    back = connect_as(ca, "edge", EDGE, edge_broker.port, client_id=edge_id, session_expiry=3600)
    sessions.append(back)
    wait_for(lambda: len(back.messages) >= 3)
    assert sorted(p for _, p in back.messages) == [f"queued {i}".encode() for i in range(3)]


def test_on_the_cloud_broker_a_client_id_is_its_certificate_and_role_certificates_hold_one_connections_rights(
        ca, workdir):
    """Issue 18, on the cloud broker: client ids are CNs there too. The cloud's extra connections (masked rounds,
    ledger proposer, push) and an edge's ledger validator hold role certificates (CN "ID.ROLE"), so all of them stay
    connected beside the cloud and the edge's bridge; a device connecting under the cloud's client id (or any of
    the others') kicks nobody and a clean start under it does not discard the cloud's queued aggregates; and a role
    certificate has only its own connection's rights."""
    broker = start_broker(workdir, {"role": "cloud", "id": pki.CLOUD_ID, "pki": ca}, "bound-cloud")
    cloud_ident, e2_ident = pki.identity(ca, "cloud", pki.CLOUD_ID), pki.identity(ca, "edge", "e2")
    asked = "fediomt-cloud"   # what cloud/config.py asks for
    opened: list[Session] = []
    try:
        cloud = connect_as(ca, "cloud", pki.CLOUD_ID, broker.port, client_id=asked, session_expiry=3600)
        roles = {role: open_session(broker.port, f"{asked}-{role}",
                                    client_context(cloud_ident.ca, *cloud_ident.role(role))) for role in ROLES["cloud"]}
        bridge = connect_as(ca, "edge", "e2", broker.port, client_id="bridge-e2")
        validator = open_session(broker.port, "ledger-e2", client_context(e2_ident.ca, *e2_ident.role("ledger")))
        held = [cloud, *roles.values(), bridge, validator]
        opened += held
        assert all(s.connected for s in held)
        cloud.subscribe(topics.subtree(topics.CLOUD, "aggregates"))
        for stolen in (asked, pki.CLOUD_ID, f"{asked}-secagg", "cloud.ledger", "cloud.push", "e2", "e2.ledger"):
            opened.append(connect_as(ca, "device", "d2", broker.port, client_id=stolen))
            assert opened[-1].connected
        time.sleep(0.5)
        assert [s.drops for s in held] == [0] * len(held) and all(s.client.is_connected() for s in held)
        assert roles["push"].publish(topics.bundle_manifest_topic("e2", "pi"), b"manifest") in ACCEPTED
        assert roles["push"].publish(topics.aggregate_topic("e2"), b"x") == NOT_AUTHORIZED
        assert roles["ledger"].publish(topics.LEDGER_PROPOSALS, b"proposal") in ACCEPTED
        assert roles["ledger"].publish(topics.CLOUD_MODEL, b"x") == NOT_AUTHORIZED
        assert roles["secagg"].publish(topics.secagg_topic(topics.CLOUD, "open"), b"open") in ACCEPTED
        assert roles["secagg"].publish(topics.LEDGER_BLOCKS, b"x") == NOT_AUTHORIZED
        assert validator.publish(topics.ledger_vote_topic("e2"), b"vote") in ACCEPTED
        assert validator.publish(topics.aggregate_topic("e2"), b"x") == NOT_AUTHORIZED
        assert bridge.publish(topics.ledger_vote_topic("e2"), b"vote") == NOT_AUTHORIZED   # the validator's right
        cloud.close()   # away: its persistent session queues the aggregates
        for i in range(3):
            assert bridge.publish(topics.aggregate_topic("e2"), f"queued {i}".encode()) == 0
        for stolen in (asked, pki.CLOUD_ID):   # a clean start under the cloud's id would discard its session
            opened.append(connect_as(ca, "device", "d2", broker.port, client_id=stolen))
            opened[-1].close()
        back = connect_as(ca, "cloud", pki.CLOUD_ID, broker.port, client_id=asked, session_expiry=3600)
        opened.append(back)
        wait_for(lambda: len(back.messages) >= 3)
        assert sorted(p for _, p in back.messages) == [f"queued {i}".encode() for i in range(3)]
    finally:
        for s in opened:
            s.close()
        broker.close()


def test_a_device_cannot_take_updates_meant_for_the_edge_daemon(ca, workdir, tmp_path):
    """Issue 18: a device joined the edge's guessable `$share/edge-a/fl/edge-a/updates/+` group and 9 of 12 of
    another device's updates were dropped (Mosquitto 2.0's acl_file grants every subscription and filters per
    message, so a device in the group swallows its share). The real edge daemon subscribes without a group."""
    devices = ["h0", "h1", "h2", "h3"]
    dep = Deployment(ca, workdir, tmp_path, "share", [*devices, "thief"], rounds={"quorum": 1.0})
    try:
        dep.open_round(round_id=2, cohort=devices)
        dep.start_edge()
        honest = {d: dep.connect("device", d) for d in devices}
        for d, s in honest.items():
            s.subscribe(topics.ack_topic(EDGE, d))
        honest["h0"].subscribe(topics.round_topic(EDGE))  # relayed once the edge daemon is up and subscribed
        wait_for(lambda: honest["h0"].messages, 20, message=lambda: f"the relayed round: {dep.log_tail()}")
        thief = dep.connect("device", "thief")
        for f in (topics.shared(EDGE, f"fl/{EDGE}/updates/+"), topics.shared(f"fediomt-edge-{EDGE}", f"fl/{EDGE}/#"),
                  f"fl/{EDGE}/updates/+"):
            thief.subscribe(f)
        for d, s in honest.items():
            update = dep.fed.update(d, np.full(N_PARAMS, 0.1, np.float32), round_id=2)
            for _ in range(3):  # 12 updates; the 2nd and 3rd of each device are acked as duplicates
                assert s.publish(topics.update_topic(EDGE, d), update) == 0

        def acks(d: str) -> list[Ack]:
            return [decode(p, expect=Ack) for t, p in list(honest[d].messages) if t == topics.ack_topic(EDGE, d)]

        for d in devices:
            wait_for(lambda d=d: len(acks(d)) >= 3, 20, message=lambda: f"acks: {dep.log_tail()}")
            assert [a.accepted for a in acks(d)] == [True] * 3
        assert not [t for t, _ in thief.messages if matches(f"fl/{EDGE}/updates/+", t)]  # it reads rounds only
    finally:
        dep.close()


def test_a_packet_over_the_cap_costs_the_sender_its_connection_and_is_not_delivered(ca, workdir, sessions):
    """`max_packet_size` is checked before the payload is read (cheap for the broker), and the client is
    disconnected. A QoS 1 sender would resend the same packet after every reconnect, forever: clients chunk."""
    small = start_broker(workdir, {"role": "edge", "id": EDGE, "pki": ca, "max_packet_size": 64 * 1024}, "small")
    try:
        edge, d1 = connect_as(ca, "edge", EDGE, small.port), connect_as(ca, "device", "d1", small.port)
        sessions += [edge, d1]
        edge.subscribe(f"fl/{EDGE}/updates/+")
        d1.client.publish(topics.update_topic(EDGE, "d1"), bytes(100 * 1024), qos=0)
        wait_for(lambda: "disconnected due to oversize packet" in small.log_tail(20_000))
        wait_for(d1.client.is_connected)  # paho reconnects by itself
        assert d1.publish(topics.update_topic(EDGE, "d1"), bytes(60 * 1024)) in ACCEPTED
        wait_for(lambda: edge.messages)
        assert [len(p) for _, p in edge.messages] == [60 * 1024]
    finally:
        small.close()


class Deployment:
    """A cloud broker, an edge broker bridged to it (both from `broker config`), the real edge daemon, and a
    scripted federation (tests.test_edge.Fed) whose every key comes from the PKI."""

    def __init__(self, ca: Path, workdir: Path, tmp_path: Path, name: str, devices: list[str], **edge_cfg) -> None:
        for d in devices:
            if not pki.identity(ca, "device", d).cert.exists():
                give_to_broker_user(pki.issue(ca, "device", d).key)
        self.ca, self.tmp_path, self.devices = ca, tmp_path, devices
        (tmp_path / "enrolment").mkdir()  # exactly this federation's devices: the edge's "everyone enrolled"
        for d in devices:
            shutil.copy(pki.identity(ca, "device", d).sign_pub, tmp_path / "enrolment" / f"{d}.pub")
        edge_id, cloud_id = pki.identity(ca, "edge", EDGE), pki.identity(ca, "cloud", pki.CLOUD_ID)
        self.cloud_broker = start_broker(workdir, {"role": "cloud", "id": pki.CLOUD_ID, "pki": ca}, f"{name}-cloud")
        self.edge_broker = start_broker(workdir, {"role": "edge", "id": EDGE, "pki": ca, "cloud_host": "127.0.0.1",
                                                 "cloud_port": self.cloud_broker.port}, f"{name}-edge")
        self.fed = Fed(tmp_path / "fed", n_devices=0, enrolment_dir=str(tmp_path / "enrolment"),
                       signing_key=str(edge_id.sign_key), cloud_public_key=str(cloud_id.sign_pub),
                       broker={"host": "127.0.0.1", "port": self.edge_broker.port, "ca": str(pki.ca_cert_path(ca)),
                               "cert": str(edge_id.cert), "key": str(edge_id.key)}, **edge_cfg)
        self.fed.devices = devices
        self.fed.keys = {d: signing.load_private_key(pki.identity(ca, "device", d).sign_key) for d in devices}
        self.fed.cloud_key = signing.load_private_key(cloud_id.sign_key)
        self.fed.edge_key = signing.load_private_key(edge_id.sign_key)
        self.opened: list[Session] = []
        self.by_name: dict[tuple[str, int], Session] = {}
        self.cloud = self.connect("cloud", pki.CLOUD_ID, self.cloud_broker.port)
        self.cloud.subscribe("fl/cloud/aggregates/+")
        self.daemon: subprocess.Popen | None = None

    def connect(self, kind: str, name: str, port: int | None = None) -> Session:
        """A new session of `name`, after closing its previous one on that broker: the edge broker makes the CN the
        client id, so two would take each other's place."""
        port = port or self.edge_broker.port
        if (name, port) in self.by_name:
            self.by_name.pop((name, port)).close()
        s = self.by_name[name, port] = connect_as(self.ca, kind, name, port, client_id=f"{name}-{len(self.opened)}")
        self.opened.append(s)
        return s

    def open_round(self, **announce) -> None:
        assert self.cloud.publish(topics.CLOUD_MODEL, self.fed.model(), retain=True) in ACCEPTED
        assert self.cloud.publish(topics.CLOUD_ROUND, self.fed.announce(**announce), retain=True) in ACCEPTED

    def start_edge(self) -> None:
        self.log = open(self.tmp_path / "edge.log", "wb")  # noqa: SIM115 - closed in close()
        self.daemon = subprocess.Popen([sys.executable, "-m", "fediomt", "edge", "run", "--config",
                                        str(self.fed.config)], cwd=REPO, stdout=self.log, stderr=self.log)

    def log_tail(self) -> str:
        return (self.tmp_path / "edge.log").read_text()[-3000:]

    def aggregate(self) -> EdgeAggregate:
        wait_for(lambda: self.cloud.messages, 20, message=lambda: f"the aggregate: {self.log_tail()}")
        ((topic, payload),) = self.cloud.messages
        agg = decode(payload, expect=EdgeAggregate)
        verify_message(agg, self.fed.edge_key.public_key())
        assert topic == topics.aggregate_topic(EDGE)
        return agg

    def stop_edge(self) -> int:
        self.daemon.send_signal(signal.SIGTERM)
        return self.daemon.wait(15)

    def close(self) -> None:
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.kill()
                self.daemon.wait()
            self.log.close()
        for s in self.opened:
            s.close()
        self.edge_broker.close()
        self.cloud_broker.close()


def test_a_device_joining_mid_run_catches_up_through_the_real_edge(ca, workdir, tmp_path):
    """The edge daemon behind its bridge relays v1 (full) and two delta versions; a device that connects after
    them finds only v3's delta retained, which it cannot apply, and the full v3 the edge published on
    model/full (readable with a device certificate), which the signed delta vouches for."""
    from cloud.model import compress_broadcast
    from protocol.compression import CompressionSettings
    from protocol.global_model import catch_up, rebuild
    from protocol.messages import encode, global_model, sign_message

    dep = Deployment(ca, workdir, tmp_path, "catchup", ["j01", "j02"])
    rng = np.random.default_rng(11)
    int4 = CompressionSettings(method="dense", bits=4)
    try:
        dep.start_edge()
        watcher = dep.connect("device", "j01")
        watcher.subscribe(topics.model_topic(EDGE))
        weights = rng.normal(size=N_PARAMS).astype(np.float32)
        for v in (1, 2, 3):
            delta = None
            if v > 1:
                delta, weights, _ = compress_broadcast(weights, weights + rng.normal(size=N_PARAMS) * 0.1, None,
                                                       int4)
            msg = sign_message(global_model("m", v, weights, delta), dep.fed.cloud_key)
            assert dep.cloud.publish(topics.CLOUD_MODEL, encode(msg), retain=True) in ACCEPTED
            wait_for(lambda n=v: len(watcher.messages) == n, 30, message=dep.log_tail)
        late = dep.connect("device", "j02")
        late.subscribe(topics.model_topic(EDGE))
        wait_for(lambda: late.messages, 20, message="the retained model")
        (_, payload), = late.messages
        signed = decode(payload, expect=GlobalModel)
        verify_message(signed, dep.fed.cloud_key.public_key())
        assert (signed.model_version, signed.encoding) == (3, "delta")
        with pytest.raises(ProtocolError):   # v-1's weights are not what a newcomer holds
            rebuild(signed, -1, None)
        late.subscribe(topics.model_full_topic(EDGE))
        wait_for(lambda: len(late.messages) == 2, 20, message=lambda: f"the full model: {dep.log_tail()}")
        full = decode(late.messages[1][1], expect=GlobalModel)
        np.testing.assert_array_equal(catch_up(full, signed)[0], weights)
    finally:
        dep.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_round_of_the_edge_daemon_through_the_mtls_deployment_survives_a_broker_restart(ca, workdir, tmp_path,
                                                                                         stop_signal):
    """The real edge daemon behind `broker config` brokers (edge bridged to cloud), PKI keys everywhere: the broker
    refuses a cross-device publish, the edge refuses a forged sender, a replay from an earlier round and a
    duplicate, and a restart of the edge broker mid-round (SIGTERM, or kill -9 which loses what the broker had not
    autosaved) loses no acknowledged update, and devices connecting afterwards still find the round."""
    devices = [f"d{i:02d}" for i in range(6)]
    dep = Deployment(ca, workdir, tmp_path, f"round-{stop_signal.name}", devices, rounds={"quorum": 1.0})
    fed = dep.fed

    def device(d: str) -> Session:
        s = dep.connect("device", d)
        s.subscribe(topics.ack_topic(EDGE, d))
        return s

    def send_until_acked(s: Session, d: str, payload: bytes) -> Ack:
        """A device's retry: PUBACK 16 (no edge subscribed yet, e.g. after a broker restart) means send again."""
        before = len(s.messages)
        wait_for(lambda: s.publish(topics.update_topic(EDGE, d), payload) == 0, 20)
        wait_for(lambda: len(s.messages) > before, 10)
        return decode(s.messages[-1][1], expect=Ack)

    try:
        dep.open_round(round_id=2, cohort=devices)
        dep.start_edge()
        watcher = device("d05")
        watcher.subscribe(topics.round_topic(EDGE))  # relayed by the edge once the bridge delivered the round
        wait_for(lambda: any(t == topics.round_topic(EDGE) for t, _ in watcher.messages), 20,
                 message=lambda: f"the relayed round: {dep.log_tail()}")
        rng = np.random.default_rng(12)
        deltas = {d: rng.normal(size=N_PARAMS).astype(np.float32) for d in devices}
        updates = {d: fed.update(d, deltas[d], round_id=2) for d in devices}
        d00 = device("d00")
        assert d00.publish(topics.update_topic(EDGE, "d01"), updates["d01"]) == NOT_AUTHORIZED  # broker refuses
        forged = fed.update("d01", deltas["d01"], round_id=2, key=fed.keys["d00"])  # d01's id, d00's key
        assert send_until_acked(d00, "d00", forged).reason == Reason.WRONG_SENDER
        replay = fed.update("d00", deltas["d00"], round_id=1)  # captured in an earlier round
        assert send_until_acked(d00, "d00", replay).reason == Reason.WRONG_ROUND
        for d in devices[:3]:
            ack = send_until_acked(d00 if d == "d00" else device(d), d, updates[d])
            assert (ack.accepted, ack.reason) == (True, Reason.OK)
        dep.edge_broker.stop(stop_signal)  # mid-round: half the cohort acknowledged
        dep.edge_broker.start()
        late = device("d04")  # a device that connects after the restart still finds the round (retained)
        late.subscribe(topics.round_topic(EDGE))
        wait_for(lambda: any(t == topics.round_topic(EDGE) for t, _ in late.messages), 20)
        for d in ["d00", *devices[3:]]:  # d00 resends (a device unsure of its Ack): counted once
            ack = send_until_acked(device(d), d, updates[d])
            assert ack.accepted and ack.reason == (Reason.DUPLICATE if d == "d00" else Reason.OK)
        agg = dep.aggregate()
        assert agg.device_ids == devices
        np.testing.assert_allclose(decode_update(agg.delta, N_PARAMS), np.mean([deltas[d] for d in devices], 0),
                                   rtol=1e-5, atol=1e-7)
        assert agg.rejected == {"WRONG_SENDER": 1, "WRONG_ROUND": 1, "DUPLICATE": 1}
        assert dep.stop_edge() == 0
    finally:
        dep.close()


class FlakyLink:
    """A TCP proxy standing for a bad radio link: every chunk is delayed, and every connection is cut after a
    random lifetime. (`tc netem` would be the kernel's way, but needs the sch_netem module, absent in containers.)"""

    def __init__(self, upstream_port: int, delay_s: float = 0.01, lifetime_s: tuple[float, float] = (0.4, 1.5),
                 seed: int = 0) -> None:
        self.upstream_port, self.delay_s, self.lifetime_s = upstream_port, delay_s, lifetime_s
        self.rng, self.cuts = random.Random(seed), 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            cut = threading.Timer(self.rng.uniform(*self.lifetime_s), self._cut, args=(down, up))
            cut.daemon = True
            cut.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        self._cut(src, dst, count=False)

    def _cut(self, *socks: socket.socket, count: bool = True) -> None:
        self.cuts += count
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_flaky_links_and_30_percent_of_devices_vanishing_mid_round(ca, workdir, tmp_path):
    """10 devices in the cohort: 3 see the round and vanish, 7 reach the edge through links that drop every
    connection within 0.4-1.5 s and resend until the edge's Ack. The round closes at its deadline, and the
    aggregate is the NumPy mean of exactly the updates the edge acknowledged."""
    devices = [f"f{i:02d}" for i in range(10)]
    senders, vanishing = devices[:7], devices[7:]
    dep = Deployment(ca, workdir, tmp_path, "flaky", devices, rounds={"quorum": 1.0})
    link = FlakyLink(dep.edge_broker.port)
    rng = np.random.default_rng(30)
    deltas = {d: rng.normal(size=N_PARAMS).astype(np.float32) for d in senders}
    updates = {d: dep.fed.update(d, deltas[d]) for d in senders}
    acks: dict[str, list[Ack]] = {d: [] for d in senders}

    def deliver(d: str, until: float) -> None:
        s = Session(f"{d}-flaky", identity_context(pki.identity(ca, "device", d)))
        s.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        s.filters.append(topics.ack_topic(EDGE, d))
        dep.opened.append(s)
        s.client.connect_async("127.0.0.1", link.port)
        s.client.loop_start()
        while time.monotonic() < until and not any(a.accepted for a in acks[d]):
            if s.client.is_connected():
                s.client.publish(topics.update_topic(EDGE, d), updates[d], qos=1)
            s.received(lambda: len(s.messages) > len(acks[d]), 1.5)
            acks[d] = [decode(p, expect=Ack) for _, p in list(s.messages)]

    def vanish(d: str) -> None:
        """It gets the round, then its radio dies without a word (no DISCONNECT)."""
        s = dep.connect("device", d)
        s.subscribe(topics.round_topic(EDGE))
        wait_for(lambda: s.messages, 20, message=lambda: f"the relayed round: {dep.log_tail()}")
        s.client.loop_stop()
        s.client.socket().shutdown(socket.SHUT_RDWR)

    try:
        dep.start_edge()
        watcher = dep.connect("device", vanishing[0])
        watcher.subscribe(topics.model_topic(EDGE))
        assert dep.cloud.publish(topics.CLOUD_MODEL, dep.fed.model(), retain=True) in ACCEPTED
        wait_for(lambda: watcher.messages, 30, message=lambda: f"the relayed model: {dep.log_tail()}")  # edge up
        assert dep.cloud.publish(topics.CLOUD_ROUND, dep.fed.announce(deadline=time.time() + 6, cohort=devices),
                                 retain=True) in ACCEPTED
        for d in vanishing:
            vanish(d)
        workers = [threading.Thread(target=deliver, args=(d, time.monotonic() + 5)) for d in senders]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        agg = dep.aggregate()
        acknowledged = sorted(d for d in senders if any(a.accepted for a in acks[d]))
        assert link.cuts > 0 and len(acknowledged) >= 4, (link.cuts, acks)
        assert sorted(agg.device_ids) == acknowledged  # no acknowledged update lost, no vanished device counted
        np.testing.assert_allclose(decode_update(agg.delta, N_PARAMS), np.mean([deltas[d] for d in acknowledged], 0),
                                   rtol=1e-5, atol=1e-7)
        assert dep.stop_edge() == 0
    finally:
        link.close()
        dep.close()


@pytest.mark.slow
def test_the_whole_stack_over_mtls_survives_the_cloud_being_killed_mid_round(ca, workdir, tmp_path):
    """Cloud daemon, edge daemon and devices, each with its own PKI identity, through the bridged brokers from
    `broker config`. The cloud is killed (-9) as soon as round 2's announcement reaches the devices, and
    restarted: it resumes from its checkpoint, the round-2 aggregate is not lost (the cloud's persistent session
    holds it), and each new global model is the previous one plus the NumPy FedAvg of the device deltas."""
    devices = ["s00", "s01", "s02"]
    dep = Deployment(ca, workdir, tmp_path, "stack", devices, n_params=MLP_PARAMS, rounds={"quorum": 1.0})
    cloud_id = pki.identity(ca, "cloud", pki.CLOUD_ID)
    pki.enrolment(ca, tmp_path / "edge-keys", kind="edge")
    config = tmp_path / "cloud.toml"
    config.write_text(f'run_dir = "run"\nsigning_key = "{cloud_id.sign_key}"\nedge_keys_dir = "edge-keys"\n'
                      f'edges = ["{EDGE}"]\nmodel = "vitals_mlp"\nrounds = 2\nround_timeout_s = 60.0\n'
                      f'{MLP_OPTIONS}[strategy]\nname = "fedavg"\n'
                      f'[broker]\nhost = "127.0.0.1"\nport = {dep.cloud_broker.port}\n'
                      f'ca = "{pki.ca_cert_path(ca)}"\ncert = "{cloud_id.cert}"\nkey = "{cloud_id.key}"\n'
                      'session_expiry_s = 3600\n')  # without it a [broker] table means a clean session: lost
    rng = np.random.default_rng(5)
    deltas = {d: rng.normal(size=MLP_PARAMS).astype(np.float32) for d in devices}
    samples = {d: 10 * (i + 1) for i, d in enumerate(devices)}
    sessions = {d: dep.connect("device", d) for d in devices}
    for s in sessions.values():
        s.subscribe(topics.round_topic(EDGE))
        s.subscribe(topics.model_topic(EDGE))
    stop = threading.Event()
    watched = sessions["s00"]  # what every device sees

    def received(topic: str, kind: type) -> list:
        return [decode(p, expect=kind) for t, p in list(watched.messages) if t == topic]

    def models() -> dict[int, np.ndarray]:
        return {m.model_version: bytes_to_floats(m.weights, m.n_params)
                for m in received(topics.model_topic(EDGE), GlobalModel)}

    def devices_answer_each_round_once() -> None:
        answered: set[int] = set()
        while not stop.wait(0.05):
            for ann in received(topics.round_topic(EDGE), RoundAnnouncement):
                if ann.round_id not in answered:
                    answered.add(ann.round_id)
                    for d, s in sessions.items():
                        update = dep.fed.update(d, deltas[d], round_id=ann.round_id, version=ann.model_version,
                                                num_samples=samples[d])
                        s.client.publish(topics.update_topic(EDGE, d), update, qos=1)

    responder = threading.Thread(target=devices_answer_each_round_once, daemon=True)
    log = open(tmp_path / "cloud.log", "ab")  # noqa: SIM115 - closed below
    cloud = None
    try:
        dep.cloud.close()   # the harness's stand-in: the real cloud daemon holds the cloud certificate's client id
        dep.start_edge()
        responder.start()
        cloud = cloud_process(config, log)
        wait_for(lambda: any(a.round_id == 2 for a in received(topics.round_topic(EDGE), RoundAnnouncement))
                 or cloud.poll() is not None, 120, message=lambda: (tmp_path / "cloud.log").read_text()[-3000:])
        cloud.send_signal(signal.SIGKILL)  # round 2 reached the devices; their updates are on their way
        cloud.wait(10)
        cloud = cloud_process(config, log)
        assert cloud.wait(120) == 0, (tmp_path / "cloud.log").read_text()[-3000:]
        assert [r["round"] for r in rounds_of(tmp_path / "run")] == [1, 2]
        assert '"resumed": true' in (tmp_path / "cloud.log").read_text()
        wait_for(lambda: 3 in models())
        got, mean = models(), sum(samples[d] * deltas[d] for d in devices) / sum(samples.values())
        np.testing.assert_allclose(got[2], got[1] + mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[3], got[2] + mean, rtol=1e-5, atol=1e-6)
    finally:
        stop.set()
        if cloud is not None and cloud.poll() is None:
            cloud.kill()
            cloud.wait()
        log.close()
        dep.close()
