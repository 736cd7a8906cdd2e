"""MIMIC-III in-hospital-mortality benchmark (mimic3-benchmarks layout): `{train,test}/listfile.csv` (`stay,y_true`)
and one `<SUBJECT>_episode<N>_timeseries.csv` per stay (`Hours,<variable>,...`, empty = missing, Glasgow coma
scale cells are text like "4 Spontaneously": the leading number is the score). Credentialed data: this project
ships only the loader and a test fixture in the exact format, never the data.

Features per stay and variable over hours 0-48: first, last, min, max, mean, count, plus a missingness indicator.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

STATS = ("first", "last", "min", "max", "mean", "count")


def _number(cell: str) -> float:
    cell = cell.strip()
    if not cell:
        return np.nan
    head = cell.split()[0]
    try:
        return float(head)
    except ValueError:
        return np.nan  # categorical text without a score (e.g. capillary refill "normal")


def read_stay(path: Path, variables: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    if not header or header[0] != "Hours":
        raise ValueError(f"{path}: header must start with Hours")
    variables = variables or header[1:]
    col = {name: i for i, name in enumerate(header)}
    table = [(float(r[0]), r) for r in rows[1:] if r and r[0].strip()]
    table = [(h, r) for h, r in table if 0 <= h <= 48]
    feats = []
    for name in variables:
        values = np.array([_number(r[col[name]]) for _, r in table if name in col and col[name] < len(r)])
        values = values[~np.isnan(values)] if len(values) else values
        if len(values):
            feats += [values[0], values[-1], values.min(), values.max(), values.mean(), float(len(values)), 0.0]
        else:
            feats += [np.nan] * 5 + [0.0, 1.0]
    return variables, np.array(feats, np.float64)


def load_mimic3_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> (features with NaN for missing, labels, variable names) for `split` ("train" or "test")."""
    folder = Path(root) / split
    with open(folder / "listfile.csv", newline="") as f:
        entries = [(r["stay"], int(r["y_true"])) for r in csv.DictReader(f)]
    variables: list[str] | None = None
    xs, ys = [], []
    for stay, label in entries:
        variables, feats = read_stay(folder / stay, variables)
        xs.append(feats)
        ys.append(label)
    return np.stack(xs), np.array(ys, np.int64), variables or []
