"""Issue 20's operability and runs, piece by piece: hardened units, runs in the engines, min_devices, configs
(partial tables, check-config, one-line errors), the state-dir lock, JSON logs, TensorFlow-free device commands,
`device new-run` on a real broker. The whole lifecycle with real processes is tests/test_provision.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib

from fediomt import units
from protocol.messages import decode, encode, global_model, new_run_id, sign_message
from protocol.signing import generate_signing_key, save_public_key
from protocol.tomlconfig import ConfigError, lock_dir

from .harness import REPO, Fed, provision_device
from .test_cloud_engine import EDGES, NOW, aggregate, engine

SECURITY_LIMIT = 4.0


@pytest.fixture(scope="module")
def keys():
    return {name: generate_signing_key() for name in ("cloud", *EDGES)}


def fediomt(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fediomt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------ systemd
def test_shipped_units_are_the_rendered_ones():
    for name, text in units.all_units().items():
        folder = "deploy/mosquitto" if "mosquitto" in name else "deploy/systemd"
        assert (REPO / folder / name).read_text() == text, f"{folder}/{name}: re-render with fediomt.units"
    cloud, ledger = units.daemon("cloud", broker="cloud"), units.daemon("ledger")
    assert "After=network-online.target fediomt-mosquitto@cloud.service" in cloud and "mosquitto.service" \
        not in cloud.replace("fediomt-mosquitto@cloud.service", "")
    assert "%H" not in ledger and "--id ${FEDIOMT_LEDGER_ID}" in ledger and "--host ${FEDIOMT_LEDGER_HOST}" in ledger
    assert "RestartPreventExitStatus=2 3 4" in cloud


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, timeout=60)
    line = [x for x in out.stdout.splitlines() if "Overall exposure level" in x]
    if not line:
        pytest.skip(f"systemd-analyze security --offline is not supported here: {out.stderr.strip()[:200]}")
    return float(line[0].split(":")[1].split()[0])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_every_unit_rates_at_most_4_in_systemd_analyze_security(tmp_path):
    for name, text in units.all_units().items():
        (tmp_path / name).write_text(text)
    figures = {name: exposure(tmp_path / name) for name in units.all_units()}
    print("systemd-analyze security:", figures)
    assert all(v <= SECURITY_LIMIT for v in figures.values()), figures


# ------------------------------------------------------------------ runs
def test_the_cloud_names_its_run_in_every_round_and_model_and_keeps_it_across_a_restart(keys, tmp_path):
    eng = engine(keys, tmp_path)
    pubs = eng.start(NOW)
    msgs = {p.topic.rsplit("/", 1)[1]: decode(p.payload) for p in pubs}
    run = msgs["round"].run_id
    assert run and msgs["model"].run_id == run
    assert engine(keys, tmp_path).state.run_id == run                     # the checkpoint keeps it
    assert engine(keys, tmp_path / "next").state.run_id > run             # a later run sorts after
    with pytest.raises(ValueError, match="new-run"):
        engine(keys, tmp_path, run_id="20990101T000000000Z-0000")


def test_a_round_closing_below_min_devices_fails_the_run_instead_of_completing_it(keys, tmp_path):
    eng = engine(keys, tmp_path, min_devices=1, rounds=3)
    eng.start(NOW)
    for edge in EDGES:
        eng.handle_aggregate(edge, aggregate(keys, edge, 1, 1, None, num_devices=0, num_samples=0))
    eng.tick(NOW + 1)
    assert eng.state.stop_reason.startswith("failed: round 1 closed with 0 device(s)"), eng.state.stop_reason
    ok = engine(keys, tmp_path / "ok", min_devices=1, rounds=1)
    ok.start(NOW)
    for edge in EDGES:
        ok.handle_aggregate(edge, aggregate(keys, edge, 1, 1, np.ones(12)))
    ok.tick(NOW + 1)
    assert ok.state.stop_reason == "completed 1 rounds"


def _model(fed: Fed, run: str, version: int = 1) -> bytes:
    return encode(sign_message(global_model("m", version, np.zeros(fed.n_params, np.float32), run_id=run),
                               fed.cloud_key))


def test_the_edge_ignores_an_older_runs_round_and_starts_a_newer_one_afresh(tmp_path):
    fed = Fed(tmp_path, n_devices=2)
    eng = fed.engine()
    old, new = new_run_id(NOW), new_run_id(NOW + 60)
    assert eng.handle_cloud("model", _model(fed, old, 4))
    assert eng.handle_cloud("round", fed.announce(4, 4, run_id=old))
    eng.handle_update("d00", fed.update("d00", np.ones(fed.n_params), round_id=4, version=4))
    assert eng.pending
    assert eng.handle_cloud("model", _model(fed, new, 1))                   # the new run's model: adopted...
    assert eng.handle_cloud("round", fed.announce(1, 1, run_id=new))        # ...and its round 1, though 1 < 4
    assert eng.announcement.round_id == 1 and eng.announcement.run_id == new and not eng.pending
    assert eng.handle_cloud("round", fed.announce(5, 4, run_id=old)) == []   # the old run's: ignored
    assert eng.announcement.run_id == new
    assert eng.store.end_run() == new                                        # `edge new-run`
    eng.close()
    eng = fed.engine()
    assert eng.announcement is None
    assert eng.handle_cloud("round", fed.announce(2, 1, run_id=new)) == []   # the ended run is not taken up again


# ------------------------------------------------------------------ configs
def test_a_partial_plan_table_keeps_the_other_defaults_and_check_config_prints_toml(tmp_path):
    from cloud.config import default_plan, load_config

    (tmp_path / "cloud.key").write_text("x")
    (tmp_path / "edge_keys").mkdir()
    (tmp_path / "cloud.toml").write_text('run_dir = "run"\nsigning_key = "cloud.key"\nedge_keys_dir = "edge_keys"\n'
                                         '[plan]\nlr = 0.3\n[broker]\nport = 1884\n')
    cfg = load_config(tmp_path / "cloud.toml")
    assert cfg.plan == dataclasses.replace(default_plan(), lr=0.3) and cfg.broker.session_expiry_s == 3600
    out = fediomt("cloud", "check-config", "--config", str(tmp_path / "cloud.toml"))
    assert out.returncode == 0, out.stderr
    printed = tomllib.loads(out.stdout)
    assert printed["plan"]["lr"] == 0.3 and printed["plan"]["batch_size"] == default_plan().batch_size
    assert printed["rounds"] == 20 and printed["min_devices"] == 1 and printed["broker"]["port"] == 1884
    (tmp_path / "cloud.key").unlink()
    out = fediomt("cloud", "check-config", "--config", str(tmp_path / "cloud.toml"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "signing_key" in out.stderr
    assert "does not exist" in out.stderr


def test_a_device_without_its_signing_key_or_sharing_a_state_dir_says_so_in_one_line_with_status_2(tmp_path):
    save_public_key(generate_signing_key().public_key(), tmp_path / "cloud.pub")
    config = provision_device(tmp_path, "d1", port=1)
    key = config.parent / tomllib.loads(config.read_text())["signing_key"]
    moved = key.rename(key.with_suffix(".moved"))
    out = fediomt("device", "run", "--config", str(config))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "signing_key" in out.stderr, out.stderr
    moved.rename(key)
    state_dir = config.parent / tomllib.loads(config.read_text())["state_dir"]
    held = lock_dir(state_dir)                      # another agent holds the state directory
    try:
        out = fediomt("device", "run", "--config", str(config))
        assert out.returncode == 2 and "in use by another process" in out.stderr and out.stderr.count("\n") == 1
        with pytest.raises(ConfigError):
            lock_dir(state_dir)
    finally:
        held.close()


def test_init_config_writes_every_default_and_the_units(tmp_path):
    out = fediomt("init-config", "edge", "--id", "ward7", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads((tmp_path / "edge.toml").read_text())
    assert cfg["edge_id"] == "ward7" and cfg["rounds"]["mode"] == "sync" and cfg["broker"]["session_expiry_s"] == 3600
    assert "fediomt-mosquitto@edge.service" in (tmp_path / "systemd" / "fediomt-edge.service").read_text()


# ------------------------------------------------------------------ logs and the light device
def test_native_output_on_stderr_becomes_json_lines():
    code = ("import logging, os; from protocol import logs\n"
            "log = logs.setup('device.x'); logs.capture_native_output('device.x.runtime')\n"
            "os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
            "logs.event(log, 'stopped')\n"
            "from device.runtime import interpreter_class; interpreter_class()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in out.stderr.splitlines()]   # every line is JSON
    assert {"level": "info", "component": "device.x.runtime",
            "msg": "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."}.items() <= lines[0].items()
    assert lines[1]["msg"] == "stopped"


def test_models_list_and_verify_need_no_tensorflow():
    code = ("import sys; from fediomt.cli import main\n"
            "assert main(['models', 'list']) == 0\n"
            "assert main(['models', 'verify', 'firmware_models/prebuilt/vitals_mlp', '--pubkey', "
            "'firmware_models/prebuilt/DEVELOPMENT_ONLY_signing.key.pub']) == 0\n"
            "assert 'tensorflow' not in sys.modules and 'scipy' not in sys.modules, 'imported'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wearable_cnn" in out.stdout and "3319 params" in out.stdout and "OK " in out.stdout


# ------------------------------------------------------------------ device new-run on a broker
def test_device_new_run_forgets_the_run_keeps_the_budget_and_clears_its_retained_status(tmp_path, broker, recorder):
    from device.state import STATE_FILE, DeviceState, load_state, save_state
    from protocol.accountant import Entry

    save_public_key(generate_signing_key().public_key(), tmp_path / "cloud.pub")
    config = provision_device(tmp_path, "d1", broker.port)
    state_path = config.parent / "state" / STATE_FILE
    run = new_run_id(NOW)
    history = (Entry(1.1, 0.25, 4),)
    save_state(state_path, DeviceState(model_name="wearable_cnn", model_version=7, history=history,
                                       seen_rounds=(1, 2, 3), extra={"run_id": run}))
    rec = recorder(["fl/e1/status/d1"])
    rec.publish("fl/e1/status/d1", b"old status", retain=True)
    out = fediomt("device", "new-run", "--config", str(config))
    assert out.returncode == 0, out.stderr
    state = load_state(state_path)
    assert state.history == history and state.model_version == -1 and state.seen_rounds == ()
    assert state.extra["after_run"] == run and state.run_id == ""
    assert json.loads(out.stdout)["brokers"][0]["retained_cleared"] == ["fl/e1/status/d1"]
    late = recorder(["fl/e1/status/d1"], client_id="late")
    time.sleep(0.5)
    assert late.payloads("fl/e1/status/d1") == []     # nothing retained any more


# ------------------------------------------------------------------ provisioning the reference consortium file
def test_the_reference_consortium_provisions_every_site_for_its_hosts(tmp_path):
    out = fediomt("provision", str(REPO / "configs" / "consortium.toml"), "--out", str(tmp_path / "sites"), "--root",
                  "/etc/fediomt", "--fediomt", "/usr/local/bin/fediomt")
    assert out.returncode == 0, out.stderr
    sites = tmp_path / "sites"
    assert sorted(p.name for p in sites.iterdir()) == ["ca", "cloud", "edge1", "edge2", "pi01", "watch01"]
    edge = (sites / "edge1" / "broker" / "edge1.conf").read_text()
    assert "cafile /etc/fediomt/pki/ca.crt" in edge and "address cloud.example.org:8883" in edge
    assert "persistence_location /var/lib/mosquitto/edge1/" in edge
    unit = (sites / "edge1" / "systemd" / "fediomt-edge.service").read_text()
    assert "ExecStart=/usr/local/bin/fediomt edge run --config /etc/fediomt/edge.toml" in unit
    assert "After=network-online.target fediomt-mosquitto@edge1.service" in unit
    device = tomllib.loads((sites / "watch01" / "device.toml").read_text())
    assert device["broker"]["host"] == "edge1.example.org" and device["state_dir"] == "/var/lib/fediomt/device"
    readme = (sites / "watch01" / "README.md").read_text()
    assert "systemctl enable --now fediomt-device" in readme and "install.sh" in readme
    assert not (sites / "edge1" / "ledger.env").exists()   # no eval_data: nothing to score, no ledger


def test_a_consortium_with_eval_data_provisions_the_ledger_for_host_installation(tmp_path):
    """With `eval_data`, the cloud and every edge get one consortium.toml (one genesis), the edges a validator unit
    whose ledger.env points at the cloud's broker and the edge's own key under --root."""
    import numpy as np

    cons = tmp_path / "consortium.toml"
    np.savez(tmp_path / "holdout.npz", x=np.zeros((4, 100, 6), np.float32), y=np.zeros(4, np.int64))
    text = (REPO / "configs" / "consortium.toml").read_text()
    assert "\nrounds = 20\n" in text
    cons.write_text(text.replace("\nrounds = 20\n", '\nrounds = 20\neval_data = "holdout.npz"\n'))
    out = fediomt("provision", str(cons), "--out", str(tmp_path / "sites"), "--root", "/etc/fediomt")
    assert out.returncode == 0, out.stderr
    sites = tmp_path / "sites"
    consortium = (sites / "cloud" / "consortium.toml").read_text()
    assert consortium == (sites / "edge2" / "consortium.toml").read_text() and "[policy]" in consortium
    assert not (sites / "watch01" / "consortium.toml").exists()
    cloud = tomllib.loads((sites / "cloud" / "cloud.toml").read_text())
    assert cloud["eval_data"] == "eval.npz" and cloud["ledger"]["db"] == "/var/lib/fediomt/cloud/ledger.db"
    env = (sites / "edge1" / "ledger.env").read_text()
    assert "FEDIOMT_LEDGER_ID=edge1" in env and "FEDIOMT_LEDGER_HOST=cloud.example.org" in env
    assert "FEDIOMT_LEDGER_KEY=/etc/fediomt/pki/edges/edge1/sign.key" in env
    unit = (sites / "edge1" / "systemd" / "fediomt-ledger.service").read_text()
    assert "--consortium /etc/fediomt/consortium.toml" in unit and "EnvironmentFile=/etc/fediomt/ledger.env" in unit
    assert "systemctl enable --now fediomt-mosquitto@edge1 fediomt-edge fediomt-ledger" in \
        (sites / "edge1" / "README.md").read_text()
