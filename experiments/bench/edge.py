"""`fediomt bench edge`: updates per second through one edge process's whole path, next to a NumPy floor.

The path per update is exactly the daemon's (EdgeEngine.handle_update): strict CBOR decode, sender/round/shape
checks, Ed25519 signature verification, duplicate and replay checks, strict payload decode, an SQLite (WAL) insert;
then, once per round, filters + weighting + aggregation + encode + sign (EdgeEngine tick). `updates_per_s` counts
both. Ingest mirrors edge/gateway.py's group commit: updates are handled in runs of GROUP (64) inside one
`engine.store.group()` transaction each, as the daemon's `_drain_some` does with a full inbox (the round-closing
update in a group of its own). The sparse case runs twice on the same messages: Ed25519-signed (`updates_per_s`) and
HMAC-tagged with each device's key toward the edge (`updates_per_s_mac`; protocol.messages.mac_message), each on a
fresh store. MQTT is not in the loop (Mosquitto's own rate is in the shared notes, ~7,000 msg/s per connection;
replicas on a shared subscription split it). The floor is a plain NumPy accumulation of the same already-decoded
arrays (`acc[idx] += values`, or `acc += values` when dense) in the same run. The process is pinned to one core and
rates are per CPU-second of that core (`time.process_time`), so that other load on a shared machine does not count
against the edge; `updates_per_s_wall` is the wall-clock rate of the same run.

Messages are generated (signed or tagged, compressed) before timing. `verify_us` / `verify_mac_us`: the check on the
received bytes (verify_raw / verify_mac_raw), as edge.validation makes it. Sparse: top-k at 1% density, float32
values; dense: float32. Full run: 10,000 sparse updates of a 100k-parameter model (one round of 10,000 devices) and
1,000 dense.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w
from cryptography.hazmat.primitives import serialization

from edge.aggregate import FilterConfig, filter_matrix
from edge.config import load_config
from edge.engine import EdgeEngine
from edge.filters import AGGREGATORS, FILTERS
from edge.gateway import GROUP
from edge.rows import Rows
from edge.validation import decode_delta
from protocol import signing
from protocol.compression import CompressionSettings, encode_update
from protocol.messages import (
    Capability,
    DeviceUpdate,
    PrivacySpent,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    global_model,
    mac_message,
    new_nonce,
    sign_message,
    verify_mac_raw,
    verify_raw,
)
from protocol.table import print_table
from protocol.topics import ANY, ack_topic, update_topic

PARAMS = 100_000
KRUM_MAX = 2_000


def _setup(root: Path, n_devices: int, filters: list[str],
           **overrides) -> tuple[dict, dict, signing.Ed25519PrivateKey]:
    """Keys, enrolment ({id}.pub and {id}.mac) and edge.toml under `root`: (signing keys, MAC keys, cloud key)."""
    cloud = signing.generate_signing_key()
    (root / "enrolment").mkdir(parents=True)
    signing.save_public_key(cloud.public_key(), root / "cloud.pub")
    signing.save_private_key(signing.generate_signing_key(), root / "edge.key")
    keys = {f"d{i:05d}": signing.generate_signing_key() for i in range(n_devices)}
    macs = {d: signing.derive_mac_key(signing.generate_mac_key(), d, "bench") for d in keys}
    for d, k in keys.items():  # plain writes: save_public_key's fsync per file would dominate the set-up
        pem = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (root / "enrolment" / f"{d}.pub").write_bytes(pem)
        (root / "enrolment" / f"{d}.mac").write_bytes(macs[d])
    cfg = {"edge_id": "bench", "state_dir": "state", "enrolment_dir": "enrolment", "signing_key": "edge.key",
           "cloud_public_key": "cloud.pub", "filters": {"enabled": filters}, **overrides}
    (root / "edge.toml").write_bytes(tomli_w.dumps(cfg).encode())
    return keys, macs, cloud


def _engine(root: Path, cloud: signing.Ed25519PrivateKey) -> EdgeEngine:
    """A fresh edge (empty store) on `root`'s config, with round 1 of model v1 open."""
    shutil.rmtree(root / "state", ignore_errors=True)
    engine = EdgeEngine(load_config(root / "edge.toml"), _quiet_log())
    model = global_model("m", 1, np.zeros(PARAMS, np.float32))
    ann = RoundAnnouncement(1, "m", 1, "fedavg", time.time() + 3600, TrainingPlan(0.1, 1, 8, 1.0, 0.0), {})
    engine.handle_cloud("model", encode(sign_message(model, cloud)))
    engine.handle_cloud("round", encode(sign_message(ann, cloud)))
    for d in engine.keys.enrolled():  # steady state: enrolment keys are cached after a device's first round
        engine.keys.entry(d)
    return engine


