"""A trained round -> the DeviceUpdate a device sends, and the state it keeps. No MQTT, no files, no clock.

The device agent (device/agent.py) and the experiments' simulator (experiments/sim/) both call `build_update`, so
every figure the simulator produces comes from the bytes a real device would send: the significance skip, the
compressed delta with its error-feedback residual, SCAFFOLD's control payload and the cumulative privacy spend.
The caller signs (or MACs) the message, persists the returned state, then publishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from device.training import LocalResult
from protocol import accountant
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.messages import Capability, DeviceUpdate, PrivacySpent

ENVELOPE_BYTES = 1024   # bound on the signed DeviceUpdate fields around the payload (typically ~200 B in v2)
NO_DP_EPSILON = 1e9   # a round without noise has epsilon = inf, which the strict codec refuses: this stands for it


@dataclass(frozen=True)
class RoundIdentity:
    """Who sends which round on which model: the fields of a DeviceUpdate that are not training results."""

    device_id: str
    edge_id: str
    round_id: int
    base_version: int


@dataclass(frozen=True)
class DeviceRound:
    """What one trained round produces: the unsigned update (None when skipped) and the device's new state."""

    update: DeviceUpdate | None
    history: accountant.History
    residual: np.ndarray | None
    control: np.ndarray | None
    norm: float
    skipped: str = ""          # why nothing is sent ("" when `update` is set)


def build_update(result: LocalResult, who: RoundIdentity, settings: CompressionSettings, *,
                 history: accountant.History, residual: np.ndarray | None, control: np.ndarray | None,
                 delta: float, accountant_name: str, capability: Capability, n_params: int,
                 rng: np.random.Generator, nonce: bytes, timestamp: float,
                 significance_threshold: float = 0.0) -> DeviceRound:
    """Account the round, then compress and describe it; a delta smaller than `significance_threshold` is not sent
    but waits in the error-feedback residual (post-processing of the DP output: the spend is still recorded)."""
    history = (*history, accountant.Entry(result.noise_mult, result.sample_rate, result.local_steps))
    norm = float(np.linalg.norm(result.delta))
    if norm < significance_threshold:
        kept = result.delta if residual is None else residual + result.delta
        return DeviceRound(None, history, kept, control, norm, f"|delta| {norm:.3g} < {significance_threshold}")
    payload, residual = encode_update(result.delta, settings, residual, rng)
    control_payload = None
    if result.control_delta is not None:
        control_payload, _ = encode_update(result.control_delta, settings, None, rng)
        sent = decode_update(control_payload, n_params)
        control = sent if control is None else control + sent  # c_i moves by exactly what the edge learns
    spent = PrivacySpent(epsilon=min(accountant.epsilon(history, delta, accountant_name), NO_DP_EPSILON),
                         delta=delta, accountant=accountant_name, noise_mult=result.noise_mult,
                         sample_rate=result.sample_rate, steps=result.local_steps)
    update = DeviceUpdate(
        device_id=who.device_id, edge_id=who.edge_id, round_id=who.round_id, base_version=who.base_version,
        num_samples=result.num_samples, local_steps=result.local_steps,
        train_loss=result.loss if math.isfinite(result.loss) else 0.0, privacy=spent, n_params=n_params,
        delta=payload, capability=capability, nonce=nonce, timestamp=timestamp, control_delta=control_payload)
    return DeviceRound(update, history, residual, control, norm)
