"""Issue 20's targets with real processes: from an empty directory, `fediomt provision` + `fediomt site run` (5
commands) run 1 cloud, 2 edges and 4 devices for 3 rounds over mutual TLS with real Mosquitto brokers (bridged);
and two consecutive runs on the same brokers and the same running devices both complete with every device."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib

from experiments.mosquitto import free_port

from .harness import rounds_of, wait_for

pytestmark = pytest.mark.slow
DEVICES = 4


def consortium(root: Path, rounds: int = 3, ledger: bool = False, extra: tuple[str, ...] = (),
               round_timeout_s: float = 60) -> Path:
    """A consortium file for 1 cloud, 2 edges and 4 devices on free loopback ports, with each device's data; with
    `ledger`, the cloud's held-out set too (which turns the contribution ledger on); `extra`: [federation] lines."""
    rng = np.random.default_rng(0)
    lines = ['quorum_fraction = 0.667', '', '[federation]', 'model = "wearable_cnn"', f"rounds = {rounds}",
             "min_devices = 1", f"round_timeout_s = {round_timeout_s}", "device_epsilon = 30", *extra]
    if ledger:
        (root / "data").mkdir(parents=True, exist_ok=True)
        np.savez(root / "data" / "holdout.npz", x=rng.normal(size=(32, 100, 6)).astype(np.float32),
                 y=rng.integers(0, 7, 32))
        lines += ['eval_data = "data/holdout.npz"', "", "[policy]", "tokens_per_round = 100"]
    lines += ["", "[cloud]", 'host = "127.0.0.1"', f"port = {free_port()}"]
    for edge in ("edge1", "edge2"):
        lines += ["", f"[edges.{edge}]", 'host = "127.0.0.1"', f"port = {free_port()}"]
    for i in range(DEVICES):
        data = root / "data" / f"dev{i}"
        data.mkdir(parents=True)
        np.savez(data / "train.npz", x=rng.normal(size=(64, 100, 6)).astype(np.float32), y=rng.integers(0, 7, 64))
        lines += ["", f"[devices.dev{i}]", f'edge = "edge{i % 2 + 1}"', f'data = "data/dev{i}"',
                  'compute_class = "wearable"']
    path = root / "consortium.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Commands:
    """The commands a test runs, in order (`run` waits, `start` does not); every started one is stopped with
    SIGTERM at teardown (site run stops its children), then killed."""

    def __init__(self, cwd: Path) -> None:
        self.cwd, self.log, self.started = cwd, [], []

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        self.log.append(args)
        return subprocess.run([sys.executable, "-m", "fediomt", *args], cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args: str, name: str) -> subprocess.Popen:
        self.log.append(args)
        out = open(self.cwd / f"{name}.out", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "fediomt", *args], cwd=self.cwd, stdout=out, stderr=out)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 20) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


@pytest.fixture
def commands(tmp_path):
    c = Commands(tmp_path)
    yield c
    c.close()


