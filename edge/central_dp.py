"""Central (user-level) DP at the edge: each device's delta is clipped to L2 norm S and N(0, z^2 S^2) is added to
the weighted sum, once per aggregate.

How the mean is formed (fixed-denominator estimator): contribution weights are scaled into (0, 1] by their maximum,
omega_i = alpha_i / max_j alpha_j, so one device moves the sum by at most S whatever its weight. Then

    mean = (sum_i omega_i clip_S(delta_i) + N(0, z^2 S^2 I)) / W,   W = sum_i omega_i

W is computed from the round's metadata before any delta is read, never from the deltas, so the sensitivity of the
mean to any one device's delta is at most S / W and the noise on the mean has std z S / W. The cloud's accountant
composes (z, S, sampling rate) from the CentralDPReport attached to the aggregate; participation itself is not
hidden (device ids travel in the aggregate).

Two-level DP that credits the devices' noise (distributed DP, `credited` in edge.aggregate): when every device
clipped its noise-free delta to S on the device and then added independent Gaussian noise of std sigma_i (its last
DP-SGD step's, device.training `user_clip`), the weighted sum already carries N(0, sum_i (omega_i sigma_i)^2) that
nothing else in it depends on, so the edge adds only the top-up sqrt((z S)^2 - sum_i (omega_i sigma_i)^2) and does
not clip again. It is credited only where that argument holds: dense float32 device updates (lossy compression is
not Gaussian), no filter and no bound that inspects or rescales individual noised rows, honest devices (they clip
and add their noise, as in Kairouz et al. 2021). The report's noise_mult is then the sum's total (>= z) and the
aggregate's credited_noise_mult the devices' share of it. Two paths take the credit:
- plaintext rounds (edge.engine `_credited`, edge.aggregate `credited`): the edge sees each update with only its own
  sigma_i of noise, so the summed guarantee holds against the cloud (and whoever sees only the aggregate), and the
  edge is trusted;
- device-masked rounds (secure aggregation, `untrusted_edge`; protocol.secagg.deploy `MaskedRound.credit`,
  edge.secagg_round `credited_var`): devices mask their noised delta on a range wide enough for the noise and the
  edge only ever sees the cohort's sum, which carries sum_i sigma_i^2 (omega_i = 1: the mean is unweighted), so the
  user-level guarantee holds against the edge too. Truncation and rounding there are bounded in deploy's docstring.
The sigma_i formula is protocol.distributed_dp.last_step_std, shared with the devices that size their masked vector.

The Gaussian noise comes from the operating system's CSPRNG (os.urandom through Box-Muller), not from numpy's
seedable generators, so the noise cannot be reproduced from a leaked or guessed seed.
"""

from __future__ import annotations

import math
import os

import numpy as np

from protocol.messages import CentralDPReport


def secure_normal(n: int) -> np.ndarray:
    """n i.i.d. N(0, 1) float64 from os.urandom (Box-Muller on 53-bit uniforms in (0, 1])."""
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def top_up(noise_mult: float, clip: float, credited_var: float) -> float:
    """Distributed DP (Kairouz et al. 2021): the noise multiplier the edge still adds so that the sum carries
    N(0, (noise_mult * clip)^2) in total, given `credited_var` (per coordinate) already in it from the devices."""
    if clip <= 0:
        return 0.0
    return math.sqrt(max(0.0, (noise_mult * clip) ** 2 - credited_var)) / clip


def noisy_mean(weighted_sum: np.ndarray, weight_sum: float, clip: float, noise_mult: float,
               noise: np.ndarray | None = None) -> np.ndarray:
    """(sum + N(0, z^2 S^2)) / W; `noise` (standard normal, for tests) defaults to secure_normal."""
    if noise is None:
        noise = secure_normal(weighted_sum.shape[0])
    return (weighted_sum + noise_mult * clip * noise) / weight_sum


def report(clip: float, noise_mult: float, sampling_rate: float, num_clipped: int) -> CentralDPReport:
    return CentralDPReport(clip=float(clip), noise_mult=float(noise_mult),
                           sampling_rate=float(min(max(sampling_rate, 0.0), 1.0)), num_clipped=int(num_clipped))
