"""Federated standardisation run by the real daemons (issue 21): the cloud announces a statistics round before
training, real device processes answer with the per-row statistics of their RAW train.csv, the real edge process
aggregates them with its admission bounds relaxed because the announcement says it is a statistics round, the cloud
derives the pooled transform, announces it in every training round, and the devices train on the standardised
features (docs/protocol.md "Statistics rounds")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protocol.features import FORMAT, STATISTICS_MODEL, FeatureTransform
from protocol.messages import DeviceUpdate, RoundAnnouncement, decode
from protocol.signing import save_private_key, save_public_key
from tests.harness import DEV_PUB, PREBUILT, Fed, rounds_of, start_in_process
from tests.test_features import physionet_set

N_FEATURES = 16
COLUMNS = [f"f{i}" for i in range(N_FEATURES)]
SCALES = np.array([1.0, 250.0, 0.01, 80.0] * 4)       # cholesterol next to flags: what breaks unscaled SGD
ROWS = {"dev-a": 40, "dev-b": 90, "dev-c": 260}          # quantity skew: a samples cap would bias the moments
PHYSIONET_COLUMNS = ["static_Age", "static_Gender", "static_Height", "static_Weight", "HR_first", "HR_last", "HR_min",
                     "HR_max", "HR_mean", "HR_count", "missing_HR", "Temp_first", "Temp_max", "Temp_mean", "Temp_count",
                     "missing_Temp"]   # N_FEATURES of protocol.physionet2012.feature_names()


def raw_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=seed, size=(n, N_FEATURES)) * SCALES + 3.0 * SCALES
    x[rng.random(x.shape) < 0.1] = np.nan                # missing cells, written as NA
    y = (np.nan_to_num(x[:, 1]) > 3.0 * SCALES[1]).astype(int)
    return x, y


def write_csv(path, x: np.ndarray, y: np.ndarray) -> None:
    lines = [",".join([*COLUMNS, "label"])]
    for row, label in zip(x, y):
        lines.append(",".join("NA" if np.isnan(v) else repr(float(v)) for v in row) + f",{label}")
    path.write_text("\n".join(lines) + "\n")


def physionet_rows(folder, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A PhysioNet 2012-format set of n synthetic stays in `folder`; (its raw PHYSIONET_COLUMNS, its labels)."""
    from protocol.physionet2012 import feature_names, load_physionet2012

    rng = np.random.default_rng(seed)
    stays = {}
    for i in range(n):
        rates = list(np.round(rng.normal(80 + 10 * seed, 15, size=rng.integers(0, 6)), 1))
        temps = list(np.round(rng.normal(37.0, 0.8, size=rng.integers(0, 4)), 2))
        static = {"Age": round(float(rng.normal(55 + 5 * seed, 12)), 1), "Gender": int(rng.integers(0, 2)),
                  "Height": round(float(rng.normal(170, 10)), 1), "Weight": round(float(rng.normal(80, 15)), 1)}
        stays[140000 + 1000 * seed + i] = (static, {"HR": rates, "Temp": temps},
                                           int(bool(rates) and max(rates) > 95))
    physionet_set(folder, stays)
    x, y, _ = load_physionet2012(folder)
    return x[:, [feature_names().index(c) for c in PHYSIONET_COLUMNS]], y


