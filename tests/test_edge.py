"""The edge engine with real signed, compressed messages (no broker): admission and every rejection reason,
duplicates, rounds (sync and FedBuff async), poisoning filters, central DP, significance, restart from SQLite."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import time

import numpy as np
import pytest

from cloud.model import compress_broadcast
from edge.config import load_config
from protocol import signing
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    CentralDPReport,
    GlobalModel,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    floats_to_bytes,
    global_model,
    new_nonce,
    sign_message,
)
from protocol.sketch import decode_sketches, unit_sketches

from .harness import DENSE, N_PARAMS, Fed, aggregate_of, older_schema, open_round

TOPK = CompressionSettings(method="topk", density=0.05, bits=32)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_every_rejection_has_its_reason_and_nothing_crashes(tmp_path, rng):
    fed = Fed(tmp_path, rounds={"quorum": 1.0})
    eng = fed.engine()
    ok = rng.normal(size=N_PARAMS).astype(np.float32)
    assert eng.handle_update("d00", fed.update("d00", ok))[0].reason == Reason.WRONG_ROUND  # no round yet
    open_round(fed, eng)
    stranger = signing.generate_signing_key()
    nan_payload = bytearray(encode_update(ok, DENSE)[0])
    nan_payload[-4:] = struct.pack("<f", float("nan"))
    cases = {
        "d01": (fed.update("d01", ok, round_id=2), Reason.WRONG_ROUND),
        "d02": (fed.update("d02", ok, key=stranger), Reason.BAD_SIGNATURE),
        "d03": (fed.update("d04", ok), Reason.WRONG_SENDER),                  # d04's update on d03's topic
        "zz": (fed.update("zz", ok, key=stranger), Reason.UNKNOWN_SENDER),
        "d05": (fed.update("d05", ok, n_params=N_PARAMS + 1), Reason.BAD_SHAPE),
        "d06": (fed.update("d06", ok, payload=bytes(nan_payload)), Reason.NON_FINITE),
        "d07": (b"\x82\x66update\x01", Reason.UNKNOWN_VERSION),  # an update of schema version 1
        "d08": (b"\xff" * 10, Reason.MALFORMED),
        "d09": (fed.update("d09", ok, edge_id="edge2"), Reason.WRONG_SENDER),
        "d10": (fed.update("d10", ok, payload=encode_update(np.ones(10, np.float32), DENSE)[0]), Reason.BAD_SHAPE),
        "d11": (fed.update("d11", ok)[:-3], Reason.MALFORMED),
    }
    for device, (data, reason) in cases.items():
        ack, pubs = eng.handle_update(device, data)
        assert (ack.accepted, Reason(ack.reason)) == (False, reason), device
        assert not pubs
    assert eng.handle_update("bad/../id", b"x") == (None, [])
    assert not eng.pending
    assert eng.metrics.rejected.labels(reason="WRONG_ROUND")._value.get() == 2


def test_round_aggregate_is_the_weighted_mean_of_accepted_updates(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=6, rounds={"quorum": 1.0})
    eng = fed.engine()
    open_round(fed, eng, sample_weight={"d01": 2.0})
    deltas = {d: rng.normal(size=N_PARAMS).astype(np.float32) for d in fed.devices}
    samples = {d: 10 * (i + 1) for i, d in enumerate(fed.devices)}
    pubs = []
    for i, d in enumerate(fed.devices):
        settings = TOPK if i % 2 else DENSE
        data = fed.update(d, deltas[d], num_samples=samples[d], settings=settings)
        ack, out = eng.handle_update(d, data)
        assert ack.accepted and ack.reason == Reason.OK
        if i == 2:  # a QoS 1 redelivery: acknowledged, counted once
            ack2, _ = eng.handle_update(d, data)
            assert ack2.accepted and ack2.reason == Reason.DUPLICATE
        pubs += out
        if settings is TOPK:
            idx = np.argsort(-np.abs(deltas[d]))[:50]
            sparse = np.zeros(N_PARAMS, np.float32)
            sparse[idx] = deltas[d][idx]
            deltas[d] = sparse
    agg, mean = aggregate_of(fed, pubs)
    w = np.array([samples[d] * (2.0 if d == "d01" else 1.0) for d in fed.devices])
    ref = (w[:, None] * np.stack([deltas[d] for d in fed.devices])).sum(0) / w.sum()
    np.testing.assert_allclose(mean, ref, rtol=1e-5, atol=1e-6)
    assert (agg.num_devices, agg.num_samples, agg.weight_sum) == (6, sum(samples.values()), pytest.approx(w.sum()))
    assert agg.device_ids == fed.devices and agg.rejected == {"DUPLICATE": 1} and agg.central_dp is None
    again, _ = eng.handle_update("d00", fed.update("d00", deltas["d00"]))  # after the close: still "counted"
    assert again.accepted and again.reason == Reason.DUPLICATE


def test_poisoned_updates_are_filtered(tmp_path, rng):
    """20% of devices send sign-flipped updates scaled 10x: with the filter the aggregate stays within 10% (relative
    L2) of the honest mean, without it (and without the norm bound) the aggregate points the wrong way; the default
    norm bound alone (edge.bounds) keeps it pointing the right way."""
    base = rng.normal(size=N_PARAMS).astype(np.float32)
    honest = [(base + 0.5 * rng.normal(size=N_PARAMS)).astype(np.float32) * 0.01 for _ in range(16)]
    poisoned = [-10 * h for h in honest[:4]]
    ref = np.mean(honest, axis=0)
    results = {}
    for name, filters in {"off": [], "bounds": [], "on": ["norm", "cosine"], "krum": ["krum"]}.items():
        fed = Fed(tmp_path / name, filters={"enabled": filters},
                  bounds={"norm_multiple": 0.0 if name == "off" else 2.0})
        eng = fed.engine()
        open_round(fed, eng)
        pubs = []
        for d, delta in zip(fed.devices, honest + poisoned):
            pubs += eng.handle_update(d, fed.update(d, delta))[1]
        agg, mean = aggregate_of(fed, pubs)
        results[name] = np.linalg.norm(mean - ref) / np.linalg.norm(ref)
        if filters:
            assert agg.filtered == fed.devices[16:] and agg.device_ids == fed.devices[:16]
    assert results["on"] < 0.1 and results["krum"] < 0.1
    assert results["off"] > 1.0 and results["bounds"] < 1.0


def test_colluders_holding_an_edges_majority_are_dropped_not_the_honest_devices(tmp_path, rng, caplog):
    """3 of 5 devices push one direction (each copy slightly perturbed), 2 honest non-IID devices do not: with the
    default filters the colluders are flagged by the collusion check, and the cosine filter, which runs after it
    on the rest, keeps the honest two; with the previous default (norm z-score + cosine) the colluders' median
    wins and the honest two are dropped."""
    from edge.aggregate import FilterConfig

    attack = rng.normal(size=N_PARAMS)
    honest = [rng.normal(size=N_PARAMS) - 0.3 * attack for _ in range(2)]
    deltas = [0.01 * v for v in honest + [attack + 0.2 * rng.normal(size=N_PARAMS) for _ in range(3)]]
    filtered = {}
    for name, filters in {"default": FilterConfig().enabled, "previous": ["norm", "cosine"]}.items():
        fed = Fed(tmp_path / name, n_devices=5, filters={"enabled": filters, "params": {"norm": {"min_ratio": 0.0}}})
        eng = fed.engine()
        open_round(fed, eng)
        pubs = []
        with caplog.at_level("WARNING"):
            for d, delta in zip(fed.devices, deltas):
                pubs += eng.handle_update(d, fed.update(d, delta.astype(np.float32)))[1]
            agg, _ = aggregate_of(fed, pubs)
        filtered[name] = agg.filtered
    assert filtered == {"default": ["d02", "d03", "d04"], "previous": ["d00", "d01"]}
    first = [r.fields for r in caplog.records if r.getMessage() == "updates flagged"][0]
    assert first["devices"]["d02"].keys() == {"collusion"}   # the cosine filter never saw the colluders


def test_central_dp_noise_and_report(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=10)
    eng = fed.engine()
    open_round(fed, eng, central_dp=CentralDPReport(clip=0.5, noise_mult=1.0, sampling_rate=0.1))
    pubs = []
    for d in fed.devices:
        pubs += eng.handle_update(d, fed.update(d, rng.normal(size=N_PARAMS).astype(np.float32)))[1]
    agg, mean = aggregate_of(fed, pubs)
    assert agg.central_dp == CentralDPReport(clip=0.5, noise_mult=1.0, sampling_rate=0.1, num_clipped=10)
    # 10 clipped deltas of norm <= 0.5 plus noise of std z S / W = 0.05 per coordinate
    assert 0.035 < mean.std() < 0.07
    assert agg.sketches == b"" and agg.sketch_dims == 0   # under central DP no device direction leaves the edge


def test_the_aggregate_carries_a_direction_sketch_of_every_admitted_update(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=5, filters={"enabled": ["cosine"]})
    eng = fed.engine()
    open_round(fed, eng, sample_weight={"d03": 0.0})   # the cloud's gate distrusted d03 last round
    g = rng.normal(size=N_PARAMS)
    deltas = [g + 0.3 * rng.normal(size=N_PARAMS) for _ in range(4)] + [-5 * g]   # the last one is flagged
    pubs = []
    for d, delta in zip(fed.devices, deltas):
        pubs += eng.handle_update(d, fed.update(d, delta.astype(np.float32)))[1]
    agg, _ = aggregate_of(fed, pubs)
    assert agg.device_ids == ["d00", "d01", "d02"] and agg.filtered == ["d04", "d03"] and agg.sketch_dims == 64
    rows = decode_sketches(agg.sketches, 64, agg.num_devices + len(agg.filtered))
    order = [0, 1, 2, 4, 3]                                           # device_ids, then the rest of filtered
    expected = unit_sketches([(None, deltas[i].astype(np.float32)) for i in order], N_PARAMS, 64)
    np.testing.assert_array_equal(rows, decode_sketches(expected, 64, 5))   # the uncounted updates' too


def test_significance_forwarding(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=3, forward={"significance": 0.05})
    eng = fed.engine()
    delta = rng.normal(size=N_PARAMS).astype(np.float32)
    sizes = []
    for round_id, scale in ((1, 1.0), (2, 1.01), (3, 2.0)):
        open_round(fed, eng, round_id=round_id)
        pubs = []
        for d in fed.devices:
            pubs += eng.handle_update(d, fed.update(d, delta * scale, round_id=round_id))[1]
        agg, _ = aggregate_of(fed, pubs)
        sizes.append((agg.significant, len(agg.delta)))
    assert [s for s, _ in sizes] == [True, False, True]   # round 3 vs round 1 (last forwarded): +100%
    assert sizes[1][1] == 0


def test_async_buffer_staleness_and_replay(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=6, rounds={"mode": "async", "buffer_k": 3, "max_staleness": 2,
                                               "staleness_exponent": 1.0})
    eng = fed.engine()
    open_round(fed, eng, round_id=5, version=5)
    deltas = [rng.normal(size=N_PARAMS).astype(np.float32) for _ in range(3)]
    pubs, nonce = [], new_nonce()
    for i, (d, base) in enumerate(zip(fed.devices[:3], (5, 4, 3))):
        data = fed.update(d, deltas[i], round_id=base, version=base, nonce=nonce if i == 0 else None)
        ack, out = eng.handle_update(d, data)
        assert ack.accepted, ack
        pubs += out
    _, mean = aggregate_of(fed, pubs)
    w = np.array([1.0, 1 / 2, 1 / 3])                    # (1 + s)^-1 for s = 0, 1, 2
    np.testing.assert_allclose(mean, (w[:, None] * np.stack(deltas)).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    stale, _ = eng.handle_update("d03", fed.update("d03", deltas[0], round_id=2, version=2))
    assert stale.reason == Reason.STALE
    dup, _ = eng.handle_update("d01", fed.update("d01", deltas[0], round_id=4, version=4))
    assert dup.reason == Reason.DUPLICATE                 # already aggregated, still counted once
    replay, _ = eng.handle_update("d00", fed.update("d00", deltas[0], round_id=5, version=5, nonce=nonce,
                                                     loss=0.1))
    assert replay.reason == Reason.DUPLICATE
    reused, _ = eng.handle_update("d00", fed.update("d00", deltas[0], round_id=4, version=4, nonce=nonce))
    assert reused.reason == Reason.REPLAY


def test_restart_resumes_the_round_from_sqlite(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=4)
    deltas = [rng.normal(size=N_PARAMS).astype(np.float32) for _ in range(4)]
    eng = fed.engine()
    open_round(fed, eng)
    first = [fed.update(d, x) for d, x in zip(fed.devices, deltas)]
    for d, data in zip(fed.devices[:2], first[:2]):
        assert eng.handle_update(d, data)[0].accepted
    eng.close()  # (the gateway test does a real kill -9; here: a fresh engine on the same files)
    eng = fed.engine()
    assert [u.device_id for u in eng.pending] == fed.devices[:2]
    pubs = []
    for d, data in zip(fed.devices, first):
        pubs += eng.handle_update(d, data)[1]
    agg, mean = aggregate_of(fed, pubs)
    np.testing.assert_allclose(mean, np.mean(deltas, axis=0), rtol=1e-5, atol=1e-6)
    assert agg.num_devices == 4 and agg.rejected == {"DUPLICATE": 2}
    (outbox,) = eng.undelivered()
    assert eng.handle_receipt(fed.receipt(outbox.payload))
    assert eng.undelivered() == []


def test_an_aggregate_stays_in_the_outbox_until_the_clouds_receipt_names_it(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=2)
    eng = fed.engine()
    open_round(fed, eng, round_id=3)
    pubs = []
    for d in fed.devices:
        pubs += eng.handle_update(d, fed.update(d, rng.normal(size=N_PARAMS), round_id=3))[1]
    (sent,) = [p for p in pubs if p.batch is not None]
    assert [p.payload for p in eng.undelivered()] == [sent.payload]     # the broker's PUBACK changes nothing
    forged = fed.receipt(sent.payload, key=signing.generate_signing_key())
    other = fed.receipt(sent.payload, edge_id="edge2")
    unknown = fed.receipt(sent.payload, aggregate_nonce=new_nonce())
    assert not any(eng.handle_receipt(r) for r in (forged, other, unknown, b"\xff" * 40))
    assert len(eng.undelivered()) == 1
    # refused for good (here: seen before, i.e. a resent copy of one the cloud counted): delivered all the same
    assert eng.handle_receipt(fed.receipt(sent.payload, accepted=False, reason=int(Reason.REPLAY)))
    assert eng.undelivered() == [] and eng.metrics.abandoned._value.get() == 0
    eng.close()
    assert fed.engine().undelivered() == []                           # durable: not resent after a restart


def test_an_unreceipted_aggregate_is_abandoned_once_the_cloud_announces_a_later_round(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=2)
    eng = fed.engine()
    open_round(fed, eng, round_id=3)
    for d in fed.devices:
        eng.handle_update(d, fed.update(d, rng.normal(size=N_PARAMS), round_id=3))
    assert len(eng.undelivered()) == 1
    assert eng.handle_cloud("round", fed.announce(round_id=3, deadline=time.time() + 90))   # re-announced
    assert len(eng.undelivered()) == 1                                # the same round: still worth sending
    assert eng.handle_cloud("round", fed.announce(round_id=4))
    assert eng.undelivered() == [] and eng.metrics.abandoned._value.get() == 1


def test_deadline_closes_a_partial_round_and_an_empty_one_says_so(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=4)
    eng = fed.engine()
    open_round(fed, eng, deadline=time.time() + 0.3)
    delta = rng.normal(size=N_PARAMS).astype(np.float32)
    assert eng.handle_update("d00", fed.update("d00", delta))[1] == []
    assert eng.tick(time.time()) == []
    agg, mean = aggregate_of(fed, eng.tick(time.time() + 1))
    np.testing.assert_allclose(mean, delta, rtol=1e-6)
    open_round(fed, eng, round_id=2, deadline=time.time() - 1)
    agg, mean = aggregate_of(fed, eng.tick(time.time()))
    assert (agg.round_id, agg.num_devices, agg.significant, mean) == (2, 0, False, None)


def test_cloud_messages_are_verified_before_relay(tmp_path):
    fed = Fed(tmp_path)
    eng = fed.engine()
    forged = RoundAnnouncement(1, "m", 1, "fedavg", time.time() + 60, TrainingPlan(0.1, 1, 8, 1.0, 0.0), {})
    assert eng.handle_cloud("round", encode(sign_message(forged, signing.generate_signing_key()))) == []
    assert eng.handle_cloud("round", b"garbage") == []
    model = fed.model()
    relayed = eng.handle_cloud("model", model)
    assert relayed[0].payload == model       # the same bytes: devices verify the cloud's signature
    assert [(p.topic, p.retain) for p in relayed] == [("fl/edge1/model", True), ("fl/edge1/model/full", True)]
    ann = fed.announce()
    assert [(p.topic, p.payload, p.retain) for p in eng.handle_cloud("round", ann)] == [("fl/edge1/round", ann, True)]
    assert eng.announcement == decode(ann, expect=RoundAnnouncement)


def test_reference_config_documents_the_defaults(tmp_path):
    """configs/edge.toml shows every default; a drift between the file and the code fails here."""
    import dataclasses
    import inspect

    from edge.config import EdgeConfig
    from edge.filters import AGGREGATORS, FILTERS

    from .conftest import REPO

    ref = load_config(REPO / "configs" / "edge.toml")
    required = {"edge_id": "edge1", "state_dir": ref.state_dir, "enrolment_dir": ref.enrolment_dir,
                "signing_key": ref.signing_key, "cloud_public_key": ref.cloud_public_key}
    assert dataclasses.replace(ref, filters=dataclasses.replace(ref.filters, params={})) == EdgeConfig(**required)
    for name, params in ref.filters.params.items():
        defaults = inspect.signature({**FILTERS, **AGGREGATORS}[name]).parameters
        assert params == {k: defaults[k].default for k in params}, name
    with pytest.raises(ValueError, match="unknown keys"):
        Fed(tmp_path, filter={"enabled": []}).engine()


@pytest.mark.parametrize("group", ["", "edge1", "short-secret"])
def test_replicas_refuse_a_guessable_shared_subscription_group(group):
    """Mosquitto's ACLs do not check `$share` subscriptions, so a device that knows the replicas' group can join it
    and swallow its share of the updates (issue 18): replicas need a secret group, never the edge id or ""."""
    import dataclasses

    from edge.config import EdgeConfig, EdgeConnectionConfig

    from .conftest import REPO

    ref = load_config(REPO / "configs" / "edge.toml")
    clean = EdgeConnectionConfig(session_expiry_s=0)
    with pytest.raises(ValueError, match="secret `group`"):
        dataclasses.replace(ref, replicas=2, group=group, broker=clean)
    ok = dataclasses.replace(ref, replicas=2, group="3f9c2a7e51b04d6c", broker=clean)
    assert isinstance(ok, EdgeConfig) and ok.group == "3f9c2a7e51b04d6c"


def test_scaffold_control_deltas_are_averaged_over_counted_devices(tmp_path, rng):
    fed = Fed(tmp_path, n_devices=3)
    eng = fed.engine()
    open_round(fed, eng)
    controls = [rng.normal(size=N_PARAMS).astype(np.float32) for _ in range(3)]
    pubs = []
    for d, c in zip(fed.devices, controls):
        data = fed.update(d, np.ones(N_PARAMS, np.float32), control_delta=encode_update(c, DENSE)[0])
        pubs += eng.handle_update(d, data)[1]
    agg, _ = aggregate_of(fed, pubs)
    np.testing.assert_allclose(decode_update(agg.control_delta, N_PARAMS), np.mean(controls, axis=0), rtol=1e-6)


def test_hostile_bytes_never_raise(tmp_path, rng):
    """Random bytes and bit-flipped valid updates: always a negative Ack with a reason, never an exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fed = Fed(tmp_path, n_devices=1)
    eng = fed.engine()
    open_round(fed, eng)
    valid = fed.update("d00", rng.normal(size=N_PARAMS).astype(np.float32), settings=TOPK)

    def flip(bits: list[int]) -> bytes:
        out = bytearray(valid)
        for i in bits:
            out[i // 8] ^= 1 << (i % 8)
        return bytes(out)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2048),
                     st.lists(st.integers(0, len(valid) * 8 - 1), min_size=1, max_size=4, unique=True).map(flip)))
    def check(data):
        ack, pubs = eng.handle_update("d00", data)
        assert not ack.accepted and ack.reason != Reason.OK and not pubs

    check()
    assert not eng.pending


