"""`fediomt provision CONSORTIUM.toml`: one folder per site (the cloud, each edge, each device) holding exactly what
that host needs, from one consortium file (the approach of NVFlare's `provision` from a project file).

    fediomt provision consortium.toml --out sites        # the CA in sites/ca (stays here), then one folder per site
    fediomt provision consortium.toml --out sites --add-device watch05 --edge edge1   # a device later: one command

The consortium file is configs/consortium.toml: the ledger's keys (quorum, [policy]) and, for provisioning,

    [federation]   model (a prebuilt firmware model), rounds, min_devices, round_timeout_s, device_epsilon (each
                   device's lifetime budget, default 8), and optional plan, strategy, privacy, compression
                   tables: every cloud.toml key not given keeps its documented default (configs/cloud.toml);
                   eval_data: the cloud's held-out NPZ (x, y; consented or public data), which turns on the
                   contribution ledger (it scores each edge's aggregate on it)
    [cloud]        host, port: where the edges reach the cloud's broker
    [edges.ID]     host, port: where this edge's devices reach its broker
    [devices.ID]   edge (required), compute_class, data (a directory with train.npz/train.csv on the device host)

Each site folder holds: `pki/` (ca.crt, crl.pem, its own certificate and keys, never the CA key), the cloud's
public signing key (`cloud.pub`) and the bundle key (`bundle.pub`; the cloud holds `bundle.key`), its broker's
config and ACL (`broker/NAME.conf`, cloud and edges), its daemon's TOML with the defaults filled in, its systemd
units (`systemd/`), `install.sh` and a README.md with the 1-2 commands that start it there. With `eval_data` the
cloud and every edge also get the ledger's `consortium.toml` (validators: the cloud's and the edges' signing keys,
the file's quorum and [policy]; the same bytes everywhere, so one genesis) and each edge a ledger validator
(`ledger.env`, `fediomt-ledger.service`) that connects to the cloud's broker with the edge's certificate. Devices
get the model bundle flashed (`bundles/`), a prebuilt firmware model re-signed with the consortium's bundle key (no
TensorFlow).

Re-running is idempotent: what exists is kept (identities are never re-issued), what the file adds is provisioned
(a new device: its folder, and its edge's `enrolment/`, which the running edge re-reads within key_check_s).
`--root /etc/fediomt` writes the absolute paths a host installation uses (state in `--state-root`); without it the
folders run where they are (`fediomt site run DIR`: the trial mode, also what tests/test_provision.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import tomllib

from fediomt import pki, units
from fediomt.broker import BrokerFilesConfig
from fediomt.broker import write as write_broker
from protocol import signing
from protocol.tls import ROLES
from protocol.topics import DEVICE_CLASSES, check_id

PREBUILT = Path(__file__).resolve().parent.parent / "firmware_models" / "prebuilt"
DEFAULT_PORT = 8883
FEDERATION_KEYS = {"model", "rounds", "min_devices", "round_timeout_s", "strategy", "plan", "compression",
                   "privacy", "model_options", "model_encoding", "seed", "device_epsilon", "eval_data"}
LEDGER_KEYS = ("quorum", "quorum_fraction", "policy")   # the consortium file's ledger tables the sites get


class ProvisionError(ValueError):
    """A consortium file that cannot be provisioned; the message names the key."""


@dataclass
class Site:
    kind: str                      # cloud | edge | device
    name: str
    host: str = "localhost"
    port: int = DEFAULT_PORT
    edge: str = ""                 # devices: their edge
    compute_class: str = "pi"
    data: str = ""                 # devices: their data directory on the device host ("" = data/ in the folder)


@dataclass
class Consortium:
    federation: dict
    cloud: Site
    edges: dict[str, Site]
    devices: dict[str, Site] = field(default_factory=dict)
    ledger: dict = field(default_factory=dict)    # quorum / quorum_fraction / [policy] of the consortium file

    @property
    def has_ledger(self) -> bool:
        return "eval_data" in self.federation


def load(path: Path) -> Consortium:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProvisionError(f"{path}: {exc}") from None
    fed = dict(raw.get("federation", {}))
    unknown = set(fed) - FEDERATION_KEYS
    if unknown:
        raise ProvisionError(f"{path}: [federation] unknown keys {sorted(unknown)}")
    if "eval_data" in fed:
        fed["eval_data"] = str((path.parent / fed["eval_data"]).resolve())
        if not Path(fed["eval_data"]).is_file():
            raise ProvisionError(f"{path}: [federation] eval_data {fed['eval_data']} is not a file")
    model = fed.setdefault("model", "wearable_cnn")
    if not (PREBUILT / model / "manifest.json").exists():
        raise ProvisionError(f"{path}: [federation] model {model!r} has no prebuilt bundle in {PREBUILT}")
    cloud_raw = raw.get("cloud", {})
    cloud = Site("cloud", pki.CLOUD_ID, cloud_raw.get("host", "localhost"), cloud_raw.get("port", DEFAULT_PORT))
    edges = {}
    for name, table in raw.get("edges", {}).items():
        edges[_id(path, name)] = Site("edge", name, table.get("host", "localhost"), table.get("port", DEFAULT_PORT))
    if not edges:
        raise ProvisionError(f"{path}: no [edges.ID] table")
    devices = {}
    for name, table in raw.get("devices", {}).items():
        edge = table.get("edge", "")
        if edge not in edges:
            raise ProvisionError(f"{path}: [devices.{name}] edge {edge!r} is not one of the [edges] ({sorted(edges)})")
        cls = table.get("compute_class", "pi")
        if cls not in DEVICE_CLASSES:
            raise ProvisionError(f"{path}: [devices.{name}] compute_class {cls!r} not in {DEVICE_CLASSES}")
        data = table.get("data", "")
        if data and not Path(data).is_absolute():
            data = str((path.parent / data).resolve())
        devices[_id(path, name)] = Site("device", name, edges[edge].host, edges[edge].port, edge, cls, data)
    clash = set(edges) & set(devices) | ({pki.CLOUD_ID} & (set(edges) | set(devices)))
    if clash:
        raise ProvisionError(f"{path}: ids used twice: {sorted(clash)} (one MQTT username, one site)")
    return Consortium(fed, cloud, edges, devices, {k: raw[k] for k in LEDGER_KEYS if k in raw})


def _id(path: Path, name: str) -> str:
    try:
        return check_id(name)
    except ValueError as exc:
        raise ProvisionError(f"{path}: {exc}") from None


# ------------------------------------------------------------------ writing a site
@dataclass(frozen=True)
class Layout:
    """Where a site's files live on its host: `root` (its config folder), `state` (the writable state)."""

    folder: Path                  # where provision writes it now
    root: Path                    # the absolute path the files will have on the host
    state: Path | None            # absolute state root on the host; None = state/ inside the folder (relative)
    fediomt: str

    def state_path(self, name: str) -> str:
        return str(self.state / name) if self.state is not None else f"state/{name}"

    def broker_data(self, name: str) -> Path:
        return Path("/var/lib/mosquitto") / name if self.state is not None else self.root / "state" / "mosquitto"

    def paths(self) -> units.Paths:
        return units.Paths(fediomt=self.fediomt, etc=str(self.root), state=str(self.state or self.root / "state"),
                           mosquitto=shutil.which("mosquitto") or "/usr/sbin/mosquitto")


