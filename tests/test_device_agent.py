"""Device agent against a real Mosquitto, a real interpreter and a scripted cloud/edge (experiments.sandbox)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from device.agent import DeviceAgent
from device.config import load_config
from device.runtime import TrainableModel
from device.state import load_state
from device.training import calibrated_plan, train_round
from experiments.mosquitto import MosquittoBroker
from experiments.sandbox import ScriptedCloud
from protocol import accountant
from protocol.bundle import MODEL_FILE, load_bundle, write_bundle
from protocol.compression import decode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import TrainingPlan, verify_message
from protocol.signing import generate_signing_key, load_private_key, load_public_key, save_public_key

from .harness import (
    DEV_KEY,
    DEV_PUB,
    MODEL,
    PLAN,
    PREBUILT,
    REPO,
    device_data,
    dp_accounting_epsilon,
    provision_device,
    wait_for,
)

DENSE = {"method": "dense", "density": 1.0, "bits": 32, "block_size": 256, "stochastic": False, "seed": None,
         "entropy": False}


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(PREBUILT / MODEL, load_public_key(DEV_PUB))


@pytest.fixture
def fed(tmp_path, broker, bundle, daemons):
    """A cloud key, a scripted cloud/edge on the broker, and a factory of provisioned devices."""
    cloud_key = generate_signing_key()
    save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    cloud = ScriptedCloud(broker.port, "e1", cloud_key)
    x, y = device_data(128)  # what provision_device gives every device
    weights = TrainableModel(bundle.model_bytes, bundle.manifest).get_flat() + 0.01  # a "global" model

    def device(name: str = "d1", **overrides) -> Path:
        return provision_device(tmp_path, name, broker.port, **overrides)

    def start(config: Path) -> subprocess.Popen:
        return daemons.process("device", "run", "--config", str(config), log=config.parent / "agent.log")

    yield type("Fed", (), dict(cloud=cloud, device=staticmethod(device), start=staticmethod(start), x=x, y=y,
                               weights=weights, broker=broker, cloud_key=cloud_key))
    cloud.close()


def logs(config: Path) -> list[dict]:
    path = config.parent / "agent.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_log(config: Path, msg: str, timeout: float = 20.0, **fields) -> dict:
    """The first log entry `msg` with `fields`, once the agent wrote it."""
    return wait_for(lambda: next((e for e in logs(config) if e["msg"] == msg
                                  and all(e.get(k) == v for k, v in fields.items())), None),
                    timeout, 0.05, lambda: f"log {msg!r} {fields} in {[e['msg'] for e in logs(config)]}")


def test_update_arrives_decodes_verifies_and_matches_the_interpreter(fed, bundle):
    """In-process agent with a known generator: replaying it on a second interpreter gives the same delta."""
    config = fed.device(privacy={"epsilon": 100.0})
    agent = DeviceAgent(load_config(config), logging.getLogger("test.device"))
    agent.rng = agent.model.rng = np.random.default_rng(7)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        fed.cloud.publish_model(MODEL, 1, fed.weights)
        fed.cloud.announce(1, MODEL, 1, PLAN, compression=DENSE)
        update, size = fed.cloud.next_update(30)
    finally:
        agent.stop.set()
        thread.join(10)
    verify_message(update, load_public_key(config.parent / "d1.pub"))
    assert (update.device_id, update.round_id, update.base_version, update.local_steps) == ("d1", 1, 1, 4)
    assert update.privacy.sample_rate == 0.25 and update.privacy.steps == 4
    assert update.privacy.epsilon == pytest.approx(accountant.epsilon((accountant.Entry(1.1, 0.25, 4),), 1e-5))
    assert update.capability.compute_class == "pi" and update.capability.steps_per_s > 0
    delta = decode_update(update.delta, update.n_params)
    replay = TrainableModel(bundle.model_bytes, bundle.manifest)
    expected = train_round(replay, fed.x, fed.y.astype(np.int32), fed.weights, PLAN, 4, np.random.default_rng(7))
    np.testing.assert_allclose(delta, expected.delta, atol=1e-6)
    assert np.linalg.norm(delta) > 0.01 and size > 4 * update.n_params
    state = agent.state
    assert state.seen_rounds == (1,) and len(state.history) == 1 and np.all(state.residual == 0)


def test_skipped_declined_delta_model_and_scaffold(fed):
    """Significance threshold -> "skipped" (the delta waits in the residual); too few steps fit -> "declined";
    a delta-encoded global model with a SCAFFOLD control variate -> an update with c_i+ - c_i, and c_i moves by it."""
    config = fed.device(privacy={"epsilon": 100.0}, significance_threshold=1e6)
    agent = DeviceAgent(load_config(config), logging.getLogger("test.device"))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        fed.cloud.publish_model(MODEL, 1, fed.weights)
        fed.cloud.announce(1, MODEL, 1, PLAN)
        skipped = fed.cloud.wait_status("skipped", 30)
        assert skipped.round_id == 1 and "|delta|" in skipped.detail
        assert len(agent.state.history) == 1 and np.linalg.norm(agent.state.residual) > 0  # spent; delta kept
        agent.cfg = dataclasses.replace(agent.cfg, significance_threshold=0.0, min_steps=1000)
        fed.cloud.announce(2, MODEL, 1, PLAN)
        assert fed.cloud.wait_status("declined", 30).round_id == 2
        assert len(agent.state.history) == 1  # nothing trained, nothing spent
        agent.cfg = dataclasses.replace(agent.cfg, min_steps=1)
        c = np.full(len(fed.weights), 0.001, np.float32)
        fed.cloud.publish_model(MODEL, 2, fed.weights * 1.01, control=c, base=fed.weights)
        fed.cloud.announce(3, MODEL, 2, dataclasses.replace(PLAN, scaffold=True), compression=DENSE)
        update, _ = fed.cloud.next_update(30)
    finally:
        agent.stop.set()
        thread.join(10)
    assert update.round_id == 3 and update.base_version == 2 and update.control_delta is not None
    np.testing.assert_array_equal(agent.state.control, decode_update(update.control_delta, update.n_params))
    np.testing.assert_allclose(agent.state.server_control, c)
    assert len(agent.state.history) == 2 and agent.state.seen_rounds == (1, 2, 3)


def test_a_device_that_joins_after_delta_versions_catches_up_from_the_edge(fed):
    """A device that joins mid-run (or comes back after its broker session expired) finds only the latest delta
    retained, which it cannot apply: it fetches that version in full from the edge's model/full topic, refuses a
    full model the signed delta does not vouch for, installs the one it does, unsubscribes, and trains on it."""
    from protocol.global_model import rebuild

    config = fed.device(privacy={"epsilon": 100.0})
    refused: list[str] = []
    log = logging.getLogger("test.device.catchup")
    log.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: refused.append(
        f"{r.getMessage()} {getattr(r, 'fields', {}).get('reason')}")})())
    fed.cloud.publish_model(MODEL, 1, fed.weights)
    v2 = fed.cloud.publish_model(MODEL, 2, fed.weights * 1.01, base=fed.weights)
    w2, _ = rebuild(v2, 1, fed.weights)
    v3 = fed.cloud.publish_model(MODEL, 3, w2 + 0.003, base=w2)
    w3, _ = rebuild(v3, 2, w2)
    agent = DeviceAgent(load_config(config), log)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.wanted is not None, 30, 0.05, "catching up")
        assert agent.state.model_version == -1
        fed.cloud.publish_full(v3, w3 + 1.0)                      # not what the cloud signed: refused
        wait_for(lambda: "refused a message BAD_HASH" in refused, 30, 0.05, "refusal logged")
        assert agent.state.model_version == -1
        fed.cloud.publish_full(v3, w3)
        wait_for(lambda: agent.state.model_version == 3 and agent.wanted is None, 30, 0.05,
                 "v3 installed from the edge's full model, catching up over")   # the agent's thread sets both
        np.testing.assert_array_equal(agent.state.weights, w3)
        fed.cloud.announce(1, MODEL, 3, PLAN, compression=DENSE)
        update, _ = fed.cloud.next_update(30)
    finally:
        agent.stop.set()
        thread.join(10)
    assert (update.round_id, update.base_version) == (1, 3)
    assert load_state(config.parent / "state" / "state.npz").model_version == 3


def test_a_restarted_device_does_not_keep_receiving_full_models(fed):
    """The broker keeps a persistent session's subscriptions: a device stopped while catching up, whose model then
    came in full from the cloud, drops the model/full subscription when it reconnects instead of receiving every
    version's full weights from then on."""
    from protocol.global_model import rebuild

    config = fed.device(privacy={"epsilon": 100.0})

    def run_agent(record: list[str] | None = None):
        agent = DeviceAgent(load_config(config), logging.getLogger("test.device.session"))
        if record is not None:
            handle = agent.handle
            agent.handle = lambda topic, payload: (record.append(topic), handle(topic, payload))[-1]
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        return agent, thread

    agent, thread = run_agent()
    try:
        fed.cloud.publish_model(MODEL, 1, fed.weights)
        wait_for(lambda: agent.state.model_version == 1, 30, 0.05, "v1 installed")
        fed.cloud.publish_model(MODEL, 3, fed.weights * 1.02, base=fed.weights * 1.01)   # it missed v2
        wait_for(lambda: agent.wanted is not None, 30, 0.05, "catching up")
    finally:
        agent.stop.set()
        thread.join(10)
    fed.cloud.publish_model(MODEL, 4, fed.weights * 1.03)          # the cloud's next full version, while it is off
    seen: list[str] = []
    agent, thread = run_agent(seen)
    try:
        wait_for(lambda: agent.state.model_version == 4, 30, 0.05, "v4 installed")
        fed.cloud.publish_full(fed.cloud.publish_model(MODEL, 4, fed.weights * 1.03), fed.weights * 1.03)
        v5 = fed.cloud.publish_model(MODEL, 5, fed.weights * 1.04, base=agent.state.weights)
        wait_for(lambda: agent.state.model_version == 5, 30, 0.05, "v5 installed")   # after the full copy, in order
        np.testing.assert_array_equal(agent.state.weights, rebuild(v5, 4, fed.weights * 1.03)[0])
    finally:
        agent.stop.set()
        thread.join(10)
    assert agent.topics["model"] in seen and agent.topics["model_full"] not in seen, seen


