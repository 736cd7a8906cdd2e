"""Edge-level secure aggregation (trusted_edge + edges_mask): the pure edge tier, the cloud's config checks, and a
round end to end over a real Mosquitto with real edge gateways (one a process killed mid-protocol) and the cloud."""

from __future__ import annotations

import logging
import signal
import time

import numpy as np
import pytest

from cloud.config import load_config
from edge.gateway import Gateway
from edge.secagg_round import metadata
from protocol.errors import ProtocolError, Reason
from protocol.messages import (
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    bytes_to_floats,
    decode,
    encode,
    sign_message,
)
from protocol.secagg.deploy import MaskedRound
from protocol.secagg.edge_tier import EdgeMaskedRound
from protocol.secagg.inprocess import run_cohort
from protocol.secagg.quant import levels
from protocol.signing import generate_signing_key, save_private_key, save_public_key

from .harness import MLP_OPTIONS as MODEL_OPTIONS
from .harness import MLP_PARAMS as N_PARAMS
from .harness import Fed, rounds_of, start_in_process

TABLE = {"mode": "trusted_edge", "edges_mask": True, "graph": "full", "min_cohort": 3, "threshold": 0.5,
         "clip": 1.0, "bits": 16, "max_samples": 64}


def error_bound(tier: EdgeMaskedRound, n_edges: int, total_samples: float) -> float:
    """docs/secagg.md: n_edges quantization steps of the sum, scaled by max_samples / total samples (+ weight)."""
    step = 2 * tier.config.clip / levels(tier.config.bits)
    return 1.05 * n_edges * step * tier.scale / total_samples + 1e-6


# ------------------------------------------------------------------ pure
def test_the_announced_table_parses_and_malformed_ones_are_refused():
    tier = EdgeMaskedRound.from_announcement(TABLE)
    assert tier.config.min_cohort == 3 and tier.scale == 64 and tier.length(10) == 12
    assert MaskedRound.from_announcement(TABLE) is None          # devices send plaintext
    assert EdgeMaskedRound.from_announcement({"mode": "trusted_edge"}) is None
    assert EdgeMaskedRound.from_announcement({**TABLE, "max_samples": 0}).scale == 65535
    for bad in ({"mode": "untrusted_edge"}, {"edges_mask": 1}, {"max_samples": -1}, {"density": 0.5},
                {"max_samples": 1.5}):
        with pytest.raises(ProtocolError):
            EdgeMaskedRound.from_announcement({**TABLE, **bad})


def test_the_unmasked_sum_is_the_sample_weighted_mean_over_the_surviving_edges():
    tier = EdgeMaskedRound.from_announcement(TABLE)
    rng = np.random.default_rng(1)
    means = {f"e{i}": rng.normal(0, 0.3, 500).astype(np.float32) for i in range(5)}
    samples = {"e0": 60, "e1": 5, "e2": 33, "e3": 0, "e4": 64}              # e3: no device this round
    devices = {"e0": 6, "e1": 1, "e2": 3, "e3": 0, "e4": 7}
    keys = {e: generate_signing_key() for e in means}
    vectors = {e: tier.edge_vector(means[e], samples[e], devices[e]) for e in means}
    assert all(np.abs(v).max() <= 1.0 for v in vectors.values())
    result = run_cohort(vectors, keys, tier.config, edge_id="cloud", drop_after_shares={"e1"})
    total = tier.total(result)
    alive = [e for e in means if e != "e1"]
    n = sum(samples[e] for e in alive)
    expected = sum(samples[e] * means[e].astype(np.float64) for e in alive) / n
    assert total.edges == alive and total.dropped == ["e1"] and abs(total.num_samples - n) <= len(alive)
    assert total.num_devices == sum(devices[e] for e in alive)
    np.testing.assert_allclose(total.mean, expected, rtol=0, atol=error_bound(tier, len(alive), n))
    with pytest.raises(ProtocolError) as exc:                              # below min_cohort: no sum at all
        run_cohort(vectors, keys, tier.config, edge_id="cloud", drop_after_shares={"e0", "e1", "e2"})
    assert exc.value.reason == Reason.SECAGG_ABORT


def test_metadata_keeps_no_update_of_the_edge():
    agg = EdgeAggregate(edge_id="e1", round_id=1, base_version=1, num_devices=2, num_samples=30, weight_sum=30.0,
                        n_params=4, delta=b"\x01" * 16, significant=True, device_ids=["a", "b"], filtered=["c"],
                        rejected={"REPLAY": 1}, mean_local_steps=3.0, update_norms={"a": 0.5}, nonce=b"n" * 16,
                        central_dp=None, max_device_epsilon=1.0,
                        timestamp=1.0)
    meta = metadata(agg)
    assert (meta.delta, meta.num_samples, meta.weight_sum, meta.update_norms, meta.significant) == (b"", 0, 0.0, {},
                                                                                                    False)
    assert (meta.device_ids, meta.filtered, meta.rejected) == (["a", "b"], ["c"], {"REPLAY": 1})
    decode(encode(meta), expect=EdgeAggregate)


