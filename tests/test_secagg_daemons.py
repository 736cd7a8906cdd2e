"""Secure aggregation end to end: real device agents (in-process and `fediomt device run` processes), the real edge
gateway, a real Mosquitto. An untrusted_edge round in which one device dies after advertising its keys and another
after sharing them: the edge forwards the mean of the survivors' clipped deltas and never sees a plaintext update."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import time

import numpy as np
import pytest

from cloud.config import CloudConfig
from device.agent import DeviceAgent
from device.config import load_config as load_device_config
from edge.config import EdgeConfig
from edge.gateway import Gateway
from protocol.compression import decode_update
from protocol.distributed_dp import last_step_std
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    CentralDPReport,
    EdgeAggregate,
    RoundAnnouncement,
    decode,
    verify_message,
)
from protocol.mqtt import ConnectionConfig
from protocol.secagg.deploy import MaskedRound
from protocol.secagg.inprocess import run_cohort
from protocol.signing import generate_signing_key, save_private_key, save_public_key

from .harness import MODEL, PLAN, Fed, aggregate_of, bundle_weights, open_round, provision_device, publish_cloud_round

SECAGG = {"mode": "untrusted_edge", "graph": "full", "threshold": 0.3, "min_cohort": 3, "clip": 0.5, "bits": 16,
          "seed": 12345, "density": 0.5}
SURVIVORS, VICTIMS = ["s1", "s2", "s3", "s4"], ["v1", "v2"]
STEP_TIMEOUT_S = 4.0  # the edge waits two whole steps for the dead: as short as live devices allow


@pytest.fixture
def deployment(tmp_path, broker, recorder, daemons):
    """Six provisioned devices, the edge gateway in process, and an observer; `on_topic[topic] = action` runs the
    action on paho's thread the first time `topic` shows, before anything else is handled."""
    cloud_key, edge_key = generate_signing_key(), generate_signing_key()
    save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    save_private_key(edge_key, tmp_path / "edge.key")
    enrol = tmp_path / "enrolment"
    enrol.mkdir()
    configs = {}
    for name in SURVIVORS + VICTIMS:
        configs[name] = provision_device(tmp_path, name, broker.port, privacy={"epsilon": 100.0},
                                         secagg_keys_dir=str(enrol), secagg_timeout_s=60.0)
        shutil.copy(tmp_path / name / f"{name}.pub", enrol / f"{name}.pub")
    cfg = EdgeConfig(edge_id="e1", state_dir=tmp_path / "edge", enrolment_dir=enrol, signing_key=tmp_path / "edge.key",
                     cloud_public_key=tmp_path / "cloud.pub", broker=ConnectionConfig(port=broker.port),
                     secagg_step_timeout_s=STEP_TIMEOUT_S)
    (tmp_path / "edge").mkdir()
    gateway = Gateway(cfg, logging.getLogger("test.edge"))
    daemons.thread(gateway)
    on_topic: dict = {}
    observer = recorder(["fl/e1/updates/+", "fl/e1/secagg/+/+", "fl/cloud/aggregates/+", "fl/e1/status/+"],
                        client_id="observer", hook=lambda topic, _: on_topic.pop(topic, lambda: None)())
    return dict(cloud_key=cloud_key, edge_key=edge_key, configs=configs, gateway=gateway, observer=observer,
                on_topic=on_topic)


