"""Edge gateway configuration: TOML -> dataclasses with documented defaults (configs/edge.toml is the reference).

Relative paths resolve against the config file's directory. Unknown keys are an error, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge.aggregate import FilterConfig
from edge.bounds import BoundsConfig
from edge.rounds import RoundsConfig
from edge.weighting import WeightingConfig
from protocol.compression import CompressionSettings
from protocol.mqtt import ConnectionConfig
from protocol.tomlconfig import load_toml
from protocol.topics import check_id

MIN_GROUP_CHARS = 16   # a replicas' group is a secret (Mosquitto's ACLs do not check `$share` subscriptions)


@dataclass(frozen=True)
class CentralDPConfig:
    """Central DP used when the round announcement carries none (the cloud's `central_dp` wins when present)."""

    clip: float = 0.0            # S; 0 = no central DP
    noise_mult: float = 0.0      # z
    sampling_rate: float = 0.0   # reported q; 0 = expected devices / enrolled devices


@dataclass(frozen=True)
class ForwardConfig:
    """The edge's [forward] table: when the aggregate is worth forwarding to the cloud, and how it is compressed."""

    significance: float = 0.0    # forward only when ||agg - last|| / ||last|| exceeds this; 0 = always
    compression: dict = field(default_factory=lambda: {"method": "dense", "bits": 32})  # of the aggregate payload
    sketch_dims: int = 64        # protocol.sketch: bytes per admitted update for the cloud's device-majority gate; 0 =
                                 # none (never sent under central DP or secure aggregation)

    def __post_init__(self) -> None:
        if not 0 <= self.sketch_dims <= 1024:
            raise ValueError("forward: need 0 <= sketch_dims <= 1024")

    def settings(self) -> CompressionSettings:
        return CompressionSettings(**self.compression)


@dataclass(frozen=True)
class EdgeConnectionConfig(ConnectionConfig):
    """The edge's own broker, with a persistent session by default: updates that devices publish while the edge
    restarts (kill -9 included) are queued for it. Replicas on a shared subscription need 0 (clean sessions)."""

    session_expiry_s: int = 3600


@dataclass(frozen=True)
class EdgeConfig:
    """All an edge gateway is configured with (configs/edge.toml), checked on load so a bad file fails at start."""

    edge_id: str
    state_dir: Path              # SQLite round store (edge.db)
    enrolment_dir: Path          # {device_id}.pub (+ .crt, .mac) of every device allowed to send updates
    signing_key: Path            # this edge's Ed25519 private key (signs EdgeAggregates)
    cloud_public_key: Path       # verifies the cloud's RoundAnnouncements and GlobalModels before relaying
    broker: EdgeConnectionConfig = field(default_factory=EdgeConnectionConfig)  # devices connect here
    cloud: ConnectionConfig | None = None  # the cloud's broker; absent = fl/cloud/* on `broker` (same broker or bridge)
    group: str = ""              # shared-subscription group of replicas; a secret, required when replicas > 1
    replica: str = "0"           # distinguishes replicas' client ids
    replicas: int = 1            # replicas sharing the group: each expects 1/replicas of the devices (quorum)
    aggregate_id: str = ""       # id the aggregates are signed and published as; "" = edge_id. Replicas each
                                 # need their own (e.g. "edge-a-r1", enrolled at the cloud as an edge)
    crl_file: Path | None = None  # the consortium CRL (pki crl.pem): devices whose {id}.crt it lists are REVOKED
    key_check_s: float = 5.0     # re-stat enrolment_dir and crl_file at most this often (and on SIGHUP)
    accept_signatures: bool = True  # false: a device with a MAC key ({id}.mac) must tag its updates with it
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)  # per-device norm and weight bounds (edge.bounds)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    max_update_bytes: int = 4 * 1024 * 1024
    synchronous: str = "normal"  # SQLite: "normal" survives kill -9, "full" also power loss
    metrics_port: int = 0        # Prometheus /metrics on this port; 0 = off
    metrics_host: str = "127.0.0.1"
    tick_s: float = 0.2          # how often deadlines are checked
    secagg_step_timeout_s: float = 30.0  # masked rounds: wait this long per protocol step (the first one also
                                         # covers the devices' training); silent devices count as dropped.
                                         # Edge-masked rounds: each edge waits up to the deadline + 4x this
    edge_keys_dir: Path | None = None    # {edge_id}.pub of the federation's edges (edge-masked rounds check the
                                         # cloud's roster with them); None: this edge cannot take part in them
    log_level: str = "info"

    def __post_init__(self) -> None:
        check_id(self.edge_id)
        check_id(self.group or self.edge_id)
        check_id(self.replica)
        check_id(self.aggregate_id or self.edge_id)
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.replicas > 1 and (len(self.group) < MIN_GROUP_CHARS or self.group == self.edge_id):
            raise ValueError(f"replicas > 1 need a secret `group` of >= {MIN_GROUP_CHARS} characters (e.g. `openssl "
                             "rand -hex 16`), not the edge id: a device that knows the group can join it and swallow "
                             "its share of the updates (docs/deployment.md section 4)")
        if self.replicas > 1 and self.broker.session_expiry_s > 0:
            raise ValueError("replicas > 1 need broker.session_expiry_s = 0: a persistent session would keep the "
                             "share of an offline replica queued for it instead of a live one (docs/edge.md)")
        if self.key_check_s < 0:
            raise ValueError("key_check_s must be >= 0")
        self.forward.settings()


def load_config(path: str | Path) -> EdgeConfig:
    return load_toml(EdgeConfig, path)
