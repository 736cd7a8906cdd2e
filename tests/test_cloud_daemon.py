"""The cloud daemon against a real Mosquitto with scripted edges (paho clients publishing signed EdgeAggregates).

Rounds advance and the model moves by exactly the server update; bad aggregates are rejected and counted; a privacy
budget stops the federation with a clear message; kill -9 + restart resumes from the checkpoint.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cloud.accounting import Entry, epsilon
from cloud.rounds import dense_sizes
from experiments.mosquitto import free_port
from protocol.compression import CompressionSettings, encode_update
from protocol.global_model import rebuild
from protocol.messages import (
    Capability,
    CentralDPReport,
    DeviceStatus,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    bytes_to_floats,
    decode,
    encode,
    new_nonce,
    sign_message,
    verify_message,
)
from protocol.signing import generate_signing_key, save_private_key, save_public_key
from protocol.topics import CLOUD_MODEL, CLOUD_ROUND, aggregate_topic

from .harness import MLP_OPTIONS as MODEL_OPTIONS
from .harness import MLP_PARAMS as N_PARAMS
from .harness import REPO, Fed, Recorder, cloud_for, cloud_process, rounds_of, start_in_process, wait_for

DENSE = CompressionSettings(method="dense", bits=32)


class Edges(Recorder):
    """Scripted edges on one Recorder: the cloud's models (rebuilt, sha256 checked) and announcements (signature
    checked) as they arrive, and signed aggregates to publish."""

    def __init__(self, broker, keys: dict, cloud_pub) -> None:
        self.keys, self.cloud_pub = keys, cloud_pub
        self.models: dict[int, np.ndarray] = {}
        self.encodings: dict[int, str] = {}
        self.taken = 0  # the announcements next_round returned
        super().__init__(broker.port, [CLOUD_MODEL, CLOUD_ROUND], client_id="edges", host=broker.host,
                         hook=self._on_cloud)

    def _on_cloud(self, topic: str, payload: bytes) -> None:
        if topic == CLOUD_MODEL:
            model = decode(payload, expect=GlobalModel)
            verify_message(model, self.cloud_pub)
            base = -1 if model.base_version is None else model.base_version
            weights, _ = rebuild(model, base, self.models.get(base))   # what a device holding the base rebuilds
            self.models[model.model_version] = weights
            self.encodings[model.model_version] = model.encoding
        else:
            verify_message(decode(payload, expect=RoundAnnouncement), self.cloud_pub)

    def next_round(self, timeout: float = 60.0) -> RoundAnnouncement:
        """The next announcement (each one once, in order of arrival); queue.Empty when none came within `timeout`."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.payloads(CLOUD_ROUND)) > self.taken, timeout):
                raise queue.Empty
            self.taken += 1
            return decode(self.payloads(CLOUD_ROUND)[self.taken - 1], expect=RoundAnnouncement)

    def model(self, version: int, timeout: float = 10.0) -> np.ndarray:
        """Global model `version` as an edge rebuilt it, once it arrived."""
        self.wait(lambda _: version in self.models, timeout, f"global model version {version}")
        return self.models[version]

    def aggregate(self, edge: str, ann: RoundAnnouncement, delta=None, num_samples: int = 10, key=None,
                  **fields) -> bytes:
        payload = b"" if delta is None else encode_update(np.asarray(delta, np.float32), DENSE)[0]
        agg = EdgeAggregate(
            edge_id=edge, round_id=ann.round_id, base_version=ann.model_version, num_devices=2,
            num_samples=num_samples, weight_sum=float(num_samples), n_params=N_PARAMS, delta=payload,
            significant=delta is not None, central_dp=fields.pop("central_dp", None), filtered=[], rejected={},
            device_ids=[f"{edge}-d1", f"{edge}-d2"], max_device_epsilon=0.5, mean_local_steps=3.0,
            nonce=new_nonce(), timestamp=time.time(), device_bytes=1000, **fields)
        return encode(sign_message(agg, key or self.keys[edge]))

    def send(self, edge: str, data: bytes) -> None:
        self.publish(aggregate_topic(edge), data)


