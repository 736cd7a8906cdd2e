"""The cloud's statistics round (docs/protocol.md "Statistics rounds"): federated standardisation before training.

`statistics_settings(settings, schema)` turns the training run's RoundSettings into those of the one statistics
round: model `feature-statistics` (protocol.features.STATISTICS_MODEL) with 3 values per model input, round and
version 0 (the training rounds start at 1, so edges and devices see one increasing sequence), strategy fedavg from a
zero model with server step 1 (the new "weights" are the sample-weighted mean of the edges' aggregates), dense
float32, no central DP, no secure aggregation, admission bounds off, and the announcement's `statistics = "summary"`
with the schema's JSON in `features`, plus the declared feature `bounds` and the sites' `noise_mult` when [features]
sets them (each site then clips to the bounds, computes its statistics on the unit scale and adds Gaussian noise,
spending Entry(noise_mult, 1, 1) of its example-level budget). A plain `cloud.engine.CloudEngine` runs it
(run_dir/statistics: its own checkpoint, so a crash resumes it); `derive` turns the closed round into the
FeatureTransform that the training rounds announce and the cloud's bundles carry. The same construction as
experiments/sim/statistics.py, which runs it in the simulator.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cloud.config import BoundsConfig, CentralDPConfig, PrivacyConfig, RoundSettings, StrategyConfig
from protocol.compression import CompressionSettings
from protocol.features import STATISTICS_MODEL, FeatureSchema, FeatureTransform, histogram_size, summary_size
from protocol.messages import TrainingPlan
from protocol.secagg.deploy import statistics_table

FEATURES_FILE = "features.json"   # run_dir/features.json: the derived transform (to_dict), written once
STATISTICS_DIR = "statistics"     # run_dir/statistics: the statistics round's CloudEngine run directory
HISTOGRAM_DIR = "statistics-histogram"   # run_dir/statistics-histogram: the optional second round's
SUMMARY_FILE = "summary-transform.json"  # in STATISTICS_DIR: the first round's transform, kept for the second


def statistics_settings(settings: RoundSettings, schema: FeatureSchema, bounds: list[list[float]] | None = None,
                        noise_mult: float = 0.0, secagg: dict | None = None,
                        site_rows_max: int = 0) -> RoundSettings:
    """The statistics round's RoundSettings (module docstring); edges, devices, timeouts and run id are kept. With
    `secagg` (a [secagg] table) the sites mask their totals / `site_rows_max` (statistics_table)."""
    features, table = _protected({**schema.to_dict(), **({"bounds": bounds} if bounds else {})},
                                 summary_size(schema.n_features), settings, noise_mult, secagg, site_rows_max)
    return dataclasses.replace(
        settings, model=STATISTICS_MODEL, rounds=1, first_round=0, strategy=StrategyConfig("fedavg", {}),
        plan=TrainingPlan(lr=0.0, local_epochs=1, batch_size=1, clip=0.0, noise_mult=0.0),
        compression=CompressionSettings(method="dense", bits=32, entropy=False).to_dict(),
        central_dp=CentralDPConfig(), privacy=PrivacyConfig(settings.privacy.delta, final_pld=False),
        model_encoding="full", secagg=table,
        bounds=BoundsConfig(norm_multiple=0.0, model_ratio=0.0, samples_multiple=0.0,
                            max_samples=settings.bounds.max_samples),
        statistics="summary", features=features)


def histogram_settings(settings: RoundSettings, transform: FeatureTransform, noise_mult: float = 0.0,
                       secagg: dict | None = None, site_rows_max: int = 0) -> RoundSettings:
    """The optional second statistics round (round and version 1): the sites' z-score histograms
    (protocol.features.site_histogram) under the first round's `transform`, which `features` carries."""
    features, table = _protected(transform.to_dict(), histogram_size(transform.n_features), settings, noise_mult,
                                 secagg, site_rows_max)
    return dataclasses.replace(statistics_settings(settings, transform.schema), first_round=1,
                               statistics="histogram", secagg=table, features=features)


def _protected(features: dict, n_values: int, settings: RoundSettings, noise_mult: float, secagg: dict | None,
               site_rows_max: int) -> tuple[str, dict | None]:
    """A statistics round's announced `features` (JSON) with the sites' noise and masking scale added, and its
    secagg table (None: plaintext to the edge)."""
    features = {**features, **({"noise_mult": float(noise_mult)} if noise_mult > 0 else {}),
                **({"site_rows_max": int(site_rows_max)} if secagg is not None else {})}
    table = None if secagg is None else statistics_table(secagg, n_values, len(settings.devices), site_rows_max)
    return json.dumps(features, separators=(",", ":")), table


def initial(schema: FeatureSchema) -> np.ndarray:
    return np.zeros(summary_size(schema.n_features), np.float32)


def derive(pooled: np.ndarray, rows: int, schema: FeatureSchema, clip_z: float, provenance: dict,
           bounds: list[list[float]] | None = None) -> FeatureTransform:
    """The transform from the statistics round's new "weights" (the pooled per-row statistics, on the unit scale
    of `bounds` when the round declared them) and its rows."""
    return FeatureTransform.from_summary(schema, np.asarray(pooled, np.float64), rows, bounds=bounds, clip_z=clip_z,
                                         provenance=provenance)


def load_transform(run_dir: str | Path) -> FeatureTransform | None:
    path = Path(run_dir) / FEATURES_FILE
    return FeatureTransform.from_dict(json.loads(path.read_text())) if path.exists() else None


def announced(transform: FeatureTransform) -> str:
    """The transform as RoundAnnouncement.features (compact JSON)."""
    return json.dumps(transform.to_dict(), separators=(",", ":"))
