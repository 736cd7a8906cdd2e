"""Smartwatch shoulder-exercise recordings shipped in `seglearn` (10 subjects x 7 exercises x 2 sides, 50 Hz,
accelerometer + gyroscope). One device per subject, `wearable_cnn` on 2 s windows.

Each recording is cut in time: windows from its first 80% train, from the last 20% test (no window straddles the
cut), so every subject and exercise appears in both sets without leaking overlapping windows.
"""

from __future__ import annotations

import numpy as np

from experiments.datasets.federation import Client, Federation, assign_edges

WINDOW = 100   # 2 s at 50 Hz
# Per-channel calibration constants (acc in g, gyro in rad/s), fixed like a sensor spec rather than fitted on
# pooled data, so no client's statistics leak into another's preprocessing.
SCALE = np.array([1.0, 0.5, 0.5, 1.0, 2.5, 1.0], np.float32)


def windows(signal: np.ndarray, width: int = WINDOW, step: int = WINDOW // 2) -> np.ndarray:
    n = (len(signal) - width) // step + 1
    if n <= 0:
        return np.zeros((0, width, signal.shape[1]), np.float32)
    idx = np.arange(width)[None, :] + step * np.arange(n)[:, None]
    return signal[idx].astype(np.float32)


def load_watch_federation(n_edges: int = 2, test_fraction: float = 0.2) -> Federation:
    from seglearn.datasets import load_watch

    data = load_watch()
    per_subject: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    test_x, test_y = [], []
    for signal, label, subject in zip(data["X"], data["y"], data["subject"]):
        signal = np.asarray(signal, np.float32) / SCALE
        cut = int(len(signal) * (1 - test_fraction))
        train_w, test_w = windows(signal[:cut]), windows(signal[cut:])
        per_subject.setdefault(int(subject), []).append((train_w, np.full(len(train_w), label, np.int64)))
        test_x.append(test_w)
        test_y.append(np.full(len(test_w), label, np.int64))
    sites = [f"s{subject:02d}" for subject in sorted(per_subject)]
    edge_of = assign_edges(sites, n_edges)
    clients = []
    for subject in sorted(per_subject):
        xs, ys = zip(*per_subject[subject])
        site = f"s{subject:02d}"
        clients.append(Client(id=f"watch{subject:02d}", edge=edge_of[site], x=np.concatenate(xs),
                              y=np.concatenate(ys), site=site))
    return Federation(name="watch", clients=clients, x_test=np.concatenate(test_x), y_test=np.concatenate(test_y),
                      model="wearable_cnn", model_options={"n_classes": 7}, classes=list(data["y_labels"]))
