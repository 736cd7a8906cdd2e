"""The cloud's round logic without a broker: cloud.rounds' rules directly, and CloudEngine driven with signed
aggregates and a clock (admission, closing, the next model and announcement, accounting, resume)."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

from cloud.accounting import device_event, epsilon
from cloud.config import BoundsConfig, PrivacyConfig, RoundSettings, StrategyConfig
from cloud.engine import CloudEngine
from cloud.rounds import (
    RESIDUAL,
    OpenRound,
    Received,
    admit_authentic,
    authentic,
    close_decision,
    dense_sizes,
    edge_results,
)
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    AggregateReceipt,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    TrainingPlan,
    bytes_to_floats,
    decode,
    encode,
    floats_to_bytes,
    new_nonce,
    sign_message,
    verify_message,
    verify_raw,
)
from protocol.signing import generate_signing_key
from protocol.topics import CLOUD_MODEL, CLOUD_ROUND, aggregate_topic, receipt_topic

N = 12
EDGES = ("edge1", "edge2")
DENSE = CompressionSettings(method="dense", bits=32)
PLAN = TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def keys():
    return {name: generate_signing_key() for name in ("cloud", *EDGES)}


def aggregate(keys, edge: str, round_id: int = 1, version: int = 1, delta=None, num_samples: int = 10,
              signer: str | None = None, **fields) -> bytes:
    payload = b"" if delta is None else encode_update(np.asarray(delta, np.float32), DENSE)[0]
    agg = EdgeAggregate(
        edge_id=edge, round_id=round_id, base_version=version, num_devices=fields.pop("num_devices", 2),
        num_samples=num_samples, weight_sum=float(num_samples), n_params=fields.pop("n_params", N), delta=payload,
        significant=delta is not None, central_dp=None, filtered=fields.pop("filtered", []), rejected={},
        device_ids=[f"{edge}-d1", f"{edge}-d2"], max_device_epsilon=0.5, mean_local_steps=3.0,
        nonce=fields.pop("nonce", new_nonce()), timestamp=time.time(), device_bytes=1000, **fields)
    return encode(sign_message(agg, keys[signer or edge]))


def admit(payload: bytes, edge: str, edge_key, rnd: OpenRound) -> Received:
    """What CloudEngine does with one aggregate: check that it is the edge's, then judge it against the round."""
    return admit_authentic(authentic(payload, edge, edge_key), len(payload), rnd)


def engine(keys, run_dir, initial=None, **settings) -> CloudEngine:
    cfg = RoundSettings(model="tiny", edges=EDGES, round_timeout_s=60.0, grace_s=5.0, compression=DENSE.to_dict(),
                        **{"strategy": StrategyConfig("fedavg"), "plan": PLAN, **settings})
    return CloudEngine(cfg, keys["cloud"], lambda e: keys[e].public_key(),
                       np.zeros(N, np.float32) if initial is None else initial, run_dir)


def signed(keys, pubs, topic: str, kind):
    """The one retained message on `topic` among the engine's publications, verified with the cloud's key."""
    (pub,) = [p for p in pubs if p.topic == topic]
    assert pub.retain
    msg = decode(pub.payload, expect=kind)
    verify_message(msg, keys["cloud"].public_key())
    return msg


def announcement(keys, pubs) -> RoundAnnouncement:
    return signed(keys, pubs, CLOUD_ROUND, RoundAnnouncement)


def model(keys, pubs) -> GlobalModel:
    return signed(keys, pubs, CLOUD_MODEL, GlobalModel)


# ------------------------------------------------------------------ the rules
@pytest.mark.parametrize("received, now, expected", [
    (EDGES, NOW - 50, "complete"),             # every edge: at once, before the deadline
    (("edge1",), NOW + 4.9, None),             # past the deadline but inside the grace period
    (("edge1",), NOW + 5.0, "deadline"),       # min_edges reached after the grace period
    ((), NOW + 5.0, "reannounce"),             # too few: the same round again
])
def test_close_decision(received, now, expected):
    assert close_decision(received, EDGES, now, NOW, 5.0, 1) == expected