@pytest.fixture
def federation(tmp_path, broker):
    """Keys, a held-out set and a config writer; yields (write_config(extra) -> path, edges)."""
    cloud_key = generate_signing_key()
    save_private_key(cloud_key, tmp_path / "cloud.key")
    keys = {e: generate_signing_key() for e in ("edge1", "edge2")}
    for edge, key in keys.items():
        save_public_key(key.public_key(), tmp_path / "edges" / f"{edge}.pub")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "holdout.npz", x=rng.normal(size=(64, 4)).astype(np.float32), y=rng.integers(0, 2, 64))

    def write_config(extra: str) -> Path:
        text = (f'run_dir = "run"\nsigning_key = "cloud.key"\nedge_keys_dir = "edges"\neval_data = "holdout.npz"\n'
                f'model = "vitals_mlp"\ngrace_s = 0.5\n{extra}\n{MODEL_OPTIONS}'
                f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nsession_expiry_s = 600\n')
        path = tmp_path / "cloud.toml"
        path.write_text(text)
        return path

    edges = Edges(broker, keys, cloud_key.public_key())
    yield write_config, edges
    edges.close()


def test_rounds_advance_by_the_server_update_and_bad_aggregates_are_counted(federation, tmp_path, daemons):
    write_config, edges = federation
    port = free_port()
    config = write_config(f'rounds = 3\nround_timeout_s = 4.0\nmin_edges = 1\nmetrics_port = {port}\n'
                          '[strategy]\nname = "fedavg"\n')
    agg, thread = start_in_process(config, daemons)
    rng = np.random.default_rng(1)

    ann = edges.next_round()
    assert ann.round_id == 1 and ann.model_version == 1 and ann.strategy == "fedavg"
    d1, d2 = rng.normal(size=N_PARAMS), rng.normal(size=N_PARAMS)
    edges.send("edge1", edges.aggregate("edge1", ann, d1, key=generate_signing_key()))  # not edge1's key
    edges.send("edge1", edges.aggregate("edge1", dataclass_round(ann, 6), d1))            # a future round
    good = edges.aggregate("edge1", ann, d1, num_samples=30)
    edges.send("edge1", good)
    edges.send("edge1", good)                                                             # replayed bytes
    edges.send("edge2", edges.aggregate("edge2", ann, d2, num_samples=10))

    ann2 = edges.next_round()
    assert ann2.round_id == 2 and ann2.model_version == 2
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "fediomt_cloud_round 1.0" in metrics and 'fediomt_cloud_aggregates_rejected_total{reason="REPLAY"} 1.0' \
        in metrics
    expected = edges.models[1] + ((30 * d1 + 10 * d2) / 40).astype(np.float32)
    np.testing.assert_allclose(edges.models[2], expected, rtol=1e-6, atol=1e-7)

    # edge2 says "about the same as last time": the cloud reuses edge2's last delta
    d3 = rng.normal(size=N_PARAMS)
    edges.send("edge1", edges.aggregate("edge1", ann2, d3, num_samples=10))
    edges.send("edge2", edges.aggregate("edge2", ann2, None, num_samples=10))
    ann3 = edges.next_round()
    np.testing.assert_allclose(edges.models[3], edges.models[2] + ((d3 + d2) / 2).astype(np.float32), rtol=1e-6,
                               atol=1e-7)
    # round 3: only edge1 answers; the round closes at its deadline with min_edges = 1
    t0 = time.monotonic()
    edges.send("edge1", edges.aggregate("edge1", ann3, d1, num_samples=10))
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - t0 > 2.0
    np.testing.assert_allclose(edges.model(4), edges.models[3] + d1.astype(np.float32), rtol=1e-6, atol=1e-7)

    records = rounds_of(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3] and [r["model_version"] for r in records] == [2, 3, 4]
    assert records[0]["rejected_at_cloud"] == {"BAD_SIGNATURE": 1, "WRONG_ROUND": 1, "REPLAY": 1}
    assert records[0]["bytes_up"] == 2000 and records[0]["num_devices"] == 4 and records[2]["num_edges"] == 1
    # dense FedAvg over the same round: 4 dense updates up, full float32 models down, in the same envelopes
    dense = dense_sizes("vitals_mlp", N_PARAMS, records[0]["model_version"] - 1)
    assert abs(records[0]["dense_bytes_up"] - 4 * dense.update) <= 4 * 16 and dense.update > 4 * N_PARAMS  # ids
    assert records[0]["bytes_down"] > 0 and records[0]["dense_bytes_down"] >= records[0]["bytes_down"]
    receipts = records[0]["bytes_down_cloud"] - records[0]["bytes_down"] // records[0]["addressed"] * 2
    assert receipts > 0   # one receipt per authentic aggregate (the replay's too), in both figures
    assert records[0]["dense_bytes_down_cloud"] == records[0]["dense_bytes_down"] // records[0]["addressed"] * 2 \
        + receipts
    assert all(0 <= r[k] <= 1 for r in records for k in ("auroc", "auprc", "min_se_ppv"))   # a binary task
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in records)
    assert records[0]["epsilon"]["device_reported"] == 0.5 and records[0]["epsilon"]["central"] is None
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["finished"] and report["stop_reason"] == "completed 3 rounds"
    assert report["total_bytes_up"] == 5000 and report["final_accuracy"] == records[-1]["accuracy"]
    assert report["total_bytes"] == sum(r["bytes_up"] + r["bytes_down"] + r["bytes_up_cloud"] + r["bytes_down_cloud"]
                                        for r in records)
    assert report["dense_total_bytes"] == sum(r["dense_bytes_up"] + r["dense_bytes_down"] + r["dense_bytes_up_cloud"]
                                              + r["dense_bytes_down_cloud"] for r in records)
    assert report["bytes_ratio"] == report["dense_total_bytes"] / report["total_bytes"]
    assert report["epsilon_pld"]["device_derived"] > 0 and report["epsilon_pld"]["central"] is None


