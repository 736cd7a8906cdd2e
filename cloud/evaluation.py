"""Held-out evaluation from logits: cross-entropy, accuracy and, for binary clinical tasks, the scores that an
imbalanced task is judged by. Pure numpy (no scikit-learn at run time); tests/test_evaluation.py checks every
function against sklearn.metrics on random data.

Binary tasks (two logits; class 1 is the event: disease, in-hospital death) also get:
- `auroc`: area under the ROC curve of the score logit_1 - logit_0 (rank-equivalent to P(y=1)), ties counted
  half (the Mann-Whitney statistic, = sklearn.metrics.roc_auc_score);
- `auprc`: average precision, the step-wise area under the precision-recall curve without interpolation
  (= sklearn.metrics.average_precision_score);
- `min_se_ppv`: the PhysioNet/CinC Challenge 2012 event-1 score min(Se, +P) of the model's own binary decision,
  the argmax of the logits, i.e. P(y=1) > 0.5. The threshold is NOT tuned on the evaluation set (that would
  flatter the model); a model that never predicts the event scores 0 (+P of no positive prediction is taken as 0).
Each is None when it is undefined (a multi-class task, or an evaluation set with a single class).
"""

from __future__ import annotations

import numpy as np

SCORES = ("auroc", "auprc", "min_se_ppv")


def cross_entropy_accuracy(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) from logits, computed stably in float64."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(y).astype(np.int64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -float(np.mean(logp[np.arange(len(y)), y]))
    return loss, float(np.mean(np.argmax(logits, axis=1) == y))


def _binary(y_true: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true).astype(np.int64).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("binary scores need labels in {0, 1}")
    return y


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    v = np.asarray(values, np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], v.size]
    ranks = np.empty(v.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of `score` (higher = class 1); None when y_true holds a single class."""
    y = _binary(y_true)
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return None
    ranks = average_ranks(score)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def auprc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision: sum over the distinct score thresholds of (recall step) x precision; None without a
    positive."""
    y = _binary(y_true)
    if y.sum() == 0:
        return None
    s = np.asarray(score, np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, ys = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]   # last index of each distinct threshold
    tps = np.cumsum(ys)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_ppv(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float | None, float]:
    """(Se = TP / (TP + FN), +P = TP / (TP + FP)) of binary predictions; Se is None without a positive, +P is 0
    without a positive prediction."""
    y, p = _binary(y_true), _binary(y_pred)
    tp = int(np.sum((y == 1) & (p == 1)))
    se = tp / int(y.sum()) if y.sum() else None
    ppv = tp / int(p.sum()) if p.sum() else 0.0
    return se, ppv


def min_se_ppv(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """The PhysioNet/CinC 2012 event-1 score min(Se, +P) of binary predictions (None without a positive)."""
    se, ppv = sensitivity_ppv(y_true, y_pred)
    return None if se is None else float(min(se, ppv))


def binary_scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """{auroc, auprc, min_se_ppv} of two-class logits (module docstring); every value None for other tasks."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] != 2:
        return dict.fromkeys(SCORES)
    score = z[:, 1] - z[:, 0]
    return {"auroc": auroc(y, score), "auprc": auprc(y, score),
            "min_se_ppv": min_se_ppv(y, np.argmax(z, axis=1))}


def evaluate_logits(logits: np.ndarray, y: np.ndarray) -> tuple[float, float, dict[str, float | None]]:
    """(loss, accuracy, binary scores): what an evaluation hook returns (cloud.engine)."""
    loss, acc = cross_entropy_accuracy(logits, y)
    return loss, acc, binary_scores(logits, y)


def top_class_share(logits: np.ndarray) -> float:
    """The largest share of the rows predicted as one class (1.0 = a constant prediction)."""
    pred = np.argmax(np.asarray(logits), axis=1)
    return float(np.bincount(pred).max() / len(pred)) if len(pred) else 0.0


DEGENERATE_SHARE = 0.99     # a model predicting one class for >= 99 % of the test set
DEGENERATE_AUROC = 0.02     # or whose AUROC is within this of 0.5


def degenerate(share: float | None, auroc: float | None = None) -> str:
    """"" for a model that discriminates, else why it looks like a silent failure (one line)."""
    why = []
    if share is not None and share >= DEGENERATE_SHARE:
        why.append(f"predicts one class for {100 * share:.1f}% of the test set")
    if auroc is not None and abs(auroc - 0.5) <= DEGENERATE_AUROC:
        why.append(f"AUROC {auroc:.3f} is within {DEGENERATE_AUROC} of chance")
    return ("DEGENERATE MODEL: " + " and ".join(why)) if why else ""


def split_evaluation(result: tuple | None) -> tuple[float | None, float | None, dict[str, float | None]]:
    """An evaluation hook's result, (loss, accuracy) or (loss, accuracy, scores), as (loss, accuracy, scores with
    every key of SCORES)."""
    if result is None:
        return None, None, dict.fromkeys(SCORES)
    loss, acc, *rest = result
    scores = dict.fromkeys(SCORES)
    if rest and rest[0]:
        scores.update({k: rest[0].get(k) for k in SCORES})
    return loss, acc, scores