def run_federation(tmp_path, broker, daemons, recorder, features: str = "", physionet: bool = False,
                   **device: object):
    """Cloud (in process), the real edge and 3 real devices with raw CSVs (or, `physionet`, PhysioNet 2012-format
    sets): (their data, the derived transform, the edge's announcements, a function returning every log's tail)."""
    from experiments.sandbox import provision

    columns = PHYSIONET_COLUMNS if physionet else COLUMNS

    # the edge: real process, its default admission bounds ON (norm and samples multiples 1)
    fed = Fed(tmp_path / "edge", n_devices=0, broker={"host": broker.host, "port": broker.port},
              bounds={"norm_multiple": 1.0, "samples_multiple": 1.0})
    save_private_key(fed.cloud_key, tmp_path / "cloud.key")
    (tmp_path / "edges").mkdir()
    save_public_key(fed.edge_key.public_key(), tmp_path / "edges" / "edge1.pub")
    data, configs = {}, {}
    for seed, (d, n) in enumerate(ROWS.items()):   # real devices, each with a RAW export (NA markers, unscaled)
        folder = tmp_path / d / "icu"
        data[d] = physionet_rows(folder, n, seed) if physionet else raw_rows(n, seed)
        source = {"data": {"physionet": str(folder)}} if physionet else {}
        configs[d] = provision(tmp_path / d, d, "edge1", PREBUILT / "vitals_mlp", DEV_PUB, tmp_path / "edge" /
                               "cloud.pub", np.zeros((1, len(columns))), np.zeros(1), broker.port,
                               **source, **device)
        (tmp_path / d / "data" / "train.npz").unlink()
        if not physionet:
            write_csv(tmp_path / d / "data" / "train.csv", *data[d])
        (tmp_path / d / f"{d}.pub").replace(tmp_path / "edge" / "enrolment" / f"{d}.pub")
    x_test, y_test = physionet_rows(tmp_path / "holdout-set", 64, 7) if physionet else raw_rows(64, 7)
    np.savez(tmp_path / "holdout.npz", x=x_test.astype(np.float32), y=y_test)   # raw, NaN = missing
    (tmp_path / "schema.json").write_text(json.dumps({"numeric": columns, "categorical": []}))
    config = tmp_path / "cloud.toml"
    config.write_text('run_dir = "run"\nsigning_key = "cloud.key"\nedge_keys_dir = "edges"\n'
                      'eval_data = "holdout.npz"\nmodel = "vitals_mlp"\nrounds = 2\nround_timeout_s = 60.0\n'
                      f'devices = {json.dumps(list(ROWS))}\n'
                      f'[model_options]\nn_features = {len(columns)}\n'
                      f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[strategy]\nname = "fedavg"\n'
                      '[features]\nschema = "schema.json"\nclip_z = 5.0\n' + features)
    seen = recorder(["fl/edge1/round"])
    daemons.process("edge", "run", "--config", str(fed.config), log=tmp_path / "edge.log")
    for d, cfg in configs.items():
        daemons.process("device", "run", "--config", str(cfg), log=tmp_path / f"{d}.log")
    _, thread = start_in_process(config, daemons)

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))

    thread.join(timeout=180)
    assert not thread.is_alive(), logs()
    transform = FeatureTransform.from_dict(json.loads((tmp_path / "run" / "features.json").read_text()))
    return data, transform, [decode(p, expect=RoundAnnouncement) for p in seen.payloads("fl/edge1/round")], logs


def test_statistics_round_through_the_real_daemons(tmp_path, broker, daemons, recorder):
    data, transform, anns, logs = run_federation(tmp_path, broker, daemons, recorder)

    # the statistics round: one round 0 of the statistics model, every device in it, bounds not applied
    stats = rounds_of(tmp_path / "run" / "statistics")
    assert [r["round"] for r in stats] == [0] and stats[0]["num_devices"] == 3, logs()
    edge_events = [json.loads(line) for line in (tmp_path / "edge.log").read_text().splitlines()
                   if line.startswith("{")]
    assert not [e for e in edge_events if e["msg"] == "updates bounded" and e.get("round") == 0]
    assert any(e["msg"] == "aggregate" and e.get("statistics") == "summary" for e in edge_events)
    pooled = np.concatenate([x for x, _ in data.values()])
    assert transform.count == len(pooled) == sum(ROWS.values())
    np.testing.assert_allclose(transform.mean, np.nanmean(pooled, axis=0), rtol=1e-4)
    np.testing.assert_allclose(transform.std, np.nanstd(pooled, axis=0), rtol=1e-3)

    # the announcements: statistics round first (its schema), then training rounds carrying the transform
    assert anns[0].statistics == "summary" and anns[0].model_name == STATISTICS_MODEL and anns[0].round_id == 0
    assert json.loads(anns[0].features) == {"numeric": COLUMNS, "categorical": []}
    training = [a for a in anns if not a.statistics]
    assert training and all(json.loads(a.features)["format"] == FORMAT for a in training)
    assert all(FeatureTransform.from_dict(json.loads(a.features)) == transform for a in training)

    # training: the first round with all three devices, which read their raw CSV through the announced transform
    records = rounds_of(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2], logs()
    assert records[0]["num_devices"] == 3, logs()
    assert all(r["accuracy"] is not None for r in records)
    for d in ROWS:
        log = (tmp_path / f"{d}.log").read_text()
        assert "statistics sent" in log and "update sent" in log, logs()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["finished"] and report["rounds_completed"] == 2