def test_catching_up_ends_when_a_new_run_starts(fed):
    """A device waiting for an old run's version in full forgets it when a newer run's model arrives: it holds the
    new run's model and no longer listens on model/full (handled on this thread, as the agent's loop would)."""
    from cloud.model import compress_broadcast
    from protocol.compression import CompressionSettings
    from protocol.messages import encode, global_model, new_run_id, sign_message

    agent = DeviceAgent(load_config(fed.device()), logging.getLogger("test.device.newrun"))
    old, new = new_run_id(1.7e9), new_run_id(1.8e9)
    delta, published, _ = compress_broadcast(fed.weights, fed.weights * 1.01, None,
                                             CompressionSettings(method="dense", bits=8))
    stale = sign_message(global_model(MODEL, 3, published, delta, run_id=old), fed.cloud_key)
    agent.handle(agent.topics["model"], encode(stale))
    assert agent.wanted == stale and agent.state.model_version == -1
    agent.handle(agent.topics["model"], encode(sign_message(global_model(MODEL, 1, fed.weights, run_id=new),
                                                            fed.cloud_key)))
    assert agent.wanted is None and agent.state.run_id == new and agent.state.model_version == 1
    np.testing.assert_array_equal(agent.state.weights, fed.weights)


def test_ota_push_installs_a_new_bundle_that_the_agent_trains_with(fed, tmp_path):
    from cloud.push import push_bundle
    from protocol.mqtt import ConnectionConfig

    config = fed.device(privacy={"epsilon": 100.0})
    fed.start(config)
    wait_log(config, "connected")
    manifest = load_bundle(PREBUILT / MODEL, load_public_key(DEV_PUB)).manifest
    v2 = write_bundle(tmp_path / "v2", (PREBUILT / MODEL / MODEL_FILE).read_bytes(), {**manifest, "version": 2},
                      load_private_key(DEV_KEY))
    push_bundle(v2, "pi", ["e1"], ConnectionConfig(port=fed.broker.port), fed.cloud_key,
                message_cap=16 * 1024, bundle_key=load_public_key(DEV_PUB))
    wait_log(config, "bundle loaded", version=2, timeout=30)
    fed.cloud.publish_model(MODEL, 1, fed.weights)
    fed.cloud.announce(1, MODEL, 1, PLAN)
    update, _ = fed.cloud.next_update(30)
    assert update.round_id == 1
    assert load_bundle(config.parent / "bundles" / "current", load_public_key(DEV_PUB)).version == 2


