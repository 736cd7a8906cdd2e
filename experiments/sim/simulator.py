"""One federation (devices -> edges -> cloud) in one process, round by round, on a virtual clock.

Per round, exactly the daemons' steps with their code, minus MQTT:
1. cloud: strategy.configure_round, a signed GlobalModel ("full", or "delta" via cloud.model.compress_broadcast) and
   a signed RoundAnnouncement; every addressed device and every edge receives both (bytes counted per receiver);
2. device: steps that fit (experiments.sim.hetero), device.training.train_round in the shared TFLite interpreter
   (DP-SGD in the graph), protocol.compression.encode_update with its own error-feedback residual, a signed
   DeviceUpdate (or a DeviceStatus: "declined", "offline");
3. edge: an update that arrives after the virtual deadline is refused (DEADLINE); the others pass the edge's own
   admission (edge.validation.authenticate + decode_delta: decoder, signature, shape), edge.aggregate.aggregate
   (weighting, filters, central DP), a signed EdgeAggregate, an Ack per update;
4. cloud: decode + verify every aggregate, cloud.strategies.heterogeneity.observe, strategy.apply, accounting with
   cloud.accounting (device_event / central_event), evaluation on the held-out set.
Bytes are the lengths of the encoded messages. The DP noise here comes from seeded generators (reproducible runs);
the daemons use the OS CSPRNG.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cloud.accounting import PrivacyLedger, central_event, device_event
from cloud.aggregator import RESIDUAL, decode_payload
from cloud.model import compress_broadcast
from cloud.strategies import make
from cloud.strategies.base import DeviceInfo, EdgeResult, RoundDefaults
from cloud.strategies.heterogeneity import observe
from cloud.strategies.scaffold import CONTROL
from device.runtime import TrainableModel
from device.training import planned_steps, train_round
from device.update import ENVELOPE_BYTES, RoundIdentity, build_update
from edge.config import EdgeConfig, ForwardConfig
from edge.engine import EdgeEngine
from experiments.datasets import Federation
from experiments.sim import hetero
from experiments.sim.methods import Method
from experiments.sim.poison import Poison, flip_labels, malicious, poison_delta
from protocol import signing
from protocol.compression import CompressionSettings, encoded_size_bound
from protocol.errors import Reason
from protocol.messages import (
    Capability,
    CentralDPReport,
    DeviceStatus,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    floats_to_bytes,
    sign_message,
    verify_message,
)

MAX_UPDATE_BYTES = 4 * 1024 * 1024
QUIET = logging.getLogger("experiments.sim.edge")   # the engines' per-round log lines, off unless asked for
QUIET.setLevel(logging.ERROR)


@dataclass(frozen=True)
class SimConfig:
    method: Method
    rounds: int = 20
    lr: float = 0.1
    local_epochs: int = 1
    max_steps: int = 0
    clip: float = 1.0                 # device per-example clip (DP-SGD)
    noise_mult: float = 0.0           # device noise multiplier (0 = no device DP)
    central_clip: float = 0.0         # edge user-level clip (0 = no central DP)
    central_noise: float = 0.0
    cohort_size: int = 0              # FedIoMT importance sampling: devices per round (0 = everyone)
    hetero: hetero.HeteroConfig = field(default_factory=hetero.HeteroConfig)
    poison: Poison | None = None
    seed: int = 0
    eval_every: int = 1
    delta: float = 1e-5


@dataclass
class RoundLog:
    round: int
    accuracy: float | None
    loss: float | None
    bytes_up: int                     # device -> edge (updates, statuses) + edge -> cloud (aggregates)
    bytes_down: int                   # cloud -> edges -> devices (models, announcements) + acks
    participants: int                 # updates counted in an aggregate
    missed_deadline: int
    declined: int
    offline: int
    filtered: int
    mean_local_steps: float
    virtual_s: float                  # virtual round length (edge close time)
    wall_s: float                     # real time this round took in this process
    epsilon_device: float
    epsilon_central: float


@dataclass
class DeviceSim:
    id: str
    edge: str
    x: np.ndarray
    y: np.ndarray
    profile: hetero.Profile
    key: object
    residual: np.ndarray | None = None
    control: np.ndarray | None = None
    history: tuple = ()               # the device's privacy history (protocol.accountant entries)
    malicious: bool = False


class Simulator:
    def __init__(self, fed: Federation, model_bytes: bytes, manifest: dict, initial: np.ndarray, cfg: SimConfig,
                 workdir: Path | None = None) -> None:
        self.fed, self.cfg, self.method = fed, cfg, cfg.method
        self.rng = np.random.default_rng(cfg.seed)
        self.model = TrainableModel(model_bytes, manifest, rng=np.random.default_rng(cfg.seed + 1), num_threads=1)
        self.n = self.model.n_params
        self.batch = self.model.batch_size
        self._tmp = tempfile.TemporaryDirectory(prefix="fediomt-sim-") if workdir is None else None
        self.workdir = Path(self._tmp.name) if workdir is None else workdir
        self.cloud_key = signing.generate_signing_key()
        self.edges = fed.edges
        self.edge_keys = {e: signing.generate_signing_key() for e in self.edges}
        profiles = hetero.draw_profiles(len(fed.clients), cfg.hetero, self.rng)
        bad = malicious([c.id for c in fed.clients], cfg.poison.fraction, self.rng) if cfg.poison else set()
        self.devices: list[DeviceSim] = []
        for client, profile in zip(fed.clients, profiles):
            key = signing.generate_signing_key()
            enrol = self.workdir / "enrol" / client.edge
            enrol.mkdir(parents=True, exist_ok=True)
            signing.save_public_key(key.public_key(), enrol / f"{client.id}.pub")
            y = flip_labels(client.y, self.model.n_classes) if client.id in bad and cfg.poison.kind == "label_flip" \
                else client.y
            self.devices.append(DeviceSim(client.id, client.edge, client.x.astype(np.float32), y, profile, key,
                                          malicious=client.id in bad))
        self.plan = TrainingPlan(lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=self.batch, clip=cfg.clip,
                                 noise_mult=cfg.noise_mult, max_steps=cfg.max_steps)
        central = CentralDPReport(cfg.central_clip, cfg.central_noise, 0.0) if cfg.central_clip > 0 else None
        steps = planned_steps(self.plan, int(np.median([len(d.x) for d in self.devices])), self.batch)
        dense = 4 * self.n + ENVELOPE_BYTES   # the deadline is the operator's, the same whatever the method sends
        self.round_seconds = hetero.deadline_s(steps, dense, dense, cfg.hetero)
        options = dict(self.method.options)
        if self.method.strategy == "fediomt":
            options["cohort_size"] = cfg.cohort_size
        self.strategy = make(self.method.strategy, RoundDefaults(self.plan, dict(self.method.compression), central,
                                                                 self.round_seconds), options)
        self.server = self.strategy.init_state(np.asarray(initial, np.float32))
        # what the cloud learns from the devices' retained statuses (Capability)
        self.infos = {d.id: DeviceInfo(d.id, d.profile.compute_class, d.profile.steps_per_s) for d in self.devices}
        self.ledger = PrivacyLedger(cfg.delta)
        self.version = 1
        self.published: np.ndarray | None = None
        self.round_id = 0
        self.clock = 0.0                  # virtual time at the start of the open round
        self.now = 0.0                    # virtual time the edges' engines read (their clock)
        self.engines = {e: self._edge_engine(e) for e in self.edges}
        self.log: list[RoundLog] = []

    # ------------------------------------------------------------------ cloud side
    def _global_model(self) -> GlobalModel:
        """The signed GlobalModel of the current version (the cloud daemon's _compress_model + _publish_model)."""
        s, m, previous = self.server, self.method, self.published
        control = s.arrays.get(CONTROL)
        control_bytes = None if control is None else floats_to_bytes(control)
        arrays = dict(s.arrays)
        residual = arrays.pop(RESIDUAL, None)
        if m.downlink == "delta" and previous is not None and (self.version - 1) % m.full_every != 0:
            settings = CompressionSettings.from_dict({**CompressionSettings().to_dict(), **m.downlink_compression})
            payload, published, residual = compress_broadcast(previous, s.weights, residual, settings)
            self.server = s.replace(weights=published, arrays={**arrays, RESIDUAL: residual})
            digest = hashlib.sha256(floats_to_bytes(published)).digest()
            msg = GlobalModel("sim", self.version, "delta", self.version - 1, self.n, payload, digest, control_bytes)
        else:
            if residual is not None:
                self.server = s.replace(weights=(s.weights + residual).astype(np.float32), arrays=arrays)
            weights = floats_to_bytes(self.server.weights)
            msg = GlobalModel("sim", self.version, "full", None, self.n, weights, hashlib.sha256(weights).digest(),
                              control_bytes)
        self.published = self.server.weights.copy()   # what devices hold now
        return sign_message(msg, self.cloud_key)

    def accuracy(self) -> tuple[float, float]:
        self.model.set_flat(self.server.weights)
        return self.model.evaluate(self.fed.x_test, self.fed.y_test)

    def epsilons(self) -> tuple[float, float]:
        report = self.ledger.report()
        return report["device"], report["central"]

    # ------------------------------------------------------------------ one round
    def run_round(self) -> RoundLog:
        t0 = time.monotonic()
        cfg, m = self.cfg, self.method
        self.round_id += 1
        rc = self.strategy.configure_round(self.server, self.round_id, self.infos, self.rng)
        gm_bytes = encode(self._global_model())
        deadline = self.round_seconds
        ann = sign_message(RoundAnnouncement(
            round_id=self.round_id, model_name="sim", model_version=self.version, strategy=self.strategy.name,
            deadline=self.clock + deadline, plan=rc.plan, compression=rc.compression, edges=list(self.edges),
            cohort=rc.cohort, lr_scale=rc.lr_scale, sample_weight=rc.sample_weight, central_dp=rc.central_dp),
            self.cloud_key)
        ann_bytes = encode(ann)
        # every device verifies the same two messages: do it once, the result is the same for all
        verify_message(decode(ann_bytes, expect=RoundAnnouncement), self.cloud_key.public_key())
        verify_message(decode(gm_bytes, expect=GlobalModel), self.cloud_key.public_key())
        cohort = set(rc.cohort)
        addressed = [d for d in self.devices if not cohort or d.id in cohort]
        down = (len(gm_bytes) + len(ann_bytes)) * (len(addressed) + len(self.edges))
        for engine in self.engines.values():   # the edges adopt the model and open the round (relays counted above)
            engine.handle_cloud("model", gm_bytes)
            engine.handle_cloud("round", ann_bytes)
        gone = hetero.offline(len(addressed), cfg.hetero.dropout, self.rng)
        global_flat = self.server.weights.copy()
        c_global = self.server.arrays.get(CONTROL)
        settings = CompressionSettings.from_dict(rc.compression)
        arrivals: dict[str, list[tuple[float, str, DeviceSim, bytes]]] = {e: [] for e in self.edges}
        declined = offline = 0
        for dev, is_gone in zip(addressed, gone):
            if is_gone:   # the broker publishes its last will
                arrivals[dev.edge].append((0.0, "status", dev, self._status(dev, "offline")))
                offline += 1
                continue
            planned = planned_steps(rc.plan, len(dev.x), self.batch)
            download_s = hetero.transfer_s(len(gm_bytes) + len(ann_bytes), dev.profile.bandwidth_bps)
            upload_s = hetero.transfer_s(encoded_size_bound(self.n, settings) + ENVELOPE_BYTES,
                                         dev.profile.bandwidth_bps)
            steps = hetero.local_steps(planned, dev.profile, deadline - download_s - upload_s, m.partial_work)
            if steps < 1 or len(dev.x) < self.batch:
                arrivals[dev.edge].append((download_s, "status", dev, self._status(dev, "declined")))
                declined += 1
                continue
            data, steps_done = self._train(dev, rc, global_flat, c_global, steps, settings)
            arrival = hetero.arrival_s(len(gm_bytes) + len(ann_bytes), steps_done, len(data), dev.profile)
            arrivals[dev.edge].append((arrival, "update", dev, data))
        up = sum(len(data) for events in arrivals.values() for _, _, _, data in events)
        results, aggs, close_times, filtered, steps_all, missed = [], [], [], 0, [], 0
        for edge in self.edges:
            agg_bytes, ack_bytes, close, late = self._edge_round(edge, sorted(arrivals[edge], key=lambda e: e[0]),
                                                                  deadline)
            down += ack_bytes
            missed += late
            close_times.append(close)
            up += len(agg_bytes)
            agg = decode(agg_bytes, expect=EdgeAggregate)
            verify_message(agg, self.edge_keys[edge].public_key())
            aggs.append(agg)
            filtered += len(agg.filtered)
            steps_all.append((agg.mean_local_steps, agg.num_devices))
            results.append(EdgeResult(edge, decode_payload(agg.delta, self.n) if agg.significant else None,
                                      agg.num_samples, agg.weight_sum, agg.num_devices, agg.mean_local_steps,
                                      decode_payload(agg.control_delta, self.n)))
            self.infos = observe(self.infos, agg.device_ids, agg.filtered, agg.update_norms)
        self.server = self.strategy.apply(self.server, results, len(self.devices))
        participating = [a for a in aggs if a.num_devices > 0]
        if participating:
            min_local = min(a.num_samples // a.num_devices for a in participating)
            self.ledger.device.append(device_event(rc.plan, min_local))
            self.ledger.central.append(central_event([a.central_dp for a in participating]))
        self.version += 1
        virtual = max(close_times) if close_times else deadline
        self.clock += virtual
        acc = loss = None
        if self.round_id % cfg.eval_every == 0 or self.round_id == cfg.rounds:
            loss, acc = self.accuracy()
        eps_d, eps_c = self.epsilons()
        n_part = sum(a.num_devices for a in aggs)
        mean_steps = sum(s * n for s, n in steps_all) / n_part if n_part else 0.0
        log = RoundLog(self.round_id, acc, loss, up, down, n_part, missed, declined, offline, filtered, mean_steps,
                       virtual, time.monotonic() - t0, eps_d, eps_c)
        self.log.append(log)
        return log

    def run(self) -> list[RoundLog]:
        for _ in range(self.cfg.rounds):
            self.run_round()
        return self.log

    # ------------------------------------------------------------------ device side
    def _capability(self, dev: DeviceSim) -> Capability:
        return Capability(dev.profile.compute_class, 64, dev.profile.bandwidth_bps, dev.profile.steps_per_s)

    def _status(self, dev: DeviceSim, state: str) -> bytes:
        return encode(DeviceStatus(dev.id, dev.edge, state, self.version, 1, 0.0, 0.0, self.clock, self.round_id,
                                   self._capability(dev)))

    def _train(self, dev: DeviceSim, rc, global_flat: np.ndarray, c_global: np.ndarray | None, steps: int,
               settings: CompressionSettings) -> tuple[bytes, int]:
        """The device agent's round (device.training.train_round, device.update.build_update), minus persistence
        and MQTT: the signed DeviceUpdate bytes and the steps done. A malicious device poisons its delta first."""
        result = train_round(self.model, dev.x, dev.y, global_flat, rc.plan, steps, self.rng,
                             lr_scale=rc.lr_scale.get(dev.id, 1.0), c_global=c_global, c_local=dev.control)
        if dev.malicious and self.cfg.poison is not None:
            result = replace(result, delta=poison_delta(result.delta, self.cfg.poison, self.rng))
        out = build_update(result, RoundIdentity(dev.id, dev.edge, self.round_id, self.version), settings,
                           history=dev.history, residual=dev.residual, control=dev.control, delta=self.cfg.delta,
                           accountant_name="rdp", capability=self._capability(dev), n_params=self.n, rng=self.rng,
                           nonce=self.rng.bytes(16), timestamp=self.clock)
        dev.history, dev.residual, dev.control = out.history, out.residual, out.control
        return encode(sign_message(out.update, dev.key)), result.local_steps

    # ------------------------------------------------------------------ edge side
    def _edge_round(self, edge: str, events: list[tuple[float, str, DeviceSim, bytes]],
                    deadline: float) -> tuple[bytes, int, float, int]:
        """Deliver the round's statuses and updates to the edge's own engine in arrival order on the virtual clock,
        closing at its quorum or deadline exactly as the gateway does. Returns (the signed EdgeAggregate bytes, the
        Acks' bytes, the virtual close time, updates refused as late)."""
        engine, start = self.engines[edge], self.clock
        published: list[bytes] = []
        close, ack_bytes, late = deadline, 0, 0

        def deliver(at: float, pubs: list) -> None:
            nonlocal close
            if pubs and not published:
                close = at
            published.extend(p.payload for p in pubs)

        deadline_passed = False
        for at, kind, dev, data in events:
            if at > deadline and not deadline_passed:
                self.now, deadline_passed = start + deadline, True
                deliver(deadline, engine.tick(self.now))
            self.now = start + at
            if kind == "status":
                deliver(at, engine.handle_status(dev.id, data))
                continue
            ack, pubs = engine.handle_update(dev.id, data)
            deliver(at, pubs)
            ack_bytes += len(encode(ack))
            late += int(not ack.accepted and ack.reason == int(Reason.DEADLINE))
        if not deadline_passed:
            self.now = start + deadline
            deliver(deadline, engine.tick(self.now))
        (payload,) = published   # one synchronous round: exactly one aggregate
        for batch in [b for b, _ in engine.store.unpublished()]:
            engine.published(batch)   # the gateway's outbox, emptied as the broker takes it
        return payload, ack_bytes, close, late

    def _edge_engine(self, edge: str) -> EdgeEngine:
        """The edge's own engine (edge.engine) on a state dir of this run, with the method's filters, weighting and
        forward compression, the virtual clock and this run's seeded generator."""
        keys = self.workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        signing.save_private_key(self.edge_keys[edge], keys / f"{edge}.key")
        signing.save_public_key(self.cloud_key.public_key(), keys / "cloud.pub")
        m = self.method
        cfg = EdgeConfig(edge_id=edge, state_dir=self.workdir / "edges" / edge,
                         enrolment_dir=self.workdir / "enrol" / edge, signing_key=keys / f"{edge}.key",
                         cloud_public_key=keys / "cloud.pub", filters=m.filters, weighting=m.weighting,
                         forward=ForwardConfig(compression=dict(m.forward_compression)),
                         max_update_bytes=MAX_UPDATE_BYTES)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        return EdgeEngine(cfg, log=QUIET, clock=lambda: self.now, rng=self.rng)
