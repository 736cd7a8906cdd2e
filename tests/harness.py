"""What the test modules share: one condition wait, an MQTT recorder, the daemons a test starts, a scripted
federation (keys, enrolment, edge config, signed messages) and provisioned devices. Waits are on conditions, never
fixed sleeps, so that a test takes as long as the behaviour does and a failure says what never happened.

conftest imports this module for every test: device/edge imports stay inside the helpers that use them, so that a
broken tier fails its own tests, not the collection of all."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np
import paho.mqtt.client as mqtt
import tomli_w

from protocol import signing
from protocol.bundle import load_bundle
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.messages import (
    AggregateReceipt,
    Capability,
    DeviceUpdate,
    EdgeAggregate,
    PrivacySpent,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    global_model,
    new_nonce,
    sign_message,
    verify_message,
)

if TYPE_CHECKING:
    from cloud.aggregator import CloudAggregator
    from edge.engine import EdgeEngine

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
PREBUILT = REPO / "firmware_models" / "prebuilt"
DEV_KEY, DEV_PUB = PREBUILT / "DEVELOPMENT_ONLY_signing.key", PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub"
MODEL = "wearable_cnn"
PLAN = TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)
N_PARAMS = 1_000
DENSE = CompressionSettings(method="dense", bits=32, entropy=False)


# ------------------------------------------------------------------ waiting
def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             message: str | Callable[[], object] = "") -> T:
    """Poll `condition` until it is truthy and return its value. On timeout an AssertionError names what was awaited
    (`message`, called lazily when it is a function, e.g. a log tail; else the condition's source line)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"waited {timeout:g} s for {what or _source(condition)}")
        time.sleep(interval)
    return value


def _source(fn: Callable) -> str:
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):
        return repr(fn)


