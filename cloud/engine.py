"""The cloud's state machine, without MQTT: feed it aggregates and the clock, it returns what to publish.

Contract (the daemon cloud.aggregator and the simulator drive it the same way):

- `CloudEngine(settings, key, edge_keys, initial, run_dir, ...)` takes loaded objects: RoundSettings (from
  CloudConfig.round_settings() or built directly), the cloud's Ed25519 private key, the edges' public keys (a
  KeyRing or a callable edge_id -> key), the initial flat weights (n_params is their size), the run directory
  (checkpoint.npz, pending/, rounds.jsonl; a checkpoint there is resumed), and optionally `evaluate(weights) ->
  (loss, accuracy)` or `(loss, accuracy, scores)` (scores: cloud.evaluation's AUROC, AUPRC and min(Se, +P) of a
  binary task, recorded per round), `contributions(round_id, version, results, previous_weights) -> rewards` (the
  ledger hook, plaintext rounds only), `rng` (the strategy's sampling; default: seeded from settings.seed and
  checkpointed), a logger, cloud.metrics.Metrics and `trust` (cloud.trust.TrustGate: plaintext rounds leave out
  the edges whose result points away from the cloud's root update).
- `start(now)`: the signed GlobalModel and RoundAnnouncement to publish (retained), resuming the open round from
  the checkpoint and its aggregates from pending/; [] when the federation already stopped.
- `handle_aggregate(edge_or_topic, payload, now=None)`: admit one signed EdgeAggregate (rejections are counted and
  logged); an accepted one is in pending/ before it returns, so the daemon acknowledges it afterwards. It returns
  the signed AggregateReceipt for the edge (for every authentic aggregate, accepted or refused for good: the edge
  resends until it has one), then with `now` what `tick(now)` returns (a complete round closes at once).
- `resumed(now)`: the daemon was not running (hung) past the round's deadline: re-announce the open round with a
  new deadline instead of closing it without the aggregates that waited for us (the edges resend on the
  announcement); [] otherwise.
- `handle_status(payload)`: a retained DeviceStatus (compute class, speed, budget state) for the strategies.
- `tick(now)`: close the round by cloud.rounds.close_decision (or re-announce it), apply the strategy, account
  privacy, evaluate, checkpoint, append to rounds.jsonl; returns the next GlobalModel + RoundAnnouncement.
- Edge-level SecAgg (`edge_tier` set): `masked_round(now)` gives the SecAggServer of the open round and its first
  step's timeout; `masked_finished(round_id, outcome, now)` hands over the protocol's end, and `tick` then closes
  the round with the unmasked sum (once the metadata of the edges in it arrived, or grace_s later) or skips it
  on an abort (model unchanged).
- Accessors: `state` (CloudState: history, stop_reason, version, ...), `stop_reason`, `model_payload` and
  `announcement_payload` (the current signed bytes), `received`, `rejected`, `edges`, `n_params`, `strategy`.

Crash safety: a round's effects reach disk in one atomic checkpoint, so a crash at any instant resumes at the
open round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud.accounting import PrivacyLedger, exhausted
from cloud.config import RoundSettings, compression_from_table
from cloud.evaluation import split_evaluation
from cloud.metrics import Metrics
from cloud.rounds import (
    OpenRound,
    Received,
    Traffic,
    account_round,
    account_skipped,
    admit_authentic,
    authentic,
    bound_edges,
    close_decision,
    compress_model,
    dense_sizes,
    edge_results,
    masked_results,
    model_message,
    plan_round,
    round_record,
)
from cloud.state import CloudState, load, save
from cloud.strategies import make
from cloud.strategies.base import DeviceInfo, EdgeResult
from cloud.strategies.heterogeneity import observe
from cloud.trust import TrustGate, agree, device_cosines, gate, leave_out, majority_direction, sketch_cosines
from protocol.atomic import atomic_write
from protocol.codec import stored_schema_is_older
from protocol.errors import ProtocolError, Reason
from protocol.keyring import KeyRing
from protocol.logs import event
from protocol.messages import (
    AggregateReceipt,
    DeviceStatus,
    EdgeAggregate,
    RoundAnnouncement,
    decode,
    encode,
    new_run_id,
    sign_message,
)
from protocol.publication import Publication
from protocol.secagg import SecAggResult, SecAggServer
from protocol.secagg.edge_tier import EdgeMaskedRound
from protocol.sketch import row_order
from protocol.topics import CLOUD, CLOUD_MODEL, CLOUD_ROUND, last_level, receipt_topic

FAILED_PREFIX = "failed:"   # a stop_reason that starts so is a failed run (report.json finished=false, exit 4)


def _sketches(received: dict[str, Received]) -> tuple[dict[str, np.ndarray], int]:
    """The edges' device sketches of one width (the most common; an edge sending another width is not counted)."""
    have = {e: r.sketches for e, r in received.items() if r.sketches is not None and len(r.sketches)}
    if not have:
        return {}, 0
    dims = Counter(rows.shape[1] for rows in have.values()).most_common(1)[0][0]
    return {e: rows for e, rows in have.items() if rows.shape[1] == dims}, dims