def test_statuses_excuse_devices_from_the_quorum(tmp_path, rng):
    from protocol.messages import DeviceStatus

    fed = Fed(tmp_path, n_devices=4)
    eng = fed.engine()
    open_round(fed, eng)

    def status(device, state, round_id=1):
        return encode(DeviceStatus(device, "edge1", state, 1, 1, 0.0, 8.0, time.time(), round_id))

    assert eng.handle_update("d00", fed.update("d00", rng.normal(size=N_PARAMS).astype(np.float32)))[1] == []
    assert eng.handle_status("d00", status("d00", "offline", round_id=None)) == []  # sent, then left: not excused
    assert eng.excused == set()
    assert eng.handle_status("d01", status("d01", "skipped", round_id=0)) == []    # another round: ignored
    assert eng.handle_status("d02", status("d01", "skipped")) == []                # wrong topic: ignored
    assert eng.handle_status("d01", status("d01", "skipped")) == []
    assert eng.handle_status("d02", status("d02", "declined")) == []
    assert eng.handle_status("d02", b"junk") == []
    agg, _ = aggregate_of(fed, eng.handle_status("d03", status("d03", "offline", round_id=None)))
    assert agg.device_ids == ["d00"]                                               # closed before the deadline
    open_round(fed, eng, round_id=2)
    assert eng.excused == {"d00", "d03"}                                            # still offline
    pubs = [p for d in ("d01", "d02") for p in eng.handle_status(d, status(d, "budget_exhausted", round_id=2))]
    agg, mean = aggregate_of(fed, pubs)
    assert (agg.round_id, agg.num_devices, mean) == (2, 0, None)                   # everyone excused: closes now