def test_close_decision_waits_for_min_edges():
    assert close_decision(["edge1"], EDGES, NOW + 10, NOW, 5.0, 2) == "reannounce"


def test_admission_rejects_each_bad_aggregate(keys):
    seen = new_nonce()
    rnd = OpenRound(round_id=3, version=2, n_params=N, received={"edge2"}, nonces={seen.hex()})

    def reason(payload: bytes, edge: str = "edge1", **kw) -> Reason:
        with pytest.raises(ProtocolError) as exc:
            admit(payload, edge, lambda e: keys[e].public_key(), OpenRound(**{**rnd.__dict__, **kw}))
        return exc.value.reason

    good = aggregate(keys, "edge1", 3, 2, np.ones(N))
    assert admit(good, "edge1", lambda e: keys[e].public_key(), rnd).delta.tolist() == [1.0] * N
    assert reason(good, "edge2") == Reason.WRONG_SENDER                          # topic names another edge
    assert reason(aggregate(keys, "edge1", 3, 2, signer="edge2")) == Reason.BAD_SIGNATURE
    assert reason(aggregate(keys, "edge1", 3, 2, nonce=seen)) == Reason.REPLAY
    assert reason(aggregate(keys, "edge1", 2, 2)) == Reason.DEADLINE            # a past round
    assert reason(aggregate(keys, "edge1", 4, 2)) == Reason.WRONG_ROUND
    assert reason(aggregate(keys, "edge2", 3, 2), "edge2") == Reason.DUPLICATE
    assert reason(aggregate(keys, "edge1", 3, 1)) == Reason.STALE
    assert reason(aggregate(keys, "edge1", 3, 2, n_params=N + 1)) == Reason.BAD_SHAPE
    assert reason(good, edge_masked=True) == Reason.BAD_VALUE                    # masked rounds: metadata only


def test_edge_results_reuse_an_edges_last_delta_when_not_significant(keys):
    rnd = OpenRound(1, 1, N, set(), set())
    got = {e: admit(aggregate(keys, e), e, lambda k: keys[k].public_key(), rnd) for e in EDGES}
    assert all(isinstance(g, Received) and g.delta is None for g in got.values())
    last = {"edge1": np.full(N, 2.0, np.float32)}
    results, after = edge_results(got, last)
    assert [r.edge_id for r in results] == list(EDGES)
    np.testing.assert_array_equal(results[0].delta, last["edge1"])   # "about the same as my last aggregate"
    assert results[1].delta is None and after.keys() == {"edge1"}


