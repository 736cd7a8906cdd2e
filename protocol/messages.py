"""Every message FedIoMT sends, as dataclasses. The CDDL in docs/protocol.cddl is the written schema; a test
validates samples of every kind against it with an independent validator, so the two cannot drift.

Arrays travel as byte strings: flat float32 weights (little-endian) or a compression payload
(protocol.compression). Messages that carry a `sig` have it as their last field and are signed by their sender's
Ed25519 key over the deterministic encoding of the message with `sig = b""` (`sign_message`). A receiver holding
the raw bytes checks the signature on them (`verify_raw`: the trailing 66-byte sig item swapped for the empty byte
string, no re-encoding); `verify_message` re-encodes, for messages that arrive inside others. A DeviceUpdate may
instead carry a 32-byte HMAC-SHA256 tag over the same bytes, keyed per (device, edge) (`mac_message`,
`verify_mac_raw`; SECURITY.md). Signed messages also carry a fresh `nonce` so that receivers can refuse replays.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol import signing
from protocol.codec import decode, encode, limit, register
from protocol.errors import ProtocolError, Reason

__all__ = [
    "decode", "encode", "register", "limit", "new_nonce", "sign_message", "verify_message", "verify_raw",
    "mac_message", "verify_mac_raw", "MAC_BYTES",
    "floats_to_bytes", "new_run_id", "newer_run",
    "bytes_to_floats", "TrainingPlan", "Capability", "PrivacySpent", "CentralDPReport", "RoundAnnouncement",
    "GlobalModel", "global_model", "DeviceUpdate", "EdgeAggregate", "AggregateReceipt", "Ack", "DeviceStatus",
    "Chunk", "BundleManifest",
]

ID = limit(max_len=64, min_len=1)
NONCE = limit(max_len=16, min_len=16)
SIG = limit(max_len=64, min_len=64)
SHA256 = limit(max_len=32, min_len=32)
PARAMS = limit(min_value=0, max_value=100_000_000)
Scalar = int | float | str | bool | None


def new_nonce() -> bytes:
    """16 random bytes for a message's `nonce`: receivers refuse a nonce seen before (REPLAY)."""
    return os.urandom(16)


def floats_to_bytes(vector: np.ndarray) -> bytes:
    """A vector as little-endian float32 bytes, the dense wire form (`bytes_to_floats` reads it back strictly)."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def bytes_to_floats(data: bytes, n_params: int) -> np.ndarray:
    """Strict: exact length, finite values (a dense float32 vector from the wire)."""
    if len(data) != 4 * n_params:
        raise ProtocolError(Reason.BAD_SHAPE, f"{len(data)} bytes for {n_params} float32 values")
    vector = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        raise ProtocolError(Reason.NON_FINITE, "NaN or infinity in weights")
    return vector


MAC_BYTES = 32              # HMAC-SHA256 tag: a DeviceUpdate's `sig` alternative to the 64-byte Ed25519 signature
_NO_SIG = b"\x40"          # the empty byte string the sig item stands for in the signed bytes


@functools.cache
def _check_signable(cls: type) -> None:
    """Raw verification relies on `sig` being the last element of the array."""
    if dataclasses.fields(cls)[-1].name != "sig":
        raise TypeError(f"{cls.__name__}: `sig` must be the last field of a signed message")


def signed_bytes(msg) -> bytes:
    """What a signature or MAC covers: the message encoded with `sig = b""`."""
    _check_signable(type(msg))
    return encode(dataclasses.replace(msg, sig=b""))


def sign_message(msg, key: Ed25519PrivateKey):
    """Return a copy of `msg` with `sig` set over everything else (deterministic: Ed25519 and the encoding are)."""
    return dataclasses.replace(msg, sig=signing.sign(key, signed_bytes(msg)))


def mac_message(msg, key: bytes):
    """Return a copy of `msg` whose `sig` is the HMAC-SHA256 tag (32 bytes) of the signed bytes under `key`."""
    return dataclasses.replace(msg, sig=_tag(key, signed_bytes(msg)))


def verify_message(msg, public_key: Ed25519PublicKey) -> None:
    """Verify by re-encoding `msg`: for messages without their own received bytes (e.g. adverts in a roster)."""
    signing.verify(public_key, msg.sig, signed_bytes(msg))


def _raw_signed_bytes(data: bytes, msg, size: int) -> bytes:
    """The signed bytes of `msg`, strictly decoded from exactly `data`: `data` with its trailing sig item (0x58,
    `size`, then `size` bytes) replaced by 0x40. Cheaper than re-encoding, and it checks what was sent. The tail
    must be the minimal `size`-byte item of `msg.sig` (a non-minimal or chunked encoding is refused); since senders
    sign deterministic encodings and CBOR items parse prefix-free, a valid signature or tag over the replaced bytes
    means the decoded fields are the signed ones."""
    _check_signable(type(msg))
    tail = bytes((0x58, size)) + msg.sig
    if len(msg.sig) != size or bytes(data[-len(tail):]) != tail:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"the message does not end with its {size}-byte sig item")
    return bytes(data[:-len(tail)]) + _NO_SIG


def verify_raw(data: bytes, msg, public_key: Ed25519PublicKey) -> None:
    """Verify `msg`'s Ed25519 signature on the bytes it was decoded from (`_raw_signed_bytes`)."""
    signing.verify(public_key, msg.sig, _raw_signed_bytes(data, msg, signing.SIGNATURE_BYTES))


