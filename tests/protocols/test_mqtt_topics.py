"""MQTT topic filters as the spec defines them (MQTT 5.0 section 4.7)."""

from __future__ import annotations

import pytest

from protocols.mqtt.topics import compile_topic_filter


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a.b", "aXb", False),  # no regex leaks through
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("+/b", "a/b", True),
    ("a/+/c", "a//c", True),  # empty levels are levels
    ("a/#", "a", True),  # '#' also matches the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "$SYS/uptime", False),  # $-topics never match a leading wildcard
    ("+/uptime", "$SYS/uptime", False),
    ("$SYS/#", "$SYS/uptime", True),
])
def test_topic_filters(topic_filter: str, topic: str, expected: bool) -> None:
    assert (compile_topic_filter(topic_filter).match(topic) is not None) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a+/b", "a/b#"])
def test_invalid_topic_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid topic filter"):
        compile_topic_filter(bad)
