"""Classification: who sent a message, and how urgent it is.

Every message gets a device, tenant, tier, device class and region. The device registry
gives the base (device → tenant, tier, class, home region); then the first configured rule
whose conditions all hold overrides the fields it names. Rules match shell globs on device,
client id, username and tenant, and an MQTT topic filter on the topic.

Without payload conditions, results depend only on (client id, username, topic), so the
MQTT adapter caches them per connection by topic: the steady state costs one dict lookup per
message. A topic that a rule with payload conditions (``match.payload``) could apply to gets
a ``PayloadRules`` instead: the candidate rules in order, each with its result worked out,
so that per message only the decoded payload's fields are compared.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from gateway.config import ClassifySection, Match, Rule
from gateway.registry import DeviceRegistry
from protocols.mqtt.topics import compile_topic_filter


class Classification(NamedTuple):
    device: str
    tenant: str
    tier: str
    device_class: str
    region: str


def _glob(pattern: str | None, value: str | None) -> bool:
    return pattern is None or (value is not None and fnmatchcase(value, pattern))


def _matches(m: Match, topic_filter: re.Pattern[str] | None, device: str, client_id: str,
             username: str | None, topic: str, tenant: str) -> bool:
    return (
        _glob(m.device, device)
        and _glob(m.client_id, client_id)
        and _glob(m.username, username)
        and _glob(m.tenant, tenant)
        and (topic_filter is None or topic_filter.match(topic) is not None)
    )


_MISSING = object()


def _payload_holds(conditions: dict[str, Any], data: dict[str, Any] | None) -> bool:
    if data is None:
        return False
    for field, wanted in conditions.items():
        value = data.get(field, _MISSING)
        # JSON true is not 1: booleans only equal booleans.
        if value != wanted or (type(value) is bool) != (type(wanted) is bool):
            return False
    return True


class PayloadRules:
    """One topic's candidate rules whose choice depends on the payload; first match wins."""

    __slots__ = ("base", "candidates")

    def __init__(self, base: Classification,
                 candidates: list[tuple[dict[str, Any] | None, Classification]]) -> None:
        self.base = base
        self.candidates = candidates

    def resolve(self, data: dict[str, Any] | None) -> Classification:
        for conditions, result in self.candidates:
            if conditions is None or _payload_holds(conditions, data):
                return result
        return self.base


class Classifier:
    def __init__(self, section: ClassifySection, registry: DeviceRegistry, region: str,
                 tiers: list[str]) -> None:
        self.section = section
        self.tiers = frozenset(tiers)
        self.registry = registry
        self.region = region
        self.rules: list[tuple[Rule, re.Pattern[str] | None]] = [
            (rule, compile_topic_filter(rule.match.topic) if rule.match.topic else None)
            for rule in section.rules
        ]

    def device_of(self, client_id: str, topic: str) -> str:
        if self.section.device_id == "topic":
            levels = topic.split("/")
            level = self.section.device_topic_level
            if level < len(levels) and levels[level]:
                return levels[level]
        return client_id

    def plan(self, client_id: str, username: str | None, topic: str
             ) -> Classification | PayloadRules:
        """The classification of this sender and topic, or, when a rule with payload
        conditions could apply, the ``PayloadRules`` that decide per message."""
        device = self.device_of(client_id, topic)
        s = self.section
        base = Classification(device, s.default_tenant, s.default_tier, "", self.region)
        info = self.registry.record(device)
        if info is not None:
            base = self._checked(Classification(
                device, info.tenant or base.tenant, info.tier or base.tier,
                info.device_class or base.device_class, info.region or base.region))
        candidates: list[tuple[dict[str, Any] | None, Classification]] = []
        for rule, topic_filter in self.rules:
            if not _matches(rule.match, topic_filter, device, client_id, username, topic,
                            base.tenant):
                continue
            result = self._checked(Classification(
                device, rule.tenant or base.tenant, rule.tier or base.tier,
                rule.device_class or base.device_class, rule.region or base.region))
            if rule.match.payload is None:
                if not candidates:
                    return result
                candidates.append((None, result))
                break
            candidates.append((dict(rule.match.payload), result))
        return PayloadRules(base, candidates) if candidates else base

    def classify(self, client_id: str, username: str | None, topic: str,
                 data: dict[str, Any] | None = None) -> Classification:
        plan = self.plan(client_id, username, topic)
        return plan if isinstance(plan, Classification) else plan.resolve(data)

    def _checked(self, c: Classification) -> Classification:
        if c.tier not in self.tiers:  # a registry naming a tier this config lacks
            return c._replace(tier=self.section.default_tier)
        return c