def test_the_trust_gate_leaves_out_the_edge_against_the_root_update(federation, tmp_path, daemons):
    """[trust] root_data: the daemon trains the firmware model's TFLite graph on its root set; of two edges sending
    opposite deltas exactly one points away from that update: it is left out and named in the round record."""
    write_config, edges = federation
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "root.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    config = write_config('rounds = 1\nround_timeout_s = 30.0\n[strategy]\nname = "fedavg"\n'
                          '[plan]\nlr = 0.1\nbatch_size = 32\nclip = 1.0\nnoise_mult = 1.0\n'
                          '[trust]\nroot_data = "root.npz"\n')
    agg, thread = start_in_process(config, daemons)
    ann = edges.next_round()
    d = rng.normal(size=N_PARAMS).astype(np.float32)
    edges.send("edge1", edges.aggregate("edge1", ann, d, num_samples=10))
    edges.send("edge2", edges.aggregate("edge2", ann, -d, num_samples=10))
    thread.join(timeout=60)
    (record,) = rounds_of(tmp_path / "run")
    (left_out,) = record["distrusted_at_cloud"]
    assert record["distrusted_at_cloud"][left_out] < 0 and record["num_devices"] == 4
    kept = d if left_out == "edge2" else -d                       # the other edge alone, not their mean (zero)
    np.testing.assert_allclose(edges.model(2), edges.models[1] + kept, rtol=1e-6, atol=1e-6)
    np.savez(tmp_path / "root.npz", x=x[:, :3], y=(x[:, 0] > 0).astype(np.int64))   # rows of another model
    with pytest.raises(ValueError, match=r"root.npz: rows of shape \(3,\), model 'vitals_mlp' takes \(4,\)"):
        start_in_process(config)


def dataclass_round(ann: RoundAnnouncement, round_id: int) -> RoundAnnouncement:
    import dataclasses

    return dataclasses.replace(ann, round_id=round_id)