def _toml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))


def _copy_identity(ca: Path, site: Path, kind: str, name: str) -> None:
    pki.export(ca, site / "pki", [(kind, name)])


def _broker_table(layout: Layout, kind: str, name: str, host: str, port: int, session: int) -> dict:
    ident = pki.identity(Path("pki"), kind, name)
    return {"host": host, "port": port, "ca": "pki/ca.crt", "cert": str(ident.cert), "key": str(ident.key),
            "session_expiry_s": session}


def _units(layout: Layout, kind: str, broker_name: str | None) -> list[str]:
    out = layout.folder / "systemd"
    out.mkdir(parents=True, exist_ok=True)
    paths = layout.paths()
    (out / f"fediomt-{kind}.service").write_text(units.daemon(kind, paths, broker=broker_name))
    names = [f"fediomt-{kind}"]
    if broker_name is not None:
        (out / "fediomt-mosquitto@.service").write_text(units.broker(paths))
        names.insert(0, f"fediomt-mosquitto@{broker_name}")
    return names


def _install_script(layout: Layout, kind: str, services: list[str], broker_keys: list[str]) -> None:
    state = layout.paths().state
    chown = "".join(f"chown mosquitto: {layout.root / k}\n" for k in broker_keys)
    (layout.folder / "install.sh").write_text(f"""#!/bin/sh
# Install this {kind} site on its host (as root), from {layout.root}: the fediomt user, the state directory, key
# ownership, the systemd units. Then: systemctl enable --now {' '.join(services)}
set -eu
id fediomt >/dev/null 2>&1 || useradd --system --home {state} --shell /usr/sbin/nologin fediomt
install -d -o fediomt -g fediomt -m 0750 {state}
chown -R fediomt: {layout.root}/pki
{chown}install -m 0644 {layout.root}/systemd/*.service /etc/systemd/system/
systemctl daemon-reload
""")
    os.chmod(layout.folder / "install.sh", 0o755)


