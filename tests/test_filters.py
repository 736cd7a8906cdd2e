"""Pure-function tests of the edge's filters, robust aggregators, weighting, rows, central DP and round rules."""

from __future__ import annotations

import numpy as np
import pytest

from edge import central_dp
from edge.aggregate import FilterConfig, Meta, aggregate, relative_change
from edge.filters import run_filters
from edge.filters.base import robust_z
from edge.filters.collusion import near_duplicates, pairwise_cosines
from edge.filters.cosine import cosine_to_median
from edge.filters.krum import multi_krum, pairwise_sq_distances
from edge.filters.median import coordinate_median
from edge.filters.norm import norm_zscore
from edge.filters.trimmed_mean import trimmed_mean
from edge.rounds import RoundsConfig, close_time, expected_devices, staleness, staleness_weight, sync_close_reason
from edge.rows import Rows
from edge.weighting import WeightingConfig, weights
from protocol.errors import ProtocolError, Reason

D = 2_000


def population(n=20, bad=4, scale=10.0, seed=0):
    """n updates around a common direction; the last `bad` are scaled sign-flipped copies of honest ones."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D).astype(np.float32)
    X = (direction + 0.5 * rng.normal(size=(n, D))).astype(np.float32) * 0.01
    X[n - bad:] = -scale * X[: bad]
    return X


def test_robust_z_scores_outliers_and_is_scale_free():
    x = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 10.0])
    z = robust_z(x)
    assert z[-1] > 3.5 and np.all(np.abs(z[:-1]) < 3.5)
    np.testing.assert_allclose(robust_z(7 * x), z)
    assert not robust_z(np.ones(5)).any()


def test_norm_filter_flags_only_boosted_updates():
    X = population()
    v = norm_zscore(X)
    assert v.flags.tolist() == [False] * 16 + [True] * 4
    assert not norm_zscore(X[:16] * 1e-3).flags.any()  # small updates are never flagged


def test_norm_filter_needs_a_multiple_of_the_median_as_well_as_a_high_z():
    norms = np.array([1.0, 1.02, 0.98, 1.01, 2.0])   # an edge of 5: tiny MAD, one honest device moving twice as far
    X = norms[:, None] * np.eye(5, dtype=np.float32)
    assert norm_zscore(X).scores[-1] > 30
    assert not norm_zscore(X).flags.any()
    assert norm_zscore(X, min_ratio=0.0).flags.tolist() == [False] * 4 + [True]   # the z-score alone flags it
    X[-1] *= 15   # 30x the median: what honest watch02 sends now and then (the bounds scale it to the median)
    assert not norm_zscore(X).flags.any()
    assert norm_zscore(X, min_ratio=3.0).flags.tolist() == [False] * 4 + [True]
    X[-1] *= 10   # 300x: no honest step is that large (noise and replacement attacks are)
    assert norm_zscore(X).flags.tolist() == [False] * 4 + [True]
    many = np.r_[1.0 + 0.02 * np.random.default_rng(0).standard_normal(24), 2.0]   # 25 norms: the MAD is trusted
    assert norm_zscore(many[:, None] * np.eye(25, dtype=np.float32)).flags.tolist() == [False] * 24 + [True]


def test_cosine_filter_flags_sign_flipped_updates():
    X = population(scale=1.0)  # same norms: only the direction betrays them
    v = cosine_to_median(X)
    assert v.flags.tolist() == [False] * 16 + [True] * 4
    assert (v.scores[:16] > 0.3).all() and (v.scores[16:] < 0).all()
    assert not cosine_to_median(np.zeros((5, 10), np.float32)).flags.any()  # degenerate median: no verdict


def test_krum_distances_match_a_direct_computation_and_flag_outliers():
    X = population()
    direct = ((X[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_sq_distances(X), direct, rtol=1e-6, atol=1e-9)
    v = multi_krum(X, byzantine_fraction=0.2)
    assert v.flags.sum() == 4 and v.flags[16:].all()
    assert not multi_krum(X[:3]).flags.any()  # too few for the rule


def test_trimmed_mean_and_median_resist_outliers():
    X = np.array([[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.0], [100.0, -100.0]], np.float32)
    np.testing.assert_allclose(trimmed_mean(X, trim=0.2), [1.0333333, 1.9666667], rtol=1e-6)
    np.testing.assert_allclose(coordinate_median(X), [1.0, 2.0])
    np.testing.assert_allclose(trimmed_mean(X, trim=0.0), X.mean(0), rtol=1e-6)


def test_filters_compose_by_union():
    X = population(scale=1.0)
    X[0] *= 50  # boosted but well-directed: only the norm filter sees it
    flags, verdicts = run_filters(X, ["norm", "cosine"], {})
    assert verdicts["norm"].flags[0] and not verdicts["cosine"].flags[0]
    assert flags[0] and flags[16:].all() and not flags[1:16].any()
    assert np.isnan(verdicts["cosine"].scores[0])  # the cosine filter did not see what the norm filter flagged


def colluding_edge(seed=0, honest=2, colluders=3):
    """A small edge of non-IID honest devices (loosely aligned, against the attack) and colluders pushing one
    direction, each copy with its own small perturbation (e.g. compression's error feedback)."""
    rng = np.random.default_rng(seed)
    attack = rng.normal(size=D)
    X = np.vstack([rng.normal(size=(honest, D)) - 0.3 * attack,
                   attack + 0.2 * rng.normal(size=(colluders, D))]).astype(np.float32)
    return X


def test_pairwise_cosines_match_a_direct_computation():
    X = colluding_edge()
    X[0] = 0
    cos = pairwise_cosines(X)
    n = np.linalg.norm(X.astype(np.float64), axis=1)
    for i in range(1, 5):
        for j in range(1, 5):
            if i != j:
                assert cos[i, j] == pytest.approx(X[i].astype(np.float64) @ X[j] / (n[i] * n[j]), abs=1e-6)
    assert (cos[0, 1:] == 0).all() and np.isneginf(np.diag(cos)).all()


def test_collusion_filter_flags_near_parallel_colluders_but_not_a_consensus():
    X = colluding_edge()
    v = near_duplicates(X)
    assert v.flags.tolist() == [False, False, True, True, True]
    assert (v.scores[2:] > 0.9).all() and (v.scores[:2] < 0.2).all()
    rng = np.random.default_rng(1)   # IID devices early in training: all near-parallel, nobody stands out
    consensus = (rng.normal(size=D) + 0.3 * rng.normal(size=(6, D))).astype(np.float32)
    v = near_duplicates(consensus)
    assert (v.scores > 0.85).all() and not v.flags.any()
    assert not near_duplicates(X[:1]).flags.any()
    flipped = consensus.copy()   # half of them sign-flipped: the signed median pair is -0.9, the typical |cosine| 0.9
    flipped[3:] *= -1
    assert not near_duplicates(flipped).flags.any()


def test_collusion_filter_samples_its_peers_at_a_large_edge():
    X = colluding_edge(honest=800, colluders=400)   # a third of 1,200 updates collude
    sampled = near_duplicates(X, max_peers=600)
    exact = near_duplicates(X, max_peers=2_000)
    assert exact.flags[-400:].all() and not exact.flags[:-400].any()
    assert sampled.flags[-400:].all() and not sampled.flags[:-400].any()   # the group's size, estimated from 600
    np.testing.assert_allclose(sampled.scores[-400:], exact.scores[-400:], atol=0.02)


def test_collusion_filter_leaves_a_few_near_identical_devices_of_a_large_edge_alone():
    """Two honest devices cut from the same records (or two colluders) among 100 cannot move the cosine median:
    only a group holding `min_share` of the round is flagged; at an edge of 5 any pair is."""
    X = colluding_edge(honest=98, colluders=2)
    assert near_duplicates(X).scores[-2:].min() > 0.9 and not near_duplicates(X).flags.any()
    assert near_duplicates(X, min_share=0.0).flags[-2:].all()
    assert near_duplicates(colluding_edge(honest=3, colluders=2)).flags.tolist() == [False] * 3 + [True] * 2


def test_collusion_runs_first_so_colluders_cannot_capture_the_cosine_median():
    X = colluding_edge()   # 3 of 5 collude: the coordinate median is theirs
    alone = cosine_to_median(X)
    assert alone.flags[:2].all() and not alone.flags[2:].any()   # the cosine filter alone drops the honest two
    flags, verdicts = run_filters(X, ["collusion", "cosine"], {})
    assert flags.tolist() == [False, False, True, True, True]
    assert not verdicts["cosine"].flags.any() and np.isnan(verdicts["cosine"].scores[2:]).all()
    flags, verdicts = run_filters(X, ["collusion", "cosine"], {"collusion": {"max_cos": 1.0, "margin": 2.0}})
    assert flags.tolist() == [True, True, False, False, False]   # without the check, the honest are dropped


@pytest.mark.parametrize("chunk", [1, 60, 1 << 22])
def test_rows_sparse_and_dense_agree_with_numpy(monkeypatch, chunk):
    monkeypatch.setattr("edge.rows.CHUNK_VALUES", chunk)  # chunk boundaries anywhere give the same results
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(3, 50)).astype(np.float32)
    idx = np.array([3, 7, 40], dtype=np.int32)
    rows = Rows.stack(50, [(None, dense[0]), (idx, dense[1, idx]), (None, dense[2])])
    assert rows.indices.shape == (3,)  # dense rows store no indices
    ref = dense.copy()
    ref[1] = 0
    ref[1, idx] = dense[1, idx]
    np.testing.assert_array_equal(rows.dense(), ref)
    np.testing.assert_allclose(rows.norms(), np.linalg.norm(ref, axis=1), rtol=1e-6)
    w = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(rows.weighted_sum(w), w @ ref, rtol=1e-5)
    np.testing.assert_array_equal(rows.dense(np.array([3, 4, 40])), ref[:, [3, 4, 40]])
    np.testing.assert_array_equal(rows.column_block(5, 45), ref[:, 5:45])
    np.testing.assert_array_equal(rows.take(np.array([False, True, True])).dense(), ref[1:])
    sparse_only = rows.take(np.array([False, True, False]))
    np.testing.assert_array_equal(sparse_only.touched(), idx)
    assert rows.touched().shape == (50,)


