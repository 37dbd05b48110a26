"""The AMQP side without a broker: config, what a message means, routing keys, the config
``--amqp-url`` runs, and the sink's options."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.urls import display_url
from protocols.amqp import config as amqp_config
from protocols.amqp.client import Endpoint
from protocols.amqp.config import AmqpSection, IngestQueue, PriorityTier, check_tiers
from protocols.amqp.link import Backoff
from protocols.amqp.mapping import (
    InboundMapper,
    key_word,
    render_key,
    template_fields,
    topic_level,
)
from protocols.amqp.service import SINK_NAME, prefetch_for, with_amqp
from tests.conftest import DEFAULT_TOML

TIERS = ["critical", "premium", "standard", "bulk"]


class Wrapper(msgspec.Struct, forbid_unknown_fields=True):
    amqp: AmqpSection


def decode(toml: str) -> AmqpSection:
    return msgspec.toml.decode(toml, type=Wrapper).amqp


# -- config ---------------------------------------------------------------------------------

def test_the_documented_example_decodes() -> None:
    doc = amqp_config.__doc__ or ""
    example = doc[doc.index("    [amqp]"):].rstrip()
    section = decode("\n".join(line[4:] for line in example.splitlines()))
    assert section.url == "amqp://gateway:secret@rabbit.example:5672/iot"
    assert section.queues[0].bindings[0].exchange == "iotgw.ingress"
    assert [p.tier for p in section.priority_tiers] == ["critical", "premium"]
    assert section.processed.exchange == "iotgw.processed"


def test_defaults_are_off_and_name_the_issue_s_queue_and_exchanges() -> None:
    section = AmqpSection()
    assert section.url is None
    assert [q.name for q in section.queues] == ["iotgw.ingest"]
    assert section.queues[0].declare_arguments() == {"x-max-priority": 9}
    assert section.processed.exchange == "iotgw.processed"
    assert section.alerts.exchange == "iotgw.alerts"


def test_queue_arguments() -> None:
    quorum = IngestQueue(name="q", type="quorum", max_priority=None,
                         arguments={"x-delivery-limit": 1000})
    assert quorum.declare_arguments() == {"x-queue-type": "quorum", "x-delivery-limit": 1000}
    assert IngestQueue(max_priority=None).declare_arguments() == {}


@pytest.mark.parametrize(("toml", "message"), [
    ('url = "http://x"', "scheme must be amqp"),
    ('url = "amqp://"', "no host"),
    ('url = "amqp://h:99999/"', "url:"),
    ('queues = []', "at least one queue"),
    ('queues = [{ name = "a" }, { name = "a" }]', "listed twice"),
    ('queues = [{ name = "q", type = "quorum" }]', "quorum queues have no x-max-priority"),
    ('priority_tiers = [{ priority = 3, tier = "a" }, { priority = 3, tier = "b" }]',
     "priority is listed twice"),
    ('priority_tiers = [{ priority = 300, tier = "a" }]', "<= 255"),
    ('reconnect_initial_s = 5.0\nreconnect_max_s = 1.0', "reconnect_max_s"),
    ('refused_delay_s = 2.0\nrefused_max_delay_s = 1.0', "refused_max_delay_s"),
    ('processed = { exchange = "x", routing_key = "{nope}" }', "processed.routing_key"),
    ('alerts = { exchange = "x", routing_key = "{tier}.{severity}.{x}" }', "alerts.routing_key"),
    ('prefetch = 0', ">= 1"),
    ('bogus = 1', "unknown field"),
])
def test_bad_sections_say_what_is_wrong(toml: str, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message.replace("{", r"\{")):
        decode("[amqp]\n" + toml)


def test_priority_tiers_must_name_tiers() -> None:
    section = AmqpSection(priority_tiers=[PriorityTier(priority=5, tier="gold")])
    with pytest.raises(ValueError, match=r"amqp.priority_tiers\[0\].tier: unknown tier 'gold'"):
        check_tiers(section, TIERS)
    check_tiers(AmqpSection(priority_tiers=[PriorityTier(priority=5, tier="bulk")]), TIERS)


def test_prefetch_follows_the_gateway_s_capacity_unless_set() -> None:
    assert prefetch_for(AmqpSection(), 512, 4) == 2048
    assert prefetch_for(AmqpSection(), 65536, 8) == 65535
    assert prefetch_for(AmqpSection(prefetch=100), 512, 4) == 100


# -- inbound mapping ------------------------------------------------------------------------

def mapper(**settings: Any) -> InboundMapper:
    return InboundMapper(AmqpSection(**settings), TIERS)


def test_the_device_comes_from_the_header_then_app_id_then_routing_key_then_queue() -> None:
    m = mapper()
    assert m.map("q", "ex", "a.b.c", {"device": "hdr"}, "app", None, None)[0] == "hdr"
    assert m.map("q", "ex", "a.b.c", {"device": b"raw"}, None, None, None)[0] == "raw"
    assert m.map("q", "ex", "a.b.c", {"other": 1}, "app", None, None)[0] == "app"
    assert m.map("q", "ex", "a.b.c", None, None, None, None)[0] == "b"
    assert m.map("q", "ex", "a", None, None, None, None)[0] == "q"
    # Through the default exchange the routing key is the queue's name: not a device.
    assert m.map("q", "", "q", None, None, None, None)[0] == "q"
    assert mapper(device_key_level=0).map("q", "ex", "a.b", None, None, None, None)[0] == "a"
    assert mapper(device_header=None).map("q", "", "q", {"device": "d"}, None, None,
                                          None)[0] == "q"


def test_the_topic_comes_from_the_header_then_the_routing_key_then_the_queue() -> None:
    m = mapper()
    assert m.map("q", "ex", "a.b", {"topic": "x/y"}, None, None, None)[1] == "x/y"
    assert m.map("q", "ex", "medical.p-1.vitals", None, None, None, None)[1] == \
        "medical/p-1/vitals"
    assert m.map("q", "", "q", {"device": "d/1+#"}, None, None, None)[1] == \
        "amqp/q/d%2F1%2B%23"
    # Wildcards cannot be topic names: the fallback is used.
    assert m.map("q", "ex", "a.#", {"device": "d"}, None, None, None)[1] == "amqp/q/d"
    assert m.map("q", "", "q", {"topic": "a/+/b", "device": "d"}, None, None, None)[1] == \
        "amqp/q/d"


def test_the_user_is_the_checked_user_id() -> None:
    assert mapper().map("q", "", "q", None, None, "alice", None)[2] == "alice"
    assert mapper().map("q", "", "q", None, None, "", None)[2] is None


def test_the_tier_comes_from_the_header_then_the_priority() -> None:
    m = mapper(priority_tiers=[PriorityTier(priority=8, tier="critical"),
                               PriorityTier(priority=4, tier="premium")])
    tier = [m.map("q", "", "q", None, None, None, p)[3] for p in (None, 0, 3, 4, 7, 8, 9, 255)]
    assert tier == [None, None, None, "premium", "premium", "critical", "critical", "critical"]
    assert m.map("q", "", "q", {"tier": "bulk"}, None, None, 9)[3] == "bulk"
    assert m.map("q", "", "q", {"tier": "gold"}, None, None, 9)[3] == "critical"
    assert mapper(tier_header=None).map("q", "", "q", {"tier": "bulk"}, None, None, 9)[3] \
        is None


# -- routing keys and names ------------------------------------------------------------------

def test_routing_keys_fill_each_field_as_one_escaped_word() -> None:
    assert template_fields("{tenant}.{tier}.{device}.{tier}") == ("tenant", "tier", "device")
    key = render_key("{tenant}.{tier}.{device}",
                     {"tenant": "acme", "tier": "critical", "device": "a.b*#%"})
    assert key == "acme.critical.a%2Eb%2A%23%25"
    assert render_key("r.{topic}", {"topic": "a/b.c/d"}) == "r.a.b%2Ec.d"
    assert len(render_key("{device}", {"device": "é" * 300}).encode()) <= 255
    assert key_word("plain-id_1") == "plain-id_1"
    assert topic_level("a/b") == "a%2Fb"


def test_endpoints_come_from_urls_and_logs_hide_credentials() -> None:
    e = Endpoint("amqps://u%40x:s%2Fcret@h:5999/v%2Fhost?heartbeat=5&name=n", 15, "gw")
    assert (e.host, e.port, e.username, e.password, e.vhost) == ("h", 5999, "u@x", "s/cret",
                                                                 "v/host")
    assert (e.heartbeat, e.name, e.ssl is not None) == (5, "n", True)
    d = Endpoint("amqp://h", 15, "gw ingest")
    assert (d.port, d.username, d.password, d.vhost, d.heartbeat, d.name, d.ssl) == (
        5672, "guest", "guest", "/", 15, "gw ingest", None)
    assert display_url("amqp://u:secret@h:5672/v?token=t") == "amqp://h:5672/v"


def test_backoff_doubles_up_to_its_limit_with_jitter_and_resets() -> None:
    backoff = Backoff(1.0, 4.0)
    delays = [backoff.next_delay() for _ in range(5)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(2.0 <= d <= 4.0 for d in delays[2:])
    backoff.reset()
    assert backoff.next_delay() <= 1.0


# -- what --amqp-url runs ----------------------------------------------------------------------

def test_with_amqp_routes_processed_results_to_an_amqp_sink() -> None:
    config = parse_config(DEFAULT_TOML)
    section = AmqpSection(url="amqp://g:g@rabbit:5672/")
    wired = with_amqp(config, section=section)
    sink = wired.sinks[SINK_NAME]
    assert sink.type == "amqp"
    assert sink.options["url"] == "amqp://g:g@rabbit:5672/"
    assert sink.options["exchange"] == "iotgw.processed"
    assert sink.options["routing_key"] == "{tenant}.{tier}.{device}"
    route = next(s for s in wired.pipelines[0].stages if s["type"] == "route")
    assert route["sinks"] == ["lake", SINK_NAME]
    assert with_amqp(config) is config  # AMQP off: nothing changes


def test_with_amqp_keeps_a_config_s_own_amqp_sinks_and_gives_them_the_url() -> None:
    text = DEFAULT_TOML.replace('sinks = ["lake"] }', 'sinks = ["lake", "out"] }') + \
        '\n[sinks.out]\ntype = "amqp"\noptions = { exchange = "mine" }\n'
    config = parse_config(text)
    wired = with_amqp(config, section=AmqpSection(url="amqp://h/"))
    assert set(wired.sinks) == {"lake", "out"}
    assert wired.sinks["out"].options == {"exchange": "mine", "url": "amqp://h/"}
    assert wired.pipelines == config.pipelines


def test_with_amqp_adds_to_route_rules_but_not_to_empty_lists() -> None:
    text = DEFAULT_TOML.replace(
        '{ type = "route", sinks = ["lake"] }',
        '{ type = "route", sinks = ["lake"], rules = [{ match = { tier = "bulk" }, sinks = [] },'
        ' { match = { tier = "premium" }, sinks = ["lake"] }] }')
    wired = with_amqp(parse_config(text), section=AmqpSection(url="amqp://h/"))
    route = next(s for s in wired.pipelines[0].stages if s["type"] == "route")
    assert [r["sinks"] for r in route["rules"]] == [[], ["lake", SINK_NAME]]


def test_with_amqp_refuses_a_taken_sink_name_and_a_bad_url() -> None:
    text = DEFAULT_TOML + '\n[sinks.amqp]\ntype = "null"\n'
    with pytest.raises(ConfigError, match=r"sinks\.amqp: the name is taken"):
        with_amqp(parse_config(text), section=AmqpSection(url="amqp://h/"))
    with pytest.raises(ConfigError, match="--amqp-url: url: the scheme must be amqp"):
        with_amqp(parse_config(DEFAULT_TOML), "http://h/")


# -- the sink's options --------------------------------------------------------------------------

def test_the_sink_needs_a_url_and_a_known_template() -> None:
    from gateway.metrics import Metrics
    from gateway.sinks import SINKS, build_sink
    from protocols.amqp.sink import AmqpSink

    patched = dict(SINKS, amqp=AmqpSink)
    metrics = Metrics()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gateway.sinks.SINKS", patched)
        with pytest.raises(ConfigError, match=r"sinks.out: options.url: required"):
            build_sink("out", "amqp", {}, metrics)
        with pytest.raises(ConfigError, match=r"options.url: the scheme must be amqp"):
            build_sink("out", "amqp", {"url": "http://h"}, metrics)
        with pytest.raises(ConfigError, match=r"options.routing_key '\{x\}'"):
            build_sink("out", "amqp", {"url": "amqp://h/", "routing_key": "{x}"}, metrics)
        with pytest.raises(ConfigError, match=r"sinks.out.options.window"):
            build_sink("out", "amqp", {"url": "amqp://h/", "window": 0}, metrics)
        sink = build_sink("out", "amqp", {"url": "amqp://h/"}, metrics)
        assert isinstance(sink, AmqpSink)
        assert sink.publisher.exchange == "iotgw.processed"
