"""The MQTT shell around EdgeEngine: paho-mqtt 2.x, MQTT 5, one consumer thread.

paho's network thread only queues incoming messages; the main loop hands what is queued (up to GROUP messages) to
the engine inside one SQLite transaction, commits it, and only then publishes the Acks and aggregates and
acknowledges the messages to the broker (manual PUBACK), so every acknowledged update is durable. A
kill -9 at any point therefore leaves each update either durable or un-acknowledged: the broker redelivers it and
queues new ones on the edge's persistent session (the default, `broker.session_expiry_s`), and the device resends
the same bytes after its Ack timeout (device.agent) when a session was lost; duplicates are counted once.

Device updates arrive through `fl/{edge}/updates/+`, or with replicas through the shared subscription
`$share/{group}/fl/{edge}/updates/+` (they split them round-robin). `fl/cloud/round` and `fl/cloud/model` are
received by every replica and relayed, verified and byte-identical (the cloud's signature stays valid), retained
to `fl/{edge}/round` and `fl/{edge}/model`.
Aggregates go to `fl/cloud/aggregates/{edge}` either on the same broker (bridged to the cloud by Mosquitto) or on
a second connection straight to the cloud's broker (`[cloud]` in the config). An aggregate stays in the outbox
until the cloud's receipt on `fl/cloud/receipts/{edge}`: a broker's PUBACK only means queued, and a broker killed
before its autosave loses what it queued for an absent cloud (docs/protocol.md "Delivery of aggregates").
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time

from edge.config import EdgeConfig
from edge.engine import EdgeEngine
from edge.secagg_round import mask_for_cloud, start_cohort_round
from protocol.logs import event
from protocol.messages import encode
from protocol.mqtt import INBOX_SIZE, Connection
from protocol.publication import Publication
from protocol.secagg.runner import SecAggRunner
from protocol.topics import (
    ANY,
    CLOUD,
    CLOUD_MODEL,
    CLOUD_ROUND,
    ack_topic,
    matches,
    receipt_topic,
    shared,
    status_topic,
    subtree,
    update_topic,
)

GROUP = 64           # messages per SQLite commit (group commit) at most
RESEND_S = 2.0       # an aggregate the broker did not confirm (PUBACK) is published again this long after; also how
                     # soon after a (re)connection or a cloud message the unreceipted ones go again
RECEIPT_WAIT_S = (5.0, 60.0)   # the broker has it, the cloud has not receipted it: publish again after the first
                               # wait, doubling up to the second (a cloud down for long gets no flood queued)


class Gateway:
    """The edge daemon: moves messages between MQTT and EdgeEngine, acking only what the round store made durable."""

    def __init__(self, cfg: EdgeConfig, log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.engine = EdgeEngine(cfg, log)
        self.stop = threading.Event()
        self.resend_at: float | None = None   # when to publish the unreceipted aggregates (the outbox) again
        self.receipt_wait = RECEIPT_WAIT_S[0]
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX_SIZE)
        edge = cfg.edge_id
        self.updates, self.statuses = update_topic(edge, ANY), status_topic(edge, ANY)
        self.receipts = receipt_topic(self.engine.aggregate_id)
        cloud_subs = [CLOUD_ROUND, CLOUD_MODEL, self.receipts]
        # One edge: a plain subscription (a device's `$share/...` only makes a group of its own). Replicas: a shared
        # group whose name must be secret, since Mosquitto 2.0's acl_file does not check subscriptions (deployment.md)
        updates = shared(cfg.group, self.updates) if cfg.replicas > 1 else self.updates
        device_subs = [updates, self.statuses]  # statuses: every replica
        client_id = f"fediomt-edge-{edge}-{cfg.replica}"
        self.local = Connection(cfg.broker, client_id, device_subs + ([] if cfg.cloud else cloud_subs),
                                self.inbox, log, on_connected=self._resend_soon)
        self.cloud = Connection(cfg.cloud, client_id + "-cloud", cloud_subs, self.inbox, log,
                                on_connected=self._resend_soon) if cfg.cloud else None
        # Masked rounds (docs/secagg.md "Deployment") ride on these connections (the secagg driver acknowledges its
        # own messages): the edge broker binds the client id to the certificate, so a second connection with the
        # edge's certificate would take the first one's place (docs/deployment.md "Client ids").
        self.secagg = SecAggRunner(self.local.client, cfg.secagg_step_timeout_s, log)
        self.edge_tier = (self.cloud or self.local) if cfg.edge_keys_dir else None  # toward the cloud's broker

    def _publish(self, pubs: list[Publication]) -> None:
        for p in pubs:
            to_cloud = matches(subtree(CLOUD), p.topic)
            conn = self.cloud if (to_cloud and self.cloud) else self.local
            info = conn.client.publish(p.topic, p.payload, qos=1, retain=p.retain)
            self.engine.metrics.bytes_out.inc(len(p.payload))
            if p.batch is not None:   # an outbox aggregate: it goes again unless the cloud's receipt comes first
                if _confirmed(info):
                    self._resend_in(self.receipt_wait)
                else:   # not connected, queue full or no PUBACK
                    self._resend_in(RESEND_S)
                    event(self.log, "aggregate not confirmed by the broker; resending", logging.WARNING,
                          batch=p.batch, in_s=RESEND_S)

    def _resend_in(self, seconds: float) -> None:
        at = time.monotonic() + seconds
        self.resend_at = at if self.resend_at is None else min(self.resend_at, at)

    def _resend_soon(self) -> None:
        """A (re)connection (the start's too: the outbox of a crash) or a message from the cloud: a broker that lost
        our aggregate is back, or a cloud that was away is (it re-announces its open round), so what it has not
        receipted goes again shortly."""
        self.receipt_wait = RECEIPT_WAIT_S[0]
        self._resend_in(RESEND_S)

    def _resend(self) -> None:
        self.resend_at = None
        pubs = self.engine.undelivered()
        if pubs:
            event(self.log, "resending aggregates the cloud has not receipted", batches=[p.batch for p in pubs])
            self.receipt_wait = min(2 * self.receipt_wait, RECEIPT_WAIT_S[1])
            self._publish(pubs)   # the same bytes: the cloud counts an aggregate once

    def _dispatch(self, topic: str, payload: bytes) -> list[Publication]:
        if topic == self.receipts:
            if self.engine.handle_receipt(payload):
                self.receipt_wait = RECEIPT_WAIT_S[0]
            return []
        if topic in (CLOUD_ROUND, CLOUD_MODEL):
            if self.engine.undelivered():
                self._resend_soon()
            return self.engine.handle_cloud("round" if topic == CLOUD_ROUND else "model", payload)
        device = topic.rsplit("/", 1)[-1]  # the filters' last level: one topic level, unchecked until the engine
        if matches(self.statuses, topic):
            return self.engine.handle_status(device, payload)
        if not matches(self.updates, topic):
            return []
        ack, pubs = self.engine.handle_update(device, payload)
        acks = [] if ack is None else [Publication(ack_topic(self.cfg.edge_id, ack.device_id), encode(ack))]
        return acks + pubs

    def _drain_some(self, timeout: float) -> bool:
        """Handle up to GROUP queued messages in one SQLite transaction (group commit), then publish their Acks and
        aggregates and acknowledge them to the broker: nothing is acknowledged before it is durable."""
        try:
            batch = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return False
        while len(batch) < GROUP:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        pubs: list[Publication] = []
        with self.engine.store.group():
            for _conn, topic, payload, _mid, _qos in batch:
                try:
                    pubs += self._dispatch(topic, payload)
                except Exception:  # the daemon must not die on a message; the message is still acknowledged
                    self.log.exception("message handling failed", extra={"fields": {"topic": topic[:200]}})
        self._publish(pubs)
        for conn, _topic, _payload, mid, qos in batch:
            conn.ack(mid, qos)
        return True

    def run(self) -> int:
        self.engine.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
        for conn in filter(None, (self.local, self.cloud)):
            if not conn.start(self.stop):
                return 0
        event(self.log, "edge running", edge=self.cfg.edge_id, replica=self.cfg.replica, mode=self.cfg.rounds.mode)
        while not self.stop.is_set():
            self._drain_some(self.cfg.tick_s)
            self._publish(self.engine.tick(time.time()))
            if self.resend_at is not None and time.monotonic() >= self.resend_at:
                self._resend()
            self._secagg()
        self._drain()
        return 0

    def _secagg(self) -> None:
        """Start the open masked round's protocol; forward the aggregates of those that ended."""
        start_cohort_round(self.secagg, self.engine)
        for round_id, outcome in self.secagg.finished():
            self._publish(self.engine.close_masked(round_id, outcome))
        if self.engine.to_mask is not None:
            self._mask_for_cloud(*self.engine.to_mask)
            self.engine.to_mask = None

    def _mask_for_cloud(self, round_id: int, vector) -> None:
        """Mask this edge's weighted sum toward the cloud (its metadata aggregate is already published)."""
        cfg, ann = self.cfg, self.engine.announcement
        if self.edge_tier is None:
            event(self.log, "edge-masked round but no edge_keys_dir: not taking part", logging.ERROR, round=round_id)
            return
        args = (self.edge_tier.client, self.engine.aggregate_id, round_id, self.engine.key, cfg.edge_keys_dir, vector,
                ann.deadline if ann is not None else 0.0, cfg.secagg_step_timeout_s, self.log)
        threading.Thread(target=mask_for_cloud, args=args, name=f"edge-secagg-{round_id}", daemon=True).start()

    def _drain(self) -> None:
        """SIGTERM: stop taking new updates, persist what was already received, publish what closed, disconnect.
        A persistent session keeps its subscriptions, so the broker queues what arrives while the edge is down."""
        event(self.log, "draining", queued=self.inbox.qsize())
        for conn in filter(None, (self.local, self.cloud)):
            if conn.cfg.session_expiry_s == 0:
                conn.unsubscribe()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self._drain_some(0.2):
            pass
        self._publish(self.engine.tick(time.time()))
        for conn in filter(None, (self.local, self.cloud)):
            conn.close()
        self.engine.close()
        event(self.log, "stopped")

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.engine.keys.expire())  # reload enrolment and CRL now


def _confirmed(info) -> bool:
    """Whether the broker acknowledged a QoS 1 publication within 5 s. paho raises (RuntimeError, ValueError) when it
    could not send it at all (not connected, queue full): not confirmed, never a crash of the daemon."""
    try:
        info.wait_for_publish(5.0)
        return info.is_published()
    except (RuntimeError, ValueError):
        return False
