"""The MQTT topic layout (see docs/protocol.md for QoS and retained flags per topic).

Per edge: `fl/{edge}/...` carries rounds and models down to devices and updates/status up. Toward the cloud:
`fl/cloud/...`. Identifiers are restricted so that they can never inject topic levels or wildcards.
"""

from __future__ import annotations

import re

from protocol.errors import ProtocolError, Reason

ROOT = "fl"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_id(value: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(Reason.BAD_VALUE, f"identifier {value!r} must match {_ID.pattern}")
    return value


# device <-> edge
def round_topic(edge: str) -> str:
    return f"{ROOT}/{check_id(edge)}/round"


def model_topic(edge: str) -> str:
    return f"{ROOT}/{check_id(edge)}/model"


def update_topic(edge: str, device: str) -> str:
    return f"{ROOT}/{check_id(edge)}/updates/{check_id(device)}"


def status_topic(edge: str, device: str) -> str:
    return f"{ROOT}/{check_id(edge)}/status/{check_id(device)}"


def ack_topic(edge: str, device: str) -> str:
    return f"{ROOT}/{check_id(edge)}/ack/{check_id(device)}"


def bundle_manifest_topic(edge: str, device_class: str) -> str:
    return f"{ROOT}/{check_id(edge)}/bundles/{check_id(device_class)}/manifest"


def bundle_chunk_topic(edge: str, device_class: str, index: int) -> str:
    return f"{ROOT}/{check_id(edge)}/bundles/{check_id(device_class)}/chunk/{int(index)}"


def secagg_topic(edge: str, step: str, device: str | None = None) -> str:
    base = f"{ROOT}/{check_id(edge)}/secagg/{check_id(step)}"
    return f"{base}/{check_id(device)}" if device is not None else base


# edge <-> cloud
CLOUD = "cloud"   # the cloud's id; as the SecAgg server of the edge tier: secagg_topic(CLOUD, step[, edge])
CLOUD_ROUND = f"{ROOT}/cloud/round"
CLOUD_MODEL = f"{ROOT}/cloud/model"


def aggregate_topic(edge: str) -> str:
    return f"{ROOT}/cloud/aggregates/{check_id(edge)}"


def edge_status_topic(edge: str) -> str:
    return f"{ROOT}/cloud/status/{check_id(edge)}"


def shared(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: replicas of one edge split `topic_filter` round-robin."""
    return f"$share/{check_id(group)}/{topic_filter}"


def last_level(topic: str) -> str:
    """The sender id that the topic names (checked against the id inside the signed message)."""
    return check_id(topic.rsplit("/", 1)[-1])