def test_an_offline_device_stays_excused_until_it_returns(tmp_path, rng):
    """Issue 18, defect 5: 3 of 10 devices go offline (their last will). Every later round closes at the quorum of
    the 7 others, an edge restart included, until a device says "online" or sends an update again."""
    from protocol.messages import DeviceStatus

    fed = Fed(tmp_path, n_devices=10)
    live, gone = fed.devices[:7], fed.devices[7:]
    delta = rng.normal(size=N_PARAMS).astype(np.float32)

    def status(device, state):
        return encode(DeviceStatus(device, "edge1", state, 1, 1, 0.0, 8.0, time.time(), None))

    def send(eng, round_id, devices):
        return [p for d in devices for p in eng.handle_update(d, fed.update(d, delta, round_id=round_id))[1]]

    eng = fed.engine()
    open_round(fed, eng, round_id=1)
    assert [p for d in gone for p in eng.handle_status(d, status(d, "offline"))] == []
    assert aggregate_of(fed, send(eng, 1, live))[0].device_ids == live             # round 1: at 7, not 10
    open_round(fed, eng, round_id=2)
    assert eng.excused == set(gone)                                                 # not forgotten with the round
    assert aggregate_of(fed, send(eng, 2, live))[0].device_ids == live
    eng.close()
    eng = fed.engine()                                                              # restart: statuses are stored
    open_round(fed, eng, round_id=3)
    assert aggregate_of(fed, send(eng, 3, live))[0].device_ids == live
    open_round(fed, eng, round_id=4)
    assert eng.handle_status("d07", status("d07", "online")) == []                 # d07 is back: wait for it
    assert send(eng, 4, live) == []
    assert aggregate_of(fed, send(eng, 4, ["d07"]))[0].num_devices == 8
    open_round(fed, eng, round_id=5)
    assert send(eng, 5, ["d08", *live]) == []                                       # d08's update says it is back
    assert sorted(aggregate_of(fed, send(eng, 5, ["d07"]))[0].device_ids) == fed.devices[:9]
    open_round(fed, eng, round_id=6)
    assert eng.excused == {"d09"}


