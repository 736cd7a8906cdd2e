"""The cloud's round logic as pure functions: when a round closes, which aggregate is admitted, what the strategy
gets, how the model goes down, what a round announces, what it costs in privacy and what is recorded.

cloud.engine.CloudEngine strings them together with the state and the clock; here nothing does I/O, so every rule
is tested directly (tests/test_cloud_engine.py).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud.accounting import PrivacyLedger, central_event, device_event, exhausted, json_epsilon
from cloud.config import BoundsConfig, RoundSettings, announced_secagg
from cloud.evaluation import SCORES
from cloud.model import compress_broadcast
from cloud.state import CloudState
from cloud.strategies.base import EdgeResult, ServerState, Strategy
from cloud.strategies.scaffold import CONTROL
from cloud.trust import MIN_VERDICTS, weightless
from protocol.bounds import reference, remember, scale_to
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    Capability,
    CentralDPReport,
    DeviceUpdate,
    EdgeAggregate,
    GlobalModel,
    PrivacySpent,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    global_model,
    verify_raw,
)
from protocol.secagg.edge_tier import EdgeSum
from protocol.sketch import decode_sketches

Decision = Literal["complete", "deadline", "reannounce"]
RESIDUAL = "model_residual"  # server-side error feedback of "delta" GlobalModels (a ServerState array)
UNAVAILABLE = ("budget_exhausted", "offline")  # device states the strategies do not select


def close_decision(received: Collection[str], expected: Collection[str], now: float, deadline: float,
                   grace_s: float, min_edges: int) -> Decision | None:
    """Close at once when every expected edge reported; after deadline + grace (edges close at the deadline, their
    aggregates need a moment), close with at least min_edges aggregates, else announce the round again."""
    if set(expected) <= set(received):
        return "complete"
    if now < deadline + grace_s:
        return None
    return "deadline" if len(received) >= min_edges else "reannounce"


@dataclass(frozen=True)
class OpenRound:
    """What an aggregate is checked against: the open round and what it already holds."""

    round_id: int
    version: int
    n_params: int
    received: Collection[str]      # edges already counted this round
    nonces: Collection[str]        # aggregate nonces seen (hex), across rounds
    edge_masked: bool = False      # edge-level SecAgg: aggregates carry metadata only
    max_samples: int = 1_000_000   # per device (bounds.max_samples)


@dataclass(frozen=True)
class Received:
    """An accepted aggregate of the open round, decoded once."""

    agg: EdgeAggregate
    size: int
    delta: np.ndarray | None
    control: np.ndarray | None
    sketches: np.ndarray | None = None   # protocol.sketch rows of the edge's admitted updates (None: none sent)


def decode_payload(payload: bytes | None, n_params: int) -> np.ndarray | None:
    """A compression payload as a dense vector; None for an absent or empty one (metadata-only aggregates)."""
    return None if not payload else decode_update(payload, n_params)


def authentic(payload: bytes, edge: str, edge_key: Callable[[str], Ed25519PublicKey]) -> EdgeAggregate:
    """The aggregate, decoded and signed by the edge whose topic it arrived on (`edge_key` raises ProtocolError for
    an edge outside the federation, or revoked). What follows (admit_authentic) is the cloud's verdict on genuine
    bytes, which the edge gets as an AggregateReceipt."""
    agg = decode(payload, expect=EdgeAggregate)
    if agg.edge_id != edge:
        raise ProtocolError(Reason.WRONG_SENDER, f"topic names {edge!r}, message {agg.edge_id!r}")
    verify_raw(payload, agg, edge_key(edge))
    return agg


def admit_authentic(agg: EdgeAggregate, size: int, rnd: OpenRound) -> Received:
    """Check an authentic aggregate against the open round; raises ProtocolError or returns it with its deltas."""
    edge = agg.edge_id
    if agg.nonce.hex() in rnd.nonces:
        raise ProtocolError(Reason.REPLAY, f"nonce of {edge!r} seen before")
    if agg.round_id != rnd.round_id:
        reason = Reason.DEADLINE if agg.round_id < rnd.round_id else Reason.WRONG_ROUND
        raise ProtocolError(reason, f"round {agg.round_id} from {edge!r}, open round is {rnd.round_id}")
    if edge in rnd.received:
        raise ProtocolError(Reason.DUPLICATE, f"{edge!r} already sent round {agg.round_id}")
    if agg.base_version != rnd.version:
        raise ProtocolError(Reason.STALE, f"base version {agg.base_version}, current {rnd.version}")
    if agg.num_samples > rnd.max_samples * agg.num_devices:
        raise ProtocolError(Reason.BAD_VALUE, f"{agg.num_samples} samples from {agg.num_devices} devices >"
                                              f" {rnd.max_samples} per device")
    if agg.n_params != rnd.n_params:
        raise ProtocolError(Reason.BAD_SHAPE, f"{agg.n_params} params, model has {rnd.n_params}")
    if rnd.edge_masked and (agg.delta or agg.control_delta or agg.num_samples or agg.weight_sum
                            or agg.update_norms or agg.significant or agg.sketches):
        raise ProtocolError(Reason.BAD_VALUE, "plaintext aggregate in an edge-masked round (metadata only)")
    delta = decode_payload(agg.delta, agg.n_params) if agg.significant else None
    if agg.significant and delta is None:
        raise ProtocolError(Reason.MALFORMED, "significant aggregate without a delta")
    sketches = decode_sketches(agg.sketches, agg.sketch_dims, agg.num_devices + len(agg.filtered)) \
        if agg.sketches else None
    return Received(agg, size, delta, decode_payload(agg.control_delta, agg.n_params), sketches)


def bound_edges(received: Mapping[str, Received], latest: Mapping[str, list[float]], model_norm: float,
                cfg: BoundsConfig) -> tuple[dict[str, Received], dict[str, dict], dict[str, list[float]]]:
    """(the round's aggregates with each edge's delta scaled to the norm bound and its samples and weight per device
    capped, what was bounded per edge, the edges' latest [norm, samples/device, weight/device]). The norm bound is
    norm_multiple x the reference norm and model_ratio x the model's norm; the references are lower medians over
    the edges' latest values including this round's (protocol.bounds: one edge, one vote), so no single edge can
    move the model implausibly far or outweigh the others however it reports."""
    new = {e: [float(np.linalg.norm(g.delta.astype(np.float64))), g.agg.num_samples / g.agg.num_devices,
               g.agg.weight_sum / g.agg.num_devices] for e, g in received.items()
           if g.delta is not None and g.agg.num_devices > 0}
    merged = remember(latest, new, cfg.history)
    norm_bound = min(cfg.norm_multiple * reference(merged, 0) if cfg.norm_multiple > 0 else np.inf,
                     cfg.model_ratio * model_norm if cfg.model_ratio > 0 and model_norm > 0 else np.inf)
    per_device = [cfg.samples_multiple * reference(merged, c) if cfg.samples_multiple > 0 else 0.0 for c in (1, 2)]
    out, notes = dict(received), {}
    for edge, got in received.items():
        agg, note = got.agg, {}
        factor = float(scale_to(new[edge][0], norm_bound)) if edge in new else 1.0
        if factor < 1.0:
            note["norm_factor"] = factor
        samples, weight = agg.num_samples, agg.weight_sum
        if per_device[0] > 0 and agg.num_devices:
            samples = min(samples, int(per_device[0] * agg.num_devices))
        if per_device[1] > 0 and agg.num_devices:
            weight = min(weight, per_device[1] * agg.num_devices)
        if (samples, weight) != (agg.num_samples, agg.weight_sum):
            note["samples"], note["weight_sum"] = samples, weight
        if note:
            notes[edge] = note
            out[edge] = dataclasses.replace(
                got, agg=dataclasses.replace(agg, num_samples=samples, weight_sum=weight),
                delta=None if got.delta is None else (factor * got.delta).astype(np.float32))
    return out, notes, merged


def edge_results(received: Mapping[str, Received], last_delta: Mapping[str, np.ndarray]
                 ) -> tuple[list[EdgeResult], dict[str, np.ndarray]]:
    """Plaintext rounds: one result per edge, sorted by edge, and the edges' last significant deltas after it. A
    non-significant aggregate of devices means "about the same as my last one": that delta is reused."""
    last, results = dict(last_delta), []
    for edge, got in sorted(received.items()):
        delta = got.delta
        if got.agg.significant:
            last[edge] = got.delta
        elif got.agg.num_devices:
            delta = last.get(edge)
        results.append(EdgeResult(edge, delta, got.agg.num_samples, got.agg.weight_sum, got.agg.num_devices,
                                  got.agg.mean_local_steps, got.control))
    return results, last


def masked_results(total: EdgeSum, received: Mapping[str, Received]) -> tuple[list[EdgeResult], list[EdgeAggregate]]:
    """Edge-masked rounds: one result for the sum over the edges in it (its weighted mean is the strategy's
    combination of them), and the metadata of those edges."""
    combined = EdgeResult("+".join(total.edges), total.mean if total.num_devices else None, total.num_samples,
                          float(total.num_samples), total.num_devices)
    return [combined], [g.agg for e, g in sorted(received.items()) if e in set(total.edges)]


def compress_model(server: ServerState, previous: np.ndarray, version: int, settings: RoundSettings,
                   compression: CompressionSettings) -> tuple[ServerState, bytes | None]:
    """(server state to adopt, compressed delta of `version` or None when it goes out in full). Delta mode: the
    server adopts exactly what devices rebuild, and what compression dropped waits in the RESIDUAL array; every
    model_full_every-th version goes out in full with the residual folded in (late joiners catch up)."""
    if settings.model_encoding != "delta":
        return server, None
    arrays = dict(server.arrays)
    residual = arrays.pop(RESIDUAL, None)
    if (version - 1) % settings.model_full_every == 0:
        weights = server.weights if residual is None else (server.weights + residual).astype(np.float32)
        return server.replace(weights=weights, arrays=arrays), None
    delta, published, residual = compress_broadcast(previous, server.weights, residual, compression)
    return server.replace(weights=published, arrays={**arrays, RESIDUAL: residual}), delta


def model_message(model: str, version: int, server: ServerState, delta: bytes | None) -> GlobalModel:
    """The (unsigned) GlobalModel of `version`: against version - 1 when it has a compressed delta, else in full."""
    return global_model(model, version, server.weights, delta, server.arrays.get(CONTROL))


def plan_round(strategy: Strategy, s: CloudState, settings: RoundSettings, now: float,
               rng: np.random.Generator) -> RoundAnnouncement | str:
    """The (unsigned) announcement of round s.round_id, or why the federation stops before it: every device
    reports its budget spent, or the round would exceed a privacy budget (projected with this round's plan).
    Draws the strategy's sampling from `rng`."""
    if s.devices and all(d.state == "budget_exhausted" for d in s.devices.values()):
        return (f"privacy budget spent on every device: all {len(s.devices)} report budget_exhausted: "
                f"stopping before round {s.round_id}")
    available = {k: d for k, d in s.devices.items() if d.state not in UNAVAILABLE}
    rc = strategy.configure_round(s.server, s.round_id, available, rng)
    privacy, plan = settings.privacy, rc.plan
    if privacy.calibrate:   # each device calibrates its noise to the budget over the rounds left
        plan = dataclasses.replace(plan, target_epsilon=privacy.device_epsilon, target_delta=privacy.delta,
                                   rounds_left=max(settings.rounds - len(s.history), 1))
    projected = s.ledger.report(
        privacy.accountant,
        device_event(plan, s.min_local_examples, s.ledger.device) if s.min_local_examples else None,
        central_event([rc.central_dp]) if settings.central_dp.clip > 0 else None)
    reason = exhausted(projected, privacy.device_epsilon, privacy.central_epsilon)
    if reason:
        return f"{reason}: stopping before round {s.round_id}"
    # devices that point against the federation's majority on average or round after round weigh nothing
    recent = [r.get("distrusted_devices", {}) for r in s.history[-MIN_VERDICTS:]]
    distrusted = weightless(s.devices, recent, settings.trust.min_cosine) if settings.trust.device_majority else []
    weights = {**rc.sample_weight, **dict.fromkeys(sorted(distrusted), 0.0)}
    return RoundAnnouncement(
        round_id=s.round_id, model_name=settings.model, model_version=s.version, strategy=strategy.name,
        deadline=now + settings.round_timeout_s, plan=plan, compression=rc.compression,
        edges=list(settings.edges), cohort=rc.cohort, lr_scale=rc.lr_scale, sample_weight=weights,
        central_dp=rc.central_dp, secagg=announced_secagg(settings.secagg))


def account_round(ledger: PrivacyLedger, plan: TrainingPlan, counts: list[tuple[int, int]],
                  central: list[CentralDPReport | None], reported: list[float],
                  min_local_examples: int, smallest: list[int] = ()) -> tuple[PrivacyLedger, int]:
    """(ledger, smallest local dataset) after a closed round. `counts` are (samples, devices) per participating
    edge (or the masked sum); `smallest` the edges' smallest counted local datasets (EdgeAggregate
    .min_device_samples). The device-level event takes the smallest device's dataset where every edge reported it,
    else the smallest mean (a masked round: an upper estimate of the smallest device's q, said in docs/cloud.md);
    the central one the weakest edge (`central`); `reported` are the devices' own epsilons the edges forwarded."""
    sizes = [n // d for n, d in counts if d > 0]
    if sizes and smallest and all(m > 0 for m in smallest):
        sizes = list(smallest)
    device, central_history = list(ledger.device), list(ledger.central)
    if sizes:
        min_local_examples = min(sizes)
        device.append(device_event(plan, min_local_examples, device))
        central_history.append(central_event(central))
    return dataclasses.replace(ledger, device=device, central=central_history,
                               device_reported=max([ledger.device_reported, *reported])), min_local_examples


def account_skipped(ledger: PrivacyLedger, plan: TrainingPlan, min_local_examples: int) -> PrivacyLedger:
    """A round skipped after the devices trained (edge SecAgg aborted): their example-level spend still counts."""
    if not min_local_examples:
        return ledger
    return dataclasses.replace(ledger, device=[*ledger.device, device_event(plan, min_local_examples, ledger.device)])


@dataclass(frozen=True)
class Traffic:
    """What a round moved besides the aggregates: the model and announcement bytes, and who was addressed."""

    model_bytes: int               # the signed GlobalModel the round started from
    announcement_bytes: int
    known_devices: int
    n_edges: int
    bytes_up_cloud: int            # the accepted aggregates as received
    rejected: Mapping[str, int]    # aggregates the cloud rejected, by reason
    dense: DenseSizes | None = None  # dense FedAvg's messages of this round (dense_sizes)
    receipt_bytes: int = 0         # the cloud's receipts to the edges (dense FedAvg would send the same)


@dataclass(frozen=True)
class DenseSizes:
    """What FedAvg without compression sends, in FedIoMT's own signed envelopes (so "x less than dense FedAvg"
    compares payloads, not formats): a DeviceUpdate with a dense float32 delta, a full float32 GlobalModel, and the
    dense payload an edge would forward in its aggregate instead of what it sent."""

    update: int
    model: int
    payload: int


def dense_sizes(model: str, n_params: int, version: int, device_id: str = "device-00",
                edge_id: str = "edge-00", run_id: str = "") -> DenseSizes:
    """DenseSizes of round messages on model `version` of run `run_id` (message lengths do not depend on the
    float values)."""
    payload, _ = encode_update(np.zeros(n_params, np.float32), CompressionSettings(method="dense", bits=32,
                                                                                     entropy=False))
    update = DeviceUpdate(device_id=device_id, edge_id=edge_id, round_id=version, base_version=version,
                          num_samples=1000, local_steps=10, train_loss=1.0,
                          privacy=PrivacySpent(1.0, 1e-5, "rdp", 1.0, 0.1, 10), n_params=n_params, delta=payload,
                          capability=Capability("wearable", 64, 250_000.0, 10.0), nonce=bytes(16),
                          timestamp=1.7e9, sig=bytes(64))
    full = dataclasses.replace(global_model(model, version, np.zeros(n_params, np.float32), run_id=run_id),
                               sig=bytes(64))
    return DenseSizes(len(encode(update)), len(encode(full)), len(payload))


def dense_traffic(aggs: list[EdgeAggregate], addressed: int, traffic: Traffic, n_params: int,
                  n_devices: int) -> dict[str, int]:
    """The round's bytes had it been dense float32 FedAvg over the same devices and edges: dense updates up, full
    models (+ the same announcement) down to every addressed device and edge, the edges' aggregates with a dense
    payload in place of theirs. Without traffic.dense only the payload of the updates is known (4 * n_params)."""
    d = traffic.dense
    if d is None:
        return {"dense_bytes_up": 4 * n_params * n_devices}
    down = d.model + traffic.announcement_bytes
    return {"dense_bytes_up": d.update * n_devices, "dense_bytes_down": down * addressed,
            "dense_bytes_up_cloud": sum(len(encode(a)) - len(a.delta) + d.payload for a in aggs),
            "dense_bytes_down_cloud": down * traffic.n_edges + traffic.receipt_bytes}


def byte_totals(records: list[dict]) -> dict:
    """Bytes over every link both ways (device <-> edge and edge <-> cloud, up + down), and what dense float32
    FedAvg would have moved over the same rounds (the records' dense_* figures): `total_bytes`,
    `dense_total_bytes`, their ratio `bytes_ratio`, and the device links alone (`device_link_bytes`, ...)."""
    def total(keys: tuple[str, ...]) -> int:
        return int(sum(r.get(k) or 0 for r in records for k in keys))

    link = total(("bytes_up", "bytes_down"))
    dense_link = total(("dense_bytes_up", "dense_bytes_down"))
    everything = link + total(("bytes_up_cloud", "bytes_down_cloud"))
    dense = dense_link + total(("dense_bytes_up_cloud", "dense_bytes_down_cloud"))
    return {"total_bytes": everything, "dense_total_bytes": dense,
            "bytes_ratio": dense / everything if everything else None,
            "device_link_bytes": link, "dense_device_link_bytes": dense_link,
            "device_link_ratio": dense_link / link if link else None}


def round_record(ann: RoundAnnouncement, aggs: list[EdgeAggregate], report: dict, loss: float | None,
                 accuracy: float | None, now: float, version: int, server: ServerState, traffic: Traffic,
                 settings: RoundSettings, scores: Mapping[str, float | None] | None = None) -> dict:
    """One line of rounds.jsonl (and of the checkpoint's history). `scores`: the binary-task scores of the
    evaluation (cloud.evaluation.SCORES; null when not evaluated or not a binary task)."""
    n_devices = sum(a.num_devices for a in aggs)
    addressed = len(ann.cohort) or max(traffic.known_devices, n_devices)
    down = traffic.model_bytes + traffic.announcement_bytes
    control = server.arrays.get(CONTROL)
    return {
        "round": ann.round_id, "model_version": version,
        "accuracy": accuracy, "loss": loss, **{k: (scores or {}).get(k) for k in SCORES},
        "bytes_up": sum(a.device_bytes for a in aggs),
        "bytes_up_cloud": traffic.bytes_up_cloud,
        "control_bytes_up": sum(len(a.control_delta or b"") for a in aggs),
        **dense_traffic(aggs, addressed, traffic, server.weights.size, n_devices),
        "bytes_down": down * addressed,
        "bytes_down_cloud": down * traffic.n_edges + traffic.receipt_bytes,
        "control_bytes_down": (0 if control is None else 4 * control.size) * addressed,
        "epsilon": json_epsilon(report), "delta": settings.privacy.delta,
        "num_devices": n_devices, "num_edges": len(aggs), "addressed": addressed,
        "filtered": sum(len(a.filtered) for a in aggs),
        # which devices' updates the round applied, and which the edges' filters dropped, per edge (audits, e.g. the
        # chaos bench's exactly-once check)
        "device_ids": {a.edge_id: list(a.device_ids) for a in aggs},
        "filtered_ids": {a.edge_id: list(a.filtered) for a in aggs if a.filtered},
        # distributed DP: per edge, the part of its central noise that was the devices' own (credited, not added)
        "credited_noise_mult": {a.edge_id: round(a.credited_noise_mult, 6) for a in aggs if a.credited_noise_mult},
        "rejected_at_edges": dict(sum((Counter(a.rejected) for a in aggs), Counter())),
        "rejected_at_cloud": dict(traffic.rejected),
        "wall_time_s": round(now - (ann.deadline - settings.round_timeout_s), 3),
        "timestamp": round(now, 3),
    }
