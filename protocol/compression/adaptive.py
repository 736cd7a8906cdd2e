"""Adaptive compression ratio: the densest, finest setting whose worst-case size fits the cap and the link.

Policy (docs/compression.md):
  budget = min(max_message_bytes - envelope_bytes, bandwidth_bps / 8 * deadline_s * upload_share)
  walk the density ladder from the class's ceiling down; at each density try the class's bit widths from finest
  to coarsest; return the first whose guaranteed size bound (encoded_size_bound) is within the budget.
Density comes before bits because, with error feedback, dropping coordinates delays them while coarse rounding
adds noise to every coordinate sent; compute classes cap density because radio bytes dominate a wearable's
energy per round, and the smallest devices skip zlib.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.compression.codec import encoded_size_bound
from protocol.compression.settings import CompressionSettings
from protocol.errors import ProtocolError, Reason

DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001)


@dataclass(frozen=True)
class ComputeClass:
    """What a device class may send: its density ceiling, the bit widths to try and whether zlib is affordable."""

    max_density: float
    bits: tuple[int, ...]
    entropy: bool


# Keys are the compute classes devices report in protocol.messages.Capability.
COMPUTE_CLASSES = {
    "server": ComputeClass(1.0, (32, 8, 4), True),   # mains-powered: may send dense float32 when the link allows
    "pi": ComputeClass(0.1, (8, 4), True),           # Raspberry Pi class
    "phone": ComputeClass(0.1, (8, 4), True),        # battery, but a fast radio and CPU
    "wearable": ComputeClass(0.01, (8, 4), False),   # fewest radio bytes, no zlib on the smallest CPUs
}


def adaptive_settings(n_params: int, bandwidth_bps: float, compute_class: str, max_message_bytes: int,
                      deadline_s: float = 60.0, *, upload_share: float = 0.25, envelope_bytes: int = 1024,
                      method: str = "topk", seed: int | None = None) -> CompressionSettings:
    """Settings for one device this round; ProtocolError(TOO_LARGE) when even the sparsest setting does not fit.

    upload_share: the part of the round deadline the upload may use (the rest is training and queueing);
    envelope_bytes: the signed DeviceUpdate fields around the payload; method/seed: "randk" with the cohort's
    seed when the round uses secure aggregation.
    """
    if compute_class not in COMPUTE_CLASSES:
        raise ProtocolError(Reason.BAD_VALUE, f"compute class {compute_class!r} not in {sorted(COMPUTE_CLASSES)}")
    cls = COMPUTE_CLASSES[compute_class]
    budget = min(max_message_bytes - envelope_bytes, bandwidth_bps / 8 * deadline_s * upload_share)
    for density in DENSITIES:
        if density > cls.max_density:
            continue
        for bits in cls.bits:
            settings = CompressionSettings(method="dense" if density == 1.0 else method, density=density, bits=bits,
                                           seed=seed if method == "randk" else None, entropy=cls.entropy)
            if encoded_size_bound(n_params, settings) <= budget:
                return settings
    raise ProtocolError(Reason.TOO_LARGE, f"no setting fits {budget:.0f} bytes for {n_params} params")
