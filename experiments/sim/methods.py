"""The federated methods the experiments compare, as configurations of the project's real components.

A method is a cloud strategy (cloud.strategies) plus what it asks of devices (compression settings, whether a slow
device trains only the steps that fit before the deadline) and of edges (filters, weighting), and how the cloud
sends the global model down ("full" float32, or "delta": compressed against the previous version, every
`full_every`-th version in full, like the cloud daemon's `model_encoding = "delta"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edge.aggregate import FilterConfig
from edge.bounds import BoundsConfig
from edge.weighting import WeightingConfig
from protocol.compression import CompressionSettings

DENSE = CompressionSettings(method="dense", bits=32, entropy=False).to_dict()
SPARSE = CompressionSettings(method="topk", density=0.1, bits=8).to_dict()
DENSE4 = CompressionSettings(method="dense", bits=4).to_dict()
NO_FILTERS = FilterConfig(enabled=[])


@dataclass(frozen=True)
class Method:
    """One federated method under comparison: a strategy plus what it sets on devices, edges and the downlink."""

    name: str
    strategy: str
    options: dict = field(default_factory=dict)       # strategy keyword options (configs/cloud.toml [strategy])
    compression: dict = field(default_factory=lambda: dict(DENSE))
    filters: FilterConfig = NO_FILTERS
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)   # edge [bounds] (edge.bounds)
    partial_work: bool = False       # False: classic fixed local work, a slow device misses the deadline
    forward_compression: dict = field(default_factory=lambda: dict(DENSE))   # edge -> cloud (edge forward.compression)
    downlink: str = "full"           # "full" | "delta" (cloud model_encoding)
    downlink_compression: dict = field(default_factory=lambda: dict(SPARSE))  # cloud model_compression
    full_every: int = 5              # cloud model_full_every

    def with_(self, **changes) -> Method:
        return replace(self, **changes)


# FedIoMT's pipeline (EXPERIMENTS.md "Learning quality"): dense int4 updates up (error feedback), the aggregate
# forwarded in int4, the model's change down as dense int4 (server error feedback), and an Adam server step. Sparse
# top-k uplinks starve Adam's second moment, and a sparse downlink lags the server's model (top-25 %: -2.5 points
# on watch's validation split, 3 seeds; dense int8 matched a float32 downlink at 42 % of its bytes); int4 instead of
# int8 on every link scored within 0.006 of it on the three datasets' validation draws at 45-55 % of the bytes
# (experiments/results/v3/fediomt-int4).
FEDIOMT_OPTIONS = {"importance_sampling": True, "adaptive_lr": False, "adaptive_steps": False, "fednova": True,
                   "server_optimizer": "adam", "server_lr": 0.03}

METHODS: dict[str, Method] = {
    "fedavg": Method("fedavg", "fedavg"),
    "fedadam": Method("fedadam", "fedadam"),
    "fedprox": Method("fedprox", "fedprox", {"mu": 0.01}, partial_work=True),
    "scaffold": Method("scaffold", "scaffold"),
    "fediomt": Method("fediomt", "fediomt", dict(FEDIOMT_OPTIONS), dict(DENSE4),
                      FilterConfig(), partial_work=True, forward_compression=dict(DENSE4),
                      downlink="delta", downlink_compression=dict(DENSE4), full_every=20),
}
