"""Start a private Mosquitto on a free loopback port (tests, the demo, benchmarks).

Mosquitto started as root drops to the `mosquitto` user before it opens its log, pid and persistence files; a private
broker started as root keeps running as root (`user root`), because its run directory may sit under directories
that user cannot enter (pytest's 0700 tmp dirs), where it could not save its persistence file and sessions would
not survive a restart. Extra config lines (TLS, ACLs, size limits, bridges) pass through.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    """Mosquitto is not installed or did not start."""


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto",
                      "/opt/homebrew/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerUnavailable("mosquitto not found: run `./run setup` or install it (Debian: apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise BrokerUnavailable(f"nothing accepts connections on {host}:{port} after {timeout:.0f} s")


@dataclass
class MosquittoBroker:
    """A private broker process. Use as a context manager, or call start()/stop().

    `extra_config` lines are appended to the listener config; `persistence` keeps messages and sessions across a
    stop()/start() (restart tests). The port is kept across restarts. `config_file` runs a complete config instead
    (e.g. one from `fediomt broker config`, listening on `port`, logging to stderr); the workdir then holds the log.
    """

    extra_config: list[str] = field(default_factory=list)
    persistence: bool = True
    autosave_interval: int = 1     # seconds between saves of the persistence file; 0 = only at exit and on save()
    port: int = field(default_factory=free_port)
    workdir: Path | None = None
    config_file: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _own_workdir: bool = field(default=False, init=False, repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def _write_config(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fediomt-mosquitto-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o777)  # mosquitto may drop to its own user (when started as root)
        if self.config_file is not None:
            return Path(self.config_file)
        lines = [
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0 and not any(line.startswith("user ") for line in self.extra_config):
            lines.append("user root")
        if not any(line.startswith(("allow_anonymous", "password_file")) for line in self.extra_config):
            lines.append("allow_anonymous true")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/",
                      f"autosave_interval {self.autosave_interval}"]
        lines += self.extra_config
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o644)
        return conf

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        binary = find_mosquitto()
        conf = self._write_config()
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process lifetime
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True)
        log.close()
        try:
            wait_for_port(self.port, timeout)
        except BrokerUnavailable:
            self.stop()
            raise BrokerUnavailable(f"mosquitto did not start: {self.log_tail()}") from None
        if self.process.poll() is not None:
            raise BrokerUnavailable(f"mosquitto exited: {self.log_tail()}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """SIGTERM saves the persistence database; SIGKILL (crash tests) does not."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def save(self, timeout: float = 10.0) -> None:
        """Have the broker write its persistence file now (SIGUSR1) and wait until it did."""
        before = self._saved()
        self.process.send_signal(signal.SIGUSR1)
        self._wait_saved(before, timeout)

    def wait_autosaved(self, timeout: float = 10.0) -> None:
        """Wait until the broker has saved its sessions after now, so a kill -9 keeps them: mosquitto compares
        whole seconds, so "autosave_interval 1" saves only every one to two seconds."""
        self._wait_saved(self._saved(), timeout)

    def _saved(self) -> tuple[int, int] | None:
        """(inode, mtime in ns) of the persistence file, None before the first save. Mosquitto writes a new file and
        renames it over the old one, so every save changes the inode. Comparing the file's mtime with time.time()
        is not enough: the kernel stamps files from a coarse clock that can lag time.time() by a tick, so a save
        right after the signal could look older than the signal, and with autosave off no later save would come."""
        try:
            st = (self.workdir / "mosquitto.db").stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _wait_saved(self, before: tuple[int, int] | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (now := self._saved()) is None or now == before:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"mosquitto did not autosave within {timeout:g} s: {self.log_tail()}")
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        path = self.workdir / "mosquitto.log" if self.workdir else None
        return path.read_text(errors="replace")[-n:] if path and path.exists() else ""

    def close(self) -> None:
        self.stop()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def give_to_broker_user(*paths: Path, user: str = "mosquitto") -> None:
    """Make private keys readable by a broker started as root: it drops to `user` before loading TLS files.

    Keeps their 0600 mode (chown instead of chmod). No-op when not root or when `user` does not exist; the
    directories above must be traversable by `user` (pytest's 0700 tmp dirs are not).
    """
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)
