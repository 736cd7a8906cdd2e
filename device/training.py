"""One round of local training: DP-SGD in the interpreter, FedProx and SCAFFOLD variants, steps that fit a deadline.

No MQTT and no files here: the device agent and the experiments' large-scale simulator both call `train_round`.
Each step draws a batch of exactly `model.batch_size` distinct examples uniformly at random (the accountant uses
q = batch / n) and passes standard-normal noise drawn from `rng` -- the agent's generator is seeded from the OS
CSPRNG (device.runtime.secure_generator), so nobody can regenerate and subtract the noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol.messages import TrainingPlan


@dataclass(frozen=True)
class LocalResult:
    """One round of local training: the noised delta plus what the accountant, the update message and SCAFFOLD need."""

    delta: np.ndarray                     # local - global weights (flat float32, already DP-noised)
    num_samples: int
    local_steps: int
    loss: float                           # mean training loss over the steps (before each step)
    sample_rate: float                    # q = batch / n, for the accountant
    noise_mult: float
    elapsed_s: float
    control_delta: np.ndarray | None = None  # SCAFFOLD: c_i+ - c_i (option II of Karimireddy et al.)


def planned_steps(plan: TrainingPlan, num_samples: int, batch_size: int) -> int:
    """Steps the plan asks for: local_epochs passes over the data (in expectation), capped by max_steps."""
    steps = plan.local_epochs * math.ceil(num_samples / batch_size)
    return min(steps, plan.max_steps) if plan.max_steps else steps


def steps_within(steps: int, time_s: float, steps_per_s: float) -> int:
    """Adaptive local steps: how many of `steps` fit in `time_s` at the measured speed (all if unmeasured)."""
    if steps_per_s <= 0:
        return steps
    return max(0, min(steps, int(time_s * steps_per_s)))


def scaffold_control_delta(global_flat: np.ndarray, local_flat: np.ndarray, c_global: np.ndarray, steps: int,
                           lr: float) -> np.ndarray:
    """c_i+ - c_i where c_i+ = c_i - c + (x - y_i) / (K lr) (SCAFFOLD option II; c_i cancels)."""
    return (-c_global + (global_flat - local_flat) / (steps * lr)).astype(np.float32)


def train_round(model, x: np.ndarray, y: np.ndarray, global_flat: np.ndarray, plan: TrainingPlan, steps: int,
                rng: np.random.Generator, lr_scale: float = 1.0, time_limit_s: float = math.inf,
                c_global: np.ndarray | None = None, c_local: np.ndarray | None = None,
                should_stop: Callable[[], bool] | None = None) -> LocalResult:
    """Run up to `steps` DP-SGD steps from `global_flat`, stopping early (with what is done) when `time_limit_s` runs
    out or `should_stop()` says so.

    `model` is a device.runtime.TrainableModel (anything with its train_step/get_flat/set_flat/batch_size).
    SCAFFOLD (plan.scaffold) needs the server's c_global; c_local defaults to zeros.
    """
    n, batch = len(x), model.batch_size
    if n < batch:
        raise ValueError(f"{n} examples: fewer than one batch of {batch}")
    lr = plan.lr * lr_scale
    global_flat = np.asarray(global_flat, np.float32)
    control = None
    if plan.scaffold:
        if c_global is None:
            raise ValueError("SCAFFOLD round without the server control variate")
        c_local = np.zeros_like(global_flat) if c_local is None else c_local
        control = (c_global - c_local).astype(np.float32)
    model.set_flat(global_flat)
    start, losses = time.monotonic(), []
    for _ in range(steps):
        if losses and (time.monotonic() - start >= time_limit_s or (should_stop is not None and should_stop())):
            break
        idx = rng.choice(n, size=batch, replace=False)
        losses.append(model.train_step(x[idx], y[idx], None, lr, plan.clip, plan.noise_mult, mu=plan.mu,
                                       ref_flat=global_flat if plan.mu > 0 else None, control_flat=control,
                                       rng=rng))
    local = model.get_flat()
    done = len(losses)
    control_delta = None
    if plan.scaffold and done:
        control_delta = scaffold_control_delta(global_flat, local, c_global, done, lr)
    return LocalResult(delta=(local - global_flat).astype(np.float32), num_samples=n, local_steps=done,
                       loss=float(np.mean(losses)) if losses else math.nan, sample_rate=batch / n,
                       noise_mult=plan.noise_mult, elapsed_s=time.monotonic() - start, control_delta=control_delta)
