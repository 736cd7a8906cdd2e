"""Secure aggregation among edges (`mode = "trusted_edge"` with `edges_mask = true`, docs/secagg.md "Deployment"):
each edge masks the weighted sum of its round, the cloud unmasks only the sum over edges.

An edge's vector is `mean * w / max_samples` (w = its sample count, capped at `max_samples`; every coordinate
clipped to [-clip, clip]) plus two extra coordinates: `w / max_samples` on the quantization grid (stochastically
rounded, unbiased) and its device count (an exact integer of the grid, capped at 2^bits - 1). The cloud divides the
unmasked sum by the unmasked weight: the FedAvg mean over edges, weighted by their sample counts, without ever seeing
one edge's mean, count or weight. Error per coordinate of that mean: at most
`n_edges * (2 clip / (2^bits - 1)) * max_samples / total_samples`, so `max_samples` should be close to the largest
edge's sample count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.errors import ProtocolError, Reason
from protocol.secagg.config import SecAggConfig
from protocol.secagg.quant import levels, on_grid
from protocol.secagg.server import SecAggResult

EDGE_KEYS = ("edges_mask", "max_samples")   # the edge tier's keys in RoundAnnouncement.secagg
EXTRAS = 2                                  # weight (sample count / max_samples), device count


@dataclass(frozen=True)
class EdgeSum:
    """What the cloud learns from an edge-tier round: the sample-weighted mean over the edges in the sum."""

    mean: np.ndarray      # float32, dense
    num_samples: int      # their total sample count (+-1 per edge)
    num_devices: int      # their total device count
    edges: list[str]      # the edges in the sum
    dropped: list[str]    # edges that shared keys but are not in it


@dataclass(frozen=True)
class EdgeMaskedRound:
    """An edge-masked round's plan: how each edge encodes its weighted mean for masking, how the cloud decodes it."""

    config: SecAggConfig
    max_samples: int = 0      # weight scale: the largest sample count one edge carries; 0 = 2^bits - 1

    @classmethod
    def from_announcement(cls, secagg: dict | None) -> EdgeMaskedRound | None:
        """The edge tier's plan, or None when the edges do not mask. ProtocolError for a malformed table."""
        if not secagg or not secagg.get("edges_mask"):
            return None
        data = dict(secagg)
        edges_mask, max_samples = data.pop("edges_mask"), data.pop("max_samples", 0)
        if edges_mask is not True or type(max_samples) is not int or max_samples < 0:
            raise ProtocolError(Reason.BAD_VALUE, "secagg edges_mask must be true and max_samples an integer >= 0")
        if {"seed", "density"} & set(data):
            raise ProtocolError(Reason.BAD_VALUE, "secagg seed/density (random-k) do not apply to edges_mask")
        config = SecAggConfig.from_dict(data)
        if config.devices_mask:
            raise ProtocolError(Reason.BAD_VALUE, 'secagg edges_mask needs mode = "trusted_edge"')
        return cls(config, max_samples)

    @property
    def scale(self) -> int:
        return self.max_samples or levels(self.config.bits)

    def length(self, n_params: int) -> int:
        return n_params + EXTRAS

    def edge_vector(self, mean: np.ndarray, num_samples: int, num_devices: int) -> np.ndarray:
        """The input of the edge's SecAggClient.masked_input (an edge without updates masks a zero weight)."""
        clip, bits = self.config.clip, self.config.bits
        share = min(max(int(num_samples), 0), self.scale) / self.scale
        values = np.clip(np.asarray(mean, np.float64).ravel() * share, -clip, clip)
        extras = on_grid([share * levels(bits), int(num_devices)], clip, bits)
        return np.append(values, extras).astype(np.float32)

    def total(self, result: SecAggResult) -> EdgeSum:
        """The cloud's view of the unmasked sum (a zero mean when no edge in it had samples)."""
        weight_q, devices = (int(v) for v in result.quantized[-EXTRAS:])
        samples = weight_q * self.scale / levels(self.config.bits)
        values = result.sum[:-EXTRAS].astype(np.float64)
        mean = values * (self.scale / samples) if samples > 0 else np.zeros_like(values)
        return EdgeSum(mean.astype(np.float32), round(samples), devices, list(result.devices), list(result.dropped))