def test_edge_rebuilds_each_version_in_full_for_devices_that_missed_one(tmp_path):
    """Deltas are relayed as the cloud signed them, and each version's weights go out in full (unsigned, the
    cloud's sha256) on model/full, again when the model is delivered again; the edge keeps its weights across a
    restart, and one that missed a version relays without a full form until the cloud sends a version in full."""
    from protocol.global_model import catch_up, rebuild

    fed = Fed(tmp_path)
    eng = fed.engine()
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=N_PARAMS).astype(np.float32)

    def signed(version, weights, base=None):
        delta = None
        if base is not None:
            delta, weights, _ = compress_broadcast(base, weights, None, CompressionSettings(method="dense", bits=8))
        return sign_message(global_model("m", version, weights, delta), fed.cloud_key), weights

    def full_of(pubs):
        (pub,) = [p for p in pubs if p.topic == "fl/edge1/model/full"]
        return decode(pub.payload, expect=GlobalModel)

    v1, w1 = signed(1, w1)
    full = full_of(eng.handle_cloud("model", encode(v1)))
    assert full.sig == b"" and full.encoding == "full" and catch_up(full, v1)[0].tobytes() == w1.tobytes()
    v2, w2 = signed(2, w1 + 0.1, base=w1)
    pubs = eng.handle_cloud("model", encode(v2))
    assert pubs[0].payload == encode(v2)
    np.testing.assert_array_equal(catch_up(full_of(pubs), v2)[0], w2)   # what a device that missed v1..v2 installs
    with pytest.raises(ProtocolError) as stale:                        # ...where the delta alone cannot help it
        rebuild(v2, 0, w1)
    assert stale.value.reason == Reason.STALE
    eng.close()
    eng = fed.engine()                                                 # a restart keeps the weights
    assert eng.metrics.full_model_version._value.get() == 2
    v3, w3 = signed(3, w2 - 0.05, base=w2)
    np.testing.assert_array_equal(catch_up(full_of(eng.handle_cloud("model", encode(v3))), v3)[0], w3)
    again = eng.handle_cloud("model", encode(v3))                      # redelivered (a kill -9 before the publish)
    np.testing.assert_array_equal(catch_up(full_of(again), v3)[0], w3)
    v5, w5 = signed(5, w3 + 0.2, base=w3 + 0.1)                        # the edge missed v4
    assert [p.topic for p in eng.handle_cloud("model", encode(v5))] == ["fl/edge1/model"]
    assert (eng.metrics.model_version._value.get(), eng.metrics.full_model_version._value.get()) == (5, -1)
    v6, w6 = signed(6, w5 + 0.1, base=w5)
    assert [p.topic for p in eng.handle_cloud("model", encode(v6))] == ["fl/edge1/model"]
    assert [p.topic for p in eng.handle_cloud("model", encode(v6))] == ["fl/edge1/model"]   # redelivered: still none
    v6_full, _ = signed(6, w6)                                         # a restarted cloud sends v6 again, in full
    np.testing.assert_array_equal(catch_up(full_of(eng.handle_cloud("model", encode(v6_full))), v6)[0], w6)
    assert eng.metrics.full_model_version._value.get() == 6
    v7, w7 = signed(7, w6 - 0.3, base=w6)
    np.testing.assert_array_equal(catch_up(full_of(eng.handle_cloud("model", encode(v7))), v7)[0], w7)