class Recorder:
    """A paho MQTT 5 client that records every message on `filters` (subscribed before the constructor returns),
    so that tests wait on what arrived. `hook(topic, payload)` runs first, on paho's thread (e.g. kill a process the
    moment a message shows)."""

    def __init__(self, port: int, filters: list[str], client_id: str = "recorder", host: str = "127.0.0.1",
                 hook: Callable[[str, bytes], None] | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond, self.hook = threading.Condition(), hook
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(host, port)
        self.client.subscribe([(f, 1) for f in filters])
        self.client.loop_start()
        assert subscribed.wait(10), f"no SUBACK for {filters}"

    def _on_message(self, _c, _u, msg) -> None:
        if self.hook is not None:
            self.hook(msg.topic, msg.payload)
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def wait(self, pred: Callable[[list[tuple[str, bytes]]], T], timeout: float = 20.0, message: str = "") -> T:
        """Block until `pred(messages)` is truthy and return it; the AssertionError lists the topics seen."""
        with self.cond:
            value = self.cond.wait_for(lambda: pred(self.messages), timeout)
            seen = sorted({t for t, _ in self.messages})
            assert value, f"waited {timeout:g} s for {message or _source(pred)}; topics seen: {seen}"
            return value

    def payloads(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Daemons:
    """The daemons one test starts: in process (anything with `run()` and a `stop` event, run on a thread) or as
    `python -m fediomt ...` processes. Whatever is still running at teardown is stopped or killed."""

    def __init__(self) -> None:
        self.running: list[tuple[Any, threading.Thread]] = []
        self.procs: list[subprocess.Popen] = []

    def thread(self, daemon: Any) -> threading.Thread:
        thread = threading.Thread(target=daemon.run, daemon=True)
        self.running.append((daemon, thread))
        thread.start()
        return thread

    def process(self, *args: str, log: Path) -> subprocess.Popen:
        """`python -m fediomt args`, stdout and stderr appended to `log`."""
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fediomt", *args], cwd=REPO, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for daemon, _ in self.running:
            daemon.stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for _, thread in self.running:
            thread.join(15)


# ------------------------------------------------------------------ a scripted federation
class Fed:
    """Keys, enrolment and an edge config for scripted devices; builds signed cloud and device messages."""

    def __init__(self, root: Path, n_devices: int = 20, n_params: int = N_PARAMS, **overrides) -> None:
        self.root, self.n_params = root, n_params
        self.cloud_key, self.edge_key = signing.generate_signing_key(), signing.generate_signing_key()
        (root / "enrolment").mkdir(parents=True)
        signing.save_public_key(self.cloud_key.public_key(), root / "cloud.pub")
        signing.save_private_key(self.edge_key, root / "edge.key")
        self.devices = [f"d{i:02d}" for i in range(n_devices)]
        self.keys = {d: signing.generate_signing_key() for d in self.devices}
        for d, k in self.keys.items():
            signing.save_public_key(k.public_key(), root / "enrolment" / f"{d}.pub")
        raw = {"edge_id": "edge1", "state_dir": "state", "enrolment_dir": "enrolment", "signing_key": "edge.key",
               "cloud_public_key": "cloud.pub", "tick_s": 0.05, "filters": {"enabled": []},
               "bounds": {"norm_multiple": 0.0, "samples_multiple": 0.0}}   # random deltas: exact FedAvg
        # arithmetic; tests of the (default) bounds pass them (tests/test_bounds.py, tests/test_hostile_device.py)
        for key, value in overrides.items():
            if isinstance(value, dict):
                raw.setdefault(key, {}).update(value)
            else:
                raw[key] = value
        self.config = root / "edge.toml"
        self.config.write_bytes(tomli_w.dumps(raw).encode())

    def engine(self) -> EdgeEngine:
        from edge.config import load_config
        from edge.engine import EdgeEngine

        return EdgeEngine(load_config(self.config))

    def model(self, version: int = 1) -> bytes:
        msg = global_model("m", version, np.zeros(self.n_params, np.float32))
        return encode(sign_message(msg, self.cloud_key))

    def announce(self, round_id: int = 1, version: int = 1, deadline: float | None = None, **kw) -> bytes:
        msg = RoundAnnouncement(round_id, "m", version, "fedavg", deadline or time.time() + 60,
                                TrainingPlan(0.1, 1, 8, 1.0, 0.0), DENSE.to_dict(), **kw)
        return encode(sign_message(msg, self.cloud_key))

    def receipt(self, aggregate: bytes, accepted: bool = True, reason: int = 0, key=None, **kw) -> bytes:
        """The cloud's AggregateReceipt for an aggregate's bytes (`kw` overrides fields)."""
        agg = decode(aggregate, expect=EdgeAggregate)
        fields = {"edge_id": agg.edge_id, "round_id": agg.round_id, "aggregate_nonce": agg.nonce, **kw}
        msg = AggregateReceipt(accepted=accepted, reason=reason, timestamp=time.time(), **fields)
        return encode(sign_message(msg, key or self.cloud_key))

    def update(self, device: str, delta: np.ndarray, round_id: int = 1, version: int = 1, num_samples: int = 10,
               settings: CompressionSettings = DENSE, key=None, nonce: bytes | None = None, loss: float = 0.5,
               payload: bytes | None = None, **kw) -> bytes:
        payload = payload if payload is not None else encode_update(delta.astype(np.float32), settings)[0]
        msg = DeviceUpdate(device, kw.pop("edge_id", "edge1"), round_id, version, num_samples, 3, loss,
                           PrivacySpent(1.0, 1e-5, "rdp", 1.0, 0.1, 3), kw.pop("n_params", self.n_params), payload,
                           Capability("pi", 512, 1e6), nonce or new_nonce(), time.time(), **kw)
        return encode(sign_message(msg, key or self.keys[device]))


def older_schema(payload: bytes) -> bytes:
    """`payload` as a daemon of the previous release stored it: the same message at the version before this one."""
    import cbor2

    obj = cbor2.loads(payload)
    return cbor2.dumps([obj[0], obj[1] - 1, *obj[2:]], canonical=True)


def open_round(fed: Fed, engine: EdgeEngine, **kw) -> None:
    assert engine.handle_cloud("model", fed.model(kw.get("version", 1)))
    assert engine.handle_cloud("round", fed.announce(**kw))


def aggregate_of(fed: Fed, pubs) -> tuple[EdgeAggregate, np.ndarray | None]:
    (pub,) = [p for p in pubs if p.topic == "fl/cloud/aggregates/edge1"]
    agg = decode(pub.payload, expect=EdgeAggregate)
    verify_message(agg, fed.edge_key.public_key())
    return agg, decode_update(agg.delta, fed.n_params) if agg.significant else None


# ------------------------------------------------------------------ the cloud daemon (vitals_mlp, 4 features)
MLP_OPTIONS = "[model_options]\nn_features = 4\nhidden = 4\n"   # a cloud.toml's tail: a small vitals_mlp
MLP_PARAMS = 4 * 4 + 4 + 4 * 2 + 2                               # its parameters (4 -> 4 -> 2)


def cloud_for(fed: Fed, root: Path, port: int, rounds: int, round_timeout_s: float, extra: str = "",
              host: str = "127.0.0.1") -> Path:
    """A cloud.toml (and its key, the edge's public key and a 32-row holdout) in `root` for the scripted `fed`'s
    edge: fedavg over a small vitals_mlp (MLP_OPTIONS), `extra` TOML lines before the tables."""
    signing.save_private_key(fed.cloud_key, root / "cloud.key")
    signing.save_public_key(fed.edge_key.public_key(), root / "edges" / "edge1.pub")
    rng = np.random.default_rng(0)
    np.savez(root / "holdout.npz", x=rng.normal(size=(32, 4)).astype(np.float32), y=rng.integers(0, 2, 32))
    config = root / "cloud.toml"
    config.write_text('run_dir = "run"\nsigning_key = "cloud.key"\nedge_keys_dir = "edges"\n'
                      f'eval_data = "holdout.npz"\nmodel = "vitals_mlp"\nrounds = {rounds}\n'
                      f'round_timeout_s = {round_timeout_s}\n{extra}{MLP_OPTIONS}'
                      f'[broker]\nhost = "{host}"\nport = {port}\n[strategy]\nname = "fedavg"\n')
    return config


def rounds_of(run_dir: Path) -> list[dict]:
    """The cloud's rounds.jsonl under `run_dir` ([] before the first round closed)."""
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_in_process(config: Path, daemons: Daemons | None = None) -> tuple[CloudAggregator, threading.Thread]:
    """The cloud daemon of `config` running on a thread (stopped at teardown when started through `daemons`)."""
    from cloud.aggregator import CloudAggregator
    from cloud.config import load_config
    from protocol.logs import setup

    agg = CloudAggregator(load_config(config), setup("cloud-test"))
    if daemons is not None:
        return agg, daemons.thread(agg)
    thread = threading.Thread(target=agg.run, daemon=True)
    thread.start()
    return agg, thread


def cloud_process(config: Path, log: IO[bytes], daemons: Daemons | None = None) -> subprocess.Popen:
    """`python -m fediomt cloud run --config config` writing to the open file `log` (killed at teardown when
    started through `daemons`)."""
    proc = subprocess.Popen([sys.executable, "-m", "fediomt", "cloud", "run", "--config", str(config)], cwd=REPO,
                            stdout=log, stderr=log)
    if daemons is not None:
        daemons.procs.append(proc)
    return proc


# ------------------------------------------------------------------ real devices (prebuilt wearable_cnn)
def device_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random wearable windows (100 x 6) with labels of its 7 classes."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 100, 6)).astype(np.float32), rng.integers(0, 7, n)


def provision_device(root: Path, name: str, port: int, samples: int = 128, edge: str = "e1", **overrides) -> Path:
    """A device under root/name trusting root/cloud.pub, with `device_data(samples)`; returns its config."""
    from experiments.sandbox import provision

    x, y = device_data(samples)
    return provision(root / name, name, edge, PREBUILT / MODEL, DEV_PUB, root / "cloud.pub", x, y, port, **overrides)


def bundle_weights() -> np.ndarray:
    """The prebuilt model's flat weights, as a device loads them."""
    from device.runtime import TrainableModel

    bundle = load_bundle(PREBUILT / MODEL, signing.load_public_key(DEV_PUB))
    return TrainableModel(bundle.model_bytes, bundle.manifest).get_flat()


def publish_cloud_round(recorder: Recorder, cloud_key, weights: np.ndarray, **announcement) -> None:
    """The cloud's side of round 1 on fl/cloud: a full global model (version 1) and its signed announcement."""
    model = global_model(MODEL, 1, weights)
    ann = RoundAnnouncement(1, MODEL, 1, "fedavg", time.time() + 120, PLAN, {}, **{"edges": ["e1"], **announcement})
    recorder.publish("fl/cloud/model", encode(sign_message(model, cloud_key)), retain=True)
    recorder.publish("fl/cloud/round", encode(sign_message(ann, cloud_key)), retain=True)


def dp_accounting_epsilon(history, delta: float, pld: bool) -> float:
    """dp-accounting alone (not protocol.accountant nor cloud.accounting): Poisson-sampled Gaussians composed over
    `history` rows (noise multiplier, sample rate, steps), the independent check of every reported epsilon."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant() if pld else rdp_privacy_accountant.RdpAccountant()
    for z, q, steps in history:
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
                                                 steps))
    return float(acc.get_epsilon(delta))
