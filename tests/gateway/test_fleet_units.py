"""The fleet's sans-I/O parts: routing keys against MQTT matching, message bodies, partitions,
the ``[fleet]`` section; and ``Dispatcher.withdraw``, which overflow takes whole devices out
of a lane with."""

from __future__ import annotations

import time
import zlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DispatchSection, Tier, parse_config
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.fleet.codec import (
    LONG_KEY,
    SPECIAL_KEYS,
    FleetDecodeError,
    decode_done,
    decode_interest,
    decode_message,
    decode_work,
    encode_done,
    encode_interest,
    encode_message,
    encode_work,
    envelope_of,
    filter_key,
    partition_of,
    tier_priorities,
    topic_key,
)
from gateway.fleet.config import FleetSection, overflow_tiers
from gateway.fleet.overflow import Overflow, Taken, _Given
from gateway.fleet.service import with_fleet
from gateway.metrics import Metrics
from protocols.mqtt.topics import compile_topic_filter
from tests.conftest import DEFAULT_TOML


def amqp_topic_match(binding: str, key: str) -> bool:
    """RabbitMQ's topic exchange: ``*`` is exactly one word, ``#`` zero or more."""
    pattern, words = binding.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(words)
        if pattern[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(words) + 1))
        if j == len(words):
            return False
        return (pattern[i] == "*" or pattern[i] == words[j]) and match(i + 1, j + 1)

    return match(0, 0)


LEVEL = st.lists(st.sampled_from(["a", "b", ".", "*", "%", "x1", "é", "%2E"]),
                max_size=3).map("".join)
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(
    lambda t: bool(t) and not t.startswith("$"))
FILTER_LEVEL = st.one_of(LEVEL, st.just("+"))
FILTER = st.tuples(st.lists(FILTER_LEVEL, min_size=0, max_size=4), st.booleans()).map(
    lambda p: "/".join([*p[0], "#"] if p[1] else p[0])).filter(bool)


@given(topic=TOPIC, topic_filter=FILTER)
@settings(max_examples=3000, deadline=None)
def test_a_topic_matches_a_filter_exactly_when_its_key_matches_the_binding(
        topic: str, topic_filter: str) -> None:
    mqtt = compile_topic_filter(topic_filter).match(topic) is not None
    binding, key = filter_key(topic_filter), topic_key(topic)
    assert binding is not None and key != LONG_KEY
    assert amqp_topic_match(binding, key) == mqtt, (binding, key)


@given(topic=TOPIC)
def test_no_topic_takes_a_special_key(topic: str) -> None:
    assert topic_key(topic) not in SPECIAL_KEYS[1:]  # LONG_KEY only when it is long
    assert topic_key(topic) != LONG_KEY


def test_long_topics_and_filters() -> None:
    long_topic = "a/" + "x" * 300 + "/b"
    assert topic_key(long_topic) == LONG_KEY
    assert filter_key("a/" + "x" * 300 + "/#") is None  # its topics are all long
    assert filter_key("a/+/#") == "a.*.#"
    assert topic_key("é" * 120) == "é" * 120  # 240 bytes: fits
    assert topic_key("é" * 128) == LONG_KEY  # 256 bytes: does not
    assert topic_key("a//b") == "a.%.b" and topic_key("/") == "%.%"


def envelope(**fields: object) -> Envelope:
    base = dict(id="gw-a-1", device="dev-1", tenant="acme", tier="standard", region="eu",
                topic="t/dev-1", payload=b'{"seq": 1}', received_ns=5, received_at=1000.0,
                protocol="coap", qos=1, device_class="meter", deadline_ns=9, anomaly="")
    base.update(fields)
    return Envelope(**base)  # type: ignore[arg-type]


def test_a_work_item_keeps_the_classification_and_the_latency_clock() -> None:
    env = envelope(payload=memoryview(b'{"seq": 1}'))
    item = decode_work(encode_work(env, "gw-a/xyz", "iotgw.node.gw-a", 42))
    assert (item.origin, item.reply, item.seq) == ("gw-a/xyz", "iotgw.node.gw-a", 42)
    now_ns, now = 10_000_000_000, 1000.25  # 250 ms after the first receipt
    deadlines = {"critical": 100_000_000, "standard": 2_000_000_000}
    taken = envelope_of(item, deadlines, "standard", False, now_ns=now_ns, now=now)
    for field in ("id", "device", "tenant", "tier", "region", "topic", "payload",
                  "received_at", "protocol", "qos", "device_class"):
        want = getattr(env, field)
        assert getattr(taken, field) == (bytes(want) if field == "payload" else want), field
    assert taken.received_ns == now_ns - 250_000_000
    assert taken.deadline_ns == taken.received_ns + 2_000_000_000
    unknown = decode_work(encode_work(envelope(tier="gold", anomaly="critical"), "o", "r", 1))
    fallback = envelope_of(unknown, deadlines, "standard", False, now_ns=now_ns, now=now)
    assert fallback.tier == "standard" and fallback.anomaly == ""  # no anomaly lanes here
    assert envelope_of(unknown, deadlines, "standard", True).anomaly == "critical"


