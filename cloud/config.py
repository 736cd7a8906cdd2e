"""Cloud aggregator configuration: TOML -> dataclasses with documented defaults (configs/cloud.toml is the reference).

Relative paths resolve against the config file's directory; unknown keys are an error. The MQTT connection is the
protocol.mqtt.ConnectionConfig (same keys as the edge's), and the TOML loader is the edge's (one implementation of
the rules above).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cloud.accounting import ACCOUNTANTS
from cloud.contributions import LedgerConfig
from cloud.distill import DistillSchedule
from cloud.strategies import STRATEGIES, make
from cloud.strategies.base import RoundDefaults
from cloud.trust import TrustConfig
from protocol.compression import CompressionSettings
from protocol.errors import ProtocolError
from protocol.features import FeatureSchema, check_bounds
from protocol.messages import CentralDPReport, TrainingPlan
from protocol.mqtt import ConnectionConfig
from protocol.secagg.deploy import MaskedRound, statistics_table
from protocol.secagg.edge_tier import EdgeMaskedRound
from protocol.tomlconfig import load_toml
from protocol.topics import check_id


@dataclass(frozen=True)
class CloudConnectionConfig(ConnectionConfig):
    """The cloud's broker, with a persistent session: aggregates sent while the cloud restarts are queued."""

    session_expiry_s: int = 3600


@dataclass(frozen=True)
class CentralDPConfig:
    """User-level DP the edges must add (announced in every round): clip each device's delta to `clip` (L2),
    add N(0, (noise_mult * clip)^2) to the sum. clip = 0: no central DP is asked."""

    clip: float = 0.0
    noise_mult: float = 0.0

    def report(self) -> CentralDPReport | None:
        return CentralDPReport(self.clip, self.noise_mult, 1.0) if self.clip > 0 else None


@dataclass(frozen=True)
class BoundsConfig:
    """The cloud's [bounds] table: how far one edge's aggregate may move the model and how much it may weigh
    (cloud.rounds.bound_edges; references are lower medians over the edges' latest values, protocol.bounds)."""

    norm_multiple: float = 4.0       # scale an edge's delta to at most this x the reference edge delta norm; 0 = off
    model_ratio: float = 10.0        # and to at most this x the global model's norm; 0 = off
    samples_multiple: float = 4.0    # an edge's samples (and weight) per device count at most this x the reference
    max_samples: int = 1_000_000     # per device: an aggregate claiming more is refused (BAD_VALUE)
    history: int = 1000              # edges whose latest values are remembered

    def __post_init__(self) -> None:
        if min(self.norm_multiple, self.model_ratio, self.samples_multiple) < 0 or self.max_samples < 1 \
                or self.history < 1:
            raise ValueError("bounds: need multiples and model_ratio >= 0, max_samples >= 1, history >= 1")


@dataclass(frozen=True)
class PrivacyConfig:
    """The cloud's [privacy] table: device (example-level) and central (user-level) budgets, and the accountant."""

    delta: float = 1e-5
    device_epsilon: float = 0.0      # example-level budget; 0 = unlimited
    central_epsilon: float = 0.0     # user-level budget; 0 = unlimited
    accountant: str = "rdp"          # per-round reports: "rdp" (fast) | "pld" (tighter, ~1 s per level per round)
    final_pld: bool = True           # also compute PLD epsilons once for report.json
    calibrate: bool = False          # each device lowers plan.noise_mult to the least that keeps it within
                                     # device_epsilon over the rounds left (more data, less noise; docs/cloud.md)


@dataclass(frozen=True)
class StrategyConfig:
    """The cloud's [strategy] table: which server strategy runs, with its keyword options (cloud.strategies.make)."""

    name: str = "fediomt"            # fedavg | fedprox | scaffold | fedadam | fediomt
    options: dict = field(default_factory=dict)  # keyword options of the strategy class (docs/cloud.md)


