"""How much one device may weigh and move an edge's aggregate, by default and whatever the round's size.

The filters need `min_updates` peers; these bounds do not, so they hold at an edge of 1-3 devices too:

- admission (`check_update`): a `num_samples` above `max_samples` is refused (BAD_VALUE), and so is a delta whose
  L2 norm exceeds the absolute cap: `max_norm`, and (opt-in, `plan_slack` > 0, for fleets of real DP-SGD devices)
  with device DP-SGD in the announced plan (clip C > 0, noise z > 0) the plan's ceiling
  `plan_slack * lr * lr_scale * C * (K / b + steps z sqrt(d) / b)`: a Poisson DP-SGD step (docs/firmware_models.md)
  moves the weights by at most lr * (k C + ||noise||) / b with k the examples it sampled (k > b happens: Binomial(n,
  b / n)), ||noise|| ~ z C sqrt(d), steps = local_epochs * ceil(num_samples / b) capped by max_steps, and K = the
  round's sampled examples bounded with Bernstein's inequality, steps b + 7 sqrt(steps b) + 10 (exceeded with
  probability < 1e-9);
- closing (`round_bounds`): every delta is scaled down to `norm_multiple` x the reference norm and every
  `num_samples` counts at most `samples_multiple` x the reference count, the references being the lower median
  over the devices' latest values (this round's and remembered ones, protocol.bounds): one device, one vote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocol.bounds import reference, remember, scale_to
from protocol.errors import ProtocolError, Reason
from protocol.messages import TrainingPlan


@dataclass(frozen=True)
class BoundsConfig:
    """The edge's [bounds] table (configs/edge.toml): per-device norm and weight bounds, on by default."""

    norm_multiple: float = 1.0       # scale each delta to at most this x the reference norm; 0 = off
    samples_multiple: float = 1.0    # a device's num_samples weighs at most this x the reference count; 0 = off
    max_samples: int = 1_000_000     # refuse larger num_samples (BAD_VALUE)
    max_norm: float = 0.0            # refuse deltas with a larger L2 norm (BAD_VALUE); 0 = off
    plan_slack: float = 0.0          # > 0: refuse norms above this x the plan's DP-SGD ceiling (e.g. 4); 0 = off
    history: int = 1000              # devices whose latest norm and count are remembered

    def __post_init__(self) -> None:
        if min(self.norm_multiple, self.samples_multiple, self.max_norm, self.plan_slack) < 0 \
                or self.max_samples < 1 or self.history < 0:
            raise ValueError("bounds: need multiples, max_norm, plan_slack >= 0, max_samples >= 1, history >= 0")


@dataclass(frozen=True)
class RoundBounds:
    """What a closing round applies: per-update scale factors and sample counts, and the devices' latest values."""

    factors: np.ndarray              # (n,) in (0, 1]: delta_i is multiplied by it
    samples: np.ndarray              # (n,) float64: the counts the weights use
    norm_bound: float                # inf when off
    latest: dict[str, list[float]]   # device -> [norm, num_samples] after this round


def plan_cap(plan: TrainingPlan, n_params: int, num_samples: int, lr_scale: float, slack: float) -> float:
    """The largest L2 norm an honest DP-SGD delta can have under `plan` (x slack); inf without device DP noise."""
    if slack <= 0 or plan.clip <= 0 or plan.noise_mult <= 0:
        return math.inf
    steps = plan.local_epochs * math.ceil(num_samples / plan.batch_size)
    steps = max(min(steps, plan.max_steps) if plan.max_steps else steps, 1)
    expected = steps * plan.batch_size          # examples the round's Poisson steps sample, in expectation
    sampled = expected + 7.0 * math.sqrt(expected) + 10.0   # Bernstein: P(more) < 1e-9 (module docstring)
    lr = plan.lr * lr_scale
    return slack * lr * plan.clip * (sampled + steps * plan.noise_mult * math.sqrt(n_params)) / plan.batch_size


def check_update(norm: float, num_samples: int, cap: float, cfg: BoundsConfig) -> None:
    """Admission: ProtocolError(BAD_VALUE) for a count above max_samples or a norm above the absolute cap."""
    if num_samples > cfg.max_samples:
        raise ProtocolError(Reason.BAD_VALUE, f"num_samples {num_samples} > max_samples {cfg.max_samples}")
    cap = min(cap, cfg.max_norm) if cfg.max_norm > 0 else cap
    if not norm <= cap:
        raise ProtocolError(Reason.BAD_VALUE, f"update norm {norm:.4g} > cap {cap:.4g}")


def round_bounds(ids: list[str], norms: np.ndarray, samples: np.ndarray, latest: dict[str, list[float]],
                 cfg: BoundsConfig) -> RoundBounds:
    """The round's scale factors and counted samples against the references over `latest` updated by this round."""
    merged = remember(latest, {d: [float(x), float(n)] for d, x, n in zip(ids, norms, samples)}, max(cfg.history, 1))
    norm_bound = cfg.norm_multiple * reference(merged, 0) if cfg.norm_multiple > 0 else math.inf
    samples = np.asarray(samples, dtype=np.float64)
    if cfg.samples_multiple > 0:
        samples = np.minimum(samples, cfg.samples_multiple * reference(merged, 1))
    return RoundBounds(scale_to(norms, norm_bound), samples, norm_bound,
                       merged if cfg.history else {})
