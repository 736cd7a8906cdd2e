"""What an engine asks its MQTT shell to publish: engines (edge, cloud) stay free of MQTT and return these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Publication:
    topic: str
    payload: bytes
    retain: bool = False
    batch: int | None = None    # an edge outbox entry: mark_published(batch) once the broker has it