def test_delta_models_rebuild_exactly_and_full_versions_fold_the_residual_in(federation, tmp_path, daemons):
    write_config, edges = federation
    config = write_config('rounds = 3\nround_timeout_s = 20.0\nmodel_encoding = "delta"\nmodel_full_every = 2\n'
                          '[model_compression]\nmethod = "topk"\ndensity = 0.3\nbits = 8\n'
                          '[strategy]\nname = "fedavg"\n')
    _, thread = start_in_process(config, daemons)
    rng = np.random.default_rng(3)
    steps = []
    for _ in range(3):
        ann = edges.next_round()
        steps.append(rng.normal(size=N_PARAMS).astype(np.float32))
        for edge in ("edge1", "edge2"):
            edges.send(edge, edges.aggregate(edge, ann, steps[-1]))
    thread.join(timeout=30)
    assert not thread.is_alive()
    edges.model(4)  # published as the cloud stopped
    assert edges.encodings == {1: "full", 2: "delta", 3: "full", 4: "delta"}  # sha256 checked on every one
    v1 = edges.models[1]
    assert not np.allclose(edges.models[2], v1 + steps[0], atol=1e-3)   # lossy: 30% of coordinates, 8 bits
    np.testing.assert_allclose(edges.models[3], v1 + steps[0] + steps[1], atol=1e-5)  # nothing lost for good


def test_privacy_budget_exhaustion_stops_with_a_clear_message(federation, tmp_path, daemons):
    write_config, edges = federation
    per_round = [Entry(1.0, 1.0, 1)]
    budget = (epsilon(per_round * 2, 1e-5) + epsilon(per_round * 3, 1e-5)) / 2
    config = write_config(f'rounds = 10\nround_timeout_s = 20.0\n[central_dp]\nclip = 1.0\nnoise_mult = 1.0\n'
                          f'[privacy]\ncentral_epsilon = {budget}\nfinal_pld = false\n'
                          f'[strategy]\nname = "fedavg"\n')
    agg, thread = start_in_process(config, daemons)
    for round_id in (1, 2):
        ann = edges.next_round()
        assert ann.round_id == round_id and ann.central_dp.noise_mult == 1.0
        for edge in ("edge1", "edge2"):
            dp = CentralDPReport(clip=1.0, noise_mult=1.0, sampling_rate=1.0)
            edges.send(edge, edges.aggregate(edge, ann, np.zeros(N_PARAMS), central_dp=dp))
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert agg.state.stop_reason.startswith("privacy budget spent: central-level epsilon would reach")
    assert "stopping before round 3" in agg.state.stop_reason
    records = rounds_of(tmp_path / "run")
    assert len(records) == 2 and records[-1]["epsilon"]["central"] < budget
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stop_reason"] == agg.state.stop_reason
    with pytest.raises(queue.Empty):
        edges.next_round(timeout=0.5)  # no third announcement (an absence: waited out, not awaited)


def test_stops_when_every_device_reports_its_budget_spent(federation, tmp_path, daemons):
    write_config, edges = federation
    config = write_config('rounds = 5\nround_timeout_s = 20.0\n[strategy]\nname = "fediomt"\n'
                          '[strategy.options]\ncohort_size = 1\n')
    agg, thread = start_in_process(config, daemons)
    ann = edges.next_round()
    devices = ("edge1-d1", "edge1-d2", "edge2-d1", "edge2-d2")
    for device in devices:  # retained statuses, as devices publish them
        status = DeviceStatus(device, device[:5], "budget_exhausted", 1, 1, 7.9, 8.0, time.time(), round_id=1,
                              capability=Capability("wearable", 256, 1e5, steps_per_s=50.0))
        edges.publish(f"fl/{device[:5]}/status/{device}", encode(status), retain=True)
    wait_for(lambda: all(getattr(agg.state.devices.get(d), "state", None) == "budget_exhausted" for d in devices))
    for edge in ("edge1", "edge2"):
        edges.send(edge, edges.aggregate(edge, ann, np.zeros(N_PARAMS)))
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert agg.state.stop_reason.startswith("privacy budget spent on every device")
    assert "stopping before round 2" in agg.state.stop_reason
    info = agg.state.devices["edge2-d1"]
    assert info.compute_class == "wearable" and info.steps_per_s == 50.0 and info.rounds == 1


