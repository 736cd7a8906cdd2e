"""The edge's state machine, without MQTT: feed it messages and the clock, it returns what to publish.

handle_cloud(kind, data) verifies the cloud's round announcements and global models (and says whether to relay
them); handle_update(device, data) admits a device update and returns the Ack; tick(now) closes a synchronous round
at its quorum or deadline, or an asynchronous buffer every K updates, and returns the signed EdgeAggregate, which
stays in the outbox (undelivered(), the same bytes to send again) until handle_receipt(data) takes the cloud's
AggregateReceipt for it (docs/protocol.md "Delivery of aggregates"). Every
accepted update is in SQLite before handle_update returns (edge.store), so the MQTT shell acknowledges the message
to the broker only after it is durable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from edge import central_dp
from edge.aggregate import Meta, Result, aggregate, relative_change
from edge.bounds import check_update, plan_cap, round_bounds
from edge.config import EdgeConfig
from edge.metrics import Metrics
from edge.rounds import excuses, expected_devices, staleness_weight, sync_close_reason
from edge.rows import Rows
from edge.secagg_round import credited_var, masked_mean, metadata
from edge.store import Store, Stored
from edge.validation import RoundContext, authenticate, decode_delta
from protocol import signing
from protocol.codec import stored_schema_is_older
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.distributed_dp import creditable, device_stds
from protocol.errors import ProtocolError, Reason
from protocol.features import masked_statistics_scale
from protocol.global_model import in_full, rebuild
from protocol.keyring import KeyRing
from protocol.logs import event
from protocol.messages import (
    Ack,
    AggregateReceipt,
    CentralDPReport,
    DeviceStatus,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    decode,
    encode,
    new_nonce,
    newer_run,
    sign_message,
    verify_message,
    verify_raw,
)
from protocol.publication import Publication
from protocol.secagg import SecAggResult
from protocol.secagg.deploy import MaskedRound, masked_round
from protocol.secagg.edge_tier import EdgeMaskedRound
from protocol.sketch import row_order, unit_sketches
from protocol.topics import aggregate_topic, check_id, model_full_topic, model_topic, round_topic

MAX_STATUS_BYTES = 64 * 1024


class EdgeEngine:
    """The edge's round logic without MQTT (the daemon and the simulator share it): admits updates, closes rounds,
    returns what to publish."""

    def __init__(self, cfg: EdgeConfig, log: logging.Logger | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, rng: np.random.Generator | None = None) -> None:
        """`clock` and `rng` default to the wall clock and fresh OS entropy (the daemon); the simulator passes its
        virtual clock and a seeded generator (filter sampling, central DP noise) for reproducible runs."""
        self.cfg, self.clock, self.rng = cfg, clock, rng
        self.log = log or logging.getLogger("edge")
        self.metrics = metrics or Metrics()
        self.store = Store(cfg.state_dir / "edge.db", cfg.synchronous)
        self.keys = KeyRing(cfg.enrolment_dir, cfg.crl_file, cfg.key_check_s, log=self.log)
        self.key = signing.load_private_key(cfg.signing_key)
        self.cloud_key = signing.load_public_key(cfg.cloud_public_key)
        self.forward_settings = cfg.forward.settings()
        self.aggregate_id = cfg.aggregate_id or cfg.edge_id
        self.rejected: Counter[str] = Counter()
        self.excused: set[str] = set()   # expected devices whose last status excuses them from this round
        self.masked_epsilon: dict[str, float] = {}   # masked round: epsilon each device reported with "masking"
        self.announcement: RoundAnnouncement | None = None
        self.ctx: RoundContext | None = None
        self.to_mask: tuple[int, np.ndarray] | None = None   # edge tier: (round, vector) for the gateway to mask
        self._restore()

    # ------------------------------------------------------------ state
    def _restore(self) -> None:
        raw = self.store.get("announcement")
        if raw is not None and stored_schema_is_older(raw):   # stored before an upgrade: wait for the cloud's
            event(self.log, "open round stored under an older schema: waiting for the cloud's", logging.WARNING)
            raw = None
        self.announcement = None if raw is None else decode(raw, expect=RoundAnnouncement)
        model = self.store.get("model")
        self.model = json.loads(model) if model else None        # {"version": v, "n_params": n}
        self.weights = _floats(self.store.get("model_weights") or None)   # the held version, rebuilt (None: missed one)
        self._model_metrics()
        self.opened = float(self.store.get("opened") or 0.0)
        self.closed_round = int(self.store.get("closed_round") or -1)
        self.batch = int(self.store.get("batch") or 0)
        self.last_forwarded = _floats(self.store.get("last_forwarded"))
        self.residual = _floats(self.store.get("residual"))
        self.latest: dict[str, list[float]] = json.loads(self.store.get("bounds") or b"{}")  # device -> [norm, n]
        self.pending: list[Stored] = self.store.pending()
        self.status = self.store.statuses()   # each device's last known (state, round), kept across rounds
        self.metrics.pending.set(len(self.pending))
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild the round context after the announcement, the model or the closed state changed."""
        ann = self.announcement
        self.masked = None if ann is None else masked_round(ann)  # untrusted-edge round (credited: distributed DP)
        self.edge_masked = None if ann is None or self.cfg.rounds.mode != "sync" else \
            EdgeMaskedRound.from_announcement(ann.secagg)   # trusted-edge round, masked toward the cloud
        if ann is None or self.model is None:
            self.ctx, self.expected, self.excused = None, set(), set()
            return
        self.expected = expected_devices(ann.cohort, self.keys.enrolled())
        sent = {u.device_id for u in self.pending if u.round_id == ann.round_id}
        self.excused = {d for d in self.expected - sent if excuses(self.status.get(d), ann.round_id)}
        seed = ann.compression.get("seed")
        self.ctx = RoundContext(
            edge_id=self.cfg.edge_id, round_id=ann.round_id, model_version=ann.model_version,
            n_params=int(self.model["n_params"]), cohort=frozenset(ann.cohort),
            closed=self.cfg.rounds.mode == "sync" and self.closed_round >= ann.round_id,
            seed=seed if type(seed) is int else None, rounds=self.cfg.rounds)

    # ------------------------------------------------------------ cloud -> edge
    def handle_cloud(self, kind: str, data: bytes) -> list[Publication]:
        """A message from fl/cloud/round or fl/cloud/model: verify, adopt, relay (and maybe close a round)."""
        self.metrics.bytes_in.inc(len(data))
        if not data:   # a retained message cleared (`fediomt cloud new-run`): nothing to adopt or relay
            return []
        try:
            if kind == "round":
                return self._on_round(data)
            return self._on_model(data)
        except ProtocolError as exc:
            event(self.log, "cloud message rejected", logging.WARNING, kind=kind, reason=exc.reason.name,
                  detail=exc.detail)
            return []

    def _follow_run(self, run_id: str, kind: str, data: bytes) -> bool:
        """Whether a verified round or model belongs to the run followed (a newer run is started first: the old
        run's rounds, updates and unsent aggregates are forgotten); an older run's is ignored, with a log line."""
        current = (self.store.get("run_id") or b"").decode()
        after = (self.store.get("after_run") or b"").decode()   # `edge new-run` ended that run: only later ones
        order = -1 if after and run_id <= after else newer_run(run_id, current)
        if order < 0:
            event(self.log, "message of an older run ignored", logging.WARNING, kind=kind, run=run_id,
                  following=current)
            return False
        if order > 0:
            dropped = len(self.pending)
            self.store.new_run(run_id)
            self._restore()
            event(self.log, "new run", run=run_id, previous=current or None, dropped_updates=dropped)
        return True

    def _on_model(self, data: bytes) -> list[Publication]:
        """Relay the cloud's model, and rebuild it so that devices that missed a version can catch up from its
        full form (docs/protocol.md "Catching up after a missed version")."""
        msg = decode(data, expect=GlobalModel)
        verify_message(msg, self.cloud_key)
        if not self._follow_run(msg.run_id, "model", data):
            return []
        relay = [Publication(model_topic(self.cfg.edge_id), data, retain=True)]
        if self.model is not None and msg.model_version < self.model["version"]:
            return []
        again = self.model is not None and msg.model_version == self.model["version"]   # redelivered, retained
        held = self.model["version"] if self.model is not None and self.weights is not None else -1
        try:
            weights = self.weights if again and self.weights is not None else rebuild(msg, held, self.weights)[0]
        except ProtocolError as exc:   # STALE: this edge missed a version too; it waits for a full one
            event(self.log, "model relayed without its full form", logging.WARNING, version=msg.model_version,
                  reason=exc.reason.name, detail=exc.detail)
            weights = None
        self.model = {"version": msg.model_version, "n_params": msg.n_params}
        self.weights = weights
        self.store.put("model", json.dumps(self.model).encode())
        # one transaction with "model" (the gateway's group commit): a kill -9 keeps the pair or neither
        self.store.put("model_weights", b"" if weights is None else weights.astype("<f4").tobytes())
        self._model_metrics()
        self._refresh()
        if weights is None:
            return relay
        return relay + [Publication(model_full_topic(self.cfg.edge_id), encode(in_full(msg, weights)), retain=True)]

    def _model_metrics(self) -> None:
        version = self.model["version"] if self.model is not None else -1
        self.metrics.model_version.set(version)
        self.metrics.full_model_version.set(version if self.weights is not None else -1)

    def _on_round(self, data: bytes) -> list[Publication]:
        msg = decode(data, expect=RoundAnnouncement)
        verify_message(msg, self.cloud_key)
        masked = MaskedRound.from_announcement(msg.secagg)   # refuse a malformed table before adopting the round
        EdgeMaskedRound.from_announcement(msg.secagg)
        if msg.statistics and masked is not None:
            masked_statistics_scale(msg.features)
        if not self._follow_run(msg.run_id, "round", data):
            return []
        self._abandon_before(msg.round_id)
        current = self.announcement
        if current is not None and msg.round_id <= current.round_id:
            if msg.round_id < current.round_id:
                event(self.log, "announcement of an earlier round ignored", logging.WARNING, round=msg.round_id,
                      open_round=current.round_id, run=msg.run_id)
                return []
            return [Publication(round_topic(self.cfg.edge_id), data, retain=True)]
        out = []
        if self.cfg.rounds.mode == "sync" and current is not None and self.pending:
            out += self._close("superseded")
        self.announcement, self.opened, self.masked_epsilon = msg, self.clock(), {}
        self.store.put("announcement", data)
        self.store.put("opened", repr(self.opened).encode())
        self.store.prune(msg.round_id - self.cfg.rounds.max_staleness - 1)
        self._refresh()
        event(self.log, "round opened", round=msg.round_id, model_version=msg.model_version,
              expected=len(self.expected), deadline=msg.deadline)
        return out + [Publication(round_topic(self.cfg.edge_id), data, retain=True)]

    # ------------------------------------------------------------ device -> edge
    def handle_update(self, topic_device: str, data: bytes) -> tuple[Ack | None, list[Publication]]:
        """Admit one update. Returns (the Ack for the device or None when its topic names no valid id, and any
        aggregate that its arrival completed)."""
        self.metrics.bytes_in.inc(len(data))
        round_id = self.ctx.round_id if self.ctx else 0
        try:
            check_id(topic_device)
        except ProtocolError as exc:
            self._reject(exc, topic_device)
            return None, []
        try:
            if self.ctx is None:
                raise ProtocolError(Reason.WRONG_ROUND, "no open round (announcement or model not received yet)")
            if self.masked is not None:
                raise ProtocolError(Reason.BAD_VALUE, "plaintext update in a secure-aggregation round")
            msg, stale = authenticate(data, topic_device, self.ctx, self.keys, self.cfg.max_update_bytes,
                                      self.cfg.accept_signatures)
            round_id = msg.round_id
            idx, values = decode_delta(msg, self.ctx)
            ann = self.announcement
            if ann.statistics:   # a statistics round: raw sums have any norm; only the sample cap holds
                check_update(0.0, msg.num_samples, math.inf, dataclasses.replace(self.cfg.bounds, max_norm=0.0))
            else:
                check_update(float(np.linalg.norm(values.astype(np.float64))), msg.num_samples,
                             plan_cap(ann.plan, self.ctx.n_params, msg.num_samples,
                                      ann.lr_scale.get(msg.device_id, 1.0), self.cfg.bounds.plan_slack),
                             self.cfg.bounds)
            control = None if msg.control_delta is None else decode_update(msg.control_delta, self.ctx.n_params)
            stored = Stored(msg.device_id, msg.round_id, msg.base_version, msg.num_samples, msg.train_loss,
                            msg.capability.compute_class, stale, msg.privacy.epsilon, msg.local_steps, len(data),
                            idx, values, control)
            self.store.add(stored, msg.nonce)   # its constraints refuse duplicates and replays (one statement)
        except ProtocolError as exc:
            if exc.reason == Reason.DEADLINE and self.store.has(topic_device, round_id):
                exc = ProtocolError(Reason.DUPLICATE, f"{topic_device} was counted in round {round_id}")
            self._reject(exc, topic_device)
            accepted = exc.reason == Reason.DUPLICATE   # already counted: a QoS 1 redelivery, not an error
            return Ack(self.cfg.edge_id, topic_device, round_id, accepted, int(exc.reason), exc.detail[:256]), []
        self.pending.append(stored)
        self.excused.discard(stored.device_id)   # it said it would not send, and did: it counts as sent
        if self.status.get(stored.device_id, ("",))[0] == "offline":   # an update says it is back
            self._set_status(stored.device_id, "online", stored.round_id)
        self.metrics.accepted.inc()
        self.metrics.pending.set(len(self.pending))
        return Ack(self.cfg.edge_id, topic_device, round_id, True, int(Reason.OK)), self.tick(self.clock())

    def handle_status(self, topic_device: str, data: bytes) -> list[Publication]:
        """An enrolled device's (retained) status, kept as its last known one across rounds and restarts:
        "skipped", "declined", "budget_exhausted" excuse it from the quorum of the round they name, "offline" from
        every round until it returns (rounds.excuses), so a round does not wait for its deadline on devices that
        will not send."""
        self.metrics.bytes_in.inc(len(data))
        try:
            msg = decode(data, expect=DeviceStatus, max_bytes=MAX_STATUS_BYTES)
            if msg.device_id != topic_device:
                return []
            self.keys.entry(msg.device_id)   # enrolled and not revoked (cached): strangers fill no table
        except ProtocolError:
            return []
        self._set_status(msg.device_id, msg.state, msg.round_id)
        ann = self.announcement
        if ann is None or msg.device_id not in self.expected:
            return []
        if excuses((msg.state, msg.round_id), ann.round_id) and not self.store.has(msg.device_id, ann.round_id):
            self.excused.add(msg.device_id)   # (one that sent, then went offline, still counts as sent)
        else:
            self.excused.discard(msg.device_id)
        if msg.state == "masking" and self.masked is not None and msg.round_id in (None, ann.round_id):
            self.masked_epsilon[msg.device_id] = msg.epsilon_spent
        return self.tick(self.clock())

    def _set_status(self, device: str, state: str, round_id: int | None) -> None:
        self.status[device] = (state, round_id)
        self.store.set_status(device, state, round_id)

    def _reject(self, exc: ProtocolError, device: str) -> None:
        self.rejected[exc.reason.name] += 1
        self.metrics.rejected.labels(reason=exc.reason.name).inc()
        event(self.log, "update rejected", device=device[:64], reason=exc.reason.name, detail=exc.detail[:200])

    # ------------------------------------------------------------ closing
    def tick(self, now: float) -> list[Publication]:
        ann, rounds = self.announcement, self.cfg.rounds
        if ann is None or self.ctx is None:
            return []
        if rounds.mode == "async":
            due = len(self.pending) >= rounds.buffer_k or (
                rounds.round_timeout_s > 0 and len(self.pending) >= max(rounds.min_updates, 1)
                and now - min(self.opened, now) >= rounds.round_timeout_s)
            return self._close("buffer") if due else []
        if self.ctx.closed or self.masked is not None:   # a masked round closes when its protocol ends
            return []
        remaining = len(self.expected) - len(self.excused)
        if self.expected and not remaining:
            return self._close("all excused")
        share = -(-remaining // self.cfg.replicas)   # replicas split the devices round-robin
        reason = sync_close_reason(len(self.pending), share, now, ann.deadline, self.opened, rounds)
        return self._close(reason) if reason else []

    def close_masked(self, round_id: int, outcome: SecAggResult | ProtocolError) -> list[Publication]:
        """The masked round `round_id` ended (edge.secagg_round.SecAggRunner): forward the survivors' mean, or an
        insignificant aggregate after an abort."""
        if self.masked is None or self.ctx is None or self.ctx.closed or self.ctx.round_id != round_id:
            return []
        if isinstance(outcome, ProtocolError):
            self.rejected[outcome.reason.name] += 1
            event(self.log, "secagg round aborted", logging.WARNING, round=round_id, detail=outcome.detail)
            return self._close("secagg aborted")
        return self._close("secagg", outcome)

    def _close(self, why: str, masked: SecAggResult | None = None) -> list[Publication]:
        ann = self.announcement
        assert ann is not None and self.model is not None
        sync = self.cfg.rounds.mode == "sync"
        batch = ann.round_id if sync else self.batch + 1
        if ann.statistics:
            return self._close_statistics(ann, why, batch, masked)
        if masked is None:
            agg, result = self._aggregate(self.pending, ann, why)
            mean = result.mean
            if self.edge_masked is not None:   # only metadata in plaintext; the gateway masks the weighted sum
                self.to_mask = (ann.round_id, self.edge_masked.edge_vector(mean, agg.num_samples, agg.num_devices))
                agg = metadata(agg)
        else:
            agg, mean = self._masked_aggregate(masked, ann, why)
        payload = encode(sign_message(agg, self.key))
        state = {"batch": str(batch).encode()}
        if sync:
            state["closed_round"] = str(ann.round_id).encode()
        if masked is None:
            state["bounds"] = json.dumps(self.latest).encode()
        if agg.significant:
            state["last_forwarded"] = mean.tobytes()
            if self.residual is not None:
                state["residual"] = self.residual.tobytes()
        self.store.close_batch(batch, [(u.device_id, u.round_id) for u in self.pending], payload, state)
        if agg.significant:
            self.last_forwarded = mean
        self.batch = batch
        if sync:
            self.closed_round = ann.round_id
        self.pending = []
        self.rejected.clear()
        self.metrics.pending.set(0)
        self.metrics.round_latency.observe(max(0.0, self.clock() - self.opened))
        self.metrics.aggregates.labels(significant=str(agg.significant).lower()).inc()
        if not sync:
            self.opened = self.clock()
        self._refresh()
        return [Publication(aggregate_topic(self.aggregate_id), payload, batch=batch)]

    def _close_statistics(self, ann: RoundAnnouncement, why: str, batch: int,
                          masked: SecAggResult | None = None) -> list[Publication]:
        """Close a statistics round (docs/protocol.md "Statistics rounds"): the row-weighted mean of the sites'
        per-row statistics (FedAvg weights alpha_i = num_samples exactly: no bounds, filters, weighting scheme or
        central DP, which would bias the pooled moments), forwarded dense float32 and always significant. The
        training rounds' state (remembered bounds, last forwarded aggregate, residual) is left untouched. In a
        masked round the sites masked n_i s_i / site_rows_max and their n_i: the unmasked sum gives the same mean
        without the edge seeing any one site's statistics."""
        updates, n_params = self.pending, int(self.model["n_params"])
        if masked is not None:
            values, total, _ = self.masked.split(masked)
            scale = masked_statistics_scale(ann.features)
            mean = (self.masked.dense(values, n_params).astype(np.float64) * scale / max(total, 1)).astype(np.float32)
            ids, total, least = list(masked.devices), float(total), 0
            epsilon = max((self.masked_epsilon.get(d, 0.0) for d in ids), default=0.0)
        else:
            rows = Rows.stack(n_params, [(u.indices, u.values) for u in updates])
            samples = np.array([u.num_samples for u in updates], dtype=np.float64)
            total = float(samples.sum())
            mean = (rows.weighted_sum(samples) / total).astype(np.float32) if total > 0 else np.zeros(n_params,
                                                                                                       np.float32)
            ids, least = [u.device_id for u in updates], int(samples.min()) if updates else 0
            epsilon = float(max((u.epsilon for u in updates), default=0.0))
        event(self.log, "aggregate", round=ann.round_id, why=why, devices=len(ids), statistics=ann.statistics,
              rejected=dict(self.rejected), significant=bool(ids))
        agg = EdgeAggregate(
            edge_id=self.aggregate_id, round_id=ann.round_id, base_version=ann.model_version, num_devices=len(ids),
            num_samples=int(total), weight_sum=total, n_params=n_params,
            delta=encode_update(mean, CompressionSettings(method="dense", bits=32))[0] if ids else b"",
            significant=bool(ids), central_dp=None, filtered=[], rejected=dict(self.rejected), device_ids=ids,
            max_device_epsilon=epsilon,
            mean_local_steps=float(np.mean([u.local_steps for u in updates])) if updates else 0.0,
            nonce=new_nonce(), timestamp=self.clock(), device_bytes=int(sum(u.nbytes for u in updates)),
            update_norms={}, min_device_samples=least)
        payload = encode(sign_message(agg, self.key))
        state = {"batch": str(batch).encode(), "closed_round": str(ann.round_id).encode()}
        self.store.close_batch(batch, [(u.device_id, u.round_id) for u in updates], payload, state)
        self.batch, self.closed_round, self.pending = batch, ann.round_id, []
        self.rejected.clear()
        self.metrics.pending.set(0)
        self.metrics.aggregates.labels(significant=str(agg.significant).lower()).inc()
        self._refresh()
        return [Publication(aggregate_topic(self.aggregate_id), payload, batch=batch)]

    def _aggregate(self, updates: list[Stored], ann: RoundAnnouncement, why: str) -> tuple[EdgeAggregate, Result]:
        n_params = int(self.model["n_params"])
        rows = Rows.stack(n_params, [(u.indices, u.values) for u in updates])
        ids = [u.device_id for u in updates]
        by_id = dict(zip(ids, updates))
        bounds = round_bounds(ids, rows.norms(), np.array([u.num_samples for u in updates], dtype=np.float64),
                              self.latest, self.cfg.bounds)
        self.latest = bounds.latest
        bounded = {d: round(float(f), 6) for d, f in zip(ids, bounds.factors) if f < 1.0}
        capped = {d: int(n) for d, n, u in zip(ids, bounds.samples, updates) if n < u.num_samples}
        if bounded or capped:
            self.metrics.bounded.inc(len(set(bounded) | set(capped)))
            event(self.log, "updates bounded", logging.WARNING, round=ann.round_id, norm_bound=bounds.norm_bound,
                  devices=bounded, samples_capped=capped)
        meta = Meta(num_samples=bounds.samples,
                    losses=np.array([u.train_loss for u in updates], dtype=np.float64),
                    classes=[u.compute_class for u in updates],
                    staleness=staleness_weight(np.array([u.staleness for u in updates], dtype=np.int64),
                                               self.cfg.rounds.staleness_exponent),
                    sample_weight=np.array([ann.sample_weight.get(d, 1.0) for d in ids], dtype=np.float64))
        dp = ann.central_dp
        clip, noise_mult = (dp.clip, dp.noise_mult) if dp is not None else (self.cfg.central_dp.clip,
                                                                             self.cfg.central_dp.noise_mult)
        seeded = self.rng is not None and clip > 0   # the simulator's reproducible noise; else secure_normal
        credited = self._credited(ann, ids, bounds.factors, len(updates)) if clip > 0 else None
        result = aggregate(rows, meta, self.cfg.weighting, self.cfg.filters, clip=clip, noise_mult=noise_mult,
                           rng=self.rng, noise=self.rng.standard_normal(n_params) if seeded else None,
                           factors=bounds.factors, credited=credited)
        counted = result.alpha > 0
        kept = [d for d, c in zip(ids, counted) if c]
        flagged = [d for d, f in zip(ids, result.flagged) if f]
        weightless = [d for d, c, f in zip(ids, counted, result.flagged) if not c and not f]   # e.g. sample_weight 0:
        # the cloud's device-majority gate distrusted them last round (cloud.trust)
        for name, verdict in result.verdicts.items():
            self.metrics.filter_decisions.labels(filter=name, decision="flagged").inc(int(verdict.flags.sum()))
            self.metrics.filter_decisions.labels(filter=name, decision="passed").inc(
                int((np.isfinite(verdict.scores) & ~verdict.flags).sum()))   # NaN: an earlier filter flagged it
        if flagged:
            event(self.log, "updates flagged", logging.WARNING, round=ann.round_id, action=self.cfg.filters.action,
                  devices={d: {n: round(float(v.scores[i]), 4) for n, v in result.verdicts.items()
                               if np.isfinite(v.scores[i])}
                           for i, d in enumerate(ids) if result.flagged[i]})
        change = relative_change(result.mean, self.last_forwarded) if kept else 0.0
        significant = bool(kept) and self.edge_masked is None and (
            self.cfg.forward.significance <= 0 or change > self.cfg.forward.significance)
        delta, control = b"", None
        if significant:
            delta, self.residual = self._encode(result.mean, self.residual)
            controls = [u.control for u, c in zip(updates, counted) if c and u.control is not None]
            if controls:
                control, _ = self._encode(np.mean(controls, axis=0).astype(np.float32), None)
        report = None
        if clip > 0:
            rate = (dp.sampling_rate if dp is not None and dp.sampling_rate > 0 else self.cfg.central_dp.sampling_rate
                    or len(self.expected) / max(len(self.keys.enrolled()), 1))
            total = max(noise_mult, math.sqrt(result.credited_var) / clip)   # what the sum carries
            report = central_dp.report(clip, total, rate, result.num_clipped)
            if credited is not None:
                event(self.log, "distributed dp", round=ann.round_id, noise_mult=round(total, 6),
                      credited_from_devices=round(math.sqrt(result.credited_var) / clip, 6),
                      edge_top_up=round(central_dp.top_up(noise_mult, clip, result.credited_var), 6))
        event(self.log, "aggregate", round=ann.round_id, why=why, devices=len(kept), flagged=len(flagged),
              rejected=dict(self.rejected), significant=significant, relative_change=round(change, 6)
              if np.isfinite(change) else None, aggregator=result.aggregator)
        agg = EdgeAggregate(
            edge_id=self.aggregate_id, round_id=ann.round_id, base_version=ann.model_version, num_devices=len(kept),
            num_samples=int(sum(n for n, c in zip(bounds.samples, counted) if c)),
            weight_sum=float(result.weight_sum), n_params=n_params, delta=delta, significant=significant,
            central_dp=report, filtered=flagged + weightless, rejected=dict(self.rejected), device_ids=kept,
            max_device_epsilon=float(max((u.epsilon for u in updates), default=0.0)),
            mean_local_steps=float(np.mean([u.local_steps for u in updates])) if updates else 0.0,
            nonce=new_nonce(), timestamp=self.clock(), control_delta=control,
            device_bytes=int(sum(u.nbytes for u, c in zip(updates, counted) if c)),
            update_norms={d: float(result.norms[i]) for i, d in enumerate(ids) if counted[i]},
            min_device_samples=int(min((u.num_samples for u, c in zip(updates, counted) if c), default=0)),
            credited_noise_mult=math.sqrt(result.credited_var) / clip if clip > 0 else 0.0,
            **self._sketches([by_id[d] for d in row_order(kept, flagged + weightless)], n_params, clip,
                             ann.plan.noise_mult))
        return agg, result

    def _sketches(self, updates: list[Stored], n_params: int, clip: float, device_noise: float) -> dict:
        """protocol.sketch of every admitted update (in protocol.sketch.row_order), for the cloud's device-majority
        gate: not under central DP (the cloud would see more of one device than the user-level guarantee allows),
        toward an edge-tier SecAgg, or under device DP-SGD (directions are then mostly noise: the cloud does not
        gate on them)."""
        dims = self.cfg.forward.sketch_dims
        if dims <= 0 or clip > 0 or device_noise > 0 or self.edge_masked is not None or not updates:
            return {}
        return {"sketch_dims": dims,
                "sketches": unit_sketches([(u.indices, u.values) for u in updates], n_params, dims)}

    def _credited(self, ann: RoundAnnouncement, ids: list[str], factors: np.ndarray, n: int) -> np.ndarray | None:
        """Per-update std of device noise the central DP may credit (edge.central_dp), or None where the argument
        does not hold: the round must announce the central clip (devices clip to it before their last noise) and
        dense float32 updates, and no filter or bound may inspect or rescale a noised row."""
        plan, c = ann.plan, ann.compression
        if ann.central_dp is None or ann.central_dp.clip <= 0 or not creditable(plan):
            return None
        if c.get("method") != "dense" or c.get("bits") != 32:
            return None
        if (self.cfg.filters.enabled and n >= self.cfg.filters.min_updates) or np.any(np.asarray(factors) < 1.0):
            return None
        return device_stds(plan, ann.lr_scale, ids)

    def _masked_aggregate(self, result: SecAggResult, ann: RoundAnnouncement,
                          why: str) -> tuple[EdgeAggregate, np.ndarray]:
        """The EdgeAggregate of a masked round: the survivors' unweighted mean (no filters: nothing to inspect),
        central DP with the on-device clip bound as sensitivity when the round or the config asks for noise; in a
        credited round (distributed DP, edge.secagg_round) the survivors' noise counts toward it and the report
        carries the sum's total."""
        masked, n_params, dp = self.masked, int(self.model["n_params"]), ann.central_dp
        noise_mult = (dp.noise_mult if dp is not None and dp.clip > 0 else
                      self.cfg.central_dp.noise_mult if self.cfg.central_dp.clip > 0 else 0.0)
        clip, credited = masked.config.clip, credited_var(masked, ann, list(result.devices))
        mean, samples, steps = masked_mean(result, masked, n_params, noise_mult, credited)
        change = relative_change(mean, self.last_forwarded)
        significant = self.cfg.forward.significance <= 0 or change > self.cfg.forward.significance
        delta = b""
        if significant:
            delta, self.residual = self._encode(mean, self.residual)
        report = None
        total = max(noise_mult, math.sqrt(credited) / clip)   # what the sum carries
        if total > 0:
            rate = (dp.sampling_rate if dp is not None and dp.sampling_rate > 0 else self.cfg.central_dp.sampling_rate
                    or len(self.expected) / max(len(self.keys.enrolled()), 1))
            report = CentralDPReport(clip, total, min(rate, 1.0), 0)
        if credited > 0:
            event(self.log, "distributed dp", round=ann.round_id, noise_mult=round(total, 6),
                  credited_from_devices=round(math.sqrt(credited) / clip, 6),
                  edge_top_up=round(central_dp.top_up(noise_mult, clip, credited), 6), secagg=True)
        n = len(result.devices)
        event(self.log, "aggregate", round=ann.round_id, why=why, devices=n, dropped=len(result.dropped),
              significant=significant, secagg=True)
        agg = EdgeAggregate(
            edge_id=self.aggregate_id, round_id=ann.round_id, base_version=ann.model_version, num_devices=n,
            num_samples=samples, weight_sum=float(n), n_params=n_params, delta=delta, significant=significant,
            central_dp=report, filtered=[], rejected=dict(self.rejected), device_ids=list(result.devices),
            max_device_epsilon=max((self.masked_epsilon.get(d, 0.0) for d in result.devices), default=0.0),
            mean_local_steps=steps / max(n, 1), nonce=new_nonce(), timestamp=self.clock(),
            credited_noise_mult=math.sqrt(credited) / clip)
        return agg, mean

    def _encode(self, vector: np.ndarray, residual: np.ndarray | None) -> tuple[bytes, np.ndarray | None]:
        """The aggregate as a compression payload; error feedback only when the forward compression is lossy."""
        s: CompressionSettings = self.forward_settings
        if s.method == "dense" and s.bits == 32:
            return encode_update(vector, s)[0], None
        return encode_update(vector, s, residual)

    # ------------------------------------------------------------ delivery to the cloud
    def undelivered(self) -> list[Publication]:
        """Aggregates the cloud has not receipted: a crash between close and publish, a broker that lost them, a
        cloud that was away (the gateway publishes these bytes again; the cloud counts a nonce once)."""
        return [Publication(aggregate_topic(self.aggregate_id), p, batch=b) for b, p in self.store.undelivered()]

    def handle_receipt(self, data: bytes) -> bool:
        """The cloud's AggregateReceipt: the aggregate with its nonce leaves the outbox. True when it named one."""
        self.metrics.bytes_in.inc(len(data))
        try:
            msg = decode(data, expect=AggregateReceipt)
            verify_raw(data, msg, self.cloud_key)
            if msg.edge_id != self.aggregate_id:
                raise ProtocolError(Reason.WRONG_SENDER, f"receipt for {msg.edge_id!r}")
        except ProtocolError as exc:
            event(self.log, "receipt rejected", logging.WARNING, reason=exc.reason.name, detail=exc.detail[:200])
            return False
        for batch, payload in self.store.undelivered():
            if decode(payload, expect=EdgeAggregate).nonce == msg.aggregate_nonce:
                self.store.mark_delivered(batch)
                final = msg.accepted or msg.reason in (Reason.REPLAY, Reason.DUPLICATE)   # resent: already counted
                event(self.log, "aggregate receipted" if final else "aggregate refused by the cloud",
                      logging.INFO if final else logging.WARNING, round=msg.round_id, batch=batch,
                      accepted=msg.accepted, reason=Reason.name_of(msg.reason))
                return True
        return False

    def _abandon_before(self, round_id: int) -> None:
        """The cloud announced `round_id`: it closed every earlier round, so an aggregate of one still unreceipted
        can no longer count (the broker lost it, or it came too late). Stop sending it, say so, count it."""
        for batch, payload in self.store.undelivered():
            agg = decode(payload, expect=EdgeAggregate)
            if agg.round_id < round_id:
                self.store.mark_delivered(batch)
                self.metrics.abandoned.inc()
                event(self.log, "aggregate never receipted: its round closed without it", logging.WARNING,
                      round=agg.round_id, batch=batch, devices=agg.num_devices)

    def close(self) -> None:
        self.store.close()


def _floats(raw: bytes | None) -> np.ndarray | None:
    return None if raw is None else np.frombuffer(raw, dtype="<f4").copy()

