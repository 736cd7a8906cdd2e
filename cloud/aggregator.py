"""The cloud aggregator daemon: a thin loop around the strategies, the accountant and the model.

One round: publish the signed GlobalModel (retained, fl/cloud/model) and RoundAnnouncement (retained,
fl/cloud/round); collect signed EdgeAggregates from fl/cloud/aggregates/+ (each verified with the edge's key from
`edge_keys_dir`; replays, wrong rounds, duplicates, stale bases and bad payloads are rejected and counted); close
when every expected edge reported or at the deadline; combine and apply the strategy; account privacy; evaluate;
checkpoint atomically; append the round to rounds.jsonl; publish the next model. Stops after `rounds` rounds or
when a privacy budget would be exceeded. With edge-level secure aggregation (`[secagg]` mode "trusted_edge",
`edges_mask = true`) the edges send only metadata aggregates and the cloud runs the SecAgg server over them
(protocol/secagg/runner.py, on a second connection): it closes the round when the protocol ends, with the
sample-weighted mean over the edges in the sum, and skips it (model unchanged) when the protocol aborts. Retained
device statuses (fl/+/status/+) tell it devices' compute class
and speed for the heterogeneity-aware strategies.

Crash safety: an aggregate is written to pending/ before its PUBACK (manual acknowledgements, persistent session),
and a round's effects reach disk in one atomic checkpoint, so kill -9 at any instant resumes at the open round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud.accounting import PrivacyLedger, central_event, device_event, epsilon, exhausted, json_epsilon
from cloud.config import CloudConfig, compression_from_table
from cloud.contributions import ContributionRecorder
from cloud.distill import distill_round, load_proxy
from cloud.metrics import Metrics
from cloud.model import CloudModel, compress_broadcast, load_eval_data
from cloud.push import push_bundle
from cloud.state import CloudState, load, save
from cloud.strategies import make
from cloud.strategies.base import DeviceInfo, EdgeResult, RoundDefaults
from cloud.strategies.heterogeneity import observe
from cloud.strategies.scaffold import CONTROL
from protocol.atomic import atomic_write
from protocol.compression import decode_update
from protocol.errors import ProtocolError, Reason
from protocol.keyring import KeyRing
from protocol.logs import event
from protocol.messages import (
    DeviceStatus,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    decode,
    encode,
    floats_to_bytes,
    sign_message,
    verify_raw,
)
from protocol.mqtt import INBOX_SIZE, Connection
from protocol.secagg import SecAggResult, SecAggServer
from protocol.secagg.edge_tier import EdgeMaskedRound
from protocol.secagg.runner import SecAggRunner
from protocol.signing import load_private_key
from protocol.tls import client_context
from protocol.topics import CLOUD, CLOUD_MODEL, CLOUD_ROUND, ROOT, last_level

AGGREGATES = f"{ROOT}/cloud/aggregates/+"
UNAVAILABLE = ("budget_exhausted", "offline")  # device states the strategies do not select
RESIDUAL = "model_residual"  # server-side error feedback of "delta" GlobalModels
STATUSES = f"{ROOT}/+/status/+"


@dataclass(frozen=True)
class Received:
    """An accepted aggregate of the open round, decoded once."""

    agg: EdgeAggregate
    size: int
    delta: np.ndarray | None
    control: np.ndarray | None


def decode_payload(payload: bytes | None, n_params: int) -> np.ndarray | None:
    return None if not payload else decode_update(payload, n_params)


class CloudAggregator:
    def __init__(self, cfg: CloudConfig, log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.key = load_private_key(cfg.signing_key)
        self.edges = cfg.edge_ids()
        if not self.edges:
            raise ValueError(f"no edges: set `edges` or put {{edge}}.pub files in {cfg.edge_keys_dir}")
        self.edge_keys = KeyRing(cfg.edge_keys_dir, cfg.crl_file, cfg.key_check_s, log=log)
        self.model = CloudModel(cfg.model, cfg.model_options, cfg.seed)
        self.eval_data = load_eval_data(cfg.eval_data) if cfg.eval_data else None
        if self.eval_data is not None and self.eval_data.x.shape[1:] != self.model.input_shape:
            raise ValueError(f"{cfg.eval_data}: rows of shape {self.eval_data.x.shape[1:]}, model {cfg.model!r} "
                             f"takes {self.model.input_shape}")
        defaults = RoundDefaults(cfg.plan, cfg.compression_settings(), cfg.central_dp.report(), cfg.round_timeout_s)
        self.strategy = make(cfg.strategy.name, defaults, cfg.strategy.options)
        self.metrics = Metrics()
        self.run_dir = Path(cfg.run_dir)
        self.pending_dir = self.run_dir / "pending"
        self.checkpoint = self.run_dir / "checkpoint.npz"
        self.state = load(self.checkpoint) if self.checkpoint.exists() else self._fresh()
        expected = set(self.strategy.init_state(self.model.initial).arrays)
        if self.state.server.weights.size != self.model.n_params or not expected <= set(self.state.server.arrays):
            raise ValueError(f"{self.checkpoint} holds another model or strategy's state: use a new run_dir")
        self.nonces = set(self.state.nonces)
        self.received: dict[str, Received] = {}
        self.rejected: Counter = Counter()
        self.deadline = 0.0
        self.model_msg_size = 0
        self.model_delta: bytes | None = None  # the compressed delta of the current version, when it has one
        self.model_settings = compression_from_table(cfg.model_compression)
        self.stop = threading.Event()
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX_SIZE)
        self.conn = Connection(cfg.broker, cfg.client_id, [AGGREGATES, STATUSES], self.inbox, log)
        self.recorder: ContributionRecorder | None = None
        self.distiller: threading.Thread | None = None
        self.students: dict[str, list[np.ndarray]] = {}  # float student weights per class: warm starts
        self.edge_tier = EdgeMaskedRound.from_announcement(cfg.secagg)  # edge-level SecAgg; None = plaintext
        self.secagg_conn = Connection(cfg.broker, cfg.client_id + "-secagg", [], self.inbox, log, manual_ack=False) \
            if self.edge_tier else None
        self.secagg = SecAggRunner(self.secagg_conn.client, cfg.secagg_step_timeout_s, log) if self.secagg_conn \
            else None
        self.masked_outcome: tuple[SecAggResult | ProtocolError, float] | None = None  # (outcome, monotonic time)
        if cfg.ledger is not None and self.eval_data is None:
            raise ValueError("[ledger] needs eval_data: contributions are scored on the held-out set")

    def _fresh(self) -> CloudState:
        server = self.strategy.init_state(self.model.initial)
        devices = {d: DeviceInfo(d) for d in self.cfg.devices}
        return CloudState(1, 1, server, PrivacyLedger(self.cfg.privacy.delta),
                          np.random.default_rng(self.cfg.seed).bit_generator.state, devices)

    # ------------------------------------------------------------------ publishing
    def _publish_model(self) -> None:
        """The current version, retained: as a delta against the previous one when it has one, else in full."""
        s = self.state
        weights = floats_to_bytes(s.server.weights)
        control = s.server.arrays.get(CONTROL)
        delta = self.model_delta is not None
        msg = GlobalModel(self.cfg.model, s.version, "delta" if delta else "full", s.version - 1 if delta else None,
                          self.model.n_params, self.model_delta if delta else weights,
                          hashlib.sha256(weights).digest(), None if control is None else floats_to_bytes(control))
        payload = encode(sign_message(msg, self.key))
        self.model_msg_size = len(payload)
        self.conn.client.publish(CLOUD_MODEL, payload, qos=1, retain=True)
        event(self.log, "model published", version=s.version, bytes=len(payload))

    def _open_round(self, now: float) -> None:
        """Announce the open round: re-publish a checkpointed announcement, or configure a new one."""
        s = self.state
        if s.announcement:
            ann = decode(s.announcement, expect=RoundAnnouncement)
            if ann.deadline < now + 1.0:  # restarted after its deadline: same round, same cohort, new deadline
                ann = sign_message(dataclasses.replace(ann, deadline=now + self.cfg.round_timeout_s), self.key)
        else:
            available = {k: d for k, d in s.devices.items() if d.state not in UNAVAILABLE}
            if s.devices and all(d.state == "budget_exhausted" for d in s.devices.values()):
                self._finish(f"privacy budget spent on every device: all {len(s.devices)} report budget_exhausted: "
                             f"stopping before round {s.round_id}")
                return
            rng = np.random.default_rng()
            rng.bit_generator.state = s.rng_state
            rc = self.strategy.configure_round(s.server, s.round_id, available, rng)
            s.rng_state = rng.bit_generator.state
            projected = s.ledger.report(
                self.cfg.privacy.accountant,
                device_event(rc.plan, s.min_local_examples) if s.min_local_examples else None,
                central_event([rc.central_dp]) if self.cfg.central_dp.clip > 0 else None)
            reason = exhausted(projected, self.cfg.privacy.device_epsilon, self.cfg.privacy.central_epsilon)
            if reason:
                self._finish(f"{reason}: stopping before round {s.round_id}")
                return
            ann = sign_message(RoundAnnouncement(
                round_id=s.round_id, model_name=self.cfg.model, model_version=s.version,
                strategy=self.strategy.name, deadline=now + self.cfg.round_timeout_s, plan=rc.plan,
                compression=rc.compression, edges=list(self.edges), cohort=rc.cohort, lr_scale=rc.lr_scale,
                sample_weight=rc.sample_weight, central_dp=rc.central_dp, secagg=self.cfg.secagg_for_round()),
                self.key)
        s.announcement = encode(ann)
        save(self.checkpoint, s)
        self.deadline = ann.deadline
        self.conn.client.publish(CLOUD_ROUND, s.announcement, qos=1, retain=True)
        event(self.log, "round announced", round=ann.round_id, version=ann.model_version,
              cohort=len(ann.cohort) or "all", deadline_in_s=round(ann.deadline - now, 1))
        if self.secagg is not None and self.secagg.started != ann.round_id:
            self.masked_outcome = None
            tier = self.edge_tier
            server = SecAggServer(CLOUD, ann.round_id, tier.config, tier.length(self.model.n_params),
                                  {e: self._edge_key(e) for e in self.edges})
            self.secagg.start(server, max(0.0, ann.deadline + self.cfg.grace_s - now))  # edges close by then

    # ------------------------------------------------------------------ receiving
    def _edge_key(self, edge: str) -> Ed25519PublicKey:
        if edge not in self.edges:
            raise ProtocolError(Reason.UNKNOWN_SENDER, f"edge {edge!r} is not part of this federation")
        return self.edge_keys.get(edge)

    def _accept(self, topic: str, payload: bytes) -> Received:
        """Verify one aggregate completely; raises ProtocolError (nothing is changed) or returns it decoded."""
        s = self.state
        edge = last_level(topic)
        agg = decode(payload, expect=EdgeAggregate)
        if agg.edge_id != edge:
            raise ProtocolError(Reason.WRONG_SENDER, f"topic names {edge!r}, message {agg.edge_id!r}")
        verify_raw(payload, agg, self._edge_key(edge))
        if agg.nonce.hex() in self.nonces:
            raise ProtocolError(Reason.REPLAY, f"nonce of {edge!r} seen before")
        if agg.round_id != s.round_id:
            reason = Reason.DEADLINE if agg.round_id < s.round_id else Reason.WRONG_ROUND
            raise ProtocolError(reason, f"round {agg.round_id} from {edge!r}, open round is {s.round_id}")
        if edge in self.received:
            raise ProtocolError(Reason.DUPLICATE, f"{edge!r} already sent round {agg.round_id}")
        if agg.base_version != s.version:
            raise ProtocolError(Reason.STALE, f"base version {agg.base_version}, current {s.version}")
        if agg.n_params != self.model.n_params:
            raise ProtocolError(Reason.BAD_SHAPE, f"{agg.n_params} params, model has {self.model.n_params}")
        if self.edge_tier is not None and (agg.delta or agg.control_delta or agg.num_samples or agg.weight_sum
                                           or agg.update_norms or agg.significant):
            raise ProtocolError(Reason.BAD_VALUE, "plaintext aggregate in an edge-masked round (metadata only)")
        delta = decode_payload(agg.delta, agg.n_params) if agg.significant else None
        if agg.significant and delta is None:
            raise ProtocolError(Reason.MALFORMED, "significant aggregate without a delta")
        return Received(agg, len(payload), delta, decode_payload(agg.control_delta, agg.n_params))

    def _on_aggregate(self, topic: str, payload: bytes, persist: bool = True) -> None:
        try:
            got = self._accept(topic, payload)
        except ProtocolError as exc:
            self.rejected[exc.reason.name] += 1
            self.metrics.rejected.labels(reason=exc.reason.name).inc()
            event(self.log, "aggregate rejected", logging.WARNING, topic=topic[:200], reason=exc.reason.name,
                  detail=exc.detail[:200])
            return
        edge = got.agg.edge_id
        if persist:  # durable before the PUBACK: a crash now re-reads it from pending/
            atomic_write(self.pending_dir / f"{got.agg.round_id}-{edge}.cbor", payload)
        self.nonces.add(got.agg.nonce.hex())
        self.state.nonces.append(got.agg.nonce.hex())
        self.received[edge] = got
        self.metrics.aggregates.labels(edge=edge).inc()
        event(self.log, "aggregate accepted", edge=edge, round=got.agg.round_id, devices=got.agg.num_devices,
              significant=got.agg.significant, bytes=got.size)

    def _on_status(self, payload: bytes) -> None:
        try:
            status = decode(payload, expect=DeviceStatus)
        except ProtocolError:
            return  # edge statuses and other traffic on the wildcard: not for us
        info = self.state.devices.get(status.device_id) or DeviceInfo(status.device_id)
        info = dataclasses.replace(info, state=status.state)
        if status.capability is not None:
            info = dataclasses.replace(info, compute_class=status.capability.compute_class,
                                       steps_per_s=status.capability.steps_per_s)
        self.state.devices[status.device_id] = info

    def _load_pending(self) -> None:
        if not self.pending_dir.exists():
            return
        for path in sorted(self.pending_dir.glob("*.cbor")):
            round_id, _, edge = path.stem.partition("-")
            if round_id == str(self.state.round_id):
                self._on_aggregate(f"{ROOT}/cloud/aggregates/{edge}", path.read_bytes(), persist=False)
            else:
                path.unlink()

    def _drain_one(self, timeout: float) -> None:
        try:
            conn, topic, payload, mid, qos = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            if topic.startswith(f"{ROOT}/cloud/aggregates/"):
                self._on_aggregate(topic, payload)
            else:
                self._on_status(payload)
        except Exception:  # the daemon must not die on a message
            self.log.exception("message handling failed", extra={"fields": {"topic": topic[:200]}})
        conn.ack(mid, qos)

    # ------------------------------------------------------------------ closing a round
    def _edge_results(self) -> tuple[list[EdgeResult], list[EdgeAggregate]]:
        """Plaintext rounds: one result per edge (a non-significant one reuses that edge's last delta)."""
        s, results = self.state, []
        for edge, got in sorted(self.received.items()):
            delta = got.delta
            if got.agg.significant:
                s.last_delta[edge] = got.delta
            elif got.agg.num_devices:  # "about the same as my last aggregate": reuse it
                delta = s.last_delta.get(edge)
            results.append(EdgeResult(edge, delta, got.agg.num_samples, got.agg.weight_sum, got.agg.num_devices,
                                      got.agg.mean_local_steps, got.control))
        return results, [r.agg for r in self.received.values()]

    def _masked_results(self, result: SecAggResult) -> tuple[list[EdgeResult], list[EdgeAggregate]]:
        """Edge-masked rounds: one result for the sum over the edges in it (its weighted mean is the strategy's
        combination of them), and the metadata of those edges."""
        total = self.edge_tier.total(result)
        event(self.log, "edge secagg unmasked", round=self.state.round_id, edges=total.edges, dropped=total.dropped,
              devices=total.num_devices, samples=total.num_samples)
        combined = EdgeResult("+".join(total.edges), total.mean if total.num_devices else None, total.num_samples,
                              float(total.num_samples), total.num_devices)
        return [combined], [g.agg for e, g in sorted(self.received.items()) if e in set(total.edges)]

    def _close_round(self, now: float, masked: SecAggResult | None = None) -> None:
        t0 = time.monotonic()
        s = self.state
        ann = decode(s.announcement, expect=RoundAnnouncement)
        results, aggs = self._edge_results() if masked is None else self._masked_results(masked)
        for agg in aggs:
            s.devices = observe(s.devices, agg.device_ids, agg.filtered, agg.update_norms)
        previous = s.server.weights
        s.server = self.strategy.apply(s.server, results, self.cfg.population or len(s.devices))
        rewards = None
        if masked is None:
            rewards = self._record_contributions(ann.round_id, s.version + 1, results, previous)
        elif self.recorder is not None:
            event(self.log, "ledger: edge-masked round, per-edge contributions not scored", round=ann.round_id)
        s.version += 1
        self._compress_model(previous)
        participating = [a for a in aggs if a.num_devices > 0]
        counts = [(r.num_samples, r.num_devices) for r in results] if masked else \
            [(a.num_samples, a.num_devices) for a in participating]
        sizes = [n // d for n, d in counts if d > 0]
        if sizes:
            s.min_local_examples = min(sizes)
            s.ledger.device.append(device_event(ann.plan, s.min_local_examples))
            s.ledger.central.append(central_event([a.central_dp for a in participating]))
        s.ledger.device_reported = max([s.ledger.device_reported, *(a.max_device_epsilon for a in aggs)])
        report = s.ledger.report(self.cfg.privacy.accountant)
        loss, acc = self.model.evaluate(s.server.weights, self.eval_data) if self.eval_data else (None, None)
        record = self._record(ann, aggs, report, loss, acc, now)
        record["rewards"] = rewards
        if masked is not None:
            record["edge_secagg"] = {"edges": sorted(masked.devices), "dropped": sorted(masked.dropped)}
        self._end_round(ann.round_id, record, report, t0)
        self._publish_model()
        self._maybe_distill(ann.round_id)
        self._observe_metrics(record, report, time.monotonic() - t0)
        event(self.log, "round closed", **{k: record[k] for k in ("round", "accuracy", "loss", "num_devices",
                                                                    "bytes_up", "bytes_down", "epsilon")},
              cloud_step_s=round(time.monotonic() - t0, 4))
        if s.stop_reason:
            self._finish(s.stop_reason)

    def _end_round(self, round_id: int, record: dict, report: dict, t0: float) -> None:
        """Append the round's record, move to the next round, checkpoint, drop the round's pending aggregates."""
        s = self.state
        s.history.append(record)
        s.round_id += 1
        s.announcement = b""
        if len(s.history) >= self.cfg.rounds:
            s.stop_reason = f"completed {self.cfg.rounds} rounds"
        else:
            s.stop_reason = exhausted(report, self.cfg.privacy.device_epsilon, self.cfg.privacy.central_epsilon) or ""
        record["cloud_step_s"] = round(time.monotonic() - t0, 4)
        save(self.checkpoint, s)
        self._write_rounds()
        for path in self.pending_dir.glob(f"{round_id}-*.cbor"):
            path.unlink()
        self.received.clear()
        self.rejected.clear()

    def _skip_round(self, now: float, detail: str) -> None:
        """An edge-masked round whose protocol aborted: no sum, so no update (never a wrong or too-small sum). The
        devices trained, so their example-level spend is still accounted; the next round starts from the same
        model."""
        t0, s = time.monotonic(), self.state
        ann = decode(s.announcement, expect=RoundAnnouncement)
        event(self.log, "edge secagg aborted: round skipped, model unchanged", logging.ERROR, round=ann.round_id,
              detail=detail)
        if s.min_local_examples:
            s.ledger.device.append(device_event(ann.plan, s.min_local_examples))
        report = s.ledger.report(self.cfg.privacy.accountant)
        record = self._record(ann, [], report, None, None, now)
        record.update(rewards=None, edge_secagg={"aborted": detail})
        self._end_round(ann.round_id, record, report, t0)
        if s.stop_reason:
            self._finish(s.stop_reason)

    def _maybe_distill(self, round_id: int) -> None:
        """Every N rounds, distil the new global model into int8 students and push them (a worker thread: the
        rounds go on meanwhile; one distillation at a time, a due round is skipped while one runs)."""
        schedule = self.cfg.distill
        if schedule is None or not schedule.config().due(round_id):
            return
        if self.distiller is not None and self.distiller.is_alive():
            event(self.log, "distillation still running: skipping this one", logging.WARNING, round=round_id)
            return
        weights, version = self.state.server.weights.copy(), self.state.version
        self.distiller = threading.Thread(target=self._distill, args=(weights, version), daemon=True)
        self.distiller.start()

    def _distill(self, weights: np.ndarray, version: int) -> None:
        schedule = self.cfg.distill
        try:
            proxy_x, proxy_y = load_proxy(schedule.proxy) if schedule.proxy else (None, None)
            data = self.eval_data
            reports = distill_round(self.cfg.model, weights, self.cfg.model_options, self.key,
                                    self.run_dir / "students" / f"v{version}", version, proxy_x, proxy_y,
                                    data.x if data else None, data.y if data else None, cfg=schedule.config(),
                                    previous=self.students)
            for r in reports:
                self.students[r.device_class] = r.weights
                pushed = None
                if schedule.push and r.bundle is not None:
                    pushed = push_bundle(r.bundle, r.device_class, self.edges, self.cfg.broker, self.key,
                                         message_cap=schedule.message_cap)
                line = {"version": version, "device_class": r.device_class, "student_bytes": r.student_bytes,
                        "teacher_bytes": r.teacher_bytes, "agreement": r.agreement,
                        "student_accuracy": r.student_accuracy, "teacher_accuracy": r.teacher_accuracy,
                        "bundle": None if r.bundle is None else str(r.bundle),
                        "pushed_s": None if pushed is None else round(pushed.seconds, 3)}
                with open(self.run_dir / "distill.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                event(self.log, "student distilled", **line)
        except Exception:  # a failed distillation must not take the federation down
            self.log.exception("distillation failed", extra={"fields": {"version": version}})

    def _record_contributions(self, round_id: int, version: int, results: list[EdgeResult],
                              previous: np.ndarray) -> dict | None:
        scored = [r for r in results if r.delta is not None and r.num_devices > 0]
        if self.recorder is None or not scored:
            return None
        return self.recorder.record(round_id, version, [r.edge_id for r in scored], [r.delta for r in scored],
                                    [r.num_samples for r in scored], previous,
                                    lambda w: self.model.evaluate(w, self.eval_data)[1],
                                    np.random.default_rng([self.cfg.seed, round_id]))

    def _compress_model(self, previous: np.ndarray) -> None:
        """Delta mode: the new version goes out compressed (the server adopts exactly what devices rebuild), except
        every model_full_every-th, which goes out in full with the error-feedback residual folded in."""
        s = self.state
        self.model_delta = None
        if self.cfg.model_encoding != "delta":
            return
        arrays = dict(s.server.arrays)
        residual = arrays.pop(RESIDUAL, None)
        if (s.version - 1) % self.cfg.model_full_every == 0:
            weights = s.server.weights if residual is None else (s.server.weights + residual).astype(np.float32)
            s.server = s.server.replace(weights=weights, arrays=arrays)
            return
        self.model_delta, published, residual = compress_broadcast(previous, s.server.weights, residual,
                                                                   self.model_settings)
        s.server = s.server.replace(weights=published, arrays={**arrays, RESIDUAL: residual})

    def _record(self, ann: RoundAnnouncement, aggs: list[EdgeAggregate], report: dict, loss, acc,
                now: float) -> dict:
        n_devices = sum(a.num_devices for a in aggs)
        addressed = len(ann.cohort) or max(len(self.state.devices), n_devices)
        ann_size = len(self.state.announcement)
        control = self.state.server.arrays.get(CONTROL)
        return {
            "round": ann.round_id, "model_version": self.state.version,
            "accuracy": acc, "loss": loss,
            "bytes_up": sum(a.device_bytes for a in aggs),
            "bytes_up_cloud": sum(r.size for r in self.received.values()),
            "control_bytes_up": sum(len(a.control_delta or b"") for a in aggs),
            "dense_bytes_up": 4 * self.model.n_params * n_devices,
            "bytes_down": (self.model_msg_size + ann_size) * addressed,
            "bytes_down_cloud": (self.model_msg_size + ann_size) * len(self.edges),
            "control_bytes_down": (0 if control is None else 4 * control.size) * addressed,
            "epsilon": json_epsilon(report), "delta": self.cfg.privacy.delta,
            "num_devices": n_devices, "num_edges": len(aggs), "addressed": addressed,
            "filtered": sum(len(a.filtered) for a in aggs),
            "rejected_at_edges": dict(sum((Counter(a.rejected) for a in aggs), Counter())),
            "rejected_at_cloud": dict(self.rejected),
            "wall_time_s": round(now - (ann.deadline - self.cfg.round_timeout_s), 3),
            "timestamp": round(now, 3),
        }

    def _observe_metrics(self, record: dict, report: dict, step_s: float) -> None:
        m = self.metrics
        m.round.set(record["round"])
        if record["accuracy"] is not None:
            m.accuracy.set(record["accuracy"])
            m.loss.set(record["loss"])
        for level in ("device", "central"):
            m.epsilon.labels(level=level).set(report[level])
        m.bytes_up.inc(record["bytes_up"])
        m.bytes_down.inc(record["bytes_down"])
        m.round_seconds.observe(record["wall_time_s"])
        m.step_seconds.observe(step_s)

    # ------------------------------------------------------------------ outputs
    def _write_rounds(self) -> None:
        """rounds.jsonl is rewritten from the checkpoint's history, so it never disagrees with it after a crash."""
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        atomic_write(self.run_dir / "rounds.jsonl", lines.encode())

    def _finish(self, reason: str) -> None:
        s = self.state
        s.stop_reason = reason
        s.announcement = b""
        save(self.checkpoint, s)
        event(self.log, "federation stopped", logging.WARNING if "privacy" in reason else logging.INFO,
              reason=reason, rounds=len(s.history))

    def write_report(self) -> dict:
        s, h = self.state, self.state.history
        last = h[-1] if h else {}
        report = {
            "strategy": self.strategy.name, "model": self.cfg.model, "n_params": self.model.n_params,
            "rounds_completed": len(h), "finished": bool(s.stop_reason), "stop_reason": s.stop_reason,
            "final_accuracy": last.get("accuracy"), "final_loss": last.get("loss"),
            "total_bytes_up": sum(r["bytes_up"] for r in h),
            "total_bytes_down": sum(r["bytes_down"] for r in h),
            "dense_bytes_up": sum(r["dense_bytes_up"] for r in h),
            "epsilon": last.get("epsilon"), "delta": self.cfg.privacy.delta,
            "rounds": h,
        }
        if self.cfg.privacy.final_pld and h:
            report["epsilon_pld"] = json_epsilon({
                "device_derived": epsilon(s.ledger.device, s.ledger.delta, "pld"),
                "central": epsilon(s.ledger.central, s.ledger.delta, "pld")})
        atomic_write(self.run_dir / "report.json", json.dumps(report, indent=1).encode())
        return report

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
        if not self.state.stop_reason:
            if not all(c.start(self.stop) for c in filter(None, (self.conn, self.secagg_conn))):
                return 0
            event(self.log, "cloud running", strategy=self.strategy.name, model=self.cfg.model,
                  n_params=self.model.n_params, edges=self.edges, round=self.state.round_id,
                  resumed=bool(self.state.history))
            if self.cfg.ledger is not None:
                b = self.cfg.broker
                self.recorder = ContributionRecorder(self.cfg.ledger, self.key, b.host, b.port,
                                                     client_context(b.ca, b.cert, b.key) if b.ca else None, self.log)
            self._load_pending()
            self._publish_model()
            self._open_round(time.time())
            self._loop()
            for conn in filter(None, (self.conn, self.secagg_conn)):
                conn.close()
            if self.recorder is not None:
                self.recorder.close()
            if self.distiller is not None:
                self.distiller.join()
        self.write_report()
        event(self.log, "cloud stopped", finished=bool(self.state.stop_reason), rounds=len(self.state.history))
        return 0

    def _loop(self) -> None:
        s = self.state
        while not self.stop.is_set() and not s.stop_reason:
            self._drain_one(self.cfg.tick_s)
            now = time.time()
            if self.secagg is not None:
                self._poll_masked(now)
                continue
            complete = set(self.edges) <= set(self.received)
            if not complete and now < self.deadline + self.cfg.grace_s:
                continue
            if complete or len(self.received) >= self.cfg.min_edges:
                self._close_round(now)
                if not s.stop_reason:
                    self._open_round(time.time())
            else:
                event(self.log, "deadline passed with too few aggregates: re-announcing", logging.WARNING,
                      round=s.round_id, received=sorted(self.received), min_edges=self.cfg.min_edges)
                self._open_round(now)

    def _poll_masked(self, now: float) -> None:
        """Edge-masked rounds close when the protocol ends (and the metadata of the edges in the sum arrived, or
        grace_s after it ended); an abort skips the round."""
        for round_id, outcome in self.secagg.finished():
            if round_id == self.state.round_id:
                self.masked_outcome = (outcome, time.monotonic())
        if self.masked_outcome is None:
            return
        outcome, ended = self.masked_outcome
        if isinstance(outcome, SecAggResult) and not set(outcome.devices) <= set(self.received) \
                and time.monotonic() - ended < self.cfg.grace_s:
            return
        self.masked_outcome = None
        if isinstance(outcome, ProtocolError):
            self._skip_round(now, outcome.detail)
        else:
            self._close_round(now, outcome)
        if not self.state.stop_reason:
            self._open_round(time.time())

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
