"""The MQTT topic layout (see docs/protocol.md for QoS and retained flags per topic): the only place that spells a
topic, so subscriptions, ACLs and bridges cannot drift from what the tiers publish (tests/test_topics.py checks).

Per edge: `fl/{edge}/...` carries rounds and models down to devices and updates/status up. Toward the cloud:
`fl/cloud/...`; the ledger's replication: `fl/ledger/...`. Identifiers are restricted so that they can never inject
topic levels or wildcards; a wildcard level is one of the `Wildcard` constants below, never a plain string.
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


class Wildcard(str):
    """A level that stands for many ids (subscriptions, ACL patterns). Only these constants pass where an id is
    expected: a "+" read from the wire or a config is a plain str and fails check_id."""


ANY = Wildcard("+")        # one level, in subscription filters and ACLs
CLIENT = Wildcard("%u")    # Mosquitto ACL `pattern`: the connected client's username (its certificate CN)


def _level(value: str) -> str:
    return value if isinstance(value, Wildcard) else check_id(value)


def subtree(*levels: str) -> str:
    """`fl/{levels...}/#`: every topic below, for ACLs and bridges (subtree(edge, "bundles"), subtree(CLOUD))."""
    return "/".join([ROOT, *map(_level, levels), "#"])


def matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` falls under `topic_filter` (MQTT's + and # rules)."""
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or level not in ("+", have[i]):
            return False
    return len(want) == len(have)


# device <-> edge
def round_topic(edge: str) -> str:
    return f"{ROOT}/{_level(edge)}/round"


def model_topic(edge: str) -> str:
    return f"{ROOT}/{_level(edge)}/model"


def model_full_topic(edge: str) -> str:
    """The edge's latest model version in full (retained, unsigned): only devices catching up subscribe
    (protocol.global_model.catch_up)."""
    return f"{ROOT}/{_level(edge)}/model/full"


def update_topic(edge: str, device: str) -> str:
    return f"{ROOT}/{_level(edge)}/updates/{_level(device)}"


def status_topic(edge: str, device: str) -> str:
    return f"{ROOT}/{_level(edge)}/status/{_level(device)}"


def ack_topic(edge: str, device: str) -> str:
    return f"{ROOT}/{_level(edge)}/ack/{_level(device)}"


# The one device-class vocabulary: a device's `[capability] compute_class`, the OTA class it follows (`[ota]
# device_class`, by default its compute class), `fediomt models build --class`, `fediomt push --class` and the
# distiller's student targets all take these names (docs/distillation.md "Device classes").
DEVICE_CLASSES = ("wearable", "phone", "pi", "server")


def check_class(value: str) -> str:
    """A device class from DEVICE_CLASSES (a Wildcard passes, for subscriptions and ACLs)."""
    if isinstance(value, Wildcard) or value in DEVICE_CLASSES:
        return value
    raise ProtocolError(Reason.BAD_VALUE, f"device class {value!r} not in {', '.join(DEVICE_CLASSES)}")


def bundle_manifest_topic(edge: str, device_class: str) -> str:
    return f"{ROOT}/{_level(edge)}/bundles/{_level(device_class)}/manifest"


def bundle_chunk_topic(edge: str, device_class: str, index: int) -> str:
    return f"{ROOT}/{_level(edge)}/bundles/{_level(device_class)}/chunk/{int(index)}"


def prediction_topic(edge: str, device: str) -> str:
    """An inferring device's predictions (QoS 0, not retained), when its `[inference] publish` is on: patient data,
    for a broker on the device's own or the ward's network only (docs/device.md "Inference")."""
    return f"{ROOT}/{_level(edge)}/predictions/{_level(device)}"


def secagg_topic(edge: str, step: str, device: str | None = None) -> str:
    base = f"{ROOT}/{_level(edge)}/secagg/{_level(step)}"
    return f"{base}/{_level(device)}" if device is not None else base


# edge <-> cloud
CLOUD = "cloud"   # the cloud's id; as the SecAgg server of the edge tier: secagg_topic(CLOUD, step[, edge])
CLOUD_ROUND = f"{ROOT}/{CLOUD}/round"
CLOUD_MODEL = f"{ROOT}/{CLOUD}/model"


def aggregate_topic(edge: str) -> str:
    return f"{ROOT}/{CLOUD}/aggregates/{_level(edge)}"


def receipt_topic(edge: str) -> str:
    """cloud -> edge: AggregateReceipt for each of the edge's aggregates the cloud holds durably or refused for good;
    the edge resends an aggregate until its receipt arrives (edge.gateway)."""
    return f"{ROOT}/{CLOUD}/receipts/{_level(edge)}"


def edge_status_topic(edge: str) -> str:
    return f"{ROOT}/{CLOUD}/status/{_level(edge)}"


# ledger replication (ledger/replication.py): the cloud proposes, validators vote, replicas catch up
LEDGER = "ledger"
LEDGER_PROPOSALS = f"{ROOT}/{LEDGER}/proposals"   # cloud -> validators
LEDGER_BLOCKS = f"{ROOT}/{LEDGER}/blocks"         # cloud -> all: committed blocks (retained: the last one)


def ledger_vote_topic(validator: str) -> str:
    """validator -> cloud: its Vote on a proposal."""
    return f"{ROOT}/{LEDGER}/signatures/{_level(validator)}"


def ledger_sync_topic(validator: str) -> str:
    """replica -> cloud: "send me blocks from index N"."""
    return f"{ROOT}/{LEDGER}/sync/{_level(validator)}"


def ledger_catchup_topic(validator: str) -> str:
    """cloud -> replica: a batch of stored blocks."""
    return f"{ROOT}/{LEDGER}/catchup/{_level(validator)}"


def shared(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: replicas of one edge split `topic_filter` round-robin."""
    return f"$share/{check_id(group)}/{topic_filter}"


def last_level(topic: str) -> str:
    """The sender id that the topic names (checked against the id inside the signed message)."""
    return check_id(topic.rsplit("/", 1)[-1])
