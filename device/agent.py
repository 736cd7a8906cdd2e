"""The device agent: verify what the cloud sends, train, account, compress, sign (or MAC), publish.

Messages arrive on paho's network thread and are queued; the main thread handles them one at a time, so training
never races a model swap. Every handler refuses bad input with a logged ProtocolError and carries on. Order within
a round: check the budget BEFORE training; after training persist the spent budget, residual, c_i and the update
itself atomically; only then publish. The update is resent, the same bytes, after each Ack timeout until the edge
acknowledges it or the round is over, after a restart too (a kill -9 in between loses no update, and never budget).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from device.config import DeviceConfig, ota_class
from device.data import load_data, load_raw
from device.flash import flash_local, load_installed
from device.inference import accept_for_inference, accept_for_training
from device.ota import OtaConfig as OtaReceiverConfig
from device.ota import OtaReceiver
from device.runtime import TrainableModel, secure_generator
from device.state import STATE_FILE, DeviceState, Unacked, load_state, save_state
from device.training import (
    LocalResult,
    calibrated_plan,
    planned_steps,
    privacy_limit,
    steps_within,
    train_round,
)
from device.update import ENVELOPE_BYTES, RoundIdentity, build_update
from protocol import accountant, topics
from protocol.bundle import Bundle, load_bundle
from protocol.compression import (
    CompressionSettings,
    adaptive_settings,
    encoded_size_bound,
)
from protocol.errors import ProtocolError, Reason
from protocol.features import (
    STATISTICS_MODEL,
    FeatureSchema,
    FeatureTransform,
    check_bounds,
    masked_statistics_scale,
    site_histogram,
    site_summary,
)
from protocol.global_model import catch_up, rebuild
from protocol.logs import event
from protocol.messages import (
    Ack,
    Capability,
    DeviceStatus,
    DeviceUpdate,
    GlobalModel,
    RoundAnnouncement,
    decode,
    encode,
    mac_message,
    new_nonce,
    newer_run,
    sign_message,
    verify_raw,
)
from protocol.mqtt import Connection, backoff_delays
from protocol.secagg import SecAggClient
from protocol.secagg.deploy import MaskedRound, masked_round
from protocol.secagg.mqtt_driver import run_client_round
from protocol.signing import derive_mac_key, load_mac_key, load_private_key, load_public_key

CONNECTED = ""             # inbox marker: the link (re)connected
SPEED_SMOOTHING = 0.5      # weight of the newest steps/s measurement


def user_clip(ann: RoundAnnouncement, masked: MaskedRound | None) -> float:
    """The user-level clip the noise-free delta gets before the last step's noise (device.training), so the edge
    can credit that noise (distributed DP): the announced central clip in a plaintext round, the secagg clip (the
    sensitivity the edge reports) in a credited masked round; 0 (no user-level clip) otherwise."""
    if masked is not None:
        return masked.config.clip if masked.credited else 0.0
    return ann.central_dp.clip if ann.central_dp is not None else 0.0


class DeviceAgent:
    """The device daemon: checks the cloud's messages, trains with DP-SGD, accounts its budget, sends signed updates."""

    def __init__(self, cfg: DeviceConfig, log: logging.Logger) -> None:
        self.cfg, self.log = cfg, log
        self.cloud_key = load_public_key(cfg.cloud_pubkey)
        self.bundle_key = load_public_key(cfg.bundle_pubkey)
        self.signing_key = load_private_key(cfg.signing_key)
        self.mac_key = None if cfg.mac_key is None else derive_mac_key(load_mac_key(cfg.mac_key), cfg.id, cfg.edge)
        self.state_path = cfg.state_dir / STATE_FILE
        self.state = load_state(self.state_path)
        self.resend_at = 0.0   # monotonic time of the next resend of state.unacked; 0: once connected (a restart)
        self.resend_delays = backoff_delays(cfg.ack_timeout_s, cfg.ack_timeout_max_s)
        self.rng = secure_generator()
        self.stop = threading.Event()
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pending: RoundAnnouncement | None = None
        self.bundle: Bundle = load_installed(cfg.bundle_dir, self.bundle_key)  # refuses a tampered bundle
        self._load_model()
        edge, dev = cfg.edge, cfg.id
        self.topics = {"round": topics.round_topic(edge), "model": topics.model_topic(edge),
                       "ack": topics.ack_topic(edge, dev), "model_full": topics.model_full_topic(edge)}
        self.wanted: GlobalModel | None = None     # a signed delta we could not apply: catching up (_catch_up)
        self.offered: GlobalModel | None = None    # the edge's latest full model (unsigned) while catching up
        self.status_topic, self.update_topic = topics.status_topic(edge, dev), topics.update_topic(edge, dev)
        self.link = Connection(cfg.broker, dev, [self.topics["model"], self.topics["round"], self.topics["ack"]],
                               None, log, on_message=self._received, on_connected=self._connected,
                               will=(self.status_topic, self._status_bytes("offline")))
        self.switch_to_inference = False   # set when OTA installed an int8 student (mode "auto")
        self.ota = self._make_ota() if cfg.ota.enabled else None

    def _make_ota(self) -> OtaReceiver:
        ota_cfg = OtaReceiverConfig(edge=self.cfg.edge, device_class=ota_class(self.cfg),
                                    bundle_dir=Path(self.cfg.bundle_dir), retry_s=self.cfg.ota.retry_s)
        # mode "train": a bundle that cannot train (an int8 student) is refused before install; "auto": any
        # inference-capable bundle, and an int8 student switches the device to inference (device/inference.py)
        return OtaReceiver(ota_cfg, self.cloud_key, self.bundle_key, self.link.subscribe, self.link.unsubscribe,
                           samples=self._smoke_rows, on_installed=self._ota_installed, on_result=self._ota_result,
                           accept=accept_for_training if self.cfg.mode == "train" else accept_for_inference,
                           log=self.log)

    def _ota_result(self, result) -> None:
        """Every OTA outcome as a status (`fediomt push` reports them): ota_installed / ota_refused / ..."""
        self.publish_status(f"ota_{result.outcome}", detail=f"{result.name} v{result.version}: {result.reason} "
                                                            f"{result.detail}".strip())

    # ------------------------------------------------------------------ model and bundle
    def _load_model(self) -> None:
        if self.bundle.manifest["kind"] != "trainable":
            raise ProtocolError(Reason.BAD_VALUE, f"bundle {self.bundle.name} is a {self.bundle.manifest['kind']}, "
                                                  "the agent trains: it needs a trainable bundle")
        self.model = TrainableModel(self.bundle.model_bytes, self.bundle.manifest, rng=self.rng,
                                    num_threads=self.cfg.threads)
        weights = self.state.weights
        self.initial_weights = self.model.get_flat()   # the bundle's: where a new run starts from
        if self.state.model_name != self.bundle.name or weights is None or weights.size != self.model.n_params:
            # a first start, or a new architecture: the bundle's initial weights, no global version yet
            self.state = DeviceState(history=self.state.history, seen_rounds=self.state.seen_rounds,
                                     extra=self.state.extra).for_new_model(self.bundle.name, -1, self.model.get_flat())
        self.state = replace(self.state, extra={**self.state.extra, "bundle_version": self.bundle.version})
        save_state(self.state_path, self.state)

    def install_bundle(self, source: str | Path) -> Bundle:
        """Verify the bundle in `source`, install it as `fediomt flash` does (bundle_dir/current, the old one kept
        as previous; refuses a downgrade), and reload the interpreter."""
        flash_local(load_bundle(source, self.bundle_key), Path(self.cfg.bundle_dir), self.bundle_key)
        return self.reload_bundle()

    def reload_bundle(self) -> Bundle:
        """Load bundle_dir/current into a fresh interpreter: the hook for OTA (device.ota's on_installed)."""
        self.bundle = load_installed(self.cfg.bundle_dir, self.bundle_key)
        self._load_model()
        self._stop_catching_up()   # a version of the old bundle's model is no use to the new one
        event(self.log, "bundle loaded", name=self.bundle.name, version=self.bundle.version)
        return self.bundle

    def _ota_installed(self, bundle: Bundle) -> None:
        """OTA installed `bundle` as current: train with it from now on, or, for an int8 student (mode "auto"),
        leave the loop so that `fediomt device run` continues in inference mode with it."""
        if bundle.manifest["kind"] != "trainable":
            self.switch_to_inference = True
            event(self.log, "int8 bundle installed: switching to inference", name=bundle.name, version=bundle.version)
            return
        self.reload_bundle()
        self.publish_status("online", detail=f"bundle {bundle.name} v{bundle.version}")

    def _smoke_rows(self):
        """A few local rows for the OTA smoke test (None when the data cannot be read)."""
        try:
            return load_data(self.cfg.data, self.model.input_shape, self.model.n_classes, self.features())[0][:8]
        except (ValueError, OSError):
            return None

    def _follow_run(self, run_id: str, kind: str) -> bool:
        """Whether a verified round or model belongs to the run this device follows. A newer run's is adopted
        first (the old run's model, rounds and residual forgotten, the privacy history kept: `device new-run`);
        an older run's (a broker's retained copy) is ignored."""
        after = str(self.state.extra.get("after_run", ""))   # `device new-run` ended that run: only later ones
        order = -1 if after and run_id <= after else newer_run(run_id, self.state.run_id)
        if order < 0:
            event(self.log, "message of an older run ignored", kind=kind, run=run_id, following=self.state.run_id)
            return False
        if order > 0:
            previous = self.state.run_id
            self.state = self.state.for_new_run(run_id).for_new_model(self.bundle.name, -1, self.initial_weights)
            self.pending = None
            self._stop_catching_up()
            save_state(self.state_path, self.state)
            event(self.log, "new run", run=run_id, previous=previous or None)
        return True

    def _on_model(self, payload: bytes) -> None:
        msg = decode(payload, expect=GlobalModel)
        verify_raw(payload, msg, self.cloud_key)
        if not self._follow_run(msg.run_id, "model"):
            return
        if msg.model_name == STATISTICS_MODEL:
            return   # a statistics round's zero "model" (docs/protocol.md "Statistics rounds"): nothing to hold
        if msg.model_name != self.bundle.name or msg.n_params != self.model.n_params:
            raise ProtocolError(Reason.BAD_SHAPE, f"model {msg.model_name} ({msg.n_params} params) is not the "
                                                  f"installed {self.bundle.name} ({self.model.n_params})")
        if msg.model_version <= self.state.model_version:
            return  # a retained copy we already hold (or an older one)
        try:
            weights, control = rebuild(msg, self.state.model_version, self.state.weights)
        except ProtocolError as exc:
            if exc.reason != Reason.STALE:
                raise
            self._catch_up(msg)
            return
        self._install(msg, weights, control, msg.encoding)

    def _install(self, msg: GlobalModel, weights: np.ndarray, control: np.ndarray | None, source: str) -> None:
        """Hold `msg`'s version; `source` says how it came: "full" or "delta" from the cloud, or "edge" (a
        catch-up from the edge's full copy)."""
        self.state = self.state.for_new_model(msg.model_name, msg.model_version, weights, control)
        save_state(self.state_path, self.state)
        if self.wanted is not None and self.wanted.model_version <= msg.model_version:
            self._stop_catching_up()
        event(self.log, "global model installed", version=msg.model_version, source=source)
        self._maybe_train()

    def _stop_catching_up(self) -> None:
        if self.wanted is not None:
            self.wanted = self.offered = None
            self.link.unsubscribe([self.topics["model_full"]])

    def _catch_up(self, signed: GlobalModel) -> None:
        """A verified delta against a version we do not hold: fetch its full form from the edge's retained
        model/full topic (docs/protocol.md "Catching up after a missed version") and install it when it matches."""
        if self.wanted is None:
            event(self.log, "missed a model version: fetching it in full from the edge", have=self.state.model_version,
                  want=signed.model_version)
            self.link.subscribe([self.topics["model_full"]])
        elif signed.model_version < self.wanted.model_version:
            return   # an older delta (a retained copy): we want the newer one already
        self.wanted = signed
        self._take_offered()

    def _on_full_model(self, payload: bytes) -> None:
        """The edge's unsigned full model: kept (a hostile one is refused) until a signed delta vouches for it."""
        if self.wanted is None:   # up to date (a subscription a persistent session kept): stop receiving them
            self.link.unsubscribe([self.topics["model_full"]])
            return
        offered = decode(payload, expect=GlobalModel)
        if self.offered is None or offered.model_version >= self.offered.model_version:
            self.offered = offered   # a lagging edge replica's older copy does not displace a newer one
        self._take_offered()

    def _take_offered(self) -> None:
        """Install the offered copy when it is the wanted version (an edge ahead of our deltas: its signed delta
        follows)."""
        wanted, offered = self.wanted, self.offered
        if wanted is None or offered is None or offered.model_version != wanted.model_version:
            return
        self.offered = None
        weights, control = catch_up(offered, wanted)
        self._install(wanted, weights, control, "edge")

    # ------------------------------------------------------------------ rounds
    def _on_round(self, payload: bytes) -> None:
        ann = decode(payload, expect=RoundAnnouncement)
        verify_raw(payload, ann, self.cloud_key)
        if not self._follow_run(ann.run_id, "round"):
            return
        if self.state.unacked is not None and ann.round_id > self.state.unacked.round_id:
            self._settle(f"round {ann.round_id} announced")   # the edge closed the update's round
        if ann.statistics:
            if ann.round_id not in self.state.seen_rounds and (not ann.cohort or self.cfg.id in ann.cohort) \
                    and ann.deadline > time.time():
                self.send_statistics(ann)
            return
        if ann.model_name != self.bundle.name or ann.round_id in self.state.seen_rounds:
            return
        if ann.cohort and self.cfg.id not in ann.cohort:
            return
        if ann.deadline <= time.time():
            event(self.log, "round already closed", round=ann.round_id)
            return
        self.pending = ann
        self._maybe_train()

    def _maybe_train(self) -> None:
        ann = self.pending
        if ann is None:
            return
        if ann.model_version != self.state.model_version:
            event(self.log, "waiting for the round's model", round=ann.round_id, want=ann.model_version,
                  have=self.state.model_version)
            return
        self.pending = None
        self.run_round(ann)

    def _answer(self, ann: RoundAnnouncement, state: str, detail: str, **changes) -> None:
        """Record the round as answered (with any state changes), persist, then publish a status."""
        self.state = replace(self.state.answered(ann.round_id), **changes)
        save_state(self.state_path, self.state)
        self.publish_status(state, ann.round_id, detail)

    def run_round(self, ann: RoundAnnouncement) -> None:
        """Answer one round: decline what cannot be done, refuse what the budget cannot pay, else train + send."""
        cfg, plan = self.cfg, ann.plan
        try:
            x, y = load_data(cfg.data, self.model.input_shape, self.model.n_classes, self.features(ann))
        except (ValueError, OSError) as exc:
            return self._answer(ann, "declined", f"local data: {exc}")
        batch = plan.batch_size   # the expected Poisson batch b (q = b / n) the cloud and edges account with
        if len(x) < batch:
            return self._answer(ann, "declined", f"{len(x)} examples, fewer than one batch of {batch}")
        if plan.scaffold and self.state.server_control is None:
            return self._answer(ann, "declined", "SCAFFOLD round but the global model has no control variate")
        try:
            masked = masked_round(ann)   # credited (distributed DP) where the announcement allows it
        except ProtocolError as exc:
            return self._answer(ann, "declined", f"secagg: {exc}")
        if masked is not None and (plan.scaffold or cfg.secagg_keys_dir is None):
            return self._answer(ann, "declined", "secure aggregation needs secagg_keys_dir and no SCAFFOLD")
        time_left = ann.deadline - time.time() - cfg.deadline_margin_s
        speed = self.state.steps_per_s or cfg.capability.steps_per_s
        steps = steps_within(planned_steps(plan, len(x), batch), time_left, speed)
        if steps < cfg.min_steps or time_left <= 0:
            return self._answer(ann, "declined", f"{steps} steps fit before the deadline")
        try:
            settings = self._settings(ann, time_left)
        except ProtocolError as exc:  # bad announced settings, or nothing fits the broker's cap
            return self._answer(ann, "declined", f"compression: {exc}")
        history, budget = self.state.history, cfg.privacy
        limit, delta = privacy_limit(plan, budget.epsilon, budget.delta)   # the budget, and any announced target
        plan = calibrated_plan(plan, history, len(x), limit, delta)
        if not accountant.can_afford(history, accountant.Entry(plan.noise_mult, batch / len(x), steps), limit, delta,
                                     budget.accountant):
            return self._answer(ann, "budget_exhausted", f"round {ann.round_id} ({steps} steps, noise "
                                                         f"{plan.noise_mult}) would exceed epsilon {limit:g}")
        self.publish_status("training", ann.round_id)
        result = train_round(self.model, x, y, self.state.weights, plan, steps, self.rng,
                             lr_scale=ann.lr_scale.get(cfg.id, 1.0), time_limit_s=time_left,
                             c_global=self.state.server_control, c_local=self.state.control,
                             should_stop=self.stop.is_set,
                             user_clip=user_clip(ann, masked))
        if self.stop.is_set():  # nothing was released, so nothing is spent: the round is simply not answered
            event(self.log, "stopping: round abandoned", round=ann.round_id, steps=result.local_steps)
            return
        self._finish(ann, result, settings, masked)

    def _finish(self, ann: RoundAnnouncement, result: LocalResult, settings: CompressionSettings,
                masked: MaskedRound | None = None) -> None:
        cfg, budget = self.cfg, self.cfg.privacy
        speed = result.local_steps / max(result.elapsed_s, 1e-6)
        old = self.state.steps_per_s
        speed = speed if old <= 0 else SPEED_SMOOTHING * speed + (1 - SPEED_SMOOTHING) * old
        if masked is not None:  # no significance skip: a silent cohort member would count as a dropout
            entry = accountant.Entry(result.noise_mult, result.sample_rate, result.local_steps)
            return self._send_masked(ann, result, masked, (*self.state.history, entry), speed)
        who = RoundIdentity(cfg.id, cfg.edge, ann.round_id, self.state.model_version)
        out = build_update(result, who, settings, history=self.state.history, residual=self.state.residual,
                           control=self.state.control, delta=budget.delta, accountant_name=budget.accountant,
                           capability=self.capability(speed), n_params=self.model.n_params, rng=self.rng,
                           nonce=new_nonce(), timestamp=time.time(),
                           significance_threshold=cfg.significance_threshold)
        if out.update is None:
            return self._answer(ann, "skipped", out.skipped, history=out.history, residual=out.residual,
                                steps_per_s=speed)
        update = self.seal(out.update)
        data = encode(update)
        self.state = replace(self.state.answered(ann.round_id), history=out.history, residual=out.residual,
                             control=out.control, steps_per_s=speed, unacked=Unacked(ann.round_id, ann.deadline, data))
        save_state(self.state_path, self.state)  # the spend (and the update) is on disk before anything leaves
        self.link.publish(self.update_topic, data)
        self.resend_delays = backoff_delays(cfg.ack_timeout_s, cfg.ack_timeout_max_s)
        self.resend_at = time.monotonic() + next(self.resend_delays)
        event(self.log, "update sent", round=ann.round_id, steps=result.local_steps, loss=round(result.loss, 4),
              norm=round(out.norm, 4), bytes=len(data), epsilon=round(update.privacy.epsilon, 4),
              method=settings.method, density=settings.density, bits=settings.bits)

    def features(self, ann: RoundAnnouncement | None = None) -> dict | None:
        """The feature transform applied to raw local data: the one the run's training rounds announce (derived by
        its statistics round; kept in the state for the rounds and restarts that follow), else the bundle's."""
        extra = self.state.extra
        if ann is not None and ann.features and not ann.statistics and extra.get("features") != ann.features:
            self.state = replace(self.state, extra={**extra, "features": ann.features, "features_run": ann.run_id})
            save_state(self.state_path, self.state)
        extra = self.state.extra
        if extra.get("features") and extra.get("features_run") == self.state.run_id:
            return json.loads(extra["features"])
        return self.bundle.manifest.get("features")

    def send_statistics(self, ann: RoundAnnouncement) -> None:
        """Answer a statistics round (docs/protocol.md "Statistics rounds"): the per-row averages of the sufficient
        statistics of the raw local rows over the announced schema (protocol.features.site_summary; in a
        "histogram" round the z-score histograms under the announced transform, site_histogram) as an ordinary
        signed update, num_samples = the rows. With announced `bounds` the rows are clipped to them and
        summarised on the unit scale; with `noise_mult` > 0 Gaussian noise calibrated to one record's influence is
        added first, which costs one Gaussian mechanism, Entry(noise_mult, 1, 1), of the example-level budget:
        checked before and persisted before the update leaves, like a training round's spend. Without noise
        nothing is spent, and the edge sees these exact per-site statistics (it forwards only the row-weighted
        mean of its sites)."""
        cfg, budget = self.cfg, self.cfg.privacy
        try:
            announced = json.loads(ann.features)
            histogram = ann.statistics == "histogram"   # the optional second round: z-score histograms
            transform = FeatureTransform.from_dict(announced) if histogram else None
            schema = transform.schema if histogram else FeatureSchema.from_dict(announced)
            bounds = None if histogram else check_bounds(announced.get("bounds"), schema.n_features)
            noise_mult = float(announced.get("noise_mult", 0.0))
            if not (math.isfinite(noise_mult) and noise_mult >= 0) or (noise_mult > 0 and bounds is None
                                                                       and not histogram):
                raise ValueError(f"noise_mult {noise_mult!r} (finite, >= 0, and only with bounds)")
            masked = MaskedRound.from_announcement(ann.secagg)
            scale = masked_statistics_scale(ann.features) if masked is not None else 0
            x = load_raw(cfg.data, schema)
        except (ValueError, OSError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
            return self._answer(ann, "declined", f"statistics: {exc}")
        if masked is not None and len(x) > scale:
            return self._answer(ann, "declined", f"statistics: {len(x)} rows, more than the round's site_rows_max "
                                                 f"{scale}")
        if len(x) < self.model.batch_size:   # the same floor as training: no statistics of a handful of patients
            return self._answer(ann, "declined", f"statistics: {len(x)} rows, fewer than one batch of "
                                                 f"{self.model.batch_size}")
        history = self.state.history
        if noise_mult > 0:
            entry = accountant.Entry(noise_mult, 1.0, 1)
            if not accountant.can_afford(history, entry, budget.epsilon, budget.delta, budget.accountant):
                return self._answer(ann, "budget_exhausted", f"statistics (noise {noise_mult}) would exceed "
                                                             f"epsilon {budget.epsilon}")
            history = (*history, entry)
        vector, rows = site_histogram(x, transform, noise_mult, self.rng) if histogram else \
            site_summary(x, bounds, noise_mult, self.rng)
        self.state = replace(self.state.answered(ann.round_id), history=history)
        save_state(self.state_path, self.state)   # the spend (if any) is on disk before anything leaves
        if masked is not None:   # the edge learns only the cohort's sum of n_i s_i (and of n_i)
            return self._mask_and_send(ann, masked.device_vector(vector * (rows / scale), rows, 0),
                                       kind=ann.statistics, rows=rows)
        result = LocalResult(vector.astype("float32"), rows, 0, 0.0, 1.0, 0.0, 0.0)
        out = build_update(result, RoundIdentity(cfg.id, cfg.edge, ann.round_id, ann.model_version),
                           CompressionSettings.from_dict(ann.compression), history=history,
                           residual=None, control=None, delta=budget.delta, accountant_name=budget.accountant,
                           capability=self.capability(), n_params=vector.size, rng=self.rng, nonce=new_nonce(),
                           timestamp=time.time())
        data = encode(self.seal(out.update))
        self.link.publish(self.update_topic, data)
        event(self.log, "statistics sent", round=ann.round_id, kind=ann.statistics, rows=rows,
              features=schema.n_features,
              bytes=len(data), noise_mult=noise_mult, epsilon=round(out.update.privacy.epsilon, 4))

    def _send_masked(self, ann: RoundAnnouncement, result: LocalResult, masked: MaskedRound,
                     history: tuple, speed: float) -> None:
        """Untrusted-edge round: persist the spend, then take part in the cohort's secure aggregation with the
        clipped delta (docs/secagg.md "Deployment"; in a credited round the noised delta, clipped before its last
        noise, whose noise the edge counts); the edge learns only the cohort sum. The error-feedback residual is
        left as it is (masked rounds send no compression payload)."""
        vector = masked.device_vector(result.delta, result.num_samples, result.local_steps)
        self.state = replace(self.state.answered(ann.round_id), history=history, steps_per_s=speed)
        save_state(self.state_path, self.state)  # the spend is on disk before anything leaves the device
        self._mask_and_send(ann, vector, steps=result.local_steps)

    def _mask_and_send(self, ann: RoundAnnouncement, vector, **fields) -> None:
        """Take part in the round's secure aggregation with `vector` (device_vector's output): the edge learns only
        the cohort's sum."""
        cfg = self.cfg
        self.publish_status("masking", ann.round_id, f"{vector.size} values")
        client = SecAggClient(cfg.id, cfg.edge, ann.round_id, self.signing_key, self._secagg_directory())
        start = time.monotonic()
        try:
            outcome = run_client_round(self.link.client, client, vector, cfg.secagg_timeout_s)
        except ProtocolError as exc:
            event(self.log, "masked update not aggregated", logging.WARNING, round=ann.round_id,
                  reason=exc.reason.name, detail=exc.detail)
            return
        event(self.log, "masked update aggregated", round=ann.round_id, values=vector.size,
              cohort=len(outcome.survivors), seconds=round(time.monotonic() - start, 3),
              epsilon=round(self.epsilon_spent(), 4), **fields)

    def _secagg_directory(self) -> dict:
        """Identity keys of the edge's devices, from the enrolment export in secagg_keys_dir ({device_id}.pub)."""
        paths = sorted(Path(self.cfg.secagg_keys_dir).glob("*.pub"))
        return {topics.check_id(p.stem): load_public_key(p) for p in paths}

    def _settings(self, ann: RoundAnnouncement, time_left: float) -> CompressionSettings:
        """The round's settings, or adaptive ones from our capability when none are announced or they would
        overflow the broker's message cap (SCAFFOLD sends two payloads with the same settings)."""
        n, c = self.model.n_params, self.cfg.capability
        parts = 2 if ann.plan.scaffold else 1
        room = (self.cfg.broker.max_message_bytes - ENVELOPE_BYTES) // parts
        if ann.compression:
            settings = CompressionSettings.from_dict(ann.compression)
            if encoded_size_bound(n, settings) <= room:
                return settings
        return adaptive_settings(n, c.bandwidth_bps / parts, c.compute_class, room + ENVELOPE_BYTES,
                                 deadline_s=max(time_left, 1.0), envelope_bytes=ENVELOPE_BYTES)

    def seal(self, update: DeviceUpdate) -> DeviceUpdate:
        """Sign the update, or tag it with the MAC key toward this edge (auth = "mac": the edge's cheap path)."""
        return sign_message(update, self.signing_key) if self.mac_key is None else mac_message(update, self.mac_key)

    # ------------------------------------------------------------------ status
    def capability(self, steps_per_s: float | None = None) -> Capability:
        c = self.cfg.capability
        speed = self.state.steps_per_s if steps_per_s is None else steps_per_s
        return Capability(compute_class=c.compute_class, memory_mb=c.memory_mb, bandwidth_bps=c.bandwidth_bps,
                          steps_per_s=speed or c.steps_per_s)

    def _status_bytes(self, state: str, round_id: int | None = None, detail: str = "") -> bytes:
        return encode(DeviceStatus(
            device_id=self.cfg.id, edge_id=self.cfg.edge, state=state, model_version=max(self.state.model_version, 0),
            bundle_version=self.bundle.version, epsilon_spent=self.epsilon_spent(),
            epsilon_budget=self.cfg.privacy.epsilon, timestamp=time.time(), round_id=round_id,
            capability=self.capability(), detail=detail[:256]))

    def epsilon_spent(self) -> float:
        b = self.cfg.privacy
        return accountant.epsilon(self.state.history, b.delta, b.accountant)

    def publish_status(self, state: str, round_id: int | None = None, detail: str = "") -> None:
        self.link.publish(self.status_topic, self._status_bytes(state, round_id, detail), retain=True)
        event(self.log, "status", state=state, round=round_id, detail=detail)

    # ------------------------------------------------------------------ loop
    def _received(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def _connected(self) -> None:
        """On paho's thread after every (re)connection: announce ourselves; OTA resubscribes from the main loop."""
        self.publish_status("online")
        self.inbox.put((CONNECTED, b""))

    def handle(self, topic: str, payload: bytes) -> None:
        """One message, on the main thread. Nothing that arrives can stop the agent: every failure is logged."""
        try:
            if topic == CONNECTED:   # catching up: (re)subscribe; else drop what a persistent session kept
                (self.link.subscribe if self.wanted is not None else self.link.unsubscribe)([self.topics["model_full"]])
                if self.ota is not None:
                    self.ota.on_connect()
            elif self.ota is not None and topic.startswith(self.ota.manifest_topic.rsplit("/", 1)[0] + "/"):
                self.ota.handle(topic, payload)
            elif topic in (self.topics["model"], self.topics["round"]) and not payload:
                pass   # a retained round or model cleared (`fediomt edge new-run`): nothing to follow
            elif topic == self.topics["model"]:
                self._on_model(payload)
            elif topic == self.topics["model_full"] and payload:
                self._on_full_model(payload)
            elif topic == self.topics["round"]:
                self._on_round(payload)
            elif topic == self.topics["ack"]:
                self._on_ack(payload)
        except ProtocolError as exc:
            event(self.log, "refused a message", logging.WARNING, topic=topic, reason=exc.reason.name,
                  detail=exc.detail)
        except (ValueError, OSError) as exc:  # local data or disk trouble: report, keep serving
            event(self.log, "round failed", logging.ERROR, topic=topic, error=f"{type(exc).__name__}: {exc}")
        except Exception:  # a bug must not take the device off the federation; the traceback is in the log
            self.log.exception("unexpected error handling %s", topic)

    def _on_ack(self, payload: bytes) -> None:
        """The edge's verdict on our update; for the unacknowledged round's, accepted or not, the resending stops
        (the same bytes would get the same answer)."""
        ack = decode(payload, expect=Ack)
        event(self.log, "ack", round=ack.round_id, accepted=ack.accepted, reason=ack.reason, detail=ack.detail)
        if self.state.unacked is not None and ack.round_id == self.state.unacked.round_id:
            self._settle("acknowledged")

    def _resend(self) -> None:
        """Resend the unacknowledged update, the same bytes (the edge counts a (device, round) once), after each
        Ack timeout (doubling, jittered) while connected and before the round's deadline: what a broker session
        lost (an edge restarted clean, a replica's queue) still reaches the edge."""
        unacked = self.state.unacked
        if unacked is None or time.monotonic() < self.resend_at or not self.link.connected.is_set():
            return
        if time.time() >= unacked.deadline:
            return self._settle("deadline passed without an Ack", logging.WARNING)
        self.link.publish(self.update_topic, unacked.data)
        self.resend_at = time.monotonic() + next(self.resend_delays)
        event(self.log, "update resent", round=unacked.round_id, bytes=len(unacked.data))

    def _settle(self, why: str, level: int = logging.INFO) -> None:
        """Stop resending the unacknowledged update, durably."""
        event(self.log, "update settled", level, round=self.state.unacked.round_id, why=why)
        self.state = replace(self.state, unacked=None)
        save_state(self.state_path, self.state)

    def run(self) -> int:
        event(self.log, "starting", device=self.cfg.id, edge=self.cfg.edge, bundle=self.bundle.name,
              bundle_version=self.bundle.version, model_version=self.state.model_version,
              epsilon_spent=round(self.epsilon_spent(), 4), epsilon_budget=self.cfg.privacy.epsilon)
        if not self.link.start(self.stop):
            return 0
        try:
            while not self.stop.is_set() and not self.switch_to_inference:
                try:
                    self.handle(*self.inbox.get(timeout=0.2))
                except queue.Empty:
                    pass
                if self.ota is not None:
                    self.ota.tick()
                self._resend()
        finally:
            self.link.close((self.status_topic, self._status_bytes("offline")))
            event(self.log, "stopped")
        return 0
