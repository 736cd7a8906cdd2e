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
import math
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from cloud.accounting import Entry, PrivacyLedger, central_event, device_event, epsilon
from cloud.aggregator import RESIDUAL, decode_payload
from cloud.model import compress_broadcast
from cloud.strategies import make
from cloud.strategies.base import DeviceInfo, EdgeResult, RoundDefaults
from cloud.strategies.heterogeneity import observe
from cloud.strategies.scaffold import CONTROL
from device.agent import ENVELOPE_BYTES
from device.runtime import TrainableModel
from device.training import planned_steps, train_round
from edge import central_dp
from edge.aggregate import Meta, aggregate
from edge.rounds import RoundsConfig, quorum_count
from edge.rows import Rows
from edge.validation import RoundContext, authenticate, decode_delta
from experiments.datasets import Federation
from experiments.sim import hetero
from experiments.sim.methods import Method
from experiments.sim.poison import Poison, flip_labels, malicious, poison_delta
from protocol import signing
from protocol.compression import CompressionSettings, decode_update, encode_update, encoded_size_bound
from protocol.errors import ProtocolError, Reason
from protocol.keyring import KeyRing
from protocol.messages import (
    Ack,
    Capability,
    CentralDPReport,
    DeviceStatus,
    DeviceUpdate,
    EdgeAggregate,
    GlobalModel,
    PrivacySpent,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    floats_to_bytes,
    sign_message,
    verify_message,
)

