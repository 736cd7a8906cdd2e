"""One federation (devices -> edges -> cloud) in one process, round by round, on a virtual clock.

The simulator holds no tier logic: it runs the tiers' own code and replaces only MQTT (direct calls) and time (a
virtual clock fed by the heterogeneity model, experiments.sim.hetero). Per round:
1. cloud: the cloud's engine (cloud.engine.CloudEngine, as the daemon runs it) has published a signed GlobalModel
   ("full", or a compressed "delta") and RoundAnnouncement; the devices verify both and rebuild the weights with
   protocol.global_model.rebuild, every addressed device and every edge receives both (bytes counted per receiver);
2. device: the steps that fit (hetero), device.training.train_round in the shared TFLite interpreter (DP-SGD in the
   graph), device.update.build_update (compression with error feedback, SCAFFOLD control, cumulative epsilon), a
   signed DeviceUpdate, or a DeviceStatus ("declined"; "offline" is the broker's last will);
3. edge: each edge's own engine (edge.engine.EdgeEngine, on a state dir of this run) receives the statuses and
   updates in virtual arrival order: admission, quorum or deadline close, filters, weighting, central DP,
   significance, forward compression, Acks -- the gateway's code, so late updates are refused as DEADLINE;
4. cloud: the engine admits the signed EdgeAggregates and its tick closes the round (strategy, accounting,
   evaluation through the `evaluate` hook, here the TFLite interpreter's logits on the held-out set: loss,
   accuracy and, for binary tasks, AUROC, AUPRC and min(Se, +P), cloud.evaluation).
Bytes are the lengths of the encoded messages. The DP noise comes from seeded generators (reproducible runs); the
daemons use the OS CSPRNG. tests/test_one_code_path.py checks that a real edge daemon over a real broker turns the
same updates into the same aggregates.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cloud.config import CentralDPConfig, PrivacyConfig, RoundSettings, StrategyConfig
from cloud.engine import CloudEngine
from cloud.evaluation import evaluate_logits, top_class_share
from cloud.strategies.base import DeviceInfo
from cloud.trust import TrustConfig, TrustGate, root_gate
from device.runtime import TrainableModel
from device.training import calibrated_plan, planned_steps, privacy_limit, train_round
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
from protocol.global_model import rebuild
from protocol.messages import (
    Capability,
    DeviceStatus,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    sign_message,
    verify_message,
)

MAX_UPDATE_BYTES = 4 * 1024 * 1024
QUIET = logging.getLogger("experiments.sim.edge")   # the engines' per-round log lines, off unless asked for
QUIET.setLevel(logging.ERROR)


@dataclass(frozen=True)
class SimConfig:
    """One simulated run: the method, its round budget and device plan, DP at both levels, heterogeneity, poison."""

    method: Method
    rounds: int = 20
    lr: float = 0.1
    local_epochs: int = 1
    max_steps: int = 0
    clip: float = 1.0                 # device per-example clip (DP-SGD)
    noise_mult: float = 0.0           # device noise multiplier (0 = no device DP)
    device_epsilon: float = 0.0       # > 0: the cloud's [privacy] device_epsilon with calibrate = true: each device
                                      # lowers noise_mult to the least that keeps it within this over the run
    central_clip: float = 0.0         # edge user-level clip (0 = no central DP)
    central_noise: float = 0.0
    cohort_size: int = 0              # FedIoMT importance sampling: devices per round (0 = everyone)
    hetero: hetero.HeteroConfig = field(default_factory=hetero.HeteroConfig)
    poison: Poison | None = None
    trust_root: int = 0               # cloud.trust: rows of the cloud's clean root set (0 = no trust gate), drawn
                                      # from the clients' training rows (FLTrust's small server-collected set)
    device_majority: bool = True      # cloud.trust's device-majority gate ([trust] device_majority, the default)
    seed: int = 0
    start_s: float = 0.0              # virtual time of round 1's start (a test aligns it with the wall clock)
    eval_every: int = 1
    delta: float = 1e-5


@dataclass
class RoundLog:
    """What one simulated round measured: accuracy, bytes both ways, who took part, virtual time, epsilons."""

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
    auroc: float | None = None        # binary tasks (cloud.evaluation): AUROC, AUPRC, PhysioNet 2012 min(Se, +P)
    auprc: float | None = None
    min_se_ppv: float | None = None
    top_class_share: float | None = None   # largest share of the test set predicted as one class (1 = constant)
    contributors: tuple[str, ...] = ()     # devices whose update counted in an aggregate this round
    credited_noise_mult: float = 0.0       # distributed DP: the smallest share of device noise an edge credited


@dataclass
class DeviceSim:
    """A simulated device: its data, speed profile, key and the state its agent would persist between rounds."""

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
    offline: bool = False             # its last status is its last will: the edge excuses it until it returns


class Simulator:
    """A whole federation in one process on a virtual clock, driving the tiers' own engines (module docstring)."""

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
        steps = hetero.deadline_steps([planned_steps(self.plan, len(d.x), self.batch) for d in self.devices],
                                      [len(d.x) for d in self.devices], cfg.hetero.deadline_quantile,
                                      cfg.hetero.deadline_weighted)
        dense = 4 * self.n + ENVELOPE_BYTES   # the deadline is the operator's, the same whatever the method sends
        self.round_seconds = hetero.deadline_s(steps, dense, dense, cfg.hetero)
        self.clock = cfg.start_s          # virtual time at the start of the open round
        self.now = cfg.start_s            # virtual time the edges' engines read (their clock)
        self.engines = {e: self._edge_engine(e) for e in self.edges}
        self.cloud = CloudEngine(self._cloud_settings(), self.cloud_key, lambda e: self.edge_keys[e].public_key(),
                                 np.asarray(initial, np.float32), self.workdir / "cloud", evaluate=self._evaluate,
                                 rng=self.rng, log=QUIET, trust=self._trust_gate())
        self.version, self.weights, self.control = -1, None, None   # the global model as the devices hold it
        for dev in self.devices:   # what the cloud learns from the devices' retained statuses (Capability)
            self.cloud.handle_status(self._status(dev, "online"))
        self.cloud.start(self.clock)
        self.log: list[RoundLog] = []
        self.last_share: float | None = None

    def _trust_gate(self) -> TrustGate | None:
        """The cloud's trust gate on `trust_root` clean rows drawn (seeded) from the clients' own (unflipped) rows."""
        if not self.cfg.trust_root:
            return None
        rng = np.random.default_rng(self.cfg.seed + 7919)   # its own stream: the devices' draws stay the same
        x = np.concatenate([c.x for c in self.fed.clients]).astype(np.float32)
        y = np.concatenate([c.y for c in self.fed.clients]).astype(np.int64)
        rows = rng.choice(len(x), min(self.cfg.trust_root, len(x)), replace=False)
        return root_gate(self.model, x[rows], y[rows], TrustConfig(), rng)

    def _cloud_settings(self) -> RoundSettings:
        """The cloud.toml a run's operator would write for this method and configuration."""
        cfg, m = self.cfg, self.method
        options = dict(m.options, cohort_size=cfg.cohort_size) if m.strategy == "fediomt" else dict(m.options)
        return RoundSettings(
            model="sim", edges=tuple(self.edges), rounds=cfg.rounds, round_timeout_s=self.round_seconds, grace_s=0.0,
            devices=tuple(d.id for d in self.devices), seed=cfg.seed, plan=self.plan, compression=dict(m.compression),
            central_dp=CentralDPConfig(cfg.central_clip, cfg.central_noise),
            privacy=PrivacyConfig(cfg.delta, device_epsilon=cfg.device_epsilon, calibrate=cfg.device_epsilon > 0),
            strategy=StrategyConfig(m.strategy, options), model_encoding=m.downlink, model_full_every=m.full_every,
            model_compression={**CompressionSettings().to_dict(), **m.downlink_compression},
            trust=TrustConfig(device_majority=cfg.device_majority))

    @property
    def infos(self) -> dict[str, DeviceInfo]:
        """What the cloud knows of each device (compute class, speed, quality)."""
        return self.cloud.state.devices

    def _evaluate(self, weights: np.ndarray) -> tuple[float | None, float | None, dict]:
        """The cloud's evaluation hook: the held-out set through the TFLite interpreter, every eval_every rounds."""
        due = self.cloud.state.round_id % self.cfg.eval_every == 0 or self.cloud.state.round_id == self.cfg.rounds
        return self.evaluation(weights) if due else (None, None, {})

    def evaluation(self, weights: np.ndarray | None = None) -> tuple[float, float, dict]:
        """(loss, accuracy, binary scores: cloud.evaluation) on the held-out set, from the interpreter's logits, of
        the cloud's current model unless `weights` are given."""
        self.model.set_flat(self.cloud.state.server.weights if weights is None else weights)
        logits = self.model.infer(self.fed.x_test)
        self.last_share = top_class_share(logits)
        return evaluate_logits(logits, self.fed.y_test)

    def accuracy(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """(loss, accuracy) on the held-out set, of the cloud's current model unless `weights` are given."""
        return self.evaluation(weights)[:2]

    # ------------------------------------------------------------------ one round
    def run_round(self) -> RoundLog:
        t0 = time.monotonic()
        cfg, m = self.cfg, self.method
        gm_bytes, ann_bytes = self.cloud.model_payload, self.cloud.announcement_payload
        ann = self._receive(gm_bytes, ann_bytes)
        deadline = ann.deadline - self.clock
        cohort = set(ann.cohort)
        addressed = [d for d in self.devices if not cohort or d.id in cohort]
        down = (len(gm_bytes) + len(ann_bytes)) * (len(addressed) + len(self.edges))
        for engine in self.engines.values():   # the edges adopt the model and open the round (relays counted above)
            self.now = self.clock
            engine.handle_cloud("model", gm_bytes)
            engine.handle_cloud("round", ann_bytes)
        gone = hetero.offline(len(addressed), cfg.hetero.dropout, self.rng)
        settings = CompressionSettings.from_dict(ann.compression)
        arrivals: dict[str, list[tuple[float, str, DeviceSim, bytes]]] = {e: [] for e in self.edges}
        declined = offline = 0
        for dev, is_gone in zip(addressed, gone):
            if is_gone:   # the broker publishes its last will
                arrivals[dev.edge].append((0.0, "status", dev, self._status(dev, "offline", ann.round_id)))
                offline += 1
                dev.offline = True
                continue
            if dev.offline:   # back: its agent says "online" on connecting, as the round reaches it
                arrivals[dev.edge].append((0.0, "status", dev, self._status(dev, "online")))
                dev.offline = False
            planned = planned_steps(ann.plan, len(dev.x), self.batch)
            download_s = hetero.transfer_s(len(gm_bytes) + len(ann_bytes), dev.profile.bandwidth_bps)
            upload_s = hetero.transfer_s(encoded_size_bound(self.n, settings) + ENVELOPE_BYTES,
                                         dev.profile.bandwidth_bps)
            steps = hetero.local_steps(planned, dev.profile, deadline - download_s - upload_s, m.partial_work)
            if steps < 1 or len(dev.x) < self.batch:
                arrivals[dev.edge].append((download_s, "status", dev, self._status(dev, "declined", ann.round_id)))
                declined += 1
                continue
            data, steps_done = self._train(dev, ann, steps, settings)
            arrival = hetero.arrival_s(len(gm_bytes) + len(ann_bytes), steps_done, len(data), dev.profile)
            arrivals[dev.edge].append((arrival, "update", dev, data))
        up = sum(len(data) for events in arrivals.values() for _, _, _, data in events)
        aggs, close_times, missed = [], [], 0
        for edge in self.edges:
            agg_bytes, ack_bytes, close, late = self._edge_round(edge, sorted(arrivals[edge], key=lambda e: e[0]),
                                                                  deadline)
            down += ack_bytes
            missed += late
            close_times.append(close)
            up += len(agg_bytes)
            aggs.append(decode(agg_bytes, expect=EdgeAggregate))
            for receipt in self.cloud.handle_aggregate(edge, agg_bytes):   # the outbox empties as the cloud confirms
                down += len(receipt.payload)
                self.engines[edge].handle_receipt(receipt.payload)
        virtual = max(close_times) if close_times else deadline
        self.clock += virtual
        self.cloud.tick(self.clock)   # every edge reported: the round closes, the next one is announced
        record = self.cloud.state.history[-1]
        eps = record["epsilon"]
        share = self.last_share if record["accuracy"] is not None else None
        counted = tuple(sorted(d for a in aggs for d in a.device_ids if d not in set(a.filtered)))
        n_part = sum(a.num_devices for a in aggs)
        mean_steps = sum(a.mean_local_steps * a.num_devices for a in aggs) / n_part if n_part else 0.0
        log = RoundLog(ann.round_id, record["accuracy"], record["loss"], up, down, n_part, missed, declined, offline,
                       sum(len(a.filtered) for a in aggs), mean_steps, virtual, time.monotonic() - t0,
                       _finite(eps["device"]), _finite(eps["central"]), record.get("auroc"), record.get("auprc"),
                       record.get("min_se_ppv"), share, counted,
                       min((a.credited_noise_mult for a in aggs if a.central_dp is not None), default=0.0))
        self.log.append(log)
        return log

    def run(self) -> list[RoundLog]:
        while len(self.log) < self.cfg.rounds and not self.cloud.stop_reason:
            self.run_round()
        return self.log

    def _receive(self, gm_bytes: bytes, ann_bytes: bytes) -> RoundAnnouncement:
        """What every device does with the cloud's two messages (the same for all, so done once): verify both and
        rebuild the global weights (protocol.global_model, full or delta)."""
        public = self.cloud_key.public_key()
        gm = decode(gm_bytes, expect=GlobalModel)
        verify_message(gm, public)
        ann = decode(ann_bytes, expect=RoundAnnouncement)
        verify_message(ann, public)
        if gm.model_version != self.version:
            self.weights, self.control = rebuild(gm, self.version, self.weights)
            self.version = gm.model_version
        return ann

    # ------------------------------------------------------------------ device side
    def _capability(self, dev: DeviceSim) -> Capability:
        return Capability(dev.profile.compute_class, 64, dev.profile.bandwidth_bps, dev.profile.steps_per_s)

    def _status(self, dev: DeviceSim, state: str, round_id: int | None = None) -> bytes:
        return encode(DeviceStatus(dev.id, dev.edge, state, max(self.version, 0), 1, 0.0, 0.0, self.clock, round_id,
                                   self._capability(dev)))

    def _train(self, dev: DeviceSim, ann: RoundAnnouncement, steps: int,
               settings: CompressionSettings) -> tuple[bytes, int]:
        """The device agent's round (device.training.train_round, device.update.build_update), minus persistence
        and MQTT: the signed DeviceUpdate bytes and the steps done. A malicious device poisons its delta first."""
        plan = calibrated_plan(ann.plan, dev.history, len(dev.x), *privacy_limit(ann.plan, math.inf, self.cfg.delta))
        result = train_round(self.model, dev.x, dev.y, self.weights, plan, steps, self.rng,
                             lr_scale=ann.lr_scale.get(dev.id, 1.0), c_global=self.control, c_local=dev.control,
                             user_clip=ann.central_dp.clip if ann.central_dp is not None else 0.0)
        if dev.malicious and self.cfg.poison is not None:
            result = replace(result, delta=poison_delta(result.delta, self.cfg.poison, self.rng))
        out = build_update(result, RoundIdentity(dev.id, dev.edge, ann.round_id, self.version), settings,
                           history=dev.history, residual=dev.residual, control=dev.control, delta=self.cfg.delta,
                           accountant_name="rdp", capability=self._capability(dev), n_params=self.n, rng=self.rng,
                           nonce=self.rng.bytes(16), timestamp=self.clock)
        dev.history, dev.residual, dev.control = out.history, out.residual, out.control
        update = out.update
        if dev.malicious and self.cfg.poison is not None and self.cfg.poison.num_samples:
            update = replace(update, num_samples=self.cfg.poison.num_samples)
        return encode(sign_message(update, dev.key)), result.local_steps

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
                         cloud_public_key=keys / "cloud.pub", filters=m.filters, weighting=m.weighting, bounds=m.bounds,
                         forward=ForwardConfig(compression=dict(m.forward_compression)),
                         max_update_bytes=MAX_UPDATE_BYTES)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        return EdgeEngine(cfg, log=QUIET, clock=lambda: self.now, rng=self.rng)


def _finite(epsilon: float | None) -> float:
    """The cloud's records write an unbounded epsilon as null (JSON has no infinity)."""
    return math.inf if epsilon is None else epsilon
