"""Masked rounds at the edge (`mode = "untrusted_edge"`, docs/secagg.md "Deployment"): the edge is the SecAgg
server of its cohort, learns only the sum of the survivors' clipped deltas, and forwards their mean.

`SecAggRunner` runs the protocol's blocking steps in a worker thread on its own MQTT connection: the gateway's
connection acknowledges messages by hand after SQLite commits, and the protocol's messages need no durability (an
edge that crashes mid-protocol loses the round; the devices' spend is already on their disks). The gateway starts
it for each masked round and hands its outcome to `EdgeEngine.close_masked`. `masked_mean` is the pure part: no
filters (the edge never sees an update), and central DP calibrated to the on-device clip bound, the sensitivity of
the sum to one honest device.

The edge tier (`trusted_edge` with `edges_mask`, protocol/secagg/edge_tier.py): after closing its round as usual
(filters, clipping, central DP) the edge forwards only `metadata(aggregate)` in plaintext and masks its weighted
sum toward the cloud with `mask_for_cloud`, the cloud being the SecAgg server of the round's edges.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge import central_dp
from fediomt.logs import event
from protocol.errors import ProtocolError, Reason
from protocol.messages import EdgeAggregate
from protocol.secagg import SecAggClient, SecAggResult, SecAggServer
from protocol.secagg.deploy import MaskedRound
from protocol.secagg.mqtt_driver import run_client_round, run_server_round
from protocol.signing import load_public_key
from protocol.topics import CLOUD

if TYPE_CHECKING:
    from edge.engine import EdgeEngine


def masked_mean(result: SecAggResult, masked: MaskedRound, n_params: int,
                noise_mult: float) -> tuple[np.ndarray, int, int]:
    """(the dense mean delta of the survivors, their total samples, their total local steps). The mean is
    unweighted: weighting by sample counts would need each device's count (only their total is unmasked).
    With noise_mult > 0: N(0, (noise_mult * clip)^2) is added to the sum at the masked coordinates."""
    total, samples, steps = masked.split(result)
    n = len(result.devices)
    if noise_mult > 0:
        mean = central_dp.noisy_mean(total.astype(np.float64), n, masked.config.clip, noise_mult)
    else:
        mean = total.astype(np.float64) / n
    return masked.dense(mean.astype(np.float32), n_params), samples, steps


class SecAggRunner:
    """One masked round at a time, on `client` (connected, network loop running, automatic acknowledgements)."""

    def __init__(self, client: mqtt.Client, step_timeout_s: float, log: logging.Logger) -> None:
        self.client, self.step_timeout_s, self.log = client, step_timeout_s, log
        self.outcomes: queue.Queue[tuple[int, SecAggResult | ProtocolError]] = queue.Queue()
        self.started: int | None = None   # the last round started

    def maybe_start(self, engine: EdgeEngine) -> None:
        """Start the server side of the engine's open masked round, once per round."""
        ann, masked, ctx = engine.announcement, engine.masked, engine.ctx
        if masked is None or ctx is None or ctx.closed or ann.round_id == self.started:
            return
        keys = {}
        for device in sorted(engine.expected):
            try:
                keys[device] = engine.keys.get(device)
            except ProtocolError:
                continue
        self.start(SecAggServer(engine.cfg.edge_id, ann.round_id, masked.config, masked.length(ctx.n_params), keys))

    def start(self, server: SecAggServer, first_step_timeout_s: float | None = None) -> None:
        """Run `server`'s round in a worker thread; its outcome comes out of `finished`."""
        self.started = server.round_id
        event(self.log, "secagg round started", round=server.round_id, cohort=len(server.directory),
              length=server.length)
        threading.Thread(target=self._run, args=(server, first_step_timeout_s), name=f"secagg-{server.round_id}",
                         daemon=True).start()

    def _run(self, server: SecAggServer, first_step_timeout_s: float | None) -> None:
        try:
            outcome: SecAggResult | ProtocolError = run_server_round(self.client, server, self.step_timeout_s,
                                                                     first_step_timeout_s)
        except ProtocolError as exc:
            outcome = exc
        except Exception:  # a bug must not leave the round open forever
            self.log.exception("secagg round failed")
            outcome = ProtocolError(Reason.SECAGG_ABORT, "edge error")
        self.outcomes.put((server.round_id, outcome))

    def finished(self) -> list[tuple[int, SecAggResult | ProtocolError]]:
        out = []
        while not self.outcomes.empty():
            out.append(self.outcomes.get_nowait())
        return out


def metadata(agg: EdgeAggregate) -> EdgeAggregate:
    """What an edge forwards in plaintext when it masks toward the cloud: who took part, who was filtered, what was
    rejected, its central-DP report and device epsilon; none of its delta, counts, weights or per-device norms."""
    return dataclasses.replace(agg, num_samples=0, weight_sum=0.0, delta=b"", significant=False, mean_local_steps=0.0,
                               control_delta=None, update_norms={})


def mask_for_cloud(client: mqtt.Client, edge_id: str, round_id: int, key: Ed25519PrivateKey, keys_dir: Path,
                   vector: np.ndarray, deadline: float, step_timeout_s: float, log: logging.Logger) -> None:
    """Take part in the cloud's edge-tier round `round_id` with `vector` (blocking: run it in a thread). The other
    edges' identity keys come from `keys_dir` ({edge}.pub). Failures are logged: the cloud counts this edge as
    dropped."""
    try:
        directory = {p.stem: load_public_key(p) for p in sorted(Path(keys_dir).glob("*.pub"))}
        timeout_s = max(0.0, deadline - time.time()) + 4 * step_timeout_s
        outcome = run_client_round(client, SecAggClient(edge_id, CLOUD, round_id, key, directory), vector, timeout_s)
        event(log, "edge secagg done", round=round_id, edges_in_sum=len(outcome.survivors))
    except ProtocolError as exc:
        event(log, "edge secagg failed: this edge is not in the sum", logging.ERROR, round=round_id,
              reason=exc.reason.name, detail=exc.detail)
    except Exception:  # the daemon goes on; the cloud counts this edge as dropped
        log.exception("edge secagg failed")