MAX_UPDATE_BYTES = 4 * 1024 * 1024
NO_DP_EPSILON = 1e9


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
        self.keyrings = {e: KeyRing(self.workdir / "enrol" / e) for e in self.edges}
        self.edge_residuals: dict[str, np.ndarray | None] = {}
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
        self.clock = 0.0
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
        up = 0
        gone = hetero.offline(len(addressed), cfg.hetero.dropout, self.rng)
        global_flat = self.server.weights.copy()
        c_global = self.server.arrays.get(CONTROL)
        settings = CompressionSettings.from_dict(rc.compression)
        per_edge: dict[str, list] = {e: [] for e in self.edges}
        arrivals: dict[str, list[float]] = {e: [] for e in self.edges}
        declined = offline = missed = 0
        for dev, is_gone in zip(addressed, gone):
            if is_gone:
                up += len(self._status(dev, "offline"))   # the broker publishes its last will
                offline += 1
                continue
            planned = planned_steps(rc.plan, len(dev.x), self.batch)
            download_s = hetero.transfer_s(len(gm_bytes) + len(ann_bytes), dev.profile.bandwidth_bps)
            upload_s = hetero.transfer_s(encoded_size_bound(self.n, settings) + ENVELOPE_BYTES,
                                         dev.profile.bandwidth_bps)
            steps = hetero.local_steps(planned, dev.profile, deadline - download_s - upload_s, m.partial_work)
            if steps < 1 or len(dev.x) < self.batch:
                up += len(self._status(dev, "declined"))
                declined += 1
                continue
            data, steps_done = self._train(dev, rc, global_flat, c_global, steps, settings)
            up += len(data)
            arrival = hetero.arrival_s(len(gm_bytes) + len(ann_bytes), steps_done, len(data), dev.profile)
            if arrival > deadline:
                missed += 1
                down += len(encode(Ack(dev.edge, dev.id, self.round_id, False, int(Reason.DEADLINE), "late")))
                continue
            per_edge[dev.edge].append((dev, data))
            arrivals[dev.edge].append(arrival)
        results, aggs, close_times, filtered, steps_all = [], [], [], 0, []
        for edge in self.edges:
            expected = sum(1 for d in addressed if d.edge == edge)
            agg_bytes, n_ack_bytes, close = self._edge_round(edge, per_edge[edge], ann, arrivals[edge], expected,
                                                              deadline)
            down += n_ack_bytes
            close_times.append(close)
            if agg_bytes is None:
                continue
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
    def _status(self, dev: DeviceSim, state: str) -> bytes:
        cap = Capability(dev.profile.compute_class, 64, dev.profile.bandwidth_bps, dev.profile.steps_per_s)
        return encode(DeviceStatus(dev.id, dev.edge, state, self.version, 1, 0.0, 0.0, self.clock, self.round_id,
                                   cap))

    def _train(self, dev: DeviceSim, rc, global_flat: np.ndarray, c_global: np.ndarray | None, steps: int,
               settings: CompressionSettings) -> tuple[bytes, int]:
        """The device agent's run_round + _finish, minus persistence and MQTT: the signed DeviceUpdate bytes."""
        result = train_round(self.model, dev.x, dev.y, global_flat, rc.plan, steps, self.rng,
                             lr_scale=rc.lr_scale.get(dev.id, 1.0), c_global=c_global, c_local=dev.control)
        delta = result.delta
        if dev.malicious and self.cfg.poison is not None:
            delta = poison_delta(delta, self.cfg.poison, self.rng)
        payload, dev.residual = encode_update(delta, settings, dev.residual, self.rng)
        control_payload = None
        if result.control_delta is not None:
            control_payload, _ = encode_update(result.control_delta, settings, None, self.rng)
            sent = decode_update(control_payload, self.n)
            dev.control = sent if dev.control is None else dev.control + sent
        eps = round_epsilon(result.noise_mult, result.sample_rate, result.local_steps, self.cfg.delta)
        spent = PrivacySpent(epsilon=eps, delta=self.cfg.delta, accountant="rdp", noise_mult=result.noise_mult,
                             sample_rate=result.sample_rate, steps=result.local_steps)
        cap = Capability(dev.profile.compute_class, 64, dev.profile.bandwidth_bps, dev.profile.steps_per_s)
        update = sign_message(DeviceUpdate(
            device_id=dev.id, edge_id=dev.edge, round_id=self.round_id, base_version=self.version,
            num_samples=result.num_samples, local_steps=result.local_steps,
            train_loss=result.loss if math.isfinite(result.loss) else 0.0, privacy=spent,
            n_params=self.n, delta=payload, capability=cap,
            nonce=np.frombuffer(self.rng.bytes(16), np.uint8).tobytes(), timestamp=self.clock,
            control_delta=control_payload), dev.key)
        return encode(update), result.local_steps

    # ------------------------------------------------------------------ edge side
    def _edge_round(self, edge: str, received: list, ann: RoundAnnouncement, arrivals: list[float], expected: int,
                    deadline: float) -> tuple[bytes | None, int, float]:
        """(signed EdgeAggregate bytes or None when nothing was accepted, Ack bytes, virtual close time)."""
        ctx = RoundContext(edge_id=edge, round_id=ann.round_id, model_version=ann.model_version, n_params=self.n,
                           cohort=frozenset(ann.cohort), closed=False, seed=None, rounds=RoundsConfig())
        need = quorum_count(expected, RoundsConfig())
        close = sorted(arrivals)[need - 1] if expected and len(arrivals) >= need else deadline
        accepted, ack_bytes = [], 0
        for dev, data in received:
            try:
                msg, _ = authenticate(data, dev.id, ctx, self.keyrings[edge], MAX_UPDATE_BYTES)
                idx, values = decode_delta(msg, ctx)
                control = None if msg.control_delta is None else decode_update(msg.control_delta, self.n)
                accepted.append((msg, idx, values, control, len(data)))
                ack = Ack(edge, dev.id, ann.round_id, True, int(Reason.OK))
            except ProtocolError as exc:
                ack = Ack(edge, dev.id, ann.round_id, False, int(exc.reason), exc.detail[:256])
            ack_bytes += len(encode(ack))
        if not accepted:
            return None, ack_bytes, close
        data, self.edge_residuals[edge] = edge_aggregate(edge, accepted, ann, self.method, self.n,
                                                         self.edge_keys[edge], self.rng,
                                                         expected / max(len(self.keyrings[edge].enrolled()), 1),
                                                         self.clock,
                                                         self.edge_residuals.get(edge))
        return data, ack_bytes, close


