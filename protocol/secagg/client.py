"""The device side of secure aggregation as a state machine: advertise -> share_keys -> masked_input -> unmask.

Pure: each step consumes the edge's message and returns the device's next message; the transport lives in
mqtt_driver.py. Any violation by the edge (wrong round, a roster without our keys, an unmask request that would
reveal both secrets of one device) raises ProtocolError and the device stops taking part in the round.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import ProtocolError, Reason
from protocol.messages import new_nonce, sign_message
from protocol.secagg import crypto, shamir
from protocol.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    SealedShare,
    ShareInbox,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from protocol.secagg.quant import pack, quantize
from protocol.secagg.view import RoundView, seed_commitment


class SecAggClient:
    """One device's side of a secure-aggregation round: checks each edge message and returns its next signed message."""

    def __init__(self, device_id: str, edge_id: str, round_id: int, identity_key: Ed25519PrivateKey,
                 directory: Mapping[str, Ed25519PublicKey], rng: np.random.Generator | None = None) -> None:
        """`directory`: the identity keys of the cohort's devices (to check the adverts the roster relays)."""
        self.device_id, self.edge_id, self.round_id = device_id, edge_id, round_id
        self._identity, self._directory, self._rng = identity_key, directory, rng
        self._ctx = crypto.context(edge_id, round_id)
        self._c_key, self._s_key = crypto.new_private_key(), crypto.new_private_key()
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self._step = "advertise"
        self.view: RoundView | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}   # device -> (its seed share, its mask-key share) we hold
        self._masked_with: set[str] = set()
        self._share_keys: dict[str, bytes] = {}           # neighbour -> AEAD key (same both ways)

    def _enter(self, step: str, after: str, edge_id: str, round_id: int) -> None:
        if (edge_id, round_id) != (self.edge_id, self.round_id):
            raise ProtocolError(Reason.WRONG_ROUND, f"{edge_id}/{round_id} is not {self.edge_id}/{self.round_id}")
        if self._step != after:
            raise ProtocolError(Reason.SECAGG_ABORT, f"{step} requested while at step {self._step}")
        self._step = step

    def _sign(self, msg):
        return sign_message(msg, self._identity)

    def advertise(self) -> AdvertiseKeys:
        self._enter("advertised", "advertise", self.edge_id, self.round_id)
        return self._sign(AdvertiseKeys(
            self.edge_id, self.round_id, self.device_id, crypto.public_bytes(self._c_key),
            crypto.public_bytes(self._s_key), seed_commitment(self._ctx, self.device_id, self._seed), new_nonce()))

    def share_keys(self, roster: Roster) -> ShareKeys:
        self._enter("shared", "advertised", roster.edge_id, roster.round_id)
        view = RoundView.from_roster(roster, self._directory)
        mine = view.adverts.get(self.device_id)
        if mine is None or (mine.c_pk, mine.s_pk) != (crypto.public_bytes(self._c_key),
                                                      crypto.public_bytes(self._s_key)):
            raise ProtocolError(Reason.SECAGG_ABORT, "the roster does not carry this device's keys")
        view.verify(view.holders(self.device_id))
        self.view = view
        holders = view.holders(self.device_id)
        xs = np.array([view.index[h] for h in holders])
        t = view.threshold(self.device_id)
        seed_shares = shamir.split(self._seed, xs, t)
        key_shares = shamir.split(crypto.private_bytes(self._s_key), xs, t)
        sealed = []
        for h, s_share, k_share in zip(holders, seed_shares, key_shares):
            plain = (shamir.share_to_bytes(s_share), shamir.share_to_bytes(k_share))
            if h == self.device_id:
                self._held[h] = plain
                continue
            key = self._share_keys[h] = crypto.agree(self._c_key, view.adverts[h].c_pk, b"share", self._ctx)
            nonce, ciphertext = crypto.seal(key, b"".join(plain), self._ctx, self.device_id, h)
            sealed.append(SealedShare(self.device_id, h, nonce, ciphertext))
        return self._sign(ShareKeys(self.edge_id, self.round_id, self.device_id, sealed, new_nonce()))

    def _open_inbox(self, inbox: ShareInbox) -> list[str]:
        """Keep the authentic shares; return the senders whose share failed (tampered, misaddressed, replayed)."""
        view, bad, nonces = self.view, [], set()
        neighbours = set(view.neighbours[self.device_id])
        for share in inbox.shares:
            sender = share.sender
            if sender not in neighbours:
                continue
            if sender in self._masked_with or share.nonce in nonces:   # a second copy: replayed, keep neither
                self._held.pop(sender, None)
                self._masked_with.add(sender)
                bad.append(sender)
                continue
            self._masked_with.add(sender)
            nonces.add(share.nonce)
            try:
                if share.recipient != self.device_id:
                    raise ProtocolError(Reason.WRONG_SENDER, f"share from {sender} addressed to {share.recipient}")
                plain = crypto.open_sealed(self._share_keys[sender], share.nonce, share.ciphertext, self._ctx,
                                           sender, self.device_id)
                if len(plain) != 2 * shamir.SHARE_BYTES:
                    raise ProtocolError(Reason.MALFORMED, f"share from {sender} has {len(plain)} bytes")
                self._held[sender] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
            except ProtocolError:
                bad.append(sender)
        return sorted(set(bad))

    def masked_input(self, inbox: ShareInbox, vector: np.ndarray) -> MaskedInput:
        """Mask with every neighbour whose share the edge relayed (authentic or not: the edge then drops the bad
        ones and removes their masks like a dropout's)."""
        self._enter("masked", "shared", inbox.edge_id, inbox.round_id)
        if inbox.device_id != self.device_id:
            raise ProtocolError(Reason.WRONG_SENDER, f"inbox of {inbox.device_id}")
        view = self.view
        vector = np.asarray(vector, np.float64).ravel()   # float64: grid counts stay exact
        if vector.size != view.length:
            raise ProtocolError(Reason.BAD_SHAPE, f"{vector.size} values, the round masks {view.length}")
        if not np.isfinite(vector).all():
            raise ProtocolError(Reason.NON_FINITE, "NaN or infinity in the update")
        bad = self._open_inbox(inbox)
        y = quantize(vector, view.config.clip, view.config.bits, self._rng)
        y += crypto.prg(self._seed, view.length)
        for peer in sorted(self._masked_with):
            view.add_pair_mask(y, self.device_id, self._s_key, peer)
        y &= view.modulus_mask
        return self._sign(MaskedInput(self.edge_id, self.round_id, self.device_id, pack(y, view.ring_bits), bad,
                                      new_nonce()))

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal seed shares of survivors and mask-key shares of dropped devices: never both for one device."""
        self._enter("unmasked", "masked", request.edge_id, request.round_id)
        survivors, dropped = set(request.survivors), set(request.dropped)
        known = set(self.view.adverts)
        if survivors & dropped or not (survivors | dropped) <= known or self.device_id not in survivors:
            raise ProtocolError(Reason.SECAGG_ABORT, "inconsistent unmask request")
        if len(survivors) < self.view.config.min_cohort:
            raise ProtocolError(Reason.SECAGG_ABORT, f"{len(survivors)} survivors < min_cohort")
        seeds = {d: s for d, (s, _) in self._held.items() if d in survivors}
        keys = {d: k for d, (_, k) in self._held.items() if d in dropped}
        return self._sign(UnmaskShares(self.edge_id, self.round_id, self.device_id, seeds, keys, new_nonce()))