def test_a_dp_statistics_round_is_noised_on_the_unit_scale_and_spent_from_each_devices_budget(
        tmp_path, broker, daemons, recorder):
    """[features] bounds + noise_mult: the announcement carries them, each real device clips its raw rows to the
    bounds, adds Gaussian noise of noise_mult x one record's influence before anything leaves, and persists the
    spend as one Gaussian mechanism, Entry(noise_mult, 1, 1), which its reported epsilon includes; the cloud maps
    the pooled unit-scale statistics back through the bounds."""
    from device.state import load_state
    from protocol import accountant

    lo, hi = 3.0 * SCALES - 5.0 * SCALES, 3.0 * SCALES + 8.0 * SCALES   # every seed's rows (loc 0..2) fit
    bounds = ", ".join(f'{c} = [{float(a)!r}, {float(b)!r}]' for c, a, b in zip(COLUMNS, lo, hi))
    data, transform, anns, logs = run_federation(tmp_path, broker, daemons, recorder,
                                                 f"bounds = {{ {bounds} }}\nnoise_mult = 1.0\n")
    announced = json.loads(anns[0].features)
    assert announced["noise_mult"] == 1.0 and np.allclose(announced["bounds"], np.stack([lo, hi], 1))
    assert transform.provenance["site_noise"] == 1.0 and transform.provenance["bounds"]
    pooled = np.concatenate([x for x, _ in data.values()])
    # 390 rows: the noise (std sqrt(48) per site on the unit-scale totals) leaves the means within ~5 standard
    # errors of 15 % of the declared range; variances need thousands of rows (docs/protocol.md)
    assert np.all(np.abs(np.asarray(transform.mean) - np.nanmean(pooled, 0)) < 0.15 * (hi - lo)), transform.mean
    assert np.all(np.isfinite(transform.std)) and min(transform.std) > 0
    assert not np.allclose(transform.mean, np.nanmean(pooled, 0), rtol=1e-4)   # the noise is really there
    for d in ROWS:
        state = load_state(tmp_path / d / "state" / "state.npz")
        assert state.history[0] == accountant.Entry(1.0, 1.0, 1), (d, state.history[:2])
        stats = [json.loads(line) for line in (tmp_path / f"{d}.log").read_text().splitlines()
                 if line.startswith("{") and json.loads(line)["msg"] == "statistics sent"]
        expected = accountant.epsilon((accountant.Entry(1.0, 1.0, 1),), 1e-5, "rdp")
        assert stats and stats[0]["noise_mult"] == 1.0 and abs(stats[0]["epsilon"] - expected) < 1e-3, logs()


def test_the_demo_writes_raw_exports_a_device_reads_back_exactly(tmp_path):
    """`fediomt demo --data`: each device's train.csv is its site's raw rows (NA for missing, a categorical column
    as its level), which device.data.load_raw reads back over the schema to the very matrix the loader gave."""
    from device.config import DataConfig
    from device.data import load_raw
    from experiments.datasets.federation import Client, Federation
    from fediomt.demo import write_raw_dirs
    from protocol.features import FeatureSchema

    schema = FeatureSchema(("age", "chol"), (("smoker", ("no", "yes")),))
    x = np.array([[61.0, 240.5, 1, 0], [np.nan, 199.0, 0, 1], [47.0, np.nan, 0, 0]])
    fed = Federation(name="t", clients=[Client(id="s1", edge="e1", x=x, y=np.array([0, 1, 0]), site="s1")],
                     x_test=x, y_test=np.zeros(3), model="vitals_mlp", model_options={"n_features": 4},
                     classes=["0", "1"], schema=schema.to_dict())
    dirs = write_raw_dirs(fed, tmp_path)
    np.testing.assert_array_equal(load_raw(DataConfig(dir=dirs["s1"]), schema), x)