def _updates(devices: list[str], settings: CompressionSettings, rng: np.random.Generator) -> list[DeviceUpdate]:
    base = rng.normal(size=PARAMS).astype(np.float32)
    out = []
    for d in devices:
        delta = (base + rng.normal(size=PARAMS).astype(np.float32)) * 0.01
        payload = encode_update(delta, settings)[0]
        out.append(DeviceUpdate(d, "bench", 1, 1, 32, 10, 0.5, PrivacySpent(1.0, 1e-5, "rdp", 1.0, 0.1, 10),
                                PARAMS, payload, Capability("pi", 512, 1e6), new_nonce(), time.time()))
    return out


def _messages(updates: list[DeviceUpdate], seal) -> list[tuple[str, bytes]]:
    """(device, wire bytes) of each update, signed or tagged by `seal(update)`."""
    return [(u.device_id, encode(seal(u))) for u in updates]


def _floor(engine: EdgeEngine, msgs: list[tuple[str, bytes]]) -> float:
    """Updates/s of a plain NumPy accumulation of the same decoded arrays."""
    arrays = [decode_delta(decode(m, expect=DeviceUpdate), engine.ctx) for _, m in msgs]
    acc = np.zeros(PARAMS, np.float64)
    t = time.process_time()
    for idx, values in arrays:
        if idx is None:
            acc += values
        else:
            acc[idx] += values
    return len(arrays) / (time.process_time() - t)


def _stages(engine: EdgeEngine, msgs: list[tuple[str, bytes]], verify) -> dict[str, float]:
    """Microseconds per update of each step, measured on the same messages; `verify(data, msg, entry)` checks the
    signature or MAC on the received bytes, as edge.validation does."""
    sample = msgs[: min(len(msgs), 500)]
    t0 = time.process_time()
    decoded = [(m, decode(m, expect=DeviceUpdate, max_bytes=engine.cfg.max_update_bytes)) for _, m in sample]
    t1 = time.process_time()
    for data, msg in decoded:
        verify(data, msg, engine.keys.entry(msg.device_id))
    t2 = time.process_time()
    for _, msg in decoded:
        decode_delta(msg, engine.ctx)
    t3 = time.process_time()
    n = len(sample)
    return {"cbor_decode_us": 1e6 * (t1 - t0) / n, "verify_us": 1e6 * (t2 - t1) / n,
            "payload_decode_us": 1e6 * (t3 - t2) / n}


def _verify_sig(data: bytes, msg: DeviceUpdate, entry) -> None:
    verify_raw(data, msg, entry.key)


def _verify_mac(data: bytes, msg: DeviceUpdate, entry) -> None:
    verify_mac_raw(data, msg, entry.mac)


def _handle(engine: EdgeEngine, msgs: list[tuple[str, bytes]]) -> list:
    """The gateway's group commit: runs of GROUP updates, one SQLite transaction each. Returns the last one's
    publications."""
    pubs: list = []
    for start in range(0, len(msgs), GROUP):
        with engine.store.group():
            for d, m in msgs[start:start + GROUP]:
                ack, pubs = engine.handle_update(d, m)
                assert ack.accepted, ack
    return pubs


def _ingest(engine: EdgeEngine, msgs: list[tuple[str, bytes]]) -> dict:
    """Rates of the whole path on `msgs` (the last one closes the round) and the filter timings in between."""
    n = len(msgs)
    w0, t0 = time.perf_counter(), time.process_time()
    _handle(engine, msgs[:-1])
    w1, t1 = time.perf_counter(), time.process_time()
    filter_times = _filters(engine)
    w2, t2 = time.perf_counter(), time.process_time()
    pubs = _handle(engine, msgs[-1:])
    w3, t3 = time.perf_counter(), time.process_time()
    assert pubs, "the last update must close the round"
    ingest, close = t1 - t0, t3 - t2
    return {"updates_per_s": n / (ingest + close), "updates_per_s_wall": n / ((w1 - w0) + (w3 - w2)),
            "ingest_updates_per_s": (n - 1) / ingest, "round_close_s": close,
            "filter_seconds": {k: round(v, 4) if isinstance(v, float) else v for k, v in filter_times.items()}}


