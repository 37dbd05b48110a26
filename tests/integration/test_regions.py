"""Regional processing through the real RabbitMQ: three gateways on this machine, one per
region (eu, us, ap), each with its own write-ahead log and lake, names unique to the test.

What is checked is what a user sees: the lakes (where each record was processed), the
metrics (bytes crossing regions, placements, region health, the spool) and that every QoS 1
message a gateway acknowledged is processed exactly where residency allows it, in order.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest

from gateway.fleet.codec import WORK, WorkItem
from gateway.pipeline import STAGES
from tests import fleet_stages
from tests.conftest import RunningGateway, start_gateway
from tests.fleet_helpers import URL, eventually, flood, run_async

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGIONS = ("eu", "us", "ap")
HEARTBEAT_S = 0.2
MISSED = 3


def sample(gw: RunningGateway, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in gw.metrics().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class World:
    """One test's regions: unique names, a gateway per region, and cleanup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex[:8]
        self.gateways: dict[str, RunningGateway] = {}

    @property
    def exchange(self) -> str:
        return f"test.{self.tag}.regions"

    def queue(self, region: str) -> str:
        return f"test.{self.tag}.region.{region}"

    def config(self, region: str) -> str:
        node = f"gw-{region}"
        base = self.root / region
        return f"""
[gateway]
node_id = "{node}"
region = "{region}"
state_dir = {json.dumps(str(base / "state"))}
[mqtt]
listen = "127.0.0.1:0"
[coap]
enabled = false
[auth]
allow_anonymous = true
[admin]
listen = "127.0.0.1:0"
[dispatch]
batch_size = 50
slots = 2
[audit]
dir = {json.dumps(str(base / "audit"))}
[retry]
dead_letter_dir = {json.dumps(str(base / "dead-letter"))}
[[tiers]]
name = "critical"
max_latency_ms = 100
guaranteed_share = 0.4
shed_qos0 = false
[[tiers]]
name = "standard"
max_latency_ms = 30000
guaranteed_share = 0.2
[classify]
default_tier = "standard"
[[classify.rules]]
match = {{ topic = "eu/#" }}
tenant = "acme-eu"
[[pipelines]]
name = "default"
stages = [{{ type = "decode" }},
          {{ type = "fleet_stamp", node = "{node}" }},
          {{ type = "route", sinks = ["lake"] }}]
[sinks.lake]
type = "jsonl"
options = {{ dir = {json.dumps(str(base / "lake"))} }}
[fleet]
url = "{URL}"
exchange = "test.{self.tag}.fleet"
node_queue = "test.{self.tag}.node.{{node}}"
work_queue = "test.{self.tag}.work.{{region}}.{{partition}}"
partitions = 1
heartbeat_s = 1
reconnect_initial_s = 0.1
reconnect_max_s = 0.5
connect_timeout_s = 2.0
confirm_timeout_s = 2.0
close_timeout_s = 2.0
[regions]
exchange = "{self.exchange}"
queue = "test.{self.tag}.region.{{region}}"
heartbeat_interval_s = {HEARTBEAT_S}
down_after_missed = {MISSED}
spool_retry_s = 0.2
regions = [{{ name = "eu", capacity_per_s = 1000 }}, {{ name = "us", capacity_per_s = 1000 }},
           {{ name = "ap", capacity_per_s = 1000 }}]
links = [{{ between = ["eu", "us"], cost_per_gb = 0.02, latency_ms = 80 }},
         {{ between = ["eu", "ap"], cost_per_gb = 0.05, latency_ms = 200 }},
         {{ between = ["us", "ap"], cost_per_gb = 0.08, latency_ms = 150 }}]
[[regions.residency]]
tenants = ["acme-eu"]
allowed = ["eu"]
"""

    def start(self, region: str) -> RunningGateway:
        gw = self.gateways[region] = start_gateway(self.config(region))
        return gw

    def start_all(self) -> None:
        for region in REGIONS:
            self.start(region)
        for region, gw in self.gateways.items():
            eventually(lambda gw=gw: all(sample(gw, "iotgw_region_up", region=r) == 1
                                         for r in REGIONS), 15, f"{region} sees every region")

    def lake(self, region: str) -> list[dict[str, Any]]:
        return [json.loads(line)
                for p in sorted((self.root / region / "lake").rglob("*.jsonl"))
                for line in p.read_text().split("\n")[:-1] if line]

    def close(self) -> None:
        for gw in self.gateways.values():
            gw.stop()

        async def go() -> None:
            connection = await aio_pika.connect(URL)
            async with connection:
                names = [*(self.queue(r) for r in REGIONS), f"{self.exchange}.refused",
                         *(f"test.{self.tag}.work.{r}.0" for r in REGIONS),
                         *(f"test.{self.tag}.node.gw-{r}" for r in REGIONS)]
                for name in names:
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.queue_delete(name)
                for exchange in (self.exchange, f"{self.exchange}.health",
                                 f"test.{self.tag}.fleet"):
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.exchange_delete(exchange)

        run_async(go)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setitem(STAGES, "fleet_stamp", fleet_stages.StampStage)  # type: ignore[arg-type]
    w = World(tmp_path)
    yield w
    w.close()


