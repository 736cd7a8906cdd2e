"""`fediomt broker config`: the Mosquitto config (and ACL file) of an edge or cloud broker.

Every client authenticates with a consortium certificate over TLS 1.3 (`require_certificate`); its CN becomes its
username (`use_identity_as_username`), and the ACL grants each identity exactly the topics of protocol/topics.py
it needs. Devices are granted by `pattern` (`%u` = their own id), so enrolling a device needs a certificate but no
broker change; edges are listed by name in the cloud's ACL.

Client ids on both brokers are the certificate's CN (`use_username_as_clientid`): nobody can connect under
another's client id, which took its place and, with a clean start, destroyed its queued messages (issue 18: a
device as the edge). One certificate therefore holds one connection, and a persistent session is keyed by the CN:
edge replicas get certificates of their own (`--replica CN`, granted the edge's rights), and each extra connection
of the cloud (masked rounds, ledger proposer, `fediomt push`) and of an edge (its ledger validator) has a role
certificate, CN "ID.ROLE" (protocol.tls.ROLES), with only that connection's rights (docs/deployment.md "Client ids").

Size cap: `max_packet_size` sits just above the protocol's largest message (protocol.codec.MAX_MESSAGE_BYTES) and
is checked before the broker reads the payload. A client that sends a bigger packet is disconnected; paho 2.2 then
resends the same QoS 1 packet after every reconnect, forever (MQTT 3.1.1 and 5 alike). Clients must check sizes
and chunk (protocol `Chunk`) below the cap.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fediomt import pki
from protocol import topics as t
from protocol.atomic import atomic_write
from protocol.codec import MAX_MESSAGE_BYTES
from protocol.secagg.mqtt_driver import UPLINK
from protocol.tls import role_cn

PACKET_HEADROOM = 64 * 1024  # fixed header, topic and MQTT 5 properties around the largest protocol message
DEFAULT_PORT = 8883


@dataclass
class BrokerFilesConfig:
    """What `fediomt broker config` needs to write a broker's config and ACL files (not a client's connection
    settings: that is protocol.mqtt.ConnectionConfig); defaults are the documented production values."""

    role: str                                   # "edge" or "cloud"
    id: str                                     # the edge id (role edge) or "cloud"
    pki: Path                                   # a PKI directory (`fediomt pki init` or `pki export`)
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    server: str | None = None                   # server certificate name; default "broker-{id}"
    cloud_host: str | None = None               # edge only: bridge to this cloud broker
    cloud_port: int = DEFAULT_PORT
    edges: list[str] = field(default_factory=list)  # cloud only: edges allowed in; default: the PKI's edges
    replicas: list[str] = field(default_factory=list)  # edge only: CNs of edge replicas, granted the edge's rights
    data_dir: Path = Path("/var/lib/mosquitto")
    acl_file: Path | None = None                # default: the config path with suffix .acl
    max_packet_size: int = MAX_MESSAGE_BYTES + PACKET_HEADROOM
    autosave_interval: int = 5                  # s; the daemons' SQLite, not the broker, is the durable store
    max_queued_messages: int = 10_000           # per offline persistent session
    session_expiry: str = "7d"                  # drop sessions of devices gone for good

    def __post_init__(self) -> None:
        if self.role not in ("edge", "cloud"):
            raise ValueError(f"role must be edge or cloud, not {self.role!r}")
        t.check_id(self.id)
        if self.role == "cloud" and self.id != pki.CLOUD_ID:
            raise ValueError(f"the cloud broker's id is {pki.CLOUD_ID!r}")
        if self.role == "cloud" and self.cloud_host:
            raise ValueError("only an edge broker bridges to the cloud")
        self.pki = Path(self.pki)
        if self.role == "cloud" and self.replicas:
            raise ValueError("replicas are an edge broker's")
        for name in [*self.edges, *self.replicas]:
            t.check_id(name)

    @property
    def server_name(self) -> str:
        return self.server or f"broker-{self.id}"


def edge_acl(edge: str, replicas: list[str] | tuple[str, ...] = ()) -> str:
    """Devices (any certificate, by pattern) and the edge gateway `edge` (and its replicas' CNs) on the edge's
    broker."""
    e = t.check_id(edge)
    return "\n".join([
        "# Devices: %u is the CN of the client certificate (the device id).",
        f"pattern write {t.update_topic(e, t.CLIENT)}",
        f"pattern write {t.status_topic(e, t.CLIENT)}",
        f"pattern write {t.secagg_topic(e, t.ANY, t.CLIENT)}",
        f"pattern read {t.round_topic(e)}",
        f"pattern read {t.model_topic(e)}",
        f"pattern read {t.model_full_topic(e)}",
        f"pattern read {t.ack_topic(e, t.CLIENT)}",
        f"pattern read {t.subtree(e, 'bundles')}",
        f"pattern read {t.secagg_topic(e, t.ANY)}",  # the edge's broadcasts (open, roster, unmask, outcome)...
        f"pattern read {t.secagg_topic(e, 'inbox', t.CLIENT)}",  # ...and its own share inbox, not its neighbours'
        "",
        *(line for cn in [e, *replicas] for line in [
            f"# The edge gateway{' replica ' + t.check_id(cn) if cn != e else ''}: all of its edge's topics, and its "
            "own side of the cloud topics (bridged).",
            f"user {cn}",
            f"topic readwrite {t.subtree(e)}",
            f"topic write {t.aggregate_topic(e)}",
            f"topic write {t.edge_status_topic(e)}",
            f"topic read {t.CLOUD_ROUND}",
            f"topic read {t.CLOUD_MODEL}",
            f"topic read {t.receipt_topic(e)}",
            "",
        ]),
    ])


def cloud_acl(edges: list[str]) -> str:
    """The cloud's connections and each listed edge's (its bridge, its ledger validator) on the cloud's broker, each
    connection its own certificate with only its own rights."""
    cloud = pki.CLOUD_ID
    lines = ["# The cloud aggregator: rounds, models, aggregates and edge statuses.",
             f"user {cloud}", f"topic readwrite {t.subtree(t.CLOUD)}", "",
             "# Its masked-round (edge-tier SecAgg server) connection.",
             f"user {role_cn(cloud, 'secagg')}", f"topic readwrite {t.subtree(t.CLOUD, 'secagg')}", "",
             "# Its ledger proposer.", f"user {role_cn(cloud, 'ledger')}", f"topic readwrite {t.subtree(t.LEDGER)}", "",
             "# `fediomt push`: OTA bundles (retained), bridged in to each edge's devices; their statuses (outcomes).",
             f"user {role_cn(cloud, 'push')}", f"topic readwrite {t.subtree(t.ANY, 'bundles')}",
             f"topic read {t.status_topic(t.ANY, t.ANY)}", ""]
    for edge in edges:
        lines += [f"# Edge {edge} (its bridge): its aggregate, its and its devices' statuses up; the cloud's round, "
                  "model and its bundles down.",
                  f"user {t.check_id(edge)}", f"topic write {t.aggregate_topic(edge)}",
                  f"topic write {t.edge_status_topic(edge)}", f"topic write {t.status_topic(edge, t.ANY)}",
                  f"topic read {t.CLOUD_ROUND}", f"topic read {t.CLOUD_MODEL}", f"topic read {t.receipt_topic(edge)}",
                  f"topic read {t.subtree(edge, 'bundles')}", *edge_tier_acl(edge), "",
                  f"# Edge {edge}'s ledger validator.", f"user {role_cn(edge, 'ledger')}",
                  f"topic read {t.LEDGER_PROPOSALS}", f"topic read {t.LEDGER_BLOCKS}",
                  f"topic write {t.ledger_vote_topic(edge)}", f"topic write {t.ledger_sync_topic(edge)}",
                  f"topic read {t.ledger_catchup_topic(edge)}", ""]
    return "\n".join(lines)


def edge_tier_acl(edge: str) -> list[str]:
    """Edge-level secure aggregation (the cloud is the server): the edge's own uplink steps, the cloud's broadcasts
    and its own share inbox, never another edge's."""
    return [f"topic write {t.secagg_topic(t.CLOUD, step, edge)}" for step in UPLINK] + [
        f"topic read {t.secagg_topic(t.CLOUD, t.ANY)}", f"topic read {t.secagg_topic(t.CLOUD, 'inbox', edge)}"]


def pki_edges(directory: Path) -> list[str]:
    """Edges with a valid certificate in a CA directory's index (empty for an exported directory)."""
    index = directory / "index.json"
    if not index.exists():
        return []
    certs = json.loads(index.read_text())["certs"]
    return sorted({c["name"] for c in certs if c["kind"] == "edge" and c["revoked_at"] is None})


def render(cfg: BrokerFilesConfig, acl_path: Path) -> str:
    """The mosquitto.conf text. Bridge settings come last: everything after `connection` belongs to the bridge."""
    server = pki.identity(cfg.pki, "server", cfg.server_name)
    lines = [
        f"# FedIoMT {cfg.role} broker for {cfg.id!r}; written by `fediomt broker config`.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl_path.absolute()}",
        "persistence true",
        f"persistence_location {cfg.data_dir.absolute()}/",
        f"autosave_interval {cfg.autosave_interval}",
        f"persistent_client_expiration {cfg.session_expiry}",
        f"max_queued_messages {cfg.max_queued_messages}",
        f"max_packet_size {cfg.max_packet_size}",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "",
        f"listener {cfg.port} {cfg.bind}",
        "tls_version tlsv1.3",
        f"cafile {pki.ca_cert_path(cfg.pki).absolute()}",
        f"certfile {server.cert.absolute()}",
        f"keyfile {server.key.absolute()}",
        f"crlfile {pki.crl_path(cfg.pki).absolute()}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",   # one client id per certificate: none can take another's place
    ]
    if cfg.cloud_host:
        edge = pki.identity(cfg.pki, "edge", cfg.id)
        lines += [
            "",
            "# Bridge to the cloud broker with the edge's client certificate: the cloud's ACL for this edge applies.",
            f"connection fediomt-{cfg.id}-cloud",
            f"address {cfg.cloud_host}:{cfg.cloud_port}",
            "bridge_protocol_version mqttv50",
            f"remote_clientid {cfg.id}",   # what the cloud broker makes it anyway: the certificate's CN
            "cleansession false",
            "restart_timeout 1 30",
            "notifications_local_only true",
            "try_private true",
            f"bridge_cafile {pki.ca_cert_path(cfg.pki).absolute()}",
            f"bridge_certfile {edge.cert.absolute()}",
            f"bridge_keyfile {edge.key.absolute()}",
            "bridge_tls_version tlsv1.3",
            "bridge_insecure false",
            f"topic {t.aggregate_topic(cfg.id)} out 1",
            f"topic {t.edge_status_topic(cfg.id)} out 1",
            f"topic {t.status_topic(cfg.id, t.ANY)} out 1",   # device statuses: `fediomt push` sees outcomes
            f"topic {t.CLOUD_ROUND} in 1",
            f"topic {t.CLOUD_MODEL} in 1",
            f"topic {t.receipt_topic(cfg.id)} in 1",
            f"topic {t.subtree(cfg.id, 'bundles')} in 1",
            *(f"topic {t.secagg_topic(t.CLOUD, step, cfg.id)} out 1" for step in UPLINK),
            f"topic {t.secagg_topic(t.CLOUD, t.ANY)} in 1",
            f"topic {t.secagg_topic(t.CLOUD, 'inbox', cfg.id)} in 1",
        ]
    return "\n".join(lines) + "\n"


def write(cfg: BrokerFilesConfig, out: str | Path, files_pki: Path | None = None) -> tuple[Path, Path]:
    """Write the config and its ACL file; returns both paths. Refuses when a certificate it names is missing.
    `files_pki`: where the PKI files are now, when cfg.pki is the path they will have on the broker's host
    (`fediomt provision --root`); the ACL file is written beside `out` unless cfg.acl_file is set."""
    out = Path(out)
    acl_path = cfg.acl_file or out.with_suffix(".acl")
    here = files_pki or cfg.pki
    needed = {pki.ca_cert_path(here): f"fediomt pki init --dir {cfg.pki}",
              pki.crl_path(here): f"fediomt pki crl --dir {cfg.pki}",
              pki.identity(here, "server", cfg.server_name).cert:
                  f"fediomt pki issue --server {cfg.server_name} --host HOSTNAME"}
    if cfg.cloud_host:
        needed[pki.identity(here, "edge", cfg.id).cert] = f"fediomt pki issue --edge {cfg.id}"
    missing = [f"{path} (`{fix}`)" for path, fix in needed.items() if not path.exists()]
    if missing:
        raise pki.PkiError(f"missing {'; '.join(missing)}")
    if cfg.role == "edge":
        acl = edge_acl(cfg.id, cfg.replicas)
    else:
        edges = cfg.edges or pki_edges(cfg.pki)
        if not edges:
            raise pki.PkiError(f"no edge would be allowed in: pass --edge ID (none found in {cfg.pki}/index.json)")
        acl = cloud_acl(edges)
    acl_out = out.with_suffix(".acl") if files_pki is not None else acl_path   # written here, named as on the host
    atomic_write(acl_out, acl.encode())
    atomic_write(out, render(cfg, acl_path).encode())
    return out, acl_out


def _cmd_config(args: argparse.Namespace) -> int:
    try:
        cfg = BrokerFilesConfig(role=args.role, id=args.id or pki.CLOUD_ID, pki=Path(args.pki), port=args.port,
                           bind=args.bind, server=args.server, cloud_host=args.cloud_host, cloud_port=args.cloud_port,
                           edges=args.edge or [], replicas=args.replica or [], data_dir=Path(args.data_dir),
                           acl_file=Path(args.acl) if args.acl else None, max_packet_size=args.max_packet_size)
        for path in write(cfg, args.out):
            print(path)
    except (ValueError, pki.PkiError) as exc:
        print(f"fediomt broker: {exc}", file=sys.stderr)
        return 1
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("config", help="write mosquitto.conf + ACL for an edge or the cloud broker",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("edge", "cloud"), required=True)
    p.add_argument("--id", help="the edge id (role edge); the cloud is always 'cloud'")
    p.add_argument("--pki", default="pki", help="PKI directory (default ./pki)")
    p.add_argument("--out", required=True, help="config file to write; the ACL goes beside it (.acl)")
    p.add_argument("--acl", help="ACL file path (default: --out with suffix .acl)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TLS listener port (default {DEFAULT_PORT})")
    p.add_argument("--bind", default="0.0.0.0", help="listener address (default 0.0.0.0)")
    p.add_argument("--server", help="server certificate name (default broker-ID)")
    p.add_argument("--cloud-host", help="edge: bridge to the cloud broker at this host")
    p.add_argument("--cloud-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--edge", action="append", help="cloud: an edge allowed in (repeatable; default: the PKI's edges)")
    p.add_argument("--replica", action="append",
                   help="edge: CN of an edge replica's certificate, granted the edge's rights (repeatable)")
    p.add_argument("--data-dir", default="/var/lib/mosquitto", help="persistence directory")
    p.add_argument("--max-packet-size", type=int, default=MAX_MESSAGE_BYTES + PACKET_HEADROOM,
                   help="bytes; clients must chunk below it (default: protocol maximum + 64 KiB)")
    p.set_defaults(func=_cmd_config)