def test_fedavg_is_the_special_case_of_the_weights():
    n = np.array([10, 30, 60])
    args = dict(losses=np.array([0.5, 0.6, 5.0]), classes=["pi", "wearable", "pi"], staleness=np.ones(3),
                sample_weight=np.ones(3))
    np.testing.assert_allclose(weights(n, cfg=WeightingConfig(), **args), n)
    w = weights(n, cfg=WeightingConfig(loss_gamma=1.0, class_factors={"wearable": 0.5}), **{
        **args, "staleness": staleness_weight(np.array([0, 0, 3]), 0.5), "sample_weight": np.array([2.0, 1, 1])})
    assert w[0] == pytest.approx(20.0)                 # sample_weight x2
    assert w[1] == pytest.approx(15.0)                 # wearable x0.5, median loss: no penalty
    assert w[2] < 60 * 0.5 * 0.01                      # stale (1+3)^-0.5 and an outlying loss
    assert weights(np.array([0, 5]), cfg=WeightingConfig(sample_exponent=0.0), **{
        k: (v[:2] if not isinstance(v, list) else v[:2]) for k, v in args.items()}).tolist() == [0.0, 1.0]


def test_secure_normal_is_standard_normal():
    z = central_dp.secure_normal(200_001)
    assert z.shape == (200_001,)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert not np.array_equal(central_dp.secure_normal(10), central_dp.secure_normal(10))


