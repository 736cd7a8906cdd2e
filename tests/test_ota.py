"""OTA bundle push: real Mosquitto with a 16 KB message cap, 5 device receivers (one drops mid-transfer and
resumes), tampered chunk, downgrade, bad manifest signature, smoke-test rollback."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloud.push import plan_push, publish_push, push_bundle
from device.flash import flash_local
from device.ota import OtaClient, OtaConfig, OtaReceiver
from experiments.mosquitto import MosquittoBroker
from protocol.bundle import load_bundle, pack_bundle, write_bundle
from protocol.messages import encode, sign_message
from protocol.mqtt import ConnectionConfig
from protocol.signing import generate_signing_key
from protocol.topics import bundle_chunk_topic, bundle_manifest_topic

from .harness import DEV_PUB, MODEL, PREBUILT, wait_for

CAP = 16 * 1024
EDGE, CLS = "edge1", "wearable"


@pytest.fixture(scope="module")
def keys():
    return {"cloud": generate_signing_key(), "bundle": generate_signing_key()}


@pytest.fixture(scope="module")
def source():
    from protocol.signing import load_public_key

    return load_bundle(PREBUILT / MODEL, load_public_key(DEV_PUB))


def make_bundle(tmp: Path, source, key, version: int, model_bytes: bytes | None = None) -> Path:
    """The prebuilt wearable_cnn (64 KB model) re-signed with our key at `version` (no TensorFlow needed)."""
    return write_bundle(tmp / f"v{version}-{'bad' if model_bytes else 'ok'}", model_bytes or source.model_bytes,
                        {**source.manifest, "version": version}, key)


def test_push_through_capped_broker_to_five_devices(tmp_path, keys, source):
    cloud, bkey = keys["cloud"], keys["bundle"]
    v1, v2 = make_bundle(tmp_path, source, bkey, 1), make_bundle(tmp_path, source, bkey, 2)
    assert len(pack_bundle(v2)) > 50_000
    samples = np.random.default_rng(0).normal(size=(8, 100, 6)).astype(np.float32)
    with MosquittoBroker(extra_config=[f"message_size_limit {CAP}"], workdir=tmp_path / "mosquitto") as broker:
        devices: list[OtaClient] = []
        dropped = threading.Event()
        requests_at_drop: list[int] = []
        cfg = ConnectionConfig(host=broker.host, port=broker.port)

        def drop_after_two(received: int, _total: int) -> None:
            if received == 2 and not dropped.is_set():  # the link dies mid-transfer (paho reconnects by itself)
                dropped.set()
                requests_at_drop.append(len(devices[4].subscribe_requests))
                devices[4].conn.client.socket().shutdown(socket.SHUT_RDWR)

        for i in range(5):
            root = tmp_path / f"dev{i}"
            flash_local(load_bundle(v1, bkey.public_key()), root, bkey.public_key())
            devices.append(OtaClient(f"dev{i}", cfg, OtaConfig(EDGE, CLS, root),
                                     cloud.public_key(), bkey.public_key(), samples=lambda: samples,
                                     on_progress=drop_after_two if i == 4 else None))
        for d in devices:
            d.start()
            assert d.conn.connected.wait(10)

        start = time.monotonic()
        report = push_bundle(v2, CLS, [EDGE], cfg, cloud, message_cap=CAP, bundle_key=bkey.public_key())
        wait_for(lambda: all(d.receiver.installed_version == 2 for d in devices), 20, message="v2 installed on all 5")
        elapsed = time.monotonic() - start
        print(f"push of {report.size} B in {report.chunks} chunks to 5 devices: {elapsed:.2f} s")
        assert report.chunks >= 4 and report.size > 50_000
        assert dropped.is_set()
        for i, d in enumerate(devices):
            assert [r.outcome for r in d.receiver.results] == ["installed"]
            assert load_bundle(tmp_path / f"dev{i}" / "current", bkey.public_key()).version == 2
            assert load_bundle(tmp_path / f"dev{i}" / "previous", bkey.public_key()).version == 1
        # the resumed device asked again only for the chunks it still missed
        resumed = [r for r in devices[4].subscribe_requests[requests_at_drop[0]:] if "/chunk/" in r[0]]
        assert resumed and set(resumed[0]) <= {bundle_chunk_topic(EDGE, CLS, i) for i in range(2, report.chunks)}

        # a downgrade is refused and nothing changes
        push_bundle(v1, CLS, [EDGE], cfg, cloud, message_cap=CAP)
        wait_for(lambda: all(len(d.receiver.results) == 2 for d in devices), 20, message="the downgrade's verdicts")
        assert all(d.receiver.results[-1].reason == "DOWNGRADE" and d.receiver.installed_version == 2
                   for d in devices)

        # a tampered chunk (right header, flipped byte) is refused: the archive fails the signed hash
        v3 = make_bundle(tmp_path, source, bkey, 3)
        manifest, chunks = plan_push(pack_bundle(v3), CLS, cloud, 16_000)
        bad = bytearray(chunks[1].data)
        bad[100] ^= 0xFF
        chunks[1] = dataclasses.replace(chunks[1], data=bytes(bad))
        publish_push(_client(broker), [EDGE], manifest, chunks, CAP)
        wait_for(lambda: all(len(d.receiver.results) == 3 for d in devices), 20, message="the tampered push's verdicts")
        assert all(d.receiver.results[-1].outcome == "refused" and d.receiver.results[-1].reason == "BAD_HASH"
                   and d.receiver.installed_version == 2 for d in devices)

        # the genuine push of the same version then goes through, over the tampered retained chunks
        push_bundle(v3, CLS, [EDGE], cfg, cloud, message_cap=CAP)
        wait_for(lambda: all(d.receiver.installed_version == 3 for d in devices), 20, message="v3 installed on all 5")
        for d in devices:
            d.stop()


def _client(broker):
    from cloud.push import connect

    return connect(ConnectionConfig(host=broker.host, port=broker.port), "tamperer")


class Feed:
    """An OtaReceiver without MQTT: records subscriptions, delivers retained messages on subscribe."""

    def __init__(self, tmp: Path, keys, samples=None):
        self.retained: dict[str, bytes] = {}
        self.rx = OtaReceiver(OtaConfig(EDGE, CLS, tmp / "dev"), keys["cloud"].public_key(),
                              keys["bundle"].public_key(), self.subscribe, lambda _names: None,
                              samples=lambda: samples)

    def subscribe(self, names):
        self.pending = [n for n in names if n in self.retained]

    def push(self, bundle_dir: Path, key, **kw):
        manifest, chunks = plan_push(pack_bundle(bundle_dir), CLS, key, 8000, **kw)
        for c in chunks:
            self.retained[bundle_chunk_topic(EDGE, CLS, c.index)] = encode(c)
        self.retained[bundle_manifest_topic(EDGE, CLS)] = encode(manifest)
        self.pending = []
        self.rx.handle(bundle_manifest_topic(EDGE, CLS), encode(manifest))
        result = None
        for name in self.pending:
            result = self.rx.handle(name, self.retained[name]) or result
        return result


def test_smoke_failure_rolls_back_and_forced_downgrade(tmp_path, keys, source):
    bkey = keys["bundle"]
    feed = Feed(tmp_path, keys, samples=np.zeros((3, 100, 6), np.float32))
    assert feed.push(make_bundle(tmp_path, source, bkey, 1), keys["cloud"]).outcome == "installed"
    assert feed.push(make_bundle(tmp_path, source, bkey, 2), keys["cloud"]).outcome == "installed"
    # validly signed, but the model does not load: refused BEFORE install (nothing written, so no rollback can
    # ever bring it back), and its hash is remembered: the retained push is not downloaded again
    broken = make_bundle(tmp_path, source, bkey, 3, model_bytes=b"\0" * 60_000)
    result = feed.push(broken, keys["cloud"])
    assert result.outcome == "refused" and result.reason == "MALFORMED" and feed.rx.installed_version == 2
    assert load_bundle(tmp_path / "dev" / "current", bkey.public_key()).version == 2
    assert load_bundle(tmp_path / "dev" / "previous", bkey.public_key()).version == 1
    assert feed.push(broken, keys["cloud"]) is None and feed.pending == [] and len(feed.rx.results) == 3
    # a downgrade goes through only when the signed manifest says force
    assert feed.push(make_bundle(tmp_path, source, bkey, 1), keys["cloud"], force=True).outcome == "installed"
    assert feed.rx.installed_version == 1


def test_local_rows_that_do_not_fit_the_model_are_refused_before_install(tmp_path, keys, source):
    feed = Feed(tmp_path, keys, samples=np.zeros((3, 50, 6), np.float32))
    result = feed.push(make_bundle(tmp_path, source, keys["bundle"], 1), keys["cloud"])
    assert result.outcome == "refused" and result.reason == "BAD_SHAPE" and feed.rx.installed is None
    assert not (tmp_path / "dev" / "current").exists() and not (tmp_path / "dev" / "previous").exists()


def test_manifest_signed_by_another_key_or_class_is_ignored(tmp_path, keys, source):
    feed = Feed(tmp_path, keys)
    v1 = make_bundle(tmp_path, source, keys["bundle"], 1)
    assert feed.push(v1, generate_signing_key()) is None  # not the cloud's signature
    manifest, _ = plan_push(pack_bundle(v1), "pi", keys["cloud"], 8000)
    feed.rx.handle(bundle_manifest_topic(EDGE, CLS), encode(manifest))  # signed, but for another class
    assert feed.rx.transfer is None and feed.rx.installed is None
    # a bundle signed by a key the device does not trust is refused after reassembly
    assert feed.push(make_bundle(tmp_path, source, generate_signing_key(), 1), keys["cloud"]).reason == "BAD_SIGNATURE"
    # a manifest whose (signed) numbers do not add up is refused before any download
    bad = sign_message(dataclasses.replace(manifest, device_class=CLS, total=manifest.total + 1), keys["cloud"])
    feed.rx.handle(bundle_manifest_topic(EDGE, CLS), encode(bad))
    assert feed.rx.transfer is None


def test_push_cli(tmp_path, keys, source, broker, capsys):
    from fediomt.cli import main
    from protocol.signing import save_private_key, save_public_key

    save_private_key(keys["cloud"], tmp_path / "cloud.key")
    save_public_key(keys["bundle"].public_key(), tmp_path / "bundle.pub")
    v1 = make_bundle(tmp_path, source, keys["bundle"], 1)
    device = OtaClient("d", ConnectionConfig(host=broker.host, port=broker.port),
                       OtaConfig(EDGE, CLS, tmp_path / "dev"), keys["cloud"].public_key(),
                       keys["bundle"].public_key()).start()
    try:
        assert device.conn.connected.wait(10)
        common = ["push", str(v1), "--class", CLS, "--edge", EDGE, "--key", str(tmp_path / "cloud.key"),
                  "--host", broker.host, "--port", str(broker.port), "--pubkey", str(tmp_path / "bundle.pub")]
        # a chunk that would not fit the broker's cap is refused before anything is published
        assert main([*common, "--max-message-bytes", "16384", "--chunk-bytes", "20000"]) == 1
        assert "exceeds the broker cap" in capsys.readouterr().err
        assert main([*common, "--max-message-bytes", "16384"]) == 0
        pushed = json.loads(capsys.readouterr().out.splitlines()[0])
        fewest = -(-pushed["size"] // 16384)   # chunks under the 16 KiB cap, each nearly full (a chunk's envelope)
        assert pushed["size"] > 0 and fewest <= pushed["chunks"] <= fewest + 1
        wait_for(lambda: device.receiver.installed_version == 1, 20, message="v1 installed")
        # a bundle that does not verify against --pubkey is not pushed at all
        other = make_bundle(tmp_path / "other", source, generate_signing_key(), 2)
        assert main([*common[:1], str(other), *common[2:]]) == 1
    finally:
        device.stop()


def test_push_on_the_cloud_broker_reaches_a_device_through_the_edge_bridge(tmp_path, keys, source):
    """Production path (docs/deployment.md): the cloud publishes on its broker, each edge broker bridges
    fl/E/bundles/# in (MQTT 5 keeps the retain flag), and the edge broker has the 16 KB cap."""
    bkey = keys["bundle"]
    with MosquittoBroker(workdir=tmp_path / "cloud-mq") as cloud_mq, MosquittoBroker(
            workdir=tmp_path / "edge-mq", extra_config=[
                "connection bridge-edge1", f"address 127.0.0.1:{cloud_mq.port}", "bridge_protocol_version mqttv50",
                "remote_clientid bridge-edge1", "cleansession false", "try_private true",
                f"topic fl/{EDGE}/bundles/# in 1", f"message_size_limit {CAP}"]) as edge_mq:
        push_bundle(make_bundle(tmp_path, source, bkey, 1), CLS, [EDGE],
                    ConnectionConfig(host=cloud_mq.host, port=cloud_mq.port), keys["cloud"], message_cap=CAP)
        # the device connects only after the push: everything it needs is retained on its edge broker
        device = OtaClient("late", ConnectionConfig(host=edge_mq.host, port=edge_mq.port),
                           OtaConfig(EDGE, CLS, tmp_path / "dev"),
                           keys["cloud"].public_key(), bkey.public_key()).start()
        try:
            wait_for(lambda: device.receiver.installed_version == 1, 20, message="v1 installed")
        finally:
            device.stop()
