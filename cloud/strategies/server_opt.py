"""Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al. 2019 for FedAvgM): how the
server turns a round's combined mean delta d (the pseudo-gradient is -d) into a step, composable with every strategy.

    sgd:       w += lr d
    momentum:  u = beta u + d;                                   w += lr u        (FedAvgM)
    adam:      m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2;   w += lr m / (sqrt(v) + tau)
    yogi:      m as adam;  v -= (1 - b2) d^2 sign(v - d^2);       w += lr m / (sqrt(v) + tau)

As in the paper there is no bias correction; tau bounds the step of coordinates that barely move. The state arrays
live in the strategy's ServerState (checkpointed with it), so a restarted cloud resumes the same trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")
MOMENTUM, FIRST, SECOND = "opt_momentum", "opt_m", "opt_v"


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimiser's settings: [strategy] server_optimizer, server_lr, server_momentum, beta1, beta2, tau."""

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"server_optimizer {self.name!r} not in {OPTIMIZERS}")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 \
                or self.tau <= 0:
            raise ValueError("server optimiser: need server_lr > 0, 0 <= server_momentum, beta1, beta2 < 1, tau > 0")

    def init(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """The optimiser's state arrays for a model of `weights`' shape (none for plain sgd)."""
        zeros = np.zeros_like(weights, dtype=np.float32)
        if self.name == "momentum":
            return {MOMENTUM: zeros}
        if self.name in ("adam", "yogi"):
            return {FIRST: zeros, SECOND: zeros.copy()}
        return {}

    def step(self, weights: np.ndarray, delta: np.ndarray,
             arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(new weights, new state arrays): one server step along the combined mean delta."""
        d = delta.astype(np.float32)
        if self.name == "sgd":
            return (weights + self.lr * d).astype(np.float32), {}
        if self.name == "momentum":
            u = (self.momentum * arrays[MOMENTUM] + d).astype(np.float32)
            return (weights + self.lr * u).astype(np.float32), {MOMENTUM: u}
        m = (self.beta1 * arrays[FIRST] + (1.0 - self.beta1) * d).astype(np.float32)
        d2 = np.square(d)
        v = arrays[SECOND]
        v = v + (1.0 - self.beta2) * (d2 - v) if self.name == "adam" else v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
        v = v.astype(np.float32)
        return (weights + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32), {FIRST: m, SECOND: v}
