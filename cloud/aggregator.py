"""The cloud aggregator daemon: the MQTT shell around cloud.engine.CloudEngine (as edge.gateway is around EdgeEngine).

It loads what the engine needs (keys, the model's initial weights, the held-out set), subscribes to
fl/cloud/aggregates/+ and the retained device statuses fl/+/status/+, hands every message to the engine and
publishes what the engine returns (the signed GlobalModel on fl/cloud/model and RoundAnnouncement on fl/cloud/round,
retained). Around that: the SecAgg server of edge-masked rounds (protocol/secagg/runner.py, on a second connection),
the contribution ledger's recorder, distillation after closed rounds (cloud.distill_schedule), Prometheus metrics,
signals and report.json. The round logic, its rules and its crash safety are the engine's (cloud/engine.py).

An aggregate is acknowledged to the broker (manual PUBACK, persistent session) only after the engine returned, when
it is already in pending/: kill -9 at any instant resumes at the open round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np

from cloud.accounting import epsilon, json_epsilon
from cloud.config import CloudConfig, RoundSettings
from cloud.contributions import ContributionRecorder
from cloud.distill_schedule import Distiller
from cloud.engine import FAILED_PREFIX, CloudEngine, failed
from cloud.metrics import Metrics
from cloud.model import CloudModel, EvalData
from cloud.rounds import byte_totals
from cloud.state import CloudState
from cloud.statistics import (
    FEATURES_FILE,
    HISTOGRAM_DIR,
    STATISTICS_DIR,
    SUMMARY_FILE,
    announced,
    derive,
    histogram_settings,
    initial,
    load_transform,
    statistics_settings,
)
from cloud.strategies.base import EdgeResult
from cloud.trust import TrustGate, root_gate
from protocol.atomic import atomic_write
from protocol.features import FeatureTransform, histogram_size
from protocol.keyring import KeyRing
from protocol.logs import event
from protocol.mqtt import INBOX_SIZE, Connection, role_connection
from protocol.publication import Publication
from protocol.secagg.runner import SecAggRunner
from protocol.signing import load_private_key
from protocol.topics import ANY, aggregate_topic, matches, status_topic

AGGREGATES = aggregate_topic(ANY)
STALL_S = 5.0     # the loop stood still this much longer than a tick (hung, SIGSTOP, suspended VM): CloudEngine.resumed
EXIT_FAILED = 4   # the run failed (cloud.engine.failed): the units' RestartPreventExitStatus keeps it stopped
STATUSES = status_topic(ANY, ANY)


class CloudAggregator:
    """The cloud daemon: MQTT, SecAgg, ledger and distillation around a CloudEngine, and report.json at the end."""

    def __init__(self, cfg: CloudConfig, log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.key = load_private_key(cfg.signing_key)
        self.edges = cfg.edge_ids()
        if not self.edges:
            raise ValueError(f"no edges: set `edges` or put {{edge}}.pub files in {cfg.edge_keys_dir}")
        self.edge_keys = KeyRing(cfg.edge_keys_dir, cfg.crl_file, cfg.key_check_s, log=log)
        self.model = CloudModel(cfg.model, cfg.model_options, cfg.seed)
        self.eval_data = self.model.held_out(cfg.eval_data) if cfg.eval_data else None
        if cfg.ledger is not None and self.eval_data is None:
            raise ValueError("[ledger] needs eval_data: contributions are scored on the held-out set")
        if cfg.ledger is not None:
            role_connection(cfg.broker, "ledger")   # a missing certificate stops the start, not the first round
        self.metrics = Metrics()
        self.run_dir = Path(cfg.run_dir)
        self.engine = CloudEngine(
            cfg.round_settings(), self.key, self.edge_keys, self.model.initial, self.run_dir,
            evaluate=self._evaluate if self.eval_data is not None else None,
            contributions=self._contributions if cfg.ledger is not None else None, log=log, metrics=self.metrics,
            trust=self._trust_gate())
        self.version = self.state.version   # the model version published last
        self.stop = threading.Event()
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX_SIZE)
        self.conn = Connection(cfg.broker, cfg.client_id, [AGGREGATES, STATUSES], self.inbox, log)
        self.recorder: ContributionRecorder | None = None
        self.distiller = Distiller(cfg, self.key, self.edges, self.eval_data, log) if cfg.distill is not None else None
        self.secagg_conn = Connection(role_connection(cfg.broker, "secagg"), cfg.client_id + "-secagg", [], self.inbox,
                                      log, manual_ack=False) if self.engine.edge_tier else None
        self.secagg = SecAggRunner(self.secagg_conn.client, cfg.secagg_step_timeout_s, log) if self.secagg_conn \
            else None
        # [features]: eval_data holds raw rows until the statistics round gave the transform (run_dir/features.json)
        self.raw_eval, self.transform = self.eval_data, None
        if cfg.features is not None and (self.run_dir / FEATURES_FILE).exists():
            self._use_transform(load_transform(self.run_dir))

    def _trust_gate(self) -> TrustGate | None:
        """[trust] root_data: the root updates run in the firmware model's own training graph (what devices run)."""
        cfg = self.cfg
        if cfg.trust.root_data is None:
            return None
        from device.runtime import TrainableModel
        from firmware_models import build_trainable

        root = self.model.held_out(cfg.trust.root_data)
        model_bytes, manifest = build_trainable(cfg.model, batch_size=cfg.plan.batch_size, **cfg.model_options)
        model = TrainableModel(model_bytes, manifest, rng=np.random.default_rng(cfg.seed), num_threads=1)
        event(self.log, "trust gate on", root_rows=len(root.y), min_cosine=cfg.trust.min_cosine)
        return root_gate(model, root.x, root.y, cfg.trust, np.random.default_rng(cfg.seed))

    @property
    def state(self) -> CloudState:
        return self.engine.state

    def _evaluate(self, weights: np.ndarray) -> tuple[float, float, dict]:
        return self.model.evaluate(weights, self.eval_data)

    def _contributions(self, round_id: int, version: int, results: list[EdgeResult],
                       previous: np.ndarray) -> dict | None:
        """The ledger hook: score the edges that sent a delta (leave-one-out on the held-out set) and record them."""
        scored = [r for r in results if r.delta is not None and r.num_devices > 0]
        if self.recorder is None or not scored:
            return None
        return self.recorder.record(round_id, version, [r.edge_id for r in scored], [r.delta for r in scored],
                                    [r.num_samples for r in scored], previous, lambda w: self._evaluate(w)[1],
                                    np.random.default_rng([self.cfg.seed, round_id]))

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
        if not self.state.stop_reason:
            if not all(c.start(self.stop) for c in filter(None, (self.conn, self.secagg_conn))):
                return 0
            event(self.log, "cloud running", run_id=self.state.run_id, strategy=self.engine.strategy.name,
                  model=self.cfg.model,
                  n_params=self.model.n_params, edges=self.edges, round=self.state.round_id,
                  resumed=bool(self.state.history))
            if self.cfg.ledger is not None:
                self.recorder = ContributionRecorder(self.cfg.ledger, self.key, self.cfg.broker, self.log, self.stop)
            if self._statistics_round():
                self._publish(self.engine.start(time.time()))
                self._loop()
            for conn in filter(None, (self.conn, self.secagg_conn)):
                conn.close()
            if self.recorder is not None:
                self.recorder.close()
            if self.distiller is not None:
                self.distiller.join()
        self.write_report()
        event(self.log, "cloud stopped", finished=bool(self.state.stop_reason) and not failed(self.state.stop_reason),
              reason=self.state.stop_reason, rounds=len(self.state.history))
        return EXIT_FAILED if failed(self.state.stop_reason) else 0

    def _loop(self) -> None:
        beat = time.monotonic()
        while not self.stop.is_set() and not self.state.stop_reason:
            self._drain_one(self.cfg.tick_s)
            if self.secagg is not None:
                for round_id, outcome in self.secagg.finished():
                    self.engine.masked_finished(round_id, outcome, time.time())
            self._resume_if_stalled(beat)
            self._publish(self.engine.tick(time.time()))
            beat = time.monotonic()

    def _resume_if_stalled(self, beat: float) -> None:
        """Before judging a deadline: if this loop stood still since `beat` (more than a tick's wait + STALL_S), the
        round's deadline passed while we could not receive, so it is announced again (CloudEngine.resumed)."""
        if time.monotonic() - beat > self.cfg.tick_s + STALL_S:
            self._publish(self.engine.resumed(time.time()))

    # ------------------------------------------------------------------ federated standardisation
    def _use_transform(self, transform: FeatureTransform) -> None:
        """Announce `transform` in every training round, evaluate and distil on transformed rows, put it into the
        students' manifests."""
        self.transform = transform
        self.engine.settings = dataclasses.replace(self.engine.settings, features=announced(transform))
        if self.raw_eval is not None:
            x = self.raw_eval.x
            self.eval_data = EvalData(transform.apply(x.reshape(len(x), -1)).reshape(x.shape), self.raw_eval.y)
        if self.distiller is not None:
            self.distiller.eval_data, self.distiller.features = self.eval_data, transform

    def _statistics_round(self) -> bool:
        """[features] without a transform yet: run the statistics round (cloud.statistics) on its own engine
        before training, derive the transform (with `quantile`, clip it at the quantiles of a second, histogram
        round) and keep it in run_dir/features.json. True when training may start; False when stopped or when a
        statistics round failed (the run fails, exit 4)."""
        cfg = self.cfg
        if cfg.features is None or self.transform is not None:
            return True
        schema, quantile = cfg.features.load_schema(), cfg.features.quantile
        bounds, noise_mult = cfg.features.encoded_bounds(schema), cfg.features.noise_mult
        masked = cfg.features.secagg
        kept = self.run_dir / STATISTICS_DIR / SUMMARY_FILE   # the first round's transform, across a crash
        if kept.exists():
            transform = FeatureTransform.from_dict(json.loads(kept.read_text()))
        else:
            done = self._run_statistics(statistics_settings(self.engine.settings, schema, bounds, noise_mult,
                                                            masked, cfg.features.site_rows_max),
                                        initial(schema), STATISTICS_DIR)
            if done is None:
                return False
            stats, rows = done
            record = stats.state.history[-1]
            provenance = {"rounds": 1, "sites": record["num_devices"], "edges": record["num_edges"],
                          "run_id": stats.state.run_id, "secagg": masked is not None, "central_noise": 0.0,
                          "site_noise": noise_mult, "bounds": bool(bounds)}
            transform = derive(stats.state.server.weights, rows, schema, cfg.features.clip_z, provenance, bounds)
            if quantile > 0:
                atomic_write(kept, json.dumps(transform.to_dict()).encode())
        if quantile > 0:
            done = self._run_statistics(histogram_settings(self.engine.settings, transform, noise_mult, masked,
                                                           cfg.features.site_rows_max),
                                        np.zeros(histogram_size(schema.n_features), np.float32), HISTOGRAM_DIR)
            if done is None:
                return False
            transform = transform.with_quantile_clip(done[0].state.server.weights, quantile)
            transform = dataclasses.replace(transform, provenance={**transform.provenance, "rounds": 2})
        atomic_write(self.run_dir / FEATURES_FILE, json.dumps(transform.to_dict(), indent=1).encode())
        event(self.log, "feature transform derived", sites=transform.provenance["sites"],
              edges=transform.provenance["edges"], rows=transform.count, features=transform.n_features,
              clipped_at_quantile=quantile or None)
        self._use_transform(transform)
        return True

    def _run_statistics(self, settings: RoundSettings, start: np.ndarray,
                        directory: str) -> tuple[CloudEngine, int] | None:
        """Run one statistics round on its own engine (run_dir/`directory`, resumed after a crash) until it closes;
        (the engine, the rows it pooled), or None when the daemon stopped or the round failed."""
        run_dir = self.run_dir / directory
        fresh = not (run_dir / "checkpoint.npz").exists()
        settings = dataclasses.replace(settings, run_id=self.state.run_id if fresh else "")
        stats = CloudEngine(settings, self.key, self.edge_keys, start, run_dir, log=self.log)
        if not self.engine.checkpoint.exists():
            self.state.run_id = stats.state.run_id   # one run: the statistics rounds' and the training rounds'
        rows: dict[str, int] = {}

        def publish(pubs: list[Publication]) -> None:
            rows.update({e: r.agg.num_samples for e, r in stats.received.items()})
            if not stats.state.history:   # the closed round's "model" (the pooled vector) is not for devices
                for p in pubs:
                    self.conn.client.publish(p.topic, p.payload, qos=1, retain=p.retain)

        event(self.log, "statistics round", kind=settings.statistics, round=settings.first_round,
              values=len(start))
        publish(stats.start(time.time()))
        while not self.stop.is_set() and not stats.state.history and not stats.stop_reason:
            try:
                conn, topic, payload, mid, qos = self.inbox.get(timeout=self.cfg.tick_s)
            except queue.Empty:
                pass
            else:
                try:
                    if matches(AGGREGATES, topic):
                        publish(stats.handle_aggregate(topic, payload))
                    else:
                        stats.handle_status(payload)
                        self.engine.handle_status(payload)
                except Exception:  # the daemon must not die on a message
                    self.log.exception("message handling failed", extra={"fields": {"topic": topic[:200]}})
                conn.ack(mid, qos)
            publish(stats.tick(time.time()))
        if not stats.state.history or failed(stats.stop_reason):
            if failed(stats.stop_reason):
                self.state.stop_reason = stats.stop_reason.replace(FAILED_PREFIX, f"{FAILED_PREFIX} statistics", 1)
            return None
        return stats, sum(rows.values())

    def _drain_one(self, timeout: float) -> None:
        """Admit one message; the loop's tick then closes a complete round (after its stall check)."""
        try:
            conn, topic, payload, mid, qos = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        try:
            if matches(AGGREGATES, topic):
                self._publish(self.engine.handle_aggregate(topic, payload))
            else:
                self.engine.handle_status(payload)
        except Exception:  # the daemon must not die on a message
            self.log.exception("message handling failed", extra={"fields": {"topic": topic[:200]}})
        conn.ack(mid, qos)

    def _publish(self, pubs: list[Publication]) -> None:
        """Publish the engine's messages; after a closed round, distil when due; start a new masked round's
        SecAgg server."""
        s = self.state
        for p in pubs:
            self.conn.client.publish(p.topic, p.payload, qos=1, retain=p.retain)
        if s.version != self.version:  # a round closed with a new model
            self.version = s.version
            if self.distiller is not None:
                self.distiller.after_round(s.history[-1]["round"], s.server.weights, s.version)
        if self.secagg is not None and s.announcement and self.secagg.started != s.round_id:
            self.secagg.start(*self.engine.masked_round(time.time()))

    # ------------------------------------------------------------------ outputs
    def write_report(self) -> dict:
        s, h = self.state, self.state.history
        last = h[-1] if h else {}
        report = {
            "strategy": self.engine.strategy.name, "model": self.cfg.model, "n_params": self.model.n_params,
            "rounds_completed": len(h), "finished": bool(s.stop_reason) and not failed(s.stop_reason),
            "failed": failed(s.stop_reason), "stop_reason": s.stop_reason, "run_id": s.run_id,
            "final_accuracy": last.get("accuracy"), "final_loss": last.get("loss"),
            "total_bytes_up": sum(r["bytes_up"] for r in h),
            "total_bytes_down": sum(r["bytes_down"] for r in h),
            "dense_bytes_up": sum(r["dense_bytes_up"] for r in h),
            **byte_totals(h),
            "epsilon": last.get("epsilon"), "delta": self.cfg.privacy.delta,
            "rounds": h,
        }
        if self.cfg.privacy.final_pld and h:
            report["epsilon_pld"] = json_epsilon({
                "device_derived": epsilon(s.ledger.device, s.ledger.delta, "pld"),
                "central": epsilon(s.ledger.central, s.ledger.delta, "pld")})
        atomic_write(self.run_dir / "report.json", json.dumps(report, indent=1).encode())
        return report

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
