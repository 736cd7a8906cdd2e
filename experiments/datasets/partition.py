"""Partitioners for data without a natural split (or to stress one): Dirichlet label skew and quantity skew.
Pure functions of (labels, rng) -> list of index arrays, one per client; every sample goes to exactly one client."""

from __future__ import annotations

import numpy as np


def dirichlet_label_skew(y: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator,
                         min_size: int = 2) -> list[np.ndarray]:
    """Per class, split its samples over clients in proportions ~ Dir(alpha); small alpha = strong skew."""
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for label in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha))) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, np.int64)) for p in parts]
    raise ValueError(f"could not give every client {min_size} samples with alpha={alpha}")


def quantity_skew(n: int, n_clients: int, alpha: float, rng: np.random.Generator,
                  min_size: int = 2) -> list[np.ndarray]:
    """Client sizes ~ Dir(alpha) * n (labels IID): a few devices hold most of the data."""
    if n < n_clients * min_size:
        raise ValueError("not enough samples for the requested minimum size")
    shares = rng.dirichlet(np.full(n_clients, alpha))
    sizes = np.maximum(min_size, np.floor(shares * (n - n_clients * min_size)).astype(int) + min_size)
    sizes[np.argmax(sizes)] -= sizes.sum() - n
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(part) for part in np.split(rng.permutation(n), cuts)]