def test_central_dp_clips_and_uses_a_fixed_denominator():
    rows = Rows.stack(4, [(None, np.array([3, 4, 0, 0], np.float32)), (None, np.array([0, 0, 0.3, 0.4], np.float32))])
    meta = Meta(np.array([1.0, 1.0]), np.zeros(2), ["pi", "pi"], np.ones(2), np.ones(2))
    noise = np.array([1.0, -1.0, 0.5, 0.0])
    r = aggregate(rows, meta, WeightingConfig(), FilterConfig(enabled=[]), clip=1.0, noise_mult=2.0, noise=noise)
    # first delta clipped to norm 1: (0.6, 0.8); second untouched; sum + z*S*noise over W = 2
    np.testing.assert_allclose(r.mean, (np.array([0.6, 0.8, 0.3, 0.4]) + 2.0 * noise) / 2, rtol=1e-6)
    assert r.num_clipped == 1
    rep = central_dp.report(1.0, 2.0, 1.5, 1)
    assert (rep.clip, rep.noise_mult, rep.sampling_rate) == (1.0, 2.0, 1.0)


def test_aggregate_drops_or_downweights_flagged_updates():
    X = population()
    rows = Rows.stack(D, [(None, x) for x in X])
    meta = Meta(np.full(20, 10.0), np.zeros(20), ["pi"] * 20, np.ones(20), np.ones(20))
    honest = X[:16].mean(0)
    dropped = aggregate(rows, meta, WeightingConfig(), FilterConfig(enabled=["norm"]))
    np.testing.assert_allclose(dropped.mean, honest, rtol=1e-5, atol=1e-7)
    down = aggregate(rows, meta, WeightingConfig(), FilterConfig(enabled=["norm"], action="downweight",
                                                                 downweight=0.1))
    ref = (X[:16].sum(0) + 0.1 * X[16:].sum(0)) / (16 + 0.4)
    np.testing.assert_allclose(down.mean, ref, rtol=1e-5, atol=1e-7)
    med = aggregate(rows, meta, WeightingConfig(), FilterConfig(enabled=[], aggregator="median", max_cells=3000))
    np.testing.assert_allclose(med.mean, np.median(X, 0), rtol=1e-6)  # block-wise = whole


