"""Poisoning attacks a malicious device can mount on its own update (used by the poisoning experiment).

- sign_flip: sends -delta (pushes the model away from its honest direction);
- scaling: sends `scale` * delta (boosting, to dominate the mean);
- label_flip: trains honestly on labels mapped y -> (C - 1 - y);
- noise: sends N(0, sigma^2 I) instead of a delta;
- replacement: model replacement / boosting (Bagdasaryan et al. 2020): sends -boost * delta, the step that would
  replace the global model by one `boost` honest steps backwards if the edge averaged it in unbounded;
- targeted: a fixed direction (`direction`, a unit vector chosen once per run, e.g. towards predicting one class)
  sent with the norm of the device's honest delta, so that no norm statistic sets it apart; with `spread` > 0 each
  device blurs the direction every round with its own random unit vector times `spread` (at 1: cosine 0.71 to the
  direction, ~0.5 between two attackers), the adaptive answer to the edge's collusion check (edge.filters.collusion).

Any kind may also claim `num_samples` (0: its true count), to buy weight (issue 18: 2^63 - 1 took a whole edge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("sign_flip", "scaling", "label_flip", "noise", "replacement", "targeted")


@dataclass(frozen=True)
class Poison:
    """A run's poisoning attack: its kind, the fraction of malicious devices and its strength."""

    kind: str
    fraction: float          # of devices that are malicious (drawn once per run)
    scale: float = 10.0      # scaling attack factor
    sigma: float = 1.0       # noise attack std per coordinate
    num_samples: int = 0     # the count malicious devices claim; 0 = their true one
    boost: float = 100.0     # replacement attack factor (applied to the sign-flipped delta)
    spread: float = 0.0      # targeted: weight of each device's own random unit vector blurring the direction
    direction: np.ndarray | None = field(default=None, compare=False, repr=False)   # targeted: a unit vector

    def __post_init__(self) -> None:
        if self.kind not in KINDS or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"poison kind {self.kind!r} not in {KINDS} or fraction {self.fraction} not in [0, 1]")
        if self.kind == "targeted" and (self.direction is None or not np.isfinite(self.direction).all()
                                        or not np.isclose(np.linalg.norm(self.direction), 1.0, atol=1e-4)):
            raise ValueError("a targeted poison needs a finite unit `direction`")


def malicious(ids: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    k = int(round(fraction * len(ids)))
    return set(rng.choice(ids, size=k, replace=False).tolist()) if k else set()


def flip_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    return (n_classes - 1 - y).astype(y.dtype)


def poison_delta(delta: np.ndarray, poison: Poison, rng: np.random.Generator) -> np.ndarray:
    """The update a malicious device sends in place of its (honestly trained) `delta`."""
    if poison.kind == "sign_flip":
        return (-delta).astype(np.float32)
    if poison.kind == "scaling":
        return (poison.scale * delta).astype(np.float32)
    if poison.kind == "noise":
        return (poison.sigma * rng.standard_normal(delta.shape[0])).astype(np.float32)
    if poison.kind == "replacement":
        return (-poison.boost * delta).astype(np.float32)
    if poison.kind == "targeted":
        way = poison.direction.astype(np.float64)
        if poison.spread > 0:
            blur = rng.standard_normal(way.shape[0])
            way = way + poison.spread * blur / np.linalg.norm(blur)
        return (way / np.linalg.norm(way) * np.linalg.norm(delta.astype(np.float64))).astype(np.float32)
    return delta
