"""The PhysioNet/CinC Challenge 2012 record format (set-a, set-b, set-c: the same), read by the device agent for its
local data (docs/device.md "Local data") and by the experiments' loader (experiments/datasets/physionet2012.py).

A set is a directory of `<RecordID>.txt` files (`Time,Parameter,Value` rows, hours up to 48), or a `set-*.tar.gz`
of them, with an outcomes file (`Outcomes-a.txt`: RecordID, ..., In-hospital_death). Features per stay: the static
descriptors (age, gender, height, weight at admission; -1 = missing) and, for each of the 37 time series, first,
last, min, max, mean and count over the 48 hours, with a missingness indicator; NaN marks a missing value
(`feature_names()` names the columns).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

STATIC = ("Age", "Gender", "Height", "Weight")
SERIES = ("Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN", "Cholesterol", "Creatinine", "DiasABP", "FiO2", "GCS",
          "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg", "MAP", "MechVent", "Na", "NIDiasABP", "NIMAP",
          "NISysABP", "PaCO2", "PaO2", "pH", "Platelets", "RespRate", "SaO2", "SysABP", "Temp", "TroponinI",
          "TroponinT", "Urine", "WBC", "Weight")
STATS = ("first", "last", "min", "max", "mean", "count")
ICU_TYPES = {1: "ccu", 2: "csru", 3: "micu", 4: "sicu"}


def feature_names() -> list[str]:
    names = [f"static_{s}" for s in STATIC] + [f"missing_static_{s}" for s in STATIC]
    for series in SERIES:
        names += [f"{series}_{stat}" for stat in STATS] + [f"missing_{series}"]
    return names


def parse_record(text: str) -> tuple[int, int, np.ndarray]:
    """One record file -> (record id, ICU type, raw feature vector with NaN for missing)."""
    record_id, icu_type = -1, 0
    static = dict.fromkeys(STATIC, np.nan)
    values: dict[str, list[tuple[float, float]]] = {s: [] for s in SERIES}
    lines = text.splitlines()
    if not lines or not lines[0].startswith("Time,Parameter,Value"):
        raise ValueError("not a PhysioNet 2012 record (header Time,Parameter,Value missing)")
    for line in lines[1:]:
        parts = line.strip().split(",")
        if len(parts) != 3 or not parts[1]:
            continue
        time_s, name, raw = parts
        try:
            hours, minutes = time_s.split(":")
            t = int(hours) * 60 + int(minutes)
            value = float(raw)
        except ValueError:
            continue
        if name == "RecordID":
            record_id = int(value)
        elif name == "ICUType":
            icu_type = int(value)
        elif t == 0 and name in STATIC and np.isnan(static[name]):
            static[name] = value if value >= 0 else np.nan
            if name == "Weight" and value >= 0:  # admission weight is also the first point of the series
                values["Weight"].append((t, value))
        elif name in values and value >= 0:
            values[name].append((t, value))
    feats = [static[s] for s in STATIC] + [float(np.isnan(static[s])) for s in STATIC]
    for series in SERIES:
        obs = sorted(values[series])
        if obs:
            v = np.array([o[1] for o in obs])
            feats += [v[0], v[-1], v.min(), v.max(), v.mean(), float(len(v)), 0.0]
        else:
            feats += [np.nan] * 5 + [0.0, 1.0]
    return record_id, icu_type, np.array(feats, np.float64)


def set_source(root: Path) -> Path:
    """Where a set's records are: a set directory of <RecordID>.txt files, a set-*.tar.gz, or a folder holding
    exactly one of those (set-a, set-b, set-c: the same format)."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no PhysioNet 2012 set (a directory of record .txt files or a set-*.tar.gz)")
    if any(p for p in root.glob("*.txt") if not p.name.lower().startswith("outcomes")):
        return root
    found = sorted(p for p in root.iterdir()
                   if p.name.startswith("set-") and (p.is_dir() or p.name.endswith(".tar.gz")))
    names = sorted({p.name.removesuffix(".tar.gz") for p in found})
    if len(names) != 1:
        raise FileNotFoundError(f"{root}: {'no' if not names else 'several'} PhysioNet sets {names}: name the set "
                                "directory or archive itself")
    directory = [p for p in found if p.is_dir()]
    return directory[0] if directory else found[0]


def find_outcomes(root: Path) -> Path:
    """The outcomes file of a set: Outcomes-<letter>.txt beside (or inside) it, or the only Outcomes*.txt there."""
    source = set_source(root)
    letter = source.name.removesuffix(".tar.gz").removeprefix("set-") if source.name.startswith("set-") else None
    for folder in dict.fromkeys([source if source.is_dir() else source.parent, source.parent, root]):
        if letter and (folder / f"Outcomes-{letter}.txt").is_file():
            return folder / f"Outcomes-{letter}.txt"
        candidates = sorted(folder.glob("Outcomes*.txt"))
        if len(candidates) == 1:
            return candidates[0]
    raise FileNotFoundError(f"{root}: no outcomes file found beside the set; pass it (--outcomes FILE)")


def record_texts(root: Path) -> Iterator[str]:
    source = set_source(root)
    if source.is_dir():
        for path in sorted(source.glob("*.txt")):
            if not path.name.lower().startswith("outcomes"):
                yield path.read_text()
        return
    with tarfile.open(source) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt") and "outcomes" not in member.name.lower():
                yield io.TextIOWrapper(tar.extractfile(member)).read()


def read_outcomes(path: Path) -> dict[int, int]:
    rows = path.read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("In-hospital_death")
    return {int(r.split(",")[0]): int(r.split(",")[col]) for r in rows[1:] if r.strip()}


def load_physionet2012(root: str | Path, outcomes: str | Path | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (features with NaN for missing, in-hospital death labels, ICU type) for every record with an outcome.
    `root`: any PhysioNet 2012-format set (directory, archive, or a folder with one); `outcomes`: its outcomes
    file (default: found beside the set, find_outcomes)."""
    root = Path(root)
    if outcomes and not Path(outcomes).is_file():
        raise FileNotFoundError(f"{outcomes}: no such outcomes file")
    outcomes = read_outcomes(Path(outcomes) if outcomes else find_outcomes(root))
    xs, ys, sites = [], [], []
    for text in record_texts(root):
        record_id, icu_type, feats = parse_record(text)
        if record_id in outcomes:
            xs.append(feats)
            ys.append(outcomes[record_id])
            sites.append(icu_type)
    if not xs:
        raise ValueError(f"{root}: no record has an outcome in the outcomes file (wrong --outcomes?)")
    return np.stack(xs), np.array(ys, np.int64), np.array(sites, np.int64)