def verify_mac_raw(data: bytes, msg, key: bytes) -> None:
    """Verify `msg`'s 32-byte HMAC-SHA256 tag under `key` on the bytes it was decoded from, in constant time."""
    if not hmac.compare_digest(msg.sig, _tag(key, _raw_signed_bytes(data, msg, MAC_BYTES))):
        raise ProtocolError(Reason.BAD_SIGNATURE, "MAC does not verify")


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def newer_run(incoming: str, current: str) -> int:
    """-1 when `incoming` belongs to an older run than `current` (ignore it), 0 the same run, 1 a newer one (start
    it). Run ids sort by start time (new_run_id)."""
    return (incoming > current) - (incoming < current)


# ------------------------------------------------------------------ nested records
@dataclass(frozen=True)
class TrainingPlan:
    """What a round asks of each device."""

    lr: float = field(metadata=limit(min_value=0, max_value=100))
    local_epochs: int = field(metadata=limit(min_value=0, max_value=1000))
    batch_size: int = field(metadata=limit(min_value=1, max_value=65536))
    clip: float = field(metadata=limit(min_value=0))                # per-example L2 bound (device DP)
    noise_mult: float = field(metadata=limit(min_value=0))          # device DP noise multiplier, 0 = none
    mu: float = field(default=0.0, metadata=limit(min_value=0))     # FedProx proximal weight
    scaffold: bool = False                                          # apply SCAFFOLD control variates
    max_steps: int = field(default=0, metadata=limit(min_value=0))  # 0 = as many as the epochs need
    # > 0: each device lowers noise_mult to the least with which rounds_left rounds (this one included) keep it
    # within min(target_epsilon, its own budget) at min(target_delta, its own delta), and refuses a round that would
    # not (device.training.privacy_limit, calibrated_plan); noise_mult is then the most a device adds
    target_epsilon: float = field(default=0.0, metadata=limit(min_value=0))
    target_delta: float = field(default=0.0, metadata=limit(min_value=0, max_value=1))
    rounds_left: int = field(default=0, metadata=limit(min_value=0, max_value=1_000_000))

    def __post_init__(self) -> None:
        if self.target_epsilon > 0 and not (self.rounds_left >= 1 and 0 < self.target_delta < 1):
            raise ValueError("a plan with target_epsilon needs rounds_left >= 1 and target_delta in (0, 1)")


@dataclass(frozen=True)
class Capability:
    """What a device reports so the edge can weight it and set its compression."""

    compute_class: str = field(metadata=limit(max_len=32))  # "wearable" | "phone" | "pi" | "server"
    memory_mb: int = field(metadata=limit(min_value=0))
    bandwidth_bps: float = field(metadata=limit(min_value=0))
    steps_per_s: float = field(default=0.0, metadata=limit(min_value=0))
    battery: float | None = field(default=None, metadata=limit(min_value=0, max_value=1))


@dataclass(frozen=True)
class PrivacySpent:
    """A device's example-level DP spent on its own data so far; the accountant's history makes it auditable."""

    epsilon: float = field(metadata=limit(min_value=0))
    delta: float = field(metadata=limit(min_value=0, max_value=1))
    accountant: str = field(metadata=limit(max_len=16))              # "rdp" | "pld"
    noise_mult: float = field(metadata=limit(min_value=0))           # this round's
    sample_rate: float = field(metadata=limit(min_value=0, max_value=1))
    steps: int = field(metadata=limit(min_value=0))                  # this round's