def auto_respond(edges: Edges, stop: threading.Event, limit: list[int] | None = None) -> None:
    """Both edges answer every round up to limit[0] once (a re-announced round is not answered twice)."""
    answered = set()
    while not stop.is_set():
        try:
            ann = edges.next_round(timeout=0.2)
        except queue.Empty:
            continue
        if ann.round_id in answered or (limit is not None and ann.round_id > limit[0]):
            continue
        answered.add(ann.round_id)
        for edge in ("edge1", "edge2"):
            edges.send(edge, edges.aggregate(edge, ann, np.full(N_PARAMS, 0.01 * ann.round_id)))


def test_kill_9_mid_run_resumes_from_the_checkpoint_and_sigterm_stops_cleanly(federation, tmp_path, daemons):
    write_config, edges = federation
    config = write_config('rounds = 8\nround_timeout_s = 60.0\n[strategy]\nname = "fedadam"\n')
    stop, limit = threading.Event(), [3]
    responder = threading.Thread(target=auto_respond, args=(edges, stop, limit), daemon=True)
    responder.start()
    run_dir, log_path = tmp_path / "run", tmp_path / "cloud.log"

    def log_tail() -> str:
        return log_path.read_text()[-3000:]

    def wait_rounds(n: int) -> None:
        wait_for(lambda: len(rounds_of(run_dir)) >= n or proc.poll() is not None, 90, message=log_tail)
        assert len(rounds_of(run_dir)) == n, log_tail()

    with open(log_path, "ab") as log:
        proc = cloud_process(config, log, daemons)
        try:
            wait_rounds(3)                    # round 4 is open and nobody answers it
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            limit[0] = 5
            proc = cloud_process(config, log, daemons)  # resumes: re-announces round 4; edges answer 4 and 5
            wait_rounds(5)
            proc.send_signal(signal.SIGTERM)  # a clean stop: exit 0, report.json says unfinished
            assert proc.wait(30) == 0
        finally:
            stop.set()
    text = log_path.read_text()
    records = rounds_of(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5], text[-3000:]
    assert [r["model_version"] for r in records] == [2, 3, 4, 5, 6]
    assert text.count('"resumed": true') == 1 and "federation stopped" not in text
    assert text.count('"msg": "cloud stopped"') == 1  # the SIGTERM; the SIGKILL left no line
    edges.model(6)  # published as round 5 closed, just before the SIGTERM
    assert max(edges.models) == 6
    report = json.loads((run_dir / "report.json").read_text())
    assert not report["finished"] and report["rounds_completed"] == 5 and report["strategy"] == "fedadam"
    assert (run_dir / "config.toml").read_text() == config.read_text()


