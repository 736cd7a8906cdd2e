"""Inference on the device: sensor windows in, the installed bundle's predictions out (no TensorFlow).

A device whose class runs a student (an `int8_student` bundle; any trainable bundle's `infer` signature works too)
classifies its own sensor windows and never trains: `fediomt device run` in inference mode (`mode = "infer"`, or
`"auto"` with an int8 bundle installed; a training agent in `"auto"` mode that receives a student over the air
switches to it) and `fediomt device predict BUNDLE INPUT` for one-off use.

Input, one window per line: the window's values flattened in row-major order (`input_shape`, e.g. 100 x 6 = 600
values for `wearable_cnn`), separated by commas and/or whitespace, or as a JSON array (nested or flat). Blank lines
and lines starting with `#` are skipped; a line that does not hold exactly one window is logged and skipped. The
source is a regular file (read to its end, then followed as it grows when `follow`), a FIFO (reopened when its
writer closes it, when `follow`) or stdin (`-`). `predict` also reads `.npy` and `.npz` (`x`, optional `y`) files.

Output, one JSON object per window (`Prediction.as_dict`): device, sequence number, wall time, predicted class,
its softmax confidence, the bundle name/version that made it and the interpreter's latency; appended to a file,
written to stdout, and/or published (QoS 0, not retained) on `protocol.topics.prediction_topic(edge, id)`.
Predictions are health data: publish them only to a broker on the device's own (or the ward's) network.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from device.config import DeviceConfig, ota_class
from device.flash import CURRENT, PREVIOUS, load_installed
from device.ota import OtaConfig as OtaReceiverConfig
from device.ota import OtaReceiver
from device.runtime import Int8Model, TrainableModel
from device.state import STATE_FILE, load_state
from protocol import accountant, topics
from protocol.bundle import Bundle
from protocol.errors import ProtocolError, Reason
from protocol.features import FeatureTransform
from protocol.logs import event
from protocol.messages import Capability, DeviceStatus, encode
from protocol.mqtt import Connection
from protocol.signing import load_public_key

INFERENCE_KINDS = ("int8_student", "trainable")


class Predictor:
    """A bundle's inference: Int8Model for an int8 student, the trainable model's `infer` signature otherwise."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None) -> None:
        m = bundle.manifest
        if m["kind"] not in INFERENCE_KINDS:
            raise ProtocolError(Reason.BAD_VALUE, f"bundle kind {m['kind']!r} cannot run inference")
        self.bundle = bundle
        self.input_shape = tuple(int(d) for d in m["input"]["shape"])
        self.n_classes = int(m["n_classes"])
        self.labels = list(m.get("labels") or [])
        # the federation's feature transform (protocol.features), when the model was trained on standardised raw
        # columns: inputs are then raw rows (the schema's order) and go through the same transform as in training
        self.features = FeatureTransform.from_dict(m["features"]) if m.get("features") else None
        if m["kind"] == "int8_student":
            self.model = Int8Model(bundle.model_bytes, num_threads=num_threads)
        else:
            self.model = TrainableModel(bundle.model_bytes, m, num_threads=num_threads)

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.features is not None:
            x = self.features.apply(x.reshape(len(x), -1)).reshape(len(x), *x.shape[1:])
        if x.shape[1:] != self.input_shape:
            raise ProtocolError(Reason.BAD_SHAPE, f"windows of shape {x.shape[1:]}, the model takes {self.input_shape}")
        return self.model.infer(x)


@dataclass(frozen=True)
class Prediction:
    """One classified window."""

    seq: int
    label: int
    confidence: float
    bundle: str
    version: int
    latency_us: float
    timestamp: float
    device: str = ""
    name: str = ""        # the class's name when the bundle's manifest has `labels`

    def as_dict(self) -> dict:
        out = {"device": self.device, "seq": self.seq, "t": round(self.timestamp, 3), "class": self.label,
               "confidence": round(self.confidence, 4), "bundle": self.bundle, "version": self.version,
               "latency_us": round(self.latency_us, 1)}
        if self.name:
            out["label"] = self.name
        return out