def _readme(layout: Layout, site: Site, services: list[str], extra: str = "") -> None:
    trial = f"fediomt site run {layout.root}"
    (layout.folder / "README.md").write_text(f"""# FedIoMT {site.kind} site `{site.name}`

Written by `fediomt provision`: everything this host needs and nothing else (never the CA key). The paths inside
assume this folder is `{layout.root}` on the host{f' and the state lives in `{layout.state}`' if layout.state else ''}.

Start it with systemd (as root):

    sh {layout.root}/install.sh
    systemctl enable --now {' '.join(services)}

or, for a trial without systemd (the broker, if any, and the daemon as child processes; Ctrl-C stops both):

    {trial}

{extra}Check the config and the files it names:
`fediomt {site.kind} check-config --config {layout.root}/{site.kind}.toml`. A new run: stop the daemon,
`fediomt {site.kind} new-run --config {layout.root}/{site.kind}.toml`, start it again.
""")


def _site_manifest(layout: Layout, site: Site, broker_conf: str | None, ledger: bool = False) -> None:
    _toml(layout.folder / "site.toml", {"kind": site.kind, "id": site.name, "config": f"{site.kind}.toml",
                                        **({"broker": broker_conf, "port": site.port} if broker_conf else {}),
                                        **({"ledger": "ledger.env"} if ledger else {})})


def provision(path: Path, out: Path, root: Path | None = None, state_root: Path | None = None,
              fediomt_bin: str | None = None) -> dict[str, Path]:
    """Provision every site of the consortium file at `path` into `out` (idempotent); returns site -> folder."""
    cons = load(path)
    out.mkdir(parents=True, exist_ok=True)
    ca = out / "ca"
    if not (ca / "private" / "ca.key").exists():
        pki.init_ca(ca)
    index = json.loads((ca / "index.json").read_text())
    issued = {(e["kind"], e["name"], e.get("role")) for e in index["certs"] if e["revoked_at"] is None}

    def ensure(kind: str, name: str, hosts: tuple[str, ...] = ()) -> None:
        wanted = {(kind, name, role) for role in (None, *ROLES.get(kind, ()))}
        if not wanted <= issued:   # new, or issued before role certificates existed: only what is missing
            pki.issue(ca, kind, name, hosts=hosts)
            issued.update(wanted)

    ensure("cloud", pki.CLOUD_ID)
    ensure("server", f"broker-{pki.CLOUD_ID}", (cons.cloud.host,))
    for edge in cons.edges.values():
        ensure("edge", edge.name)
        ensure("server", f"broker-{edge.name}", (edge.host,))
    for dev in cons.devices.values():
        ensure("device", dev.name)
    bundle_key_path = ca / "private" / "bundle.key"   # signs model bundles and students: stays with the cloud
    if not bundle_key_path.exists():
        bundle_key = signing.generate_signing_key()
        signing.save_private_key(bundle_key, bundle_key_path)
        signing.save_public_key(bundle_key.public_key(), ca / "bundle.pub")
    bundle_key = signing.load_private_key(bundle_key_path)
    bundle_dir = _sealed_bundle(cons.federation["model"], bundle_key, ca / "bundle")
    cloud_pub = pki.identity(ca, "cloud", pki.CLOUD_ID).sign_pub

    def layout(name: str) -> Layout:   # with --root every site is that folder on its own host
        folder = out / name
        return Layout(folder, root or folder.resolve(), (state_root or Path("/var/lib/fediomt")) if root else None,
                      fediomt_bin or _fediomt_bin())

    ledger = _ledger_consortium(cons, ca) if cons.has_ledger else None
    folders: dict[str, Path] = {}
    folders["cloud"] = _cloud_site(cons, ca, layout("cloud"), bundle_key_path, ledger)
    for edge in cons.edges.values():
        folders[edge.name] = _edge_site(cons, ca, layout(edge.name), edge, cloud_pub, ledger)
    for dev in cons.devices.values():
        folders[dev.name] = _device_site(ca, layout(dev.name), dev, cloud_pub, bundle_dir,
                                         cons.federation.get("device_epsilon", 8.0))
    return folders


