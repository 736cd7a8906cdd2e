"""One round of local training: DP-SGD in the interpreter, FedProx and SCAFFOLD variants, steps that fit a deadline.

No MQTT and no files here: the device agent and the experiments' large-scale simulator both call `train_round`.

Sampling is Poisson, exactly what the accountant (protocol.accountant, dp-accounting's PoissonSampledDpEvent)
assumes: at every step each of the n examples joins independently with probability q = b / n (b = the expected
batch: the announced plan.batch_size, the same b the cloud's accountant and the edges' bounds use; the model's
batch capacity B only sizes the interpreter's calls), the clipped per-example gradients of the sampled examples are
summed and divided by the EXPECTED batch q * n = b (a constant fixed before sampling), and the Gaussian noise is
calibrated to the clip. The graph has a fixed capacity B: the sampled rows fill it with mask 1 and the rest is
padding with mask 0; a step that samples more than B examples is split into chunks that only accumulate their
clipped sums in the interpreter (apply = 0) and one last chunk that adds the noise and updates the weights
(apply = 1). So nothing is truncated, nothing is conditioned on the sample size, and every step is one Poisson-
subsampled Gaussian mechanism with sensitivity clip and noise std noise_mult * clip: the accounting is exact, not an
approximation (docs/firmware_models.md "Poisson sampling"). A step that samples nobody is a pure-noise step.

User-level clip for distributed DP (`user_clip` > 0, the round's central clip S): the LAST step is run twice, the
second time without noise, the round's noise-free delta is clipped to S on the device, and the last step's
Gaussian noise (std lr * noise_mult * clip / b per coordinate, fresh) is added after the clip. Example level: the
last step is still a Poisson-subsampled Gaussian with the same noise (the clip to S is a projection, 1-Lipschitz,
so one example still moves it by at most lr * clip / b). User level: the delta is clip_S(...) plus Gaussian noise
independent of everything else in it, so the edge can credit that noise (edge.central_dp.credited_noise). Noise
of earlier steps is never credited: later steps can undo it (their gradients depend on it).

The noise comes from `rng` -- the agent's generator is seeded from the OS CSPRNG (device.runtime.secure_generator),
so nobody can regenerate and subtract it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from protocol.accountant import Entry, calibrate
from protocol.messages import TrainingPlan


@dataclass(frozen=True)
class LocalResult:
    """One round of local training: the noised delta plus what the accountant, the update message and SCAFFOLD need."""

    delta: np.ndarray                     # local - global weights (flat float32, already DP-noised)
    num_samples: int
    local_steps: int
    loss: float                           # mean training loss over the steps (before each step)
    sample_rate: float                    # q = b / n: the Poisson rate each step really used, for the accountant
    noise_mult: float
    elapsed_s: float
    control_delta: np.ndarray | None = None  # SCAFFOLD: c_i+ - c_i (option II of Karimireddy et al.)


def planned_steps(plan: TrainingPlan, num_samples: int, batch_size: int) -> int:
    """Steps the plan asks for: local_epochs passes over the data (in expectation), capped by max_steps."""
    steps = plan.local_epochs * math.ceil(num_samples / batch_size)
    return min(steps, plan.max_steps) if plan.max_steps else steps


def privacy_limit(plan: TrainingPlan, budget_epsilon: float, delta: float) -> tuple[float, float]:
    """(epsilon, delta) the device must hold this round: its own budget, and under plan.target_epsilon also the
    federation's target, both at the smaller delta (a smaller delta only makes epsilon larger, so holding
    min(target, budget) at min(deltas) holds each at its own delta)."""
    if plan.target_epsilon <= 0:
        return budget_epsilon, delta
    return min(plan.target_epsilon, budget_epsilon), min(plan.target_delta, delta)


def calibrated_plan(plan: TrainingPlan, history: Sequence[Entry], num_samples: int, epsilon: float,
                    delta: float) -> TrainingPlan:
    """The plan with the noise this device adds: under `plan.target_epsilon` the least, at most plan.noise_mult,
    with which its `history` plus `plan.rounds_left` rounds of its own q = b / n and planned steps stay within
    (epsilon, delta) = privacy_limit(...) (protocol.accountant.calibrate); `plan` unchanged otherwise. The cloud
    derives the smallest device's noise with this same function (cloud.accounting.device_event)."""
    if plan.target_epsilon <= 0 or plan.noise_mult <= 0 or num_samples <= 0:
        return plan
    noise = calibrate(history, min(1.0, plan.batch_size / num_samples),
                      planned_steps(plan, num_samples, plan.batch_size), plan.rounds_left, epsilon, delta,
                      plan.noise_mult)
    return replace(plan, noise_mult=noise)


def steps_within(steps: int, time_s: float, steps_per_s: float) -> int:
    """Adaptive local steps: how many of `steps` fit in `time_s` at the measured speed (all if unmeasured)."""
    if steps_per_s <= 0:
        return steps
    return max(0, min(steps, int(time_s * steps_per_s)))


def scaffold_control_delta(global_flat: np.ndarray, local_flat: np.ndarray, c_global: np.ndarray, steps: int,
                           lr: float) -> np.ndarray:
    """c_i+ - c_i where c_i+ = c_i - c + (x - y_i) / (K lr) (SCAFFOLD option II; c_i cancels)."""
    return (-c_global + (global_flat - local_flat) / (steps * lr)).astype(np.float32)