def test_untrusted_edge_round_with_two_dropouts_forwards_the_survivors_mean(deployment, daemons):
    d, obs = deployment, deployment["observer"]
    weights = bundle_weights() + 0.01
    v1, v2 = [daemons.process("device", "run", "--config", str(d["configs"][name]),   # killed mid-protocol
                              log=d["configs"][name].parent / "agent.log") for name in VICTIMS]
    survivors = [DeviceAgent(load_device_config(d["configs"][n]), logging.getLogger(f"test.{n}")) for n in SURVIVORS]
    obs.wait(lambda seen: {t for t, _ in seen} >= {f"fl/e1/status/{v}" for v in VICTIMS}, 60)   # both online
    # v1 dies after advertising its keys, before any roster exists (the others only start once it is dead); the
    # edge then waits a whole step for v1's shares, so v2's shares cannot reach an inbox before v2 is dead too.
    d["on_topic"]["fl/e1/secagg/advertise/v1"] = lambda: os.kill(v1.pid, signal.SIGKILL)
    d["on_topic"]["fl/e1/secagg/shares/v2"] = lambda: os.kill(v2.pid, signal.SIGKILL)
    start = time.monotonic()
    publish_cloud_round(obs, d["cloud_key"], weights, cohort=SURVIVORS + VICTIMS, secagg=SECAGG)
    obs.wait(lambda seen: any(t == "fl/e1/secagg/advertise/v1" for t, _ in seen), 30)
    v1.wait(10)
    for agent in survivors:
        daemons.thread(agent)
    obs.wait(lambda seen: any(t.startswith("fl/cloud/aggregates/") for t, _ in seen), 45)
    seen = list(obs.messages)
    elapsed = time.monotonic() - start
    assert v2.wait(10) == -signal.SIGKILL

    assert not [t for t, _ in seen if t.startswith("fl/e1/updates/")]      # no plaintext update ever sent
    assert d["gateway"].engine.store.pending() == []
    assert any(t == "fl/e1/secagg/shares/v2" for t, _ in seen)             # v2 dropped after sharing keys
    assert not any(t in ("fl/e1/secagg/shares/v1", "fl/e1/secagg/masked/v2") for t, _ in seen)
    agg = decode(next(p for t, p in seen if t == "fl/cloud/aggregates/e1"), expect=EdgeAggregate)
    verify_message(agg, d["edge_key"].public_key())
    assert agg.significant and sorted(agg.device_ids) == SURVIVORS and agg.num_devices == 4
    assert abs(agg.num_samples - 4 * 128) <= 4 and agg.mean_local_steps == pytest.approx(4.0, abs=0.5)
    assert agg.filtered == [] and agg.central_dp is None

    masked = MaskedRound.from_announcement(SECAGG)
    n = len(weights)
    clipped = []
    for agent in survivors:
        delta = agent.model.get_flat() - agent.state.weights      # the interpreter still holds the local weights
        vector = masked.device_vector(delta, 128, 4)[:-2]
        clipped.append(masked.dense(vector, n))
        assert np.linalg.norm(vector) <= 0.5 + 1e-5 and np.linalg.norm(delta) > 0.01
    expected = np.mean(clipped, axis=0)
    got = decode_update(agg.delta, n)
    step = 2 * 0.5 / ((1 << 16) - 1)
    assert np.count_nonzero(got) <= masked.coordinates(n)                  # random-k: half the coordinates
    np.testing.assert_allclose(got, expected, rtol=0, atol=1.01 * step)    # quantization error only
    assert np.abs(got - expected).max() > 0                                # (stochastic rounding happened)
    for agent in survivors:
        assert agent.state.seen_rounds == (1,) and len(agent.state.history) == 1   # the spend is on disk
    assert agg.max_device_epsilon == pytest.approx(max(a.epsilon_spent() for a in survivors))  # "masking" status
    print(f"secagg round with 6 devices, 2 dropouts: {elapsed:.1f} s to the aggregate "
          f"(2 x {STEP_TIMEOUT_S} s waiting for the dead)")


def test_untrusted_edge_round_with_central_dp_credits_the_devices_noise(deployment, daemons):
    """Distributed DP through the real agents and gateway: the round announces central DP (z = 0.005) and the plan
    runs DP-SGD, so each agent clips to the secagg clip before its last step's noise and masks its noised delta; the
    edge credits the four survivors' noise (sqrt(4) sigma / clip = 0.006875 >= z), adds none, and says so."""
    d, obs = deployment, deployment["observer"]
    weights = bundle_weights() + 0.01
    survivors = [DeviceAgent(load_device_config(d["configs"][n]), logging.getLogger(f"test.{n}")) for n in SURVIVORS]
    publish_cloud_round(obs, d["cloud_key"], weights, cohort=SURVIVORS, secagg=SECAGG,
                        central_dp=CentralDPReport(clip=0.5, noise_mult=0.005, sampling_rate=1.0))
    for agent in survivors:
        daemons.thread(agent)
    obs.wait(lambda seen: any(t.startswith("fl/cloud/aggregates/") for t, _ in seen), 45)
    seen = list(obs.messages)
    assert not [t for t, _ in seen if t.startswith("fl/e1/updates/")]
    agg = decode(next(p for t, p in seen if t == "fl/cloud/aggregates/e1"), expect=EdgeAggregate)
    verify_message(agg, d["edge_key"].public_key())
    assert sorted(agg.device_ids) == SURVIVORS and agg.significant
    sigma = last_step_std(PLAN)
    assert agg.credited_noise_mult == pytest.approx(2 * sigma / 0.5)                     # sqrt(n) sigma / clip
    assert agg.central_dp.clip == 0.5 and agg.central_dp.noise_mult == pytest.approx(2 * sigma / 0.5)   # total
    assert 2 * sigma / 0.5 > 0.005                                                       # >= z: no edge noise

    masked = MaskedRound.from_announcement(SECAGG)
    credited = dataclasses.replace(masked, noise_std=sigma)                             # what both sides derived
    n = len(weights)
    noised = [masked.dense(credited.device_vector(a.model.get_flat() - a.state.weights, 128, 4)[:-2], n)
              for a in survivors]                                # the interpreter still holds the noised local weights
    got = decode_update(agg.delta, n)
    np.testing.assert_allclose(got, np.mean(noised, axis=0), rtol=0, atol=1.01 * credited.step())   # no edge noise


