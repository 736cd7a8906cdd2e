"""Device agent configuration: TOML -> dataclasses with documented defaults (configs/device.toml is the reference).

Relative paths in the file are resolved against the file's own directory, so a device directory can be copied
(or flashed) as a whole. Unknown keys are an error: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from protocol.accountant import ACCOUNTANTS
from protocol.mqtt import ConnectionConfig
from protocol.tomlconfig import load_toml
from protocol.topics import DEVICE_CLASSES, check_id

COMPUTE_CLASSES = DEVICE_CLASSES      # one class vocabulary (protocol.topics): compute class = OTA class
AUTH_MODES = ("signature", "mac")
MODES = ("auto", "train", "infer")


@dataclass(frozen=True)
class DeviceConnectionConfig(ConnectionConfig):
    """The edge's MQTT broker, with a persistent session: QoS 1 messages queued while the device is offline."""

    session_expiry_s: int = 86_400


@dataclass(frozen=True)
class DataConfig:
    """Local training data: `dir` holding train.npz (x, y) and/or train.csv (features + `label`), `physionet` (a
    PhysioNet 2012-format set: a directory of record .txt files or a set-*.tar.gz, with its outcomes file), or
    `entry_point` "module:function" returning (x, y) for a live sensor feed (called at every round)."""

    dir: Path | None = None
    entry_point: str | None = None
    physionet: Path | None = None
    outcomes: Path | None = None     # the set's outcomes file; default: Outcomes-*.txt beside the set


@dataclass(frozen=True)
class CapabilityConfig:
    """What the device reports so the edge can weight it and size its compression."""

    compute_class: str = "pi"
    memory_mb: int = 1024
    bandwidth_bps: float = 1_000_000.0
    steps_per_s: float = 0.0            # 0 = measure on the first round (then remembered in the state)


@dataclass(frozen=True)
class PrivacyConfig:
    """Example-level DP budget on this device's own data, across all rounds of its lifetime."""

    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "rdp"             # "rdp" (Renyi DP, conservative) | "pld" (privacy loss distributions, tighter)


@dataclass(frozen=True)
class OtaConfig:
    """Over-the-air bundle updates (device/ota.py): manifests signed by the cloud key, bundles by bundle_pubkey."""

    enabled: bool = True
    device_class: str = ""              # the bundle class to follow; "" = [capability] compute_class
    retry_s: float = 10.0               # re-request missing chunks after this long without progress


@dataclass(frozen=True)
class InferenceConfig:
    """Inference mode (device/inference.py): sensor windows in, predictions out (docs/device.md "Inference")."""

    input: str = "-"                    # windows, one per line (CSV / whitespace / JSON array): a file, a FIFO or
                                        # "-" (stdin); relative paths resolve against the config file's directory
    follow: bool = True                 # at the end of a file keep reading what is appended; a FIFO is reopened
    output: str = ""                    # predictions as JSON lines: a file (appended), "-" (stdout), "" = none
    publish: bool = False               # also publish each prediction on prediction_topic(edge, id), QoS 0
    batch: int = 16                     # windows classified together at most (all that are waiting, up to this)


@dataclass(frozen=True)
class DeviceConfig:
    """All a device agent is configured with (configs/device.toml), checked on load so a bad file fails at start."""

    id: str
    edge: str
    state_dir: Path
    bundle_dir: Path                    # the installed bundle (model.tflite + signed manifest)
    bundle_pubkey: Path                 # Ed25519 public key that signs bundles
    cloud_pubkey: Path                  # Ed25519 public key that signs rounds and global models
    signing_key: Path                   # this device's Ed25519 private key (PEM, 0600)
    auth: str = "signature"             # updates: "signature" (Ed25519) | "mac" (HMAC toward `edge`, from mac_key)
    mac_key: Path | None = None         # the MAC master secret (pki devices/ID/mac.key, 0600), for auth = "mac"
    data: DataConfig = field(default_factory=DataConfig)
    capability: CapabilityConfig = field(default_factory=CapabilityConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    broker: DeviceConnectionConfig = field(default_factory=DeviceConnectionConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    mode: str = "auto"                  # "train" (trainable bundles only), "infer" (inference only; may start with
                                        # no bundle and wait for a push), "auto": whatever the installed bundle is
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    significance_threshold: float = 0.0  # L2 norm of the (noised) delta below which only a "skipped" status is sent
    min_steps: int = 1                  # decline a round when fewer local steps fit before its deadline
    deadline_margin_s: float = 2.0      # stop training this long before the deadline (time to compress + send)
    ack_timeout_s: float = 10.0         # resend an update (same bytes) not acknowledged by the edge this long
    ack_timeout_max_s: float = 60.0     # after it was sent; the wait doubles (jittered) up to this, until the deadline
    threads: int | None = None          # interpreter threads (None: the runtime's default)
    secagg_keys_dir: Path | None = None  # enrolment export: {device_id}.pub of the edge's devices (secure aggregation)
    secagg_timeout_s: float = 120.0     # a masked round (docs/secagg.md "Deployment") gives up after this long
    log_level: str = "info"

    def __post_init__(self) -> None:
        check_id(self.id)
        check_id(self.edge)
        if self.auth not in AUTH_MODES or (self.auth == "mac") != (self.mac_key is not None):
            raise ValueError(f"auth {self.auth!r} must be one of {AUTH_MODES}; mac_key is set exactly for \"mac\"")
        if self.privacy.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant {self.privacy.accountant!r} not in {ACCOUNTANTS}")
        if not (0 < self.privacy.epsilon < math.inf and 0 < self.privacy.delta < 1):
            raise ValueError("privacy.epsilon must be finite and > 0, privacy.delta in (0, 1)")
        if self.capability.compute_class not in COMPUTE_CLASSES:
            raise ValueError(f"capability.compute_class {self.capability.compute_class!r} not in {COMPUTE_CLASSES}")
        if self.ota.device_class and self.ota.device_class not in DEVICE_CLASSES:
            raise ValueError(f"ota.device_class {self.ota.device_class!r} not in {DEVICE_CLASSES}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.inference.batch < 1:
            raise ValueError("inference.batch must be >= 1")
        if self.data.dir is None and self.data.entry_point is None and self.data.physionet is None:
            raise ValueError("data: set `dir` (train.npz / train.csv), `physionet` (a PhysioNet 2012-format set) or "
                             "`entry_point` (module:function)")
        if self.significance_threshold < 0 or self.min_steps < 1:
            raise ValueError("significance_threshold must be >= 0 and min_steps >= 1")
        if not 0 < self.ack_timeout_s <= self.ack_timeout_max_s:
            raise ValueError("need 0 < ack_timeout_s <= ack_timeout_max_s")


def load_config(path: str | Path) -> DeviceConfig:
    cfg = load_toml(DeviceConfig, path)
    src = cfg.inference.input
    if src != "-" and not Path(src).is_absolute():  # a string (it may be "-"), so resolve it here
        cfg = replace(cfg, inference=replace(cfg.inference, input=str(Path(path).resolve().parent / src)))
    out = cfg.inference.output
    if out not in ("", "-") and not Path(out).is_absolute():
        cfg = replace(cfg, inference=replace(cfg.inference, output=str(Path(path).resolve().parent / out)))
    return cfg


def ota_class(cfg: DeviceConfig) -> str:
    """The OTA class this device follows: `[ota] device_class`, else its compute class."""
    return cfg.ota.device_class or cfg.capability.compute_class
