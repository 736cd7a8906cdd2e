"""Model weights on the wire: an ordered list of float32 tensors, flattened in layout order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.errors import ProtocolError, Reason


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's layout: its shape fixes where it sits in the flat wire vector."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


Layout = list[TensorSpec]


def layout_size(layout: Layout) -> int:
    return sum(spec.size for spec in layout)


def layout_from_dicts(items: list[dict]) -> Layout:
    """Layout as stored in bundle manifests: [{"name": ..., "shape": [...]}, ...]."""
    return [TensorSpec(str(d["name"]), tuple(int(s) for s in d["shape"])) for d in items]


def layout_to_dicts(layout: Layout) -> list[dict]:
    return [{"name": spec.name, "shape": list(spec.shape)} for spec in layout]


def flatten(tensors: list[np.ndarray]) -> np.ndarray:
    if not tensors:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(t, np.float32).ravel() for t in tensors])


def unflatten(vector: np.ndarray, layout: Layout) -> list[np.ndarray]:
    vector = np.asarray(vector, np.float32)
    if vector.ndim != 1 or vector.size != layout_size(layout):
        raise ProtocolError(Reason.BAD_SHAPE, f"{vector.size} values for a layout of {layout_size(layout)}")
    out, offset = [], 0
    for spec in layout:
        out.append(vector[offset:offset + spec.size].reshape(spec.shape))
        offset += spec.size
    return out
