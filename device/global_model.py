"""A verified GlobalModel message -> the weights a device trains from. No MQTT, no files.

The cloud sends each version in full or as a compressed delta against the previous one (cloud model_encoding);
the device agent and the simulator both rebuild the weights here and check them against the message's sha256, so
a simulated device trains from exactly the bytes a real one would hold.
"""

from __future__ import annotations

import hashlib

import numpy as np

from protocol.compression import decode_update
from protocol.errors import ProtocolError, Reason
from protocol.messages import GlobalModel, bytes_to_floats, floats_to_bytes


def rebuild(msg: GlobalModel, held_version: int, held: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights, SCAFFOLD control or None) of `msg`, given the version and weights the device holds; ProtocolError
    STALE for a delta against another version, BAD_HASH when the rebuilt weights do not match the digest."""
    if msg.encoding == "full":
        weights = bytes_to_floats(msg.weights, msg.n_params)
    elif msg.base_version == held_version and held is not None:
        weights = held + decode_update(msg.weights, msg.n_params)
    else:
        raise ProtocolError(Reason.STALE, f"delta against v{msg.base_version}, we hold v{held_version}")
    if hashlib.sha256(floats_to_bytes(weights)).digest() != msg.sha256:
        raise ProtocolError(Reason.BAD_HASH, f"global model v{msg.model_version}: weights do not match sha256")
    control = bytes_to_floats(msg.control, msg.n_params) if msg.control is not None else None
    return weights, control
