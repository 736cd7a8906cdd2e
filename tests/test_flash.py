"""`fediomt flash`: atomic install with verification, previous kept, rollback, downgrade refusal, ssh plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.flash import flash_local, load_installed, rollback_local
from fediomt.cli import main
from fediomt.flash import Remote, parse_dest, parse_sha256sum, remote_commands
from protocol.bundle import load_bundle, write_bundle
from protocol.errors import ProtocolError, Reason
from protocol.signing import generate_signing_key, save_public_key

MANIFEST = {"name": "toy", "version": 1, "kind": "trainable", "family": "mlp", "device_class": "pi",
            "layout": [{"name": "w", "shape": [2]}], "input": {"shape": [2], "dtype": "float32"}, "n_classes": 2,
            "batch_sizes": {"train": 4, "evaluate": 4, "infer": 4}}


@pytest.fixture
def key(tmp_path):
    key = generate_signing_key()
    save_public_key(key.public_key(), tmp_path / "pub.pem")
    return key


def make(tmp_path: Path, key, version: int) -> Path:
    return write_bundle(tmp_path / f"src-v{version}", f"model v{version}".encode(), {**MANIFEST, "version": version},
                        key)


def test_flash_keeps_previous_and_rolls_back(tmp_path, key):
    dest, pub = tmp_path / "sdcard", str(tmp_path / "pub.pem")
    assert main(["flash", str(make(tmp_path, key, 1)), str(dest), "--pubkey", pub]) == 0
    assert main(["flash", str(make(tmp_path, key, 2)), str(dest), "--pubkey", pub]) == 0
    assert load_bundle(dest / "current", key.public_key()).version == 2
    assert load_bundle(dest / "previous", key.public_key()).version == 1
    assert not (dest / ".incoming").exists()
    assert main(["flash", "--rollback", str(dest)]) == 0
    assert load_installed(dest, key.public_key()).version == 1
    assert load_bundle(dest / "previous", key.public_key()).version == 2


def test_downgrade_needs_force(tmp_path, key):
    dest = tmp_path / "dev"
    flash_local(load_bundle(make(tmp_path, key, 5), key.public_key()), dest, key.public_key())
    old = load_bundle(make(tmp_path, key, 4), key.public_key())
    with pytest.raises(ProtocolError) as err:
        flash_local(old, dest, key.public_key())
    assert err.value.reason == Reason.DOWNGRADE
    flash_local(old, dest, key.public_key(), force=True)
    assert load_installed(dest, key.public_key()).version == 4


def test_tampered_or_foreign_bundle_is_refused_and_dest_untouched(tmp_path, key, capsys):
    dest, pub = tmp_path / "dev", str(tmp_path / "pub.pem")
    assert main(["flash", str(make(tmp_path, key, 1)), str(dest), "--pubkey", pub]) == 0
    evil = make(tmp_path, key, 2)
    (evil / "model.tflite").write_bytes(b"backdoor")
    assert main(["flash", str(evil), str(dest), "--pubkey", pub]) == 1
    assert "BAD_HASH" in capsys.readouterr().err
    foreign = write_bundle(tmp_path / "foreign", b"x", {**MANIFEST, "version": 3}, generate_signing_key())
    assert main(["flash", str(foreign), str(dest), "--pubkey", pub]) == 1
    assert "BAD_SIGNATURE" in capsys.readouterr().err
    assert load_installed(dest, key.public_key()).version == 1 and not (dest / "previous").exists()


def test_rollback_without_previous_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError):
        rollback_local(tmp_path)
    assert main(["flash", "--rollback", str(tmp_path)]) == 1


def test_dest_parsing_and_remote_plan(tmp_path):
    assert parse_dest("pi@ward3-bed7:/opt/fediomt/bundles") == Remote("pi@ward3-bed7", "/opt/fediomt/bundles")
    assert parse_dest(str(tmp_path)) == tmp_path
    assert parse_dest("relative/dir") == Path("relative/dir")
    cmds = remote_commands(Remote("pi@h", "/data/my bundles"), Path("/b"))
    assert cmds["copy"][:2] == ["scp", "-q"] and cmds["copy"][-1] == "pi@h:/data/my bundles/.incoming/"
    assert "'/data/my bundles/.incoming'" in cmds["prepare"][2]
    assert cmds["rotate"][2].startswith("cd '/data/my bundles' && sync && rm -rf previous")
    hashes = parse_sha256sum("ab12  model.tflite\ncd34 *manifest.sig\n")
    assert hashes == {"model.tflite": "ab12", "manifest.sig": "cd34"}
