"""Any CSV with a label column and a client/site column: the generic loader for a consortium's own exports."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from experiments.datasets.federation import Client, Federation


def load_csv_federation(path: str | Path, label: str, site: str, test_fraction: float = 0.25, seed: int = 0,
                        edge_column: str | None = None) -> Federation:
    """Numeric feature columns (empty -> column mean of training rows), integer-coded labels, one client per site."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for needed in (label, site):
        if needed not in rows[0]:
            raise ValueError(f"{path}: no column {needed!r}")
    features = [c for c in rows[0] if c not in (label, site, edge_column)]
    x = np.array([[float(r[c]) if r[c].strip() else np.nan for c in features] for r in rows])
    classes = sorted({r[label] for r in rows})
    y = np.array([classes.index(r[label]) for r in rows], np.int64)
    sites = np.array([r[site] for r in rows])
    edges = np.array([r[edge_column] for r in rows]) if edge_column else sites
    rng = np.random.default_rng(seed)
    test = rng.random(len(rows)) < test_fraction
    mean = np.nan_to_num(np.nanmean(x[~test], axis=0))
    x = np.where(np.isnan(x), mean, x).astype(np.float32)
    clients = [Client(id=_safe_id(s), edge=_safe_id(edges[(sites == s) & ~test][0]), x=x[(sites == s) & ~test],
                      y=y[(sites == s) & ~test], site=str(s)) for s in sorted(set(sites[~test]))]
    return Federation(name=Path(path).stem, clients=clients, x_test=x[test], y_test=y[test], model="vitals_mlp"
                      if len(classes) == 2 else "har_mlp", model_options={"n_features": len(features)},
                      classes=classes)


def _safe_id(value: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(value))[:64] or "site"
