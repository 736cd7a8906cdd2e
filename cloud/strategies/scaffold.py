"""SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift.

Devices step with (c - c_i) added to their gradient and report c_i+ - c_i; the server keeps c (sent with every
GlobalModel as `control`) and steps x with the server optimiser along mean(dx) and c += (|S| / N) * mean(dc),
where |S| is the number of devices that reported and N the population. The control bytes travel both ways, so they
are counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cloud.strategies.base import EdgeResult, ServerState, Strategy, weighted_mean
from protocol.messages import TrainingPlan

CONTROL = "control"


class Scaffold(Strategy):
    """SCAFFOLD: keeps the server control variate c, sent with each model, that devices use to correct client drift."""

    name = "scaffold"

    def init_state(self, weights: np.ndarray) -> ServerState:
        state = super().init_state(weights)
        state.arrays[CONTROL] = np.zeros_like(state.weights)
        return state

    def plan(self) -> TrainingPlan:
        return dataclasses.replace(self.defaults.plan, scaffold=True)

    def per_edge_inputs(self) -> list[str]:
        return ["each edge's control-variate delta (a second vector the edges do not mask)"]

    def apply(self, state: ServerState, results: list[EdgeResult], population: int) -> ServerState:
        new = super().apply(state, results, population)
        with_control = [dataclasses.replace(r, delta=r.control_delta) for r in results if r.control_delta is not None]
        reported = sum(r.num_devices for r in with_control)
        control = state.arrays[CONTROL]
        if reported and population > 0:
            mean_dc = weighted_mean(with_control, [float(r.num_devices) for r in with_control], control.size)
            control = (control + min(1.0, reported / population) * mean_dc).astype(np.float32)
        return new.replace(arrays={**new.arrays, CONTROL: control})
