"""Membership inference against a trained model, on balanced members / non-members (50% = chance).

- Loss threshold (Yeom et al. 2018): "member" when the example's loss is below a threshold. The threshold is the
  one that best separates the shadow models' own members and non-members (the attacker cannot look at the
  target's); `oracle_threshold` also reports the best threshold chosen ON the target's members/non-members, an
  upper bound for any loss-threshold attacker.
- Shadow models (Shokri et al. 2017): the attacker trains shadow models like the target on disjoint data from the
  same distribution, labels their outputs on their own training data "in" and on held-out data "out", and fits an
  attack classifier (a 16-unit MLP) on (sorted softmax vector, loss); it is then applied to the target's outputs.
Pure functions over logits and labels: what produces the logits (a TFLite model) is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def losses(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy."""
    p = softmax(logits)
    return -np.log(np.maximum(p[np.arange(len(y)), y], 1e-300))


def features(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shokri's attack input: the softmax vector sorted descending, plus the true-label loss."""
    return np.column_stack([-np.sort(-softmax(logits), axis=1), losses(logits, y)])


def balance(n_members: int, n_nonmembers: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of equally many members and non-members (a random subset of the larger side)."""
    k = min(n_members, n_nonmembers)
    return np.sort(rng.choice(n_members, k, replace=False)), np.sort(rng.choice(n_nonmembers, k, replace=False))


def best_threshold(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """The loss threshold with the highest balanced accuracy on these two sets."""
    scores = np.concatenate([member_loss, nonmember_loss])
    labels = np.concatenate([np.ones(len(member_loss)), np.zeros(len(nonmember_loss))])
    order = np.argsort(scores, kind="stable")
    s, lab = scores[order], labels[order]
    tpr = np.cumsum(lab) / max(lab.sum(), 1)              # members with loss <= s[i]
    fpr = np.cumsum(1 - lab) / max((1 - lab).sum(), 1)
    acc = 0.5 * (tpr + 1 - fpr)
    acc[:-1][s[:-1] == s[1:]] = 0.0      # a threshold must take all tied losses on the same side
    i = int(np.argmax(acc))
    return float(s[i]) if acc[i] > 0.5 else float(-np.inf)


def threshold_accuracy(member_loss: np.ndarray, nonmember_loss: np.ndarray, threshold: float) -> float:
    """Balanced accuracy of 'member iff loss <= threshold'."""
    return 0.5 * (float(np.mean(member_loss <= threshold)) + float(np.mean(nonmember_loss > threshold)))


@dataclass(frozen=True)
class Outputs:
    """A model's logits on members and non-members (already balanced) with their labels."""

    member_logits: np.ndarray
    member_y: np.ndarray
    nonmember_logits: np.ndarray
    nonmember_y: np.ndarray


def loss_threshold_attack(target: Outputs, shadows: list[Outputs]) -> dict[str, float]:
    """{"loss_threshold": accuracy with the shadow-calibrated threshold, "oracle_threshold": best on the target}."""
    shadow_in = np.concatenate([losses(s.member_logits, s.member_y) for s in shadows])
    shadow_out = np.concatenate([losses(s.nonmember_logits, s.nonmember_y) for s in shadows])
    t_in, t_out = losses(target.member_logits, target.member_y), losses(target.nonmember_logits, target.nonmember_y)
    return {"loss_threshold": threshold_accuracy(t_in, t_out, best_threshold(shadow_in, shadow_out)),
            "oracle_threshold": threshold_accuracy(t_in, t_out, best_threshold(t_in, t_out))}


def shadow_attack(target: Outputs, shadows: list[Outputs], seed: int = 0) -> float:
    """Accuracy of Shokri et al.'s attack classifier (a small neural network on `features`) on the target."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([np.concatenate([features(s.member_logits, s.member_y),
                                        features(s.nonmember_logits, s.nonmember_y)]) for s in shadows])
    y = np.concatenate([np.concatenate([np.ones(len(s.member_y)), np.zeros(len(s.nonmember_y))]) for s in shadows])
    clf = make_pipeline(StandardScaler(), MLPClassifier((16,), max_iter=500, random_state=seed)).fit(x, y)
    pred_in = clf.predict(features(target.member_logits, target.member_y))
    pred_out = clf.predict(features(target.nonmember_logits, target.nonmember_y))
    return 0.5 * (float(np.mean(pred_in == 1)) + float(np.mean(pred_out == 0)))
