"""Local training data (documented in docs/device.md).

A directory with `train.npz` (`x`: float32 of shape (n, *model input), `y`: integer class labels) and/or
`train.csv` (a header row, numeric feature columns, and a `label` column; the features of a row are reshaped to the
model input) -- both are concatenated when both exist. Or a live feed: an entry point "module:function" that
returns (x, y) and is called at every round. Everything is checked against the model before training.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import numpy as np

from device.config import DataConfig


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        if "label" not in header:
            raise ValueError(f"{path}: no `label` column")
        li = header.index("label")
        rows = [[float(v) for v in row] for row in reader if row]
    table = np.asarray(rows, np.float64).reshape(len(rows), len(header))
    return np.delete(table, li, axis=1).astype(np.float32), table[:, li].astype(np.int64)


def _entry_point(spec: str):
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"data.entry_point {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), func)


def load_data(cfg: DataConfig, input_shape: tuple[int, ...], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (n, *input_shape), y int32) from the configured source, validated."""
    if cfg.entry_point:
        x, y = _entry_point(cfg.entry_point)()
        parts = [(np.asarray(x), np.asarray(y))]
    else:
        parts = []
        if (cfg.dir / "train.npz").exists():
            with np.load(cfg.dir / "train.npz", allow_pickle=False) as npz:
                parts.append((npz["x"], npz["y"]))
        if (cfg.dir / "train.csv").exists():
            parts.append(_read_csv(cfg.dir / "train.csv"))
        if not parts:
            raise FileNotFoundError(f"{cfg.dir}: neither train.npz nor train.csv")
    xs = [np.asarray(x, np.float32).reshape(len(x), *input_shape) for x, _ in parts]
    ys = [np.asarray(y).reshape(-1) for _, y in parts]
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} examples but {len(y)} labels")
    if not np.all(np.isfinite(x)):
        raise ValueError("training features contain NaN or Inf")
    if y.size and (not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be integers in [0, {n_classes})")
    return x, y.astype(np.int32)