# ------------------------------------------------------------------ cloud config
def cloud_toml(tmp_path, n_edges: int, secagg: dict, strategy: str = 'name = "fedavg"') -> str:
    (tmp_path / "edges").mkdir(exist_ok=True)
    for i in range(n_edges):
        save_public_key(generate_signing_key().public_key(), tmp_path / "edges" / f"e{i}.pub")
    table = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n" for k, v in secagg.items())
    path = tmp_path / "cloud.toml"
    path.write_text(f'run_dir = "run"\nsigning_key = "cloud.key"\nedge_keys_dir = "edges"\nmodel = "vitals_mlp"\n'
                    f'{MODEL_OPTIONS}[strategy]\n{strategy}\n[secagg]\n{table.replace(chr(39), chr(34))}')
    return path


@pytest.mark.parametrize("n_edges, strategy, secagg, match", [
    (2, 'name = "fedavg"', {}, "2 edges < min_cohort 3"),
    (3, 'name = "scaffold"', {}, "control-variate"),
    (3, 'name = "fediomt"', {}, "fednova = true.*importance_sampling = true"),
    (3, 'name = "fedavg"', {"density": 0.5}, "random-k"),
    (3, 'name = "fedavg"', {"mode": "untrusted_edge"}, "trusted_edge"),
])
def test_the_cloud_refuses_setups_edge_masking_cannot_serve(tmp_path, n_edges, strategy, secagg, match):
    with pytest.raises(ValueError, match=match):
        load_config(cloud_toml(tmp_path, n_edges, {**TABLE, **secagg}, strategy))


def test_the_cloud_accepts_fediomt_without_per_edge_needs(tmp_path):
    cfg = load_config(cloud_toml(tmp_path, 3, TABLE, 'name = "fediomt"\n[strategy.options]\nfednova = false\n'
                                                     'importance_sampling = false'))
    assert EdgeMaskedRound.from_announcement(cfg.secagg_for_round()).scale == 64
    plain = dict(TABLE, edges_mask=False)       # the old plaintext trusted_edge behaviour stays available
    assert EdgeMaskedRound.from_announcement(load_config(cloud_toml(tmp_path, 1, plain)).secagg) is None


def test_an_aborted_protocol_skips_the_round_with_the_model_unchanged(tmp_path, caplog):
    from cloud.aggregator import CloudAggregator

    save_private_key(generate_signing_key(), tmp_path / "cloud.key")
    path = cloud_toml(tmp_path, 3, TABLE)
    path.write_text("rounds = 1\n" + path.read_text())
    agg = CloudAggregator(load_config(path), logging.getLogger("test.cloud"))
    before = agg.state.server.weights.copy()
    ann = RoundAnnouncement(1, "vitals_mlp", 1, "fedavg", time.time(), agg.cfg.plan, {}, secagg=TABLE)
    agg.state.announcement = encode(sign_message(ann, agg.key))
    agg.run_dir.mkdir(parents=True)
    agg.engine.masked_finished(1, ProtocolError(Reason.SECAGG_ABORT, "1 masked inputs < min_cohort 3"), time.time())
    with caplog.at_level(logging.ERROR):
        assert agg.engine.tick(time.time()) == []    # the last round: no next announcement
    (record,) = agg.state.history
    assert record["edge_secagg"] == {"aborted": "1 masked inputs < min_cohort 3"} and agg.state.version == 1
    np.testing.assert_array_equal(agg.state.server.weights, before)
    assert "edge secagg aborted" in caplog.text and agg.state.stop_reason == "completed 1 rounds"


