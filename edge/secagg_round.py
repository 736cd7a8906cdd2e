"""Masked rounds at the edge (`mode = "untrusted_edge"`, docs/secagg.md "Deployment"): the edge is the SecAgg
server of its cohort, learns only the sum of the survivors' clipped deltas, and forwards their mean.

`SecAggRunner` runs the protocol's blocking steps in a worker thread on its own MQTT connection: the gateway's
connection acknowledges messages by hand after SQLite commits, and the protocol's messages need no durability (an
edge that crashes mid-protocol loses the round; the devices' spend is already on their disks). The gateway starts
it for each masked round and hands its outcome to `EdgeEngine.close_masked`. `masked_mean` is the pure part: no
filters (the edge never sees an update), and central DP calibrated to the on-device clip bound, the sensitivity of
the sum to one honest device.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

import numpy as np
import paho.mqtt.client as mqtt

from edge import central_dp
from fediomt.logs import event
from protocol.errors import ProtocolError, Reason
from protocol.secagg import SecAggResult, SecAggServer
from protocol.secagg.deploy import MaskedRound
from protocol.secagg.mqtt_driver import run_server_round

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
        self.started = ann.round_id
        keys = {}
        for device in sorted(engine.expected):
            try:
                keys[device] = engine.keys.get(device)
            except ProtocolError:
                continue
        server = SecAggServer(engine.cfg.edge_id, ann.round_id, masked.config, masked.length(ctx.n_params), keys)
        event(self.log, "secagg round started", round=ann.round_id, cohort=len(keys), length=server.length)
        threading.Thread(target=self._run, args=(server,), name=f"secagg-{ann.round_id}", daemon=True).start()

    def _run(self, server: SecAggServer) -> None:
        try:
            outcome: SecAggResult | ProtocolError = run_server_round(self.client, server, self.step_timeout_s)
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
