"""Masked rounds at the edge (`mode = "untrusted_edge"`, docs/secagg.md "Deployment"): the edge is the SecAgg
server of its cohort, learns only the sum of the survivors' clipped deltas, and forwards their mean.

`start_cohort_round` starts the server side of each masked round on the gateway's
`protocol.secagg.runner.SecAggRunner` (a worker thread on its own MQTT connection; an edge that crashes
mid-protocol loses the round, the devices' spend is already on their disks); the gateway hands its outcome to
`EdgeEngine.close_masked`. `masked_mean` and `credited_var` are the pure part: no
filters (the edge never sees an update), and central DP calibrated to the on-device clip bound, the sensitivity of
the sum to one honest device.

Distributed DP (protocol.secagg.deploy `MaskedRound.credit`): in a credited round every honest survivor clipped its
noise-free delta to the secagg clip and then added N(0, sigma_i^2) per coordinate, so the unmasked sum already
carries N(0, sum_i sigma_i^2) that nothing else in it depends on; the edge adds only central_dp.top_up of the
announced z. The assumption is the plaintext path's (edge.central_dp): honest devices, which clip and add their
noise. Unlike there, the edge itself only ever sees the sum, so the user-level guarantee of the credited noise holds
against the edge too, not only against the cloud.

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
from protocol.distributed_dp import device_stds
from protocol.errors import ProtocolError
from protocol.logs import event
from protocol.messages import EdgeAggregate, RoundAnnouncement
from protocol.secagg import SecAggClient, SecAggResult, SecAggServer
from protocol.secagg.deploy import MaskedRound
from protocol.secagg.mqtt_driver import run_client_round
from protocol.signing import load_public_key
from protocol.topics import CLOUD

if TYPE_CHECKING:
    from edge.engine import EdgeEngine
    from protocol.secagg.runner import SecAggRunner


def credited_var(masked: MaskedRound, ann: RoundAnnouncement, survivors: list[str]) -> float:
    """Per-coordinate variance of the survivors' own noise in the unmasked sum, sum_i sigma_i^2 (the mean is
    unweighted, so omega_i = 1), each sigma_i from the plan and that device's lr_scale; 0 unless the round is
    credited (module docstring)."""
    if not masked.credited:
        return 0.0
    return float(np.sum(device_stds(ann.plan, ann.lr_scale, survivors) ** 2))


def masked_mean(result: SecAggResult, masked: MaskedRound, n_params: int, noise_mult: float,
                credited: float = 0.0) -> tuple[np.ndarray, int, int]:
    """(the dense mean delta of the survivors, their total samples, their total local steps). The mean is
    unweighted: weighting by sample counts would need each device's count (only their total is unmasked).
    With noise_mult > 0: N(0, (noise_mult * clip)^2) in total at the masked coordinates, of which `credited` (the
    survivors' noise variance, credited_var) is already in the sum: only central_dp.top_up is added."""
    total, samples, steps = masked.split(result)
    n, clip = len(result.devices), masked.config.clip
    added = central_dp.top_up(noise_mult, clip, credited) if credited > 0 else noise_mult
    if added > 0:
        mean = central_dp.noisy_mean(total.astype(np.float64), n, clip, added)
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
    runner.start(SecAggServer(engine.cfg.edge_id, ann.round_id, masked.wire_config, masked.length(ctx.n_params),
                              keys))


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
