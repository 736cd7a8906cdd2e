"""Would richer per-stay features get PhysioNet 2012 near the issue's AUROC 0.85? (issue 15; training rows only)

Beside protocol.physionet2012's features (static descriptors; first, last, min, max, mean and count of each series;
missingness) this adds, per series: standard deviation, mean over hours 24-48 and 0-24, the least-squares slope,
sum (e.g. urine output), median, and min / max over hours 24-48. Scored by 5-fold cross-validation on the training
rows of seed 0's split (the test rows are never read), logistic regression (z-scores clipped at 5) and gradient
boosting (scikit-learn). Run from the repository root, with the shared data beside it:
  .venv/bin/python experiments/results/v3/physionet-features/richer_features.py > .../richer_features.txt
"""
import io
import tarfile
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from protocol.physionet2012 import SERIES, parse_record, read_outcomes

ROOT = Path("../shared/datasets/physionet2012")


def extra_features(text: str) -> list[float]:
    values: dict[str, list[tuple[float, float]]] = {s: [] for s in SERIES}
    for line in text.splitlines()[1:]:
        parts = line.strip().split(",")
        if len(parts) != 3:
            continue
        try:
            hours, minutes = parts[0].split(":")
            t, v = int(hours) + int(minutes) / 60, float(parts[2])
        except ValueError:
            continue
        if parts[1] in values and v >= 0 and t > 0:
            values[parts[1]].append((t, v))
    out: list[float] = []
    for series in SERIES:
        obs = sorted(values[series])
        if not obs:
            out += [np.nan] * 8
            continue
        t, v = np.array([o[0] for o in obs]), np.array([o[1] for o in obs])
        late, early = v[t >= 24], v[t < 24]
        slope = np.polyfit(t, v, 1)[0] if len(v) >= 2 and np.ptp(t) > 0 else np.nan
        out += [v.std(), late.mean() if len(late) else np.nan, early.mean() if len(early) else np.nan, slope,
                v.sum(), float(np.median(v)), late.min() if len(late) else np.nan, late.max() if len(late) else np.nan]
    return out


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    outcomes = read_outcomes(ROOT / "Outcomes-a.txt")
    base, extra, labels = [], [], []
    with tarfile.open(ROOT / "set-a.tar.gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".txt")):
                continue
            text = io.TextIOWrapper(tar.extractfile(member)).read()
            record_id, icu, feats = parse_record(text)
            if record_id in outcomes:
                base.append(np.append(feats, icu))
                extra.append(extra_features(text))
                labels.append(outcomes[record_id])
    return np.array(base), np.array(extra), np.array(labels)


def zscore(a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num((a - mean) / std), -5, 5)


def cv_auroc(x: np.ndarray, y: np.ndarray, model: str) -> list[float]:
    scores = []
    for train, val in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        if model == "logreg":
            mean = np.nan_to_num(np.nanmean(x[train], 0))
            std = np.nanstd(x[train], 0)
            std[~(std > 1e-9)] = 1.0
            fit = LogisticRegression(C=0.05, max_iter=3000).fit(zscore(x[train], mean, std), y[train])
            p = fit.predict_proba(zscore(x[val], mean, std))[:, 1]
        else:
            fit = HistGradientBoostingClassifier(learning_rate=0.05, max_iter=300, max_leaf_nodes=15,
                                                 min_samples_leaf=40, l2_regularization=1.0).fit(x[train], y[train])
            p = fit.predict_proba(x[val])[:, 1]
        scores.append(roc_auc_score(y[val], p))
    return scores


def main() -> None:
    base, extra, y = load()
    test = np.zeros(len(y), bool)   # seed 0's test rows (experiments.datasets.physionet2012), left out
    test[np.random.default_rng(0).permutation(len(y))[: int(len(y) * 0.25)]] = True
    for name, x in (("current features", base), ("current + richer", np.hstack([base, extra]))):
        for model in ("logreg", "gbm"):
            s = cv_auroc(x[~test], y[~test], model)
            print(f"{name:18s} {model:6s} AUROC {np.mean(s):.3f} +- {np.std(s):.3f} (5 folds of the training rows)")


if __name__ == "__main__":
    main()
