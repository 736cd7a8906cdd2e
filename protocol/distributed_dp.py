"""Distributed DP (Kairouz et al. 2021): the device noise an edge may credit toward its central (user-level) DP,
computed alike by the devices and the edges from the round announcement alone.

A device that clips its noise-free delta to the round's user-level clip S and then adds its last DP-SGD step's
Gaussian noise (device.training, `user_clip`) carries N(0, sigma_i^2) per coordinate that nothing else in its delta
depends on, sigma_i = `last_step_std(plan, lr_scale_i)`. The edge credits those variances instead of adding them
(edge.central_dp): in plaintext rounds per update (edge.engine `_credited`), in device-masked rounds for the
cohort's sum (protocol.secagg.deploy `MaskedRound.credit`, edge.secagg_round `credited_var`). The formula lives
here, below both tiers, so a device sizes its masked vector with exactly the sigma the edge credits.

A round whose plan calibrates each device's noise (`target_epsilon` > 0, device.training.calibrated_plan) has no
noise floor: a device with much data may add almost none, so nothing is credited there (`creditable`; the edge
adds its full central noise); plan.noise_mult still bounds the noise from above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from protocol.messages import TrainingPlan


def last_step_std(plan: TrainingPlan, lr_scale: float = 1.0) -> float:
    """Per-coordinate std of the Gaussian noise a device adds AFTER clipping its noise-free delta to the round's
    user-level clip (device.training, user_clip): its last DP-SGD step's noise, lr * noise_mult * clip / batch."""
    if plan.noise_mult <= 0 or plan.clip <= 0 or plan.batch_size <= 0:
        return 0.0
    return float(plan.lr * lr_scale * plan.noise_mult * plan.clip / plan.batch_size)


def creditable(plan: TrainingPlan) -> bool:
    """Whether the plan's device noise has a floor an edge may credit: device DP-SGD on, and not calibrated per
    device (module docstring)."""
    return plan.noise_mult > 0 and plan.target_epsilon <= 0


def device_stds(plan: TrainingPlan, lr_scale: Mapping[str, float], devices: Iterable[str]) -> np.ndarray:
    """last_step_std of each of `devices` under the announced per-device lr_scale (1 for a device not listed)."""
    return np.array([last_step_std(plan, lr_scale.get(d, 1.0)) for d in devices], dtype=np.float64)


def std_bounds(plan: TrainingPlan, lr_scale: Mapping[str, float]) -> tuple[float, float]:
    """(smallest, largest) last_step_std any device of the round can have: over the listed lr_scale values and 1
    (a device not listed), so both tiers get the same bounds without knowing who will survive."""
    scales = [1.0, *(float(v) for v in lr_scale.values())]
    return last_step_std(plan, min(scales)), last_step_std(plan, max(scales))
