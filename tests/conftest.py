"""Shared fixtures: a real private Mosquitto per test, paths to shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

from fediomt.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto on a free loopback port, persistence on; `broker.restart()` keeps the port."""
    with MosquittoBroker(workdir=tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture
def shared_dataset():
    """Path of a dataset under ../shared/datasets, or a clear skip where this checkout has none."""

    def locate(name: str) -> Path:
        path = SHARED / "datasets" / name
        if not path.exists():
            pytest.skip(f"{path} is absent: the shared datasets live beside the repository only in development and CI")
        return path

    return locate
