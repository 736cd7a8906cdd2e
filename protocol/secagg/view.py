"""What a device and the edge both derive from a roster: the valid adverts, share points, graph and ring.

Both sides run the same code on the same roster message, so they agree on who is in the round, who shares with
whom, the Shamir points (1-based roster positions) and the ring size, without any further negotiation.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import ProtocolError, Reason
from protocol.messages import verify_message
from protocol.secagg import crypto
from protocol.secagg.config import SecAggConfig
from protocol.secagg.graph import graph_seed, neighbours
from protocol.secagg.messages import AdvertiseKeys, Roster
from protocol.secagg.quant import ring_bits


def seed_commitment(ctx: bytes, device_id: str, seed: bytes) -> bytes:
    return hashlib.sha256(b"seed|" + ctx + b"|" + device_id.encode() + b"|" + seed).digest()


def check_advert(advert: AdvertiseKeys, directory: Mapping[str, Ed25519PublicKey]) -> None:
    if advert.device_id not in directory:
        raise ProtocolError(Reason.UNKNOWN_SENDER, f"{advert.device_id} is not enrolled")
    verify_message(advert, directory[advert.device_id])


@dataclass(frozen=True)
class RoundView:
    """The round as both sides derive it from the roster (members, share points, neighbours, ring), so they agree."""

    ctx: bytes
    config: SecAggConfig
    length: int
    adverts: dict[str, AdvertiseKeys]    # roster order
    index: dict[str, int]                # Shamir point of each device (1-based)
    neighbours: dict[str, list[str]]
    ring_bits: int
    directory: Mapping[str, Ed25519PublicKey]

    @classmethod
    def from_roster(cls, roster: Roster, directory: Mapping[str, Ed25519PublicKey]) -> RoundView:
        """Adverts from an unknown or repeated sender or of another round are left out, the same way on every
        device; fewer than `min_cohort` remaining abort. Signatures are checked where keys are used (`verify`):
        the edge checks every advert on arrival, a device only its neighbours', so SecAgg+ stays O(k) per device."""
        config = SecAggConfig.from_dict(roster.config)
        ctx = crypto.context(roster.edge_id, roster.round_id)
        adverts: dict[str, AdvertiseKeys] = {}
        for advert in roster.adverts:
            if (advert.edge_id, advert.round_id) == (roster.edge_id, roster.round_id) and \
                    advert.device_id in directory and advert.device_id not in adverts:
                adverts[advert.device_id] = advert
        if len(adverts) < config.min_cohort:
            raise ProtocolError(Reason.SECAGG_ABORT, f"{len(adverts)} valid devices < min_cohort {config.min_cohort}")
        devices = list(adverts)
        seed = graph_seed(ctx, [(d, adverts[d].s_pk) for d in devices])
        return cls(ctx, config, roster.length, adverts, {d: i + 1 for i, d in enumerate(devices)},
                   neighbours(devices, config.degree(len(devices)), seed), ring_bits(config.bits, len(devices)),
                   directory)

    def verify(self, devices: list[str]) -> None:
        """A forged advert in the roster means the edge lies: abort rather than share with a key it chose."""
        for device in devices:
            try:
                check_advert(self.adverts[device], self.directory)
            except ProtocolError as exc:
                raise ProtocolError(Reason.SECAGG_ABORT, f"roster advert of {device}: {exc}") from None

    @property
    def modulus_mask(self) -> np.uint32:
        return np.uint32((1 << self.ring_bits) - 1)

    def holders(self, device: str) -> list[str]:
        """Who holds shares of `device`'s secrets: its neighbours and itself, in roster order."""
        others = self.neighbours[device]
        at = bisect_left([self.index[d] for d in others], self.index[device])
        return [*others[:at], device, *others[at:]]

    def holds(self, holder: str, device: str) -> bool:
        return holder == device or holder in self._neighbour_sets[device]

    @cached_property
    def _neighbour_sets(self) -> dict[str, frozenset[str]]:
        return {d: frozenset(n) for d, n in self.neighbours.items()}

    def threshold(self, device: str) -> int:
        return self.config.shares_needed(len(self.holders(device)))

    def add_pair_mask(self, total: np.ndarray, own: str, own_key: X25519PrivateKey, peer: str) -> None:
        """Add to `total` the pairwise mask `own` applies for `peer`: +PRG at the lower roster position, -PRG at the
        higher, so the pair cancels in the sum."""
        mask = crypto.prg(crypto.agree(own_key, self.adverts[peer].s_pk, b"mask", self.ctx), self.length)
        if self.index[own] < self.index[peer]:
            total += mask
        else:
            total -= mask
