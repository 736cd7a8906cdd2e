"""Foundation: the CLI, the private broker, and the no-TensorFlow guard for device/edge/protocol."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import paho.mqtt.client as mqtt
import pytest

from fediomt.cli import COMMANDS, main

from .conftest import REPO


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "fediomt 0.1.0" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "fediomt", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "fediomt", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.parametrize("command", [["device", "run"], ["device", "status"], ["edge", "run"], ["edge", "check-config"],
                                     ["cloud", "run"], ["cloud", "check-config"]])
@pytest.mark.parametrize("text,message", [
    ("nonsense = 1\n", "unknown keys ['nonsense']"),
    ("[broker\n", "bad.toml"),                               # not TOML
])
def test_a_bad_config_is_one_line_and_exit_status_2(tmp_path, capsys, command, text, message):
    """Every daemon command: a config it cannot use is the operator's error, said in one line, not a traceback."""
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert main([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fediomt {command[0]}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    missing = main([*command, "--config", str(tmp_path / "missing.toml")])
    assert missing == 2 and "missing.toml" in capsys.readouterr().err


def test_config_loader_names_the_file_and_key_of_every_problem(tmp_path):
    """protocol.tomlconfig: one ConfigError per problem, naming where it is; valid files resolve paths locally."""
    from edge.config import EdgeConfig
    from protocol.tomlconfig import ConfigError, load_toml

    required = 'edge_id = "e1"\nstate_dir = "s"\nenrolment_dir = "d"\nsigning_key = "k"\ncloud_public_key = "c"\n'
    config = tmp_path / "edge.toml"
    for text, message in ((required + "state_dir2 = 1\n", "edge.toml: unknown keys ['state_dir2']"),
                          (required.replace('"s"', "3"), "edge.toml.state_dir: expected a path"),
                          (required + "[broker]\nport = 1\nhots = 2\n", "edge.toml.broker: unknown keys ['hots']"),
                          (required + "broker = 1\n", "edge.toml.broker: expected a table"),
                          (required.replace('edge_id = "e1"\n', ""), "edge.toml: "),
                          (required + "key_check_s = -1\n", "edge.toml: key_check_s must be >= 0"),
                          ("edge_id = \n", str(config))):
        config.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_toml(EdgeConfig, config)
        assert str(exc.value).startswith(message), (text, str(exc.value))
    config.write_text(required)
    assert load_toml(EdgeConfig, config).state_dir == tmp_path / "s"


def test_bench_list_names_every_benchmark():
    from fediomt.bench import BENCHMARKS

    out = subprocess.run([sys.executable, "-m", "fediomt", "bench", "--list"], capture_output=True, text=True,
                         check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == list(BENCHMARKS)


def test_publish_subscribe_round_trip_through_mosquitto(broker):
    got = threading.Event()
    payloads: list[bytes] = []

    def on_message(client, userdata, msg):
        payloads.append(msg.payload)
        got.set()

    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(broker.host, broker.port)
    sub.subscribe("fl/test", qos=1)
    sub.loop_start()
    assert subscribed.wait(5)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish("fl/test", b"\xa1hello", qos=1).wait_for_publish(5)
    assert got.wait(5)
    assert payloads == [b"\xa1hello"]
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()


def test_broker_restart_keeps_port(broker):
    port = broker.port
    broker.restart()
    assert broker.port == port
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    assert c.connect(broker.host, broker.port) == 0
    c.disconnect()


GUARD = r"""
import importlib.abc, sys, pkgutil, importlib
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith(("tensorflow.", "keras", "tf_keras")):
            raise ImportError(f"{name} is forbidden on devices and edges")
sys.meta_path.insert(0, NoTensorFlow())
import json
loaded = []
for pkg in ("protocol", "device", "edge"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
        loaded.append(info.name)
print(json.dumps(loaded))
"""


def test_device_edge_protocol_import_without_tensorflow():
    proc = subprocess.run([sys.executable, "-c", GUARD], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout.strip().splitlines()[-1])


def test_device_extra_resolves_without_tensorflow():
    """Resolve the `device` extra's full dependency closure from the installed metadata: no tensorflow*."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [("fediomt", {"device"})]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, tuple(sorted(extras))) in seen:
            continue
        seen.add((key, tuple(sorted(extras))))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                if req.marker is not None and "extra" in str(req.marker) and not extras:
                    continue
                todo.append((req.name, set(req.extras)))
    names = {n for n, _ in seen}
    assert "ai-edge-litert" in names and "paho-mqtt" in names
    assert not [n for n in names if n.startswith("tensorflow") or n == "keras"], names