def test_a_second_histogram_round_clips_each_input_at_its_pooled_quantiles(tmp_path, broker, daemons, recorder):
    """[features] quantile: after the summary round (0) a histogram round (1) under its transform; the cloud clips
    each input at the pooled q, 1 - q quantiles of the sites' z-score histograms; training starts at round 2."""
    data, transform, anns, logs = run_federation(tmp_path, broker, daemons, recorder, "quantile = 0.02\n")
    assert [(a.round_id, a.statistics) for a in anns[:2]] == [(0, "summary"), (1, "histogram")], logs()
    first = FeatureTransform.from_dict(json.loads(anns[1].features))
    assert first.mean == transform.mean and first.std == transform.std and first.lower is None
    assert [r["round"] for r in rounds_of(tmp_path / "run" / "statistics-histogram")] == [1]
    assert [r["round"] for r in rounds_of(tmp_path / "run")] == [2, 3], logs()
    pooled = np.concatenate([x for x, _ in data.values()])
    want_lo, want_hi = np.nanquantile(pooled, 0.02, axis=0), np.nanquantile(pooled, 0.98, axis=0)
    width = 2 * 6.0 / 48 * np.asarray(transform.std)    # two histogram bins
    assert np.all(np.abs(np.asarray(transform.lower) - want_lo) < width), (transform.lower, want_lo)
    assert np.all(np.abs(np.asarray(transform.upper) - want_hi) < width), (transform.upper, want_hi)
    assert transform.provenance["rounds"] == 2 and transform.provenance["quantile_clip"] == 0.02
    clipped = transform.apply(pooled)   # the announced transform clips: nothing beyond the pooled quantiles
    z_hi = (np.asarray(transform.upper) - np.asarray(transform.mean)) / np.asarray(transform.std)
    assert np.all(np.nanmax(clipped, 0) <= z_hi + 1e-5)
    for d in ROWS:
        kinds = [json.loads(line).get("kind") for line in (tmp_path / f"{d}.log").read_text().splitlines()
                 if line.startswith("{") and json.loads(line)["msg"] == "statistics sent"]
        assert kinds == ["summary", "histogram"], logs()


