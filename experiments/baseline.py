"""The yardsticks: the firmware architecture trained centrally on the pooled data (no privacy, no compression), and
strong non-federated references on the same features, all tuned honestly.

Honest means the test set is looked at once, for the final figures: every choice is made on a validation split
carved from the training data (Federation.validation_split: `val_fraction` of each client's rows of every label,
seeded; the split the federated methods are tuned on).
- `centralized`: Keras, Adam, a learning-rate search over `lrs`, each run early-stopped on the validation loss (the
  weights of the best epoch restored); the learning rate with the lowest validation loss wins, then (refit) the
  model is retrained on all the training data for that many epochs, as the federation trains on all of it.
- `references`: scikit-learn logistic regression (standardised features, C chosen on validation) and gradient
  boosting (HistGradientBoostingClassifier: learning rate and leaves chosen on validation, the number of trees by
  its staged validation loss), refit on all the training data. Inputs are flattened (a watch window is 600
  numbers), so a weak firmware architecture shows against them.
Every result carries accuracy and loss and, for binary tasks, AUROC, AUPRC and the PhysioNet 2012 score
min(Se, +P) (cloud.evaluation; the decision threshold is the model's own 0.5, never tuned on the test set).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from cloud.evaluation import SCORES, evaluate_logits
from experiments.datasets import Federation

LRS = (3e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class Yardstick:
    """One tuned non-federated model's test figures, what validation chose, and its validation loss."""

    method: str                      # "centralized" (the firmware architecture), "logreg", "gbm"
    accuracy: float
    loss: float
    auroc: float | None = None
    auprc: float | None = None
    min_se_ppv: float | None = None
    chosen: dict = field(default_factory=dict)
    val_loss: float | None = None

    def row(self) -> dict:
        return asdict(self)


def tuning_data(fed: Federation, fraction: float = 0.15, seed: int = 0):
    """(x_train, y_train, x_val, y_val): the pooled training rows minus the validation rows of
    Federation.validation_split (the split the federated methods are tuned on: per client and label, windowed series
    lend their last rows so overlapping windows never straddle the two)."""
    tune = fed.validation_split(fraction, seed)
    x, y = tune.pooled()
    return x, y.astype(np.int64), tune.x_test, tune.y_test.astype(np.int64)


def _result(method: str, logits: np.ndarray, y: np.ndarray, chosen: dict, val_loss: float | None) -> Yardstick:
    loss, acc, scores = evaluate_logits(logits, y)
    return Yardstick(method, acc, loss, *(scores[k] for k in SCORES), chosen=chosen,
                     val_loss=None if val_loss is None else float(val_loss))


# ------------------------------------------------------------------ the firmware architecture, centrally
def centralized(fed: Federation, seed: int = 0, lrs: tuple[float, ...] = LRS, max_epochs: int = 100,
                patience: int = 10, batch_size: int = 32, val_fraction: float = 0.15, refit: bool = True) -> Yardstick:
    """The firmware architecture on the pooled data, tuned on a validation split (module docstring)."""
    import keras

    from firmware_models import keras_model

    x_tr, y_tr, x_va, y_va = tuning_data(fed, val_fraction, seed)
    x, y = fed.pooled()
    x, y = x.astype(np.float32), y.astype(np.int64)

    def fit(lr: float, xs, ys, epochs: int, validation=None):
        keras.utils.set_random_seed(seed)
        model = keras_model(fed.model, **fed.model_options)
        model.compile(optimizer=keras.optimizers.Adam(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        stop = [keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)] \
            if validation is not None else []
        hist = model.fit(xs, ys, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True,
                         validation_data=validation, callbacks=stop)
        return model, hist.history.get("val_loss", [])

    best = None   # (val_loss, lr, epochs, model)
    for lr in lrs:
        model, val_losses = fit(lr, x_tr, y_tr, max_epochs, (x_va, y_va))
        finite = [v if math.isfinite(v) else math.inf for v in val_losses]
        epoch = int(np.argmin(finite))
        if best is None or finite[epoch] < best[0]:
            best = (finite[epoch], lr, epoch + 1, model)
    val_loss, lr, epochs, model = best
    if refit:
        model, _ = fit(lr, x, y, epochs)
    logits = model.predict(fed.x_test, verbose=0, batch_size=256)
    return _result("centralized", logits, fed.y_test, {"lr": lr, "epochs": epochs, "refit": refit}, val_loss)


def centralized_accuracy(fed: Federation, seed: int = 0, **options) -> float:
    """Test accuracy of `centralized` (kept for callers that want one number)."""
    return centralized(fed, seed, **options).accuracy


# ------------------------------------------------------------------ scikit-learn references
def _log_proba(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-12, 1.0))


