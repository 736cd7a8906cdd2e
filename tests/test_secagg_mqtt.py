"""Secure aggregation end to end over a real Mosquitto: device threads with their own MQTT connections and one
edge, one device losing power after sharing keys and one after sending its masked input."""

from __future__ import annotations

import threading

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.errors import ProtocolError, Reason
from protocol.secagg import Graph, SecAggClient, SecAggConfig, SecAggServer
from protocol.secagg.mqtt_driver import run_client_round, run_server_round
from tests.test_secagg import EXACT, cohort, expected_sum

EDGE = "ward-7"


class PowerLoss(RuntimeError):
    pass


class CrashingClient(SecAggClient):
    """A device that dies at one step of the protocol (after its previous message went out)."""

    crash_at = ""

    def masked_input(self, inbox, vector):
        if self.crash_at == "masked":
            raise PowerLoss
        return super().masked_input(inbox, vector)

    def unmask(self, request):
        if self.crash_at == "unmask":
            raise PowerLoss
        return super().unmask(request)


def connect(broker, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def run_round(broker, keys, vectors, config, crash: dict[str, str], round_id: int = 3, step_timeout_s: float = 3.0):
    directory = {d: k.public_key() for d, k in keys.items()}
    outcomes: dict[str, object] = {}
    connections = [connect(broker, "edge-gw")]
    server = SecAggServer(EDGE, round_id, config, len(next(iter(vectors.values()))), directory)

    def device(d: str) -> None:
        conn = connect(broker, d)
        connections.append(conn)
        client = CrashingClient(d, EDGE, round_id, keys[d], directory)
        client.crash_at = crash.get(d, "")
        try:
            outcomes[d] = run_client_round(conn, client, vectors[d], timeout_s=30)
        except (PowerLoss, ProtocolError) as exc:
            outcomes[d] = exc
            conn.disconnect()

    threads = [threading.Thread(target=device, args=(d,)) for d in keys]
    for t in threads:
        t.start()
    try:
        return run_server_round(connections[0], server, step_timeout_s=step_timeout_s), outcomes
    except ProtocolError as exc:
        return exc, outcomes
    finally:
        for t in threads:
            t.join(30)
        for conn in connections:
            conn.loop_stop()
            conn.disconnect()


def test_round_over_mosquitto_with_devices_dropping_mid_protocol(broker):
    keys, ints, vectors = cohort(6, 1000)
    config = SecAggConfig(graph=Graph.FULL, threshold=0.5, min_cohort=3, **EXACT)   # t = 4 of 6
    crash = {"dev-001": "masked", "dev-004": "unmask"}
    result, outcomes = run_round(broker, keys, vectors, config, crash)
    survivors = [d for d in keys if d != "dev-001"]        # dev-004's masked input arrived before it died
    assert sorted(result.devices) == survivors and result.dropped == ["dev-001"]
    np.testing.assert_array_equal(result.quantized, expected_sum(ints, survivors))
    assert isinstance(outcomes["dev-001"], PowerLoss) and isinstance(outcomes["dev-004"], PowerLoss)
    for d in ("dev-000", "dev-002", "dev-003", "dev-005"):
        assert not outcomes[d].aborted and sorted(outcomes[d].survivors) == survivors


def test_round_over_mosquitto_aborts_below_threshold_and_tells_the_devices(broker):
    keys, _, vectors = cohort(5, 100)
    config = SecAggConfig(graph=Graph.FULL, threshold=0.5, min_cohort=3, **EXACT)   # t = 3 of 5
    crash = {"dev-000": "unmask", "dev-001": "unmask", "dev-002": "unmask"}
    error, outcomes = run_round(broker, keys, vectors, config, crash, step_timeout_s=2.0)
    assert isinstance(error, ProtocolError) and error.reason == Reason.SECAGG_ABORT
    for d in ("dev-003", "dev-004"):    # the devices still there hear of the abort instead of waiting
        assert isinstance(outcomes[d], ProtocolError) and outcomes[d].reason == Reason.SECAGG_ABORT
