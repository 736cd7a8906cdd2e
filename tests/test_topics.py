"""Topics come from protocol/topics.py only: no other module spells an `fl/...` topic, and wildcard levels are the
module's Wildcard constants, never strings from the wire or a config."""

from __future__ import annotations

import ast

import pytest

from protocol import topics
from protocol.errors import ProtocolError

from .harness import REPO

PACKAGES = ("protocol", "device", "edge", "cloud", "ledger", "firmware_models", "experiments", "fediomt")
PREFIXES = (f"{topics.ROOT}/", "$share/")


def topic_literals(source: str) -> list[int]:
    """Lines of string constants and f-strings that start a topic (`fl/...`, `$share/...` or `{ROOT}/...`)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if (isinstance(first, ast.Constant) and str(first.value).startswith(PREFIXES)) or (
                    isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name)
                    and first.value.id == "ROOT"):
                hits.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PREFIXES):
            hits.append(node.lineno)
    return sorted(set(hits))


def test_the_checker_finds_every_way_of_spelling_a_topic():
    source = 'A = "fl/x/round"\nB = f"fl/{e}/model"\nC = f"{ROOT}/cloud/y"\nD = f"$share/{g}/fl/+"\nE = "flag"\n'
    assert topic_literals(source) == [1, 2, 3, 4]


def test_no_module_outside_protocol_topics_builds_a_topic():
    own = REPO / "protocol" / "topics.py"
    found = {f"{path.relative_to(REPO)}:{line}"
             for package in PACKAGES for path in sorted((REPO / package).rglob("*.py")) if path != own
             for line in topic_literals(path.read_text())}
    assert not found, f"topic strings outside protocol/topics.py: {sorted(found)}"


def test_wildcards_only_from_the_module_constants():
    assert topics.update_topic("e1", topics.ANY) == "fl/e1/updates/+"
    assert topics.secagg_topic("e1", topics.ANY, topics.CLIENT) == "fl/e1/secagg/+/%u"
    assert topics.subtree(topics.ANY, "bundles") == "fl/+/bundles/#"
    for hostile in ("+", "#", "%u", "a/b"):  # a plain string, as read from the wire or a config file
        with pytest.raises(ProtocolError):
            topics.update_topic("e1", hostile)
        with pytest.raises(ProtocolError):
            topics.ledger_vote_topic(hostile)
    with pytest.raises(ProtocolError):
        topics.last_level(topics.status_topic("e1", topics.ANY))


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("fl/cloud/aggregates/+", "fl/cloud/aggregates/e1", True),
    ("fl/cloud/aggregates/+", "fl/cloud/aggregates/e1/x", False),
    ("fl/cloud/aggregates/+", "fl/cloud/aggregates", False),
    ("fl/+/status/+", "fl/e1/status/d1", True),
    ("fl/+/status/+", "fl/e1/updates/d1", False),
    ("fl/cloud/#", "fl/cloud/round", True),
    ("fl/cloud/#", "fl/cloudy/round", False),
])
def test_matches_follows_mqtt_filter_rules(topic_filter, topic, expected):
    assert topics.matches(topic_filter, topic) is expected
