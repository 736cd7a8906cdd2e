"""PhysioNet/CinC Challenge 2012 (set-a: 4,000 ICU stays, in-hospital mortality) as a federation, one site per ICU
type. The records are read by protocol.physionet2012 (the format, shared with the device agent). Missing values
become 0 after standardisation with statistics of the training rows only (`standardize`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.datasets.federation import Client, Federation
from protocol.physionet2012 import ICU_TYPES, feature_names, load_physionet2012


def standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-score with training statistics; missing (NaN) -> 0, i.e. the training mean (indicators keep the fact)."""
    mean = np.nanmean(x_train, axis=0)
    std = np.nanstd(x_train, axis=0)
    mean, std = np.nan_to_num(mean), np.where(np.nan_to_num(std) > 1e-9, np.nan_to_num(std), 1.0)
    return [np.nan_to_num((x - mean) / std).astype(np.float32) for x in (x_train, *others)]


def load_physionet_federation(root: str | Path, devices_per_edge: int = 1, test_fraction: float = 0.25,
                              seed: int = 0, outcomes: str | Path | None = None, test_root: str | Path | None = None,
                              test_outcomes: str | Path | None = None, raw: bool = False,
                              stratified: bool = False) -> Federation:
    """One site per ICU type. `test_root` (+ `test_outcomes`): another set as the held-out test set (all of `root`
    trains); else a random `test_fraction` of `root` (`stratified`: the same fraction of every (ICU type, outcome)
    cell, so the test set keeps each site's size and mortality). raw=False: standardised with the pooled training rows
    (`standardize`, the historical figures); raw=True: features kept raw with their schema, for the federated
    standardisation (experiments.sim.statistics)."""
    x, y, icu = load_physionet2012(root, outcomes)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    if test_root is not None:
        x_other, y_other, _ = load_physionet2012(test_root, test_outcomes)
        x_test_raw, y_test = x_other, y_other
    elif stratified:
        for code in np.unique(icu):
            for label in (0, 1):
                members = rng.permutation(np.flatnonzero((icu == code) & (y == label)))
                test[members[: int(round(len(members) * test_fraction))]] = True
        x_test_raw, y_test = x[test], y[test]
    else:
        test[rng.permutation(len(y))[: int(len(y) * test_fraction)]] = True
        x_test_raw, y_test = x[test], y[test]
    if raw:
        x_train, x_test = x[~test], x_test_raw
    else:
        x_train, x_test = standardize(x[~test], x_test_raw)
    y_train, icu_train = y[~test], icu[~test]
    clients = []
    for code, short in ICU_TYPES.items():
        rows = rng.permutation(np.flatnonzero(icu_train == code))
        for i, part in enumerate(np.array_split(rows, devices_per_edge)):
            clients.append(Client(id=f"{short}{i + 1}", edge=short, x=x_train[part], y=y_train[part], site=short))
    schema = {"numeric": feature_names(), "categorical": []} if raw else None
    return Federation(name="physionet2012", clients=clients, x_test=x_test, y_test=y_test, model="vitals_mlp",
                      model_options={"n_features": x.shape[1]}, classes=["survived", "died"], schema=schema)
