"""cloud.evaluation: the numpy metrics against sklearn.metrics on random data (ties, imbalance, degenerate sets)."""

from __future__ import annotations

import numpy as np
import pytest

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from cloud.evaluation import (  # noqa: E402
    SCORES,
    auprc,
    auroc,
    average_ranks,
    binary_scores,
    cross_entropy_accuracy,
    evaluate_logits,
    min_se_ppv,
    sensitivity_ppv,
    split_evaluation,
)


def _cases():
    rng = np.random.default_rng(7)
    for i in range(40):
        n = int(rng.integers(5, 400))
        rate = rng.choice([0.03, 0.14, 0.5, 0.8])
        y = (rng.random(n) < rate).astype(np.int64)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        # continuous scores, heavily tied (rounded) scores, and scores that carry some signal
        score = rng.normal(size=n) + (1.5 * y if i % 3 == 0 else 0.0)
        if i % 2:
            score = np.round(score, 0)
        yield y, score


@pytest.mark.parametrize("y,score", list(_cases()))
def test_auroc_and_auprc_match_sklearn(y, score):
    assert auroc(y, score) == pytest.approx(sklearn_metrics.roc_auc_score(y, score), abs=1e-12)
    assert auprc(y, score) == pytest.approx(sklearn_metrics.average_precision_score(y, score), abs=1e-12)


def test_ranks_average_ties():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_perfect_inverted_and_constant_scores():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.zeros(4)) == 0.5
    assert auprc(y, np.zeros(4)) == pytest.approx(0.5)   # one threshold: precision = prevalence
    assert auprc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0


def test_single_class_is_undefined():
    assert auroc(np.zeros(5, int), np.arange(5.0)) is None
    assert auroc(np.ones(5, int), np.arange(5.0)) is None
    assert auprc(np.zeros(5, int), np.arange(5.0)) is None
    assert min_se_ppv(np.zeros(5, int), np.ones(5, int)) is None


def test_min_se_ppv_matches_sklearn_recall_and_precision():
    rng = np.random.default_rng(3)
    for _ in range(30):
        y = (rng.random(200) < 0.15).astype(int)
        pred = (rng.random(200) < rng.uniform(0.01, 0.5)).astype(int)
        se, ppv = sensitivity_ppv(y, pred)
        assert se == pytest.approx(sklearn_metrics.recall_score(y, pred))
        assert ppv == pytest.approx(sklearn_metrics.precision_score(y, pred, zero_division=0))
        assert min_se_ppv(y, pred) == pytest.approx(min(se, ppv))


def test_never_predicting_the_event_scores_zero():
    y = np.array([0] * 86 + [1] * 14)
    assert min_se_ppv(y, np.zeros(100, int)) == 0.0     # the majority-class rule: 0.86 accurate, useless
    assert min_se_ppv(y, y) == 1.0


def test_cross_entropy_accuracy_matches_sklearn():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 5)) * 3
    y = rng.integers(0, 5, 300)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss, acc = cross_entropy_accuracy(logits.astype(np.float32), y)
    assert loss == pytest.approx(sklearn_metrics.log_loss(y, p, labels=range(5)), rel=1e-6)
    assert acc == pytest.approx(sklearn_metrics.accuracy_score(y, logits.argmax(1)))


def test_binary_scores_from_logits_use_the_margin_and_the_argmax_decision():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(500, 2)) * 40    # saturated probabilities: the margin keeps the ranking exact
    y = (logits[:, 1] - logits[:, 0] + rng.normal(size=500) * 30 > 20).astype(int)
    p1 = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    scores = binary_scores(logits, y)
    assert scores["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, logits[:, 1] - logits[:, 0]))
    assert scores["auprc"] == pytest.approx(sklearn_metrics.average_precision_score(y, logits[:, 1] - logits[:, 0]))
    pred = (p1 > 0.5).astype(int)
    assert scores["min_se_ppv"] == pytest.approx(min(sklearn_metrics.recall_score(y, pred),
                                                     sklearn_metrics.precision_score(y, pred)))


def test_multiclass_has_no_binary_scores_and_hook_results_normalise():
    logits = np.random.default_rng(0).normal(size=(20, 7))
    y = np.arange(20) % 7
    loss, acc, scores = evaluate_logits(logits, y)
    assert scores == dict.fromkeys(SCORES) and loss > 0 and 0 <= acc <= 1
    assert split_evaluation((0.5, 0.9)) == (0.5, 0.9, dict.fromkeys(SCORES))
    assert split_evaluation((0.5, 0.9, {"auroc": 0.8, "other": 1}))[2] == {"auroc": 0.8, "auprc": None,
                                                                           "min_se_ppv": None}
    assert split_evaluation(None) == (None, None, dict.fromkeys(SCORES))