def report(site: Path, run: str = "run") -> dict:
    path = site / "state" / "cloud" / run / "report.json"
    return json.loads(path.read_text()) if path.exists() else {}


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_provision_then_four_commands_run_a_federation_over_mtls(tmp_path, commands):
    cons = consortium(tmp_path, ledger=True)   # the consortium file is the input; then at most 5 commands
    out = commands.run("provision", str(cons), "--out", "sites")
    assert out.returncode == 0, out.stderr
    sites = tmp_path / "sites"
    cloud = commands.start("site", "run", "sites/cloud", name="cloud")
    commands.start("site", "run", "sites/edge1", name="edge1")
    commands.start("site", "run", "sites/edge2", name="edge2")
    commands.start("site", "run", *(f"sites/dev{i}" for i in range(DEVICES)), name="devices")
    assert len(commands.log) <= 5
    assert cloud.wait(240) == 0, (tmp_path / "cloud.out").read_text()[-3000:]
    r = report(sites / "cloud")
    assert r["finished"] and not r["failed"] and r["rounds_completed"] == 3, r.get("stop_reason")
    assert [x["num_devices"] for x in r["rounds"]] == [DEVICES] * 3
    # the contribution ledger: the edges' validators (started by `site run`, over the cloud's broker with the edge
    # certificates) signed a block for every round; the chain verifies against the provisioned consortium
    chain = sites / "cloud" / "state" / "cloud" / "ledger.db"
    out = commands.run("ledger", "verify", str(chain), "--validators", "sites/cloud/consortium.toml")
    assert out.returncode == 0 and "OK: 4 blocks" in out.stdout, out.stdout + out.stderr
    out = commands.run("ledger", "report", str(chain), "--format", "json")
    assert sorted({row["round"] for row in json.loads(out.stdout)["contributions"]}) == [1, 2, 3]
    assert (sites / "edge1" / "consortium.toml").read_bytes() == (sites / "cloud" / "consortium.toml").read_bytes()
    assert "FEDIOMT_LEDGER_HOST=127.0.0.1" in (sites / "edge1" / "ledger.env").read_text()
    assert (sites / "edge1" / "systemd" / "fediomt-ledger.service").exists()
    # what each folder holds: its own identity and nothing of the CA; TLS everywhere
    assert not list(sites.glob("[!c]*/**/ca.key")) and not list((sites / "cloud").rglob("ca.key"))
    for site in ("cloud", "edge1", "dev0"):
        assert (sites / site / "README.md").exists() and (sites / site / "systemd").is_dir()
        assert (sites / site / "pki" / "ca.crt").exists()
    assert (sites / "dev0" / "cloud.pub").exists() and (sites / "dev0" / "bundle.pub").exists()
    assert (sites / "cloud" / "bundle.key").exists() and not (sites / "dev0" / "bundle.key").exists()
    assert sorted(p.name for p in (sites / "edge1" / "enrolment").glob("*.pub")) == ["dev0.pub", "dev2.pub"]
    for site in ("cloud", "edge1", "dev0"):
        conf = tomllib.loads((sites / site / f"{ {'cloud': 'cloud', 'edge1': 'edge'}.get(site, 'device')}.toml")
                              .read_text())
        assert conf["broker"]["ca"] == "pki/ca.crt" and conf["broker"]["cert"].endswith("tls.crt")
    edge_conf = (sites / "edge1" / "broker" / "edge1.conf").read_text()
    assert "require_certificate true" in edge_conf and "bridge_certfile" in edge_conf
    # every daemon log line is JSON (LiteRT's and TensorFlow's start-up lines included)
    for log in ("cloud/state/logs/cloud.log", "edge1/state/logs/edge1.log", "dev0/state/logs/dev0.log"):
        assert json_lines(sites / log)
    # a device added later: one command; its edge's enrolment gains it, nothing else is re-issued
    before = (sites / "cloud" / "pki" / "cloud" / "cloud" / "tls.crt").read_bytes()
    out = commands.run("provision", str(cons), "--out", "sites", "--add-device", "dev9", "--edge", "edge2")
    assert out.returncode == 0, out.stderr
    assert (sites / "dev9" / "device.toml").exists() and (sites / "edge2" / "enrolment" / "dev9.pub").exists()
    assert (sites / "cloud" / "pki" / "cloud" / "cloud" / "tls.crt").read_bytes() == before


