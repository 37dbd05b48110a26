"""Classification: who sent a message, and how urgent it is.

Every message gets a device, tenant, tier, device class and region. The device registry
gives the base (device → tenant, tier, class, home region); then the first configured rule
whose conditions all hold overrides the fields it names. Rules match shell globs on device,
client id, username and tenant, and an MQTT topic filter on the topic.

Results depend only on (client id, username, topic), so the MQTT adapter caches them per
connection by topic: the steady state costs one dict lookup per message.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import NamedTuple

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

    def classify(self, client_id: str, username: str | None, topic: str) -> Classification:
        device = self.device_of(client_id, topic)
        s = self.section
        tenant, tier, device_class, region = s.default_tenant, s.default_tier, "", self.region
        info = self.registry.record(device)
        if info is not None:
            tenant = info.tenant or tenant
            tier = info.tier or tier
            device_class = info.device_class or device_class
            region = info.region or region
        for rule, topic_filter in self.rules:
            if _matches(rule.match, topic_filter, device, client_id, username, topic, tenant):
                tenant = rule.tenant or tenant
                tier = rule.tier or tier
                device_class = rule.device_class or device_class
                region = rule.region or region
                break
        if tier not in self.tiers:  # a registry naming a tier this config lacks
            tier = s.default_tier
        return Classification(device, tenant, tier, device_class, region)
