"""Ending a run on a broker: what `fediomt cloud|edge|device new-run` do there (docs/protocol.md "Runs").

A run leaves state on the brokers: retained rounds, models and statuses, and each daemon's persistent session
with the QoS 1 messages queued for it. `clear_broker` removes what one client owns: it connects with the client's
own id and a clean start whose session expires at once (the broker discards the old session and its queue),
publishes an empty retained message on each topic (the broker deletes the retained one), and disconnects. The run
id in every round and model (protocol.messages) is the second line of defence: whatever a broker still holds of
an older run is ignored by the edges and devices.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from protocol.mqtt import ConnectionConfig, connect_properties, new_client


class BrokerUnreachable(RuntimeError):
    """The broker did not accept the connection (or did not acknowledge a publish) in time."""


@dataclass(frozen=True)
class Cleared:
    """What clear_broker did: the topics whose retained message is gone, and the session it discarded."""

    host: str
    port: int
    client_id: str
    topics: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"broker": f"{self.host}:{self.port}", "session_discarded": self.client_id,
                "retained_cleared": list(self.topics)}


def clear_broker(cfg: ConnectionConfig, client_id: str, topics: list[str], timeout_s: float = 10.0) -> Cleared:
    """Discard `client_id`'s persistent session and the retained messages of `topics` on `cfg`'s broker."""
    client = new_client(replace(cfg, session_expiry_s=0), client_id)
    connected, result = threading.Event(), {}

    def on_connect(_c, _u, _flags, reason, _props) -> None:
        result["reason"] = reason
        connected.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: connected.set()
    try:
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=True,
                       properties=connect_properties(replace(cfg, session_expiry_s=0)))
    except OSError as exc:
        raise BrokerUnreachable(f"{cfg.host}:{cfg.port}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(timeout_s) or result.get("reason") is None or result["reason"].is_failure:
            raise BrokerUnreachable(f"{cfg.host}:{cfg.port} refused or did not answer the connection as {client_id}"
                                    f" ({result.get('reason', 'no CONNACK')})")
        for topic in topics:
            info = client.publish(topic, b"", qos=1, retain=True)
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise BrokerUnreachable(f"{cfg.host}:{cfg.port} did not acknowledge clearing {topic}")
    finally:
        client.disconnect()
        client.loop_stop()
    return Cleared(cfg.host, cfg.port, client_id, tuple(topics))


def report_new_run(out: dict, clears: list[Callable[[], Cleared]] | None, command: str, done: str) -> int:
    """What every `new-run` prints: its JSON report after clearing its brokers (`clears` None: --offline), and exit
    1 with one line naming the unreachable broker when the local part is `done` but a broker could not be cleared."""
    if clears is not None:
        try:
            out["brokers"] = [clear().as_dict() for clear in clears]
        except BrokerUnreachable as exc:
            print(json.dumps(out))
            print(f"{command}: {done}, but the broker was not cleared: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(out))
    return 0