def _val_loss(p: np.ndarray, y: np.ndarray) -> float:
    return evaluate_logits(_log_proba(p), y)[0]


def logistic_regression(fed: Federation, seed: int = 0, cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
                        val_fraction: float = 0.15) -> Yardstick:
    """Standardised features, L2 logistic regression; C chosen by validation loss, refit on all training data."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr, y_tr, x_va, y_va = (a.reshape(len(a), -1) if a.ndim > 1 else a for a in tuning_data(fed, val_fraction, seed))
    x, y = fed.pooled()
    x, y = x.reshape(len(x), -1), y.astype(np.int64)

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))

    scored = [(_val_loss(model(c).fit(x_tr, y_tr).predict_proba(x_va), y_va), c) for c in cs]
    val_loss, c = min(scored)
    final = model(c).fit(x, y)
    return _result("logreg", _log_proba(final.predict_proba(fed.x_test.reshape(len(fed.x_test), -1))), fed.y_test,
                   {"C": c}, val_loss)


def gradient_boosting(fed: Federation, seed: int = 0, learning_rates: tuple[float, ...] = (0.05, 0.1),
                      leaves: tuple[int, ...] = (7, 31), max_iter: int = 300,
                      val_fraction: float = 0.15) -> Yardstick:
    """HistGradientBoostingClassifier: learning rate and leaves by validation loss, the number of trees at the
    lowest staged validation loss; refit on all training data with them."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x_tr, y_tr, x_va, y_va = (a.reshape(len(a), -1) if a.ndim > 1 else a for a in tuning_data(fed, val_fraction, seed))
    x, y = fed.pooled()
    x, y = x.reshape(len(x), -1), y.astype(np.int64)

    def model(lr: float, n_leaves: int, trees: int):
        return HistGradientBoostingClassifier(learning_rate=lr, max_leaf_nodes=n_leaves, max_iter=trees,
                                              early_stopping=False, l2_regularization=1.0, random_state=seed)

    best = None
    for lr in learning_rates:
        for n_leaves in leaves:
            fitted = model(lr, n_leaves, max_iter).fit(x_tr, y_tr)
            losses = [_val_loss(p, y_va) for p in fitted.staged_predict_proba(x_va)]
            trees = int(np.argmin(losses)) + 1
            if best is None or losses[trees - 1] < best[0]:
                best = (losses[trees - 1], lr, n_leaves, trees)
    val_loss, lr, n_leaves, trees = best
    final = model(lr, n_leaves, trees).fit(x, y)
    return _result("gbm", _log_proba(final.predict_proba(fed.x_test.reshape(len(fed.x_test), -1))), fed.y_test,
                   {"learning_rate": lr, "max_leaf_nodes": n_leaves, "max_iter": trees}, val_loss)


def references(fed: Federation, seed: int = 0, quick: bool = False) -> list[Yardstick]:
    """The non-federated references on the same features (logistic regression, gradient boosting)."""
    if quick:
        return [logistic_regression(fed, seed, cs=(0.1, 1.0)),
                gradient_boosting(fed, seed, learning_rates=(0.1,), leaves=(7,), max_iter=30)]
    return [logistic_regression(fed, seed), gradient_boosting(fed, seed)]
