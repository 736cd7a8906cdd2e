"""`SecAggRunner`: the server side of one secure-aggregation round at a time, in a worker thread.

Both SecAgg servers use it: an edge over its device cohort (`untrusted_edge`) and the cloud over the edges
(`trusted_edge` with `edges_mask`). The protocol's steps block for up to a step timeout each, so they run beside the
daemon's main loop, on a connection of their own with automatic acknowledgements: the daemons' main connections
acknowledge by hand after durable commits, and the protocol's messages need no durability (a server that crashes
mid-protocol loses the round, never a wrong sum).
"""

from __future__ import annotations

import logging
import queue
import threading

import paho.mqtt.client as mqtt

from protocol.errors import ProtocolError, Reason
from protocol.logs import event
from protocol.secagg.mqtt_driver import run_server_round
from protocol.secagg.server import SecAggResult, SecAggServer


class SecAggRunner:
    """One masked round at a time, on `client` (connected, network loop running, automatic acknowledgements)."""

    def __init__(self, client: mqtt.Client, step_timeout_s: float, log: logging.Logger) -> None:
        self.client, self.step_timeout_s, self.log = client, step_timeout_s, log
        self.outcomes: queue.Queue[tuple[int, SecAggResult | ProtocolError]] = queue.Queue()
        self.started: int | None = None   # the last round started

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
