"""FedProx (Li et al. 2020): FedAvg whose devices add mu/2 |w - w_global|^2 to their local loss (mu in the plan)."""

from __future__ import annotations

import dataclasses

from cloud.strategies.base import RoundDefaults, Strategy
from protocol.messages import TrainingPlan


class FedProx(Strategy):
    """FedAvg whose plan asks devices for the proximal term mu/2 |w - w_global|^2, which limits client drift."""

    name = "fedprox"

    def __init__(self, defaults: RoundDefaults, mu: float = 0.01, **server) -> None:
        super().__init__(defaults, **server)
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def plan(self) -> TrainingPlan:
        return dataclasses.replace(self.defaults.plan, mu=self.mu)
