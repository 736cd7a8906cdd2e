"""Who shares with whom: the complete graph (Bonawitz et al.) or SecAgg+'s random k-regular Harary graph.

SecAgg+ (Bell et al. 2020) places the devices on a ring in a random order and links each to its k/2 nearest on
either side. The order comes from a seed that hashes the round context and the whole roster, so every device
derives the same graph and the server cannot pick it after seeing the keys without changing the roster itself.
"""

from __future__ import annotations

import hashlib

import numpy as np


def graph_seed(ctx: bytes, roster: list[tuple[str, bytes]]) -> bytes:
    """roster: (device id, mask public key) in roster order."""
    h = hashlib.sha256(b"graph|" + ctx)
    for device, key in sorted(roster):
        h.update(device.encode() + b"|" + key)
    return h.digest()


def neighbours(devices: list[str], k: int, seed: bytes) -> dict[str, list[str]]:
    """Each device's neighbours (not itself) in `devices` order. k >= n-1 gives the complete graph; odd k is
    rounded up."""
    n = len(devices)
    if k >= n - 1:
        return {d: [e for e in devices if e != d] for d in devices}
    half = (k + 1) // 2
    order = np.random.default_rng(np.frombuffer(seed, np.uint32)).permutation(n)
    offsets = [off for off in range(-half, half + 1) if off]
    return {devices[order[p]]: [devices[i] for i in sorted(order[(p + off) % n] for off in offsets)] for p in range(n)}
