"""`fediomt push BUNDLE --class wearable --edge EDGE`: publish a signed model bundle over MQTT to every device of a
class (OTA), and `push_bundle(...)` for automatic pushes after distillation.

Design (docs/distillation.md): the packed bundle (protocol.bundle.pack_bundle) is split into Chunk messages that
each fit the broker's message cap and published RETAINED on `fl/{edge}/bundles/{class}/chunk/{i}`; then a signed,
retained BundleManifest (name, version, size, SHA-256, chunk size, count, transfer id, force) goes to
`fl/{edge}/bundles/{class}/manifest`. Chunks go first, so a device that sees the manifest finds every chunk
retained; it subscribes the ones it misses (resume after a disconnect = re-subscribe the missing indices). One
publish per chunk serves the whole class, whatever the number of devices. Retained chunks that the previous,
larger bundle left beyond the new count are cleared (best effort: devices ignore chunks of other transfers).

`fediomt push --withdraw --class C --edge E` clears the class's retained manifest and chunks (an empty retained
manifest first, so devices abandon a transfer in progress), so that no device downloads that push again.

Which devices took it: before publishing, the push subscribes every edge's retained device statuses; devices of the
class (their status's compute class, the one class vocabulary of protocol.topics) that are not offline are the
ones expected, and each reports its OTA outcome as a status (`ota_installed`, `ota_refused`, `ota_rolled_back`,
detail "NAME vN: ..."). The report lists them after `wait_s`; no connected device of the class is a warning.

The cap matters: Mosquitto's `message_size_limit` drops (MQTT 3.1.1) or refuses (MQTT 5, where paho 2.2 then
reconnects and resends forever) an oversized message, so every encoded Chunk is checked against the cap here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol.bundle import MANIFEST_FILE, pack_bundle, unpack_files, verify_files
from protocol.chunking import chunk_data_size, split_payload
from protocol.errors import ProtocolError, Reason
from protocol.messages import BundleManifest, Chunk, DeviceStatus, decode, encode, sign_message
from protocol.mqtt import ConnectionConfig, new_client, role_connection
from protocol.signing import load_private_key, load_public_key
from protocol.topics import (
    ANY,
    DEVICE_CLASSES,
    bundle_chunk_topic,
    bundle_manifest_topic,
    check_class,
    check_id,
    status_topic,
)

DEFAULT_MESSAGE_CAP = 64 * 1024   # bytes per MQTT message; set to the broker's message_size_limit
STALE_LOOKUP_S = 0.3              # how long to wait for a previous retained manifest after the SUBACK


@dataclass(frozen=True)
class PushReport:
    """What one OTA push did: which bundle, to which class and edges, in how many chunks and how long."""

    device_class: str
    edges: list[str]
    name: str
    version: int
    size: int            # bytes of the packed bundle
    chunks: int
    chunk_bytes: int     # data bytes per chunk
    transfer_id: str     # hex
    seconds: float
    cleared: int = 0     # stale retained chunks removed
    connected: list[str] = field(default_factory=list)   # devices of the class online when the push went out
    outcomes: dict[str, str] = field(default_factory=dict)  # device -> "installed" | "refused: REASON ..." | ...
    warnings: list[str] = field(default_factory=list)


def archive_of(bundle: str | os.PathLike | bytes) -> bytes:
    """A packed bundle: from a bundle directory, a packed file, or bytes."""
    if isinstance(bundle, bytes | bytearray):
        return bytes(bundle)
    path = Path(bundle)
    return pack_bundle(path) if path.is_dir() else path.read_bytes()


def plan_push(archive: bytes, device_class: str, key: Ed25519PrivateKey, chunk_bytes: int, force: bool = False,
              bundle_key=None, transfer_id: bytes | None = None) -> tuple[BundleManifest, list[Chunk]]:
    """The signed manifest and the chunks of one push (pure apart from the random transfer id).

    With `bundle_key` the bundle's own signature is checked first (so the cloud never pushes what devices refuse)."""
    check_class(device_class)
    files = unpack_files(archive)
    if bundle_key is not None:
        verify_files(files, bundle_key)
    try:
        inner = json.loads(files[MANIFEST_FILE])
        name, version = inner["name"], inner["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(Reason.MALFORMED, f"bundle manifest: {exc}") from None
    tid = transfer_id or os.urandom(16)
    chunks = split_payload(archive, chunk_bytes, tid)
    manifest = sign_message(BundleManifest(
        device_class=device_class, name=check_id(name), version=int(version), size=len(archive),
        sha256=hashlib.sha256(archive).digest(), chunk_size=chunk_bytes, total=len(chunks), transfer_id=tid,
        force=force, timestamp=time.time()), key)
    return manifest, chunks


def connect(broker: ConnectionConfig, client_id: str, timeout_s: float = 10.0) -> mqtt.Client:
    """A connected paho client (MQTT 5, clean session, network loop running)."""
    client = new_client(role_connection(broker, "push"), client_id)   # the cloud's push certificate, when mTLS
    ready = threading.Event()
    client.on_connect = lambda _c, _u, _f, rc, _p: ready.set() if not rc.is_failure else None
    client.connect(broker.host, broker.port, keepalive=broker.keepalive, clean_start=True)
    client.loop_start()
    if not ready.wait(timeout_s):
        client.loop_stop()
        raise ConnectionError(f"no connection to {broker.host}:{broker.port} within {timeout_s:.0f} s")
    return client


def previous_totals(client: mqtt.Client, manifest_topics: list[str], wait_s: float = STALE_LOOKUP_S) -> dict[str, int]:
    """Chunk counts of the retained manifests now on `manifest_topics` (unverified: only used to clear chunks)."""
    found: dict[str, int] = {}
    acked = threading.Event()

    def on_message(_c, _u, msg):
        try:
            found[msg.topic] = decode(msg.payload, expect=BundleManifest).total
        except ProtocolError:
            pass

    before = client.on_message
    client.on_message = lambda c, u, msg: on_message(c, u, msg) if msg.topic in manifest_topics else (
        before(c, u, msg) if before is not None else None)
    client.on_subscribe = lambda *_: acked.set()
    client.subscribe([(t, SubscribeOptions(qos=1)) for t in manifest_topics])
    acked.wait(wait_s * 10)
    time.sleep(wait_s)
    client.unsubscribe(manifest_topics)
    client.on_message = before
    return found


def _wait(infos: list[mqtt.MQTTMessageInfo], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for info in infos:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            raise TimeoutError(f"broker did not acknowledge a publish within {timeout_s:.0f} s")


def publish_push(client: mqtt.Client, edges: list[str], manifest: BundleManifest, chunks: list[Chunk],
                 message_cap: int, timeout_s: float = 60.0) -> int:
    """Publish chunks (retained, QoS 1, all acknowledged) then the manifest, per edge; clear stale chunks.
    Returns the number of stale chunks cleared."""
    payloads = [encode(c) for c in chunks]
    manifest_payload = encode(manifest)
    biggest = max(len(manifest_payload), *(len(p) for p in payloads))
    if biggest > message_cap:
        raise ValueError(f"a {biggest}-byte message exceeds the broker cap of {message_cap} bytes")
    cls = manifest.device_class
    old = previous_totals(client, [bundle_manifest_topic(e, cls) for e in edges])
    cleared = 0
    for edge in edges:
        _wait([client.publish(bundle_chunk_topic(edge, cls, i), p, qos=1, retain=True)
               for i, p in enumerate(payloads)], timeout_s)
        _wait([client.publish(bundle_manifest_topic(edge, cls), manifest_payload, qos=1, retain=True)], timeout_s)
        stale = range(len(chunks), old.get(bundle_manifest_topic(edge, cls), 0))
        _wait([client.publish(bundle_chunk_topic(edge, cls, i), b"", qos=1, retain=True) for i in stale], timeout_s)
        cleared += len(stale)
    return cleared


class FleetWatch:
    """The edges' device statuses (retained, then live) as a push goes out: who is of the class and connected,
    and each device's OTA outcome for one bundle version."""

    def __init__(self, client: mqtt.Client, edges: list[str], device_class: str) -> None:
        self.device_class = device_class
        self.last: dict[str, DeviceStatus] = {}
        self.outcomes: dict[str, str] = {}
        self.expect: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._filters = [status_topic(e, ANY) for e in edges]
        acked = threading.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: acked.set()
        client.subscribe([(t, SubscribeOptions(qos=1)) for t in self._filters])
        acked.wait(5)
        time.sleep(STALE_LOOKUP_S)  # the retained statuses arrive right after the SUBACK

    def _on_message(self, _c, _u, msg) -> None:
        try:
            status = decode(msg.payload, expect=DeviceStatus)
        except ProtocolError:
            return
        with self._lock:
            self.last[status.device_id] = status
            if self.expect is not None and status.state.startswith("ota_"):
                name, version = self.expect
                if status.detail.startswith(f"{name} v{version}:"):
                    outcome = status.state[4:]
                    reason = status.detail.split(":", 1)[1].strip()
                    self.outcomes[status.device_id] = outcome if outcome == "installed" else f"{outcome}: {reason}"

    def connected(self) -> list[str]:
        with self._lock:
            return sorted(d for d, s in self.last.items() if s.state != "offline" and s.capability is not None
                          and s.capability.compute_class == self.device_class)

    def wait(self, devices: list[str], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(d in self.outcomes for d in devices):
                    break
            time.sleep(0.05)
        with self._lock:
            return dict(self.outcomes)


def push_bundle(bundle: str | os.PathLike | bytes, device_class: str, edges: list[str], broker: ConnectionConfig,
                key: Ed25519PrivateKey, message_cap: int = DEFAULT_MESSAGE_CAP, chunk_bytes: int | None = None,
                force: bool = False, bundle_key=None, timeout_s: float = 60.0, wait_s: float = 0.0) -> PushReport:
    """Push a bundle (directory, packed file or bytes) to every device of `device_class` behind `edges`; with
    `wait_s` > 0, wait that long at most for every connected device of the class to report its outcome."""
    if not edges:
        raise ValueError("push needs at least one edge")
    archive = archive_of(bundle)
    size = chunk_bytes or chunk_data_size(message_cap)
    manifest, chunks = plan_push(archive, device_class, key, size, force, bundle_key)
    start = time.monotonic()
    client = connect(broker, f"push-{os.urandom(4).hex()}")
    try:
        watch = FleetWatch(client, [check_id(e) for e in edges], device_class)
        watch.expect = (manifest.name, manifest.version)
        connected = watch.connected()
        cleared = publish_push(client, [check_id(e) for e in edges], manifest, chunks, message_cap, timeout_s)
        outcomes = watch.wait(connected, wait_s) if wait_s > 0 else dict(watch.outcomes)
    finally:
        client.disconnect()
        client.loop_stop()
    warnings = []
    if not connected:
        warnings.append(f"no device of class {device_class!r} is connected behind {', '.join(edges)}: the push stays "
                        "retained for the devices that connect later")
    missing = [d for d in connected if d not in outcomes]
    if wait_s > 0 and missing:
        warnings.append(f"no outcome within {wait_s:g} s from {', '.join(missing)}")
    return PushReport(device_class, list(edges), manifest.name, manifest.version, len(archive), len(chunks), size,
                      bytes(manifest.transfer_id).hex(), time.monotonic() - start, cleared, connected, outcomes,
                      warnings)


def withdraw(device_class: str, edges: list[str], broker: ConnectionConfig, timeout_s: float = 60.0) -> dict:
    """Clear the class's retained push on every edge: an empty manifest first (devices abandon the transfer), then
    the chunks the previous manifest announced. Returns {edge: chunks cleared}."""
    check_class(device_class)
    client = connect(broker, f"push-{os.urandom(4).hex()}")
    try:
        topics_ = [bundle_manifest_topic(check_id(e), device_class) for e in edges]
        old = previous_totals(client, topics_)
        cleared = {}
        for edge, manifest_topic in zip(edges, topics_):
            _wait([client.publish(manifest_topic, b"", qos=1, retain=True)], timeout_s)
            n = old.get(manifest_topic, 0)
            _wait([client.publish(bundle_chunk_topic(edge, device_class, i), b"", qos=1, retain=True)
                   for i in range(n)], timeout_s)
            cleared[edge] = n
    finally:
        client.disconnect()
        client.loop_stop()
    return cleared


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle directory, or a packed bundle file")
    parser.add_argument("--class", dest="device_class", required=True, choices=DEVICE_CLASSES,
                        help="device class to update (the devices' [capability] compute_class / [ota] device_class)")
    parser.add_argument("--edge", action="append", required=True, help="edge id (repeat for several edges)")
    parser.add_argument("--key", type=Path,
                        help="Ed25519 private key (PEM) signing the manifest; devices verify it with the cloud key")
    parser.add_argument("--pubkey", type=Path, help="bundle-signing public key: verify the bundle before pushing")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--ca", type=Path, help="CA certificate (TLS)")
    parser.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="client certificate key (mTLS)")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MESSAGE_CAP,
                        help=f"the broker's message cap (default {DEFAULT_MESSAGE_CAP}); chunks fit under it")
    parser.add_argument("--chunk-bytes", type=int, help="data bytes per chunk (default: the most the cap allows)")
    parser.add_argument("--force", action="store_true", help="let devices install an older version (downgrade)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker's acks")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for the class's connected devices to report installed/refused")
    parser.add_argument("--withdraw", action="store_true",
                        help="clear the class's retained push on the edges instead (no BUNDLE, no --key)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    broker = ConnectionConfig(host=args.host, port=args.port, ca=args.ca, cert=args.cert, key=args.tls_key,
                          username=args.username, password=args.password)
    try:
        if args.withdraw:
            cleared = withdraw(args.device_class, args.edge, broker, args.timeout)
            print(json.dumps({"withdrawn": args.device_class, "chunks_cleared": cleared}))
            return 0
        if args.bundle is None or args.key is None:
            raise ValueError("a push needs BUNDLE and --key")
        report = push_bundle(args.bundle, args.device_class, args.edge, broker, load_private_key(args.key),
                             args.max_message_bytes, args.chunk_bytes, args.force,
                             load_public_key(args.pubkey) if args.pubkey else None, args.timeout, args.wait)
    except (ProtocolError, OSError, ValueError, TimeoutError, ConnectionError) as exc:
        print(f"push failed: {exc}", file=sys.stderr)
        return 1
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(report.__dict__))
    return 0
