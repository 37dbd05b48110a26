"""What an AMQP message means to the gateway: device, topic, user and tier; and the routing
keys of what the gateway publishes. Pure functions of the message's fields (sans-I/O).

Inbound, per message (first that applies):

* device: header ``device`` → property ``app_id`` → level ``device_key_level`` of the
  routing key (``.``-separated; only for a message routed by a named exchange, since through
  the default exchange the routing key is the queue's name) → the queue's name;
* topic: header ``topic`` (a valid MQTT topic name) → the routing key with ``.`` as ``/``
  (named exchanges only: ``medical.pump-7.vitals`` is classified like the MQTT topic
  ``medical/pump-7/vitals``) → ``amqp/<queue>/<device>`` (the device escaped into one
  level);
* user: property ``user_id``, which RabbitMQ checks against the publisher's login, so
  classification rules on ``username`` apply to it;
* tier: header ``tier`` naming a configured tier → ``priority_tiers`` by the AMQP
  ``priority`` → None: the classification's tier (device registry, then the rules, as for
  MQTT).
"""

from __future__ import annotations

import string
from collections.abc import Collection, Mapping
from typing import Any

from protocols.amqp.config import AmqpSection

_TOPIC_LEVEL_ESCAPES = str.maketrans({
    c: "".join(f"%{byte:02X}" for byte in c.encode())
    for c in ["%", "/", "+", "#", "\x00", "\x7f", *map(chr, range(1, 0x20))]
})
_KEY_WORD_ESCAPES = str.maketrans({c: f"%{ord(c):02X}" for c in "%.*#"})
MAX_ROUTING_KEY_BYTES = 255


def topic_level(value: str) -> str:
    """``value`` as one plain MQTT topic level (``/ + # %`` and controls percent-encoded)."""
    return value.translate(_TOPIC_LEVEL_ESCAPES)


def key_word(value: str) -> str:
    """``value`` as one routing-key word of a topic exchange (``. * # %`` percent-encoded)."""
    return value.translate(_KEY_WORD_ESCAPES)


def valid_topic(topic: str) -> bool:
    return (bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic
            and len(topic) <= 65535)


def _text(value: Any) -> str | None:
    if type(value) is str:
        return value or None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace") or None
    if type(value) is int:
        return str(value)
    return None


def template_fields(template: str) -> tuple[str, ...]:
    """The field names ``template`` uses, in order, each once."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


def render_key(template: str, fields: Mapping[str, str]) -> str:
    """Fill a routing key template: each field is one word (``topic``: its levels are words),
    escaped so that no value adds words or wildcards. At most 255 bytes (AMQP's limit):
    longer keys are cut at a character boundary."""
    words = {name: (".".join(key_word(level) for level in value.split("/"))
                    if name == "topic" else key_word(value))
             for name, value in fields.items()}
    key = template.format_map(words)
    encoded = key.encode()
    if len(encoded) > MAX_ROUTING_KEY_BYTES:
        key = encoded[:MAX_ROUTING_KEY_BYTES].decode("utf-8", "ignore")
    return key


class InboundMapper:
    """Maps one delivery's fields to (device, topic, username, tier); see the module doc."""

    __slots__ = ("_by_priority", "_device_header", "_key_level", "_tier_header", "_tiers",
                 "_topic_header")

    def __init__(self, section: AmqpSection, tiers: Collection[str]) -> None:
        self._device_header = section.device_header
        self._topic_header = section.topic_header
        self._tier_header = section.tier_header
        self._key_level = section.device_key_level
        self._tiers = frozenset(tiers)
        # One slot per AMQP priority (0-255): the tier it maps to, or None.
        table: list[str | None] = [None] * 256
        for entry in sorted(section.priority_tiers, key=lambda e: e.priority):
            for p in range(entry.priority, 256):
                table[p] = entry.tier
        self._by_priority = tuple(table)

    def map(self, queue: str, exchange: str, key: str, headers: Mapping[str, Any] | None,
            app_id: str | None, user_id: str | None, priority: int | None,
            ) -> tuple[str, str, str | None, str | None]:
        device = topic = tier = None
        if headers:
            if self._device_header is not None:
                device = _text(headers.get(self._device_header))
            if self._topic_header is not None:
                topic = _text(headers.get(self._topic_header))
                if topic is not None and not valid_topic(topic):
                    topic = None
            if self._tier_header is not None:
                tier = _text(headers.get(self._tier_header))
                if tier is not None and tier not in self._tiers:
                    tier = None
        routed = bool(exchange) and bool(key)
        if device is None:
            device = app_id or None
            if device is None and routed:
                words = key.split(".")
                if self._key_level < len(words) and words[self._key_level]:
                    device = words[self._key_level]
            if device is None:
                device = queue
        if topic is None:
            if routed:
                topic = key.replace(".", "/")
                if not valid_topic(topic):
                    topic = None
            if topic is None:
                topic = f"amqp/{topic_level(queue)}/{topic_level(device)}"
        if tier is None and priority is not None and 0 <= priority < 256:
            tier = self._by_priority[priority]
        return device, topic, user_id or None, tier