def _filters(engine: EdgeEngine) -> dict[str, float]:
    """CPU seconds per filter / aggregator on this round's stored updates (the matrix the edge would build).
    Multi-Krum is O(n^2 d) and left out above `KRUM_MAX` updates."""
    updates = engine.store.pending()
    rows = Rows.stack(PARAMS, [(u.indices, u.values) for u in updates])
    t = time.process_time()
    X = filter_matrix(rows, engine.cfg.filters.max_cells, np.random.default_rng(0))
    out = {"filter_matrix_s": time.process_time() - t, "matrix_shape": list(X.shape)}
    for name, fn in {**FILTERS, **AGGREGATORS}.items():
        if name == "krum" and X.shape[0] > KRUM_MAX:
            continue
        t = time.process_time()
        fn(X) if name in FILTERS else fn(X, np.ones(X.shape[0]))
        out[name] = time.process_time() - t
    return out


def _case(density: float, n: int, filters: list[str], rng: np.random.Generator, with_mac: bool = False) -> dict:
    """One round of `n` signed updates; `with_mac`: the same updates again, MAC-tagged, on a fresh store."""
    settings = (CompressionSettings(method="dense", bits=32) if density >= 1.0
                else CompressionSettings(method="topk", density=density, bits=32))
    with tempfile.TemporaryDirectory(prefix="fediomt-bench-edge-") as tmp:
        root = Path(tmp)
        keys, macs, cloud = _setup(root, n, filters)
        updates = _updates(list(keys), settings, rng)
        msgs = _messages(updates, lambda u: sign_message(u, keys[u.device_id]))
        engine = _engine(root, cloud)
        floor = _floor(engine, msgs)
        stages = _stages(engine, msgs, _verify_sig)
        out = _ingest(engine, msgs)
        engine.close()
        if with_mac:
            out.update(_mac_case(root, cloud, _messages(updates, lambda u: mac_message(u, macs[u.device_id])),
                                 out["updates_per_s"]))
    return {"params": PARAMS, "density": density, "updates": n, "filters": "+".join(filters) or "none", **out,
            "numpy_floor_updates_per_s": floor, "bytes_per_update": float(np.mean([len(m) for _, m in msgs])),
            **{k: round(v, 2) for k, v in stages.items()}, "peak_rss_mb_so_far": _peak_rss_mb()}


def _mac_case(root: Path, cloud: signing.Ed25519PrivateKey, msgs: list[tuple[str, bytes]],
              signed_rate: float) -> dict:
    """The MAC-tagged run's figures, suffixed `_mac`, and its rate over the signed one's."""
    engine = _engine(root, cloud)
    verify_us = _stages(engine, msgs, _verify_mac)["verify_us"]
    result = _ingest(engine, msgs)
    engine.close()
    return {"updates_per_s_mac": result["updates_per_s"], "updates_per_s_wall_mac": result["updates_per_s_wall"],
            "verify_mac_us": round(verify_us, 2), "mac_over_signature": result["updates_per_s"] / signed_rate}