# ------------------------------------------------------------------ the engine
def test_a_full_round(keys, tmp_path):
    eng = engine(keys, tmp_path / "run", bounds=BoundsConfig(norm_multiple=0.0))   # plain FedAvg (tests/test_bounds.py)
    pubs = eng.start(NOW)
    assert model(keys, pubs).model_version == 1 and model(keys, pubs).encoding == "full"
    ann = announcement(keys, pubs)
    assert (ann.round_id, ann.model_version, ann.deadline, ann.edges) == (1, 1, NOW + 60, list(EDGES))
    d1, d2 = np.arange(N, dtype=np.float32), np.ones(N, np.float32)
    first = aggregate(keys, "edge1", delta=d1, num_samples=10)
    (receipt,) = eng.handle_aggregate(aggregate_topic("edge1"), first)
    assert (tmp_path / "run" / "pending" / "1-edge1.cbor").exists()          # durable before it returns
    assert receipt.topic == receipt_topic("edge1")
    got = decode(receipt.payload, expect=AggregateReceipt)
    verify_raw(receipt.payload, got, keys["cloud"].public_key())
    assert (got.edge_id, got.round_id, got.accepted, got.reason) == ("edge1", 1, True, 0)
    assert got.aggregate_nonce == decode(first, expect=EdgeAggregate).nonce
    assert eng.tick(NOW + 1) == []                                           # edge2 still expected
    eng.handle_aggregate("edge2", aggregate(keys, "edge2", delta=d2, num_samples=30))
    pubs = eng.tick(NOW + 2)
    new = model(keys, pubs)
    expected = (10 * d1 + 30 * d2) / 40
    assert new.model_version == 2
    np.testing.assert_allclose(bytes_to_floats(new.weights, N), expected, rtol=1e-6)
    assert new.sha256 == hashlib.sha256(floats_to_bytes(eng.state.server.weights)).digest()
    nxt = announcement(keys, pubs)
    assert (nxt.round_id, nxt.model_version, nxt.deadline) == (2, 2, NOW + 2 + 60)
    assert eng.state.ledger.device == [device_event(PLAN, 5)]                # smallest mean local dataset: 10 / 2
    assert eng.state.ledger.device_reported == 0.5
    (record,) = eng.state.history
    assert record["round"] == 1 and record["model_version"] == 2 and record["num_edges"] == 2
    assert record["num_devices"] == 4 and record["bytes_up"] == 2000 and record["wall_time_s"] == 2.0
    assert record["epsilon"]["device"] > 0 and record["rejected_at_cloud"] == {}
    assert [json.loads(line)["round"] for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()] == [1]
    assert not list((tmp_path / "run" / "pending").glob("*.cbor"))
    assert eng.announcement_payload == pubs[-1].payload and eng.model_payload == pubs[0].payload


def test_round_records_carry_the_evaluation_scores_and_dense_fedavg_bytes(keys, tmp_path):
    """A (loss, accuracy, scores) hook lands in the record; a (loss, accuracy) hook still works (scores null). A
    full model down costs what dense FedAvg's does; a compressed delta model costs less, its dense twin the same."""
    hooks = {"three": lambda w: (0.5, 0.75, {"auroc": 0.8, "auprc": 0.4, "min_se_ppv": 0.3}),
             "two": lambda w: (0.5, 0.75)}
    for name, hook in hooks.items():
        eng = engine(keys, tmp_path / name, model_encoding="delta", model_full_every=5,
                     model_compression={"method": "topk", "density": 0.25, "bits": 8})
        eng.evaluate = hook
        eng.start(NOW)
        receipts = {}
        for round_id in (1, 2):
            for edge in EDGES:
                pubs = eng.handle_aggregate(edge, aggregate(keys, edge, round_id, round_id, np.arange(N) + round_id))
                receipts[round_id] = receipts.get(round_id, 0) + sum(len(p.payload) for p in pubs)
            eng.tick(NOW + round_id)
        first, second = eng.state.history
        assert (first["loss"], first["accuracy"]) == (0.5, 0.75)
        expected = (0.8, 0.4, 0.3) if name == "three" else (None, None, None)
        assert (first["auroc"], first["auprc"], first["min_se_ppv"]) == expected
        dense = dense_sizes("tiny", N, 1, "edge1-d1", "edge1")            # the federation's longest ids
        assert first["dense_bytes_up"] == dense.update * 4                  # 4 devices, a dense update each
        assert first["bytes_down"] == first["dense_bytes_down"]             # version 1 went out in full
        assert second["bytes_down"] < second["dense_bytes_down"] == first["dense_bytes_down"]   # a delta
        assert receipts[2] > 0   # the receipts count as cloud -> edge bytes, in both figures
        assert second["dense_bytes_down_cloud"] == (second["dense_bytes_down"] // second["addressed"] * len(EDGES)
                                                    + receipts[2])
        assert second["bytes_down_cloud"] == second["bytes_down"] // second["addressed"] * len(EDGES) + receipts[2]
        assert second["dense_bytes_up_cloud"] > 0