def failed(stop_reason: str) -> bool:
    """Whether the run stopped as a failure (a round closed below min_devices), not completed or out of budget."""
    return stop_reason.startswith(FAILED_PREFIX)


Evaluate = Callable[[np.ndarray], tuple]   # (loss, accuracy) or (loss, accuracy, scores)
Contributions = Callable[[int, int, list[EdgeResult], np.ndarray], dict | None]


class CloudEngine:
    """The cloud's round state machine without MQTT (the contract is the module docstring)."""

    def __init__(self, settings: RoundSettings, key: Ed25519PrivateKey,
                 edge_keys: KeyRing | Callable[[str], Ed25519PublicKey], initial: np.ndarray, run_dir: str | Path,
                 *, evaluate: Evaluate | None = None, contributions: Contributions | None = None,
                 rng: np.random.Generator | None = None, log: logging.Logger | None = None,
                 metrics: Metrics | None = None, trust: TrustGate | None = None) -> None:
        self.settings, self.key = settings, key
        self.edges = list(settings.edges)
        if not self.edges:
            raise ValueError("no edges: a round needs at least one edge")
        self._key_of = edge_keys.get if isinstance(edge_keys, KeyRing) else edge_keys
        self.evaluate, self.contributions, self.trust = evaluate, contributions, trust
        self.log = log or logging.getLogger("cloud")
        self.metrics = metrics
        self.n_params = int(initial.size)
        self.strategy = make(settings.strategy.name, settings.defaults(), settings.strategy.options)
        self.run_dir = Path(run_dir)
        self.pending_dir = self.run_dir / "pending"
        self.checkpoint = self.run_dir / "checkpoint.npz"
        fresh = self.strategy.init_state(initial)
        self.state = load(self.checkpoint) if self.checkpoint.exists() else CloudState(
            settings.first_round, settings.first_round, fresh, PrivacyLedger(settings.privacy.delta),
            np.random.default_rng(settings.seed).bit_generator.state, {d: DeviceInfo(d) for d in settings.devices})
        if self.state.server.weights.size != self.n_params or not set(fresh.arrays) <= set(self.state.server.arrays):
            raise ValueError(f"{self.checkpoint} holds another model or strategy's state: use a new run_dir")
        if settings.run_id and self.state.run_id and settings.run_id != self.state.run_id:
            raise ValueError(f"{self.checkpoint} is run {self.state.run_id}, not run_id {settings.run_id}: "
                             "`fediomt cloud new-run` first")
        self.state.run_id = self.state.run_id or settings.run_id or new_run_id()
        if rng is None:
            rng = np.random.default_rng()
            rng.bit_generator.state = self.state.rng_state
        self.rng = rng
        self.nonces = set(self.state.nonces)
        self.received: dict[str, Received] = {}
        self.rejected: Counter[str] = Counter()
        self.receipt_bytes = 0   # the open round's receipts to edges (cloud -> edge bytes)
        self.deadline = 0.0
        self.model_payload = b""
        self.model_delta: bytes | None = None   # the compressed delta of the current version, when it has one
        self.model_compression = compression_from_table(settings.model_compression)
        self.edge_tier = EdgeMaskedRound.from_announcement(settings.secagg)   # edge-level SecAgg; None = plaintext
        self.masked_outcome: tuple[SecAggResult | ProtocolError, float] | None = None   # (outcome, when it ended)

    @property
    def stop_reason(self) -> str:
        return self.state.stop_reason

    @property
    def announcement_payload(self) -> bytes:
        return self.state.announcement

    def edge_key(self, edge: str) -> Ed25519PublicKey:
        if edge not in self.edges:
            raise ProtocolError(Reason.UNKNOWN_SENDER, f"edge {edge!r} is not part of this federation")
        return self._key_of(edge)

    # ------------------------------------------------------------------ starting
    def start(self, now: float) -> list[Publication]:
        if self.state.stop_reason:
            return []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_rounds()
        receipts: list[Publication] = []   # again: the crash may have come before they went out
        if self.pending_dir.exists():
            for path in sorted(self.pending_dir.glob("*.cbor")):
                round_id, _, edge = path.stem.partition("-")
                if round_id == str(self.state.round_id):
                    payload = path.read_bytes()
                    self._forget_nonce(payload)
                    receipts += self._admit(edge, payload, persist=False)
                else:
                    path.unlink()
        return [self._model_publication(), *self._open_round(now), *receipts]

    def resumed(self, now: float) -> list[Publication]:
        """After the daemon stood still (hung, stopped) past the open round's deadline: announce the round again with
        a new deadline rather than close it without what waited for us at the broker (the edges resend what we have
        not receipted when they see the announcement)."""
        s = self.state
        if s.stop_reason or not s.announcement or self.edge_tier is not None or now < self.deadline \
                or set(self.edges) <= set(self.received):
            return []
        event(self.log, "resumed after the round's deadline: re-announcing it", logging.WARNING, round=s.round_id,
              received=sorted(self.received))
        return self._open_round(now)

    def _forget_nonce(self, payload: bytes) -> None:
        """Our own durable copy of an accepted aggregate: a checkpoint taken since (a re-announcement) may hold its
        nonce, which must not make the copy a replay of itself (the round would wait for it forever)."""
        try:
            nonce = decode(payload, expect=EdgeAggregate).nonce.hex()
        except ProtocolError:
            return   # admission refuses it with its reason
        self.nonces.discard(nonce)
        self.state.nonces = [n for n in self.state.nonces if n != nonce]

    def _model_publication(self) -> Publication:
        s = self.state
        msg = dataclasses.replace(model_message(self.settings.model, s.version, s.server, self.model_delta),
                                  run_id=s.run_id)
        self.model_payload = encode(sign_message(msg, self.key))
        event(self.log, "model published", version=s.version, bytes=len(self.model_payload))
        return Publication(CLOUD_MODEL, self.model_payload, retain=True)

    def _open_round(self, now: float) -> list[Publication]:
        """Announce the open round: the checkpointed announcement (with a new deadline when it passed), or a new
        one; [] when the federation stops before it."""
        s = self.state
        if s.announcement and stored_schema_is_older(s.announcement):   # checkpointed before an upgrade
            event(self.log, "open round stored under an older schema: announcing it anew", logging.WARNING,
                  round=s.round_id)
            s.announcement = b""
        if s.announcement:
            ann = decode(s.announcement, expect=RoundAnnouncement)
            if ann.deadline < now + 1.0:  # restarted or re-announced after its deadline: same cohort, new deadline
                ann = sign_message(dataclasses.replace(ann, deadline=now + self.settings.round_timeout_s), self.key)
        else:
            planned = plan_round(self.strategy, s, self.settings, now, self.rng)
            s.rng_state = self.rng.bit_generator.state
            if isinstance(planned, str):
                self._finish(planned)
                return []
            ann = sign_message(dataclasses.replace(planned, run_id=s.run_id, statistics=self.settings.statistics,
                                                   features=self.settings.features), self.key)
        s.announcement = encode(ann)
        save(self.checkpoint, s)
        self.deadline = ann.deadline
        event(self.log, "round announced", round=ann.round_id, version=ann.model_version,
              cohort=len(ann.cohort) or "all", deadline_in_s=round(ann.deadline - now, 1))
        return [Publication(CLOUD_ROUND, s.announcement, retain=True)]

    # ------------------------------------------------------------------ receiving
    def handle_aggregate(self, edge_or_topic: str, payload: bytes, now: float | None = None) -> list[Publication]:
        return self._admit(edge_or_topic, payload) + ([] if now is None else self.tick(now))

    def _admit(self, edge_or_topic: str, payload: bytes, persist: bool = True) -> list[Publication]:
        """Admit one aggregate; the receipt for its edge when it is authentic and the verdict is final."""
        s = self.state
        agg = None
        try:
            agg = authentic(payload, last_level(edge_or_topic), self.edge_key)
            got = admit_authentic(agg, len(payload), OpenRound(
                s.round_id, s.version, self.n_params, self.received, self.nonces, self.edge_tier is not None,
                self.settings.bounds.max_samples))
        except ProtocolError as exc:
            self.rejected[exc.reason.name] += 1
            if self.metrics is not None:
                self.metrics.rejected.labels(reason=exc.reason.name).inc()
            event(self.log, "aggregate rejected", logging.WARNING, sender=edge_or_topic[:200],
                  reason=exc.reason.name, detail=exc.detail[:200])
            # a round the cloud has not reached may still come (a checkpoint behind the edge): no verdict yet
            return [] if agg is None or exc.reason == Reason.WRONG_ROUND else [self._receipt(agg, exc.reason)]
        edge = agg.edge_id
        if persist:  # durable before the daemon acknowledges it: a crash now re-reads it from pending/
            atomic_write(self.pending_dir / f"{got.agg.round_id}-{edge}.cbor", payload)
        self.nonces.add(got.agg.nonce.hex())
        s.nonces.append(got.agg.nonce.hex())
        self.received[edge] = got
        if self.metrics is not None:
            self.metrics.aggregates.labels(edge=edge).inc()
        event(self.log, "aggregate accepted", edge=edge, round=got.agg.round_id, devices=got.agg.num_devices,
              significant=got.agg.significant, bytes=got.size)
        return [self._receipt(agg, None)]

    def _receipt(self, agg: EdgeAggregate, refused: Reason | None) -> Publication:
        msg = AggregateReceipt(edge_id=agg.edge_id, round_id=agg.round_id, aggregate_nonce=agg.nonce,
                               accepted=refused is None, reason=0 if refused is None else int(refused),
                               timestamp=time.time())
        payload = encode(sign_message(msg, self.key))
        self.receipt_bytes += len(payload)
        return Publication(receipt_topic(agg.edge_id), payload)

    def handle_status(self, payload: bytes) -> None:
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

    # ------------------------------------------------------------------ edge-level SecAgg
    def masked_round(self, now: float) -> tuple[SecAggServer, float]:
        """The SecAgg server of the open edge-masked round and how long its first step may wait (the edges close at
        the deadline, then mask)."""
        assert self.edge_tier is not None and self.state.announcement
        server = SecAggServer(CLOUD, self.state.round_id, self.edge_tier.config, self.edge_tier.length(self.n_params),
                              {e: self.edge_key(e) for e in self.edges})
        return server, max(0.0, self.deadline + self.settings.grace_s - now)

    def masked_finished(self, round_id: int, outcome: SecAggResult | ProtocolError, now: float) -> None:
        if round_id == self.state.round_id:
            self.masked_outcome = (outcome, now)

    # ------------------------------------------------------------------ closing
    def tick(self, now: float) -> list[Publication]:
        s, cfg = self.state, self.settings
        if s.stop_reason or not s.announcement:
            return []
        if self.edge_tier is not None:
            return self._tick_masked(now)
        decision = close_decision(self.received, self.edges, now, self.deadline, cfg.grace_s, cfg.min_edges)
        if decision == "reannounce":
            event(self.log, "deadline passed with too few aggregates: re-announcing", logging.WARNING,
                  round=s.round_id, received=sorted(self.received), min_edges=cfg.min_edges)
            return self._open_round(now)
        return [] if decision is None else self._close(now)

    def _tick_masked(self, now: float) -> list[Publication]:
        """Edge-masked rounds close when the protocol ends (and the metadata of the edges in the sum arrived, or
        grace_s after it ended); an abort skips the round."""
        if self.masked_outcome is None:
            return []
        outcome, ended = self.masked_outcome
        if isinstance(outcome, SecAggResult) and not set(outcome.devices) <= set(self.received) \
                and now - ended < self.settings.grace_s:
            return []
        self.masked_outcome = None
        if isinstance(outcome, ProtocolError):
            return self._skip(now, outcome.detail)
        return self._close(now, outcome)

    def _close(self, now: float, masked: SecAggResult | None = None) -> list[Publication]:
        t0, s, cfg = time.monotonic(), self.state, self.settings
        ann = decode(s.announcement, expect=RoundAnnouncement)
        distrusted: dict[str, float] = {}   # cloud.trust: edges left out against the gate's reference
        devices_distrusted: dict[str, float] = {}   # ... and devices whose update pointed against the majority
        if masked is None:
            received, bounded, s.bounds = bound_edges(self.received, s.bounds,
                                                      float(np.linalg.norm(s.server.weights.astype(np.float64))),
                                                      cfg.bounds)
            if bounded:
                event(self.log, "aggregates bounded", logging.WARNING, round=s.round_id, edges=bounded)
            results, s.last_delta = edge_results(received, s.last_delta)
            aggs = [r.agg for r in received.values()]
            if self.trust is not None:
                results, distrusted = gate(results, self.trust.reference(s.server.weights, ann.plan),
                                           self.trust.min_cosine)
                against = "the root update"
            elif cfg.trust.device_majority and ann.plan.noise_mult <= 0:   # under device DP: noise, not direction
                sketches, dims = _sketches(received)
                reference = majority_direction(sketches)
                results, distrusted = leave_out(results, sketch_cosines(results, reference, dims),
                                                cfg.trust.min_cosine)
                against = "the devices' majority direction"
                for edge, rows in sketches.items():
                    agg = received[edge].agg
                    cosines = device_cosines(rows, row_order(agg.device_ids, agg.filtered), reference)
                    s.devices = agree(s.devices, cosines)
                    devices_distrusted |= {d: c for d, c in cosines.items() if c <= cfg.trust.min_cosine}
            if distrusted:
                event(self.log, f"aggregates distrusted: against {against}", logging.WARNING, round=s.round_id,
                      edges=distrusted)
        else:
            total = self.edge_tier.total(masked)
            event(self.log, "edge secagg unmasked", round=s.round_id, edges=total.edges, dropped=total.dropped,
                  devices=total.num_devices, samples=total.num_samples)
            results, aggs = masked_results(total, self.received)
            bounded = {}
        for agg in aggs:
            s.devices = observe(s.devices, agg.device_ids, agg.filtered, agg.update_norms)
        before, previous = s.server, s.server.weights
        if results or not distrusted:   # every edge distrusted: the model stays (no optimiser step either)
            s.server = self.strategy.apply(s.server, results, cfg.population or len(s.devices))
        if not np.isfinite(s.server.weights).all():   # never publish a model devices would refuse (NON_FINITE)
            event(self.log, "non-finite model refused: round applied as no change", logging.ERROR, round=s.round_id)
            s.server, bounded = before, {**bounded, "model": "non-finite: not applied"}
        rewards = None
        if self.contributions is not None and masked is None:
            rewards = self.contributions(ann.round_id, s.version + 1, results, previous)
        elif self.contributions is not None:
            event(self.log, "ledger: edge-masked round, per-edge contributions not scored", round=ann.round_id)
        s.version += 1
        s.server, self.model_delta = compress_model(s.server, previous, s.version, cfg, self.model_compression)
        participating = [a for a in aggs if a.num_devices > 0]
        counts = [(r.num_samples, r.num_devices) for r in results] if masked else \
            [(a.num_samples, a.num_devices) for a in participating]
        s.ledger, s.min_local_examples = account_round(
            s.ledger, ann.plan, counts, [a.central_dp for a in participating], [a.max_device_epsilon for a in aggs],
            s.min_local_examples, [] if masked else [a.min_device_samples for a in participating])
        report = s.ledger.report(cfg.privacy.accountant)
        loss, acc, scores = split_evaluation(self.evaluate(s.server.weights) if self.evaluate else None)
        record = self._record(ann, aggs, report, loss, acc, now, scores)
        record["rewards"] = rewards
        record["bounded_at_cloud"] = bounded
        record["distrusted_at_cloud"] = distrusted
        record["distrusted_devices"] = devices_distrusted
        if masked is not None:
            record["edge_secagg"] = {"edges": sorted(masked.devices), "dropped": sorted(masked.dropped)}
        self._end_round(ann.round_id, record, report, t0)
        out = [self._model_publication()]
        self._observe(record, report, time.monotonic() - t0)
        event(self.log, "round closed", **{k: record[k] for k in ("round", "accuracy", "loss", "num_devices",
                                                                    "bytes_up", "bytes_down", "epsilon")},
              cloud_step_s=round(time.monotonic() - t0, 4))
        return out + self._next(now)

    def _skip(self, now: float, detail: str) -> list[Publication]:
        """An edge-masked round whose protocol aborted: no sum, so no update (never a wrong or too-small sum). The
        devices trained, so their example-level spend is still accounted; the next round starts from the same
        model."""
        t0, s = time.monotonic(), self.state
        ann = decode(s.announcement, expect=RoundAnnouncement)
        event(self.log, "edge secagg aborted: round skipped, model unchanged", logging.ERROR, round=ann.round_id,
              detail=detail)
        s.ledger = account_skipped(s.ledger, ann.plan, s.min_local_examples)
        report = s.ledger.report(self.settings.privacy.accountant)
        record = self._record(ann, [], report, None, None, now)
        record.update(rewards=None, edge_secagg={"aborted": detail})
        self._end_round(ann.round_id, record, report, t0)
        return self._next(now)

    def _next(self, now: float) -> list[Publication]:
        if self.state.stop_reason:
            self._finish(self.state.stop_reason)
            return []
        return self._open_round(now)

    def _record(self, ann: RoundAnnouncement, aggs: list[EdgeAggregate], report: dict, loss: float | None,
                acc: float | None, now: float, scores: dict | None = None) -> dict:
        s = self.state
        dense = dense_sizes(self.settings.model, self.n_params, ann.model_version,
                            max(s.devices, key=len, default="device-00"), max(self.edges, key=len), s.run_id)
        traffic = Traffic(len(self.model_payload), len(s.announcement), len(s.devices), len(self.edges),
                          sum(r.size for r in self.received.values()), self.rejected, dense, self.receipt_bytes)
        return round_record(ann, aggs, report, loss, acc, now, s.version, s.server, traffic, self.settings, scores)

    def _end_round(self, round_id: int, record: dict, report: dict, t0: float) -> None:
        """Append the round's record, move to the next round, checkpoint, drop the round's pending aggregates."""
        s, cfg = self.state, self.settings
        s.history.append(record)
        s.round_id += 1
        s.announcement = b""
        short = record.get("num_devices", 0) < cfg.min_devices and "edge_secagg" not in record
        if short:   # never report a run completed on rounds nobody trained in: stop, say why, exit non-zero
            s.stop_reason = (f"{FAILED_PREFIX} round {round_id} closed with {record.get('num_devices', 0)} "
                             f"device(s), fewer than min_devices = {cfg.min_devices}")
        elif len(s.history) >= cfg.rounds:
            s.stop_reason = f"completed {cfg.rounds} rounds"
        else:
            s.stop_reason = exhausted(report, cfg.privacy.device_epsilon, cfg.privacy.central_epsilon) or ""
        record["cloud_step_s"] = round(time.monotonic() - t0, 4)
        save(self.checkpoint, s)
        with open(self.run_dir / "rounds.jsonl", "a") as f:  # start() rewrites it from the checkpoint after a crash
            f.write(json.dumps(record) + "\n")
        for path in self.pending_dir.glob(f"{round_id}-*.cbor"):
            path.unlink()
        self.received.clear()
        self.rejected.clear()
        self.receipt_bytes = 0

    def _observe(self, record: dict, report: dict, step_s: float) -> None:
        m = self.metrics
        if m is None:
            return
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

    def _write_rounds(self) -> None:
        """rounds.jsonl from the checkpoint's history, so it never disagrees with it after a crash."""
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        atomic_write(self.run_dir / "rounds.jsonl", lines.encode())

    def _finish(self, reason: str) -> None:
        s = self.state
        s.stop_reason = reason
        s.announcement = b""
        save(self.checkpoint, s)
        event(self.log, "federation stopped", logging.ERROR if failed(reason) else
              logging.WARNING if "privacy" in reason else logging.INFO,
              reason=reason, rounds=len(s.history))