def test_bodies_that_are_not_what_they_say_raise_one_error() -> None:
    for decode in (decode_work, decode_done, decode_message, decode_interest):
        with pytest.raises(FleetDecodeError):
            decode(b"\x93not msgpack")
    with pytest.raises(FleetDecodeError):
        decode_interest(encode_interest("shout", "n", []))


def test_reports_announcements_and_messages_round_trip() -> None:
    report = decode_done(encode_done("gw-a/1", [("dev-1", "bulk", 7)]))
    assert report.origin == "gw-a/1" and report.finished == [("dev-1", "bulk", 7)]
    interest = decode_interest(encode_interest("add", "gw-b", ["a/+", "b/#"]))
    assert (interest.kind, interest.node, interest.filters) == ("add", "gw-b", ["a/+", "b/#"])
    properties = {"content_type": "text/plain", "correlation_data": b"\x00c",
                  "user_property": [("k", "v")], "topic_alias": 3,
                  "subscription_identifier": [1]}
    message = decode_message(encode_message("gw-a", "t/1", memoryview(b"p"), 1, True,
                                            properties, 1234.5))
    assert message.properties == {"content_type": "text/plain", "correlation_data": b"\x00c",
                                  "user_property": [("k", "v")]}  # hop properties stay
    assert (message.topic, message.payload, message.qos, message.retain,
            message.expires_at) == ("t/1", b"p", 1, True, 1234.5)


def test_partitions_are_stable_and_priorities_follow_the_tiers() -> None:
    assert partition_of("dev-1", 8) == zlib.crc32(b"dev-1") % 8
    spread = {partition_of(f"dev-{i}", 8) for i in range(100)}
    assert spread == set(range(8))
    assert tier_priorities(["critical", "premium", "standard", "bulk"], 9) == {
        "critical": 9, "premium": 8, "standard": 7, "bulk": 6}
    assert tier_priorities(["a", "b", "c"], 1) == {"a": 1, "b": 0, "c": 0}


def test_the_fleet_section_is_checked_where_it_is_read() -> None:
    config = parse_config(DEFAULT_TOML)
    assert config.fleet.url is None  # the built-in config: off
    assert overflow_tiers(config.fleet, config.tier_names) == {"premium", "standard", "bulk"}
    with pytest.raises(ConfigError, match=r"fleet.overflow_tiers\[1\]: unknown tier 'gold'"):
        parse_config(DEFAULT_TOML + '\n[fleet]\noverflow_tiers = ["bulk", "gold"]\n')
    with pytest.raises(ConfigError, match=r"fleet.*node_queue: must contain \{node\}"):
        parse_config(DEFAULT_TOML + '\n[fleet]\nnode_queue = "one.for.all"\n')
    with pytest.raises(ConfigError, match=r"fleet.*url"):
        parse_config(DEFAULT_TOML + '\n[fleet]\nurl = "http://rabbit"\n')
    with pytest.raises(ConfigError, match="--fleet-url"):
        with_fleet(config, "nope://x")
    assert with_fleet(config, "amqp://r:5672/").fleet.url == "amqp://r:5672/"
    assert msgspec.structs.replace(FleetSection(), overflow_tiers=["bulk"]).overflow_tiers == [
        "bulk"]


def test_withdraw_takes_whole_devices_out_keeping_both_orders() -> None:
    tiers = [Tier(name="critical", max_latency_ms=50), Tier(name="bulk", max_latency_ms=60000)]
    dispatcher = Dispatcher(tiers, DispatchSection(max_queued=10, resume_queued=5,
                                                   shed_above=10),
                            lambda lane, batch: None)
    pressure: list[bool] = []
    dispatcher._on_pressure = pressure.append
    lane = dispatcher.lane_by_tier["bulk"]
    items = lane.items
    for i in range(12):
        items.append(envelope(id=str(i), device=f"d{i % 3}", tier="bulk",
                              received_ns=time.monotonic_ns()))
    dispatcher.queued = 12
    dispatcher.pressure = True
    taken = dispatcher.withdraw(lane, lambda e: e.device in ("d0", "d2"))
    assert [e.id for e in taken] == ["0", "2", "3", "5", "6", "8", "9", "11"]
    assert [e.id for e in lane.items] == ["1", "4", "7", "10"]
    assert lane.items is items  # ingest holds the deque
    assert dispatcher.queued == 4 and pressure == [False]


class FakePublisher:
    """What overflow needs of ``ConfirmedPublisher``: what was put, confirmed on demand."""

    def __init__(self) -> None:
        self.put_messages: list[tuple[str, bytes, bytes]] = []
        self.accepted = 0
        self.confirmed = 0
        self.down = False

    def put(self, messages: list[Any]) -> None:
        for m in messages:
            self.put_messages.append((m.routing_key, m.body, m.properties))
        self.accepted += len(messages)


class FakeIngest:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.accepting = True
        self.divert: Any = None

    def enqueue(self, envelopes: list[Envelope]) -> None:
        if self.divert is not None:
            envelopes = self.divert(envelopes)
        for env in envelopes:
            self.dispatcher.lane_by_tier[env.tier].items.append(env)
        self.dispatcher.accepted(len(envelopes))


