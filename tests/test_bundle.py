"""Signed bundles: write/load, every refusal reason, pack/unpack of hostile archives (no TensorFlow here)."""

from __future__ import annotations

import json

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.flash import load_installed
from firmware_models.devbundles import DEV_PUBKEY, PREBUILT, TRAINABLE
from protocol import bundle as bmod
from protocol.bundle import load_bundle, pack_bundle, unpack_bundle, unpack_files, write_bundle
from protocol.errors import ProtocolError, Reason
from protocol.signing import generate_signing_key, load_public_key

MANIFEST = {"name": "toy", "version": 2, "kind": "trainable", "family": "mlp", "device_class": "pi",
            "layout": [{"name": "w", "shape": [3, 2]}], "input": {"shape": [3], "dtype": "float32"}, "n_classes": 2,
            "batch_sizes": {"train": 4, "evaluate": 4, "infer": 4}}
MODEL = b"not really a tflite model" * 10


@pytest.fixture
def key():
    return generate_signing_key()


@pytest.fixture
def written(tmp_path, key):
    return write_bundle(tmp_path / "b", MODEL, MANIFEST, key)


def reason_of(call) -> Reason:
    with pytest.raises(ProtocolError) as err:
        call()
    return err.value.reason


def test_round_trip_records_hash_and_size(written, key):
    bundle = load_bundle(written, key.public_key())
    assert bundle.model_bytes == MODEL and bundle.name == "toy" and bundle.version == 2
    assert bundle.manifest["model_bytes"] == len(MODEL) and len(bundle.manifest["model_sha256"]) == 64
    assert [s.shape for s in bundle.layout] == [(3, 2)]


def test_every_prebuilt_bundle_verifies_with_the_development_key():
    for name in (*TRAINABLE, "har_mlp_int8"):
        assert load_bundle(PREBUILT / name, load_public_key(DEV_PUBKEY)).name in name


def test_wrong_key_tampered_manifest_and_tampered_model(written, key):
    assert reason_of(lambda: load_bundle(written, generate_signing_key().public_key())) == Reason.BAD_SIGNATURE
    (written / "model.tflite").write_bytes(MODEL + b"!")
    assert reason_of(lambda: load_bundle(written, key.public_key())) == Reason.BAD_HASH
    manifest = json.loads((written / "manifest.json").read_text())
    manifest["version"] = 99
    (written / "manifest.json").write_text(json.dumps(manifest))
    assert reason_of(lambda: load_bundle(written, key.public_key())) == Reason.BAD_SIGNATURE


def test_missing_file_and_signed_but_malformed_manifest(tmp_path, written, key):
    (written / "manifest.sig").unlink()
    assert reason_of(lambda: load_bundle(written, key.public_key())) == Reason.MALFORMED
    for bad in ({**MANIFEST, "version": "2"}, {**MANIFEST, "kind": "rootkit"}, {**MANIFEST, "layout": [{"x": 1}]},
                {k: v for k, v in MANIFEST.items() if k != "layout"}):
        path = write_bundle(tmp_path / "bad", MODEL, bad, key)
        assert reason_of(lambda p=path: load_bundle(p, key.public_key())) == Reason.MALFORMED


def test_oversized_model_is_refused_before_reading(written, key):
    with open(written / "model.tflite", "r+b") as f:
        f.truncate(bmod.MAX_MODEL_BYTES + 1)  # sparse: cheap
    assert reason_of(lambda: load_bundle(written, key.public_key())) == Reason.TOO_LARGE


def test_pack_unpack_round_trip(tmp_path, written, key):
    bundle = unpack_bundle(pack_bundle(written), tmp_path / "dest", key.public_key())
    assert bundle.model_bytes == MODEL
    assert load_bundle(tmp_path / "dest", key.public_key()).manifest == bundle.manifest


def test_unpack_verifies_before_writing(tmp_path, written, key):
    data = cbor2.loads(pack_bundle(written))
    data["model.tflite"] = MODEL[::-1]
    dest = tmp_path / "dest"
    assert reason_of(lambda: unpack_bundle(cbor2.dumps(data), dest, key.public_key())) == Reason.BAD_HASH
    assert not dest.exists()


def test_hostile_archives(tmp_path, written, key):
    good = cbor2.loads(pack_bundle(written))
    assert reason_of(lambda: unpack_files(b"\xff\x00garbage")) == Reason.MALFORMED
    assert reason_of(lambda: unpack_files(cbor2.dumps([1, 2]))) == Reason.MALFORMED
    assert reason_of(lambda: unpack_files(cbor2.dumps({**good, "../../etc/passwd": b"x"}))) == Reason.MALFORMED
    assert reason_of(lambda: unpack_files(cbor2.dumps({**good, "model.tflite": "text"}))) == Reason.WRONG_TYPE
    assert reason_of(lambda: unpack_files(cbor2.dumps({**good, "format": "zip"}))) == Reason.UNKNOWN_VERSION
    big = {**good, "manifest.json": b"{" * (bmod.MAX_MANIFEST_BYTES + 1)}
    assert reason_of(lambda: unpack_files(cbor2.dumps(big))) == Reason.TOO_LARGE
    assert reason_of(lambda: unpack_files(b"\x00" * (bmod.MAX_ARCHIVE_BYTES + 1))) == Reason.TOO_LARGE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_archives_only_raise_protocol_errors(data):
    with pytest.raises(ProtocolError):
        unpack_files(data)


def test_load_installed_prefers_current_and_survives_an_interrupted_flash(tmp_path, key):
    write_bundle(tmp_path / "previous", MODEL, MANIFEST, key)
    assert load_installed(tmp_path, key.public_key()).version == 2  # current missing: previous
    write_bundle(tmp_path / "current", MODEL, {**MANIFEST, "version": 3}, key)
    assert load_installed(tmp_path, key.public_key()).version == 3
    (tmp_path / "current" / "model.tflite").write_bytes(b"evil")
    assert reason_of(lambda: load_installed(tmp_path, key.public_key())) == Reason.BAD_HASH
