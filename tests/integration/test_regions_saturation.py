"""Regional processing when the region where the data arrives is saturated, through the real
RabbitMQ: three gateways on this machine (eu, us, ap), ``us`` with a slow pipeline stage and
a low ``dispatch.shed_above`` (the backlog past which the runtime counts a gateway saturated).

Issue 8: "process where the data arrived when that is allowed and there is capacity;
otherwise forward to the cheapest allowed region with capacity". The links make ``eu`` the
cheapest from ``us`` and ``ap`` the nearest (lower latency), so the choice is by cost.
What is checked is what a user sees: the lakes, the metrics and the audit log's placement
summaries. Order is asserted only where ``gateway.regions`` promises it: within each
region's processing of a device (a device split between local and forwarded processing
while ``us`` is saturated may be reordered across the two).
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.pipeline import STAGES
from tests import fleet_stages
from tests.fleet_helpers import Device, eventually, flood, on_loop
from tests.integration.test_regions import World, sample

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHED_ABOVE = 100
"""``us`` is saturated while more than this many messages wait in its lanes."""
SLOW_S = 0.02
"""``us``'s stage pauses this long per batch (of 20): at most ~1,000 messages/s."""


class SaturatedWorld(World):
    """``World``'s regions, with ``us`` slow and saturating early, and links that make eu the
    cheapest target from us but ap the nearest."""

    def config(self, region: str) -> str:
        text = super().config(region)
        replacements = [
            ('{ between = ["us", "ap"], cost_per_gb = 0.08, latency_ms = 150 }',
             '{ between = ["us", "ap"], cost_per_gb = 0.08, latency_ms = 10 }')]
        if region == "us":
            replacements += [
                ("[dispatch]\nbatch_size = 50\nslots = 2\n",
                 f"[dispatch]\nbatch_size = 20\nslots = 1\nshed_above = {SHED_ABOVE}\n"
                 "max_queued = 100000\nresume_queued = 50000\n"),
                ('{ type = "fleet_stamp", node = "gw-us" }',
                 f'{{ type = "fleet_stamp", node = "gw-us", seconds_per_batch = {SLOW_S} }}')]
        for old, new in replacements:
            assert old in text, f"World.config changed: {old!r} not found"
            text = text.replace(old, new)
        return text

    def audit(self, region: str) -> list[dict[str, Any]]:
        return [json.loads(line)
                for p in sorted((self.root / region / "audit").glob("audit-*.jsonl"))
                for line in p.read_text().split("\n") if line]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SaturatedWorld]:
    monkeypatch.setitem(STAGES, "fleet_stamp", fleet_stages.StampStage)  # type: ignore[arg-type]
    w = SaturatedWorld(tmp_path)
    yield w
    w.close()


def key(r: dict[str, Any]) -> tuple[str, int]:
    return r["device"], r["payload"]["seq"]


def processed(world: SaturatedWorld) -> int:
    return sum(len(world.lake(region)) for region in ("eu", "us", "ap"))


def in_order(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each device's sequence numbers in the order one gateway processed them."""
    runs: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in records:
        runs[r["device"]].append((r["payload"]["processed_ns"], r["payload"]["seq"]))
    return {device: [seq for _, seq in sorted(pairs)] for device, pairs in runs.items()}


def test_a_saturated_region_forwards_to_the_cheapest_region_with_room_until_it_has_room(
        world: SaturatedWorld) -> None:
    world.start_all()
    us, eu, ap = world.gateways["us"], world.gateways["eu"], world.gateways["ap"]
    assert on_loop(us, lambda: us.gateway.regions.saturated_above) == SHED_ABOVE

    # A QoS 1 flood at us of a tenant allowed anywhere: far faster than us processes it.
    devices, per_device = 4, 600
    flood(us.mqtt_port, devices, per_device, topic="t/{device}")
    n = devices * per_device
    eventually(lambda: processed(world) >= n, 20, "the flood processed")
    eventually(lambda: on_loop(us, lambda: us.gateway.dispatcher.queued) == 0, 10,
               "us drained")
    forwarded = sample(us, "iotgw_region_placements_total", action="forward")
    assert 0 < forwarded < n, "us saturated: part of the flood forwarded, part kept"
    assert sample(us, "iotgw_region_placements_total", action="local") == n - forwarded
    assert sample(us, "iotgw_region_placements_total", action="spool") == 0
    # To eu (the cheapest with room), never to ap (nearer, but dearer).
    assert sample(us, "iotgw_region_transfer_bytes_total", src="us", dst="eu") > 0
    assert sample(us, "iotgw_region_transfer_bytes_total", dst="ap") == 0
    eventually(lambda: sample(eu, "iotgw_region_taken_messages_total") == forwarded, 10,
               "eu took every forwarded message")
    assert sample(ap, "iotgw_region_taken_messages_total") == 0

    # Once us has room again, what arrives stays in us: gently, seqs continuing the flood's.
    calm = 50
    clients = [Device(us.mqtt_port, f"dev-{d}") for d in range(devices)]
    infos: list[Any] = []

    def send(client: Device) -> None:
        infos.extend(client.send("t/" + client.device, range(per_device, per_device + calm),
                                 pause_every=5, pause_s=0.05))

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published(), "a message was not acknowledged"
    for c in clients:
        c.close()
    total = n + devices * calm
    eventually(lambda: processed(world) >= total, 20, "the calm traffic processed")
    assert sample(us, "iotgw_region_placements_total", action="forward") == forwarded, \
        "forwarding stopped once us had room"
    assert sample(us, "iotgw_region_placements_total", action="local") == total - forwarded

    # Every acknowledged message processed exactly once, in us or in eu, never in ap.
    us_records, eu_records = world.lake("us"), world.lake("eu")
    assert not world.lake("ap")
    counts = Counter(key(r) for r in us_records + eu_records)
    assert len(us_records) + len(eu_records) == total
    assert set(counts) == {(f"dev-{d}", s) for d in range(devices)
                           for s in range(per_device + calm)}
    assert max(counts.values()) == 1
    assert len(eu_records) == forwarded
    assert {r["payload"]["node"] for r in eu_records} == {"gw-eu"}
    assert {r["payload"]["node"] for r in us_records} == {"gw-us"}
    assert all(r["payload"]["seq"] < per_device for r in eu_records), "calm work forwarded"
    # Order: what each region processed of a device, it processed in arrival order.
    for region, records in (("us", us_records), ("eu", eu_records)):
        for device, seqs in in_order(records).items():
            assert seqs == sorted(seqs), f"{device} out of order in {region}"

    # The audit log says why: every forward went to eu because us was saturated.
    us.stop()  # flushes the audit summaries
    placements = [r for r in world.audit("us") if r["event"] == "region.placement"]
    forwards = [r for r in placements if r["action"] == "forward"]
    assert sum(r["count"] for r in forwards) == forwarded
    assert {(r["region"], r["reason"]) for r in forwards} == {("eu", "us saturated")}
    print(f"\nus saturated (backlog > {SHED_ABOVE}): {int(forwarded)} of {n} flood messages "
          f"forwarded to eu, {n - int(forwarded)} kept; {devices * calm} calm messages all "
          f"kept in us")
