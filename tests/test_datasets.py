"""Dataset loaders on small fixtures written in each dataset's exact on-disk format, plus the real shipped data."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from experiments.datasets import load
from experiments.datasets.csv_sites import load_csv_federation
from experiments.datasets.mimic3 import load_mimic3_split
from experiments.datasets.partition import dirichlet_label_skew, quantity_skew
from experiments.datasets.physionet2012 import load_physionet_federation
from experiments.datasets.uci_har import activity_labels, load_har_federation, read_split
from protocol.physionet2012 import SERIES, STATIC, STATS, feature_names, load_physionet2012, parse_record


def write_har(root, rng):
    (root / "activity_labels.txt").write_text("1 WALKING\n2 WALKING_UPSTAIRS\n3 WALKING_DOWNSTAIRS\n4 SITTING\n"
                                              "5 STANDING\n6 LAYING\n")
    for split, subjects in (("train", [1, 3, 3, 5]), ("test", [2, 2])):
        folder = root / split
        (folder / "Inertial Signals").mkdir(parents=True)
        n = len(subjects)
        x = rng.uniform(-1, 1, (n, 561))
        (folder / f"X_{split}.txt").write_text("\n".join(" ".join(f"{v: .7e}".replace("e-0", "e-00")
                                                                  .replace("e+0", "e+00") for v in row) for row in x))
        (folder / f"y_{split}.txt").write_text("\n".join(str(v) for v in rng.integers(1, 7, n)) + "\n")
        (folder / f"subject_{split}.txt").write_text("\n".join(map(str, subjects)) + "\n")
        for name in ("body_acc", "body_gyro", "total_acc"):
            for axis in "xyz":
                rows = rng.normal(size=(n, 128))
                (folder / "Inertial Signals" / f"{name}_{axis}_{split}.txt").write_text(
                    "\n".join(" ".join(f"{v:.7e}" for v in row) for row in rows))
    return x


def test_uci_har_layout(tmp_path):
    rng = np.random.default_rng(0)
    write_har(tmp_path, rng)
    x, y, subject = read_split(tmp_path, "train")
    assert x.shape == (4, 561) and y.min() >= 0 and y.max() <= 5 and list(subject) == [1, 3, 3, 5]
    raw, _, _ = read_split(tmp_path, "train", inertial=True)
    assert raw.shape == (4, 128, 6)
    assert activity_labels(tmp_path)[5] == "LAYING"
    fed = load_har_federation(tmp_path, n_edges=2)
    assert [c.id for c in fed.clients] == ["har01", "har03", "har05"]
    assert [len(c.y) for c in fed.clients] == [1, 2, 1] and fed.x_test.shape == (2, 561)


RECORD = """Time,Parameter,Value
00:00,RecordID,{rid}
00:00,Age,54
00:00,Gender,0
00:00,Height,-1
00:00,ICUType,{icu}
00:00,Weight,80.5
00:07,HR,73
00:07,HR,75
00:37,HR,77
12:10,Weight,79
35:19,GCS,15
40:00,Temp,-1
"""


def write_physionet(root, as_tar: bool):
    records = {132539: 4, 132540: 1, 132541: 2}
    outcomes = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
    outcomes += "132539,6,1,5,-1,0\n132540,16,8,8,-1,1\n132541,21,11,19,-1,0\n"
    (root / "Outcomes-a.txt").write_text(outcomes)
    texts = {f"set-a/{rid}.txt": RECORD.format(rid=rid, icu=icu) for rid, icu in records.items()}
    texts["set-a/132542.txt"] = "Time,Parameter,Value\n00:00,RecordID,132542\n"  # descriptors only, no outcome
    if as_tar:
        with tarfile.open(root / "set-a.tar.gz", "w:gz") as tar:
            for name, text in texts.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        (root / "set-a").mkdir()
        for name, text in texts.items():
            (root / name).write_text(text)


def test_physionet_record_features():
    rid, icu, feats = parse_record(RECORD.format(rid=7, icu=3))
    names = feature_names()
    assert (rid, icu) == (7, 3) and len(feats) == len(names) == 2 * len(STATIC) + len(SERIES) * (len(STATS) + 1)
    f = dict(zip(names, feats))
    assert f["static_Age"] == 54 and np.isnan(f["static_Height"]) and f["missing_static_Height"] == 1
    assert (f["HR_first"], f["HR_last"], f["HR_min"], f["HR_max"], f["HR_count"]) == (73, 77, 73, 77, 3)
    assert f["HR_mean"] == pytest.approx(75.0)
    assert (f["Weight_first"], f["Weight_last"], f["Weight_count"]) == (80.5, 79, 2)
    assert f["GCS_last"] == 15 and f["missing_Temp"] == 1 and f["missing_HR"] == 0  # -1 is missing
    with pytest.raises(ValueError):
        parse_record("not,a,record\n")


@pytest.mark.parametrize("as_tar", [False, True])
def test_physionet_layouts(tmp_path, as_tar):
    write_physionet(tmp_path, as_tar)
    x, y, icu = load_physionet2012(tmp_path)
    assert x.shape[0] == 3 and sorted(y.tolist()) == [0, 0, 1] and sorted(icu.tolist()) == [1, 2, 4]


def test_physionet_real_set_a(shared_dataset):
    fed = load_physionet_federation(shared_dataset("physionet2012"))
    n = sum(len(c.y) for c in fed.clients) + len(fed.y_test)
    deaths = sum(int(c.y.sum()) for c in fed.clients) + int(fed.y_test.sum())
    assert n == 4000 and deaths == 554
    assert sorted(c.edge for c in fed.clients) == ["ccu", "csru", "micu", "sicu"]
    assert np.isfinite(fed.x_test).all() and fed.x_test.shape[1] == len(feature_names())


def test_mimic3_benchmark_layout(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    header = "Hours,Capillary refill rate,Diastolic blood pressure,Glascow coma scale eye opening,Heart Rate,pH\n"
    (folder / "10_episode1_timeseries.csv").write_text(
        header + "0.5,,60,4 Spontaneously,80,7.4\n3.0,,70,,90,\n49.0,,10,,10,\n")
    (folder / "11_episode1_timeseries.csv").write_text(header + "1.0,0.0,,3 To speech,,\n")
    (folder / "listfile.csv").write_text("stay,y_true\n10_episode1_timeseries.csv,0\n11_episode1_timeseries.csv,1\n")
    x, y, variables = load_mimic3_split(tmp_path, "train")
    assert y.tolist() == [0, 1] and len(variables) == 5 and x.shape == (2, 5 * 7)
    hr = variables.index("Heart Rate") * 7
    assert x[0, hr:hr + 6].tolist() == [80, 90, 80, 90, 85, 2]  # the row at 49 h is outside the window
    gcs = variables.index("Glascow coma scale eye opening") * 7
    assert x[0, gcs] == 4 and x[1, gcs] == 3
    assert x[1, hr + 6] == 1  # heart rate missing for the second stay


def test_generic_csv_sites(tmp_path):
    path = tmp_path / "export.csv"
    rows = ["age,bp,site,outcome"] + [f"{50 + i},{'' if i % 5 == 0 else 120 + i},{'A' if i < 20 else 'B'},"
                                      f"{'yes' if i % 3 == 0 else 'no'}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    fed = load_csv_federation(path, label="outcome", site="site")
    assert {c.id for c in fed.clients} == {"A", "B"} and fed.classes == ["no", "yes"]
    assert sum(len(c.y) for c in fed.clients) + len(fed.y_test) == 40
    assert fed.schema["numeric"] == ["age", "bp"]              # raw features: the federation scales them
    assert sum(int(np.isnan(c.x).sum()) for c in fed.clients) + int(np.isnan(fed.x_test).sum()) == 8


def test_partitioners_cover_every_sample_once():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 1000)
    parts = dirichlet_label_skew(y, 10, alpha=0.3, rng=rng)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    skews = [np.bincount(y[p], minlength=4).max() / len(p) for p in parts]
    assert np.mean(skews) > 0.4  # strongly skewed vs 0.25 for IID
    sizes = [len(p) for p in quantity_skew(1000, 10, alpha=0.5, rng=rng)]
    assert sum(sizes) == 1000 and min(sizes) >= 2 and max(sizes) > 2 * np.median(sizes)


def test_shipped_real_datasets():
    watch = load("watch")
    assert len(watch.clients) == 10 and watch.clients[0].x.shape[1:] == (100, 6) and len(set(watch.y_test)) == 7
    heart = load("heart")
    assert {c.edge for c in heart.clients} == {"cleveland", "hungary", "va", "switzerland"}
    assert heart.x_test.shape[1] == heart.model_options["n_features"]


def test_validation_split_lends_each_labels_share_and_keeps_the_test_set_out():
    """Tuning never sees the test set: the split's held-out rows come from the clients' training rows only, every label
    lends its share, windowed series lend their LAST rows (as the test split cuts recordings in time)."""
    from experiments.datasets.federation import Client, Federation

    rng = np.random.default_rng(0)
    series = [Client(f"d{i}", "e1", np.arange(40 * 2 * 3, dtype=np.float32).reshape(40, 2, 3) + 1000 * i,
                     np.repeat([0, 1], 20)) for i in range(2)]
    table = [Client("t", "e1", rng.normal(size=(30, 4)).astype(np.float32), np.repeat([0, 1, 2], 10))]
    for clients, tail in ((series, True), (table, False)):
        fed = Federation("f", clients, np.full((5, *clients[0].x.shape[1:]), -1.0, np.float32), np.zeros(5, int), "m")
        val = fed.validation_split(0.25, seed=1)
        assert len(val.x_test) + sum(len(c.y) for c in val.clients) == sum(len(c.y) for c in clients)
        assert not np.any(val.x_test == -1.0)                      # nothing of the test set
        for before, after in zip(clients, val.clients):
            kept = {row.tobytes() for row in after.x}
            lent = [row for row in before.x if row.tobytes() not in kept]
            assert len(lent) == len(before.y) - len(after.y)
            for label in np.unique(before.y):
                assert np.sum(before.y == label) - np.sum(after.y == label) == round(0.25 * np.sum(before.y == label))
            if tail:   # each label lends its last 5 rows
                for label in (0, 1):
                    last = before.x[np.flatnonzero(before.y == label)[-5:]]
                    assert {r.tobytes() for r in last} <= {r.tobytes() for r in lent}


def test_physionet_any_set_and_a_separate_test_set(tmp_path):
    """Any PhysioNet-format set trains (its directory itself, outcomes found beside it or named), another one tests:
    set-b/set-c have the same format as set-a."""
    train, other = tmp_path / "train", tmp_path / "other"
    train.mkdir()
    other.mkdir()
    write_physionet(train, as_tar=False)
    write_physionet(other, as_tar=True)
    (other / "Outcomes-a.txt").rename(other / "Outcomes-c.txt")   # e.g. a set-c export with its own outcomes file
    x, y, _ = load_physionet2012(train / "set-a")                   # the set directory itself, outcomes beside it
    assert x.shape[0] == 3
    with pytest.raises(FileNotFoundError, match="outcomes"):
        load_physionet2012(tmp_path / "other" / "set-a.tar.gz", tmp_path / "nope.txt")
    fed = load_physionet_federation(train, test_root=other / "set-a.tar.gz", test_outcomes=other / "Outcomes-c.txt",
                                    raw=True)
    assert sum(len(c.y) for c in fed.clients) == 3 and len(fed.y_test) == 3
    assert fed.schema["numeric"] == feature_names() and np.isnan(fed.x_test).any()
    assert load("physionet2012", root=train, test_fraction=0.34).classes == ["survived", "died"]


def test_experiments_scale_physionet_as_a_deployment_does(tmp_path, monkeypatch):
    """The experiments' PhysioNet federation is standardised by the daemons' statistics rounds (z clipped at 5, each
    feature clipped at its federated quantiles: the recipe's clip_quantile unless --clip-quantile says otherwise),
    not by pooled z-scores: one stay's absurd heart rate no longer dominates its column."""
    from experiments.sim import harness

    rng = np.random.default_rng(0)
    root = tmp_path / "set-a"
    root.mkdir()
    outcomes = ["RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"]
    for i in range(120):
        record = 140000 + i
        hr = rng.normal(85, 10, 4).round(1)
        if i == 7:
            hr[2] = 4000.0                                          # a unit error
        rows = [f"00:00,RecordID,{record}", f"00:00,ICUType,{1 + i % 4}", f"00:00,Age,{rng.integers(20, 90)}"]
        rows += [f"{h:02d}:00,HR,{v}" for h, v in enumerate(hr, start=1)]
        (root / f"{record}.txt").write_text("Time,Parameter,Value\n" + "\n".join(rows) + "\n")
        outcomes.append(f"{record},0,0,0,0,{int(i % 5 == 0)}")
    (tmp_path / "Outcomes-a.txt").write_text("\n".join(outcomes) + "\n")
    monkeypatch.setattr(harness, "PHYSIONET", tmp_path)
    column = feature_names().index("HR_max")

    def outlier_z(quantile: float | None) -> tuple[float, dict]:
        monkeypatch.setitem(harness.STANDARDIZE, "quantile", quantile)
        fed = harness.dataset("physionet2012")
        rows = np.concatenate([c.x for c in fed.clients] + [fed.x_test])
        assert np.isfinite(rows).all()
        return float(rows[:, column].max()), fed.transform["provenance"]

    z, provenance = outlier_z(None)                                  # the recipe's quantile
    assert provenance["quantile_clip"] == harness.RECIPES["physionet2012"].clip_quantile > 0
    assert provenance["rounds"] == 2 and provenance["sites"] == 4
    assert z < 2.0
    z, provenance = outlier_z(0.0)                                   # --clip-quantile 0: z-scores capped at 5
    assert "quantile_clip" not in provenance and z == pytest.approx(5.0)
