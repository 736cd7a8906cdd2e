"""The simulator runs the tiers' own code: the same device updates, fed to a real edge daemon over a real broker, give
the same EdgeAggregates (payload bytes, weights, filters, device epsilons) and the same Acks as in the simulator;
and the simulator's cloud is the cloud engine, whose model and announcement the simulated devices verify and rebuild
exactly as the agent does."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import tomli_w

from experiments.sim.simulator import Simulator
from protocol.global_model import rebuild
from protocol.messages import Ack, EdgeAggregate, GlobalModel, decode
from protocol.topics import ANY, CLOUD_MODEL, CLOUD_ROUND, ack_topic, aggregate_topic, round_topic, update_topic
from tests.harness import wait_for

IGNORED = {"nonce", "timestamp", "sig"}   # fresh per message, whoever sends it


class Recording(Simulator):
    """A simulator that keeps each round's cloud messages and, per edge, the events it delivered and the outcome."""

    def run_round(self):
        gm, ann, self.seen = self.cloud.model_payload, self.cloud.announcement_payload, {}
        log = super().run_round()
        self.rounds = [*getattr(self, "rounds", []), (gm, ann, self.seen)]
        return log

    def _edge_round(self, edge, events, deadline):
        out = super()._edge_round(edge, events, deadline)
        self.seen[edge] = (events, out)
        return out


def fields(agg: EdgeAggregate) -> dict:
    return {k: v for k, v in dataclasses.asdict(agg).items() if k not in IGNORED}


@pytest.fixture(scope="module")
def simulated():
    from experiments.sim.harness import Scale, batch_for, dataset
    from experiments.sim.methods import METHODS
    from experiments.sim.models import initial_weights, trainable
    from experiments.sim.simulator import SimConfig

    fed = dataset("heart", Scale(split=2))   # 16 devices, 4 edges of 4: the edges' filters run
    model, manifest = trainable(fed.model, batch_for(fed), **fed.model_options)
    # deadlines an hour ahead of the wall clock: the real edge below closes at its quorum, never at a deadline
    cfg = SimConfig(method=METHODS["fediomt"], rounds=2, lr=0.1, noise_mult=1.0, start_s=time.time() + 3600)
    sim = Recording(fed, model, manifest, initial_weights(fed.model, 0, **fed.model_options), cfg)
    sim.run()
    return sim


def test_a_real_edge_daemon_aggregates_the_simulated_updates_identically(simulated, tmp_path, broker, recorder,
                                                                         daemons):
    sim, edge = simulated, simulated.edges[0]
    keys = sim.workdir / "keys"
    m = sim.method
    config = tmp_path / "edge.toml"
    config.write_bytes(tomli_w.dumps({
        "edge_id": edge, "state_dir": str(tmp_path / "state"), "enrolment_dir": str(sim.workdir / "enrol" / edge),
        "signing_key": str(keys / f"{edge}.key"), "cloud_public_key": str(keys / "cloud.pub"), "tick_s": 0.05,
        "broker": {"host": broker.host, "port": broker.port},
        "filters": {"enabled": list(m.filters.enabled)},
        "forward": {"compression": {k: v for k, v in m.forward_compression.items() if v is not None}},
    }).encode())
    rec = recorder([aggregate_topic(edge), ack_topic(edge, ANY), round_topic(edge)], client_id="cloud-and-devices")
    daemons.process("edge", "run", "--config", str(config), log=tmp_path / "edge.log")
    log_tail = lambda: (tmp_path / "edge.log").read_text()[-2000:]  # noqa: E731

    for number, (gm, ann, seen) in enumerate(sim.rounds, start=1):
        events, (sim_aggregate, sim_ack_bytes, _, _) = seen[edge]
        updates = [(dev.id, data) for _, kind, dev, data in events if kind == "update"]
        assert len(updates) == 4
        payload, acks = daemon_round(rec, edge, number, gm, ann, updates, log_tail)
        real, simulated_agg = decode(payload, expect=EdgeAggregate), decode(sim_aggregate, expect=EdgeAggregate)
        assert real.round_id == number and real.num_devices == 4 and real.significant
        assert fields(real) == fields(simulated_agg)        # delta bytes, weights, filtered, epsilons, bytes counted
        assert all(decode(a, expect=Ack).accepted for a in acks)
        assert sum(len(a) for a in acks) == sim_ack_bytes


def daemon_round(rec, edge: str, number: int, gm: bytes, ann: bytes, updates: list[tuple[str, bytes]],
                 log_tail) -> tuple[bytes, list[bytes]]:
    """Play the cloud (retained model + announcement) and the devices (their updates, in the simulator's order: one
    client, QoS 1) for round `number`; the edge's aggregate and its Acks."""
    rec.publish(CLOUD_MODEL, gm, retain=True)
    rec.publish(CLOUD_ROUND, ann, retain=True)
    wait_for(lambda: ann in rec.payloads(round_topic(edge)), 30,
             message=lambda: f"round {number} relayed\n{log_tail()}")
    for device, data in updates:
        rec.publish(update_topic(edge, device), data)
    got = wait_for(lambda: rec.payloads(aggregate_topic(edge))[number - 1:], 30,
                   message=lambda: f"round {number}'s aggregate\n{log_tail()}")
    acks = wait_for(lambda: [p for d, _ in updates for p in rec.payloads(ack_topic(edge, d))[number - 1:number]]
                    if all(len(rec.payloads(ack_topic(edge, d))) >= number for d, _ in updates) else None, 10)
    return got[0], acks


def test_simulated_devices_rebuild_the_cloud_engines_model(simulated):
    """The devices' weights come from the GlobalModel bytes (full, then a delta in the fediomt method) and match the
    cloud engine's own model of that version to the bit (the digest is checked on the way)."""
    sim = simulated
    encodings = [decode(gm, expect=GlobalModel).encoding for gm, _, _ in sim.rounds]
    assert encodings == ["full", "delta"]
    assert sim.version == 2
    final = decode(sim.cloud.model_payload, expect=GlobalModel)   # v3, published when round 2 closed
    assert (final.model_version, final.encoding, final.base_version) == (3, "delta", 2)
    weights, _ = rebuild(final, sim.version, sim.weights)
    assert np.array_equal(weights, sim.cloud.state.server.weights)
    record = sim.cloud.state.history[-1]
    assert record["round"] == 2 and sim.log[-1].epsilon_device == record["epsilon"]["device"]
    assert record["epsilon"]["device"] >= max(decode(agg, expect=EdgeAggregate).max_device_epsilon
                                              for _, _, seen in sim.rounds for _, (agg, *_) in seen.values())
