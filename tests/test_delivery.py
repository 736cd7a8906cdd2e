"""Delivery through edge restarts and dead devices (issue 18, defects 4 and 5): the real edge daemon and real device
agents as processes, on a real Mosquitto; a Recorder plays the cloud and watches aggregates, Acks and statuses."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w
import tomllib

from protocol.messages import Ack, EdgeAggregate, RoundAnnouncement, decode, encode, sign_message

from .harness import MODEL, PLAN, Fed, bundle_weights, provision_device, publish_cloud_round, wait_for
from .test_device_agent import logs

EDGE = "e1"
AGG = f"fl/cloud/aggregates/{EDGE}"


class Site:
    """One edge (harness.Fed's config, a process) and `n` device agents (processes) enrolled at it."""

    def __init__(self, root: Path, broker, recorder, daemons, n: int, **device) -> None:
        self.root, self.daemons = root, daemons
        self.fed = Fed(root, n_devices=0, edge_id=EDGE, broker={"host": broker.host, "port": broker.port},
                       rounds={"quorum": 1.0})
        self.rec = recorder([AGG, f"fl/{EDGE}/ack/+", f"fl/{EDGE}/round", f"fl/{EDGE}/model", f"fl/{EDGE}/status/+"])
        self.names = [f"r{i}" for i in range(n)]
        self.configs = {d: provision_device(root, d, broker.port, **device) for d in self.names}
        for d, config in self.configs.items():
            (root / "enrolment" / f"{d}.pub").write_bytes((config.parent / f"{d}.pub").read_bytes())
        self.devices: dict[str, subprocess.Popen] = {}
        self.edge: subprocess.Popen | None = None

    def start_edge(self, config: Path | None = None) -> None:
        """Start the edge and wait until it relays the cloud's retained round and model (it is subscribed)."""
        relayed = [f"fl/{EDGE}/round", f"fl/{EDGE}/model"]
        n = [len(self.rec.payloads(t)) for t in relayed]
        self.edge = self.daemons.process("edge", "run", "--config", str(config or self.fed.config),
                                         log=self.root / "edge.log")
        self.rec.wait(lambda _: all(len(self.rec.payloads(t)) > k for t, k in zip(relayed, n)), 60,
                      "the edge relaying the round and the model")

    def stop_edge(self, sig: int) -> None:
        self.edge.send_signal(sig)
        assert self.edge.wait(30) in (0, -signal.SIGKILL)

    def clean_config(self) -> Path:
        """The edge's config with a clean session: the broker drops what it queued for the edge."""
        raw = tomllib.loads(self.fed.config.read_text())
        raw["broker"]["session_expiry_s"] = 0
        path = self.root / "edge-clean.toml"
        path.write_bytes(tomli_w.dumps(raw).encode())
        return path

    def start_devices(self, names: list[str] | None = None) -> None:
        for d in names or self.names:
            self.devices[d] = self.daemons.process("device", "run", "--config", str(self.configs[d]),
                                                   log=self.configs[d].parent / "agent.log")

    def kill(self, d: str) -> None:
        self.devices[d].send_signal(signal.SIGKILL)
        self.devices[d].wait()

    def announce(self, round_id: int, deadline_s: float, relay: bool = False) -> float:
        """The cloud's round `round_id` (model version 1); `relay`: also the edge's retained copy (edge down)."""
        ann = encode(sign_message(RoundAnnouncement(round_id, MODEL, 1, "fedavg", time.time() + deadline_s, PLAN, {},
                                                    edges=[EDGE]), self.fed.cloud_key))
        self.rec.publish("fl/cloud/round", ann, retain=True)
        if relay:
            self.rec.publish(f"fl/{EDGE}/round", ann, retain=True)
        return time.monotonic()

    def sent(self, round_id: int, names: list[str] | None = None) -> None:
        """Wait until every device (of `names`) logged its update of `round_id` as sent."""
        for d in names or self.names:
            wait_for(lambda d=d: any(e["msg"] == "update sent" and e["round"] == round_id
                                     for e in logs(self.configs[d])), 60, message=f"{d}'s round {round_id} update")

    def aggregate(self, round_id: int, timeout: float = 60) -> EdgeAggregate:
        def found(_):
            aggs = [decode(p, expect=EdgeAggregate) for p in self.rec.payloads(AGG)]
            return next((a for a in aggs if a.round_id == round_id), None)
        return self.rec.wait(found, timeout, f"the aggregate of round {round_id}")

    def acks(self, d: str, round_id: int) -> list[Ack]:
        return [a for a in (decode(p, expect=Ack) for p in self.rec.payloads(f"fl/{EDGE}/ack/{d}"))
                if a.round_id == round_id]

    def closes(self) -> dict[int, str]:
        """Why the edge closed each round, from its log."""
        lines = [json.loads(line) for line in (self.root / "edge.log").read_text().splitlines() if line[:1] == "{"]
        return {e["round"]: e["why"] for e in lines if e["msg"] == "aggregate"}


@pytest.fixture
def site(tmp_path, broker, recorder, daemons):
    def make(n: int, **device) -> Site:
        return Site(tmp_path, broker, recorder, daemons, n, **device)
    return make


def first_round(s: Site) -> None:
    """Round 1 on the cloud's topics; the edge relays it, and then dies (kill -9) before any device sends."""
    publish_cloud_round(s.rec, s.fed.cloud_key, bundle_weights(), edges=[EDGE])
    s.start_edge()
    s.stop_edge(signal.SIGKILL)


def test_updates_sent_while_the_edge_is_down_are_counted_once(site):
    """Defect 4 with the default config (a persistent edge session): the edge is killed (-9), 4 devices publish,
    it restarts: each update counted exactly once; the same across a SIGTERM restart. The devices' resend is out
    of reach (10-minute Ack timeout), so only the broker's session can deliver them."""
    s = site(4, ack_timeout_s=600.0, ack_timeout_max_s=600.0)
    first_round(s)
    s.start_devices()
    s.sent(1)
    s.start_edge()
    agg = s.aggregate(1)
    assert sorted(agg.device_ids) == s.names and agg.num_devices == 4 and agg.rejected == {}
    s.stop_edge(signal.SIGTERM)                      # a clean stop keeps the subscriptions of the session
    s.announce(2, 120, relay=True)
    s.sent(2)
    s.start_edge()
    agg = s.aggregate(2)
    assert sorted(agg.device_ids) == s.names and agg.num_devices == 4 and agg.rejected == {}
    for d in s.names:                                # exactly one Ack each, accepted
        assert [(a.accepted, a.reason) for r in (1, 2) for a in s.acks(d, r)] == [(True, 0), (True, 0)], d
    assert not any(e["msg"] == "update resent" for d in s.names for e in logs(s.configs[d]))


def test_devices_resend_what_an_edge_that_lost_its_session_never_got(site):
    """Defect 4, the other half: the edge is killed (-9) while 4 devices publish, and restarts with a clean session,
    so the broker drops what it queued. The devices' resend (Ack timeout 1 s, same bytes) fills the round, each
    device counted once."""
    s = site(4, ack_timeout_s=1.0, ack_timeout_max_s=2.0)
    first_round(s)
    s.start_devices()
    s.sent(1)
    s.start_edge(s.clean_config())
    agg = s.aggregate(1)
    assert sorted(agg.device_ids) == s.names and agg.num_devices == 4
    assert set(agg.rejected) <= {"DUPLICATE"}        # resent copies the edge already counted
    for d in s.names:
        assert any(a.accepted for a in s.acks(d, 1)), d
        assert any(e["msg"] == "update resent" for e in logs(s.configs[d])), d
        wait_for(lambda d=d: any(e["msg"] == "update settled" for e in logs(s.configs[d])), 20)


def test_dead_devices_stay_excused_so_later_rounds_close_at_quorum(site):
    """Defect 5: 2 of 5 devices are killed (-9; the broker publishes their retained "offline" will). Every later
    round closes at the quorum of the 3 others, not at its deadline (30 s)."""
    s = site(5)
    publish_cloud_round(s.rec, s.fed.cloud_key, bundle_weights(), edges=[EDGE])
    s.start_edge()
    s.start_devices()
    s.aggregate(1)
    started = s.announce(2, 30)
    s.aggregate(2)
    seconds = {2: time.monotonic() - started}
    dead = s.names[3:]
    for d in dead:
        s.kill(d)
    s.rec.wait(lambda msgs: all(any(t == f"fl/{EDGE}/status/{d}" and b"offline" in p for t, p in msgs) for d in dead),
               20, "the dead devices' last wills")
    for round_id in (3, 4):
        started = s.announce(round_id, 30)
        agg = s.aggregate(round_id, 60)
        seconds[round_id] = time.monotonic() - started
        assert sorted(agg.device_ids) == s.names[:3]
    print(f"round seconds (2: all 5 alive; 3, 4: 2 dead): {({r: round(t, 2) for r, t in seconds.items()})}")
    assert [s.closes()[r] for r in (2, 3, 4)] == ["quorum"] * 3 and max(seconds.values()) < 15