# ------------------------------------------------------------------ end to end
def test_edges_mask_toward_the_cloud_and_a_killed_edge_drops_out(tmp_path, broker, daemons, recorder):
    """Four edges (three in-process gateways, one `fediomt edge run` process), two scripted devices each, the cloud
    in process. Round 1: the new model = the sample-weighted mean of all edges' aggregates; round 2: e4 is killed
    right after sharing its keys, the model moves by the mean over e1-e3. Edges publish only metadata."""
    cloud_key = generate_signing_key()
    save_private_key(cloud_key, tmp_path / "cloud.key")
    keys_dir = tmp_path / "edges"
    keys_dir.mkdir()
    rng = np.random.default_rng(3)
    feds, deltas, samples = {}, {}, {}
    for i in range(1, 5):
        edge = f"e{i}"
        fed = Fed(tmp_path / edge, n_devices=2, n_params=N_PARAMS, edge_id=edge, tick_s=0.05,
                  broker={"host": broker.host, "port": broker.port}, edge_keys_dir=str(keys_dir),
                  secagg_step_timeout_s=5.0)
        fed.cloud_key = cloud_key
        save_public_key(cloud_key.public_key(), tmp_path / edge / "cloud.pub")
        save_public_key(fed.edge_key.public_key(), keys_dir / f"{edge}.pub")
        feds[edge] = fed
        for j, d in enumerate(fed.devices):
            deltas[edge, d] = rng.normal(0, 0.2, N_PARAMS).astype(np.float32)
            samples[edge, d] = 5 + 3 * i + j
    table = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n" for k, v in TABLE.items())
    config = tmp_path / "cloud.toml"
    config.write_text('run_dir = "run"\nsigning_key = "cloud.key"\nedge_keys_dir = "edges"\nmodel = "vitals_mlp"\n'
                      'rounds = 2\nround_timeout_s = 30.0\ngrace_s = 1.0\nsecagg_step_timeout_s = 3.0\n'
                      f'{MODEL_OPTIONS}[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
                      f'[strategy]\nname = "fedavg"\n[secagg]\n{table}'.replace("'", '"'))

    def on_message(topic: str, payload: bytes) -> None:  # on paho's thread, before the watcher records it
        if topic == "fl/cloud/secagg/shares/e4" and len(watcher.payloads(topic)) == 1:
            e4.kill()                     # e4's second round: killed right after sharing its keys
        elif topic.endswith("/round") and topic != "fl/cloud/round":   # that edge's devices answer
            edge = topic.split("/")[1]
            ann = decode(payload, expect=RoundAnnouncement)
            for d in feds[edge].devices:
                watcher.client.publish(f"fl/{edge}/updates/{d}", feds[edge].update(
                    d, deltas[edge, d], round_id=ann.round_id, version=ann.model_version,
                    num_samples=samples[edge, d], edge_id=edge), qos=1)

    def models() -> dict[int, np.ndarray]:
        return {m.model_version: bytes_to_floats(m.weights, m.n_params)
                for m in (decode(p, expect=GlobalModel) for p in watcher.payloads("fl/cloud/model"))}

    # bound before anything is published: the gateways and e4 start after it
    watcher = recorder(["fl/+/round", "fl/cloud/model", "fl/cloud/aggregates/+", "fl/cloud/secagg/#"],
                       hook=on_message)
    for e in ("e1", "e2", "e3"):
        daemons.thread(Gateway(feds[e].engine().cfg, logging.getLogger(f"test.{e}")))
    e4 = daemons.process("edge", "run", "--config", str(feds["e4"].config), log=tmp_path / "e4.log")
    cloud, thread = start_in_process(config, daemons)
    thread.join(timeout=90)
    assert not thread.is_alive(), (tmp_path / "e4.log").read_text()[-2000:]
    watcher.wait(lambda _: 3 in models(), 10, "model 3 (published as the cloud stopped)")

    def weighted_mean(edges) -> np.ndarray:
        keys = [(e, d) for e in edges for d in feds[e].devices]
        return sum(samples[k] * deltas[k].astype(np.float64) for k in keys) / sum(samples[k] for k in keys)

    tier = EdgeMaskedRound.from_announcement(TABLE)
    records = rounds_of(tmp_path / "run")
    assert records[0]["edge_secagg"] == {"edges": ["e1", "e2", "e3", "e4"], "dropped": []}
    assert records[1]["edge_secagg"] == {"edges": ["e1", "e2", "e3"], "dropped": ["e4"]}
    assert e4.wait(10) == -signal.SIGKILL
    got = models()
    for version, edges in ((1, ["e1", "e2", "e3", "e4"]), (2, ["e1", "e2", "e3"])):
        total = sum(samples[e, d] for e in edges for d in feds[e].devices)
        np.testing.assert_allclose(got[version + 1] - got[version], weighted_mean(edges), rtol=0,
                                   atol=error_bound(tier, len(edges), total))
    with watcher.cond:
        seen = list(watcher.messages)
    for topic, payload in seen:                                  # only metadata ever went up in plaintext
        if topic.startswith("fl/cloud/aggregates/"):
            agg = decode(payload, expect=EdgeAggregate)
            assert agg.delta == b"" and agg.num_samples == 0 and not agg.update_norms and agg.num_devices == 2
    assert cloud.state.last_delta == {} and all(r["rewards"] is None for r in records)
