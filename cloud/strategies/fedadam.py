"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvg whose server step is Adam.

Kept as a named strategy for the experiments' baselines; any strategy gets the same step with
`server_optimizer = "adam"` (cloud.strategies.server_opt), FedIoMT included.
"""

from __future__ import annotations

from cloud.strategies.base import RoundDefaults, Strategy


class FedAdam(Strategy):
    """FedAvg with Adam on the server: the mean delta as pseudo-gradient, its moments in the server state."""

    name = "fedadam"

    def __init__(self, defaults: RoundDefaults, server_lr: float = 0.01, server_optimizer: str = "adam",
                 **server) -> None:
        super().__init__(defaults, server_lr=server_lr, server_optimizer=server_optimizer, **server)