def test_masked_statistics_rounds_give_the_edge_only_the_cohorts_sum(tmp_path, broker, daemons, recorder):
    """[features] secagg: in both statistics rounds each real device masks its totals / site_rows_max (and its
    rows) in the edge's secure aggregation; no plaintext statistics update is published, and the unmasked sum gives
    the same pooled moments and quantile clip points as the plaintext rounds (to the 24-bit grid)."""
    lo, hi = 3.0 * SCALES - 5.0 * SCALES, 3.0 * SCALES + 8.0 * SCALES
    bounds = ", ".join(f'{c} = [{float(a)!r}, {float(b)!r}]' for c, a, b in zip(COLUMNS, lo, hi))
    seen = recorder(["fl/edge1/updates/+", "fl/edge1/secagg/masked/+"], client_id="watch")
    data, transform, anns, logs = run_federation(
        tmp_path, broker, daemons, recorder,
        f"bounds = {{ {bounds} }}\nquantile = 0.02\nsite_rows_max = 1000\nsecagg = {{ min_cohort = 3 }}\n",
        secagg_keys_dir=str(tmp_path / "edge" / "enrolment"), secagg_timeout_s=60.0)
    assert [a.secagg["mode"] for a in anns[:2]] == ["untrusted_edge"] * 2 and anns[0].secagg["bits"] == 24
    assert json.loads(anns[0].features)["site_rows_max"] == 1000
    masked = {t.rsplit("/", 1)[1] for t, _ in seen.messages if "/secagg/masked/" in t}
    assert masked == set(ROWS), logs()
    plaintext = {decode(p, expect=DeviceUpdate).round_id for t, p in seen.messages if "/updates/" in t}
    assert plaintext == {2, 3}, logs()   # training rounds only: no site's statistics in the clear
    assert transform.provenance["secagg"] is True and transform.count == sum(ROWS.values())
    pooled = np.concatenate([x for x, _ in data.values()])
    clipped = np.clip(pooled, lo, hi)
    np.testing.assert_allclose(transform.mean, np.nanmean(clipped, axis=0), rtol=1e-4)
    np.testing.assert_allclose(transform.std, np.nanstd(clipped, axis=0), rtol=1e-3)
    width = 2 * 6.0 / 48 * np.asarray(transform.std)
    assert np.all(np.abs(np.asarray(transform.lower) - np.nanquantile(pooled, 0.02, axis=0)) < width)
    for d in ROWS:
        kinds = [json.loads(line).get("kind") for line in (tmp_path / f"{d}.log").read_text().splitlines()
                 if line.startswith("{") and json.loads(line)["msg"] == "masked update aggregated"]
        assert kinds == ["summary", "histogram"], logs()


def test_devices_holding_physionet_format_sets_standardise_and_train(tmp_path, broker, daemons, recorder):
    """issue 21: each device's local data is a PhysioNet 2012-format set (record files + outcomes); the devices
    answer the statistics round from its raw per-stay features and train on them through the derived transform."""
    data, transform, anns, logs = run_federation(tmp_path, broker, daemons, recorder, physionet=True)
    pooled = np.concatenate([x for x, _ in data.values()])
    assert transform.count == len(pooled) == sum(ROWS.values())
    np.testing.assert_allclose(transform.mean, np.nanmean(pooled, axis=0), rtol=1e-4)
    np.testing.assert_allclose(transform.std, np.nanstd(pooled, axis=0), rtol=1e-3)
    records = rounds_of(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2] and records[0]["num_devices"] == 3, logs()
    assert all(r["auroc"] is not None for r in records), records


def test_declared_feature_bounds_are_all_or_none_and_noise_needs_them(tmp_path):
    from cloud.config import load_config

    schema = {"numeric": ["age", "chol"], "categorical": [["sex", ["f", "m"]]]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    base = ('run_dir = "r"\nsigning_key = "k"\nedge_keys_dir = "e"\nmodel = "vitals_mlp"\n'
            '[model_options]\nn_features = 4\n[features]\nschema = "schema.json"\n')
    cases = {"noise_mult = 1.0\n": "needs features.bounds",
             "bounds = { age = [18, 100] }\n": r"no \[lo, hi\] for \['chol'\]",
             "bounds = { age = [18, 100], chol = [100, 600], bmi = [10, 60] }\n": r"no such numeric column \['bmi'\]",
             "bounds = { age = [100, 18], chol = [100, 600] }\n": "finite lo < hi",
             "secagg = {}\n": "features.secagg needs features.bounds",
             "bounds = { age = [18, 100], chol = [100, 600] }\nsecagg = {}\nsite_rows_max = 2000000\n":
                 "does not fit a 20-bit grid",
             "bounds = { age = [18, 100], chol = [100, 600] }\nsecagg = { colour = 1 }\n": "unknown keys"}
    for extra, message in cases.items():
        path = tmp_path / "cloud.toml"
        path.write_text(base + extra)
        with pytest.raises(ValueError, match=message):
            load_config(path)
    path.write_text(base + "bounds = { age = [18, 100], chol = [100, 600] }\nnoise_mult = 1.0\n")
    cfg = load_config(path)
    assert cfg.features.encoded_bounds(cfg.features.load_schema()) == [[18, 100], [100, 600], [0, 1], [0, 1]]
