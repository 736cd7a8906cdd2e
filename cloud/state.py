"""The aggregator's durable state: one atomic checkpoint file, so a kill -9 resumes at the last closed round.

Everything lives in a single NPZ (arrays + one JSON document), written with protocol.atomic.atomic_write: a crash
leaves the previous or the new checkpoint, never a mix. Accepted aggregates of the open round are kept as their
signed wire bytes in pending/ (also atomic), so a restart re-verifies and reuses them.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cloud.accounting import PrivacyLedger
from cloud.strategies.base import DeviceInfo, ServerState
from protocol.atomic import atomic_write

MAX_NONCES = 10_000  # replay window: aggregate nonces remembered across rounds


@dataclass
class CloudState:
    """What the cloud must survive a restart with, checkpointed as one NPZ so kill -9 resumes at the last round."""

    round_id: int                                    # the open (or next) round
    version: int                                     # the current global model version
    server: ServerState
    ledger: PrivacyLedger
    rng_state: dict
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    last_delta: dict[str, np.ndarray] = field(default_factory=dict)  # per edge: its last significant mean delta
    history: list[dict] = field(default_factory=list)               # one record per closed round
    nonces: list[str] = field(default_factory=list)                 # hex, most recent last
    min_local_examples: int = 0                      # smallest local dataset the edges reported (device DP q)
    announcement: bytes = b""                        # the signed announcement of the open round
    stop_reason: str = ""                            # set once the federation is over
    bounds: dict[str, list[float]] = field(default_factory=dict)   # per edge: latest [norm, samples/dev, weight/dev]
    run_id: str = ""                                 # this run's id (protocol.messages.new_run_id), in every
                                                     # round and model it publishes


def save(path: Path, s: CloudState) -> None:
    meta = {"round_id": s.round_id, "version": s.version, "ledger": s.ledger.to_dict(), "rng_state": s.rng_state,
            "devices": {k: asdict(v) for k, v in s.devices.items()}, "history": s.history,
            "nonces": s.nonces[-MAX_NONCES:], "min_local_examples": s.min_local_examples,
            "announcement": s.announcement.hex(), "stop_reason": s.stop_reason, "bounds": s.bounds,
            "run_id": s.run_id,
            "arrays": sorted(s.server.arrays), "edges": sorted(s.last_delta)}
    arrays = {"weights": s.server.weights, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    arrays.update({f"server_{k}": v for k, v in s.server.arrays.items()})
    arrays.update({f"edge_{k}": v for k, v in s.last_delta.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def load(path: Path) -> CloudState:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        server = ServerState(data["weights"].copy(), {k: data[f"server_{k}"].copy() for k in meta["arrays"]})
        last = {k: data[f"edge_{k}"].copy() for k in meta["edges"]}
    return CloudState(meta["round_id"], meta["version"], server, PrivacyLedger.from_dict(meta["ledger"]),
                      meta["rng_state"], {k: DeviceInfo(**v) for k, v in meta["devices"].items()}, last,
                      meta["history"], meta["nonces"], meta["min_local_examples"],
                      bytes.fromhex(meta["announcement"]), meta["stop_reason"], meta.get("bounds", {}),
                      meta.get("run_id", ""))
