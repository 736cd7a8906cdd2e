"""`fediomt init-config device|edge|cloud --out DIR`: a config with every key at its documented default, and the
systemd units, for a pip install (which ships no configs/ or deploy/ folder). `fediomt provision` does the same
for a whole consortium, with certificates and keys; this is for a host set up by hand (docs/deployment.md).

The config is rendered from the config dataclasses themselves (the same defaults the daemon applies), with the
required paths set to where DIR keeps them (keys/, pki/, state/); `fediomt KIND check-config --config
DIR/KIND.toml` then says which files are still missing, one at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fediomt import units
from protocol.tomlconfig import to_toml

REQUIRED = {
    "device": {"id": "device1", "edge": "edge1", "state_dir": "state", "bundle_dir": "bundles",
               "bundle_pubkey": "keys/bundle.pub", "cloud_pubkey": "keys/cloud.pub", "signing_key": "keys/device.key"},
    "edge": {"edge_id": "edge1", "state_dir": "state", "enrolment_dir": "enrolment", "signing_key": "keys/edge.key",
             "cloud_public_key": "keys/cloud.pub"},
    "cloud": {"run_dir": "run", "signing_key": "keys/cloud.key", "edge_keys_dir": "edge_keys"},
}


def default_config(kind: str, overrides: dict) -> object:
    from dataclasses import replace

    if kind == "device":
        from device.config import DataConfig
        from device.config import DeviceConfig as Config
    elif kind == "edge":
        from edge.config import EdgeConfig as Config
    else:
        from cloud.config import CloudConfig as Config
    values = {k: Path(v) if k not in ("id", "edge", "edge_id") else v for k, v in REQUIRED[kind].items()}
    values.update(overrides)
    if kind == "device":
        cfg = Config(**values, data=DataConfig(dir=Path("data")))
        return replace(cfg)
    return Config(**values)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    overrides = {}
    if args.id:
        overrides[{"device": "id", "edge": "edge_id"}.get(args.kind, "_")] = args.id
    if args.edge and args.kind == "device":
        overrides["edge"] = args.edge
    overrides.pop("_", None)
    try:
        cfg = default_config(args.kind, overrides)
    except (TypeError, ValueError) as exc:
        print(f"fediomt init-config: {exc}", file=sys.stderr)
        return 2
    path = out / f"{args.kind}.toml"
    if path.exists() and not args.force:
        print(f"fediomt init-config: {path} exists (--force replaces it)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# FedIoMT {args.kind} config: every key at its default (`fediomt init-config`). Relative paths resolve "
              f"against this file's folder.\n# Reference with comments: docs/{args.kind}.md; validate with "
              f"`fediomt {args.kind} check-config --config {path}`.\n\n")
    path.write_text(header + to_toml(cfg))
    paths = units.Paths(fediomt=args.fediomt or units.Paths.fediomt, etc=str(args.etc), state=str(args.state))
    (out / "systemd").mkdir(exist_ok=True)
    broker = {"edge": "edge", "cloud": "cloud"}.get(args.kind)
    (out / "systemd" / f"fediomt-{args.kind}.service").write_text(units.daemon(args.kind, paths, broker=broker))
    written = [path, out / "systemd" / f"fediomt-{args.kind}.service"]
    if broker:
        (out / "systemd" / "fediomt-mosquitto@.service").write_text(units.broker(paths))
        written.append(out / "systemd" / "fediomt-mosquitto@.service")
    for p in written:
        print(p)
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("kind", choices=("device", "edge", "cloud"))
    parser.add_argument("--out", type=Path, default=Path("."), help="folder to write KIND.toml and systemd/ into")
    parser.add_argument("--id", help="the device or edge id")
    parser.add_argument("--edge", help="device: its edge's id")
    parser.add_argument("--etc", type=Path, default=Path("/etc/fediomt"), help="the config folder the units name")
    parser.add_argument("--state", type=Path, default=Path("/var/lib/fediomt"), help="the state folder the units name")
    parser.add_argument("--fediomt", help="the fediomt executable the units run")
    parser.add_argument("--force", action="store_true", help="replace an existing KIND.toml")
    parser.set_defaults(func=run)
