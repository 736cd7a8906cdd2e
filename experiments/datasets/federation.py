"""The shape every loader returns, and writing it out as device data directories."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Client:
    """One device's local data; `site` is the natural grouping (subject, hospital) and `edge` its gateway."""

    id: str
    edge: str
    x: np.ndarray
    y: np.ndarray
    site: str = ""


@dataclass
class Federation:
    """A dataset split into per-device clients plus a held-out test set: what every dataset loader returns."""

    name: str
    clients: list[Client]
    x_test: np.ndarray
    y_test: np.ndarray
    model: str                      # firmware model family that fits the data
    model_options: dict = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    schema: dict | None = None      # raw tabular features (protocol.features.FeatureSchema): NaN = missing, unscaled
    transform: dict | None = None   # the federated feature transform applied (protocol.features.FeatureTransform)

    @property
    def edges(self) -> list[str]:
        return sorted({c.edge for c in self.clients})

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All clients' training data together: the centralized baseline's training set."""
        return np.concatenate([c.x for c in self.clients]), np.concatenate([c.y for c in self.clients])

    def describe(self) -> str:
        """Class balance overall and per site, and the test set: what a user checks before trusting a run."""
        names = self.classes or [str(k) for k in range(int(max(c.y.max() for c in self.clients)) + 1)]

        def balance(y: np.ndarray) -> str:
            counts = np.bincount(y.astype(np.int64), minlength=len(names))
            return ", ".join(f"{n}: {k} ({100 * k / max(len(y), 1):.1f}%)" for n, k in zip(names, counts))

        x, y = self.pooled()
        lines = [f"{self.name}: {len(y)} training rows over {len(self.clients)} sites and {len(self.edges)} edges, "
                 f"{x.shape[1] if x.ndim == 2 else x.shape[1:]} features; {len(self.y_test)} test rows",
                 f"  classes (train): {balance(y)}", f"  classes (test):  {balance(self.y_test)}"]
        lines += [f"  site {c.site or c.id} (device {c.id}, edge {c.edge}): {len(c.y)} rows; {balance(c.y)}"
                  for c in self.clients]
        return "\n".join(lines)

    def validation_split(self, fraction: float = 0.15, seed: int = 0) -> Federation:
        """The federation for tuning: each client keeps 1 - `fraction` of its rows of every label and lends the rest
        to a pooled validation set that replaces the test set. Windowed time series (rows of rank > 1) lend each
        label's LAST rows, as their test split cuts recordings in time (overlapping windows never straddle the two
        sets); tabular rows lend a random share. Hyperparameters are chosen on it, never on the test set."""
        rng = np.random.default_rng(seed)
        clients, held_x, held_y = [], [], []
        for c in self.clients:
            held = np.zeros(len(c.y), bool)
            for label in np.unique(c.y):
                rows = np.flatnonzero(c.y == label)
                k = int(round(fraction * len(rows)))
                held[rows[len(rows) - k:] if c.x.ndim > 2 else rng.choice(rows, k, replace=False)] = True
            clients.append(Client(c.id, c.edge, c.x[~held], c.y[~held], c.site))
            held_x.append(c.x[held])
            held_y.append(c.y[held])
        return Federation(self.name, clients, np.concatenate(held_x), np.concatenate(held_y), self.model,
                          dict(self.model_options), list(self.classes), self.schema, self.transform)

    def write_device_dirs(self, root: Path) -> dict[str, Path]:
        """One directory per device with `train.npz` (x float32, y int64): the device agent's data schema."""
        paths = {}
        for client in self.clients:
            path = root / client.id
            path.mkdir(parents=True, exist_ok=True)
            np.savez(path / "train.npz", x=client.x.astype(np.float32), y=client.y.astype(np.int64))
            paths[client.id] = path
        return paths

    def write_test(self, path: Path) -> Path:
        np.savez(path, x=self.x_test.astype(np.float32), y=self.y_test.astype(np.int64))
        return path


def assign_edges(sites: list[str], n_edges: int) -> dict[str, str]:
    """Spread sites over `n_edges` gateways in contiguous blocks (edge1 gets the first sites, ...)."""
    ordered = sorted(sites, key=lambda s: (len(s), s))
    return {site: f"edge{1 + i * n_edges // len(ordered)}" for i, site in enumerate(ordered)}
