"""Secure aggregation in the deployed hierarchy: what `RoundAnnouncement.secagg` announces, how a device turns its
delta into the vector it masks, and how the edge turns the unmasked sum back into a mean (docs/secagg.md,
"Deployment").

The announcement's table holds the SecAggConfig keys plus `seed` (random-k coordinates the cohort shares; absent =
every coordinate) and `density` (fraction of coordinates kept under random-k), and the edge tier's keys
(protocol/secagg/edge_tier.py, `trusted_edge` only). Only `mode = "untrusted_edge"` makes
devices mask; `trusted_edge` rounds stay on the plaintext path. The masked vector is the device's delta clipped to
L2 norm `clip` (the on-device bound the edge relies on, and the sensitivity of the sum), restricted to the cohort's
coordinates, plus two extra coordinates encoding the device's sample count and local steps on the quantization grid,
so the edge learns only the cohort's totals (weights for the cloud, FedNova's mean steps), never one device's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.errors import ProtocolError, Reason
from protocol.secagg.config import SecAggConfig
from protocol.secagg.edge_tier import EDGE_KEYS
from protocol.secagg.quant import levels, on_grid
from protocol.secagg.server import SecAggResult
from protocol.secagg.sparse import scatter, select

EXTRAS = 2   # sample count, local steps
STATISTICS_BITS = 24   # masked statistics: the finest grid SecAggConfig allows (cohorts up to 256 devices)


def statistics_table(base: dict, n_values: int, cohort: int = 0, site_rows_max: int = 1) -> dict:
    """The secagg table of a masked statistics round (docs/protocol.md "Statistics rounds"): `base`'s graph, k,
    threshold and min_cohort; devices mask (untrusted_edge) every coordinate (no random-k); each value is a total
    divided by site_rows_max, so in [0, 1], and clip = sqrt(n_values) keeps the L2 clip from ever binding. The grid
    is as fine as a cohort of `cohort` devices allows (the ring holds bits + log2(cohort) <= 32 bits; 0 = unknown:
    up to 4,096 devices); a site's row count must fit on that grid too (ProtocolError otherwise)."""
    table = {k: v for k, v in base.items() if k not in ("seed", "density", "clip", "bits", "mode", *EDGE_KEYS)}
    bits = min(STATISTICS_BITS, 32 - max(1, math.ceil(math.log2(max(cohort or 4096, 2)))))
    if site_rows_max > levels(bits):
        raise ProtocolError(Reason.BAD_VALUE, f"site_rows_max {site_rows_max} does not fit a {bits}-bit grid (at "
                                              f"most {levels(bits)} rows for a cohort of {cohort or 4096})")
    table.update(mode="untrusted_edge", clip=math.sqrt(max(n_values, 1)), bits=bits)
    SecAggConfig.from_dict(table)   # ProtocolError for unknown keys or bad values
    return table


@dataclass(frozen=True)
class MaskedRound:
    """A device-masked round's plan: how devices build the vectors they mask and the edge reads the sum back."""

    config: SecAggConfig
    seed: int | None = None      # random-k coordinates shared by the cohort; None = every coordinate
    density: float = 1.0         # fraction of coordinates masked under random-k

    @classmethod
    def from_announcement(cls, secagg: dict | None) -> MaskedRound | None:
        """The plan of a round whose devices mask (untrusted_edge); None for a plaintext round. ProtocolError for a
        malformed table."""
        if not secagg:
            return None
        data = {k: v for k, v in secagg.items() if k not in EDGE_KEYS}
        seed, density = data.pop("seed", None), data.pop("density", 1.0)
        if seed is not None and (type(seed) is not int or not 0 <= seed < 1 << 64):
            raise ProtocolError(Reason.BAD_VALUE, "secagg seed must be an integer in [0, 2^64)")
        if type(density) not in (int, float) or not 0 < density <= 1:
            raise ProtocolError(Reason.BAD_VALUE, "secagg density must be in (0, 1]")
        config = SecAggConfig.from_dict(data)
        return cls(config, seed, float(density)) if config.devices_mask else None

    def coordinates(self, n_params: int) -> int:
        return n_params if self.seed is None else max(1, min(n_params, round(self.density * n_params)))

    def length(self, n_params: int) -> int:
        """Values each device masks: the cohort's coordinates + the sample count and local steps."""
        return self.coordinates(n_params) + EXTRAS

    def device_vector(self, delta: np.ndarray, num_samples: int, local_steps: int) -> np.ndarray:
        """Clip `delta` to L2 norm `clip`, keep the cohort's coordinates, append the counts: the input of
        SecAggClient.masked_input."""
        clip = self.config.clip
        delta = np.asarray(delta, np.float64).ravel()
        norm = float(np.linalg.norm(delta))
        clipped = (delta * min(1.0, clip / norm) if norm > 0 else delta).astype(np.float32)
        kept = clipped if self.seed is None else select(clipped, self.seed, self.coordinates(delta.size))
        counts = on_grid([int(num_samples), int(local_steps)], clip, self.config.bits)
        return np.append(kept.astype(np.float64), counts)   # float64: a count's grid value stays exact

    def split(self, result: SecAggResult) -> tuple[np.ndarray, int, int]:
        """(the sum of the survivors' clipped deltas at the cohort's coordinates, their total samples, their total
        local steps) from the edge's SecAggResult. Totals are exact: device_vector keeps their grid values in
        float64, so stochastic quantization has nothing to round."""
        samples, steps = (int(v) for v in result.quantized[-EXTRAS:])
        return result.sum[:-EXTRAS], samples, steps

    def dense(self, values: np.ndarray, n_params: int) -> np.ndarray:
        """Values at the cohort's coordinates -> a dense float32 vector (zeros elsewhere under random-k)."""
        values = np.asarray(values, np.float32)
        return values if self.seed is None else scatter(values, self.seed, n_params)
