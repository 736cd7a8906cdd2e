"""Federated standardisation before training: a statistics round through the tiers' own engines.

The round is the daemons' own: its settings come from cloud.statistics (`statistics_settings`, and
`histogram_settings` for the optional second round), so the announcement says `statistics = "summary"` (or
"histogram"). Each site computes `protocol.features.site_summary` of its raw rows (per-row averages of the
sufficient statistics: observed fraction, sum, sum of squares per feature) and sends it as an ordinary signed
DeviceUpdate (`device.update.build_update`, dense float32, num_samples = its rows). Each edge's own
`edge.engine.EdgeEngine`, in its default configuration, closes it on its statistics path (the exact row-weighted
mean: no filters, bounds or weighting scheme) and forwards a signed EdgeAggregate; the cloud's
`cloud.engine.CloudEngine` (strategy fedavg, server step 1 from a zero model) takes the sample-weighted mean over
edges. The result is the
pooled per-row statistics: sum_i n_i s_i / N. No site's summary leaves its edge (the edge forwards only the
weighted mean of its sites); under secure aggregation the edge does not see a site's summary either (the masked
sum of `n_i * s_i` is the same weighted sum; `masked_pool` runs that with the real SecAgg client and server).

`federated_standardize(fed)` runs the round (and, with `quantile`, a second histogram round for clipping bounds)
and returns the federation with every client's and the test set's features transformed, and `fed.transform` set:
the JSON form that goes into the model bundle's manifest.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from cloud.config import PrivacyConfig, RoundSettings
from cloud.engine import CloudEngine
from cloud.statistics import histogram_settings, statistics_settings
from device.training import LocalResult
from device.update import RoundIdentity, build_update
from edge.config import EdgeConfig
from edge.engine import EdgeEngine
from experiments.datasets import Federation
from protocol import signing
from protocol.compression import CompressionSettings
from protocol.features import FeatureSchema, FeatureTransform, site_histogram, site_summary
from protocol.messages import (
    Capability,
    EdgeAggregate,
    GlobalModel,
    RoundAnnouncement,
    decode,
    encode,
    sign_message,
)

QUIET = logging.getLogger("experiments.sim.statistics")
QUIET.setLevel(logging.ERROR)


def base_settings(sites: list[tuple[str, str, np.ndarray, int]], seed: int = 0) -> RoundSettings:
    """The training run's RoundSettings that cloud.statistics turns into a statistics round's (edges and devices of
    `sites`)."""
    return RoundSettings(model="statistics", edges=tuple(sorted({e for _, e, _, _ in sites})), rounds=1,
                         round_timeout_s=60.0, grace_s=0.0, devices=tuple(d for d, _, _, _ in sites), seed=seed,
                         privacy=PrivacyConfig(1e-5))


def statistics_round(sites: list[tuple[str, str, np.ndarray, int]], settings: RoundSettings, seed: int = 0,
                     workdir: Path | None = None) -> tuple[np.ndarray, int, dict]:
    """sites: (device id, edge id, statistics vector, rows); `settings`: cloud.statistics' statistics_settings or
    histogram_settings of base_settings(sites). -> (the cloud's pooled vector, total rows, a report: bytes up per
    site and per edge, devices per edge)."""
    rng = np.random.default_rng(seed)
    tmp = tempfile.TemporaryDirectory(prefix="fediomt-stats-") if workdir is None else None
    root = Path(tmp.name) if tmp else Path(workdir)
    try:
        n_params = len(sites[0][2])
        edges = list(settings.edges)
        cloud_key = signing.generate_signing_key()
        edge_keys = {e: signing.generate_signing_key() for e in edges}
        device_keys = {d: signing.generate_signing_key() for d, _, _, _ in sites}
        keys = root / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        signing.save_public_key(cloud_key.public_key(), keys / "cloud.pub")
        for d, e, _, _ in sites:
            (root / "enrol" / e).mkdir(parents=True, exist_ok=True)
            signing.save_public_key(device_keys[d].public_key(), root / "enrol" / e / f"{d}.pub")
        now = 1_000.0
        cloud = CloudEngine(settings, cloud_key, lambda e: edge_keys[e].public_key(),
                            np.zeros(n_params, np.float32), root / "cloud", rng=rng, log=QUIET)
        cloud.start(now)
        gm_bytes, ann_bytes = cloud.model_payload, cloud.announcement_payload
        gm, ann = decode(gm_bytes, expect=GlobalModel), decode(ann_bytes, expect=RoundAnnouncement)
        clock = {"now": now}
        engines = {}
        for e in edges:
            signing.save_private_key(edge_keys[e], keys / f"{e}.key")
            cfg = EdgeConfig(edge_id=e, state_dir=root / "edges" / e, enrolment_dir=root / "enrol" / e,
                             signing_key=keys / f"{e}.key", cloud_public_key=keys / "cloud.pub")   # the defaults
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            engines[e] = EdgeEngine(cfg, log=QUIET, clock=lambda: clock["now"], rng=rng)
            engines[e].handle_cloud("model", gm_bytes)
            engines[e].handle_cloud("round", ann_bytes)
        dense = CompressionSettings.from_dict(ann.compression)
        published: dict[str, list[bytes]] = {e: [] for e in edges}
        report: dict = {"site_bytes": {}, "edge_devices": {}}
        for d, e, vector, rows in sites:
            result = LocalResult(np.asarray(vector, np.float32), int(rows), 1, 0.0, 1.0, 0.0, 0.0)
            out = build_update(result, RoundIdentity(d, e, ann.round_id, gm.model_version), dense, history=(),
                               residual=None, control=None, delta=1e-5, accountant_name="rdp",
                               capability=Capability("server", 1024, 1e6, 1.0), n_params=n_params, rng=rng,
                               nonce=rng.bytes(16), timestamp=clock["now"])
            data = encode(sign_message(out.update, device_keys[d]))
            report["site_bytes"][d] = len(data)
            ack, pubs = engines[e].handle_update(d, data)
            if ack is None or not ack.accepted:
                raise RuntimeError(f"statistics round: the edge refused {d}'s summary ({ack})")
            published[e] += [p.payload for p in pubs]
        clock["now"] = ann.deadline
        for e in edges:
            published[e] += [p.payload for p in engines[e].tick(clock["now"])]
            (payload,) = [p for p in published[e] if _is_aggregate(p)]
            agg = decode(payload, expect=EdgeAggregate)
            report["edge_devices"][e] = agg.num_devices
            report.setdefault("edge_bytes", {})[e] = len(payload)
            for receipt in cloud.handle_aggregate(e, payload):
                engines[e].handle_receipt(receipt.payload)
        cloud.tick(clock["now"])
        pooled = np.asarray(cloud.state.server.weights, np.float64)
        return pooled, sum(int(r) for _, _, _, r in sites), report
    finally:
        if tmp:
            tmp.cleanup()


def _is_aggregate(payload: bytes) -> bool:
    try:
        decode(payload, expect=EdgeAggregate)
    except Exception:
        return False
    return True


def masked_pool(sites: list[tuple[str, np.ndarray, int]], bits: int = 24, clip: np.ndarray | None = None,
                seed: int = 0) -> tuple[np.ndarray, int]:
    """The same pooling under secure aggregation (protocol.secagg, real client and server state machines): each
    site masks n_i * s_i (its totals) and its row count; the edge learns only the sums. Returns (pooled per-row
    vector, total rows)."""
    from protocol.secagg.config import SecAggConfig
    from protocol.secagg.inprocess import run_cohort

    rng = np.random.default_rng(seed)
    totals = {d: np.append(np.asarray(v, np.float64) * n, n) for d, v, n in sites}
    # the declared per-coordinate bounds of a site's totals (an operator's setting: the largest site's rows for the
    # counts, its largest sums; `clip` gives them, else they are taken from the data, as a test does)
    bound = np.asarray(clip, np.float64) if clip is not None else \
        np.max([np.abs(t) for t in totals.values()], axis=0) * 1.01 + 1e-9
    keys = {d: signing.generate_signing_key() for d, _, _ in sites}
    config = SecAggConfig(clip=1.0, bits=bits, min_cohort=min(len(sites), 2))
    vectors = {d: (t / bound).astype(np.float32) for d, t in totals.items()}
    result = run_cohort(vectors, keys, config, rng=rng)
    summed = np.asarray(result.sum, np.float64) * bound
    n = float(summed[-1])
    return summed[:-1] / n, int(round(n))


def federated_standardize(fed: Federation, seed: int = 0, clip_z: float = 5.0, quantile: float = 0.0,
                          verbose: bool = True) -> Federation:
    """The federation with features standardised by the federated statistics (module docstring). Needs a loader
    that kept raw features (`fed.schema` set, NaN for missing)."""
    if fed.schema is None:
        raise ValueError(f"{fed.name}: no raw-feature schema; this loader already scaled its features")
    schema = FeatureSchema.from_dict(fed.schema)
    sites = []
    for c in fed.clients:
        vector, rows = site_summary(c.x)
        sites.append((c.id, c.edge, vector, rows))
    base = base_settings(sites, seed)
    pooled, count, report = statistics_round(sites, statistics_settings(base, schema), seed)
    provenance = {"rounds": 1, "sites": len(sites), "edges": len(fed.edges), "central_noise": 0.0,
                  "bytes_up": sum(report["site_bytes"].values()) + sum(report.get("edge_bytes", {}).values())}
    transform = FeatureTransform.from_summary(schema, pooled, count, clip_z=clip_z, provenance=provenance)
    if quantile > 0:
        hist_sites = [(c.id, c.edge, *site_histogram(c.x, transform)) for c in fed.clients]
        pooled_hist, _, _ = statistics_round(hist_sites, histogram_settings(base, transform), seed + 1)
        transform = transform.with_quantile_clip(pooled_hist, quantile)
        transform = replace(transform, provenance=dict(transform.provenance, rounds=2))
    if verbose:
        print(f"{fed.name}: federated standardisation from {len(sites)} sites ({count} rows) through "
              f"{len(fed.edges)} edges, {provenance['bytes_up']} bytes up"
              + (f", clipped at the {quantile:g}/{1 - quantile:g} quantiles" if quantile > 0 else ""),
              file=sys.stderr)
    clients = [replace(c, x=transform.apply(c.x)) for c in fed.clients]
    return replace(fed, clients=clients, x_test=transform.apply(fed.x_test), transform=transform.to_dict())


def no_standardize(fed: Federation) -> Federation:
    """The ablation: raw features, missing values imputed with 0 (what an unscaled pipeline feeds the model)."""
    clients = [replace(c, x=np.nan_to_num(c.x).astype(np.float32)) for c in fed.clients]
    return replace(fed, clients=clients, x_test=np.nan_to_num(fed.x_test).astype(np.float32))