def seqs_by_device(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each device's sequence numbers in the order they were processed (devices of the same
    name at two gateways are two devices: the id names the gateway it arrived at)."""
    runs: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in records:
        device = f"{r['id'].split('-', 2)[1]}/{r['device']}"
        runs[device].append((r["payload"]["processed_ns"], r["payload"]["seq"]))
    return {device: [seq for _, seq in sorted(pairs)] for device, pairs in runs.items()}


def test_resident_data_is_processed_only_in_its_region_and_local_data_stays_local(
        world: World) -> None:
    world.start_all()
    us, eu, ap = world.gateways["us"], world.gateways["eu"], world.gateways["ap"]
    devices, per_device = 4, 100
    flood(us.mqtt_port, devices, per_device, topic="eu/{device}")  # acme-eu, arrives in us
    flood(us.mqtt_port, devices, per_device, topic="t/{device}")  # default tenant: anywhere
    flood(eu.mqtt_port, devices, per_device, topic="eu/{device}")  # acme-eu, at home
    total_eu = 2 * devices * per_device

    def resident() -> list[dict[str, Any]]:
        return [r for r in world.lake("eu") if r["tenant"] == "acme-eu"]

    eventually(lambda: len(resident()) >= total_eu, 30, "acme-eu processed in eu")
    eventually(lambda: len(world.lake("us")) >= devices * per_device, 30, "us local work")
    time.sleep(0.5)  # anything misplaced would have arrived by now
    for region in ("us", "ap"):
        assert not [r for r in world.lake(region) if r["tenant"] == "acme-eu"], region
    records = resident()
    assert len(records) == total_eu  # exactly once
    for device, seqs in seqs_by_device(records).items():
        assert seqs == sorted(seqs), f"{device} out of order"
    assert {r["payload"]["node"] for r in records} == {"gw-eu"}
    assert len(world.lake("us")) == devices * per_device  # the default tenant stayed local
    # Accounting: only acme-eu's bodies crossed, us → eu; eu's own traffic crossed nothing.
    assert sample(us, "iotgw_region_transfer_bytes_total", src="us", dst="eu") > \
        devices * per_device * 20
    assert sample(us, "iotgw_region_transfer_bytes_total", dst="ap") == 0
    assert sample(eu, "iotgw_region_transfer_bytes_total") == 0
    assert sample(ap, "iotgw_region_transfer_bytes_total") == 0
    assert sample(us, "iotgw_region_placements_total", action="forward") == \
        devices * per_device
    assert sample(us, "iotgw_region_placements_total", action="local") == devices * per_device
    assert sample(eu, "iotgw_region_local_bytes_total") > 0
    assert sample(eu, "iotgw_region_taken_messages_total") == devices * per_device


def test_a_taker_refuses_work_its_region_may_not_hold(world: World) -> None:
    world.start_all()
    ap = world.gateways["ap"]
    item = WorkItem(1, "forger/1", "", 0, "forged-1", "dev-x", "acme-eu", "standard", "us",
                    "eu/dev-x", b'{"seq": 0}', time.time(), "mqtt", 1, "default", "")

    async def forge() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(world.exchange)
            await exchange.publish(aio_pika.Message(
                msgspec.msgpack.encode(item), content_type=WORK,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="ap")

    run_async(forge)
    eventually(lambda: sample(ap, "iotgw_region_residency_refused_total") == 1, 10,
               "ap refuses it")

    async def dead_lettered() -> int:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{world.exchange}.refused", passive=True)
            return int(queue.declaration_result.message_count or 0)

    eventually(lambda: run_async(dead_lettered) == 1, 10, "dead-lettered")
    assert not [r for r in world.lake("ap") if r["tenant"] == "acme-eu"]


def test_a_region_down_is_detected_its_data_spooled_and_drained_in_order(
        world: World) -> None:
    world.start_all()
    us = world.gateways["us"]
    world.gateways["eu"].stop()
    stopped = time.monotonic()
    eventually(lambda: sample(us, "iotgw_region_up", region="eu") == 0, 10, "eu down")
    detected = time.monotonic() - stopped
    assert detected < MISSED * HEARTBEAT_S + 2.0
    assert sample(us, "iotgw_region_up", region="ap") == 1

    devices, per_device = 4, 250
    n = devices * per_device
    flood(us.mqtt_port, devices, per_device, topic="eu/{device}")  # every one acknowledged
    flood(us.mqtt_port, 2, 50, topic="t/{device}")  # local work goes on meanwhile
    eventually(lambda: sample(us, "iotgw_region_spooled_messages") == n, 10, "spooled")
    assert sample(us, "iotgw_region_placements_total", action="spool") == n
    assert not [r for r in world.lake("us") if r["tenant"] == "acme-eu"]
    eventually(lambda: len(world.lake("us")) >= 100, 10, "us keeps serving its devices")

    restarted = time.monotonic()
    world.start("eu")
    eventually(lambda: sample(us, "iotgw_region_up", region="eu") == 1, 10, "eu back")
    back = time.monotonic()

    def resident() -> list[dict[str, Any]]:
        return [r for r in world.lake("eu") if r["tenant"] == "acme-eu"]

    eu = world.gateways["eu"]
    eventually(lambda: sample(eu, "iotgw_region_taken_messages_total") >= n, 30,
               "the spool drained into eu")
    drained = time.monotonic()
    eventually(lambda: len(resident()) >= n, 30, "processed in eu")
    records = resident()
    assert len(records) == n
    assert {(r["device"], r["payload"]["seq"]) for r in records} == {
        (f"dev-{d}", s) for d in range(devices) for s in range(per_device)}
    for device, seqs in seqs_by_device(records).items():
        assert seqs == sorted(seqs), f"{device} out of order"
    assert sample(us, "iotgw_region_spooled_messages") == 0
    assert not [r for r in world.lake("us") if r["tenant"] == "acme-eu"]
    assert not [r for r in world.lake("ap") if r["tenant"] == "acme-eu"]
    print(f"\nregion down detected after {detected:.2f} s (heartbeat {HEARTBEAT_S} s × "
          f"{MISSED}); eu back {back - restarted:.2f} s after restart; {n} spooled messages "
          f"drained into eu (durable there) in {drained - back:.2f} s "
          f"({n / max(drained - back, 1e-3):.0f} msg/s)")