def _ledger_consortium(cons: Consortium, ca: Path) -> str:
    """The ledger's consortium.toml every validator site gets: raw hex signing keys (no paths to break when a folder
    moves) of the cloud and each edge, with the consortium file's quorum and [policy]."""
    def hex_key(kind: str, name: str) -> str:
        return signing.public_key_bytes(signing.load_public_key(pki.identity(ca, kind, name).sign_pub)).hex()

    validators = {pki.CLOUD_ID: hex_key("cloud", pki.CLOUD_ID), **{e: hex_key("edge", e) for e in sorted(cons.edges)}}
    return ("# The contribution ledger's consortium, written by `fediomt provision` (identical on every validator "
            "site:\n# one genesis). Adding an edge changes the validators, hence the genesis: a new ledger.\n"
            + tomli_w.dumps({**cons.ledger, "validators": validators}))


def _fediomt_bin() -> str:
    exe = Path(sys.executable).with_name("fediomt")
    return str(exe) if exe.exists() else shutil.which("fediomt") or "/opt/fediomt/.venv/bin/fediomt"


def _sealed_bundle(model: str, key, out: Path) -> Path:
    """The prebuilt `model` re-signed with the consortium's bundle key (the manifest is what is signed)."""
    from protocol.bundle import MANIFEST_FILE, MODEL_FILE, seal, write_files

    if not (out / MANIFEST_FILE).exists():
        manifest = json.loads((PREBUILT / model / MANIFEST_FILE).read_text())
        write_files(out, seal((PREBUILT / model / MODEL_FILE).read_bytes(), manifest, key))
    return out


def _cloud_site(cons: Consortium, ca: Path, lay: Layout, bundle_key: Path, ledger: str | None) -> Path:
    site, folder = cons.cloud, lay.folder
    _copy_identity(ca, folder, "cloud", pki.CLOUD_ID)
    _copy_identity(ca, folder, "server", f"broker-{pki.CLOUD_ID}")
    shutil.copy2(bundle_key, folder / "bundle.key")
    shutil.copy2(ca / "bundle.pub", folder / "bundle.pub")
    pki.enrolment(ca, folder / "edge_keys", kind="edge")
    conf = folder / "broker" / "cloud.conf"
    write_broker(BrokerFilesConfig(role="cloud", id=pki.CLOUD_ID, pki=lay.root / "pki", port=site.port,
                                   edges=sorted(cons.edges), data_dir=lay.broker_data("cloud"),
                                   acl_file=lay.root / "broker" / "cloud.acl"), conf,
                 files_pki=folder / "pki")
    fed = dict(cons.federation)
    fed.pop("device_epsilon", None)   # the devices' (device.toml [privacy] epsilon)
    if ledger is not None:
        shutil.copy2(fed.pop("eval_data"), folder / "eval.npz")
        (folder / "consortium.toml").write_text(ledger)
        fed.update(eval_data="eval.npz", ledger={"db": lay.state_path("cloud/ledger.db"),
                                                 "consortium": "consortium.toml"})
    ident = pki.identity(Path("pki"), "cloud", pki.CLOUD_ID)
    cfg = {"run_dir": lay.state_path("cloud/run"), "signing_key": str(ident.sign_key), "edge_keys_dir": "edge_keys",
           "crl_file": "pki/crl.pem", "edges": sorted(cons.edges), "devices": sorted(cons.devices),
           "model": fed.pop("model"), "rounds": fed.pop("rounds", 20), "min_devices": fed.pop("min_devices", 1),
           "round_timeout_s": fed.pop("round_timeout_s", 60.0), **fed,
           "broker": _broker_table(lay, "cloud", pki.CLOUD_ID, "localhost", site.port, 3600)}
    _toml(folder / "cloud.toml", cfg)
    services = _units(lay, "cloud", "cloud")
    _install_script(lay, "cloud", services, ["pki/servers/broker-cloud/tls.key"])
    _site_manifest(lay, site, "broker/cloud.conf")
    _readme(lay, site, services, "`bundle.key` signs model bundles and students (distillation's `bundle_key`); "
                                 "keep it as private as `pki/`.\n\n" + (
                                     "The cloud scores each edge's aggregate on `eval.npz` and proposes a "
                                     "contribution block per round to the validators (`consortium.toml`); audit "
                                     f"the chain with `fediomt ledger verify {lay.state_path('cloud/ledger.db')}`."
                                     "\n\n" if ledger is not None else ""))
    return folder