@dataclass(frozen=True)
class FeaturesConfig:
    """The cloud's [features] table: federated standardisation of a tabular model's raw inputs. Before the first
    training round the cloud runs a statistics round (docs/protocol.md "Statistics rounds") over `schema`, derives
    the pooled FeatureTransform (run_dir/features.json), announces it in every training round and puts it into
    every bundle it builds; eval_data (and the distillation proxy) then hold RAW features, NaN for missing."""

    schema: Path                     # JSON: {"numeric": [columns], "categorical": [[column, [levels]], ...]}
    clip_z: float = 5.0              # |z| cap after standardisation; 0 = none
    bounds: dict = field(default_factory=dict)   # numeric column -> [lo, hi]: declared ranges (all or none)
    noise_mult: float = 0.0          # > 0: each site adds Gaussian noise (example-level DP, needs bounds)
    quantile: float = 0.0            # > 0: a second (histogram) round clips each input at its pooled q, 1 - q
                                     # quantiles; training then starts at round 2
    secagg: dict | None = None       # a [secagg] table (graph, k, threshold, min_cohort): the sites mask their
                                     # statistics (needs bounds); None = plaintext to the edge
    site_rows_max: int = 100_000     # masked rounds: the largest site's rows (statistics are masked divided by it)

    def load_schema(self) -> FeatureSchema:
        data = json.loads(Path(self.schema).read_text())
        return FeatureSchema.from_dict(data.get("schema", data))   # a schema, or a transform's

    def encoded_bounds(self, schema: FeatureSchema) -> list[list[float]] | None:
        """[lo, hi] per model input (one-hot levels [0, 1]); None without declared bounds. ValueError when a numeric
        column has none, or a bound names no column of the schema."""
        if not self.bounds:
            return None
        unknown = sorted(set(self.bounds) - set(schema.numeric))
        missing = [c for c in schema.numeric if c not in self.bounds]
        if unknown or missing:
            raise ValueError(f"features.bounds: {'no such numeric column ' + str(unknown) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{'no [lo, hi] for ' + str(missing) if missing else ''} (bounds are all or none)")
        out = [[float(v) for v in self.bounds[c]] for c in schema.numeric]
        out += [[0.0, 1.0] for _, levels in schema.categorical for _ in levels]
        check_bounds(out, schema.n_features)
        return out


