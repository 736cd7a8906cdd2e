"""FedAvg (McMahan et al. 2017): the mean of the edges' mean deltas, weighted by their number of samples."""

from __future__ import annotations

from cloud.strategies.base import Strategy


class FedAvg(Strategy):
    """The baseline strategy: the base Strategy as it is (sample-weighted mean of the edges' deltas)."""

    name = "fedavg"