def test_cloud_help_is_fast_and_does_not_import_tensorflow():
    code = ("import sys; from fediomt.cli import main\n"
            "try:\n    main(['cloud', 'run', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'tensorflow' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout


def test_with_the_real_edge_daemon(tmp_path, broker, daemons, recorder):
    """Cloud (in process) <-> the real edge process <-> scripted devices: two rounds, the expected mean update."""
    fed = Fed(tmp_path / "edge", n_devices=3, n_params=N_PARAMS,
              broker={"host": broker.host, "port": broker.port})
    config = cloud_for(fed, tmp_path, broker.port, rounds=2, round_timeout_s=30.0, host=broker.host)
    rng = np.random.default_rng(0)
    deltas = {d: rng.normal(size=N_PARAMS).astype(np.float32) for d in fed.devices}
    samples = {d: 10 * (i + 1) for i, d in enumerate(fed.devices)}

    def answer(topic: str, payload: bytes) -> None:  # the devices: answer every round relayed by the edge
        if topic.endswith("/round"):
            ann = decode(payload, expect=RoundAnnouncement)
            verify_message(ann, fed.cloud_key.public_key())  # relayed byte-identical: the cloud's signature holds
            for d in fed.devices:
                devices.client.publish(f"fl/edge1/updates/{d}", fed.update(
                    d, deltas[d], round_id=ann.round_id, version=ann.model_version, num_samples=samples[d]), qos=1)

    def models() -> dict[int, np.ndarray]:
        return {m.model_version: bytes_to_floats(m.weights, m.n_params)
                for m in (decode(p, expect=GlobalModel) for p in devices.payloads("fl/edge1/model"))}

    devices = recorder(["fl/edge1/round", "fl/edge1/model"], hook=answer)  # bound before the edge publishes
    daemons.process("edge", "run", "--config", str(fed.config), log=tmp_path / "edge.log")
    _, thread = start_in_process(config, daemons)
    thread.join(timeout=60)
    assert not thread.is_alive(), (tmp_path / "edge.log").read_text()[-2000:]
    mean = sum(samples[d] * deltas[d] for d in fed.devices) / sum(samples.values())
    records = rounds_of(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2] and records[0]["num_devices"] == 3
    assert records[0]["bytes_up"] > 3 * 4 * N_PARAMS  # the edge reports the DeviceUpdate message bytes
    devices.wait(lambda _: 3 in models(), 5, "model 3 relayed by the edge")
    got = models()
    np.testing.assert_allclose(got[2], got[1] + mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[3], got[2] + mean, rtol=1e-5, atol=1e-6)


def test_reference_config_loads_and_its_strategy_builds(tmp_path):
    from cloud.config import load_config
    from cloud.strategies import make
    from cloud.strategies.base import RoundDefaults

    cfg = load_config(REPO / "configs" / "cloud.toml")
    assert cfg.strategy.name == "fediomt" and cfg.broker.session_expiry_s == 3600 and cfg.model_encoding == "full"
    strategy = make(cfg.strategy.name, RoundDefaults(cfg.plan, cfg.compression_settings(), cfg.central_dp.report()),
                    cfg.strategy.options)
    assert strategy.importance_sampling and strategy.fednova and strategy.class_lr == {}
    typo = tmp_path / "typo.toml"
    typo.write_text('run_dir = "r"\nsigning_key = "k"\nedge_keys_dir = "e"\nroundz = 3\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(typo)
    assert cfg.privacy.calibrate is False   # the shipped default: every device adds [plan] noise_mult
    calibrating = tmp_path / "calibrate.toml"
    calibrating.write_text('run_dir = "r"\nsigning_key = "k"\nedge_keys_dir = "e"\n[privacy]\ncalibrate = true\n')
    with pytest.raises(ValueError, match="privacy.calibrate needs privacy.device_epsilon"):
        load_config(calibrating)


def test_a_bad_setup_is_one_clear_line_and_exit_status_2(tmp_path):
    config = tmp_path / "cloud.toml"
    config.write_text('run_dir = "run"\nsigning_key = "missing.key"\nedge_keys_dir = "edges"\n')
    out = subprocess.run([sys.executable, "-m", "fediomt", "cloud", "run", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("fediomt cloud: ") and "missing.key" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_cloud_hung_past_its_deadline_announces_the_round_again_instead_of_closing_it(federation, tmp_path,
                                                                                         daemons):
    """SIGSTOP (a hung process, a suspended VM) past the deadline with one of two aggregates in: on SIGCONT the
    cloud cannot know what waited for it at the broker, so it re-announces the round with a new deadline, and the
    edge that answers the re-announcement (as edge.gateway resends on a cloud message) still counts."""
    write_config, edges = federation
    config = write_config("rounds = 1\nround_timeout_s = 4.0\n")
    log_path = tmp_path / "cloud.log"
    with open(log_path, "ab") as log:
        proc = cloud_process(config, log, daemons)
    ann = edges.next_round()
    edges.send("edge1", edges.aggregate("edge1", ann, np.full(N_PARAMS, 0.1)))
    wait_for(lambda: "aggregate accepted" in log_path.read_text(), 30, message=lambda: log_path.read_text()[-2000:])
    proc.send_signal(signal.SIGSTOP)
    time.sleep(ann.deadline - time.time() + 0.5 + 6.0)   # past deadline + grace, and a stall (> tick + 5 s)
    proc.send_signal(signal.SIGCONT)
    again = edges.next_round(30)
    assert again.round_id == ann.round_id and again.deadline > ann.deadline + 5, (again, log_path.read_text()[-2000:])
    edges.send("edge2", edges.aggregate("edge2", again, np.full(N_PARAMS, 0.3)))
    assert proc.wait(60) == 0, log_path.read_text()[-2000:]
    (record,) = rounds_of(tmp_path / "run")
    assert record["num_edges"] == 2 and "resumed after the round's deadline" in log_path.read_text()