class FakeWal:
    refusing = False

    def __init__(self) -> None:
        self.retired: list[int] = []

    def retire(self, seqs: list[int]) -> None:
        self.retired += seqs


def overflow_rig(**fleet: Any) -> tuple[Overflow, Dispatcher, FakeIngest, FakePublisher, FakeWal]:
    settings = {"url": "amqp://localhost/", "overflow_backlog": 40, "take_below": 0, **fleet}
    config = parse_config(DEFAULT_TOML)
    config = msgspec.structs.replace(config, fleet=FleetSection(**settings))
    dispatcher = Dispatcher(config.tiers, config.dispatch, lambda lane, batch: None)
    ingest = FakeIngest(dispatcher)
    publisher, wal = FakePublisher(), FakeWal()
    overflow = Overflow(config.fleet, config, origin="gw-a/1", reply="iotgw.node.gw-a",
                        ingest=ingest, dispatcher=dispatcher, wal=wal, metrics=Metrics(),
                        publisher=publisher, ready=lambda: True)  # type: ignore[arg-type]
    ingest.divert = overflow.divert
    return overflow, dispatcher, ingest, publisher, wal


def standard(i: int, device: str, **fields: Any) -> Envelope:
    return envelope(id=f"m{i}", device=device, tier="standard", wal_seq=i + 1,
                    received_ns=time.monotonic_ns(), **fields)


async def test_whole_devices_leave_oldest_first_and_their_later_messages_follow() -> None:
    overflow, dispatcher, ingest, publisher, wal = overflow_rig()
    ingest.enqueue([standard(i, f"d{i % 10}") for i in range(100)])  # 10 devices × 10
    overflow.tick()
    lane = dispatcher.lane_by_tier["standard"]
    assert {e.device for e in lane.items} == {"d8", "d9"}  # what stays: half the limit
    assert dispatcher.queued == 20
    given = [decode_work(body) for _, body, _ in publisher.put_messages]
    assert [item.id for item in given] == [f"m{i}" for i in range(100) if i % 10 < 8]
    assert [item.seq for item in given] == list(range(1, 81))
    assert {key for key, _, _ in publisher.put_messages} == {
        f"iotgw.work.local.{partition_of(f'd{i}', 8)}" for i in range(8)}
    # Later messages of a device given away follow it; the others stay.
    ingest.enqueue([standard(100, "d3"), standard(101, "d9")])
    assert decode_work(publisher.put_messages[-1][1]).id == "m100"
    assert lane.items[-1].id == "m101"
    # Retired once RabbitMQ confirmed them, not before.
    overflow.tick()
    assert wal.retired == []
    publisher.confirmed = publisher.accepted
    overflow.tick()
    assert sorted(wal.retired) == sorted(i + 1 for i in [*range(100), 100] if i % 10 < 8
                                         or i == 100)
    # d3 comes back once every message of it was reported finished.
    overflow.on_report(decode_done(encode_done("gw-a/1", [("d3", "standard", 71)])))
    overflow.tick()
    assert ("d3", "standard") in overflow.given  # seq 81 (m100) is not finished yet
    overflow.on_report(decode_done(encode_done("gw-b/9", [("d3", "standard", 81)])))
    overflow.tick()
    assert ("d3", "standard") in overflow.given  # a report to another origin: ignored
    overflow.on_report(decode_done(encode_done("gw-a/1", [("d3", "standard", 81)])))
    overflow.tick()
    assert ("d3", "standard") in overflow.given  # its lane holds more than half the limit
    assert dispatcher.next_batch() is not None  # processed
    overflow.tick()
    assert ("d3", "standard") not in overflow.given
    ingest.enqueue([standard(102, "d3")])
    assert lane.items[-1].id == "m102"


async def test_critical_anomalous_and_taken_work_never_leaves() -> None:
    overflow, dispatcher, ingest, publisher, _ = overflow_rig(overflow_backlog=4)
    overflow.given[("m", "standard")] = _Given(time.monotonic())
    assert overflow.divert([standard(0, "m", anomaly="critical")])  # an anomaly stays
    old = time.monotonic_ns() - 3_600_000_000_000  # an hour old: waited in the queue
    taken = [envelope(id=f"t{i}", device="far", tier="standard", received_ns=old)
             for i in range(2)]
    for env in taken:
        env.ack = Taken("gw-z/1", "iotgw.node.gw-z", 1, "standard")
    ingest.enqueue(taken)
    overflow.tick()
    assert overflow._saturated == set()  # taken work says nothing of the capacity here
    ingest.enqueue([envelope(id=f"c{i}", device="pump", tier="critical") for i in range(50)])
    overflow.tick()
    assert overflow._saturated == set() and not publisher.put_messages
    ingest.enqueue([standard(i, "far") for i in range(10)])
    overflow.tick()  # saturated, but the device has taken work here: pinned
    assert "standard" in overflow._saturated and not publisher.put_messages
    assert len(dispatcher.lane_by_tier["standard"].items) == 12
