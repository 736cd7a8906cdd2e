"""The installed-bundle layout on a device's medium, its reader and its writer.

    ROOT/current/   the installed bundle (what the device agent loads)
    ROOT/previous/  the bundle it replaced (rollback swaps them back)
    ROOT/ota.json   pins and refusals: {"pinned": {name: version}, "refused": [sha256 of refused archives]}
A rollback pins the version it rolls away from: OTA refuses that version (and older ones) of that name until a
newer one arrives, across restarts, so a retained push cannot reinstall it. Archives refused as unusable are
remembered by hash, so a retained push of one is not downloaded again at every reconnection.
A new bundle is written to ROOT/.incoming/, the copy is verified (hash + signature), then two renames rotate it
in: previous is dropped, current -> previous, .incoming -> current. A crash between the renames leaves no current
but an intact previous, which `load_installed` falls back to. The device tier owns this layout because the agent,
the OTA receiver and the sandbox (experiments.sandbox) install into it; `fediomt flash` (local or over ssh) writes
the same layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.atomic import atomic_write
from protocol.bundle import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Bundle, load_bundle, write_files
from protocol.errors import ProtocolError, Reason

CURRENT, PREVIOUS, INCOMING = "current", "previous", ".incoming"
OTA_STATE = "ota.json"
MAX_REFUSED = 64   # archive hashes remembered


def ota_state(root: str | os.PathLike) -> dict:
    """{"pinned": {name: version}, "refused": [sha256 hex]} of the device at `root` (empty when none)."""
    try:
        data = json.loads((Path(root) / OTA_STATE).read_text())
    except (OSError, ValueError):
        return {"pinned": {}, "refused": []}
    return {"pinned": {str(k): int(v) for k, v in dict(data.get("pinned", {})).items()},
            "refused": [str(h) for h in data.get("refused", [])][-MAX_REFUSED:]}


def _save_ota_state(root: Path, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / OTA_STATE, json.dumps(state, sort_keys=True).encode())


def pin(root: str | os.PathLike, name: str, version: int) -> None:
    """Refuse `name` at `version` or older over the air until a newer version is installed."""
    state = ota_state(root)
    state["pinned"][name] = max(int(version), state["pinned"].get(name, -1))
    _save_ota_state(Path(root), state)


def unpin(root: str | os.PathLike, name: str, below: int | None = None) -> None:
    """Drop the pin of `name` (only when it is below `below`, when given: a newer version was installed)."""
    state = ota_state(root)
    if name in state["pinned"] and (below is None or state["pinned"][name] < below):
        del state["pinned"][name]
        _save_ota_state(Path(root), state)


def remember_refused(root: str | os.PathLike, sha256_hex: str) -> None:
    state = ota_state(root)
    if sha256_hex not in state["refused"]:
        state["refused"] = (state["refused"] + [sha256_hex])[-MAX_REFUSED:]
        _save_ota_state(Path(root), state)


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
    unpin(dest, bundle.name, below=bundle.version)  # a newer version arrived: the pin has done its job
    return dest / CURRENT


def _rotate(dest: Path) -> None:
    shutil.rmtree(dest / PREVIOUS, ignore_errors=True)
    if (dest / CURRENT).exists():
        (dest / CURRENT).rename(dest / PREVIOUS)
    (dest / INCOMING).rename(dest / CURRENT)


def _name_version(directory: Path) -> tuple[str, int] | None:
    """(name, version) from a bundle directory's manifest, unverified (only used to pin)."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        return str(manifest["name"]), int(manifest["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rollback_local(dest: Path, pin_version: bool = True) -> None:
    """Swap current and previous, and pin the version rolled away from (OTA refuses it until a newer one
    arrives; rolling back again, to it, lifts that pin)."""
    dest = Path(dest)
    if not (dest / PREVIOUS).is_dir():
        raise FileNotFoundError(f"{dest / PREVIOUS}: no previous bundle to roll back to")
    leaving, coming = _name_version(dest / CURRENT), _name_version(dest / PREVIOUS)
    swap = dest / ".swap"
    shutil.rmtree(swap, ignore_errors=True)
    if (dest / CURRENT).exists():
        (dest / CURRENT).rename(swap)
    (dest / PREVIOUS).rename(dest / CURRENT)
    if swap.exists():
        swap.rename(dest / PREVIOUS)
    if coming is not None:
        state = ota_state(dest)
        if state["pinned"].get(coming[0], -1) >= coming[1]:
            unpin(dest, coming[0])
    if pin_version and leaving is not None:
        pin(dest, *leaving)
