"""Signed model bundles: a directory with model.tflite, manifest.json and manifest.sig (Ed25519 over manifest.json).

The manifest carries the SHA-256 of model.tflite, so one signature covers both. Every reader verifies the
signature, then the manifest's shape, then the model hash, and raises ProtocolError(BAD_SIGNATURE / MALFORMED /
BAD_HASH / TOO_LARGE) otherwise. For transport (OTA push, flashing over ssh) a bundle packs into one CBOR map
{"format": "fediomt-bundle/1", "manifest.json": bytes, "manifest.sig": bytes, "model.tflite": bytes}: fixed names,
so nothing inside an archive can choose a path, and it is verified in memory before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.atomic import atomic_write
from protocol.codec import load_cbor
from protocol.errors import ProtocolError, Reason
from protocol.signing import sign, verify
from protocol.weights import Layout, layout_from_dicts

MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE = "model.tflite", "manifest.json", "manifest.sig"
FILES = (MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE)
ARCHIVE_FORMAT = "fediomt-bundle/1"
MAX_MODEL_BYTES = 32 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 1024
MAX_ARCHIVE_BYTES = MAX_MODEL_BYTES + MAX_MANIFEST_BYTES + 4096
# Required manifest fields and their JSON types (the rest is informational).
REQUIRED = {"name": str, "version": int, "kind": str, "family": str, "device_class": str, "model_sha256": str,
            "model_bytes": int, "layout": list, "input": dict, "n_classes": int, "batch_sizes": dict}
KINDS = ("trainable", "int8_student")


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed every check (signature, manifest shape, model hash): what readers hand to the rest."""

    manifest: dict
    model_bytes: bytes
    layout: Layout
    manifest_bytes: bytes
    signature: bytes

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return self.manifest["version"]


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical JSON (sorted keys, no spaces): the exact bytes that are signed."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(model_bytes: bytes, manifest: dict, private_key: Ed25519PrivateKey) -> dict[str, bytes]:
    """The three files of a bundle: the manifest gets the model's hash and size, then is signed."""
    manifest = {**manifest, "model_sha256": hashlib.sha256(model_bytes).hexdigest(), "model_bytes": len(model_bytes)}
    data = manifest_bytes(manifest)
    return {MANIFEST_FILE: data, SIGNATURE_FILE: sign(private_key, data), MODEL_FILE: bytes(model_bytes)}


def write_files(directory: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write the model first and the signature last, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE):
        atomic_write(directory / name, files[name])
    return directory


def write_bundle(directory: str | os.PathLike, model_bytes: bytes, manifest: dict,
                 private_key: Ed25519PrivateKey) -> Path:
    return write_files(directory, seal(model_bytes, manifest, private_key))


def _check_manifest(manifest: object) -> dict:
    if not isinstance(manifest, dict):
        raise ProtocolError(Reason.MALFORMED, "manifest is not a JSON object")
    for key, kind in REQUIRED.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError(Reason.MALFORMED, f"manifest field {key!r} missing or not a {kind.__name__}")
    if manifest["kind"] not in KINDS:
        raise ProtocolError(Reason.MALFORMED, f"manifest kind {manifest['kind']!r} not one of {KINDS}")
    if manifest["version"] < 0:
        raise ProtocolError(Reason.MALFORMED, "negative bundle version")
    try:
        layout = layout_from_dicts(manifest["layout"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(Reason.MALFORMED, f"manifest layout: {exc}") from None
    if any(d < 1 for spec in layout for d in spec.shape):
        raise ProtocolError(Reason.MALFORMED, "manifest layout has an empty dimension")
    return manifest


def verify_files(files: dict[str, bytes], public_key: Ed25519PublicKey) -> Bundle:
    """Signature, then manifest shape, then model hash and size: a Bundle, or ProtocolError."""
    verify(public_key, files[SIGNATURE_FILE], files[MANIFEST_FILE])
    try:
        manifest = json.loads(files[MANIFEST_FILE])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Reason.MALFORMED, f"manifest.json is not JSON: {exc}") from None
    manifest = _check_manifest(manifest)
    model = files[MODEL_FILE]
    digest = hashlib.sha256(model).hexdigest()
    if len(model) != manifest["model_bytes"] or digest != manifest["model_sha256"]:
        raise ProtocolError(Reason.BAD_HASH, f"model.tflite has sha256 {digest} ({len(model)} bytes), manifest says "
                                             f"{manifest['model_sha256']} ({manifest['model_bytes']} bytes)")
    return Bundle(manifest, model, layout_from_dicts(manifest["layout"]), files[MANIFEST_FILE],
                  files[SIGNATURE_FILE])


def _read_capped(path: Path, cap: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > cap:
            raise ProtocolError(Reason.TOO_LARGE, f"{path.name} is {size} bytes (limit {cap})")
        return path.read_bytes()
    except FileNotFoundError:
        raise ProtocolError(Reason.MALFORMED, f"bundle has no {path.name}") from None


def read_files(directory: str | os.PathLike) -> dict[str, bytes]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ProtocolError(Reason.MALFORMED, f"{directory} is not a bundle directory")
    caps = {MANIFEST_FILE: MAX_MANIFEST_BYTES, SIGNATURE_FILE: MAX_SIGNATURE_BYTES, MODEL_FILE: MAX_MODEL_BYTES}
    return {name: _read_capped(directory / name, cap) for name, cap in caps.items()}


def load_bundle(directory: str | os.PathLike, public_key: Ed25519PublicKey) -> Bundle:
    """A verified bundle from a directory; ProtocolError with a clear reason otherwise."""
    return verify_files(read_files(directory), public_key)


def pack_bundle(directory: str | os.PathLike) -> bytes:
    """One archive (bytes) holding the three files of a bundle directory, as they are (not verified here)."""
    return cbor2.dumps({"format": ARCHIVE_FORMAT, **read_files(directory)})


def unpack_files(data: bytes) -> dict[str, bytes]:
    """Strict decoder of a packed bundle (hostile input): size caps first, exact keys, byte strings only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(Reason.WRONG_TYPE, "bundle archive must be bytes")
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, f"bundle archive of {len(data)} bytes (limit {MAX_ARCHIVE_BYTES})")
    obj = load_cbor(data, MAX_ARCHIVE_BYTES)  # the messages' bounded decode: depth, items and memory capped first
    if not isinstance(obj, dict) or set(obj) != {"format", *FILES}:
        raise ProtocolError(Reason.MALFORMED, f"bundle archive must hold exactly format + {', '.join(FILES)}")
    if obj["format"] != ARCHIVE_FORMAT:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"bundle archive format {obj['format']!r}")
    if not all(isinstance(obj[name], bytes) for name in FILES):
        raise ProtocolError(Reason.WRONG_TYPE, "bundle archive entries must be byte strings")
    if len(obj[MANIFEST_FILE]) > MAX_MANIFEST_BYTES or len(obj[SIGNATURE_FILE]) > MAX_SIGNATURE_BYTES:
        raise ProtocolError(Reason.TOO_LARGE, "manifest or signature over its size limit")
    return {name: obj[name] for name in FILES}


def unpack_bundle(data: bytes, dest_dir: str | os.PathLike, public_key: Ed25519PublicKey) -> Bundle:
    """Verify a packed bundle in memory, then write it to `dest_dir` (only if it verifies)."""
    files = unpack_files(data)
    bundle = verify_files(files, public_key)
    write_files(dest_dir, files)
    return bundle

