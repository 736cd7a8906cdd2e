"""Bring your own clinical data (issue 21): the truthful CSV reader, federated standardisation through the real edge
and cloud engines (plain and under secure aggregation), the transform in a signed bundle, the CLI's one-line errors
(exit 2), the silent-failure guard and the simulator's data-weighted deadline."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from cloud.evaluation import degenerate, top_class_share
from cloud.statistics import statistics_settings
from experiments.datasets.csv_sites import load_csv_federation
from experiments.datasets.federation import Client, Federation
from experiments.sim import hetero
from experiments.sim.harness import simulate
from experiments.sim.statistics import base_settings, federated_standardize, masked_pool, statistics_round
from protocol import bundle, signing
from protocol.features import (
    FeatureSchema,
    FeatureTransform,
    pool,
    quantiles,
    site_histogram,
    site_summary,
)
from protocol.tabular import ReadOptions, TableError, read_table

from .harness import REPO

FEDIOMT = str(REPO / ".venv" / "bin" / "fediomt")


def write(path, text):
    path.write_text(text)
    return path


def test_reader_honours_markers_and_thousands_and_names_the_bad_cell(tmp_path):
    path = write(tmp_path / "a.csv", 'age,platelets,smoker,y\n50,"265,000",NA,1\n?,"1,200.5",,0\n61,300,1,0\n')
    table = read_table(path)
    schema = FeatureSchema.infer(table, exclude=["y"])
    x = schema.encode(table)
    assert schema.numeric == ("age", "platelets", "smoker")
    assert x[0, 1] == 265000 and x[1, 1] == 1200.5 and np.isnan(x[1, 0]) and np.isnan(x[0, 2]) and np.isnan(x[1, 2])
    bad = write(tmp_path / "b.csv", "age,chol,y\n50,200,1\n51,2OO,0\n")
    with pytest.raises(TableError, match=r"b\.csv, column 'chol', row 3: '2OO' is not a number"):
        FeatureSchema(("age", "chol")).encode(read_table(bad))
    with pytest.raises(TableError, match="row 2: 4 cells but the header has 3"):
        read_table(write(tmp_path / "c.csv", "a,b,y\n1,265,000,1\n"))
    # no thousands separator configured: "265,000" is not a number
    with pytest.raises(TableError, match="'265,000' is not a number"):
        FeatureSchema(("platelets",)).encode(read_table(path), ReadOptions(thousands=""))


def test_categorical_columns_one_hot_or_refused(tmp_path):
    path = write(tmp_path / "c.csv", "sex,cp,y\nM,typical,1\nF,NA,0\nM,atypical,0\n")
    schema = FeatureSchema.infer(read_table(path), exclude=["y"])
    assert schema.names == ["sex=F", "sex=M", "cp=atypical", "cp=typical"]
    assert schema.encode(read_table(path)).tolist() == [[0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 1, 0]]
    with pytest.raises(TableError, match=r"column 'sex', row 2: categorical column \('M' is not a number\)"):
        FeatureSchema.infer(read_table(path), exclude=["y"], categorical="reject")
    ids = write(tmp_path / "ids.csv", "pid,y\n" + "".join(f"p{i},{i % 2}\n" for i in range(40)))
    with pytest.raises(TableError, match="column 'pid'.*identifier or free text"):
        FeatureSchema.infer(read_table(ids), exclude=["y"])


def test_pooled_statistics_from_site_summaries_equal_the_pooled_data():
    rng = np.random.default_rng(3)
    xs = [rng.normal([200, 0.3, 5e4], [40, 0.5, 2e4], (n, 3)) for n in (7, 400, 60)]
    for x in xs:
        x[rng.random(x.shape) < 0.2] = np.nan
    pooled, n = pool([site_summary(x) for x in xs])
    t = FeatureTransform.from_summary(FeatureSchema(("a", "b", "c")), pooled, n)
    allx = np.concatenate(xs)
    assert n == 467
    np.testing.assert_allclose(t.mean, np.nanmean(allx, 0), rtol=1e-9)
    np.testing.assert_allclose(t.std, np.nanstd(allx, 0), rtol=1e-9)
    z = t.apply(allx)
    assert np.isfinite(z).all() and z.dtype == np.float32
    np.testing.assert_allclose(np.nanmean(np.where(np.isnan(allx), np.nan, z), 0), 0, atol=1e-5)
    clipped = FeatureTransform.from_summary(t.schema, pooled, n, clip_z=1.0).apply(allx)
    assert np.abs(clipped).max() == pytest.approx(1.0)
    # histogram round -> quantiles close to the pooled data's
    hist, _ = pool([site_histogram(x, t) for x in xs])
    lo, hi = quantiles(hist, 3, (0.05, 0.95))
    zs = (allx - np.array(t.mean)) / np.array(t.std)
    np.testing.assert_allclose(lo, np.nanquantile(zs, 0.05, axis=0), atol=0.15)
    np.testing.assert_allclose(hi, np.nanquantile(zs, 0.95, axis=0), atol=0.15)
    q = t.with_quantile_clip(hist, 0.05)
    assert q.apply(allx).max() <= (np.array(q.upper) - t.mean).max() / min(t.std) + 1e-4


def test_dp_noise_needs_bounds_and_stays_near_the_truth():
    rng = np.random.default_rng(0)
    x = rng.normal(120, 15, (5000, 2))
    with pytest.raises(ValueError, match="needs declared bounds"):
        site_summary(x, noise_mult=1.0)
    bounds = [(60, 200), (60, 200)]
    noisy, n = site_summary(x, bounds=bounds, noise_mult=1.0, rng=rng)
    t = FeatureTransform.from_summary(FeatureSchema(("a", "b")), noisy, n, bounds=bounds)
    np.testing.assert_allclose(t.mean, x.mean(0), rtol=0.01)
    np.testing.assert_allclose(t.std, x.std(0), rtol=0.1)
    assert noisy.tolist() != site_summary(x, bounds=bounds)[0].tolist()


def test_statistics_round_through_the_edge_and_cloud_engines_and_under_secagg():
    rng = np.random.default_rng(1)
    xs = {f"d{i}": rng.normal(240, 45, (n, 4)) for i, n in enumerate((5, 3000, 44, 86, 21))}
    edges = {"d0": "e1", "d1": "e1", "d2": "e2", "d3": "e2", "d4": "e3"}
    sites = [(d, edges[d], *site_summary(x)) for d, x in xs.items()]
    settings = statistics_settings(base_settings(sites, 2), FeatureSchema(("a", "b", "c", "d")))
    pooled, n, report = statistics_round(sites, settings, seed=2)
    exact, n_exact = pool([(v, c) for _, _, v, c in sites])
    assert n == n_exact == 3156
    np.testing.assert_allclose(pooled, exact, rtol=2e-6)     # float32 on the wire
    assert report["edge_devices"] == {"e1": 2, "e2": 2, "e3": 1}
    masked, n_masked = masked_pool([(d, v, c) for d, _, v, c in sites])
    assert n_masked == n_exact
    np.testing.assert_allclose(masked, exact, rtol=1e-5)


def framingham_like(tmp_path, rows=600):
    rng = np.random.default_rng(4)
    chol = rng.normal(236, 44, rows)
    age = rng.normal(50, 8, rows)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(0.03 * (chol - 236) + 0.1 * (age - 50) - 1.7)))).astype(int)
    lines = ["male,age,totChol,glucose,TenYearCHD"]
    for i in range(rows):
        glucose = "NA" if i % 9 == 0 else f"{rng.normal(82, 20):.0f}"
        lines.append(f"{i % 2},{age[i]:.0f},{chol[i]:.0f},{glucose},{y[i]}")
    return write(tmp_path / "fram.csv", "\n".join(lines) + "\n")


def test_csv_loader_dirichlet_sites_and_federated_standardize(tmp_path):
    fed = load_csv_federation(framingham_like(tmp_path), label="TenYearCHD", seed=1)
    assert len(fed.clients) == 5 and fed.schema["numeric"] == ["male", "age", "totChol", "glucose"]
    assert any(np.isnan(c.x).any() for c in fed.clients)          # raw: nothing pooled, nothing imputed yet
    text = fed.describe()
    assert "site1" in text and "classes (train)" in text and "%" in text
    std = federated_standardize(fed, seed=1, verbose=False)
    x, _ = std.pooled()
    assert np.isfinite(x).all() and np.abs(x.mean(0)).max() < 0.05 and np.abs(x.std(0) - 1).max() < 0.1
    t = FeatureTransform.from_dict(json.loads(json.dumps(std.transform)))
    np.testing.assert_allclose(t.apply(fed.x_test), std.x_test)
    # the transform travels in a signed bundle's manifest and comes back identical
    key = signing.generate_signing_key()
    manifest = {"name": "m", "version": 1, "kind": "trainable", "family": "vitals_mlp", "device_class": "pi",
                "layout": [{"name": "w", "shape": [2]}], "input": {"shape": [4]}, "n_classes": 2,
                "batch_sizes": {}, "features": std.transform}
    got = bundle.verify_files(bundle.seal(b"model", manifest, key), key.public_key())
    assert FeatureTransform.from_dict(got.manifest["features"]) == t


@pytest.mark.parametrize("case, text, expect", [
    ("bad number", "age,chol,y,site\n50,200,1,A\n51,abc,0,B\n", "column 'chol', row 3: 'abc' is not a number"),
    ("no label", "age,chol,site\n50,200,A\n", "no label column 'y'"),
    ("no site", "age,chol,y\n50,200,1\n", "no site column 'site'"),
    ("missing label", "age,y,site\n50,1,A\n51,NA,B\n52,0,A\n", "column 'y', row 3: the label is missing"),
    ("missing site", "age,y,site\n50,1,A\n51,0,\n52,0,A\n", "column 'site', row 3: the site is missing"),
    ("one class", "age,y,site\n50,1,A\n51,1,B\n", "column 'y': the label has one class only"),
    ("ragged", "age,y,site\n50,1,A,extra\n", "row 2: 4 cells but the header has 3"),
])
def test_cli_malformed_csv_one_line_exit_2(tmp_path, case, text, expect):
    path = write(tmp_path / "bad.csv", text)
    out = subprocess.run([FEDIOMT, "experiment", "accuracy", "--out", str(tmp_path / "o"), "--data", f"csv:{path}",
                          "--label", "y", "--site", "site"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0] and str(path) in lines[0]


def test_degenerate_guard():
    constant = np.tile([2.0, -1.0], (100, 1))
    assert top_class_share(constant) == 1.0
    assert "one class for 100.0%" in degenerate(1.0, 0.5) and "AUROC 0.500" in degenerate(1.0, 0.5)
    assert degenerate(0.8, 0.51).startswith("DEGENERATE") and degenerate(0.8, 0.7) == ""


def test_deadline_covers_the_data_not_the_median_device():
    planned, rows = [1, 1, 2, 3, 95], [16, 16, 32, 48, 1520]
    assert hetero.deadline_steps(planned, rows, 0.5, weighted=False) == 2       # the old rule: the median device
    assert hetero.deadline_steps(planned, rows, 0.9) == 95                      # 90 % of the rows: the big site
    assert hetero.deadline_steps([4, 4, 4], [10, 10, 10], 0.9) == 4


def test_quantity_skewed_fedavg_keeps_the_largest_site(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"s1": 16, "s2": 16, "s3": 32, "s4": 48, "s5": 800}
    clients = [Client(s, s, rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 2, n), s)
               for s, n in sizes.items()]
    fed = Federation("skew", clients, rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 2, 50),
                     "vitals_mlp", {"n_features": 4})
    old = hetero.HeteroConfig(deadline_quantile=0.5, deadline_weighted=False)
    logs = simulate(fed, "fedavg", 0, rounds=2, lr=0.1, hetero=old)
    assert all("s5" not in log.contributors for log in logs) and all(log.missed_deadline == 1 for log in logs)
    logs = simulate(fed, "fedavg", 0, rounds=2, lr=0.1)
    assert all(set(log.contributors) == set(sizes) for log in logs)
    assert logs[-1].top_class_share is not None


def test_device_reads_its_raw_csv_through_the_bundle_transform(tmp_path):
    from device.config import DataConfig
    from device.data import load_data

    sites = [site_summary(np.array([[50.0, 200.0], [60.0, np.nan], [70.0, 1200.0]]))]
    pooled, n = pool(sites)
    schema = FeatureSchema(("age", "platelets"), (("sex", ("F", "M")),))
    t = FeatureTransform.from_summary(FeatureSchema(("age", "platelets")), pooled, n)
    t = FeatureTransform(schema, (*t.mean, 0.5, 0.5), (*t.std, 0.5, 0.5), n)
    folder = tmp_path / "dev"
    folder.mkdir()
    write(folder / "train.csv", 'platelets,sex,note,age,label\n"1,200",M,x,70,1\nNA,F,y,60,0\n')
    x, y = load_data(DataConfig(dir=folder), (4,), 2, t.to_dict())
    assert y.tolist() == [1, 0]
    np.testing.assert_allclose(x, t.apply(np.array([[70, 1200, 0, 1], [60, np.nan, 1, 0]])), rtol=1e-6)
    assert x[1, 1] == 0.0 and x[0, 0] > 0            # missing -> the pooled mean; scaled, not raw
    write(folder / "train.csv", "a,b,label\n1,2,0\n3,oops,1\n")
    with pytest.raises(TableError, match=r"train\.csv, column 'b', row 3: 'oops' is not a number"):
        load_data(DataConfig(dir=folder), (2,), 2)


def physionet_set(folder, stays: dict[int, tuple[dict, dict, int]]):
    """A PhysioNet 2012-format set: one record file per stay (RecordID -> (static descriptors, {series: hourly
    values}, died)) + its outcomes file."""
    folder.mkdir(parents=True)
    for record, (static, series, _) in stays.items():
        lines = ["Time,Parameter,Value", f"00:00,RecordID,{record}", "00:00,ICUType,2"]
        lines += [f"00:00,{name},{value}" for name, value in static.items()]
        lines += [f"{h:02d}:00,{name},{v}" for name, values in series.items() for h, v in enumerate(values, start=1)]
        write(folder / f"{record}.txt", "\n".join(lines) + "\n")
    rows = [f"{r},0,0,0,0,{died}" for r, (_, _, died) in stays.items()]
    write(folder / "Outcomes-a.txt", "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
          + "\n".join(rows) + "\n")
    return folder


def test_a_device_reads_a_physionet_format_set_through_the_federations_transform(tmp_path):
    """issue 21: a device's local data may be a PhysioNet 2012-format set; its raw per-stay features (NaN when a
    series is absent) are picked by name, summarised raw in a statistics round and standardised for training."""
    from device.config import DataConfig
    from device.data import load_data, load_raw

    folder = physionet_set(tmp_path / "set-a", {132539: ({"Age": 54}, {"HR": [80, 100, 90]}, 0),
                                                 132540: ({"Age": 76}, {}, 1), 132541: ({"Age": 60}, {"HR": [120]}, 1)})
    cfg = DataConfig(physionet=folder)
    schema = FeatureSchema(("static_Age", "HR_mean", "HR_count", "missing_HR"))
    x = load_raw(cfg, schema)
    np.testing.assert_array_equal(x[[0, 2]], [[54, 90, 3, 0], [60, 120, 1, 0]])
    assert x[1, 0] == 76 and np.isnan(x[1, 1]) and x[1, 3] == 1
    transform = FeatureTransform.from_summary(schema, *pool([site_summary(x)]))
    with pytest.raises(ValueError, match="needs the federation's feature transform"):
        load_data(cfg, (4,), 2)
    xs, y = load_data(cfg, (4,), 2, transform.to_dict())
    assert y.tolist() == [0, 1, 1]
    np.testing.assert_allclose(xs, transform.apply(x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"no PhysioNet 2012 feature named \['chol'\]"):
        load_raw(cfg, FeatureSchema(("chol",)))
    outcomes = folder / "Outcomes-a.txt"
    elsewhere = tmp_path / "labels.txt"
    outcomes.rename(elsewhere)   # an outcomes file kept apart: named in the config
    assert load_raw(DataConfig(physionet=folder, outcomes=elsewhere), schema).shape == (3, 4)
