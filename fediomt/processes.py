"""Run daemons as child processes and make sure none outlives us (demo, tests, benchmarks).

Each child runs in its own session (process group) with its output in a log file; `stop_all` sends SIGTERM, waits,
then SIGKILLs whatever is left, group by group. A ProcessGroup used as a context manager also stops everything on
Ctrl-C or SIGTERM to the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    """One daemon a ProcessGroup started, with the log file that receives its output."""

    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class ProcessGroup:
    """Starts daemons in their own process groups and makes sure none outlives us (stop_all, or leaving `with`)."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict | None = None) -> Child:
        """Start `python -m fediomt ARGS` (or any argv starting with a path) logging to `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        argv = args if args and os.path.sep in args[0] else [sys.executable, "-m", "fediomt", *args]
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, **(env or {})})
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def alive(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is None]

    def failed(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() not in (None, 0)]

    def stop_all(self, timeout: float = 10.0) -> None:
        for child in self.alive():
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            _signal_group(child.process, signal.SIGKILL)  # the group may hold grandchildren even after exit
            if child.process.poll() is None:
                child.process.wait()

    def __enter__(self) -> ProcessGroup:
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
