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

Distributed DP (`MaskedRound.credit`, docs/secagg.md "Trust modes"): in a training round that announces central DP
(`central_dp.clip` > 0) while devices run DP-SGD, each device clips its noise-free delta to `clip` before its last
step's noise (device.training `user_clip`), so the edge can credit the cohort's noise, sum_i sigma_i^2 per
coordinate, instead of adding it. Then the masked vector is the NOISED delta with no L2 clip (clipping it would
scale the noise down with the signal), quantized on the wider per-coordinate range `clip + K sigma_max`
(K = NOISE_RANGE_SIGMAS, sigma_max the largest last-step std the announcement allows, protocol.distributed_dp):
- truncation: a noise-free coordinate is at most `clip` (L2 clip), so a coordinate is cut only where its noise
  exceeds K sigma_i; a coordinate beyond the range is still clipped to it (the ring must not overflow). The
  probability of any cut in a round is at most n * d * 2 Phi(-K) (~1.5e-15 for n * d = 1e8 at K = 10), a delta
  term far below the accounted delta.
- rounding: stochastic rounding onto the grid (step s = 2 range / (2^bits - 1)) happens after the noise. Not a
  sensitivity inflation; the bound relied on: P(round(y) = m) = s h(y - m) with h the triangular density on
  (-s, s), so a rounded coordinate is the grid sampling of the density of x_i + N(0, sigma_i^2) + T_i, T_i ~ h
  independent of the data; by Poisson summation, sampling such Gaussian-smoothed densities on the grid and summing
  them over the cohort departs from the continuous Sum x_i + N(0, Sum sigma_i^2) + Sum T_i (the Gaussian mechanism
  the cloud accounts, then data-independent noise) only by aliasing terms of order exp(-pi^2 sigma^2 / s^2) per
  coordinate and device, the order of Kairouz et al.'s tau for sums of discrete Gaussians. Credit therefore needs
  the smallest sigma the announcement allows to be at least MIN_NOISE_STEPS = 4 grid steps (terms < e^-157);
  otherwise the round is not credited and keeps the plain path.
The counts stay exact: they go on the same wider grid (`on_grid` with the range), which the edge's SecAggServer
quantizes with too (`wire_config`, carried in the roster).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from protocol.distributed_dp import creditable, std_bounds
from protocol.errors import ProtocolError, Reason
from protocol.messages import RoundAnnouncement
from protocol.secagg.config import SecAggConfig
from protocol.secagg.edge_tier import EDGE_KEYS
from protocol.secagg.quant import levels, on_grid
from protocol.secagg.server import SecAggResult
from protocol.secagg.sparse import scatter, select

EXTRAS = 2   # sample count, local steps
STATISTICS_BITS = 24   # masked statistics: the finest grid SecAggConfig allows (cohorts up to 256 devices)
NOISE_RANGE_SIGMAS = 10   # K: a credited round quantizes on [-(clip + K sigma_max), clip + K sigma_max]
MIN_NOISE_STEPS = 4.0     # credit only when every device's noise std is at least this many grid steps


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
    noise_std: float = 0.0       # distributed DP: the largest device noise std the edge credits; 0 = not credited

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

    @property
    def credited(self) -> bool:
        """Devices mask their noised delta (no L2 clip) and the edge credits their noise (module docstring)."""
        return self.noise_std > 0

    @property
    def wire_config(self) -> SecAggConfig:
        """The SecAggConfig devices quantize with and the edge's SecAggServer announces in its roster: `config`,
        with the per-coordinate range widened to clip + K sigma_max in a credited round."""
        if not self.credited:
            return self.config
        return dataclasses.replace(self.config, clip=self.config.clip + NOISE_RANGE_SIGMAS * self.noise_std)

    def step(self) -> float:
        """The quantization grid's step on `wire_config`."""
        wire = self.wire_config
        return 2 * wire.clip / levels(wire.bits)

    def credit(self, ann: RoundAnnouncement) -> MaskedRound:
        """This round with distributed DP switched on when `ann` allows it (a training round announcing central DP
        with clip > 0 while devices run DP-SGD, and the smallest device noise at least MIN_NOISE_STEPS grid steps of
        the widened range); unchanged otherwise. Pure: devices and edge derive the same from the announcement."""
        dp, plan = ann.central_dp, ann.plan
        if ann.statistics or dp is None or dp.clip <= 0 or not creditable(plan):
            return self
        low, high = std_bounds(plan, ann.lr_scale)
        credited = dataclasses.replace(self, noise_std=high)
        return credited if high > 0 and low >= MIN_NOISE_STEPS * credited.step() else self

    def coordinates(self, n_params: int) -> int:
        return n_params if self.seed is None else max(1, min(n_params, round(self.density * n_params)))

    def length(self, n_params: int) -> int:
        """Values each device masks: the cohort's coordinates + the sample count and local steps."""
        return self.coordinates(n_params) + EXTRAS

    def device_vector(self, delta: np.ndarray, num_samples: int, local_steps: int) -> np.ndarray:
        """Clip `delta` to L2 norm `clip`, keep the cohort's coordinates, append the counts: the input of
        SecAggClient.masked_input. In a credited round `delta` is already noised after a user-level clip on the
        device: only each coordinate is kept within the widened range (module docstring), the noise is not
        clipped."""
        wire = self.wire_config
        delta = np.asarray(delta, np.float64).ravel()
        if self.credited:
            clipped = np.clip(delta, -wire.clip, wire.clip).astype(np.float32)
        else:
            norm = float(np.linalg.norm(delta))
            clipped = (delta * min(1.0, wire.clip / norm) if norm > 0 else delta).astype(np.float32)
        kept = clipped if self.seed is None else select(clipped, self.seed, self.coordinates(delta.size))
        counts = on_grid([int(num_samples), int(local_steps)], wire.clip, wire.bits)
        return np.append(kept.astype(np.float64), counts)   # float64: a count's grid value stays exact

    def split(self, result: SecAggResult) -> tuple[np.ndarray, int, int]:
        """(the sum of the survivors' device_vector values at the cohort's coordinates, their total samples, their
        total local steps) from the edge's SecAggResult. Totals are exact: device_vector keeps their grid values in
        float64, so stochastic quantization has nothing to round."""
        samples, steps = (int(v) for v in result.quantized[-EXTRAS:])
        return result.sum[:-EXTRAS], samples, steps

    def dense(self, values: np.ndarray, n_params: int) -> np.ndarray:
        """Values at the cohort's coordinates -> a dense float32 vector (zeros elsewhere under random-k)."""
        values = np.asarray(values, np.float32)
        return values if self.seed is None else scatter(values, self.seed, n_params)


def masked_round(ann: RoundAnnouncement) -> MaskedRound | None:
    """The device-masked plan of a training round, credited for distributed DP where `ann` allows it (what both the
    device and the edge use); None for a plaintext round. ProtocolError for a malformed table."""
    masked = MaskedRound.from_announcement(ann.secagg)
    return None if masked is None else masked.credit(ann)