@dataclass(frozen=True)
class CloudConfig:
    """All the cloud aggregator is configured with (configs/cloud.toml), checked on load: a bad file fails at start."""

    run_dir: Path                    # config copy, rounds.jsonl, report.json, checkpoint.npz, pending/
    signing_key: Path                # the cloud's Ed25519 private key (signs rounds and models)
    edge_keys_dir: Path              # {edge_id}.pub of every edge allowed to send aggregates (+ .crt: pki enrol)
    edges: list[str] = field(default_factory=list)  # edges a round waits for; [] = every {edge}.pub in the dir
    crl_file: Path | None = None     # the consortium CRL: edges whose {edge_id}.crt it lists are REVOKED
    key_check_s: float = 5.0         # re-stat edge_keys_dir and crl_file at most this often
    model: str = "wearable_cnn"      # firmware_models name
    model_options: dict = field(default_factory=dict)
    eval_data: Path | None = None    # held-out NPZ (x, y); None = no evaluation (accuracy/loss null)
    rounds: int = 20
    round_timeout_s: float = 60.0    # deadline = announcement + this
    grace_s: float = 5.0             # edges close at the deadline: wait this long after it for their aggregates
    min_edges: int = 1               # at the deadline: close with >= this many aggregates, else re-announce
    min_devices: int = 1             # a round that closes with fewer devices in it fails the run: the cloud stops,
                                     # says why (report.json finished = false) and exits 4; 0 = never
    run_id: str = ""                 # this run's id in every round and model; "" = drawn at the first start
                                     # (protocol.messages.new_run_id) and kept in the checkpoint
    devices: list[str] = field(default_factory=list)  # known device ids (cohort selection before any round)
    population: int = 0              # devices in the federation (SCAFFOLD's N); 0 = devices known so far
    seed: int = 0                    # initial weights and the strategy's sampling
    model_encoding: str = "full"     # GlobalModel: "full" float32 | "delta" compressed against the previous version
    model_full_every: int = 5        # delta mode: every Nth version goes out full (late joiners catch up)
    model_compression: dict = field(default_factory=lambda: {"method": "topk", "density": 0.1, "bits": 8})
    client_id: str = "fediomt-cloud"
    metrics_port: int = 0            # Prometheus /metrics; 0 = off
    metrics_host: str = "127.0.0.1"
    tick_s: float = 0.2
    log_level: str = "info"
    broker: CloudConnectionConfig = field(default_factory=lambda: CloudConnectionConfig())
    plan: TrainingPlan = field(default_factory=lambda: default_plan())
    compression: dict = field(default_factory=lambda: CompressionSettings().to_dict())
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)  # cloud.trust: the device-majority gate, or with
                                                             # root_data the root-update gate
    ledger: LedgerConfig | None = None  # contribution ledger (cloud/contributions.py); None = off
    distill: DistillSchedule | None = None  # int8 students + OTA push (cloud/distill.py); None = off
    secagg: dict | None = None       # RoundAnnouncement.secagg (docs/secagg.md "Deployment"); None = plaintext rounds
    secagg_step_timeout_s: float = 10.0  # edge-masked rounds: each protocol step after the edges' keys waits this long
    features: FeaturesConfig | None = None  # federated standardisation before training; None = inputs used as sent

    def __post_init__(self) -> None:
        for edge in self.edges:
            check_id(edge)
        check_id(self.model)
        if self.strategy.name not in STRATEGIES:
            raise ValueError(f"strategy.name {self.strategy.name!r} not in {sorted(STRATEGIES)}")
        if self.privacy.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant {self.privacy.accountant!r} not in {ACCOUNTANTS}")
        if not 0 < self.privacy.delta < 1:
            raise ValueError("privacy.delta must be in (0, 1)")
        if self.privacy.device_epsilon > 0 and self.plan.noise_mult <= 0:
            raise ValueError("privacy.device_epsilon is set but plan.noise_mult = 0: device DP would be unbounded")
        if self.privacy.calibrate and self.privacy.device_epsilon <= 0:
            raise ValueError("privacy.calibrate needs privacy.device_epsilon > 0: the target devices calibrate to")
        if self.privacy.central_epsilon > 0 and (self.central_dp.clip <= 0 or self.central_dp.noise_mult <= 0):
            raise ValueError("privacy.central_epsilon is set but central_dp asks for no noise")
        if self.rounds < 1 or self.round_timeout_s <= 0 or self.grace_s < 0 or self.min_edges < 1:
            raise ValueError("need rounds >= 1, round_timeout_s > 0, grace_s >= 0 and min_edges >= 1")
        if self.key_check_s < 0:
            raise ValueError("key_check_s must be >= 0")
        if self.min_devices < 0:
            raise ValueError("min_devices must be >= 0")
        if self.run_id:
            check_id(self.run_id)
        if self.features is not None:
            self._check_features()
        if self.features is not None and self.trust.root_data is not None:
            raise ValueError("[trust] root_data with [features]: the root rows would need the federation's "
                             "standardisation first; not supported")
        if self.model_encoding not in ("full", "delta") or self.model_full_every < 1:
            raise ValueError("model_encoding must be 'full' or 'delta' and model_full_every >= 1")
        compression_from_table(self.compression)
        compression_from_table(self.model_compression)
        MaskedRound.from_announcement(self.secagg_for_round())
        tier = EdgeMaskedRound.from_announcement(self.secagg)
        if tier is not None:
            self._check_edge_tier(tier)

    def edge_ids(self) -> list[str]:
        """The edges a round waits for: `edges`, or every {edge}.pub in edge_keys_dir."""
        return self.edges or sorted(p.stem for p in Path(self.edge_keys_dir).glob("*.pub"))

    def _check_edge_tier(self, tier: EdgeMaskedRound) -> None:
        """Edge-level SecAgg: enough edges for min_cohort, and a strategy that needs nothing per edge."""
        n, least = len(self.edge_ids()), tier.config.min_cohort
        if n < least:
            raise ValueError(f"[secagg] edges_mask: {n} edges < min_cohort {least}: the cloud would learn the sum of "
                             "too few edges (with 2, the cloud and one edge together learn the other's aggregate)")
        strategy = make(self.strategy.name, RoundDefaults(self.plan, self.compression_settings(),
                                                          self.central_dp.report()), self.strategy.options)
        needs = strategy.per_edge_inputs()
        if needs:
            raise ValueError(f"[secagg] edges_mask: strategy {self.strategy.name!r} needs what the cloud cannot see "
                             f"under edge masking: {'; '.join(needs)}")
        if self.secagg_step_timeout_s <= 0:
            raise ValueError("secagg_step_timeout_s must be > 0")

    def _check_features(self) -> None:
        """[features]: a readable schema whose inputs are the model's (a tabular model of n_features inputs)."""
        try:
            schema = self.features.load_schema()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"features.schema {self.features.schema}: {exc}") from exc
        want = self.model_options.get("n_features")
        if want is not None and int(want) != schema.n_features:
            raise ValueError(f"features.schema has {schema.n_features} model inputs, model_options.n_features = "
                             f"{want}")
        if self.features.clip_z < 0:
            raise ValueError("features.clip_z must be >= 0")
        if self.features.noise_mult < 0:
            raise ValueError("features.noise_mult must be >= 0")
        if not 0 <= self.features.quantile < 0.5:
            raise ValueError("features.quantile must be in [0, 0.5)")
        if self.features.secagg is not None:
            if not self.features.bounds:
                raise ValueError("features.secagg needs features.bounds: masked values must lie on a bounded grid")
            if self.features.site_rows_max < 1:
                raise ValueError("features.site_rows_max must be >= 1")
            try:
                statistics_table(self.features.secagg, 1, len(self.devices), self.features.site_rows_max)
            except ProtocolError as exc:
                raise ValueError(f"features.secagg: {exc.detail}") from exc
        if self.features.noise_mult > 0 and not self.features.bounds:
            raise ValueError("features.noise_mult needs features.bounds: the noise is calibrated to one record's "
                             "influence, which only declared ranges bound")
        try:
            self.features.encoded_bounds(schema)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"features.bounds: {exc}" if "features.bounds" not in str(exc) else str(exc)) from exc

    def secagg_for_round(self) -> dict | None:
        return announced_secagg(self.secagg)

    def compression_settings(self) -> dict:
        """The full settings dict announced to devices (unset keys take CompressionSettings defaults)."""
        return compression_from_table(self.compression).to_dict()

    def round_settings(self) -> RoundSettings:
        """What the round logic (cloud.engine.CloudEngine) needs of this configuration."""
        return RoundSettings(
            model=self.model, edges=tuple(self.edge_ids()), rounds=self.rounds, round_timeout_s=self.round_timeout_s,
            grace_s=self.grace_s, min_edges=self.min_edges, devices=tuple(self.devices), population=self.population,
            seed=self.seed, plan=self.plan, compression=self.compression, central_dp=self.central_dp,
            privacy=self.privacy, strategy=self.strategy, model_encoding=self.model_encoding,
            model_full_every=self.model_full_every, model_compression=self.model_compression, secagg=self.secagg,
            bounds=self.bounds, trust=self.trust, min_devices=self.min_devices, run_id=self.run_id,
            first_round=1 + (self.features is not None and self.features.quantile > 0))   # after the statistics rounds


