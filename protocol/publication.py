"""What an engine asks its MQTT shell to publish: engines (edge, cloud) stay free of MQTT and return these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Publication:
    """One message for the MQTT shell to publish: what the edge and cloud engines return instead of touching MQTT."""

    topic: str
    payload: bytes
    retain: bool = False
    batch: int | None = None    # an edge outbox entry: sent again until the cloud's receipt for it