@dataclass(frozen=True)
class CentralDPReport:
    """User-level DP added by an edge: each delta clipped to `clip`, N(0, (noise_mult*clip)^2) added to the sum."""

    clip: float = field(metadata=limit(min_value=0))
    noise_mult: float = field(metadata=limit(min_value=0))
    sampling_rate: float = field(metadata=limit(min_value=0, max_value=1))
    num_clipped: int = field(default=0, metadata=limit(min_value=0))


# ------------------------------------------------------------------ messages
RUN_ID = limit(max_len=64)  # "" (no run) or an id that sorts by start time: protocol.messages.new_run_id()


def new_run_id(now: float | None = None) -> str:
    """A federation run's id: UTC start time to the millisecond, then 4 random hex digits. Ids of later runs sort
    after earlier ones, so every receiver can tell an old run's retained round or model from the new run's and
    ignore it (docs/protocol.md "Runs")."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"
    return f"{stamp}-{os.urandom(2).hex()}"


STATISTICS_KINDS = ("", "summary", "histogram")   # RoundAnnouncement.statistics: "" = training (docs/protocol.md)
FEATURES_MAX = 256 * 1024             # RoundAnnouncement.features: JSON of a feature schema or transform


@register("round", version=5)
@dataclass(frozen=True)
class RoundAnnouncement:
    """Cloud -> edges -> devices (retained): open a round of the run `run_id`. `statistics` = "summary": a
    statistics round (docs/protocol.md "Statistics rounds"): devices answer with protocol.features.site_summary of
    their raw rows over the schema in `features`, edges aggregate with admission bounds, filters and central DP off;
    "histogram": the same with protocol.features.site_histogram under the transform in `features`.
    In a training round `features` is "" or the federation's FeatureTransform (JSON) that devices apply to raw
    local data."""

    round_id: int = field(metadata=limit(min_value=0))
    model_name: str = field(metadata=ID)
    model_version: int = field(metadata=limit(min_value=0))
    strategy: str = field(metadata=limit(max_len=32))
    deadline: float = field(metadata=limit(min_value=0))             # unix seconds
    plan: TrainingPlan
    compression: dict[str, Scalar] = field(metadata=limit(max_len=16))  # protocol.compression settings
    edges: list[str] = field(default_factory=list, metadata=limit(max_len=1024, items=ID))
    cohort: list[str] = field(default_factory=list, metadata=limit(max_len=100_000, items=ID))  # [] = everyone
    lr_scale: dict[str, float] = field(default_factory=dict, metadata=limit(max_len=100_000))  # per device
    sample_weight: dict[str, float] = field(default_factory=dict, metadata=limit(max_len=100_000))  # 1/(N p_i)
    central_dp: CentralDPReport | None = None                         # what edges must add (clip, noise)
    secagg: dict[str, Scalar] | None = field(default=None, metadata=limit(max_len=32))
    run_id: str = field(default="", metadata=RUN_ID)                 # the federation run (new_run_id)
    statistics: str = field(default="", metadata=limit(max_len=16))  # "" (training) | "summary" | "histogram"
    features: str = field(default="", metadata=limit(max_len=FEATURES_MAX))  # JSON: schema or transform; "" none
    sig: bytes = field(default=b"", metadata=limit(max_len=64))

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS_KINDS:
            raise ValueError(f"statistics {self.statistics!r} not in {STATISTICS_KINDS}")
        if self.statistics and not self.features:
            raise ValueError("a statistics round must announce its feature schema")


@register("model", version=3)
@dataclass(frozen=True)
class GlobalModel:
    """Cloud -> edges -> devices (retained): a model version of the run `run_id`, full or as a delta against
    `base_version`."""

    model_name: str = field(metadata=ID)
    model_version: int = field(metadata=limit(min_value=0))
    encoding: str = field(metadata=limit(max_len=8))                 # "full" (float32) | "delta" (compressed)
    base_version: int | None = field(metadata=limit(min_value=0))
    n_params: int = field(metadata=PARAMS)
    weights: bytes
    sha256: bytes = field(metadata=SHA256)                          # of the full float32 weights after applying
    control: bytes | None = None                                      # SCAFFOLD server control variate (float32)
    run_id: str = field(default="", metadata=RUN_ID)                 # the federation run (new_run_id)
    sig: bytes = field(default=b"", metadata=limit(max_len=64))

    def __post_init__(self) -> None:
        if self.encoding not in ("full", "delta"):
            raise ValueError(f"encoding {self.encoding!r}")
        if (self.encoding == "delta") != (self.base_version is not None):
            raise ValueError("a delta needs a base_version and a full model has none")


def global_model(name: str, version: int, weights: np.ndarray, delta_payload: bytes | None = None,
                 control: np.ndarray | None = None, run_id: str = "") -> GlobalModel:
    """The (unsigned) GlobalModel of `version` for the published `weights` (what devices end up holding): in full,
    or with `delta_payload` (a protocol.compression payload that turns version - 1's weights into exactly
    `weights`) as a delta against version - 1. `sha256` is always of the published float32 weights, which is what
    a device checks after applying the message (protocol.global_model.rebuild); `control` is SCAFFOLD's server
    control variate. The one constructor of GlobalModels (cloud, scripted cloud, benchmarks, tests)."""
    full = floats_to_bytes(weights)
    delta = delta_payload is not None
    return GlobalModel(model_name=name, model_version=version, encoding="delta" if delta else "full",
                       base_version=version - 1 if delta else None, n_params=len(full) // 4,
                       weights=delta_payload if delta else full, sha256=hashlib.sha256(full).digest(),
                       control=None if control is None else floats_to_bytes(control), run_id=run_id)


@register("update")
@dataclass(frozen=True)
class DeviceUpdate:
    """Device -> edge: the compressed, DP-noised delta of one round of local training."""

    device_id: str = field(metadata=ID)
    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=limit(min_value=0))
    base_version: int = field(metadata=limit(min_value=0))
    num_samples: int = field(metadata=limit(min_value=0))
    local_steps: int = field(metadata=limit(min_value=0))
    train_loss: float
    privacy: PrivacySpent
    n_params: int = field(metadata=PARAMS)
    delta: bytes                                                      # self-describing protocol.compression payload
    capability: Capability
    nonce: bytes = field(metadata=NONCE)
    timestamp: float = field(metadata=limit(min_value=0))
    control_delta: bytes | None = None                                # SCAFFOLD: c_i+ - c_i (compressed)
    sig: bytes = field(default=b"", metadata=limit(max_len=64))      # Ed25519 (64 bytes) or HMAC-SHA256 (32)


@register("aggregate", version=4)
@dataclass(frozen=True)
class EdgeAggregate:
    """Edge -> cloud: the weighted mean of accepted deltas (central DP applied), or `significant=False`."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=limit(min_value=0))
    base_version: int = field(metadata=limit(min_value=0))
    num_devices: int = field(metadata=limit(min_value=0))
    num_samples: int = field(metadata=limit(min_value=0))
    weight_sum: float = field(metadata=limit(min_value=0))
    n_params: int = field(metadata=PARAMS)
    delta: bytes                                                      # compression payload; b"" if not significant
    significant: bool
    central_dp: CentralDPReport | None
    filtered: list[str] = field(metadata=limit(max_len=100_000, items=ID))   # device ids flagged by filters
    rejected: dict[str, int] = field(metadata=limit(max_len=64))             # reason name -> count
    device_ids: list[str] = field(metadata=limit(max_len=100_000, items=ID))
    max_device_epsilon: float = field(metadata=limit(min_value=0))
    mean_local_steps: float = field(metadata=limit(min_value=0))
    nonce: bytes = field(metadata=NONCE)
    timestamp: float = field(metadata=limit(min_value=0))
    control_delta: bytes | None = None
    device_bytes: int = field(default=0, metadata=limit(min_value=0))  # sum of accepted DeviceUpdate message sizes
    update_norms: dict[str, float] = field(default_factory=dict, metadata=limit(max_len=100_000))  # device -> |delta|
    # the smallest local dataset among the counted devices (0 = not known, e.g. a masked round): the cloud derives
    # the example-level epsilon of THAT device, not of the mean one (cloud.accounting, issue 16)
    min_device_samples: int = field(default=0, metadata=limit(min_value=0))
    # distributed DP: the part of central_dp.noise_mult that is the counted devices' own noise, sqrt(sum_i (w_i
    # sigma_i)^2) / clip, which the edge credited instead of adding it (0 = nothing credited; edge.central_dp)
    credited_noise_mult: float = field(default=0.0, metadata=limit(min_value=0))
    # protocol.sketch: int8 count sketches (sketch_dims bytes each) of every admitted update's direction, for the
    # cloud's device-majority gate; empty when the edge sends none (central DP, secure aggregation, switched off)
    sketch_dims: int = field(default=0, metadata=limit(min_value=0, max_value=1024))
    sketches: bytes = field(default=b"", metadata=limit(max_len=100_000_000))
    sig: bytes = field(default=b"", metadata=limit(max_len=64))


