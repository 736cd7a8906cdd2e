"""Shared fixtures: a real private Mosquitto per test, MQTT recorders and daemons torn down after the test, paths to
shared data. The helpers behind them live in tests/harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.mosquitto import MosquittoBroker

from .harness import REPO, Daemons, Recorder

SHARED = REPO.parent / "shared"


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free loopback port, persistence on; `broker.restart()` keeps the port."""
    with MosquittoBroker(workdir=tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture
def daemons():
    """Start in-process daemons (`daemons.thread(gateway)`) and `fediomt` processes; all stopped at teardown."""
    d = Daemons()
    yield d
    d.close()


@pytest.fixture
def recorder(broker):
    """`recorder(filters, **kw)`: a Recorder on the test's broker (or `port=`), closed at teardown."""
    opened: list[Recorder] = []

    def start(filters: list[str], port: int | None = None, **kw) -> Recorder:
        opened.append(Recorder(port or broker.port, filters, **kw))
        return opened[-1]

    yield start
    for r in opened:
        r.close()


@pytest.fixture
def shared_dataset():
    """Path of a dataset under ../shared/datasets, or a clear skip where this checkout has none."""

    def locate(name: str) -> Path:
        path = SHARED / "datasets" / name
        if not path.exists():
            pytest.skip(f"{path} is absent: the shared datasets live beside the repository only in development and CI")
        return path

    return locate
