"""Secure-aggregation settings: graph, threshold, quantization, minimum cohort, trust mode.

Travels in `RoundAnnouncement.secagg` as a flat dict (`to_dict` / `from_dict`); the edge's TOML `[secagg]` table
has the same keys. See docs/secagg.md for the security/dropout trade-offs behind each default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

from protocol.errors import ProtocolError, Reason


class TrustMode(str, Enum):
    """Who may see one device's update in plaintext (docs/secagg.md, "Trust modes")."""

    TRUSTED_EDGE = "trusted_edge"      # devices -> edge in plaintext (filters run), SecAgg edge -> cloud
    UNTRUSTED_EDGE = "untrusted_edge"  # SecAgg devices -> edge; robustness from on-device clipping only


class Graph(str, Enum):
    """Who shares masks with whom: every pair (full, Bonawitz) or a random k-regular neighbourhood (sparse, SecAgg+)."""

    FULL = "full"      # Bonawitz et al. 2017: every device shares with every other
    SPARSE = "sparse"  # SecAgg+ (Bell et al. 2020): a random k-regular (Harary) neighbourhood


@dataclass(frozen=True)
class SecAggConfig:
    """One round's secure-aggregation parameters, validated on construction; travels in RoundAnnouncement.secagg."""

    graph: Graph = Graph.SPARSE
    k: int = 0                  # neighbours per device in sparse mode; 0 = auto: even ceil(3 log2 n), capped n-1
    threshold: float = 0.5      # t = floor(threshold * holders) + 1 of the holders (neighbours + self) of a secret
    min_cohort: int = 5         # privacy parameter: fewer survivors and the round aborts (the edge learns no sum)
    clip: float = 1.0           # inputs clipped to [-clip, clip] before quantization
    bits: int = 16              # quantization bits per coordinate
    mode: TrustMode = TrustMode.UNTRUSTED_EDGE      # key "mode" as in RoundAnnouncement.secagg

    def __post_init__(self) -> None:
        checks = [
            (0 < self.threshold < 1, "threshold must be in (0, 1)"),
            (self.min_cohort >= 2, "min_cohort must be >= 2"),
            (self.k >= 0, "k must be >= 0"),
            (math.isfinite(self.clip) and self.clip > 0, "clip must be > 0"),
            (1 <= self.bits <= 24, "bits must be in [1, 24]"),
        ]
        for ok, why in checks:
            if not ok:
                raise ProtocolError(Reason.BAD_VALUE, f"secagg config: {why}")

    @property
    def devices_mask(self) -> bool:
        """Devices run SecAgg toward the edge (untrusted edge), or send plaintext for the edge to filter."""
        return self.mode is TrustMode.UNTRUSTED_EDGE

    def degree(self, n: int) -> int:
        """Neighbours per device in a cohort of n."""
        if self.graph is Graph.FULL:
            return n - 1
        k = self.k or 2 * math.ceil(1.5 * math.log2(max(n, 2)))
        return min(n - 1, k)

    def shares_needed(self, holders: int) -> int:
        return min(holders, math.floor(self.threshold * holders) + 1)

    def to_dict(self) -> dict[str, int | float | str]:
        return {f.name: (v.value if isinstance(v, Enum) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: dict) -> SecAggConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if not set(data) <= names:
            raise ProtocolError(Reason.MALFORMED, f"secagg config: unknown keys {sorted(set(data) - names)}")
        try:
            values = dict(data)
            if "graph" in values:
                values["graph"] = Graph(values["graph"])
            if "mode" in values:
                values["mode"] = TrustMode(values["mode"])
            for name, kind in (("k", int), ("min_cohort", int), ("bits", int), ("threshold", float), ("clip", float)):
                if name in values and (type(values[name]) not in (kind, int) or isinstance(values[name], bool)):
                    raise ValueError(f"{name} must be a number")
        except ValueError as exc:
            raise ProtocolError(Reason.BAD_VALUE, f"secagg config: {exc}") from None
        return cls(**values)
