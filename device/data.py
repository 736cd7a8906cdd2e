"""Local training data (documented in docs/device.md).

A directory with `train.npz` (`x`: float32 of shape (n, *model input), `y`: integer class labels) and/or
`train.csv` (a header row, feature columns, and a `label` column; the features of a row are reshaped to the
model input) -- both are concatenated when both exist. When the installed bundle carries the federation's feature
transform (manifest `features`, protocol.features), `train.csv` holds the RAW export: its columns are picked by
name (schema order; extra columns ignored), missing markers NA / empty / ? and thousands separators are read
(protocol.tabular) and the transform standardises them exactly as the cloud did; a malformed cell is a TableError
naming file, column and row. Or a live feed: an entry point "module:function" that
returns (x, y) and is called at every round. Everything is checked against the model before training.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from device.config import DataConfig
from protocol.features import FeatureSchema, FeatureTransform
from protocol.tabular import ReadOptions, numeric_column, read_table


def _read_csv(path: Path, features: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    table = read_table(path, ReadOptions(missing=(), thousands=""))
    labels = numeric_column(table, "label", ReadOptions(missing=(), thousands=""))
    y = np.asarray(labels, np.float64)
    if features:
        transform = FeatureTransform.from_dict(features)
        return transform.transform_table(table), y
    strict = ReadOptions(missing=(), thousands="")   # already-scaled numbers: every cell must be one
    cols = [numeric_column(table, c, strict) for c in table.columns if c != "label"]
    return np.asarray(cols, np.float64).T.reshape(len(y), -1).astype(np.float32), y


def load_raw(cfg: DataConfig, schema: FeatureSchema) -> np.ndarray:
    """The raw (rows, model inputs) float64 matrix of the local train.csv over the federation's `schema`, NaN for
    a missing cell: what a statistics round summarises (protocol.features.site_summary; docs/protocol.md
    "Statistics rounds"). Only a raw CSV export can be summarised (train.npz holds already-scaled inputs)."""
    path = Path(cfg.dir) / "train.csv"
    if cfg.entry_point or not path.exists():
        raise FileNotFoundError(f"{path}: a statistics round needs the raw local export as train.csv")
    x = schema.encode(read_table(path))
    if len(x) == 0:
        raise ValueError(f"{path}: no rows")
    return x


def _entry_point(spec: str):
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"data.entry_point {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), func)


def load_data(cfg: DataConfig, input_shape: tuple[int, ...], n_classes: int,
              features: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (n, *input_shape), y int32) from the configured source, validated; `features`: the bundle
    manifest's feature transform, applied to a raw train.csv."""
    if cfg.entry_point:
        x, y = _entry_point(cfg.entry_point)()
        parts = [(np.asarray(x), np.asarray(y))]
    else:
        parts = []
        if (cfg.dir / "train.npz").exists():
            with np.load(cfg.dir / "train.npz", allow_pickle=False) as npz:
                parts.append((npz["x"], npz["y"]))
        if (cfg.dir / "train.csv").exists():
            parts.append(_read_csv(cfg.dir / "train.csv", features))
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
