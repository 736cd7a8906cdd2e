"""Admission of a device update, cheapest checks first, so that a flood of junk costs little CPU: the strict
decoder (and counts that fit the store's 64-bit integers: BAD_VALUE), topic/sender agreement, enrolment and
revocation (protocol.keyring), round, shape, then the Ed25519 signature or the per-(device, edge) HMAC tag
(`check_sig`), then "round closed" (DEADLINE: after the signature, so a forged late copy is never answered as an
accepted DUPLICATE), then the payload (`decode_delta`) and the edge's bounds (edge.bounds.check_update). Duplicates and
replays are refused last, by the store's INSERT constraints (edge/store.py). Every failure is a ProtocolError with a
Reason; the gateway turns it into a metric, a log line and a negative Ack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.rounds import RoundsConfig, staleness
from protocol.compression import decode_sparse
from protocol.errors import ProtocolError, Reason
from protocol.keyring import Enrolled, KeyRing
from protocol.messages import MAC_BYTES, DeviceUpdate, decode, verify_mac_raw, verify_raw

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class RoundContext:
    """What an update is checked against: the open round (sync) or the current model version (async)."""

    edge_id: str
    round_id: int
    model_version: int
    n_params: int
    cohort: frozenset[str]          # empty = everyone enrolled
    closed: bool                    # sync: the round already closed -> DEADLINE
    seed: int | None                # randk seed of the announced compression settings
    rounds: RoundsConfig


def authenticate(data: bytes, topic_device: str, ctx: RoundContext, keys: KeyRing, max_bytes: int,
                 accept_signatures: bool = True) -> tuple[DeviceUpdate, int]:
    """(the verified update, its staleness) or ProtocolError."""
    msg = decode(data, expect=DeviceUpdate, max_bytes=max_bytes)
    for name in ("num_samples", "local_steps"):   # the store keeps them as SQLite (64-bit signed) integers
        if getattr(msg, name) > INT64_MAX:
            raise ProtocolError(Reason.BAD_VALUE, f"{name} {getattr(msg, name)} > {INT64_MAX}")
    if msg.device_id != topic_device or msg.edge_id != ctx.edge_id:
        raise ProtocolError(Reason.WRONG_SENDER, f"{msg.device_id}@{msg.edge_id} published on {topic_device}"
                                                 f"@{ctx.edge_id}'s topic")
    entry = keys.entry(msg.device_id)
    if ctx.cohort and msg.device_id not in ctx.cohort:
        raise ProtocolError(Reason.UNKNOWN_SENDER, f"{msg.device_id} is not in round {ctx.round_id}'s cohort")
    if ctx.rounds.mode == "sync":
        if msg.round_id != ctx.round_id or msg.base_version != ctx.model_version:
            raise ProtocolError(Reason.WRONG_ROUND, f"round {msg.round_id} v{msg.base_version}, open is "
                                                    f"{ctx.round_id} v{ctx.model_version}")
        stale = 0
    else:
        if msg.round_id > ctx.round_id:
            raise ProtocolError(Reason.WRONG_ROUND, f"round {msg.round_id} is ahead of {ctx.round_id}")
        stale = staleness(ctx.model_version, msg.base_version, ctx.rounds)
    if msg.n_params != ctx.n_params:
        raise ProtocolError(Reason.BAD_SHAPE, f"n_params {msg.n_params}, model has {ctx.n_params}")
    check_sig(data, msg, entry, accept_signatures)
    if ctx.rounds.mode == "sync" and ctx.closed:   # after the signature: a forged copy is BAD_SIGNATURE, never
        raise ProtocolError(Reason.DEADLINE, f"round {ctx.round_id} already closed")   # acked as a DUPLICATE
    return msg, stale


def check_sig(data: bytes, msg: DeviceUpdate, entry: Enrolled, accept_signatures: bool) -> None:
    """A 32-byte `sig` is an HMAC tag under the device's key toward this edge, a 64-byte one an Ed25519 signature;
    `accept_signatures=False` makes a device that has a MAC key use it (the cheap path only)."""
    if len(msg.sig) == MAC_BYTES:
        if entry.mac is None:
            raise ProtocolError(Reason.BAD_SIGNATURE, f"{msg.device_id} sent a MAC but has no MAC key enrolled here")
        verify_mac_raw(data, msg, entry.mac)
    elif entry.mac is not None and not accept_signatures:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"{msg.device_id} has a MAC key here and must use it "
                                                  "(accept_signatures = false)")
    else:
        verify_raw(data, msg, entry.key)


def decode_delta(msg: DeviceUpdate, ctx: RoundContext) -> tuple[np.ndarray | None, np.ndarray]:
    """(int32 indices or None for dense, float32 values): strict payload decoding (shape, indices, finite). The
    signed payload's own header says how it was compressed (devices may pick adaptive settings when the announced
    ones do not fit); a seed-coded rand-k payload must use the announced seed."""
    idx, values = decode_sparse(msg.delta, ctx.n_params, ctx.seed)
    if idx.shape[0] == ctx.n_params:
        return None, values
    return idx.astype(np.int32), values
