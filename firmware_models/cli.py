"""`fediomt models build|list|verify`: build signed firmware model bundles, list the models, verify a bundle."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from protocol.bundle import load_bundle, read_files, unpack_files, verify_files
from protocol.errors import ProtocolError
from protocol.signing import generate_signing_key, load_private_key, load_public_key, save_private_key, save_public_key

MODEL_NAMES = ("wearable_cnn", "har_mlp", "vitals_mlp")
PREBUILT = Path(__file__).resolve().parent / "prebuilt"   # one signed bundle of each model (package data)


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def configure(parser: argparse.ArgumentParser) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # build imports TensorFlow: keep its C++ chatter down
    sub = parser.add_subparsers(dest="action")
    build = sub.add_parser("build", help="build signed trainable bundles into OUT/<model>/")
    build.add_argument("--model", action="append", choices=MODEL_NAMES, help="model to build (repeat; default all)")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    build.add_argument("--key", type=Path, help="Ed25519 signing key (PEM); created with KEY.pub if absent "
                                                "(default OUT/signing.key)")
    build.add_argument("--version", type=int, default=1, help="bundle version (devices refuse downgrades)")
    build.add_argument("--batch-size", type=int, default=32, help="fixed training/evaluation batch size")
    build.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="model build option, e.g. n_classes=5, n_features=30, qat=true (repeat)")
    build.set_defaults(func=cmd_build)
    lst = sub.add_parser("list", help="list the firmware models, or the bundles under a folder")
    lst.add_argument("folder", nargs="?", type=Path, help="folder to scan for bundles (manifest not verified)")
    lst.set_defaults(func=cmd_list)
    verify = sub.add_parser("verify", help="verify a bundle directory or packed archive (signature + hash)")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--pubkey", type=Path, required=True, help="Ed25519 public key (PEM) of the builder")
    verify.set_defaults(func=cmd_verify)


def signing_key(path: Path):
    """Load the key, or create a development key there (0600) with its public key at PATH.pub."""
    if path.exists():
        return load_private_key(path)
    key = generate_signing_key()
    save_private_key(key, path)
    save_public_key(key.public_key(), path.with_name(path.name + ".pub"))
    print(f"created signing key {path} (public key {path}.pub)", file=sys.stderr)
    return key


def cmd_build(args: argparse.Namespace) -> int:
    from firmware_models.build import build_bundle

    key = signing_key(args.key or args.out / "signing.key")
    for name in args.model or MODEL_NAMES:
        path = build_bundle(name, args.out / name, key, version=args.version, batch_size=args.batch_size,
                            **dict(args.option))
        bundle = load_bundle(path, key.public_key())
        print(f"{path}  {name} v{bundle.version}  {len(bundle.model_bytes)} bytes  {len(bundle.layout)} tensors  "
              f"sha256 {bundle.manifest['model_sha256'][:16]}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.folder is None:  # the shipped bundles' manifests describe each model: no TensorFlow on a device
        for name in MODEL_NAMES:
            m = json.loads((PREBUILT / name / "manifest.json").read_text())
            print(f"{name:<13} {m['family']:<7} input {tuple(m['input']['shape'])}  {m['n_classes']} classes  "
                  f"{m['n_params']} params  device_class {m['device_class']}  -- prebuilt v{m['version']} "
                  f"({m['model_bytes']} bytes), built with TensorFlow {m['build']['tensorflow']}")
        return 0
    for manifest_path in sorted(args.folder.rglob("manifest.json")):
        m = json.loads(manifest_path.read_text())
        print(f"{manifest_path.parent}  {m.get('name')} v{m.get('version')} {m.get('kind')} "
              f"{m.get('device_class')} {m.get('model_bytes')} bytes")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    public_key = load_public_key(args.pubkey)
    try:
        files = unpack_files(args.bundle.read_bytes()) if args.bundle.is_file() else read_files(args.bundle)
        bundle = verify_files(files, public_key)
    except (ProtocolError, OSError) as exc:
        print(f"REJECTED {args.bundle}: {exc}", file=sys.stderr)
        return 1
    m = bundle.manifest
    print(f"OK {args.bundle}: {m['name']} v{m['version']} {m['kind']} sha256 {m['model_sha256']}")
    return 0