@dataclass(frozen=True)
class RoundSettings:
    """The round-relevant part of the configuration, without files or connections: CloudConfig.round_settings()
    makes it from cloud.toml, the simulator builds one directly. Fields and defaults mean what CloudConfig's do
    (CloudConfig validates them)."""

    model: str
    edges: tuple[str, ...]
    rounds: int = 20
    round_timeout_s: float = 60.0
    grace_s: float = 5.0
    min_edges: int = 1
    min_devices: int = 0             # the daemon's default is 1 (CloudConfig); the simulator's rounds may be empty
    run_id: str = ""
    devices: tuple[str, ...] = ()
    population: int = 0
    seed: int = 0
    plan: TrainingPlan = field(default_factory=lambda: default_plan())
    compression: dict = field(default_factory=lambda: CompressionSettings().to_dict())
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model_encoding: str = "full"
    model_full_every: int = 5
    model_compression: dict = field(default_factory=lambda: {"method": "topk", "density": 0.1, "bits": 8})
    secagg: dict | None = None
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)   # its device-majority gate (the root gate: CloudEngine)
    first_round: int = 1             # the first round id and model version (statistics rounds run as 0 and 1)
    statistics: str = ""             # announced RoundAnnouncement.statistics ("summary": a statistics round)
    features: str = ""               # announced RoundAnnouncement.features (JSON; "" = none)

    def defaults(self) -> RoundDefaults:
        """What the strategy starts each round from."""
        return RoundDefaults(self.plan, compression_from_table(self.compression).to_dict(), self.central_dp.report(),
                             self.round_timeout_s)


def default_plan() -> TrainingPlan:
    return TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)


def announced_secagg(secagg: dict | None) -> dict | None:
    """The announced secagg table: [secagg] as configured, with a fresh random-k seed per round when it asks for
    random-k (density < 1) without fixing a seed."""
    if not secagg:
        return None
    table = dict(secagg)
    if table.get("density", 1.0) < 1 and "seed" not in table:
        table["seed"] = secrets.randbits(63)
    return table


def compression_from_table(partial: dict) -> CompressionSettings:
    """CompressionSettings from a TOML table that may leave keys at their defaults; ProtocolError when invalid."""
    return CompressionSettings.from_dict({**CompressionSettings().to_dict(), **partial})


def load_config(path: str | Path) -> CloudConfig:
    return load_toml(CloudConfig, path)
