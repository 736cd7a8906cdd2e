"""Random-k sparsification under masking: every device of a cohort sends the SAME k coordinates.

Masks only cancel coordinate by coordinate, so all devices must mask the same positions: the edge announces a seed
and each device keeps `randk_indices(seed, n, k)` (protocol.compression). Top-k cannot work here: each device's
top-k positions depend on its own update, so they differ between devices (the masks no longer line up) and
sending them would leak which coordinates of that device's update are large, the very thing masking hides.
"""

from __future__ import annotations

import numpy as np

from protocol.compression.sparsify import randk_indices


def select(vector: np.ndarray, seed: int, k: int) -> np.ndarray:
    """The k coordinates of `vector` that the cohort masks (then pass these to SecAggClient.masked_input)."""
    vector = np.asarray(vector, np.float32).ravel()
    return vector[randk_indices(seed, vector.size, k)]


def scatter(values: np.ndarray, seed: int, n_params: int) -> np.ndarray:
    """A dense float32 vector with the unmasked sum at the cohort's coordinates and zeros elsewhere."""
    out = np.zeros(n_params, np.float32)
    out[randk_indices(seed, n_params, len(values))] = values
    return out
