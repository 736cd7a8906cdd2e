"""systemd units of the daemons and brokers, rendered in one place: `deploy/systemd/` holds them with the default
paths (tests/test_deployment.py checks they are what `render` gives), `fediomt provision` and `fediomt
init-config` write them with a site's own paths.

Every unit is hardened to an exposure of 1.3-1.4 in `systemd-analyze security` (systemd 252; "OK"; the limit the
project holds itself to is 4.0, measured by tests/test_deployment.py where systemd-analyze exists): no
capabilities, a read-only system, no access to home directories, devices, kernel tunables, other users'
processes or namespaces, a system-call allow list, and only the state directory writable. What stays open is
what a network daemon needs: IPv4/IPv6 sockets and the network itself.
"""

from __future__ import annotations

from dataclasses import dataclass

HARDENING = """\
# Hardening (`systemd-analyze security` rates this unit about 1.3, OK): no capabilities, the system read-only
# (ReadWritePaths is the one writable place), no home directories, devices, kernel tunables, other processes.
NoNewPrivileges=true
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
PrivateDevices=true
DevicePolicy=closed
PrivateUsers=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
RemoveIPC=true
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged{resources}
SystemCallErrorNumber=EPERM
UMask=0077
"""


@dataclass(frozen=True)
class Paths:
    """Where a host keeps things: the `fediomt` executable, the config folder (read-only to the daemons), the
    state folder (the one writable place) and Mosquitto's persistence folder."""

    fediomt: str = "/opt/fediomt/.venv/bin/fediomt"
    etc: str = "/etc/fediomt"
    state: str = "/var/lib/fediomt"
    mosquitto: str = "/usr/sbin/mosquitto"


def _hardening(resources: bool = True) -> str:
    # TensorFlow (the cloud) may set CPU affinity and memory policies (@resources): the cloud keeps them
    return HARDENING.format(resources=" @resources" if resources else "")


def daemon(kind: str, paths: Paths = Paths(), broker: str | None = None, ledger_id: str | None = None) -> str:
    """The unit of `fediomt KIND run` (device, edge, cloud) or the ledger validator (kind "ledger"); `broker` is
    the project's broker instance on the same host (fediomt-mosquitto@BROKER) it is ordered after."""
    after = ["network-online.target"] + ([f"fediomt-mosquitto@{broker}.service"] if broker else [])
    wants = ["network-online.target"] + ([f"fediomt-mosquitto@{broker}.service"] if broker else [])
    config = f"{paths.etc}/{kind}.toml"
    if kind == "ledger":
        exec_start = (f"{paths.fediomt} ledger replica {paths.state}/ledger/ledger.db --consortium "
                      f"{paths.etc}/consortium.toml --id ${{FEDIOMT_LEDGER_ID}} --key ${{FEDIOMT_LEDGER_KEY}} "
                      f"--host ${{FEDIOMT_LEDGER_HOST}} --port ${{FEDIOMT_LEDGER_PORT}} --pki {paths.etc}/pki")
    else:
        exec_start = f"{paths.fediomt} {kind} run --config {config}"
    describe = {"device": "FedIoMT device agent (on-device DP-SGD, privacy budget, MQTT to the edge)",
                "edge": "FedIoMT edge gateway (validate, filter, aggregate, forward device updates)",
                "cloud": "FedIoMT cloud aggregator (strategies, privacy accounting, global model)",
                "ledger": "FedIoMT ledger validator (sign valid contribution blocks, replicate the chain)"}[kind]
    lines = [
        f"# {describe.split(' (')[0]}: written by `fediomt provision` / `fediomt init-config` (fediomt/units.py).",
        f"# Install: copy to /etc/systemd/system/, then systemctl daemon-reload && systemctl enable --now "
        f"fediomt-{kind}",
        "# Exit status 2 (a bad config or a missing file: one line in the journal) and 3/4 (a bundle that does not",
        "# verify; a failed run) are not restarted: fix the cause, then `systemctl restart`.",
        "[Unit]",
        f"Description={describe}",
        f"Documentation=file:///usr/share/doc/fediomt/{'ledger' if kind == 'ledger' else kind}.md",
        f"Wants={' '.join(wants)}",
        f"After={' '.join(after + (['time-sync.target'] if kind == 'device' else []))}",
        "",
        "[Service]",
        "Type=simple",
        "User=fediomt",
        "Group=fediomt",
    ]
    if kind == "ledger":
        lines += ["# FEDIOMT_LEDGER_ID (this edge's id, never the host name), FEDIOMT_LEDGER_KEY, and the cloud's "
                  "broker",
                  "# (FEDIOMT_LEDGER_HOST, FEDIOMT_LEDGER_PORT): ledger topics are not bridged, it connects there",
                  f"EnvironmentFile={paths.etc}/ledger.env"]
    lines += [
        f"ExecStart={exec_start}",
        *(["ExecReload=/bin/kill -HUP $MAINPID"] if kind == "edge" else []),
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
        f"Restart={'on-failure' if kind in ('cloud', 'device') else 'always'}",
        f"RestartSec={ {'device': 10, 'cloud': 5}.get(kind, 2)}",
        "RestartPreventExitStatus=2 3 4",
        "StateDirectory=fediomt",
        f"WorkingDirectory={paths.state}",
        f"Environment=PYTHONUNBUFFERED=1{' TF_CPP_MIN_LOG_LEVEL=2' if kind == 'cloud' else ''}",
        f"ReadWritePaths={paths.state}",
        f"ReadOnlyPaths={paths.etc}",
        f"MemoryMax={ {'device': '256M', 'edge': '2G', 'cloud': '4G', 'ledger': '512M'}[kind]}",
        *(["CPUWeight=50", "Nice=5"] if kind == "device" else []),
        _hardening(resources=kind != "cloud").rstrip(),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def broker(paths: Paths = Paths()) -> str:
    """fediomt-mosquitto@.service: `systemctl enable --now fediomt-mosquitto@NAME` runs {etc}/broker/NAME.conf
    as the `mosquitto` user (its persistence under /var/lib/mosquitto/NAME, created by systemd)."""
    return "\n".join([
        "# A FedIoMT Mosquitto broker: `systemctl enable --now fediomt-mosquitto@NAME` runs",
        f"# {paths.etc}/broker/NAME.conf (written by `fediomt provision` or `fediomt broker config`) as the mosquitto",
        "# user, which must be able to read the server and bridge keys the config names (provision's install.sh",
        "# sets that). `systemctl reload` sends SIGHUP: the ACL and the CRL are re-read for new connections.",
        "[Unit]",
        "Description=FedIoMT Mosquitto broker (%i)",
        "Documentation=file:///usr/share/doc/fediomt/deployment.md man:mosquitto.conf(5)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "User=mosquitto",
        "Group=mosquitto",
        "StateDirectory=mosquitto/%i",
        f"ExecStart={paths.mosquitto} -c {paths.etc}/broker/%i.conf",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=2",
        "LimitNOFILE=65536",
        "ReadWritePaths=/var/lib/mosquitto/%i",
        f"ReadOnlyPaths={paths.etc}",
        _hardening().rstrip(),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]) + "\n"


def all_units(paths: Paths = Paths()) -> dict[str, str]:
    """deploy/systemd's files: file name -> text."""
    return {"fediomt-device.service": daemon("device", paths),
            "fediomt-edge.service": daemon("edge", paths, broker="edge"),
            "fediomt-cloud.service": daemon("cloud", paths, broker="cloud"),
            "fediomt-ledger.service": daemon("ledger", paths),
            "fediomt-mosquitto@.service": broker(paths)}