def test_rejections_are_counted_and_change_nothing(keys, tmp_path):
    eng = engine(keys, tmp_path)
    eng.start(NOW)
    payload = aggregate(keys, "edge1", delta=np.ones(N))

    def verdicts(pubs) -> list[tuple[bool, str]]:
        return [(r.accepted, Reason(r.reason).name) for r in (decode(p.payload, expect=AggregateReceipt)
                                                              for p in pubs)]

    assert verdicts(eng.handle_aggregate("edge1", payload)) == [(True, "OK")]
    assert verdicts(eng.handle_aggregate("edge1", payload)) == [(False, "REPLAY")]     # a resent copy: final
    assert verdicts(eng.handle_aggregate("edge3", aggregate(keys, "edge3", signer="edge1"))) == []   # not ours
    assert verdicts(eng.handle_aggregate("edge2", aggregate(keys, "edge2", version=0))) == [(False, "STALE")]
    assert verdicts(eng.handle_aggregate("edge2", aggregate(keys, "edge2", 2))) == []  # a round to come: no verdict
    assert verdicts(eng.handle_aggregate("edge2", aggregate(keys, "edge2", signer="edge1"))) == []   # forged
    assert set(eng.received) == {"edge1"}
    assert eng.rejected == {"REPLAY": 1, "UNKNOWN_SENDER": 1, "STALE": 1, "WRONG_ROUND": 1, "BAD_SIGNATURE": 1}
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == ["1-edge1.cbor"]


def test_a_cloud_resumed_after_its_deadline_announces_the_round_again_instead_of_closing_it(keys, tmp_path):
    eng = engine(keys, tmp_path)
    eng.start(NOW)
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", delta=np.ones(N)))
    assert eng.resumed(NOW + 30) == []                                   # before the deadline: nothing to do
    (again,) = eng.resumed(NOW + 600)                                    # hung past it: same round, new deadline
    ann = decode(again.payload, expect=RoundAnnouncement)
    assert (again.topic, ann.round_id, ann.deadline) == (CLOUD_ROUND, 1, NOW + 600 + 60)
    assert eng.tick(NOW + 601) == [] and set(eng.received) == {"edge1"}   # waits for edge2's resend
    eng.handle_aggregate("edge2", aggregate(keys, "edge2", delta=np.ones(N)))
    assert eng.tick(NOW + 602) and eng.state.history[-1]["num_edges"] == 2
    assert eng.state.round_id == 2 and eng.resumed(NOW + 603) == []     # the next round: its own deadline


def test_too_few_aggregates_reannounce_the_same_round(keys, tmp_path):
    eng = engine(keys, tmp_path, min_edges=2)
    first = announcement(keys, eng.start(NOW))
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", delta=np.ones(N)))
    again = announcement(keys, eng.tick(NOW + 65))
    assert again.round_id == 1 and again.cohort == first.cohort and again.deadline == NOW + 65 + 60
    assert eng.state.history == [] and set(eng.received) == {"edge1"}


def test_delta_downlink_is_what_devices_rebuild(keys, tmp_path):
    eng = engine(keys, tmp_path, model_encoding="delta", model_full_every=5,
                 model_compression={"method": "topk", "density": 0.25, "bits": 32})
    eng.start(NOW)
    target = np.arange(1, N + 1, dtype=np.float32)
    for edge in EDGES:
        eng.handle_aggregate(edge, aggregate(keys, edge, delta=target))
    msg = model(keys, eng.tick(NOW + 1))
    assert (msg.encoding, msg.base_version, msg.model_version) == ("delta", 1, 2)
    rebuilt = np.zeros(N, np.float32) + decode_update(msg.weights, N)
    assert hashlib.sha256(floats_to_bytes(rebuilt)).digest() == msg.sha256
    assert np.count_nonzero(rebuilt) == 3                                      # top 25 % of 12
    np.testing.assert_allclose(rebuilt + eng.state.server.arrays[RESIDUAL], target, rtol=1e-6)


