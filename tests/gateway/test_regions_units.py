"""``gateway.regions`` without RabbitMQ: health from heartbeats and the link, the spool's
order, placement in ingest's hook (local, forward, spool, drain), and a taker refusing work
its region may not hold."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from gateway.config import parse_config
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.fleet.codec import WORK, decode_work, encode_work
from gateway.fleet.overflow import ACK, REJECT
from gateway.metrics import Metrics
from gateway.regions import Regions, RegionTaken
from gateway.regions.codec import RegionDecodeError, decode_heartbeat, encode_heartbeat
from gateway.regions.health import RegionHealth
from gateway.regions.spool import Spool
from protocols.amqp.wire import Delivery, Properties
from tests.conftest import DEFAULT_TOML
from tests.gateway.test_fleet_units import FakeIngest, FakePublisher, FakeWal, envelope

REGIONS_TOML = """
[regions]
heartbeat_interval_s = 1.0
down_after_missed = 3
max_spooled = 3
regions = [{ name = "eu" }, { name = "us" }, { name = "ap" }]
links = [{ between = ["eu", "us"], cost_per_gb = 0.02 },
         { between = ["eu", "ap"], cost_per_gb = 0.05 },
         { between = ["us", "ap"], cost_per_gb = 0.08 }]
[[regions.residency]]
tenants = ["acme-eu"]
allowed = ["eu"]
"""


def config_text(region: str = "us", fleet: bool = True) -> str:
    text = DEFAULT_TOML.replace('region = "local"', f'region = "{region}"')
    if fleet:
        text = text + '\n[fleet]\nurl = "amqp://guest:guest@127.0.0.1:5672/"\n'
    return text + REGIONS_TOML


# -- health ------------------------------------------------------------------------------------

def test_a_region_is_down_after_missed_heartbeats_and_says_how_long_detection_took() -> None:
    health = RegionHealth(["eu", "us", "ap"], "us", 1.0, 3, now=0.0)
    assert health.states["us"].up and not health.states["eu"].up
    health.link(True, 0.0)
    health.beat("eu", "gw-eu", False, 0.5)
    [change] = health.update(0.6)
    assert (change.region, change.up) == ("eu", True)
    health.beat("eu", "gw-eu", False, 2.0)
    assert health.update(4.9) == []  # 2.9 s since the last one: still up
    [down] = health.update(5.1)
    assert (down.region, down.up, down.cause) == ("eu", False, "missed heartbeats")
    assert down.after_s == pytest.approx(3.1)
    health.beat("eu", "gw-eu", False, 6.0, age_s=10.0)  # held in a buffer: says nothing
    assert health.update(6.1) == []


def test_while_the_link_is_down_every_other_region_is_down_and_this_one_up() -> None:
    health = RegionHealth(["eu", "us", "ap"], "us", 1.0, 3, now=0.0)
    health.link(True, 0.0)
    for region in ("eu", "ap"):
        health.beat(region, f"gw-{region}", region == "ap", 0.1)
    health.update(0.2)
    assert health.states["ap"].saturated and not health.states["eu"].saturated
    health.link(False, 1.0)
    changes = health.update(1.2)
    assert {(c.region, c.up, c.cause) for c in changes} == {
        ("eu", False, "link down"), ("ap", False, "link down")}
    assert health.states["us"].up


# -- the spool ---------------------------------------------------------------------------------

def test_the_spool_keeps_order_bounds_qos0_and_puts_back_in_front() -> None:
    spool = Spool(max_qos0=2)
    envs = [envelope(id=f"m{i}", qos=i % 2, tenant="t") for i in range(6)]
    kept = [spool.add(e) for e in envs]
    assert kept == [True, True, True, True, False, True]  # the third QoS 0 is dropped
    assert spool.dropped == 1 and spool.holds(envs[0])
    first = spool.take(2)
    assert [e.id for e in first] == ["m0", "m1"]
    spool.put_back(first)
    assert [e.id for e in spool.items] == ["m0", "m1", "m2", "m3", "m5"]
    assert spool.qos0 == 2
    spool.take(10)
    assert not spool.holds(envs[0]) and spool.qos0 == 0


def test_a_heartbeat_round_trips_and_garbage_is_refused() -> None:
    beat = decode_heartbeat(encode_heartbeat("eu", "gw-eu", True, 12.5))
    assert (beat.region, beat.node, beat.saturated, beat.sent_at) == ("eu", "gw-eu", True, 12.5)
    with pytest.raises(RegionDecodeError):
        decode_heartbeat(b"\x01")


# -- config ------------------------------------------------------------------------------------

def test_the_gateways_region_must_be_one_of_the_regions() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.region"):
        parse_config(config_text(region="mars"))


def test_regions_need_the_fleets_rabbitmq() -> None:
    config = parse_config(config_text(fleet=False))
    dispatcher = Dispatcher(config.tiers, config.dispatch, lambda lane, batch: None)
    with pytest.raises(ConfigError, match="fleet"):
        Regions(config, ingest=FakeIngest(dispatcher), dispatcher=dispatcher, wal=None,
                metrics=Metrics())


# -- placement ---------------------------------------------------------------------------------

def rig(region: str = "us") -> tuple[Regions, FakeIngest, FakePublisher, FakeWal, Dispatcher]:
    config = parse_config(config_text(region))
    dispatcher = Dispatcher(config.tiers, config.dispatch, lambda lane, batch: None)
    ingest = FakeIngest(dispatcher)
    wal = FakeWal()
    regions = Regions(config, ingest=ingest, dispatcher=dispatcher, wal=wal,  # type: ignore[arg-type]
                      metrics=Metrics())
    publisher = FakePublisher()
    regions.publisher = publisher  # type: ignore[assignment]
    regions.follow(None)
    regions.declared = True
    return regions, ingest, publisher, wal, dispatcher


def beat_all(regions: Regions, now: float, *names: str) -> None:
    regions._self_heard = now
    regions.health.link(True, now)
    for name in names:
        regions.health.beat(name, f"gw-{name}", False, now)
    for change in regions.health.update(now):
        regions._transition(change)


def value(regions: Regions, name: str, **labels: str) -> float:
    sample = regions.metrics.registry.get_sample_value(name, labels)
    return sample or 0.0


def queued(dispatcher: Dispatcher) -> list[str]:
    return [e.id for lane in dispatcher.lanes for e in lane.items]


def resident(i: int, **fields: Any) -> Envelope:
    return envelope(id=f"r{i}", tenant="acme-eu", wal_seq=100 + i, device="d1", **fields)


async def test_resident_data_is_forwarded_and_retired_on_confirm_local_data_stays() -> None:
    regions, ingest, publisher, wal, dispatcher = rig("us")
    beat_all(regions, time.monotonic(), "eu", "ap")
    ingest.enqueue([resident(0), envelope(id="l0", tenant="other", wal_seq=7), resident(1)])
    assert queued(dispatcher) == ["l0"]
    assert [key for key, _, _ in publisher.put_messages] == ["eu", "eu"]
    item = decode_work(publisher.put_messages[0][1])
    assert (item.id, item.tenant) == ("r0", "acme-eu")
    regions.tick()
    assert wal.retired == []  # not confirmed yet
    publisher.confirmed = publisher.accepted
    regions.tick()
    assert wal.retired == [100, 101]
    body_bytes = sum(len(body) for _, body, _ in publisher.put_messages)
    assert value(regions, "iotgw_region_transfer_bytes_total", src="us", dst="eu") == body_bytes
    assert value(regions, "iotgw_region_transfer_bytes_total", src="us", dst="ap") == 0
    assert value(regions, "iotgw_region_local_bytes_total") == len(b'{"seq": 1}')
    assert value(regions, "iotgw_region_placements_total", action="forward") == 2
    assert value(regions, "iotgw_region_placements_total", action="local") == 1


async def test_data_whose_region_is_down_is_spooled_and_drains_in_order_when_it_returns() -> None:
    regions, ingest, publisher, wal, dispatcher = rig("us")
    now = time.monotonic()
    beat_all(regions, now, "ap")  # eu never heard of: down
    ingest.enqueue([resident(0), resident(1, qos=0)])
    ingest.enqueue([envelope(id="l0", tenant="other")])
    assert publisher.put_messages == [] and len(regions.spool) == 2
    assert queued(dispatcher) == ["l0"]
    regions.declared = False  # the link is away: nothing goes, even to a region heard of
    beat_all(regions, now, "eu")
    ingest.enqueue([resident(2)])
    assert len(regions.spool) == 3 and publisher.put_messages == []
    regions.declared = True
    ingest.enqueue([resident(3)])  # behind its spooled predecessors, whatever the states
    assert len(regions.spool) == 4 and publisher.put_messages == []
    regions._drain_spool()
    assert [decode_work(b).id for _, b, _ in publisher.put_messages] == ["r0", "r1", "r2", "r3"]
    assert len(regions.spool) == 0 and wal.retired == []
    assert value(regions, "iotgw_region_placements_total", action="spool") == 4


async def test_a_spooled_qos0_past_max_spooled_is_dropped_and_counted() -> None:
    regions, ingest, _, _, _ = rig("us")
    ingest.enqueue([resident(i, qos=0) for i in range(5)])
    assert len(regions.spool) == 3
    assert value(regions, "iotgw_region_spool_dropped_total") == 2


async def test_work_taken_from_a_region_queue_is_never_placed_again() -> None:
    _, ingest, publisher, _, dispatcher = rig("us")
    env = resident(0)
    env.ack = RegionTaken("gw-eu/1")
    ingest.enqueue([env])
    assert queued(dispatcher) == ["r0"] and publisher.put_messages == []


# -- the taker's side --------------------------------------------------------------------------

def delivery(tag: int, env: Envelope) -> Delivery:
    return Delivery(1, "c", tag, False, "x", "ap", Properties(content_type=WORK),
                    encode_work(env, "gw-us/1", "", 0))


async def test_a_taker_refuses_work_its_region_may_not_hold_in_its_place_of_the_tag_order() -> None:
    regions, _, _, _, dispatcher = rig("ap")
    regions.wal = None  # taken in at once: no commit to wait for
    taker = regions.taker
    settled: list[tuple[str, int, bool]] = []

    class FakeLink:
        up = True

        def ack(self, tag: int) -> None:
            settled.append(("ack", tag, False))

        def nack(self, tag: int, requeue: bool = True) -> None:
            settled.append(("nack", tag, requeue))

    taker.link = FakeLink()  # type: ignore[assignment]
    envs = [envelope(id="a1", tenant="other"), resident(1), resident(2),
            envelope(id="a4", tenant="other")]
    taken = taker._submit([delivery(i + 1, e) for i, e in enumerate(envs)])
    assert taken == 2
    assert [b.outcome for b in taker.batches] == [ACK, REJECT, ACK]
    taker._settle()
    assert settled == [("ack", 1, False), ("nack", 3, False), ("ack", 4, False)]
    assert queued(dispatcher) == ["a1", "a4"]
    assert all(type(e.ack) is RegionTaken for lane in dispatcher.lanes for e in lane.items)
    assert value(regions, "iotgw_region_residency_refused_total") == 2
    assert value(regions, "iotgw_region_taken_messages_total") == 2


def test_regions_off_changes_nothing() -> None:
    config = parse_config(DEFAULT_TOML)
    assert not config.regions.enabled
    assert msgspec.structs.replace(config).regions == config.regions