def test_two_consecutive_runs_on_the_same_brokers_and_devices_both_complete(tmp_path, commands):
    cons = consortium(tmp_path, rounds=2)
    assert commands.run("provision", str(cons), "--out", "sites").returncode == 0
    sites = tmp_path / "sites"
    commands.start("site", "run", "sites/cloud", "sites/edge1", "sites/edge2", "--only", "broker", name="brokers")
    wait_for(lambda: (tmp_path / "brokers.out").exists() and
             (tmp_path / "brokers.out").read_text().count("listening") == 3, 30)
    devices = commands.start("site", "run", *(f"sites/dev{i}" for i in range(DEVICES)), "--only", "daemon",
                             name="devices")

    def edges() -> list[subprocess.Popen]:
        return [commands.start("edge", "run", "--config", f"sites/{e}/edge.toml", name=e) for e in ("edge1", "edge2")]

    runs = []
    for n in (1, 2):
        running = edges()
        cloud = commands.start("cloud", "run", "--config", "sites/cloud/cloud.toml", name=f"cloud{n}")
        assert cloud.wait(240) == 0, (tmp_path / f"cloud{n}.out").read_text()[-3000:]
        r = report(sites / "cloud")
        assert r["finished"] and [x["num_devices"] for x in r["rounds"]] == [DEVICES] * 2, r.get("stop_reason")
        runs.append(r["run_id"])
        for proc in running:
            assert commands.stop(proc) == 0
        if n == 1:   # a new run: the cloud sets its run aside, each edge forgets its rounds; brokers cleared
            out = commands.run("cloud", "new-run", "--config", "sites/cloud/cloud.toml")
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["ended_run"] == runs[0]
            for e in ("edge1", "edge2"):
                out = commands.run("edge", "new-run", "--config", f"sites/{e}/edge.toml")
                assert out.returncode == 0, out.stderr
    assert runs[1] > runs[0] and devices.poll() is None            # the same device processes throughout
    assert report(sites / "cloud", f"run-{runs[0]}")["run_id"] == runs[0]   # the first run, set aside
    dev_log = json_lines(sites / "dev0" / "state" / "logs" / "dev0.log")
    assert [e["run"] for e in dev_log if e["msg"] == "new run"] == runs   # each device followed both runs
    time.sleep(0.1)


def test_a_device_started_mid_run_catches_up_and_trains_before_the_next_full_version(tmp_path, commands):
    """Delta-encoded models (every 5th version in full): dev3 starts after round 2, when only version 3's delta is
    retained. It takes version 3 (or a later one) in full from its edge and its updates count from the next round
    on, long before version 6, the next full one: the rounds it missed closed at their deadline without it."""
    cons = consortium(tmp_path, rounds=5, extra=('model_encoding = "delta"',), round_timeout_s=10)
    assert commands.run("provision", str(cons), "--out", "sites").returncode == 0
    sites = tmp_path / "sites"
    run_dir = sites / "cloud" / "state" / "cloud" / "run"
    cloud = commands.start("site", "run", "sites/cloud", name="cloud")
    commands.start("site", "run", "sites/edge1", name="edge1")
    commands.start("site", "run", "sites/edge2", name="edge2")
    commands.start("site", "run", *(f"sites/dev{i}" for i in range(DEVICES - 1)), name="devices")
    wait_for(lambda: len(rounds_of(run_dir)) >= 2, 120, message=lambda: (tmp_path / "cloud.out").read_text()[-2000:])
    commands.start("site", "run", f"sites/dev{DEVICES - 1}", name="late")
    assert cloud.wait(240) == 0, (tmp_path / "cloud.out").read_text()[-3000:]
    r = report(sites / "cloud")
    assert r["finished"] and r["rounds_completed"] == 5, r.get("stop_reason")
    counts = [x["num_devices"] for x in r["rounds"]]
    assert counts[:2] == [DEVICES - 1] * 2 and counts[-1] == DEVICES, counts
    log = json_lines(sites / f"dev{DEVICES - 1}" / "state" / "logs" / f"dev{DEVICES - 1}.log")
    caught = [e for e in log if e["msg"] == "missed a model version: fetching it in full from the edge"]
    assert caught and caught[0]["have"] == -1 and 3 <= caught[0]["want"] <= 5, [e["msg"] for e in log]
    installed = [e for e in log if e["msg"] == "global model installed"]
    assert installed[0]["version"] == caught[0]["want"] and installed[0]["source"] == "edge"
