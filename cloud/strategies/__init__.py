"""Server strategies, one per module, behind cloud.strategies.base.Strategy; `make` builds one from the config."""

from __future__ import annotations

from cloud.strategies.base import RoundDefaults, Strategy
from cloud.strategies.fedadam import FedAdam
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fediomt import FedIoMT
from cloud.strategies.fedprox import FedProx
from cloud.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, Scaffold, FedAdam, FedIoMT)}


def make(name: str, defaults: RoundDefaults, options: dict | None = None) -> Strategy:
    """The strategy `name` with keyword `options` (the [strategy] table of the config, minus `name`)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    try:
        return STRATEGIES[name](defaults, **(options or {}))
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: {exc}") from None