def test_engine_masked_round_refuses_plaintext_and_forwards_the_noised_mean(tmp_path):
    """The engine alone (no broker): a malformed secagg table is refused; in a masked round a plaintext update is
    refused before decoding, the deadline does not close the round, the runner's result does (central DP with the
    secagg clip as sensitivity), and an abort closes it as insignificant."""
    fed = Fed(tmp_path, n_devices=6, n_params=200, central_dp={"clip": 9.0, "noise_mult": 0.5})
    eng = fed.engine()
    assert eng.handle_cloud("model", fed.model())
    assert eng.handle_cloud("round", fed.announce(secagg={"mode": "untrusted_edge", "clip": -1.0})) == []
    table = {"mode": "untrusted_edge", "min_cohort": 3, "clip": 0.5, "seed": 3, "density": 0.5}
    open_round(fed, eng, secagg=table, deadline=time.time() + 0.1)
    masked = eng.masked
    assert masked is not None and masked.length(200) == 102
    ack, _ = eng.handle_update("d00", fed.update("d00", np.ones(200, np.float32)))
    assert not ack.accepted and ack.reason == Reason.BAD_VALUE and eng.store.pending() == []
    assert eng.tick(time.time() + 1) == []                   # past the deadline: still open, the runner closes it
    rng = np.random.default_rng(1)
    deltas = {d: rng.normal(size=200).astype(np.float32) * 0.1 for d in fed.devices}
    vectors = {d: masked.device_vector(v, 10 + i, 3) for i, (d, v) in enumerate(deltas.items())}
    result = run_cohort(vectors, fed.keys, masked.config, edge_id="edge1", drop_after_shares={"d05"})
    assert eng.close_masked(2, result) == []                  # another round's outcome is ignored
    agg, mean = aggregate_of(fed, eng.close_masked(1, result))
    survivors = fed.devices[:5]
    assert agg.device_ids == survivors and abs(agg.num_samples - 60) <= 5
    assert agg.central_dp.clip == 0.5 and agg.central_dp.noise_mult == 0.5 and agg.weight_sum == 5.0
    expected = np.mean([masked.dense(vectors[d][:-2], 200) for d in survivors], axis=0)
    off = mean - expected
    kept = masked.dense(np.ones(100, np.float32), 200) > 0
    assert np.all(off[~kept] == 0)                            # noise only where the cohort masked
    assert 0.5 * 0.5 / 5 * 0.7 < off[kept].std() < 0.5 * 0.5 / 5 * 1.3   # std z * clip / survivors
    assert eng.close_masked(1, result) == []                  # closed once
    open_round(fed, eng, round_id=2, secagg=table)
    agg, _ = aggregate_of(fed, eng.close_masked(2, ProtocolError(Reason.SECAGG_ABORT, "2 survivors < min_cohort")))
    assert not agg.significant and agg.rejected == {"SECAGG_ABORT": 1}


def test_cloud_secagg_table_is_validated_and_gets_a_fresh_random_k_seed_per_round(tmp_path):
    base = dict(run_dir=tmp_path, signing_key=tmp_path / "k", edge_keys_dir=tmp_path)
    assert CloudConfig(**base).secagg_for_round() is None                     # no table: plaintext rounds
    cfg = CloudConfig(**base, secagg={"mode": "untrusted_edge", "clip": 1.0, "density": 0.1})
    first, second = cfg.secagg_for_round(), cfg.secagg_for_round()
    assert first["seed"] != second["seed"] and MaskedRound.from_announcement(first).coordinates(1000) == 100
    assert CloudConfig(**base, secagg={"mode": "trusted_edge"}).secagg_for_round() == {"mode": "trusted_edge"}
    for bad in ({"mode": "nobody"}, {"mode": "untrusted_edge", "density": 2.0}, {"clip": 1.0, "typo": 1}):
        with pytest.raises(ProtocolError):
            CloudConfig(**base, secagg=bad)


def test_device_without_the_cohort_keys_declines_a_masked_round_before_training(tmp_path, broker):
    cloud_key = generate_signing_key()
    save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    config = provision_device(tmp_path, "d", broker.port, samples=64)
    agent = DeviceAgent(load_device_config(config), logging.getLogger("test.d"))
    ann = RoundAnnouncement(round_id=1, model_name=MODEL, model_version=0, strategy="fedavg",
                            deadline=time.time() + 60, plan=PLAN, compression={}, secagg=SECAGG)
    agent.run_round(ann)
    assert agent.state.seen_rounds == (1,) and agent.state.history == ()     # declined: nothing trained or spent
