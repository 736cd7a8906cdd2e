"""`fediomt flash BUNDLE DEST`: install a verified bundle on a device, keeping the previous one for rollback.

DEST is a local folder (an SD card or mounted device) or `user@host:/path` (the system's ssh and scp). The layout
(DEST/current, DEST/previous, the .incoming/ copy and its two-rename rotation) is the device tier's, in device.flash;
this module adds the command line and the ssh/scp flavour of the same rotation.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from device.flash import CURRENT, INCOMING, PREVIOUS, flash_local, rollback_local
from protocol.bundle import FILES, load_bundle
from protocol.errors import ProtocolError, Reason
from protocol.signing import load_public_key

_REMOTE = re.compile(r"^(?P<host>(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+):(?P<path>.+)$")


@dataclass(frozen=True)
class Remote:
    """An ssh flash destination (`user@host:/path`), as parse_dest splits it."""

    host: str  # [user@]host as ssh takes it
    path: str


def parse_dest(dest: str) -> Path | Remote:
    """`user@host:/path` (or `host:path`) -> Remote; anything else is a local path."""
    match = _REMOTE.match(dest)
    if match and not Path(dest).exists():
        return Remote(match["host"], match["path"])
    return Path(dest)


def remote_commands(remote: Remote, bundle_dir: Path) -> dict[str, list[str]]:
    """The ssh/scp command lines of a remote flash (pure, so it can be checked without a device)."""
    root = shlex.quote(remote.path)
    incoming = shlex.quote(f"{remote.path.rstrip('/')}/{INCOMING}")
    names = " ".join(FILES)
    return {
        "prepare": ["ssh", remote.host, f"rm -rf {incoming} && mkdir -p {incoming}"],
        "copy": ["scp", "-q", *(str(bundle_dir / name) for name in FILES), f"{remote.host}:{remote.path}/{INCOMING}/"],
        "hash": ["ssh", remote.host, f"cd {incoming} && sha256sum {names}"],
        "rotate": ["ssh", remote.host, f"cd {root} && sync && rm -rf {PREVIOUS} && "
                                       f"if [ -d {CURRENT} ]; then mv {CURRENT} {PREVIOUS}; fi && "
                                       f"mv {INCOMING} {CURRENT} && sync"],
    }


def parse_sha256sum(text: str) -> dict[str, str]:
    """`sha256sum` output ("HASH  NAME" or, binary mode, "HASH *NAME") -> {name: hash}."""
    out = {}
    for line in text.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0]
    return out


def flash_remote(bundle_dir: Path, remote: Remote) -> None:
    """Copy with scp, check the remote SHA-256 of every file against the (verified) local files, rotate."""
    cmds = remote_commands(remote, bundle_dir)
    subprocess.run(cmds["prepare"], check=True)
    subprocess.run(cmds["copy"], check=True)
    remote_hashes = parse_sha256sum(subprocess.run(cmds["hash"], check=True, capture_output=True, text=True).stdout)
    for name in FILES:
        local = hashlib.sha256((bundle_dir / name).read_bytes()).hexdigest()
        if remote_hashes.get(name) != local:
            raise ProtocolError(Reason.BAD_HASH, f"{remote.host}:{remote.path}/{INCOMING}/{name} differs from {name}")
    subprocess.run(cmds["rotate"], check=True)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle directory (from `fediomt models build`)")
    parser.add_argument("dest", help="device folder, or user@host:/path over ssh")
    parser.add_argument("--pubkey", type=Path, help="Ed25519 public key (PEM) the bundle must verify against")
    parser.add_argument("--force", action="store_true", help="allow installing an older version")
    parser.add_argument("--rollback", action="store_true", help="swap DEST/current and DEST/previous (local only)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dest = parse_dest(args.dest)
    try:
        if args.rollback:
            if isinstance(dest, Remote):
                raise ValueError("--rollback works on a local DEST only")
            rollback_local(dest)
            print(f"rolled back: {dest / CURRENT} is the former previous bundle")
            return 0
        if args.bundle is None or args.pubkey is None:
            raise ValueError("flashing needs BUNDLE and --pubkey")
        public_key = load_public_key(args.pubkey)
        bundle = load_bundle(args.bundle, public_key)
        if isinstance(dest, Remote):
            flash_remote(args.bundle, dest)
            where = f"{dest.host}:{dest.path}/{CURRENT}"
        else:
            where = flash_local(bundle, dest, public_key, force=args.force)
    except (ProtocolError, OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"flash failed: {exc}", file=sys.stderr)
        return 1
    print(f"flashed {bundle.name} v{bundle.version} ({bundle.manifest['model_sha256'][:16]}) to {where}")
    return 0