def poisson_sample(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the examples that join one step: each of `n` independently with probability `q`."""
    return np.flatnonzero(rng.random(n) < q)


def chunks(idx: np.ndarray, capacity: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(row indices, mask) per `train` call for one Poisson step: the sampled rows in batches of `capacity`, the
    last one padded with row 0 at mask 0; an empty sample is one all-padding call (a pure-noise step)."""
    out = []
    for start in range(0, max(len(idx), 1), capacity):
        part = idx[start:start + capacity]
        mask = np.zeros(capacity, np.float32)
        mask[:len(part)] = 1.0
        out.append((np.concatenate([part, np.zeros(capacity - len(part), part.dtype)]).astype(np.int64), mask))
    return out


def poisson_step(model, x: np.ndarray, y: np.ndarray, idx: np.ndarray, denom: float, lr: float, clip: float,
                 noise_mult: float, mu: float, ref: np.ndarray | None, control: np.ndarray | None,
                 rng: np.random.Generator, noise: np.ndarray | None = None) -> float:
    """One DP-SGD step on the Poisson sample `idx` (split over calls when it exceeds the capacity): the mean loss
    of the sampled rows (nan when none). `noise` None: drawn from `rng` for the applying call."""
    parts = chunks(idx, model.batch_size)
    total = 0.0
    for j, (rows, mask) in enumerate(parts):
        last = j == len(parts) - 1
        loss = model.train_step(x[rows], y[rows], noise if last else None, lr, clip, noise_mult, mu=mu,
                                ref_flat=ref, control_flat=control, rng=rng, mask=mask, denom=denom, apply=last)
        total += loss * float(mask.sum())
    return total / len(idx) if len(idx) else math.nan


def clip_to(vec: np.ndarray, bound: float) -> np.ndarray:
    """`vec` scaled to L2 norm at most `bound` (float64 norm)."""
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    return vec if norm <= bound else (vec * (bound / norm)).astype(vec.dtype)


def train_round(model, x: np.ndarray, y: np.ndarray, global_flat: np.ndarray, plan: TrainingPlan, steps: int,
                rng: np.random.Generator, lr_scale: float = 1.0, time_limit_s: float = math.inf,
                c_global: np.ndarray | None = None, c_local: np.ndarray | None = None,
                should_stop: Callable[[], bool] | None = None, expected_batch: int | None = None,
                user_clip: float = 0.0) -> LocalResult:
    """Run up to `steps` Poisson-sampled DP-SGD steps from `global_flat`, stopping early (with what is done) when
    `time_limit_s` runs out or `should_stop()` says so.

    `model` is a device.runtime.TrainableModel (anything with its train_step/get_flat/set_flat/batch_size).
    SCAFFOLD (plan.scaffold) needs the server's c_global; c_local defaults to zeros. `expected_batch` (default
    plan.batch_size, the b the cloud and the edges account with; the model's capacity only sizes the graph's calls)
    sets q = b / n; `user_clip` > 0 clips the noise-free delta before the last step's noise (module docstring).
    """
    n, batch = len(x), int(expected_batch or plan.batch_size)
    if n < batch:
        raise ValueError(f"{n} examples: fewer than one batch of {batch} (the expected Poisson batch)")
    q = batch / n
    denom = float(batch)   # q * n, fixed before any sampling
    lr = plan.lr * lr_scale
    global_flat = np.asarray(global_flat, np.float32)
    control = None
    if plan.scaffold:
        if c_global is None:
            raise ValueError("SCAFFOLD round without the server control variate")
        c_local = np.zeros_like(global_flat) if c_local is None else c_local
        control = (c_global - c_local).astype(np.float32)
    model.set_flat(global_flat)
    ref = global_flat if plan.mu > 0 else None
    start, losses, done = time.monotonic(), [], 0
    before = idx = None
    for _ in range(steps):
        if done and (time.monotonic() - start >= time_limit_s or (should_stop is not None and should_stop())):
            break
        idx = poisson_sample(n, q, rng)
        if user_clip > 0:
            before = model.get_flat()
        losses.append(poisson_step(model, x, y, idx, denom, lr, plan.clip, plan.noise_mult, plan.mu, ref, control,
                                   rng))
        done += 1
    local = model.get_flat()
    if user_clip > 0 and done:
        # the last step again without its noise, the user-level clip, then fresh noise of the same std
        model.set_flat(before)
        poisson_step(model, x, y, idx, denom, lr, plan.clip, 0.0, plan.mu, ref, control, rng,
                     noise=np.zeros(len(global_flat), np.float32))
        clipped = clip_to(model.get_flat() - global_flat, user_clip)
        # never less than what the edge credits (protocol.distributed_dp.last_step_std divides by the plan's batch)
        std = lr * plan.noise_mult * plan.clip / min(denom, float(plan.batch_size))
        local = (global_flat + clipped + std * rng.standard_normal(len(global_flat))).astype(np.float32)
        model.set_flat(local)
    losses = [v for v in losses if math.isfinite(v)]
    control_delta = None
    if plan.scaffold and done:
        control_delta = scaffold_control_delta(global_flat, local, c_global, done, lr)
    return LocalResult(delta=(local - global_flat).astype(np.float32), num_samples=n, local_steps=done,
                       loss=float(np.mean(losses)) if losses else math.nan, sample_rate=q,
                       noise_mult=plan.noise_mult, elapsed_s=time.monotonic() - start, control_delta=control_delta)
