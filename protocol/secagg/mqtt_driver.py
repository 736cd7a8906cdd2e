"""Secure aggregation over MQTT 5 (paho-mqtt 2.x, QoS 1): one call per round for a device and for its edge.

Topics (protocol.topics.secagg_topic), all under `fl/{edge}/secagg/` (the edge tier: the cloud is the server,
`fl/cloud/secagg/`, and the edges are the clients):
  edge -> devices: `open` (retained while the round runs), `roster`, `inbox/{device}`, `unmask`, `outcome`
  device -> edge:  `advertise/{device}`, `shares/{device}`, `masked/{device}`, `reveal/{device}`
The driver only adds per-topic callbacks (`message_callback_add`) and subscriptions to the caller's connected,
looping client and removes them at the end, so it shares one connection with the device agent or edge daemon.
Undecodable, foreign or misbehaving messages are logged and ignored; only the round's abort raises.
"""

from __future__ import annotations

import logging
import queue
import time

import numpy as np
import paho.mqtt.client as mqtt

from protocol.errors import ProtocolError, Reason
from protocol.logs import event
from protocol.messages import decode, encode
from protocol.secagg.client import SecAggClient
from protocol.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Outcome,
    Roster,
    RoundOpen,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from protocol.secagg.server import SecAggResult, SecAggServer
from protocol.topics import last_level, secagg_topic

log = logging.getLogger("fediomt.secagg")
UPLINK = {"advertise": AdvertiseKeys, "shares": ShareKeys, "masked": MaskedInput, "reveal": UnmaskShares}


class _Mailbox:
    """Decoded messages from a few topic filters, queued from paho's network thread."""

    def __init__(self, client: mqtt.Client, filters: dict[str, type]) -> None:
        self.client, self.filters, self.queue = client, filters, queue.Queue()
        for topic_filter, kind in filters.items():
            client.message_callback_add(topic_filter, self._receiver(kind))
        client.subscribe([(f, 1) for f in filters])

    def _receiver(self, kind: type):
        def receive(client, _userdata, message) -> None:
            client.ack(message.mid, message.qos)  # on a daemon's manual-ack connection (a no-op otherwise)
            if not message.payload:          # a cleared retained message
                return
            try:
                self.queue.put((message.topic, decode(message.payload, expect=kind)))
            except ProtocolError as exc:
                event(log, "secagg message rejected", logging.WARNING, topic=message.topic, reason=exc.reason.name)
        return receive

    def get(self, deadline: float):
        """(topic, message), or None once `deadline` (monotonic seconds) has passed."""
        try:
            return self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def close(self) -> None:
        for topic_filter in self.filters:
            self.client.message_callback_remove(topic_filter)
        self.client.unsubscribe(list(self.filters))


def _publish(client: mqtt.Client, topic: str, msg, retain: bool = False) -> mqtt.MQTTMessageInfo:
    return client.publish(topic, encode(msg), qos=1, retain=retain)


# ------------------------------------------------------------------ device
def run_client_round(mqtt_client: mqtt.Client, client: SecAggClient, vector: np.ndarray,
                     timeout_s: float = 120.0) -> Outcome:
    """Take part in round `client.round_id` of edge `client.edge_id` with `vector` (length as announced in the
    retained `open` message). Returns the edge's Outcome (whether this device's input is in the sum); raises
    ProtocolError(SECAGG_ABORT) when the round aborts or leaves this device out, (DEADLINE) on timeout."""
    edge, me = client.edge_id, client.device_id
    box = _Mailbox(mqtt_client, {secagg_topic(edge, "open"): RoundOpen, secagg_topic(edge, "roster"): Roster,
                                 secagg_topic(edge, "inbox", me): ShareInbox,
                                 secagg_topic(edge, "unmask"): UnmaskRequest, secagg_topic(edge, "outcome"): Outcome})
    deadline = time.monotonic() + timeout_s

    def wait(kind: type):
        while (item := box.get(deadline)) is not None:
            msg = item[1]
            if (msg.edge_id, msg.round_id) != (edge, client.round_id):
                continue                         # another round's (retained or late) message
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Outcome):
                raise ProtocolError(Reason.SECAGG_ABORT, msg.detail or "the round ended without this device")
            if isinstance(msg, UnmaskRequest) and me not in msg.survivors:
                raise ProtocolError(Reason.SECAGG_ABORT, "the edge left this device out of the sum")
        raise ProtocolError(Reason.DEADLINE, f"no secagg {kind.KIND} within {timeout_s:.0f} s")

    try:
        opened = wait(RoundOpen)
        vector = np.asarray(vector, np.float64).ravel()   # float64: grid counts stay exact
        if vector.size != opened.length:             # before taking part: a device that cannot finish stays out
            raise ProtocolError(Reason.BAD_SHAPE, f"{vector.size} values, the round masks {opened.length}")
        uplink = {step: secagg_topic(edge, step, me) for step in UPLINK}
        _publish(mqtt_client, uplink["advertise"], client.advertise())
        _publish(mqtt_client, uplink["shares"], client.share_keys(wait(Roster)))
        _publish(mqtt_client, uplink["masked"], client.masked_input(wait(ShareInbox), vector))
        _publish(mqtt_client, uplink["reveal"], client.unmask(wait(UnmaskRequest)))
        outcome = wait(Outcome)
        if outcome.aborted:
            raise ProtocolError(Reason.SECAGG_ABORT, outcome.detail or "the edge aborted the round")
        return outcome
    finally:
        box.close()