def _ledger_validator(lay: Layout, site: Site, cloud: Site, ledger: str) -> str:
    """The edge's ledger validator: consortium.toml, ledger.env (what the unit and `site run` read) and its unit."""
    (lay.folder / "consortium.toml").write_text(ledger)
    key = lay.root / pki.identity(Path("pki"), "edge", site.name).sign_key
    (lay.folder / "ledger.env").write_text(
        "# The ledger validator of this edge (fediomt-ledger.service, `fediomt site run`): it signs the cloud's\n"
        "# contribution blocks over the cloud's broker, with the edge's certificate (pki/).\n"
        f"FEDIOMT_LEDGER_ID={site.name}\nFEDIOMT_LEDGER_KEY={key}\n"
        f"FEDIOMT_LEDGER_HOST={cloud.host}\nFEDIOMT_LEDGER_PORT={cloud.port}\n")
    (lay.folder / "systemd" / "fediomt-ledger.service").write_text(units.daemon("ledger", lay.paths()))
    return "fediomt-ledger"


def _edge_site(cons: Consortium, ca: Path, lay: Layout, site: Site, cloud_pub: Path, ledger: str | None) -> Path:
    folder = lay.folder
    _copy_identity(ca, folder, "edge", site.name)
    _copy_identity(ca, folder, "server", f"broker-{site.name}")
    shutil.copy2(cloud_pub, folder / "cloud.pub")
    enrol = folder / "enrolment"
    enrol.mkdir(parents=True, exist_ok=True)
    for dev in (d for d in cons.devices.values() if d.edge == site.name):   # this edge's devices only
        ident = pki.identity(ca, "device", dev.name)
        for src, dst in ((ident.sign_pub, enrol / f"{dev.name}.pub"), (ident.cert, enrol / f"{dev.name}.crt")):
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                shutil.copy2(src, dst)
    conf = folder / "broker" / f"{site.name}.conf"
    write_broker(BrokerFilesConfig(role="edge", id=site.name, pki=lay.root / "pki", port=site.port,
                                   cloud_host=cons.cloud.host, cloud_port=cons.cloud.port,
                                   data_dir=lay.broker_data(site.name),
                                   acl_file=lay.root / "broker" / f"{site.name}.acl"), conf, files_pki=folder / "pki")
    ident = pki.identity(Path("pki"), "edge", site.name)
    _toml(folder / "edge.toml", {
        "edge_id": site.name, "state_dir": lay.state_path("edge"), "enrolment_dir": "enrolment",
        "signing_key": str(ident.sign_key), "cloud_public_key": "cloud.pub", "crl_file": "pki/crl.pem",
        "broker": _broker_table(lay, "edge", site.name, "localhost", site.port, 3600)})
    services = _units(lay, "edge", site.name)
    if ledger is not None:
        services.append(_ledger_validator(lay, site, cons.cloud, ledger))
    _install_script(lay, "edge", services, [f"pki/servers/broker-{site.name}/tls.key",
                                            f"pki/edges/{site.name}/tls.key"])
    _site_manifest(lay, site, f"broker/{site.name}.conf", ledger is not None)
    _readme(lay, site, services, "The broker bridges to the cloud's broker "
                                 f"({cons.cloud.host}:{cons.cloud.port}) with this edge's certificate. "
                                 "`enrolment/` lists this edge's devices; re-provisioning adds new ones (copy the "
                                 "folder again: the edge re-reads it within key_check_s, no restart).\n\n")
    return folder


