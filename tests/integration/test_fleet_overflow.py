"""Overflow to the region's work queue, through the real RabbitMQ: two gateways of one region
on this machine, each with its own write-ahead log and lake; one is saturated (its pipeline
is slow), the other takes the work it gives away.

What is checked is what a user sees: every QoS 1 message the saturated gateway acknowledged
appears in one of the two lakes (exactly once, or at least once across a cut link), each
device's messages were processed in order (the stamp stage records when and where each was
processed), and the metrics show the work going out of one and into the other.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RunningGateway
from tests.fleet_helpers import (
    HOST,
    PORT,
    Region,
    eventually,
    flood,
    on_loop,
    region,
)
from tests.fleet_stages import StampStage
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["region"]  # the fixture

def overflow(gw: RunningGateway, direction: str) -> float:
    """``iotgw_overflow_messages_total{direction}``, over every tier."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines()
               if line.startswith("iotgw_overflow_messages_total{")
               and f'direction="{direction}"' in line)


def processed(records: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    return Counter((r["device"], r["payload"]["seq"]) for r in records)


def assert_order_per_device(records: list[dict[str, Any]]) -> None:
    """Each device's messages, in the order they were processed (on either gateway), carry
    increasing sequence numbers."""
    by_device: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for r in records:
        p = r["payload"]
        by_device[r["device"]].append((p["processed_ns"], p["seq"], p["node"]))
    for device, runs in by_device.items():
        runs.sort()
        seqs = [seq for _, seq, _ in runs]
        assert seqs == sorted(seqs), f"{device} out of order: {_first_break(runs)}"


def _first_break(runs: list[tuple[int, int, str]]) -> list[tuple[int, str]]:
    for i in range(1, len(runs)):
        if runs[i][1] < runs[i - 1][1]:
            return [(s, n) for _, s, n in runs[max(0, i - 3):i + 3]]
    return []


def everything_processed(region: Region, expected: set[tuple[str, int]]) -> bool:
    return set(processed(region.lakes())) >= expected


def test_a_saturated_gateway_overflows_and_the_other_drains_it_exactly_once_in_order(
        region: Region) -> None:
    a = region.start("a", slow_s=0.01)  # 20 messages per 10 ms at most
    b = region.start("b")
    devices, per_device = 8, 400
    started = time.monotonic()
    names = flood(a.mqtt_port, devices, per_device)  # returns once all are acknowledged
    acked = time.monotonic() - started
    expected = {(d, s) for d in names for s in range(per_device)}
    eventually(lambda: everything_processed(region, expected), timeout=60,
               what="every acknowledged message in a lake")
    time.sleep(1.2)  # one more sink flush: a duplicate would show now
    records = region.lakes()
    counts = processed(records)
    assert set(counts) == expected
    assert max(counts.values()) == 1, "a message was processed twice"
    assert_order_per_device(records)
    on_b = [r for r in records if r["payload"]["node"] == "b"]
    on_a = [r for r in records if r["payload"]["node"] == "a"]
    assert on_b and on_a, "both gateways processed work"
    assert {r["protocol"] for r in on_b} == {"mqtt"}  # the origin's classification kept
    assert {r["tier"] for r in on_b} == {"standard"}
    gave, took = overflow(a, "out"), overflow(b, "in")
    assert gave >= len(on_b) and took == len(on_b)
    # Nothing of it stays in A's write-ahead log: given-away records retire on confirm.
    eventually(lambda: a.stats()["wal_unretired"] == 0, what="A's log retired")
    eventually(lambda: b.stats()["wal_unretired"] == 0, what="B's log retired")
    # A takes its devices back once B reported their work finished.
    eventually(lambda: on_loop(a, lambda: len(a.gateway.fleet.overflow.given)) == 0,
               what="every device back on A")
    print(f"\n{devices * per_device} messages acknowledged by A in {acked:.2f} s; "
          f"A processed {len(on_a)}, gave {gave:.0f} away; B took {took:.0f}")


def test_a_fresh_replica_drains_a_backlog_already_in_the_queue(region: Region) -> None:
    a = region.start("a", slow_s=0.05, fleet={"take_below": 0})  # gives, never takes
    devices, per_device = 8, 500
    names = flood(a.mqtt_port, devices, per_device)
    expected = {(d, s) for d in names for s in range(per_device)}
    eventually(lambda: region.work_depth() >= 1000, what="a backlog in the work queue")
    time.sleep(0.5)
    backlog = region.work_depth()
    assert overflow(a, "out") >= backlog >= 1000
    started = time.monotonic()
    b = region.start("b", batch_size=256, slots=4,
                     fleet={"take_below": None, "overflow_backlog": 20_000})
    eventually(lambda: b.stats()["processed"] >= backlog, timeout=60,
               what="the backlog taken and processed")
    elapsed = time.monotonic() - started
    eventually(lambda: everything_processed(region, expected), timeout=60)
    time.sleep(1.2)
    records = region.lakes()
    counts = processed(records)
    assert set(counts) == expected and max(counts.values()) == 1
    assert_order_per_device(records)
    assert region.work_depth() == 0
    assert overflow(b, "in") >= backlog
    stamps = sorted(r["payload"]["processed_ns"] for r in records if r["payload"]["node"] == "b")
    span = (stamps[-1] - stamps[0]) / 1e9
    print(f"\nB started with {backlog} messages in the work queue; all processed "
          f"{elapsed:.2f} s after its start; {len(stamps)} processed by B in {span:.2f} s "
          f"({len(stamps) / max(span, 1e-9):,.0f} msg/s)")


def set_pause(gw: RunningGateway, seconds: float) -> None:
    """Make the gateway's stamp stage this slow per batch, from its next batch on."""
    def change() -> None:
        for pipeline in gw.gateway.workers.pipelines.values():
            for stage in pipeline.stages:
                if isinstance(stage, StampStage):
                    stage.pause = seconds

    on_loop(gw, change)


def audit_records(region: Region, node: str, event: str) -> list[dict[str, Any]]:
    return [record for path in sorted((region.root / node / "audit").glob("*.jsonl"))
            for line in path.read_text().splitlines() if line
            for record in [json.loads(line)] if record.get("event") == event]


def test_a_busy_taker_hands_its_partitions_over_and_order_holds_across(
        region: Region) -> None:
    a = region.start("a", slow_s=0.01)
    b = region.start("b", slow_s=0.02)  # takes about 1,000 messages a second
    devices, per_device = 8, 500
    result: dict[str, list[str]] = {}
    sender = threading.Thread(target=lambda: result.update(
        names=flood(a.mqtt_port, devices, per_device)))
    sender.start()
    eventually(lambda: overflow(b, "in") > 500, what="B taking A's work")
    set_pause(a, 0.0)  # A has room again: it registers as a standby taker
    set_pause(b, 0.1)  # B falls behind: it holds work it has no room for
    sender.join(60)
    expected = {(d, s) for d in result["names"] for s in range(per_device)}
    eventually(lambda: everything_processed(region, expected), timeout=90,
               what="every acknowledged message in a lake")
    time.sleep(1.2)
    records = region.lakes()
    counts = processed(records)
    assert set(counts) == expected and max(counts.values()) == 1
    assert_order_per_device(records)
    assert overflow(a, "in") > 0, "A took the rest of the work after B handed it over"
    stops = [r for r in audit_records(region, "b", "fleet.taking") if r["state"] == "stop"]
    assert stops and "no room" in stops[0]["reason"]
    assert audit_records(region, "a", "fleet.saturated")
    print(f"\nB took {overflow(b, 'in'):.0f}, then handed over ({stops[0]['reason']}); "
          f"A took {overflow(a, 'in'):.0f} back")


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """Asked for before ``region``: the gateways stop before the proxy does."""
    with TcpProxy(HOST, PORT) as p:
        yield p


def test_rabbitmq_cut_during_overflow_loses_nothing_acknowledged(proxy: TcpProxy,
                                                                 region: Region) -> None:
    url = f"amqp://guest:guest@{HOST}:{proxy.port}/"
    a = region.start("a", url=url, slow_s=0.01)
    b = region.start("b", url=url)
    devices, per_device = 6, 500
    result: dict[str, list[str]] = {}

    def send() -> None:
        result["names"] = flood(a.mqtt_port, devices, per_device, pause_every=50,
                                pause_s=0.02)

    sender = threading.Thread(target=send)
    sender.start()
    eventually(lambda: overflow(a, "out") > 0, what="overflow under way")
    proxy.cut()
    time.sleep(1.5)  # A keeps acknowledging; what it gives away waits for the link
    cut_out = overflow(a, "out")
    proxy.restore()
    sender.join(60)
    names = result["names"]
    expected = {(d, s) for d in names for s in range(per_device)}
    eventually(lambda: everything_processed(region, expected), timeout=60,
               what="every acknowledged message in a lake")
    counts = processed(region.lakes())
    assert set(counts) == expected
    duplicates = sum(n - 1 for n in counts.values())
    assert overflow(b, "in") > 0
    eventually(lambda: a.stats()["wal_unretired"] == 0, what="A's log retired")
    eventually(lambda: b.stats()["wal_unretired"] == 0, what="B's log retired")
    print(f"\ncut at {cut_out:.0f} given away; {duplicates} duplicates after the cut")