def test_a_projected_budget_overrun_stops_before_the_round(keys, tmp_path):
    one = epsilon([device_event(PLAN, 5)], 1e-5)
    two = epsilon([device_event(PLAN, 5)] * 2, 1e-5)
    eng = engine(keys, tmp_path, privacy=PrivacyConfig(device_epsilon=(one + two) / 2))
    eng.start(NOW)
    for edge in EDGES:
        eng.handle_aggregate(edge, aggregate(keys, edge, delta=np.ones(N)))
    pubs = eng.tick(NOW + 1)
    assert [p.topic for p in pubs] == [CLOUD_MODEL]                            # the model, no next round
    assert eng.stop_reason.startswith("privacy budget spent: device-level epsilon would reach")
    assert "stopping before round 2" in eng.stop_reason and eng.tick(NOW + 200) == []
    assert engine(keys, tmp_path).start(NOW + 300) == []                       # stays stopped across restarts


def test_a_new_engine_resumes_the_open_round(keys, tmp_path):
    eng = engine(keys, tmp_path)
    ann = announcement(keys, eng.start(NOW))
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", delta=np.ones(N), num_samples=20))
    del eng                                                                    # "kill -9"
    eng = engine(keys, tmp_path)
    pubs = eng.start(NOW + 10)
    assert announcement(keys, pubs) == ann and set(eng.received) == {"edge1"}  # same round, before its deadline
    eng.handle_aggregate("edge2", aggregate(keys, "edge2", delta=np.full(N, 3.0), num_samples=20))
    assert model(keys, eng.tick(NOW + 11)).model_version == 2
    np.testing.assert_allclose(eng.state.server.weights, np.full(N, 2.0))
    assert len(eng.state.history) == 1


def test_an_open_round_checkpointed_before_an_upgrade_is_announced_anew(keys, tmp_path, caplog):
    """After an upgrade across a round-schema bump the checkpointed announcement no longer decodes: the resumed
    cloud says so and announces the same round again in the current schema, then closes it as usual."""
    from cloud.state import load, save

    from .harness import older_schema

    eng = engine(keys, tmp_path)
    first = announcement(keys, eng.start(NOW))
    del eng                                                                    # stopped, then upgraded
    state = load(tmp_path / "checkpoint.npz")
    state.announcement = older_schema(state.announcement)                     # as the previous release stored it
    save(tmp_path / "checkpoint.npz", state)
    eng = engine(keys, tmp_path)
    with caplog.at_level("WARNING"):
        again = announcement(keys, eng.start(NOW + 10))
    assert "older schema" in caplog.text
    assert (again.round_id, again.model_version, again.plan) == (first.round_id, first.model_version, first.plan)
    for edge in EDGES:
        eng.handle_aggregate(edge, aggregate(keys, edge, delta=np.ones(N), num_samples=20))
    assert model(keys, eng.tick(NOW + 11)).model_version == 2


def test_a_checkpoint_of_another_model_is_refused(keys, tmp_path):
    eng = engine(keys, tmp_path)
    eng.start(NOW)
    with pytest.raises(ValueError, match="another model"):
        engine(keys, tmp_path, initial=np.zeros(N + 1, np.float32))


def test_a_pending_aggregate_checkpointed_by_a_reannouncement_is_not_a_replay_after_a_crash(keys, tmp_path):
    """Found by `fediomt bench chaos`: an aggregate accepted, then a re-announcement's checkpoint (which holds its
    nonce), then kill -9: the restarted cloud re-read its own pending copy and refused it as a REPLAY, so the round
    waited for an aggregate the edge had already delivered and never closed."""
    eng = engine(keys, tmp_path, min_edges=2)
    eng.start(NOW)
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", delta=np.ones(N), num_samples=20))
    eng.tick(NOW + 65)                                                         # re-announced: checkpointed
    del eng                                                                    # "kill -9"
    eng = engine(keys, tmp_path, min_edges=2)
    eng.start(NOW + 70)
    assert set(eng.received) == {"edge1"} and not eng.rejected
    eng.handle_aggregate("edge2", aggregate(keys, "edge2", delta=np.full(N, 3.0), num_samples=20))
    assert model(keys, eng.tick(NOW + 71)).model_version == 2
    np.testing.assert_allclose(eng.state.server.weights, np.full(N, 2.0))