@register("receipt")
@dataclass(frozen=True)
class AggregateReceipt:
    """Cloud -> edge: the aggregate with this nonce is durable at the cloud (`accepted`) or refused for good (a
    protocol.errors.Reason that the same bytes would meet again: late, stale, seen before, ...), so the edge stops
    resending it. The broker's PUBACK only means "queued": a broker killed before its autosave loses what it queued
    for an absent cloud. Signed by the cloud; a replayed receipt only repeats what it said about that nonce."""

    edge_id: str = field(metadata=ID)
    round_id: int = field(metadata=limit(min_value=0))
    aggregate_nonce: bytes = field(metadata=NONCE)
    accepted: bool
    reason: int = field(metadata=limit(min_value=0, max_value=255))
    timestamp: float = field(metadata=limit(min_value=0))
    sig: bytes = field(default=b"", metadata=limit(max_len=64))


@register("ack")
@dataclass(frozen=True)
class Ack:
    """Edge -> device: accepted or rejected, with a protocol.errors.Reason code."""

    sender: str = field(metadata=ID)
    device_id: str = field(metadata=ID)
    round_id: int = field(metadata=limit(min_value=0))
    accepted: bool
    reason: int = field(metadata=limit(min_value=0, max_value=255))
    detail: str = field(default="", metadata=limit(max_len=256))