def test_filter_matrix_samples_columns_when_the_round_is_large():
    X = population()
    rows = Rows.stack(D, [(None, x) for x in X])
    meta = Meta(np.ones(20), np.zeros(20), ["pi"] * 20, np.ones(20), np.ones(20))
    r = aggregate(rows, meta, WeightingConfig(), FilterConfig(enabled=["norm", "cosine"], max_cells=20 * 300))
    assert r.flagged.tolist() == [False] * 16 + [True] * 4   # 300 of 2000 columns suffice


def test_relative_change():
    assert relative_change(np.ones(3, np.float32), None) == float("inf")
    assert relative_change(np.array([1.1, 0], np.float32), np.array([1.0, 0], np.float32)) == pytest.approx(0.1, 1e-5)


def test_round_rules():
    cfg = RoundsConfig(quorum=0.5, min_updates=2, deadline_margin_s=1.0, round_timeout_s=30)
    assert expected_devices([], {"a", "b"}) == {"a", "b"}
    assert expected_devices(["a", "z"], {"a", "b"}) == {"a"}
    assert sync_close_reason(1, 4, now=0, deadline=100, opened=0, cfg=cfg) is None
    assert sync_close_reason(2, 4, now=0, deadline=100, opened=0, cfg=cfg) == "quorum"
    assert sync_close_reason(1, 4, now=99, deadline=100, opened=0, cfg=cfg) == "deadline"
    assert close_time(100, 0, cfg) == 30
    assert staleness(5, 3, cfg) == 2
    with pytest.raises(ProtocolError) as exc:
        staleness(10, 3, cfg)
    assert exc.value.reason == Reason.STALE
    np.testing.assert_allclose(staleness_weight(np.array([0, 3]), 0.5), [1.0, 0.5])
    with pytest.raises(ValueError):
        RoundsConfig(mode="later")
