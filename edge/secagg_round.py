"""Masked rounds at the edge (`mode = "untrusted_edge"`, docs/secagg.md "Deployment"): the edge is the SecAgg
server of its cohort, learns only the sum of the survivors' clipped deltas, and forwards their mean.

`start_cohort_round` starts the server side of each masked round on the gateway's
`protocol.secagg.runner.SecAggRunner` (a worker thread on its own MQTT connection; an edge that crashes
mid-protocol loses the round, the devices' spend is already on their disks); the gateway hands its outcome to
`EdgeEngine.close_masked`. `masked_mean` is the pure part: no
filters (the edge never sees an update), and central DP calibrated to the on-device clip bound, the sensitivity of
the sum to one honest device.

The edge tier (`trusted_edge` with `edges_mask`, protocol/secagg/edge_tier.py): after closing its round as usual
(filters, clipping, central DP) the edge forwards only `metadata(aggregate)` in plaintext and masks its weighted
sum toward the cloud with `mask_for_cloud`, the cloud being the SecAgg server of the round's edges.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge import central_dp
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.messages import EdgeAggregate
from protocol.secagg import SecAggClient, SecAggResult, SecAggServer
from protocol.secagg.deploy import MaskedRound
from protocol.secagg.mqtt_driver import run_client_round
from protocol.signing import load_public_key
from protocol.topics import CLOUD

if TYPE_CHECKING:
    from edge.engine import EdgeEngine
    from protocol.secagg.runner import SecAggRunner


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


def start_cohort_round(runner: SecAggRunner, engine: EdgeEngine) -> None:
    """Start the server side of the engine's open masked round, once per round."""
    ann, masked, ctx = engine.announcement, engine.masked, engine.ctx
    if masked is None or ctx is None or ctx.closed or ann.round_id == runner.started:
        return
    keys = {}
    for device in sorted(engine.expected):
        try:
            keys[device] = engine.keys.get(device)
        except ProtocolError:
            continue
    runner.start(SecAggServer(engine.cfg.edge_id, ann.round_id, masked.config, masked.length(ctx.n_params), keys))


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