def edge_aggregate(edge: str, accepted: list, ann: RoundAnnouncement, method: Method, n_params: int, key,
                   rng: np.random.Generator, sampling_rate: float, now: float,
                   residual: np.ndarray | None) -> tuple[bytes, np.ndarray | None]:
    """The edge engine's _aggregate + _encode over already-admitted updates: edge.aggregate.aggregate, then the
    signed EdgeAggregate compressed with the method's forward compression (error feedback when it is lossy).
    Returns (message bytes, the edge's new residual)."""
    msgs = [a[0] for a in accepted]
    rows = Rows.stack(n_params, [(idx, values) for _, idx, values, _, _ in accepted])
    ids = [m.device_id for m in msgs]
    meta = Meta(num_samples=np.array([m.num_samples for m in msgs], np.float64),
                losses=np.array([m.train_loss for m in msgs], np.float64),
                classes=[m.capability.compute_class for m in msgs], staleness=np.ones(len(msgs)),
                sample_weight=np.array([ann.sample_weight.get(d, 1.0) for d in ids], np.float64))
    dp = ann.central_dp
    clip, noise_mult = (dp.clip, dp.noise_mult) if dp is not None else (0.0, 0.0)
    noise = rng.standard_normal(n_params) if clip > 0 else None
    result = aggregate(rows, meta, method.weighting, method.filters, clip=clip, noise_mult=noise_mult, rng=rng,
                       noise=noise)
    counted = result.alpha > 0
    kept = [d for d, c in zip(ids, counted) if c]
    forward = CompressionSettings.from_dict({**CompressionSettings().to_dict(), **method.forward_compression})
    lossy = not (forward.method == "dense" and forward.bits == 32)
    delta = b""
    if kept:
        delta, new_residual = encode_update(result.mean, forward, residual if lossy else None)
        residual = new_residual if lossy else None
    controls = [a[3] for a, c in zip(accepted, counted) if c and a[3] is not None]
    control = encode_update(np.mean(controls, axis=0).astype(np.float32), forward)[0] if controls else None
    report = None
    if clip > 0:
        rate = dp.sampling_rate if dp.sampling_rate > 0 else sampling_rate
        report = central_dp.report(clip, noise_mult, rate, result.num_clipped)
    agg = EdgeAggregate(
        edge_id=edge, round_id=ann.round_id, base_version=ann.model_version, num_devices=len(kept),
        num_samples=int(sum(m.num_samples for m, c in zip(msgs, counted) if c)), weight_sum=float(result.weight_sum),
        n_params=n_params, delta=delta, significant=bool(kept), central_dp=report,
        filtered=[d for d, f in zip(ids, result.flagged) if f], rejected={}, device_ids=kept,
        max_device_epsilon=float(max(m.privacy.epsilon for m in msgs)),
        mean_local_steps=float(np.mean([m.local_steps for m in msgs])),
        nonce=rng.bytes(16), timestamp=now, control_delta=control,
        device_bytes=int(sum(a[4] for a, c in zip(accepted, counted) if c)),
        update_norms={d: float(result.norms[i]) for i, d in enumerate(ids) if counted[i]})
    return encode(sign_message(agg, key)), residual


@lru_cache(maxsize=4096)
def round_epsilon(noise_mult: float, sample_rate: float, steps: int, delta: float) -> float:
    """Example-level epsilon of one round of DP-SGD, as the device reports it in PrivacySpent. Without noise it is
    infinite, which the strict decoder refuses (NON_FINITE): NO_DP_EPSILON stands for it on the wire."""
    return min(epsilon([Entry(noise_mult, sample_rate, steps)], delta), NO_DP_EPSILON)