# ------------------------------------------------------------------ edge
def _collect(box: _Mailbox, server: SecAggServer, step: str, expected: set[str], deadline: float) -> None:
    """Feed `step` messages to the server until every expected device has answered or the deadline passes."""
    receive = getattr(server, f"receive_{'unmask' if step == 'reveal' else step}")
    answered: set[str] = set()
    while not expected <= answered and (item := box.get(deadline)) is not None:
        topic, msg = item
        try:
            if last_level(topic) != msg.device_id:
                raise ProtocolError(Reason.WRONG_SENDER, f"{msg.device_id} on {topic}")
            if not isinstance(msg, UPLINK[step]):
                raise ProtocolError(Reason.DEADLINE, f"{msg.KIND} outside its step")
            receive(msg)
            answered.add(msg.device_id)
        except ProtocolError as exc:
            event(log, "secagg message ignored", logging.WARNING, device=msg.device_id, kind=msg.KIND,
                  reason=exc.reason.name, detail=exc.detail)
    event(log, "secagg step closed", step=step, answered=len(answered), expected=len(expected))


def run_server_round(mqtt_client: mqtt.Client, server: SecAggServer, step_timeout_s: float = 30.0,
                     first_step_timeout_s: float | None = None) -> SecAggResult:
    """Run the edge's side of one round: open it, collect each step until all devices answered or
    `step_timeout_s` passed (the silent ones count as dropped), unmask. `first_step_timeout_s` (default
    `step_timeout_s`) bounds the advertise step, which also covers the clients' work before they join (the cloud
    waits for the edges to close their rounds). Returns the sum of the survivors' inputs; raises
    ProtocolError(SECAGG_ABORT) (after telling the devices) when too few remain."""
    edge = server.edge_id
    box = _Mailbox(mqtt_client, {secagg_topic(edge, step) + "/+": kind for step, kind in UPLINK.items()})
    open_topic = secagg_topic(edge, "open")

    def step(name: str, expected, timeout_s: float = step_timeout_s) -> None:
        _collect(box, server, name, set(expected), time.monotonic() + timeout_s)

    try:
        _publish(mqtt_client, open_topic, RoundOpen(edge, server.round_id, server.length), retain=True)
        step("advertise", server.directory, step_timeout_s if first_step_timeout_s is None else first_step_timeout_s)
        _publish(mqtt_client, secagg_topic(edge, "roster"), server.roster())
        step("shares", server.view.adverts)
        inboxes = server.inboxes()
        for device, inbox in inboxes.items():
            _publish(mqtt_client, secagg_topic(edge, "inbox", device), inbox)
        step("masked", inboxes)
        request = server.unmask_request()
        _publish(mqtt_client, secagg_topic(edge, "unmask"), request)
        step("reveal", request.survivors)
        result = server.finalize()
        _publish(mqtt_client, secagg_topic(edge, "outcome"), Outcome(edge, server.round_id, False, result.devices))
        return result
    except ProtocolError as exc:
        _publish(mqtt_client, secagg_topic(edge, "outcome"), Outcome(edge, server.round_id, True, [], exc.detail[:256]))
        raise
    finally:
        box.close()
        mqtt_client.publish(open_topic, b"", qos=1, retain=True)