def test_budget_stops_training_and_survives_kill_9(fed):
    entry = accountant.Entry(PLAN.noise_mult, 0.25, 4)
    budget = (accountant.epsilon((entry,), 1e-5) + accountant.epsilon((entry, entry), 1e-5)) / 2
    config = fed.device(privacy={"epsilon": budget})
    proc = fed.start(config)
    fed.cloud.publish_model(MODEL, 1, fed.weights)
    fed.cloud.announce(1, MODEL, 1, PLAN)
    update, _ = fed.cloud.next_update(30)
    assert update.round_id == 1 and update.privacy.epsilon <= budget
    fed.cloud.announce(2, MODEL, 1, PLAN)
    status = fed.cloud.wait_status("budget_exhausted", 30)
    assert status.round_id == 2 and status.epsilon_spent == pytest.approx(update.privacy.epsilon)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fed.cloud.wait_status("offline", 10).device_id == "d1"  # the last will
    again = fed.start(config)
    fed.cloud.announce(3, MODEL, 1, PLAN)
    status = fed.cloud.wait_status("budget_exhausted", 30)
    assert status.round_id == 3 and status.epsilon_spent <= budget
    assert fed.cloud.updates.empty()
    out = subprocess.run([sys.executable, "-m", "fediomt", "device", "status", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["rounds_trained"] == 1
    again.send_signal(signal.SIGTERM)  # a clean stop, then a new run: the budget is per device, it stays spent
    assert again.wait(15) == 0
    assert fed.cloud.wait_status("offline", 10).round_id is None
    subprocess.run([sys.executable, "-m", "fediomt", "device", "new-run", "--config", str(config)], cwd=REPO,
                   capture_output=True, check=True)
    state = load_state(config.parent / "state" / "state.npz")
    assert len(state.history) == 1 and state.seen_rounds == () and state.model_version == -1


def test_broker_restart_mid_round_update_still_delivered(fed):
    """The broker goes down while the device trains, the update is published while it is down (paho queues it),
    the broker comes back (persistent sessions on both sides): the update arrives."""
    config = fed.device(privacy={"epsilon": 1e4})
    fed.start(config)
    fed.cloud.publish_model(MODEL, 1, fed.weights)
    long_plan = TrainingPlan(lr=0.05, local_epochs=1000, batch_size=32, clip=1.0, noise_mult=1.1, max_steps=300)
    fed.cloud.announce(1, MODEL, 1, long_plan, deadline_s=120)
    fed.cloud.wait_status("training", 30)
    fed.broker.stop()
    sent = wait_log(config, "update sent", timeout=30)
    assert sent["ts"] > wait_log(config, "disconnected")["ts"]  # published while the broker was down
    fed.broker.start()
    update, _ = fed.cloud.next_update(30)
    assert "Permission denied" not in fed.broker.log_tail()  # the sessions really were persisted
    assert update.round_id == 1 and update.local_steps == 300
    assert len([e for e in logs(config) if e["msg"] == "connected"]) >= 2  # it reconnected


def test_unacknowledged_update_is_resent_until_its_ack_or_deadline_also_after_kill_9(fed):
    """Issue 18, defect 4: the update is kept (state.npz) until the edge's Ack and resent, the same bytes, after each
    Ack timeout, and at once by the agent restarted after a kill -9; the Ack stops it, and so does the deadline."""
    config = fed.device(privacy={"epsilon": 100.0}, ack_timeout_s=1.0, ack_timeout_max_s=1.0)
    proc = fed.start(config)
    fed.cloud.publish_model(MODEL, 1, fed.weights)
    fed.cloud.announce(1, MODEL, 1, PLAN)
    first, _ = fed.cloud.next_update(30)
    assert fed.cloud.next_update(10)[0] == first            # no Ack: resent, the same nonce and signature
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fed.start(config)
    wait_log(config, "starting")
    while not fed.cloud.updates.empty():
        fed.cloud.updates.get()
    assert fed.cloud.next_update(30)[0] == first            # the restarted agent resends it
    fed.cloud.ack(first)
    settled = wait_log(config, "update settled", round=1, why="acknowledged")
    fed.cloud.announce(2, MODEL, 1, PLAN, deadline_s=8)     # no Ack this time: resent until the deadline
    late = wait_log(config, "update settled", round=2, why="deadline passed without an Ack")
    resent = [e for e in logs(config) if e["msg"] == "update resent"]
    assert [e for e in resent if e["round"] == 1 and e["ts"] > settled["ts"]] == []   # the Ack stopped it
    assert len([e for e in resent if e["round"] == 2]) >= 2 and max(e["ts"] for e in resent) <= late["ts"]
    assert load_state(config.parent / "state" / "state.npz").unacked is None


def test_tampered_global_model_is_refused(fed):
    config = fed.device(privacy={"epsilon": 100.0})
    fed.start(config)
    wait_log(config, "connected")
    # a v1 round, retained as announcements are: "connected" is logged before the subscription is in place
    fed.cloud.conn.publish("fl/e1/round", b"\x82\x65round\x01", retain=True).wait_for_publish(5)
    wait_log(config, "refused a message", reason="UNKNOWN_VERSION")  # refused, and the agent carries on
    fed.cloud.publish_model(MODEL, 1, fed.weights, tamper=True)
    fed.cloud.announce(1, MODEL, 1, PLAN)
    wait_log(config, "refused a message", reason="BAD_SIGNATURE")
    wait_log(config, "waiting for the round's model", round=1)
    assert fed.cloud.updates.empty()
    fed.cloud.publish_model(MODEL, 1, fed.weights)  # the genuine one: now the round can run
    update, _ = fed.cloud.next_update(30)
    assert update.round_id == 1 and update.base_version == 1


def test_tampered_bundle_refused_at_start_and_on_install(fed, tmp_path):
    config = fed.device(privacy={"epsilon": 100.0})
    current = config.parent / "bundles" / "current"
    good = (current / MODEL_FILE).read_bytes()
    (current / MODEL_FILE).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    proc = fed.start(config)
    assert proc.wait(30) == 3
    assert wait_log(config, "refusing to start")["reason"] == "BAD_HASH"
    (current / MODEL_FILE).write_bytes(good)

    agent = DeviceAgent(load_config(config), logging.getLogger("test.device"))
    manifest = dict(agent.bundle.manifest)
    v2 = write_bundle(tmp_path / "v2", good, {**manifest, "version": 2}, load_private_key(DEV_KEY))
    forged = write_bundle(tmp_path / "forged", good, {**manifest, "version": 3}, generate_signing_key())
    with pytest.raises(ProtocolError) as err:
        agent.install_bundle(forged)
    assert err.value.reason == Reason.BAD_SIGNATURE and agent.bundle.version == 1
    assert agent.install_bundle(v2).version == 2 and agent.bundle.version == 2
    assert load_bundle(config.parent / "bundles" / "previous", load_public_key(DEV_PUB)).version == 1
    old = write_bundle(tmp_path / "old", good, {**manifest, "version": 1}, load_private_key(DEV_KEY))
    with pytest.raises(ProtocolError) as err:
        agent.install_bundle(old)
    assert err.value.reason == Reason.DOWNGRADE


def test_mtls_broker_with_client_certificates_and_acl(tmp_path, bundle):
    """A broker as `fediomt broker config` writes it (mTLS, CN = username, per-device ACL), identities from
    `fediomt pki`: the device connects with its certificate, signs with its pki signing key, and its update arrives."""
    from experiments.mosquitto import free_port, give_to_broker_user
    from fediomt import broker as broker_config
    from fediomt import pki

    work = Path(tempfile.mkdtemp(prefix="fediomt-device-tls-"))  # readable by the mosquitto user, unlike tmp_path
    os.chmod(work, 0o755)
    ca = work / "pki"
    pki.init_ca(ca)
    device, edge = pki.issue(ca, "device", "d1"), pki.issue(ca, "edge", "e1")
    give_to_broker_user(pki.issue(ca, "server", "broker-e1").key)
    port = free_port()
    conf, _ = broker_config.write(broker_config.BrokerFilesConfig(role="edge", id="e1", pki=ca, port=port,
                                                             bind="127.0.0.1", data_dir=work / "broker"),
                                  work / "broker.conf")
    cloud_key = generate_signing_key()
    save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    config = provision_device(tmp_path, "d1", port, samples=64, signing_key=str(device.sign_key),
                              broker={"host": "localhost", "ca": str(device.ca), "cert": str(device.cert),
                                      "key": str(device.key)}, privacy={"epsilon": 100.0})
    with MosquittoBroker(workdir=work / "broker", port=port, config_file=conf):
        cloud = ScriptedCloud(port, "e1", cloud_key, host="localhost", client_id="e1",
                              tls=(edge.ca, edge.cert, edge.key))
        proc = subprocess.Popen([sys.executable, "-m", "fediomt", "device", "run", "--config", str(config)],
                                cwd=REPO, stderr=subprocess.DEVNULL)
        try:
            cloud.publish_model(MODEL, 1, TrainableModel(bundle.model_bytes, bundle.manifest).get_flat())
            cloud.announce(1, MODEL, 1, PLAN)
            update, _ = cloud.next_update(30)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            cloud.close()
    verify_message(update, load_public_key(device.sign_pub))
    assert update.device_id == "d1" and update.round_id == 1
    shutil.rmtree(work, ignore_errors=True)


def test_bench_device_quick(tmp_path):
    """`fediomt bench device --quick`: one real agent process, 3 rounds; the figures the issue asks for."""
    import argparse

    from experiments.bench.device import run

    figures = run(argparse.Namespace(quick=True, out=tmp_path, json=False))
    assert figures["model"] == MODEL and figures["rounds"] == 3 and figures["exit_code"] == 0
    assert 0 < figures["peak_rss_mb"] <= 100  # the target, interpreter and MQTT client included
    assert figures["cpu_s"] > 0 and figures["local_steps_per_round"] > 0
    assert 0 < figures["bytes_up_per_round"] < figures["bytes_down_per_round"]  # sparse int8 up, fp32 model down


def test_a_device_calibrates_its_noise_to_the_smaller_of_the_target_and_its_own_budget(fed):
    """Under plan.target_epsilon the real agent lowers the announced noise (the ceiling) to the least that keeps
    its history plus the rounds left within min(target, its budget): the run spends ~all of the device's own budget
    of 3 (not the target of 6), recomputed by dp-accounting from the updates, then refuses the next round."""
    config = fed.device(privacy={"epsilon": 3.0})
    proc = fed.start(config)
    fed.cloud.publish_model(MODEL, 1, fed.weights)
    plan = dataclasses.replace(PLAN, noise_mult=4.0, target_epsilon=6.0, target_delta=1e-5, rounds_left=3)
    history: list[accountant.Entry] = []
    for round_id, left in ((1, 3), (2, 2), (3, 1)):
        announced = dataclasses.replace(plan, rounds_left=left)
        fed.cloud.announce(round_id, MODEL, 1, announced)
        update, _ = fed.cloud.next_update(30)
        p = update.privacy
        expected = calibrated_plan(announced, history, 128, 3.0, 1e-5).noise_mult   # its budget, not the target
        assert update.round_id == round_id and p.noise_mult == pytest.approx(expected) and p.noise_mult < 4.0
        history.append(accountant.Entry(p.noise_mult, p.sample_rate, p.steps))
    spent = dp_accounting_epsilon([(e.noise_mult, e.sample_rate, e.steps) for e in history], 1e-5, pld=False)
    assert 0.98 * 3.0 <= spent <= 3.0 and update.privacy.epsilon == pytest.approx(spent, rel=1e-3)
    fed.cloud.announce(4, MODEL, 1, dataclasses.replace(plan, rounds_left=1))
    assert fed.cloud.wait_status("budget_exhausted", 30).round_id == 4
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
