"""A verified GlobalModel message -> the weights a device or an edge holds. No MQTT, no files.

The cloud sends each version in full or as a compressed delta against the previous one (cloud model_encoding);
the device agent, the edge and the simulator all rebuild the weights here and check them against the message's
sha256, so a simulated device trains from exactly the bytes a real one would hold.

Catching up: a device that missed a version cannot apply the next delta. Its edge, which rebuilds every version,
keeps the latest one in full (retained, `protocol.topics.model_full_topic`), unsigned; the device takes it only
when version and sha256 equal those of a delta the cloud signed (`catch_up`), so the cloud's signature still
vouches for every weight the device trains from.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from protocol.compression import decode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import GlobalModel, bytes_to_floats, floats_to_bytes


def rebuild(msg: GlobalModel, held_version: int, held: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights, SCAFFOLD control or None) of `msg`, given the version and weights the device holds; ProtocolError
    STALE for a delta against another version (or weights of another size), BAD_HASH when the rebuilt weights do
    not match the digest."""
    if msg.encoding == "full":
        weights = bytes_to_floats(msg.weights, msg.n_params)
    elif msg.base_version == held_version and held is not None and held.size == msg.n_params:
        weights = held + decode_update(msg.weights, msg.n_params)
    else:
        raise ProtocolError(Reason.STALE, f"delta against v{msg.base_version}, we hold v{held_version}")
    if hashlib.sha256(floats_to_bytes(weights)).digest() != msg.sha256:
        raise ProtocolError(Reason.BAD_HASH, f"global model v{msg.model_version}: weights do not match sha256")
    return weights, _control(msg)


def _control(msg: GlobalModel) -> np.ndarray | None:
    return bytes_to_floats(msg.control, msg.n_params) if msg.control is not None else None


def in_full(msg: GlobalModel, weights: np.ndarray) -> GlobalModel:
    """The unsigned full form of `msg` (a verified model whose rebuilt `weights` are given): what an edge keeps
    retained for devices that missed a version. sha256, control and run stay the cloud's."""
    return dataclasses.replace(msg, encoding="full", base_version=None, weights=floats_to_bytes(weights), sig=b"")


def catch_up(full: GlobalModel, signed: GlobalModel) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights, control) of `signed` (a verified delta the device could not apply) from `full`, an unsigned full
    model of the same version from the edge: ProtocolError unless the two name the same run, model, version and
    sha256 and `full`'s weights hash to it. The control variate comes from the signed message."""
    if full.encoding != "full":
        raise ProtocolError(Reason.BAD_VALUE, f"catch-up model v{full.model_version} is a {full.encoding}, not full")
    same = (full.run_id, full.model_name, full.model_version, full.n_params, full.sha256)
    if same != (signed.run_id, signed.model_name, signed.model_version, signed.n_params, signed.sha256):
        raise ProtocolError(Reason.BAD_HASH, f"catch-up model v{full.model_version} is not the signed "
                                             f"v{signed.model_version}")
    weights, _ = rebuild(full, -1, None)
    return weights, _control(signed)
