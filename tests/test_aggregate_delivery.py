"""An aggregate the broker acknowledged but lost still reaches the cloud: real Mosquitto, the real edge and cloud
daemon processes, kill -9 (issue 18, the delivery gap `fediomt bench chaos` found: a broker killed before its
autosave loses an aggregate it queued for an absent cloud, and the 5 updates acknowledged to devices in it were
never counted)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from experiments.mosquitto import MosquittoBroker
from protocol.messages import EdgeAggregate, decode

from .harness import MLP_PARAMS, Fed, Recorder, cloud_for, rounds_of, wait_for

DEVICE = "d00"


@pytest.fixture
def broker(tmp_path):
    """Persistence saved only on request (SIGUSR1) or at exit: the kill -9 below loses exactly what came after."""
    with MosquittoBroker(workdir=tmp_path / "mosquitto", autosave_interval=0) as b:
        yield b


def events(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_an_aggregate_the_broker_lost_while_the_cloud_was_down_is_resent_until_the_cloud_receipts_it(
        tmp_path, broker, daemons):
    fed = Fed(tmp_path / "edge", n_devices=1, n_params=MLP_PARAMS, rounds={"quorum": 1.0},
              broker={"host": broker.host, "port": broker.port, "session_expiry_s": 3600,
                      "reconnect_max_s": 1.0})
    config = cloud_for(fed, tmp_path, broker.port, rounds=1, round_timeout_s=30.0, host=broker.host)
    edge_log, cloud_log = tmp_path / "edge.log", tmp_path / "cloud.log"
    seen = Recorder(broker.port, ["fl/edge1/round", "fl/cloud/aggregates/+"], client_id="observer")
    try:
        cloud = daemons.process("cloud", "run", "--config", str(config), log=cloud_log)
        daemons.process("edge", "run", "--config", str(fed.config), log=edge_log)
        seen.wait(lambda m: any(t == "fl/edge1/round" for t, _ in m), 90, "round 1 relayed by the edge")
        broker.save()                      # the cloud's session and subscription survive the kill below...
        cloud.send_signal(signal.SIGKILL)  # ...and the cloud is down when the aggregate comes
        cloud.wait(10)
        seen.publish(f"fl/edge1/updates/{DEVICE}", fed.update(DEVICE, np.full(MLP_PARAMS, 0.01, np.float32)))
        seen.wait(lambda m: any(t.startswith("fl/cloud/aggregates/") for t, _ in m), 30,
                  "the aggregate (the broker took it: PUBACK, queued for the cloud's session)")
        broker.stop(signal.SIGKILL)        # before any save: the queued aggregate is gone
        broker.start()
        daemons.process("cloud", "run", "--config", str(config), log=cloud_log)   # resumes round 1, re-announces
        wait_for(lambda: rounds_of(tmp_path / "run"), 60,
                 message=lambda: (edge_log.read_text()[-1500:], cloud_log.read_text()[-1500:]))
        wait_for(lambda: any(e["msg"] == "aggregate receipted" and e["round"] == 1 for e in events(edge_log)), 20,
                 message=lambda: edge_log.read_text()[-1500:])   # the outbox is empty: nothing goes again
    finally:
        seen.close()
    (record,) = rounds_of(tmp_path / "run")
    assert record["device_ids"] == {"edge1": [DEVICE]}, record   # counted once, in the round it was acked for
    assert any(e["msg"] == "resending aggregates the cloud has not receipted" for e in events(edge_log))
    sent = [decode(p, expect=EdgeAggregate) for t, p in seen.messages if t.startswith("fl/cloud/aggregates/")]
    assert len({a.nonce for a in sent}) == 1   # resent: the same bytes, never a second aggregate of the round