def classify(predictor: Predictor, windows: np.ndarray, first_seq: int = 0, device: str = "") -> list[Prediction]:
    """Classify a batch of windows; the latency is the interpreter's time per window of this batch."""
    start = time.perf_counter()
    logits = predictor.logits(windows)
    per_window = (time.perf_counter() - start) * 1e6 / max(len(windows), 1)
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    now, b = time.time(), predictor.bundle
    out = []
    for i, p in enumerate(probs):
        label = int(np.argmax(p))
        name = predictor.labels[label] if label < len(predictor.labels) else ""
        out.append(Prediction(first_seq + i, label, float(p[label]), b.name, b.version, per_window, now, device, name))
    return out


def parse_window(line: str, input_shape: tuple[int, ...]) -> np.ndarray | None:
    """One input line -> a float32 window of `input_shape`; None for a blank/comment line; ValueError if bad."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("["):
        values = np.asarray(json.loads(text), np.float32).reshape(-1)
    else:
        values = np.asarray(text.replace(",", " ").split(), np.float32)
    if values.size != int(np.prod(input_shape)):
        raise ValueError(f"{values.size} values, a window of {input_shape} has {int(np.prod(input_shape))}")
    if not np.all(np.isfinite(values)):
        raise ValueError("non-finite values")
    return values.reshape(input_shape)


def lines(source: str, follow: bool, stop: threading.Event, poll_s: float = 0.1) -> Iterator[str]:
    """Lines of a file, FIFO or stdin ("-"), as they come. A regular file is followed as it grows and a FIFO
    reopened after its writer closes it when `follow`; stdin ends at EOF."""
    if source == "-":
        yield from _lines_of(sys.stdin, stop)
        return
    path = Path(source)
    while not stop.is_set():
        fifo = path.exists() and stat.S_ISFIFO(os.stat(path).st_mode)
        if not path.exists():
            if not follow:
                raise FileNotFoundError(source)
            stop.wait(poll_s)
            continue
        with open(path, encoding="utf-8", errors="replace") as f:  # a FIFO blocks here until a writer opens it
            if fifo:
                yield from _lines_of(f, stop)
            else:
                partial = ""
                while not stop.is_set():
                    chunk = f.readline()
                    if chunk.endswith("\n"):
                        yield partial + chunk
                        partial = ""
                    elif chunk:
                        partial += chunk  # a line still being written: wait for its end
                    elif not follow:
                        if partial:
                            yield partial
                        return
                    else:
                        stop.wait(poll_s)
                return
        if not follow:
            return


def _lines_of(f: TextIO, stop: threading.Event) -> Iterator[str]:
    for line in f:
        yield line
        if stop.is_set():
            return


def open_output(target: str) -> TextIO | None:
    if not target:
        return None
    if target == "-":
        return sys.stdout
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    return open(target, "a", encoding="utf-8", buffering=1)


class InferenceAgent:
    """`fediomt device run` in inference mode: follows OTA pushes for its class (any inference-capable bundle),
    classifies the windows read from `[inference] input` and writes/publishes the predictions. Starts without a
    bundle too (mode "infer": the input is not read until a push installed one). Never trains: spends no budget."""

    def __init__(self, cfg: DeviceConfig, log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.cloud_key = load_public_key(cfg.cloud_pubkey)
        self.bundle_key = load_public_key(cfg.bundle_pubkey)
        self.stop = threading.Event()
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.windows: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=4096)
        self.predictor: Predictor | None = None
        root = Path(cfg.bundle_dir)
        if (root / CURRENT).exists() or (root / PREVIOUS).exists():
            self._use(load_installed(root, self.bundle_key))  # refuses a tampered bundle (exit 3 in the CLI)
        self.seq = self.dropped = self.bad_lines = 0
        self.epsilon = self._epsilon()
        self.status_topic = topics.status_topic(cfg.edge, cfg.id)
        self.prediction_topic = topics.prediction_topic(cfg.edge, cfg.id)
        self.link = Connection(cfg.broker, cfg.id, [], None, log, on_message=self._received,
                               on_connected=lambda: self.inbox.put(("", b"")),
                               will=(self.status_topic, self._status_bytes("offline")))
        self.ota = None
        if cfg.ota.enabled:
            ota_cfg = OtaReceiverConfig(edge=cfg.edge, device_class=ota_class(cfg), bundle_dir=root,
                                        retry_s=cfg.ota.retry_s)
            self.ota = OtaReceiver(ota_cfg, self.cloud_key, self.bundle_key, self.link.subscribe,
                                   self.link.unsubscribe, samples=self._smoke_rows, accept=accept_for_inference,
                                   on_installed=self._installed, on_result=self._ota_result, log=log)
        self.out = open_output(cfg.inference.output)

    # ------------------------------------------------------------------ model
    def _use(self, bundle: Bundle) -> None:
        self.predictor = Predictor(bundle, num_threads=self.cfg.threads)
        event(self.log, "inference model loaded", name=bundle.name, version=bundle.version,
              kind=bundle.manifest["kind"], input=list(self.predictor.input_shape))

    def _installed(self, bundle: Bundle) -> None:
        self._use(bundle)
        self.publish_status("online", f"inferring with {bundle.name} v{bundle.version}")

    def _ota_result(self, result) -> None:
        self.publish_status(f"ota_{result.outcome}", f"{result.name} v{result.version}: {result.reason} "
                                                     f"{result.detail}".strip())

    def _smoke_rows(self) -> np.ndarray | None:
        return None  # zeros of the bundle's input shape: an inference device keeps no data set

    # ------------------------------------------------------------------ status
    def _epsilon(self) -> float:
        """The privacy spent while this device trained (it spends nothing now), for its statuses."""
        try:
            history = load_state(self.cfg.state_dir / STATE_FILE).history
        except (OSError, ValueError, ProtocolError):
            return 0.0
        p = self.cfg.privacy
        return accountant.epsilon(history, p.delta, p.accountant)

    def _status_bytes(self, state: str, detail: str = "") -> bytes:
        c = self.cfg.capability
        b = self.predictor.bundle if self.predictor is not None else None
        return encode(DeviceStatus(
            device_id=self.cfg.id, edge_id=self.cfg.edge, state=state, model_version=0,
            bundle_version=b.version if b is not None else 0, epsilon_spent=self.epsilon,
            epsilon_budget=self.cfg.privacy.epsilon, timestamp=time.time(),
            capability=Capability(compute_class=c.compute_class, memory_mb=c.memory_mb,
                                  bandwidth_bps=c.bandwidth_bps, steps_per_s=c.steps_per_s),
            detail=detail[:256]))

    def publish_status(self, state: str, detail: str = "") -> None:
        self.link.publish(self.status_topic, self._status_bytes(state, detail), retain=True)
        event(self.log, "status", state=state[:32], detail=detail)

    # ------------------------------------------------------------------ input and output
    def _reader(self) -> None:
        cfg = self.cfg.inference
        if self.predictor is None:  # nothing read before a model is installed (a FIFO's writer waits meanwhile)
            event(self.log, "no model installed yet: waiting for a push before reading", logging.WARNING)
        while self.predictor is None and not self.stop.is_set():
            self.stop.wait(0.1)
        try:
            for line in lines(cfg.input, cfg.follow, self.stop):
                shape = self.predictor.input_shape
                try:
                    window = parse_window(line, shape)
                except ValueError as exc:
                    self.bad_lines += 1
                    event(self.log, "bad input line skipped", logging.WARNING, error=str(exc)[:200])
                    continue
                if window is not None:
                    self.windows.put(window)
        except OSError as exc:
            event(self.log, "input failed", logging.ERROR, input=cfg.input, error=f"{type(exc).__name__}: {exc}")
        event(self.log, "input ended", input=cfg.input)

    def _classify_waiting(self) -> int:
        batch = []
        while len(batch) < self.cfg.inference.batch:
            try:
                batch.append(self.windows.get_nowait())
            except queue.Empty:
                break
        if not batch or self.predictor is None:
            self.dropped += len(batch)
            return 0
        try:
            predictions = classify(self.predictor, np.stack(batch), self.seq, self.cfg.id)
        except ProtocolError as exc:  # windows shaped for the model before a push changed it
            self.dropped += len(batch)
            event(self.log, "windows not classified", logging.WARNING, reason=exc.reason.name, detail=exc.detail)
            return 0
        self.seq += len(predictions)
        for p in predictions:
            line = json.dumps(p.as_dict())
            if self.out is not None:
                self.out.write(line + "\n")
            if self.cfg.inference.publish:
                self.link.client.publish(self.prediction_topic, line.encode(), qos=0)
        if self.out is not None:
            self.out.flush()
        return len(predictions)

    # ------------------------------------------------------------------ loop
    def _received(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            if topic == "":
                b = self.predictor.bundle if self.predictor is not None else None
                self.publish_status("online", f"inferring with {b.name} v{b.version}" if b else "waiting for a bundle")
                if self.ota is not None:
                    self.ota.on_connect()
            elif self.ota is not None:
                self.ota.handle(topic, payload)
        except Exception:  # nothing that arrives may stop the device
            self.log.exception("unexpected error handling %s", topic)

    def run(self) -> int:
        event(self.log, "starting inference", device=self.cfg.id, edge=self.cfg.edge, input=self.cfg.inference.input,
              bundle=None if self.predictor is None else self.predictor.bundle.name,
              ota_class=self.ota.cfg.device_class if self.ota is not None else None)
        reader = threading.Thread(target=self._reader, daemon=True, name="inference-input")
        reader.start()
        if not self.link.start(self.stop):
            return 0
        try:
            while not self.stop.is_set():
                try:
                    self.handle(*self.inbox.get(timeout=0.05))
                except queue.Empty:
                    pass
                if self.ota is not None:
                    self.ota.tick()
                while self._classify_waiting():
                    pass
        finally:
            self.link.close((self.status_topic, self._status_bytes("offline")))
            if self.out is not None and self.out is not sys.stdout:
                self.out.close()
            event(self.log, "stopped", predictions=self.seq, dropped=self.dropped, bad_lines=self.bad_lines)
        return 0


def accept_for_inference(bundle: Bundle) -> None:
    """An inferring device uses any bundle that can infer (int8 students, trainable bundles)."""
    if bundle.manifest.get("kind") not in INFERENCE_KINDS:
        raise ProtocolError(Reason.BAD_VALUE, f"{bundle.name} v{bundle.version} is a {bundle.manifest.get('kind')} "
                                              "bundle: this device runs inference")


def accept_for_training(bundle: Bundle) -> None:
    """A training device (mode "train") can only use trainable bundles: an int8 student is refused before install."""
    if bundle.manifest.get("kind") != "trainable":
        raise ProtocolError(Reason.BAD_VALUE, f"{bundle.name} v{bundle.version} is a {bundle.manifest.get('kind')} "
                                              "bundle: this device trains (mode = \"train\")")


def read_input(path: str) -> tuple[np.ndarray | None, np.ndarray | None, Callable[[tuple[int, ...]], np.ndarray]]:
    """`predict`'s input: (x, y) from .npy/.npz, else a loader of text lines for the model's input shape."""
    if path != "-" and path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"], np.float32), (np.asarray(data["y"]) if "y" in data else None), None
    if path != "-" and path.endswith(".npy"):
        return np.load(path, allow_pickle=False).astype(np.float32), None, None

    def text(shape: tuple[int, ...]) -> np.ndarray:
        rows = [w for w in (parse_window(line, shape) for line in lines(path, False, threading.Event()))
                if w is not None]
        return np.stack(rows) if rows else np.zeros((0, *shape), np.float32)

    return None, None, text
