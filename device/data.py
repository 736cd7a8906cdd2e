"""Local training data (documented in docs/device.md).

A directory with `train.npz` (`x`: float32 of shape (n, *model input), `y`: integer class labels) and/or
`train.csv` (a header row, feature columns, and a `label` column; the features of a row are reshaped to the
model input) -- both are concatenated when both exist. When the installed bundle carries the federation's feature
transform (manifest `features`, protocol.features), `train.csv` holds the RAW export: its columns are picked by
name (schema order; extra columns ignored), missing markers NA / empty / ? and thousands separators are read
(protocol.tabular) and the transform standardises them exactly as the cloud did; a malformed cell is a TableError
naming file, column and row. Or a PhysioNet 2012-format set (protocol.physionet2012: record files and an outcomes
file), whose per-stay features are raw with missing values, so it needs the federation's transform, which picks
its columns by name (`feature_names()`). Or a live feed: an entry point "module:function" that returns (x, y) and
is called at every round. Everything is checked against the model before training.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from device.config import DataConfig
from protocol.features import FeatureSchema, FeatureTransform
from protocol.physionet2012 import feature_names, load_physionet2012
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


def _physionet(cfg: DataConfig, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray]:
    """(raw features over `schema`'s columns, NaN = missing; in-hospital death labels) of the configured set."""
    if schema.categorical:
        raise ValueError(f"{cfg.physionet}: PhysioNet features are numeric; the schema has categorical columns")
    names = {name: i for i, name in enumerate(feature_names())}
    unknown = [c for c in schema.numeric if c not in names]
    if unknown:
        raise ValueError(f"{cfg.physionet}: no PhysioNet 2012 feature named {unknown[:5]} (see feature_names())")
    source = Path(cfg.physionet)
    x, y = _read_set(str(source), str(cfg.outcomes or ""), source.stat().st_mtime_ns)
    return x[:, [names[c] for c in schema.numeric]], y


@lru_cache(maxsize=2)
def _read_set(source: str, outcomes: str, stamp: int) -> tuple[np.ndarray, np.ndarray]:
    """Parsed once, and again when the set changes (`stamp`: its mtime, which adding a record changes)."""
    x, y, _ = load_physionet2012(source, outcomes or None)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def load_raw(cfg: DataConfig, schema: FeatureSchema) -> np.ndarray:
    """The raw (rows, model inputs) float64 matrix of the local train.csv (or PhysioNet set) over the federation's
    `schema`, NaN for a missing cell: what a statistics round summarises (protocol.features.site_summary;
    docs/protocol.md "Statistics rounds"). Only raw exports can be summarised (train.npz holds scaled inputs)."""
    if cfg.physionet is not None:
        return _physionet(cfg, schema)[0]
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
    elif cfg.physionet is not None:
        if not features:
            raise ValueError(f"{cfg.physionet}: a PhysioNet set holds raw values with missing ones; it needs the "
                             "federation's feature transform (a statistics round's, or the bundle's)")
        transform = FeatureTransform.from_dict(features)
        x, y = _physionet(cfg, transform.schema)
        parts = [(transform.apply(x), y)]
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