def test_catch_up_takes_only_the_full_model_a_signed_delta_vouches_for(tmp_path):
    from protocol.global_model import catch_up, in_full, rebuild

    fed = Fed(tmp_path)
    w = np.arange(N_PARAMS, dtype=np.float32)
    delta, published, _ = compress_broadcast(w, w + 1, None, CompressionSettings(method="dense", bits=8))
    signed = sign_message(global_model("m", 2, published, delta, control=w * 0 + 0.5), fed.cloud_key)
    full = in_full(signed, published)
    weights, control = catch_up(full, signed)
    np.testing.assert_array_equal(weights, published)
    np.testing.assert_array_equal(control, np.full(N_PARAMS, 0.5, np.float32))
    forged = dataclasses.replace(full, weights=floats_to_bytes(published + 1))            # other weights
    other = dataclasses.replace(full, model_version=3)                                     # another version
    moved = in_full(signed, published + 1)
    moved = dataclasses.replace(moved, sha256=hashlib.sha256(floats_to_bytes(published + 1)).digest())  # own hash
    for hostile, reason in ((forged, Reason.BAD_HASH), (other, Reason.BAD_HASH), (moved, Reason.BAD_HASH),
                            (signed, Reason.BAD_VALUE)):
        with pytest.raises(ProtocolError) as refused:
            catch_up(hostile, signed)
        assert refused.value.reason == reason
    with pytest.raises(ProtocolError) as other_size:   # weights of another model are not a base for the delta
        rebuild(signed, 1, np.zeros(N_PARAMS + 1, np.float32))
    assert other_size.value.reason == Reason.STALE


