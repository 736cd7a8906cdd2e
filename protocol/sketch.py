"""Direction sketches of device updates: what lets the cloud compare an edge's aggregate with what most devices of
the whole federation agree on, without seeing any device's update.

An edge's own filters are statistics over its own devices, so attackers holding a majority of one edge own them,
and with two edges the cloud has no majority of edges to compare against (EXPERIMENTS.md "Poisoning"). Devices,
however, are a majority across edges. Each edge therefore sends, beside its aggregate, a k-dimensional count sketch
of every admitted update's unit direction (int8, k bytes a device), and the cloud leaves out an edge whose aggregate
points away from the coordinate-wise median of all edges' sketches (cloud.trust.sketch_cosines).

A count sketch (Charikar et al. 2002) hashes coordinate j into bucket h(j) with sign s(j), both fixed by a public
seed and the model size; inner products, and so cosines, are preserved in expectation with a standard deviation of
about 1/sqrt(k) for unit vectors. It reveals a device's update direction to within that resolution, a k-number
post-processing of the update: no more than the update itself reveals to the edge, but information the cloud
otherwise only has aggregated, so the edge does not send sketches under central (user-level) DP or secure
aggregation; nor under device DP-SGD, whose updates' directions are mostly noise (docs/cloud.md "Trust gates").
"""

from __future__ import annotations

import functools

import numpy as np

from protocol.errors import ProtocolError, Reason

SEED = 0x5EC7   # public: the hash and the signs are the same at every edge and the cloud
SCALE = 127.0   # int8 per component of a unit sketch (each component of a unit vector's sketch is <= 1 in size)


@functools.lru_cache(maxsize=8)
def _hashes(n_params: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([SEED, n_params, dims])
    return rng.integers(0, dims, n_params), rng.choice(np.array([-1.0, 1.0]), n_params)


def row_order(device_ids: list[str], filtered: list[str]) -> list[str]:
    """Whose sketch each row of an aggregate's `sketches` is: its device_ids, then the rest of its filtered."""
    counted = set(device_ids)
    return device_ids + [d for d in filtered if d not in counted]


def sketch(values: np.ndarray, dims: int, indices: np.ndarray | None = None, n_params: int = 0) -> np.ndarray:
    """The count sketch (float64, `dims` values) of a dense vector, or of a sparse one (`indices`, `values`) of
    `n_params` coordinates."""
    bucket, sign = _hashes(int(n_params if indices is not None else values.shape[0]), dims)
    if indices is not None:
        bucket, sign = bucket[indices], sign[indices]
    return np.bincount(bucket, weights=sign * np.asarray(values, np.float64), minlength=dims)


def unit_sketches(rows: list[tuple[np.ndarray | None, np.ndarray]], n_params: int, dims: int) -> bytes:
    """Each (indices or None, values) row's direction sketched and quantized: int8 bytes, `dims` per row (a zero or
    non-finite row: zeros)."""
    out = np.zeros((len(rows), dims), np.int8)
    for i, (indices, values) in enumerate(rows):
        s = sketch(values, dims, indices, n_params)
        norm = float(np.linalg.norm(s))
        if norm > 0 and np.isfinite(norm):
            out[i] = np.round(np.clip(s / norm, -1.0, 1.0) * SCALE).astype(np.int8)
    return out.tobytes()


def decode_sketches(data: bytes, dims: int, max_rows: int) -> np.ndarray:
    """(rows, dims) float64 from the wire; refuses a length that is not whole rows or more rows than `max_rows`."""
    if dims <= 0 or len(data) % dims:
        raise ProtocolError(Reason.BAD_SHAPE, f"{len(data)} sketch bytes are not rows of {dims}")
    rows = len(data) // dims
    if rows > max_rows:
        raise ProtocolError(Reason.BAD_VALUE, f"{rows} sketches for {max_rows} admitted updates")
    return np.frombuffer(data, np.int8).reshape(rows, dims).astype(np.float64) / SCALE