def _device_site(ca: Path, lay: Layout, site: Site, cloud_pub: Path, bundle_dir: Path, epsilon: float) -> Path:
    from device.flash import flash_local
    from protocol.bundle import load_bundle

    folder = lay.folder
    _copy_identity(ca, folder, "device", site.name)
    shutil.copy2(cloud_pub, folder / "cloud.pub")
    shutil.copy2(ca / "bundle.pub", folder / "bundle.pub")
    bundle_pub = signing.load_public_key(folder / "bundle.pub")
    if not (folder / "bundles" / "current").exists():
        flash_local(load_bundle(bundle_dir, bundle_pub), folder / "bundles", bundle_pub)
    data = site.data or "data"
    if not site.data:
        (folder / "data").mkdir(exist_ok=True)
        (folder / "data" / "README.md").write_text(
            "Put this device's training data here: train.npz (x, y) or train.csv (features + label); "
            "or set [data] entry_point in device.toml for a live sensor feed (docs/device.md).\n")
    ident = pki.identity(Path("pki"), "device", site.name)
    _toml(folder / "device.toml", {
        "id": site.name, "edge": site.edge, "state_dir": lay.state_path("device"), "bundle_dir": "bundles",
        "bundle_pubkey": "bundle.pub", "cloud_pubkey": "cloud.pub", "signing_key": str(ident.sign_key),
        "mode": "train", "data": {"dir": data}, "capability": {"compute_class": site.compute_class},
        "privacy": {"epsilon": float(epsilon)},
        "broker": _broker_table(lay, "device", site.name, site.host, site.port, 86_400)})
    services = _units(lay, "device", None)
    _install_script(lay, "device", services, [])
    _site_manifest(lay, site, None)
    _readme(lay, site, services, f"It trains on `{data}` and connects to its edge's broker at "
                                 f"{site.host}:{site.port} with its own certificate.\n\n")
    return folder


# ------------------------------------------------------------------ CLI
def add_device(path: Path, device: str, edge: str, compute_class: str = "pi", data: str = "") -> None:
    """Append `[devices.ID]` to the consortium file (refused when the id exists)."""
    cons = load(path)
    if device in cons.devices:
        raise ProvisionError(f"{path}: device {device!r} is already in the consortium")
    check_id(device)
    table = {"edge": edge, "compute_class": compute_class, **({"data": data} if data else {})}
    with open(path, "a") as f:
        f.write("\n" + tomli_w.dumps({"devices": {device: table}}))


def _cmd(args: argparse.Namespace) -> int:
    try:
        if args.add_device:
            if not args.edge:
                raise ProvisionError("--add-device needs --edge")
            add_device(args.consortium, args.add_device, args.edge, args.compute_class, args.data or "")
        folders = provision(args.consortium, args.out, args.root, args.state_root, args.fediomt)
    except (ProvisionError, pki.PkiError, ValueError) as exc:
        print(f"fediomt provision: {exc}", file=sys.stderr)
        return 2
    for name, folder in folders.items():
        print(f"{name:<16} {folder}")
    print(f"CA (keep it here, never copy it to a site): {args.out / 'ca'}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("consortium", type=Path, help="consortium file (configs/consortium.toml)")
    parser.add_argument("--out", type=Path, default=Path("sites"), help="output folder (default ./sites)")
    parser.add_argument("--root", type=Path, help="the path each site folder will have on its host, e.g. "
                                                  "/etc/fediomt (default: where it is written)")
    parser.add_argument("--state-root", type=Path, help="with --root: the hosts' state folder (default "
                                                        "/var/lib/fediomt)")
    parser.add_argument("--fediomt", help="the fediomt executable the units run (default: this one)")
    parser.add_argument("--add-device", metavar="ID", help="append [devices.ID] to the consortium file and "
                                                           "provision it (with --edge)")
    parser.add_argument("--edge", help="--add-device: its edge")
    parser.add_argument("--compute-class", default="pi", choices=DEVICE_CLASSES, help="--add-device: its class")
    parser.add_argument("--data", help="--add-device: its data directory on the device host")
    parser.set_defaults(func=_cmd)
