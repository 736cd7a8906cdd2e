"""Over-the-air bundle updates on the device: receive, verify, install atomically, smoke-test, roll back.

The cloud (`fediomt push`, cloud/push.py) publishes a bundle as retained Chunk messages on
`fl/{edge}/bundles/{class}/chunk/{i}` and then a signed, retained BundleManifest on `.../manifest`. A device
subscribes the manifest only. A manifest that is new (and newer than what is installed, unless `force`) starts a
transfer: the device subscribes exactly the chunk topics it still misses, so the broker replays those retained
chunks. After a disconnect, the retained manifest comes back on the re-subscription and the device re-requests only
the missing chunks (the parts already received stay in memory); a stalled transfer is re-requested every
`retry_s` (`tick`). Nothing is installed before the whole archive matches the manifest's SHA-256, the bundle's own
signature verifies, the version order holds, the device can use it (`accept`: e.g. a training device refuses an
int8 student) and it passes the smoke test (it loads, and inference on a few local rows gives finite logits of the
right shape). A bundle refused then is never written, so no rollback can bring it back, and its archive hash is
remembered (device.flash's ota.json) so a retained push of it is not downloaded again. The install is
`fediomt flash`'s (DEST/current + DEST/previous); the installed copy is smoke-tested again; on failure it is rolled
back, pinned and deleted. A pinned version (a rollback's) is refused until a newer one arrives. An empty retained
manifest (`fediomt push --withdraw`) withdraws a push: a transfer in progress is abandoned.

`OtaReceiver` is the core (no MQTT: it is fed messages and calls `subscribe`/`unsubscribe`); `OtaClient` wraps it
in its own protocol.mqtt.Connection for devices that only run a student, tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.flash import (
    CURRENT,
    PREVIOUS,
    check_downgrade,
    flash_local,
    load_installed,
    ota_state,
    remember_refused,
    rollback_local,
)
from device.runtime import Int8Model, TrainableModel
from protocol import topics
from protocol.bundle import MAX_ARCHIVE_BYTES, Bundle, unpack_files, verify_files
from protocol.chunking import PART_OVERHEAD, Reassembler
from protocol.errors import ProtocolError, Reason
from protocol.logs import event
from protocol.messages import BundleManifest, Chunk, decode, verify_raw
from protocol.mqtt import Connection, ConnectionConfig

SMOKE_ROWS = 8


@dataclass(frozen=True)
class OtaConfig:
    """What an OtaReceiver needs: the edge and class to follow, where bundles install, retry and size limits."""

    edge: str
    device_class: str                        # the class whose bundles this device installs ("wearable", "pi")
    bundle_dir: Path                         # DEST of `fediomt flash`: current/ and previous/ live here
    retry_s: float = 10.0                    # re-request missing chunks after this long without progress
    max_attempts: int = 3                    # reassemblies of one transfer that fail its hash before giving up
    max_bundle_bytes: int = MAX_ARCHIVE_BYTES


@dataclass(frozen=True)
class OtaResult:
    """What became of one announced bundle: "installed", "rolled_back" or "refused" (with a Reason)."""

    outcome: str
    name: str
    version: int
    reason: str = "OK"
    detail: str = ""


def smoke_test(bundle: Bundle, samples: np.ndarray | None) -> None:
    """Load the model and run inference on a few rows (zeros of the input shape when the device has none);
    raise ProtocolError unless the logits are finite and shaped (rows, n_classes)."""
    manifest = bundle.manifest
    shape = tuple(manifest["input"]["shape"])
    rows = np.zeros((2, *shape), np.float32) if samples is None or len(samples) == 0 else samples[:SMOKE_ROWS]
    rows = np.asarray(rows, np.float32)
    if rows.shape[1:] != shape:
        raise ProtocolError(Reason.BAD_SHAPE, f"local rows {rows.shape[1:]} do not fit the model input {shape}")
    try:
        if manifest["kind"] == "int8_student":
            logits = Int8Model(bundle.model_bytes).infer(rows)
        else:
            logits = TrainableModel(bundle.model_bytes, manifest).infer(rows)
    except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises on a model it cannot run
        raise ProtocolError(Reason.MALFORMED, f"smoke inference failed: {type(exc).__name__}: {exc}") from None
    if np.shape(logits) != (len(rows), manifest["n_classes"]) or not np.all(np.isfinite(logits)):
        raise ProtocolError(Reason.NON_FINITE, f"smoke inference gave logits of shape {np.shape(logits)}, "
                                               "or non-finite values")


def _reassembler(m: BundleManifest) -> Reassembler:
    """One transfer, sized for exactly this manifest, never timed out (a transfer may span disconnections)."""
    return Reassembler(timeout_s=float("inf"), max_total_bytes=m.size + PART_OVERHEAD * m.total, max_transfers=1)


@dataclass
class _Transfer:
    manifest: BundleManifest
    reassembler: Reassembler
    received: set[int]
    last_progress: float
    attempts: int = 1


class OtaReceiver:
    """One device's OTA state machine. `handle(topic, payload)` for every message on `topics()` and on the chunk
    topics it subscribes; `on_connect()` after every (re)connection; `tick()` now and then. Not thread-safe: call
    it from one thread (the agent's main loop, or paho's network thread in OtaClient)."""

    def __init__(self, cfg: OtaConfig, manifest_key: Ed25519PublicKey, bundle_key: Ed25519PublicKey,
                 subscribe: Callable[[list[str]], None], unsubscribe: Callable[[list[str]], None],
                 samples: Callable[[], np.ndarray | None] | None = None,
                 on_installed: Callable[[Bundle], None] | None = None,
                 on_result: Callable[[OtaResult], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 accept: Callable[[Bundle], None] | None = None,
                 log: logging.Logger | None = None) -> None:
        self.cfg, self.manifest_key, self.bundle_key = cfg, manifest_key, bundle_key
        self._accept = accept  # raises ProtocolError for a bundle this device cannot use (checked before install)
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self._samples, self._on_installed, self._on_result = samples, on_installed, on_result
        self._on_progress = on_progress
        self.log = log or logging.getLogger("fediomt.ota")
        self.manifest_topic = topics.bundle_manifest_topic(cfg.edge, cfg.device_class)
        self.transfer: _Transfer | None = None
        self.finished: set[bytes] = set()    # transfer ids done with (installed, refused or abandoned)
        self.results: list[OtaResult] = []
        self.installed: Bundle | None = self._load_installed()

    # ------------------------------------------------------------------ public
    @property
    def installed_version(self) -> int:
        """The installed bundle's version (0 when none): what the agent reports in DeviceStatus.bundle_version."""
        return self.installed.version if self.installed is not None else 0

    def topics(self) -> list[str]:
        return [self.manifest_topic]

    def on_connect(self) -> None:
        """Subscribe the manifest; the broker replays the retained one, which re-requests what is missing."""
        self._subscribe([self.manifest_topic])

    def handle(self, topic: str, payload: bytes) -> OtaResult | None:
        """Process one message; bad input is refused (logged, recorded when it ends a transfer), never raised."""
        try:
            if topic == self.manifest_topic:
                return self._withdrawn() if not payload else self._on_manifest(payload)
            if topic.startswith(self.manifest_topic.rsplit("/", 1)[0] + "/chunk/"):
                return self._on_chunk(topic, payload)
        except ProtocolError as exc:
            event(self.log, "ota refused a message", logging.WARNING, topic=topic, reason=exc.reason.name,
                  detail=exc.detail)
        return None

    def tick(self, now: float | None = None) -> None:
        """Re-request the missing chunks of a transfer that made no progress for retry_s."""
        now = time.monotonic() if now is None else now
        t = self.transfer
        if t is not None and now - t.last_progress >= self.cfg.retry_s:
            t.last_progress = now
            self._request_missing(t)

    # ------------------------------------------------------------------ manifest and chunks
    def _withdrawn(self) -> None:
        """The class's retained push was withdrawn (`fediomt push --withdraw`): stop downloading it."""
        if self.transfer is not None:
            m = self.transfer.manifest
            self._abandon()
            event(self.log, "ota push withdrawn: transfer abandoned", logging.WARNING, name=m.name, version=m.version)
        return None

    def _on_manifest(self, payload: bytes) -> OtaResult | None:
        m = decode(payload, expect=BundleManifest)
        verify_raw(payload, m, self.manifest_key)
        tid = bytes(m.transfer_id)
        if tid in self.finished:
            return None
        if self.transfer is not None and bytes(self.transfer.manifest.transfer_id) == tid:
            self._request_missing(self.transfer)  # a reconnection: ask only for what is still missing
            return None
        self._check_manifest(m)
        if not self._wanted(m):
            self.finished.add(tid)
            return None
        self._abandon()
        self.transfer = _Transfer(m, _reassembler(m), set(), time.monotonic())
        event(self.log, "ota transfer started", name=m.name, version=m.version, size=m.size, chunks=m.total)
        self._request_missing(self.transfer)
        return None

    def _check_manifest(self, m: BundleManifest) -> None:
        if m.device_class != self.cfg.device_class:
            raise ProtocolError(Reason.BAD_VALUE, f"manifest for class {m.device_class!r} on {self.manifest_topic}")
        if m.size > self.cfg.max_bundle_bytes:
            raise ProtocolError(Reason.TOO_LARGE, f"bundle of {m.size} bytes (limit {self.cfg.max_bundle_bytes})")
        if m.total != max(1, -(-m.size // m.chunk_size)):
            raise ProtocolError(Reason.BAD_SHAPE, f"{m.total} chunks of {m.chunk_size} cannot hold {m.size} bytes")

    def _wanted(self, m: BundleManifest) -> bool:
        """Newer than the installed bundle of the same name (or forced); a downgrade is refused and recorded."""
        state = ota_state(self.cfg.bundle_dir)
        if bytes(m.sha256).hex() in state["refused"]:
            return False  # refused before (unusable here): not downloaded again
        pinned = state["pinned"].get(m.name)
        if pinned is not None and m.version <= pinned:
            self._record(OtaResult("refused", m.name, m.version, Reason.DOWNGRADE.name,
                                   f"v{m.version} is pinned out (rolled back from v{pinned}) until a newer version"))
            return False
        have = self.installed
        if have is None or have.name != m.name or m.force or m.version > have.version:
            return True
        if m.version < have.version:
            self._record(OtaResult("refused", m.name, m.version, Reason.DOWNGRADE.name,
                                   f"v{m.version} is older than the installed v{have.version}"))
        return False

    def _on_chunk(self, topic: str, payload: bytes) -> OtaResult | None:
        t = self.transfer
        if t is None or not payload:
            return None
        chunk = decode(payload, expect=Chunk)
        m = t.manifest
        if bytes(chunk.transfer_id) != bytes(m.transfer_id):
            return None  # a stale retained chunk of an earlier push
        if (bytes(chunk.sha256), chunk.total, chunk.total_size) != (bytes(m.sha256), m.total, m.size):
            raise ProtocolError(Reason.BAD_HASH, f"chunk {chunk.index} disagrees with the signed manifest")
        if topic != topics.bundle_chunk_topic(self.cfg.edge, self.cfg.device_class, chunk.index):
            raise ProtocolError(Reason.BAD_INDEX, f"chunk {chunk.index} arrived on {topic}")
        if chunk.index in t.received:
            return None
        try:
            archive = t.reassembler.add(chunk)
        except ProtocolError as exc:
            return self._failed_reassembly(t, exc)
        t.received.add(chunk.index)
        t.last_progress = time.monotonic()
        self._unsubscribe([topic])
        if self._on_progress is not None:
            self._on_progress(len(t.received), m.total)
        return None if archive is None else self._complete(t, archive)

    def _failed_reassembly(self, t: _Transfer, exc: ProtocolError) -> OtaResult | None:
        """The parts do not add up to the signed hash (a tampered or corrupt chunk): start over, a few times."""
        m = t.manifest
        event(self.log, "ota reassembly failed", logging.WARNING, name=m.name, version=m.version,
              reason=exc.reason.name, detail=exc.detail, attempt=t.attempts)
        if t.attempts >= self.cfg.max_attempts:
            self._abandon()
            self.finished.add(bytes(m.transfer_id))
            return self._record(OtaResult("refused", m.name, m.version, exc.reason.name, exc.detail))
        t.attempts += 1
        t.reassembler = _reassembler(m)
        t.received.clear()
        detail = f"attempt {t.attempts - 1}: {exc.detail}; re-requesting after {self.cfg.retry_s} s"
        return self._record(OtaResult("refused", m.name, m.version, exc.reason.name, detail))

    def _request_missing(self, t: _Transfer) -> None:
        missing = [i for i in range(t.manifest.total) if i not in t.received]
        if missing:
            self._subscribe([topics.bundle_chunk_topic(self.cfg.edge, self.cfg.device_class, i) for i in missing])

    def _abandon(self) -> None:
        t, self.transfer = self.transfer, None
        if t is not None:
            self._unsubscribe([topics.bundle_chunk_topic(self.cfg.edge, self.cfg.device_class, i)
                               for i in range(t.manifest.total) if i not in t.received])

    # ------------------------------------------------------------------ install
    def _complete(self, t: _Transfer, archive: bytes) -> OtaResult:
        m = t.manifest
        self.transfer = None
        self.finished.add(bytes(m.transfer_id))
        try:
            if hashlib.sha256(archive).digest() != bytes(m.sha256) or len(archive) != m.size:
                raise ProtocolError(Reason.BAD_HASH, "archive does not match the signed manifest")
            bundle = verify_files(unpack_files(archive), self.bundle_key)
            if (bundle.name, bundle.version) != (m.name, m.version):
                raise ProtocolError(Reason.MALFORMED, f"archive holds {bundle.name} v{bundle.version}, manifest "
                                                      f"announced {m.name} v{m.version}")
            check_downgrade(bundle, self.installed, m.force)
            try:  # can this device use it? checked on the verified bytes, before anything is written
                if self._accept is not None:
                    self._accept(bundle)
                smoke_test(bundle, self._samples() if self._samples is not None else None)
            except ProtocolError:
                remember_refused(self.cfg.bundle_dir, bytes(m.sha256).hex())
                raise
            root = Path(self.cfg.bundle_dir)
            flash_local(bundle, root, self.bundle_key, force=m.force)
        except (ProtocolError, OSError) as exc:
            reason, detail = (exc.reason.name, exc.detail) if isinstance(exc, ProtocolError) else ("IO_ERROR", str(exc))
            return self._record(OtaResult("refused", m.name, m.version, reason, detail))
        try:
            installed = load_installed(root, self.bundle_key)  # the copy on the medium is what must run
            smoke_test(installed, self._samples() if self._samples is not None else None)
        except ProtocolError as exc:
            if (root / PREVIOUS).is_dir():
                rollback_local(root)  # pins the bad version too
            else:  # nothing was installed before: there is nothing to roll back to
                (root / CURRENT).rename(root / PREVIOUS)
            shutil.rmtree(root / PREVIOUS, ignore_errors=True)  # never leave the bad bundle to roll back to
            remember_refused(root, bytes(m.sha256).hex())
            self.installed = self._load_installed()
            return self._record(OtaResult("rolled_back", m.name, m.version, exc.reason.name, exc.detail))
        self.installed = installed
        if self._on_installed is not None:
            self._on_installed(installed)
        return self._record(OtaResult("installed", m.name, m.version))

    def _load_installed(self) -> Bundle | None:
        root = Path(self.cfg.bundle_dir)
        if not (root / CURRENT).exists() and not (root / PREVIOUS).exists():
            return None
        return load_installed(root, self.bundle_key)

    def _record(self, result: OtaResult) -> OtaResult:
        self.results.append(result)
        event(self.log, f"ota {result.outcome}", logging.INFO if result.outcome == "installed" else logging.WARNING,
              name=result.name, version=result.version, reason=result.reason, detail=result.detail[:200])
        if self._on_result is not None:
            self._on_result(result)
        return result


class OtaClient:
    """An OtaReceiver on its own Connection (for devices that only run a student, tests and benchmarks); messages
    and reconnections reach the receiver on paho's thread, one at a time."""

    def __init__(self, client_id: str, broker: ConnectionConfig, cfg: OtaConfig, manifest_key: Ed25519PublicKey,
                 bundle_key: Ed25519PublicKey, **receiver_options) -> None:
        self._lock = threading.Lock()
        self.subscribe_requests: list[list[str]] = []  # what the receiver asked for, in order (resume evidence)
        self.conn = Connection(broker, client_id, [], None, logging.getLogger("fediomt.ota"),
                               on_message=lambda topic, payload: self._locked(self.receiver.handle, topic, payload),
                               on_connected=lambda: self._locked(self.receiver.on_connect))
        self.receiver = OtaReceiver(cfg, manifest_key, bundle_key, self._subscribe, self.conn.unsubscribe,
                                    **receiver_options)

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def _subscribe(self, names: list[str]) -> None:
        self.subscribe_requests.append(list(names))
        self.conn.subscribe(names)

    def start(self, stop: threading.Event | None = None) -> OtaClient:
        """Connect (retrying with back-off until `stop` is set) and start receiving."""
        self.conn.start(stop)
        return self

    def tick(self) -> None:
        self._locked(self.receiver.tick)

    def stop(self) -> None:
        self.conn.close()
