"""UCI HAR Dataset (Anguita et al. 2013; cite it when you use it): 561 features per 2.56 s window, 6 activities,
30 subjects. Reads the original layout (`train/X_train.txt`, `y_train.txt`, `subject_train.txt`, same for `test/`,
`activity_labels.txt`, and optionally the raw `Inertial Signals/`). One device per training subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.datasets.federation import Client, Federation, assign_edges

INERTIAL = ("body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z")


def _matrix(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.float32, ndmin=2)


def _ints(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, ndmin=1)


def read_split(root: str | Path, split: str, inertial: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (X: (n, 561) features or (n, 128, 6) raw body acc + gyro, y: 0-based activity, subject)."""
    folder = Path(root) / split
    y = _ints(folder / f"y_{split}.txt") - 1
    subject = _ints(folder / f"subject_{split}.txt")
    if inertial:
        channels = [_matrix(folder / "Inertial Signals" / f"{name}_{split}.txt") for name in INERTIAL]
        x = np.stack(channels, axis=2)
    else:
        x = _matrix(folder / f"X_{split}.txt")
    if not len(x) == len(y) == len(subject):
        raise ValueError(f"{folder}: X, y and subject files disagree in length")
    return x, y, subject


def activity_labels(root: str | Path) -> list[str]:
    lines = (Path(root) / "activity_labels.txt").read_text().split("\n")
    return [line.split()[1] for line in lines if line.strip()]


def load_har_federation(root: str | Path, n_edges: int = 3) -> Federation:
    x, y, subject = read_split(root, "train")
    x_test, y_test, _ = read_split(root, "test")
    sites = [f"s{s:02d}" for s in np.unique(subject)]
    edge_of = assign_edges(sites, n_edges)
    clients = [Client(id=f"har{s:02d}", edge=edge_of[f"s{s:02d}"], x=x[subject == s], y=y[subject == s],
                      site=f"s{s:02d}") for s in np.unique(subject)]
    return Federation(name="uci_har", clients=clients, x_test=x_test, y_test=y_test, model="har_mlp",
                      model_options={"n_features": x.shape[1]}, classes=activity_labels(root))
