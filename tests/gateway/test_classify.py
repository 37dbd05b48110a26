"""Classification: registry first, then the first matching rule; topic filters per the spec."""

from __future__ import annotations

from gateway.classify import Classifier
from gateway.config import ClassifySection, Match, Rule
from gateway.registry import DeviceInfo, DeviceRegistry

TIERS = ["critical", "premium", "standard", "bulk"]


def classifier(rules: list[Rule] | None = None, registry: DeviceRegistry | None = None,
               **section: object) -> Classifier:
    return Classifier(ClassifySection(rules=rules or [], **section),  # type: ignore[arg-type]
                      registry or DeviceRegistry.empty(), "eu-west", TIERS)


def test_defaults_when_nothing_matches() -> None:
    c = classifier().classify("dev-1", None, "x/y")
    assert (c.device, c.tenant, c.tier, c.device_class, c.region) == (
        "dev-1", "default", "standard", "", "eu-west")


def test_first_matching_rule_wins() -> None:
    rules = [
        Rule(match=Match(topic="medical/#"), tier="critical", device_class="pump"),
        Rule(match=Match(topic="medical/#"), tier="bulk"),
        Rule(match=Match(username="acme-*"), tenant="acme", tier="premium"),
    ]
    c = classifier(rules)
    assert c.classify("d", None, "medical/p/1").tier == "critical"
    assert c.classify("d", None, "medical/p/1").device_class == "pump"
    acme = c.classify("d", "acme-ops", "factory/1")
    assert (acme.tenant, acme.tier) == ("acme", "premium")
    assert c.classify("d", "other", "factory/1").tier == "standard"


def test_all_conditions_of_a_rule_must_hold() -> None:
    rules = [Rule(match=Match(device="valve-*", topic="safety/#", client_id="valve-*"),
                  tier="critical")]
    c = classifier(rules)
    assert c.classify("valve-1", None, "safety/x").tier == "critical"
    assert c.classify("valve-1", None, "other/x").tier == "standard"
    assert c.classify("pump-1", None, "safety/x").tier == "standard"


def test_registry_gives_the_base_and_rules_refine_it() -> None:
    registry = DeviceRegistry.from_devices({
        "pump-7": DeviceInfo(tenant="clinic", tier="premium", device_class="infusion",
                             region="eu-central", attributes={"site": "ward-3"}),
        "odd-1": DeviceInfo(tenant="x", tier="platinum", device_class="", region="",
                            attributes={}),
    })
    rules = [Rule(match=Match(tenant="clinic", topic="alarm/#"), tier="critical")]
    c = classifier(rules, registry)
    base = c.classify("pump-7", None, "telemetry/1")
    assert (base.tenant, base.tier, base.device_class, base.region) == (
        "clinic", "premium", "infusion", "eu-central")
    assert c.classify("pump-7", None, "alarm/1").tier == "critical"
    # A registry naming a tier this config does not have falls back to the default tier.
    assert c.classify("odd-1", None, "t").tier == "standard"


def test_device_id_from_a_topic_level() -> None:
    c = classifier(device_id="topic", device_topic_level=1)
    assert c.classify("gateway-box", None, "devices/sensor-42/temp").device == "sensor-42"
    # Too short a topic falls back to the client id.
    assert c.classify("gateway-box", None, "devices").device == "gateway-box"


def test_payload_field_rules_decide_per_message_in_rule_order() -> None:
    rules = [
        Rule(match=Match(topic="factory/#", payload={"alarm": True}), tier="critical"),
        Rule(match=Match(topic="factory/#", payload={"mode": "maintenance"}), tier="bulk"),
        Rule(match=Match(topic="factory/#"), tier="premium"),
        Rule(match=Match(topic="factory/#", payload={"alarm": False}), tier="bulk"),
    ]
    c = classifier(rules)
    assert c.classify("d", None, "factory/1", {"alarm": True, "t": 3}).tier == "critical"
    assert c.classify("d", None, "factory/1", {"mode": "maintenance"}).tier == "bulk"
    # The first rule without payload conditions ends the search: later rules never apply.
    assert c.classify("d", None, "factory/1", {"alarm": False}).tier == "premium"
    assert c.classify("d", None, "factory/1", None).tier == "premium"  # not JSON
    # JSON 1 is not true.
    assert c.classify("d", None, "factory/1", {"alarm": 1}).tier == "premium"
    # Topics no payload rule can apply to are decided once, without the payload.
    assert c.plan("d", None, "other/1") == c.classify("d", None, "other/1")


def test_payload_rules_fall_back_to_the_registry_and_defaults() -> None:
    c = classifier([Rule(match=Match(payload={"sos": True}), tier="critical")])
    assert c.classify("d", None, "any", {"sos": True}).tier == "critical"
    assert c.classify("d", None, "any", {"sos": False}).tier == "standard"
