"""The installed-bundle layout on a device's medium, its reader and its writer.

    ROOT/current/   the installed bundle (what the device agent loads)
    ROOT/previous/  the bundle it replaced (rollback swaps them back)
A new bundle is written to ROOT/.incoming/, the copy is verified (hash + signature), then two renames rotate it
in: previous is dropped, current -> previous, .incoming -> current. A crash between the renames leaves no current
but an intact previous, which `load_installed` falls back to. The device tier owns this layout because the agent,
the OTA receiver and the sandbox (experiments.sandbox) install into it; `fediomt flash` (local or over ssh) writes
the same layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.bundle import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Bundle, load_bundle, write_files
from protocol.errors import ProtocolError, Reason

CURRENT, PREVIOUS, INCOMING = "current", "previous", ".incoming"


def load_installed(root: str | os.PathLike, public_key: Ed25519PublicKey) -> Bundle:
    """The bundle installed under `root`: root/current, or root/previous when a flash was interrupted between its
    two renames (no current). A current that does not verify is refused, not skipped."""
    root = Path(root)
    current = root / CURRENT
    return load_bundle(current if current.exists() else root / PREVIOUS, public_key)


def check_downgrade(new: Bundle, installed: Bundle | None, force: bool) -> None:
    if installed is None or force or installed.name != new.name:
        return
    if new.version < installed.version:
        raise ProtocolError(Reason.DOWNGRADE, f"{new.name} v{new.version} is older than the installed "
                                              f"v{installed.version} (use --force to downgrade)")


def _installed(dest: Path, public_key: Ed25519PublicKey) -> Bundle | None:
    try:
        return load_installed(dest, public_key)
    except ProtocolError:
        return None  # nothing valid installed: any version may go on


def flash_local(bundle: Bundle, dest: Path, public_key: Ed25519PublicKey, force: bool = False) -> Path:
    """Install a verified bundle under `dest` (see the module docstring); returns DEST/current."""
    check_downgrade(bundle, _installed(dest, public_key), force)
    dest.mkdir(parents=True, exist_ok=True)
    incoming = dest / INCOMING
    shutil.rmtree(incoming, ignore_errors=True)
    write_files(incoming, {MANIFEST_FILE: bundle.manifest_bytes, SIGNATURE_FILE: bundle.signature,
                           MODEL_FILE: bundle.model_bytes})
    copy = load_bundle(incoming, public_key)  # read back what actually landed on the medium
    if copy.manifest_bytes != bundle.manifest_bytes:
        raise ProtocolError(Reason.BAD_HASH, f"{incoming}: the written copy differs from the source")
    _rotate(dest)
    return dest / CURRENT


def _rotate(dest: Path) -> None:
    shutil.rmtree(dest / PREVIOUS, ignore_errors=True)
    if (dest / CURRENT).exists():
        (dest / CURRENT).rename(dest / PREVIOUS)
    (dest / INCOMING).rename(dest / CURRENT)


def rollback_local(dest: Path) -> None:
    """Swap current and previous."""
    if not (dest / PREVIOUS).is_dir():
        raise FileNotFoundError(f"{dest / PREVIOUS}: no previous bundle to roll back to")
    swap = dest / ".swap"
    shutil.rmtree(swap, ignore_errors=True)
    if (dest / CURRENT).exists():
        (dest / CURRENT).rename(swap)
    (dest / PREVIOUS).rename(dest / CURRENT)
    if swap.exists():
        swap.rename(dest / PREVIOUS)