@register("status")
@dataclass(frozen=True)
class DeviceStatus:
    """Device -> edge (retained; also the last-will message with state "offline")."""

    device_id: str = field(metadata=ID)
    edge_id: str = field(metadata=ID)
    state: str = field(metadata=limit(max_len=32))  # online|training|skipped|declined|budget_exhausted|offline
    model_version: int = field(metadata=limit(min_value=0))
    bundle_version: int = field(metadata=limit(min_value=0))
    epsilon_spent: float = field(metadata=limit(min_value=0))
    epsilon_budget: float = field(metadata=limit(min_value=0))
    timestamp: float = field(metadata=limit(min_value=0))
    round_id: int | None = field(default=None, metadata=limit(min_value=0))
    capability: Capability | None = None
    detail: str = field(default="", metadata=limit(max_len=256))


@register("chunk")
@dataclass(frozen=True)
class Chunk:
    """One part of a payload larger than the broker's message cap (bundles, big models)."""

    transfer_id: bytes = field(metadata=NONCE)
    index: int = field(metadata=limit(min_value=0, max_value=1_000_000))
    total: int = field(metadata=limit(min_value=1, max_value=1_000_000))
    total_size: int = field(metadata=limit(min_value=0, max_value=1 << 31))
    sha256: bytes = field(metadata=SHA256)                          # of the whole payload
    data: bytes

    def __post_init__(self) -> None:
        if self.index >= self.total:
            raise ValueError(f"chunk index {self.index} >= total {self.total}")


@register("bundle")
@dataclass(frozen=True)
class BundleManifest:
    """Cloud -> devices of a class (retained): a new model bundle is available as `total` chunks."""

    device_class: str = field(metadata=ID)
    name: str = field(metadata=ID)
    version: int = field(metadata=limit(min_value=0))
    size: int = field(metadata=limit(min_value=0, max_value=1 << 31))
    sha256: bytes = field(metadata=SHA256)
    chunk_size: int = field(metadata=limit(min_value=1))
    total: int = field(metadata=limit(min_value=1, max_value=1_000_000))
    transfer_id: bytes = field(metadata=NONCE)
    force: bool = False                                               # allow a downgrade
    timestamp: float = field(default_factory=time.time, metadata=limit(min_value=0))
    sig: bytes = field(default=b"", metadata=limit(max_len=64))
