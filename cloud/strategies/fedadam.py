"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server, the mean delta as -gradient.

    m = b1 m + (1 - b1) d;   v = b2 v + (1 - b2) d^2;   w += server_lr * m / (sqrt(v) + tau)

As in the paper there is no bias correction; tau bounds the step of coordinates that barely move.
"""

from __future__ import annotations

import numpy as np

from cloud.strategies.base import EdgeResult, RoundDefaults, ServerState, Strategy


def adam_step(weights: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, beta1: float,
              beta2: float, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(new weights, new m, new v): one server Adam step on the pseudo-gradient -delta."""
    m = beta1 * m + (1.0 - beta1) * delta
    v = beta2 * v + (1.0 - beta2) * np.square(delta)
    return (weights + lr * m / (np.sqrt(v) + tau)).astype(np.float32), m.astype(np.float32), v.astype(np.float32)


class FedAdam(Strategy):
    """Adam on the server (Reddi et al. 2021): the mean delta as pseudo-gradient, moments m, v in the server state."""

    name = "fedadam"

    def __init__(self, defaults: RoundDefaults, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(defaults, server_lr)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("FedAdam needs 0 <= beta1, beta2 < 1 and tau > 0")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def init_state(self, weights: np.ndarray) -> ServerState:
        state = super().init_state(weights)
        state.arrays.update(m=np.zeros_like(state.weights), v=np.zeros_like(state.weights))
        return state

    def apply(self, state: ServerState, results: list[EdgeResult], population: int) -> ServerState:
        delta = self.combine(results, state.weights.size)
        weights, m, v = adam_step(state.weights, delta, state.arrays["m"], state.arrays["v"], self.server_lr,
                                  self.beta1, self.beta2, self.tau)
        return state.replace(weights=weights, arrays={**state.arrays, "m": m, "v": v})