def _mqtt_case(n: int, rng: np.random.Generator) -> dict:
    """The daemon itself (Gateway, in a thread) behind a private Mosquitto: wall-clock updates/s from the first
    publish to the last device Ack, one publisher connection playing every device. Not pinned: the broker and the
    publisher need their own cores. The whole cohort publishes at once, so the broker must queue it for the edge:
    Mosquitto's default `max_queued_messages 1000` silently drops the rest of a larger burst (measured: 1,100 of
    2,000 delivered); `fediomt broker config` writes 10000 for edges, this bench 2n + 100."""
    import threading

    import paho.mqtt.client as mqtt

    from edge.gateway import Gateway
    from experiments.mosquitto import MosquittoBroker

    settings = CompressionSettings(method="topk", density=0.01, bits=32)
    with tempfile.TemporaryDirectory(prefix="fediomt-bench-edge-mqtt-") as tmp, \
            MosquittoBroker(workdir=Path(tmp) / "mosquitto", persistence=False,
                            extra_config=[f"max_queued_messages {2 * n + 100}"]) as broker:
        root = Path(tmp)
        keys, _, cloud = _setup(root, n, FilterConfig().enabled, broker={"host": broker.host, "port": broker.port})
        _engine(root, cloud).close()   # the round and model the daemon resumes with
        msgs = _messages(_updates(list(keys), settings, rng), lambda u: sign_message(u, keys[u.device_id]))
        gateway = Gateway(load_config(root / "edge.toml"), _quiet_log())
        thread = threading.Thread(target=gateway.run, daemon=True)
        thread.start()
        acks = threading.Semaphore(0)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-devices", protocol=mqtt.MQTTv5)
        last = [0.0]

        def on_ack(*_) -> None:
            last[0] = time.perf_counter()
            acks.release()

        client.on_message = on_ack
        ready = threading.Event()
        client.on_subscribe = lambda *_: ready.set()
        client.connect(broker.host, broker.port)
        client.subscribe(ack_topic("bench", ANY), qos=1)
        client.loop_start()
        if not (gateway.local.subscribed.wait(30) and ready.wait(30)):
            raise RuntimeError("the edge or the bench client did not subscribe within 30 s")
        t0 = time.perf_counter()
        for d, m in msgs:
            client.publish(update_topic("bench", d), m, qos=1)
        deadline, got = time.monotonic() + 120, 0
        while got < len(msgs) and acks.acquire(timeout=max(0.0, deadline - time.monotonic())):
            got += 1
        elapsed = last[0] - t0
        gateway.stop.set()
        thread.join(30)
        client.disconnect()
        client.loop_stop()
    return {"updates": n, "acked": got, "mqtt_updates_per_s_wall": got / elapsed}


def _quiet_log() -> logging.Logger:
    """Errors only: the filters' per-round warnings would flood a 10,000-update round."""
    log = logging.getLogger("edge.bench")
    log.setLevel(logging.ERROR)
    return log


def _current_cpu(cores: set[int]) -> int:
    """The core this process runs on now (Linux /proc), so the pin does not pile benchmarks onto core 0."""
    try:
        cpu = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return min(cores)
    return cpu if cpu in cores else min(cores)


def run(args: argparse.Namespace) -> dict:
    if hasattr(os, "sched_setaffinity"):
        cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {_current_cpu(cores)})
    try:
        rng = np.random.default_rng(0)
        plan = [(0.01, 100 if args.quick else 10_000), (1.0, 20 if args.quick else 1_000)]
        cases = [_case(density, n, FilterConfig().enabled, rng, with_mac=density < 1.0) for density, n in plan]
    finally:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
    mqtt_case = _mqtt_case(100 if args.quick else 2_000, rng)
    print(f"through Mosquitto (daemon, 1% sparse): {mqtt_case['mqtt_updates_per_s_wall']:.0f} updates/s wall, "
          f"{mqtt_case['acked']}/{mqtt_case['updates']} acknowledged")
    print_table(cases, ["params", "density", "updates", "filters", "updates_per_s", "updates_per_s_wall",
                        "ingest_updates_per_s",
                        "round_close_s", "numpy_floor_updates_per_s", "cbor_decode_us", "verify_us",
                        "payload_decode_us", "bytes_per_update"])
    sparse = cases[0]
    print(f"1% sparse, one core: {sparse['updates_per_s']:.0f} updates/s signed (verify "
          f"{sparse['verify_us']:.0f} us), {sparse['updates_per_s_mac']:.0f} updates/s MAC-tagged (verify "
          f"{sparse['verify_mac_us']:.1f} us): x{sparse['mac_over_signature']:.2f}")
    per_round = 10_000 / sparse["updates_per_s"]
    print(f"one edge core: 10,000 devices x 1% updates per round = {per_round:.1f} s of CPU")
    for c in cases:
        print(f"density {c['density']}: filter/aggregator CPU seconds {c['filter_seconds']}")
    return {"params": PARAMS, "density": sparse["density"], "updates_per_s": sparse["updates_per_s"],
            "updates_per_s_mac": sparse["updates_per_s_mac"], "mac_over_signature": sparse["mac_over_signature"],
            "verify_us": sparse["verify_us"], "verify_mac_us": sparse["verify_mac_us"],
            "numpy_floor_updates_per_s": sparse["numpy_floor_updates_per_s"],
            "filters": sparse["filter_seconds"], "cores": 1, "quick": bool(args.quick),
            "seconds_per_round_10k_devices": per_round, "peak_rss_mb": _peak_rss_mb(), "mqtt": mqtt_case,
            "cases": cases}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB): the bench's own copies included (every
    message, the floor's decoded arrays, the filter timings' second copy of the rows)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
