"""The edge side of secure aggregation: collect adverts, relay shares, collect masked inputs, unmask the sum.

Pure state machine; mqtt_driver.py moves the messages. Each `receive_*` raises ProtocolError for a message to
ignore (wrong round, unknown or misbehaving sender, replay, duplicate, too late) and never disturbs the round.
Each closing step (`roster`, `inboxes`, `unmask_request`, `finalize`) raises ProtocolError(SECAGG_ABORT) when too
few devices remain: the edge then learns nothing, rather than a wrong or a too-small sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import ProtocolError, Reason
from protocol.messages import verify_message
from protocol.secagg import crypto, shamir
from protocol.secagg.config import SecAggConfig
from protocol.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from protocol.secagg.quant import dequantize_sum, unpack
from protocol.secagg.view import RoundView, check_advert, seed_commitment


@dataclass(frozen=True)
class SecAggResult:
    """What a secure-aggregation round gives the edge: the unmasked sum, whose inputs are in it, who dropped."""

    sum: np.ndarray         # float32: sum of the survivors' clipped inputs (quantization error only)
    quantized: np.ndarray   # uint32: the exact sum of their quantized inputs in Z_(2^R)
    devices: list[str]      # whose inputs are in the sum
    dropped: list[str]      # who shared keys but is not in the sum (dropped out, or reported with a bad share)


def _abort(detail: str) -> ProtocolError:
    return ProtocolError(Reason.SECAGG_ABORT, detail)


class SecAggServer:
    """The edge's side of one secure-aggregation round: admits each step's messages, relays shares, unmasks the sum."""

    def __init__(self, edge_id: str, round_id: int, config: SecAggConfig, length: int,
                 directory: Mapping[str, Ed25519PublicKey]) -> None:
        """`length`: coordinates masked (the model size, or k under random-k sparsification)."""
        self.edge_id, self.round_id, self.config, self.length = edge_id, round_id, config, length
        self.directory = directory
        self._step = "advertise"
        self._nonces: set[bytes] = set()
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._bad: set[str] = set()
        self._reveals: dict[str, UnmaskShares] = {}
        self.view: RoundView | None = None
        self.survivors: list[str] = []
        self.dropped: list[str] = []
        self._survivor_set: set[str] = set()
        self._dropped_set: set[str] = set()

    # ------------------------------------------------------------ intake
    def _admit(self, msg, step: str, seen: Mapping[str, object], allowed) -> None:
        if (msg.edge_id, msg.round_id) != (self.edge_id, self.round_id):
            raise ProtocolError(Reason.WRONG_ROUND, f"{msg.edge_id}/{msg.round_id}")
        if msg.device_id not in self.directory:
            raise ProtocolError(Reason.UNKNOWN_SENDER, msg.device_id)
        if msg.nonce in self._nonces:
            raise ProtocolError(Reason.REPLAY, f"nonce from {msg.device_id} seen before")
        verify_message(msg, self.directory[msg.device_id])
        self._nonces.add(msg.nonce)
        if self._step != step:
            raise ProtocolError(Reason.DEADLINE, f"{step} message after the step closed")
        if msg.device_id in seen:
            raise ProtocolError(Reason.DUPLICATE, f"{msg.device_id} already sent its {step} message")
        if allowed is not None and msg.device_id not in allowed:
            raise ProtocolError(Reason.SECAGG_ABORT, f"{msg.device_id} is not in this step of the round")

    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._admit(msg, "advertise", self._adverts, None)
        check_advert(msg, self.directory)
        self._adverts[msg.device_id] = msg

    def roster(self) -> Roster:
        """Close key advertisement (U1)."""
        self._step = "shares"
        roster = Roster(self.edge_id, self.round_id, self.config.to_dict(), self.length, list(self._adverts.values()))
        self.view = RoundView.from_roster(roster, self.directory)
        return roster

    def receive_shares(self, msg: ShareKeys) -> None:
        self._admit(msg, "shares", self._shares, self.view.adverts if self.view else ())
        recipients = [s.recipient for s in msg.shares]
        if any(s.sender != msg.device_id for s in msg.shares) or \
                sorted(recipients) != sorted(self.view.neighbours[msg.device_id]):
            raise ProtocolError(Reason.MALFORMED, f"{msg.device_id}'s shares do not cover exactly its neighbours")
        self._shares[msg.device_id] = msg

    def inboxes(self) -> dict[str, ShareInbox]:
        """Close key sharing (U2) and route every sealed share to its recipient."""
        self._step = "masked"
        if len(self._shares) < self.config.min_cohort:
            raise _abort(f"{len(self._shares)} devices shared keys < min_cohort {self.config.min_cohort}")
        boxes: dict[str, list] = {d: [] for d in self._shares}
        for msg in self._shares.values():
            for share in msg.shares:
                if share.recipient in boxes:
                    boxes[share.recipient].append(share)
        return {d: ShareInbox(self.edge_id, self.round_id, d, shares) for d, shares in boxes.items()}

    def receive_masked(self, msg: MaskedInput) -> None:
        self._admit(msg, "masked", self._masked, self._shares)
        if not set(msg.bad_senders) <= set(self.view.neighbours[msg.device_id]):
            raise ProtocolError(Reason.MALFORMED, f"{msg.device_id} reports non-neighbours")
        self._masked[msg.device_id] = unpack(msg.data, self.length, self.view.ring_bits)
        self._bad.update(msg.bad_senders)

    def unmask_request(self) -> UnmaskRequest:
        """Close masked input (U3): devices reported with a bad share are dropped like dropouts."""
        self._step = "reveal"
        self.survivors = [d for d in self._masked if d not in self._bad]
        self._survivor_set = set(self.survivors)
        self.dropped = [d for d in self._shares if d not in self._survivor_set]
        self._dropped_set = set(self.dropped)
        if len(self.survivors) < self.config.min_cohort:
            raise _abort(f"{len(self.survivors)} masked inputs < min_cohort {self.config.min_cohort}")
        alive = self._survivor_set
        for device in self._shares:
            holders = sum(h in alive for h in self.view.holders(device))
            if holders < self.view.threshold(device):
                raise _abort(f"only {holders} of {device}'s share holders survive, {self.view.threshold(device)} "
                             "needed")
        return UnmaskRequest(self.edge_id, self.round_id, list(self.survivors), list(self.dropped))

    def receive_unmask(self, msg: UnmaskShares) -> None:
        self._admit(msg, "reveal", self._reveals, self._survivor_set)
        holds = self.view.holds
        seeds_ok = all(d in self._survivor_set and holds(msg.device_id, d) for d in msg.seed_shares)
        keys_ok = all(d in self._dropped_set and holds(msg.device_id, d) for d in msg.key_shares)
        if not (seeds_ok and keys_ok):
            raise ProtocolError(Reason.MALFORMED, f"{msg.device_id} reveals shares it cannot hold")
        for share in (*msg.seed_shares.values(), *msg.key_shares.values()):
            shamir.share_from_bytes(share)
        self._reveals[msg.device_id] = msg

    # ------------------------------------------------------------ unmasking
    def _recover(self, device: str, field: str) -> bytes:
        """`device`'s secret from the first t revealed shares in roster order (so that most reconstructions share
        one set of points and one set of Lagrange coefficients)."""
        view = self.view
        t = view.threshold(device)
        points, shares = [], []
        for holder in view.holders(device):
            reveal = self._reveals.get(holder)
            share = getattr(reveal, field).get(device) if reveal else None
            if share is not None:
                points.append(view.index[holder])
                shares.append(shamir.share_from_bytes(share))
                if len(points) == t:
                    return shamir.reconstruct(points, np.stack(shares))
        raise _abort(f"{len(points)} shares of {device}'s {field.split('_')[0]} revealed, {t} needed")

    def finalize(self) -> SecAggResult:
        """Close unmasking; return the exact sum of the survivors' quantized inputs (and its float value)."""
        self._step = "done"
        view = self.view
        total = np.zeros(self.length, np.uint32)
        for device in self.survivors:
            total += self._masked[device]
        for device in self.survivors:
            seed = self._recover(device, "seed_shares")
            if seed_commitment(view.ctx, device, seed) != view.adverts[device].seed_commit:
                raise _abort(f"reconstructed seed of {device} does not match its commitment")
            total -= crypto.prg(seed, self.length)
        alive = self._survivor_set
        for device in self.dropped:
            key = X25519PrivateKey.from_private_bytes(self._recover(device, "key_shares"))
            if crypto.public_bytes(key) != view.adverts[device].s_pk:
                raise _abort(f"reconstructed mask key of {device} does not match its advert")
            for peer in view.neighbours[device]:
                if peer in alive:   # the survivor's mask for `device` is the negative of device's for it
                    view.add_pair_mask(total, device, key, peer)
        total &= view.modulus_mask
        return SecAggResult(dequantize_sum(total, len(self.survivors), self.config.clip, self.config.bits), total,
                            list(self.survivors), list(self.dropped))