def test_an_open_round_stored_before_an_upgrade_is_dropped_not_fatal(tmp_path, rng, caplog):
    """After an upgrade across a round-schema bump, the edge's stored announcement no longer decodes: the engine
    starts anyway, says so, and takes the cloud's re-announcement of the same round (its updates then count)."""
    from protocol.codec import stored_schema_is_older

    fed = Fed(tmp_path, n_devices=2)
    eng = fed.engine()
    open_round(fed, eng)
    stored = older_schema(eng.store.get("announcement"))
    assert stored_schema_is_older(stored) and not stored_schema_is_older(eng.store.get("announcement"))
    with pytest.raises(ProtocolError) as err:
        decode(stored, expect=RoundAnnouncement)
    assert err.value.reason == Reason.UNKNOWN_VERSION
    eng.store.put("announcement", stored)
    eng.close()
    with caplog.at_level("WARNING"):
        eng = fed.engine()
    assert eng.announcement is None and "older schema" in caplog.text
    assert eng.handle_cloud("round", fed.announce())
    pubs = []
    for d in fed.devices:
        result, out = eng.handle_update(d, fed.update(d, rng.normal(size=N_PARAMS).astype(np.float32)))
        assert result.accepted
        pubs += out
    agg, _ = aggregate_of(fed, pubs)
    assert agg.round_id == 1 and agg.num_devices == 2
