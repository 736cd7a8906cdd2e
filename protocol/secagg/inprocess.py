"""Run one secure-aggregation round with every party in this process (simulations, benchmarks, tests).

Messages go through `relay` (default: a CBOR encode/decode round trip, exactly what the wire does), so a caller can
also drop, tamper with or replay them. Devices in `drop_after_shares` vanish after sending their shares; those in
`drop_after_masked` after sending their masked input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import ProtocolError
from protocol.messages import decode, encode
from protocol.secagg.client import SecAggClient
from protocol.secagg.config import SecAggConfig
from protocol.secagg.server import SecAggResult, SecAggServer


def wire(msg):
    return decode(encode(msg), expect=type(msg))


def run_cohort(vectors: Mapping[str, np.ndarray], keys: Mapping[str, Ed25519PrivateKey], config: SecAggConfig,
               edge_id: str = "edge", round_id: int = 1, drop_after_shares: set[str] = frozenset(),
               drop_after_masked: set[str] = frozenset(), relay: Callable = wire,
               rng: np.random.Generator | None = None, client_type: type[SecAggClient] = SecAggClient,
               server_type: type[SecAggServer] = SecAggServer) -> SecAggResult:
    """`client_type` / `server_type`: subclasses that observe the parties (benchmarks time them)."""
    directory = {d: k.public_key() for d, k in keys.items()}
    length = len(next(iter(vectors.values())))
    server = server_type(edge_id, round_id, config, length, directory)
    clients = {d: client_type(d, edge_id, round_id, keys[d], directory, rng) for d in vectors}

    def deliver(receive, msg) -> None:
        try:
            receive(relay(msg))
        except ProtocolError:   # the edge ignores a bad message; the round goes on
            pass

    for client in clients.values():
        deliver(server.receive_advertise, client.advertise())
    roster = relay(server.roster())
    for client in clients.values():
        deliver(server.receive_shares, client.share_keys(roster))
    alive = {d: c for d, c in clients.items() if d not in drop_after_shares}
    inboxes = server.inboxes()
    for d, client in alive.items():
        if d in inboxes:
            deliver(server.receive_masked, client.masked_input(relay(inboxes[d]), vectors[d]))
    request = relay(server.unmask_request())
    for d, client in alive.items():
        if d not in drop_after_masked and d in request.survivors:
            deliver(server.receive_unmask, client.unmask(request))
    return server.finalize()
