"""AMQP through the real RabbitMQ: aio-pika producers feed the gateway's consumer; an aio-pika
consumer reads what the gateway's sink and alerts publish; faults go through ``TcpProxy``.

The gateway runs in a thread with its own loop (``gateway_factory``); the AMQP side is started
on that loop with ``start_amqp``, as the gateway will once it is wired in. Every test uses its
own queue and exchange names and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import msgspec
import pytest

import gateway.sinks as sinks_module
from gateway.envelope import Envelope
from gateway.ingest import Inbound
from policies.alerts import Alert
from protocols.amqp.config import AmqpSection, IngestQueue, PriorityTier, QueueBinding
from protocols.amqp.consumer import AmqpConsumer
from protocols.amqp.service import AmqpHandle, start_amqp
from protocols.amqp.sink import AmqpSink
from tests.conftest import DEFAULT_TOML, RunningGateway, admin_get, start_serve, stop
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration]

T = TypeVar("T")
HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"
FAST = {"heartbeat_s": 1, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5,
        "connect_timeout_s": 2.0, "refused_delay_s": 0.2, "close_timeout_s": 2.0,
        "confirm_timeout_s": 1.0}


# -- helpers ----------------------------------------------------------------------------------

def run_async(factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
    """Run a coroutine on a fresh loop in its own thread (the test's thread stays sync)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(factory())
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "timed out"
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def on_loop(gw: RunningGateway, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
    return asyncio.run_coroutine_threadsafe(coro, gw.loop).result(timeout)


def call_on_loop(gw: RunningGateway, fn: Callable[[], T]) -> T:
    async def run() -> T:
        return fn()

    return on_loop(gw, run())


def eventually(predicate: Callable[[], bool], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def message(seq: int, **properties: Any) -> aio_pika.Message:
    properties.setdefault("message_id", f"m-{seq}")
    properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    return aio_pika.Message(json.dumps({"seq": seq}).encode(), **properties)


def publish(messages: list[aio_pika.Message], routing_key: str, exchange: str = "") -> None:
    async def go() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            target = (channel.default_exchange if not exchange
                      else await channel.get_exchange(exchange, ensure=False))
            for m in messages:
                await target.publish(m, routing_key)

    run_async(go)


def depth(queue: str) -> int:
    """Messages ready in ``queue`` (delivered-but-unacked ones are not counted)."""
    async def go() -> int:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count
            return int(count or 0)

    return run_async(go)


def lake(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((tmp_path / "lake").rglob("*.jsonl"))
            for line in p.read_text().splitlines() if line]


def seqs(records: list[dict[str, Any]]) -> list[int]:
    return [r["payload"]["seq"] for r in records]


def metric(gw: RunningGateway, name: str) -> float:
    total = 0.0
    for line in gw.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class HoldingWal:
    """Stands in for the write-ahead log: appends wait until ``release()`` (a slow disk)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held: list[tuple[list[Envelope], Callable[[OSError | None], None]]] = []

    @property
    def refusing(self) -> bool:
        return bool(self.real.refusing)

    def append(self, batch: list[Envelope], done: Callable[[OSError | None], None]) -> None:
        self.held.append((batch, done))

    @property
    def held_messages(self) -> int:
        return sum(len(b) for b, _ in self.held)

    def release(self) -> None:
        held, self.held = self.held, []
        for batch, done in held:
            self.real.append(batch, done)


def hold_wal(gw: RunningGateway) -> HoldingWal:
    ingest = gw.gateway.ingest

    def swap() -> HoldingWal:
        holder = HoldingWal(ingest.wal)
        ingest.wal = holder
        return holder

    return call_on_loop(gw, swap)


def release_wal(gw: RunningGateway, holder: HoldingWal) -> None:
    def swap() -> None:
        gw.gateway.ingest.wal = holder.real
        holder.release()

    call_on_loop(gw, swap)


class Collector:
    """An aio-pika consumer in its own thread: a queue bound to ``exchange``, every message
    noted as (routing key, JSON body, message id)."""

    def __init__(self, exchange: str, binding: str = "#") -> None:
        self.exchange = exchange
        self.binding = binding
        self.got: list[tuple[str, Any, str | None]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._connection: aio_pika.abc.AbstractConnection | None = None

    def start(self) -> Collector:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._connection = await aio_pika.connect(URL)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, self.binding)

        async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.got.append((m.routing_key or "", json.loads(m.body), m.message_id))
            await m.ack()

        await queue.consume(on_message)

    def stop(self) -> None:
        async def close() -> None:
            if self._connection is not None:
                await self._connection.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class Names:
    """Unique queue and exchange names for one test; deleted afterwards."""

    def __init__(self) -> None:
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.tag = uuid.uuid4().hex[:10]

    def queue(self, what: str = "ingest") -> str:
        name = f"test.{self.tag}.{what}"
        self.queues.append(name)
        return name

    def exchange(self, what: str) -> str:
        name = f"test.{self.tag}.{what}"
        self.exchanges.append(name)
        return name

    def delete_all(self) -> None:
        async def go() -> None:
            connection = await aio_pika.connect(URL)
            async with connection:
                for name in self.queues:
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.queue_delete(name)
                for name in self.exchanges:
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.exchange_delete(name)

        run_async(go)


@pytest.fixture
def names() -> Iterator[Names]:
    n = Names()
    yield n
    n.delete_all()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(HOST, PORT) as p:
        yield p


@pytest.fixture
def amqp(gateway_factory: Callable[..., RunningGateway], names: Names,
         ) -> Iterator[Callable[[RunningGateway, AmqpSection], AmqpHandle]]:
    """Start the AMQP side on a running gateway's loop; stopped before the gateway, and
    before the test's queues are deleted (and, if the test asks for ``proxy`` first, before
    the proxy stops)."""
    started: list[tuple[RunningGateway, AmqpHandle]] = []

    def start(gw: RunningGateway, section: AmqpSection) -> AmqpHandle:
        handle = on_loop(gw, start_amqp(section, gw.gateway.ingest, gw.gateway.metrics))
        started.append((gw, handle))
        consumer = consumer_of(handle)
        if section.url is not None and f"{PORT}/" in section.url:  # direct: up at once
            eventually(lambda: consumer.connects >= 1, what="the consumer's first connect")
        return handle

    yield start
    for gw, handle in reversed(started):
        if gw.thread.is_alive():
            on_loop(gw, handle.close(), timeout=30)


def consumer_of(handle: AmqpHandle) -> AmqpConsumer:
    assert handle.consumer is not None
    return handle.consumer


def section_for(queue: str | IngestQueue, url: str = URL, **settings: Any) -> AmqpSection:
    q = queue if isinstance(queue, IngestQueue) else IngestQueue(name=queue)
    return AmqpSection(url=url, queues=[q], **{**FAST, **settings})


def via(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@{HOST}:{proxy.port}/"


# -- ingest -------------------------------------------------------------------------------------

def test_deliveries_are_acked_only_after_the_durable_append(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue)))
    holder = hold_wal(gw)
    publish([message(i, headers={"device": f"dev-{i % 5}"}) for i in range(50)], queue)
    eventually(lambda: holder.held_messages == 50, what="all 50 submitted")
    time.sleep(0.3)
    assert consumer.acked == 0  # none is durable yet: none acked
    assert depth(queue) == 0  # all delivered to the gateway, unacknowledged
    release_wal(gw, holder)
    eventually(lambda: consumer.acked == 50, what="all acked")
    gw.wait_processed(50)
    eventually(lambda: len(lake(tmp_path)) == 50, what="50 lake records")
    records = lake(tmp_path)
    assert sorted(seqs(records)) == list(range(50))
    assert {r["protocol"] for r in records} == {"amqp"}
    assert {r["device"] for r in records} == {f"dev-{i}" for i in range(5)}
    # The acks were batched: far fewer frames than messages.
    assert metric(gw, "iotgw_amqp_settle_frames_total") <= 5
    assert metric(gw, "iotgw_amqp_acked_messages_total") == 50
    assert 'iotgw_messages_received_total{protocol="amqp"} 50.0' in gw.metrics()
    assert depth(queue) == 0


def test_a_cut_link_loses_nothing_and_redeliveries_are_not_taken_twice(
        proxy: TcpProxy, gateway_factory: Callable[..., RunningGateway], amqp: Any,
        names: Names, tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue, via(proxy))))
    eventually(lambda: consumer.connects == 1, what="connected through the proxy")
    holder = hold_wal(gw)
    publish([message(i) for i in range(40)], queue)
    eventually(lambda: holder.held_messages == 40, what="all 40 submitted")
    proxy.cut()
    # Nothing was acked: RabbitMQ takes all 40 back.
    eventually(lambda: depth(queue) == 40, what="the 40 requeued")
    release_wal(gw, holder)  # the append completes after the link is gone: no ack possible
    gw.wait_processed(40)
    proxy.restore()
    eventually(lambda: consumer.connects == 2, what="reconnected by itself")
    eventually(lambda: consumer.duplicates == 40, what="the redeliveries recognised")
    eventually(lambda: depth(queue) == 0 and consumer.acked == 40, what="acked after all")
    eventually(lambda: len(lake(tmp_path)) >= 40)
    time.sleep(1.2)  # one more sink flush: any duplicate would show
    assert sorted(seqs(lake(tmp_path))) == list(range(40))
    assert gw.stats()["received"] == 40


def test_the_consumer_reconnects_by_itself_while_producers_go_on(
        proxy: TcpProxy, gateway_factory: Callable[..., RunningGateway], amqp: Any,
        names: Names, tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue, via(proxy))))
    eventually(lambda: consumer.connects == 1)
    total = 600

    def produce() -> None:
        for start in range(0, total, 50):
            publish([message(i) for i in range(start, start + 50)], queue)
            time.sleep(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    for cut in range(2):
        eventually(lambda n=cut + 1: consumer.connects == n and gw.stats()["received"] > 0,
                   what="consuming again")
        time.sleep(0.2)
        proxy.cut()
        time.sleep(0.3)
        proxy.restore()
    producer.join(30)
    eventually(lambda: len(set(seqs(lake(tmp_path)))) == total, timeout=30,
               what="every message in the lake")
    eventually(lambda: depth(queue) == 0)
    assert consumer.connects >= 3
    records = seqs(lake(tmp_path))
    assert sorted(set(records)) == list(range(total))
    # Duplicates only within the in-flight window (and none here: message ids are set).
    assert len(records) - total <= consumer.prefetch
    assert len(records) == total


def test_a_half_open_link_is_given_up_and_its_deliveries_come_back(
        proxy: TcpProxy, gateway_factory: Callable[..., RunningGateway], amqp: Any,
        names: Names, tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue, via(proxy))))
    eventually(lambda: consumer.connects == 1)
    publish([message(i) for i in range(20)], queue)
    gw.wait_processed(20)
    proxy.half_open()  # silent: nothing forwarded, nothing closed
    publish([message(i) for i in range(20, 40)], queue)
    time.sleep(0.5)
    assert gw.stats()["received"] == 20
    # Heartbeats (1 s here) find the link silent; the consumer gives it up by itself.
    eventually(lambda: not consumer.connected.is_set(), timeout=20, what="link given up")
    proxy.restore()
    eventually(lambda: consumer.connects >= 2, timeout=20, what="reconnected")
    gw.wait_processed(40, timeout=20)
    eventually(lambda: len(lake(tmp_path)) >= 40)
    eventually(lambda: depth(queue) == 0)
    assert sorted(seqs(lake(tmp_path))) == list(range(40))


def test_a_slow_link_still_delivers_everything(
        proxy: TcpProxy, gateway_factory: Callable[..., RunningGateway], amqp: Any,
        names: Names, tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue, via(proxy))))
    eventually(lambda: consumer.connects == 1)
    proxy.delay(0.05)
    publish([message(i) for i in range(100)], queue)
    gw.wait_processed(100, timeout=20)
    eventually(lambda: consumer.acked == 100 and depth(queue) == 0)
    eventually(lambda: len(lake(tmp_path)) == 100)
    assert sorted(seqs(lake(tmp_path))) == list(range(100))


def test_overload_nacks_with_requeue_and_the_work_is_taken_later(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue)))
    ingest = gw.gateway.ingest
    call_on_loop(gw, lambda: setattr(ingest, "accepting", False))
    publish([message(i) for i in range(30)], queue)
    eventually(lambda: metric(gw, 'iotgw_amqp_requeued_messages_total{reason="overload"}') >= 60,
               what="refused, nacked, redelivered and refused again")
    assert gw.stats()["received"] == 0
    assert consumer.acked == 0
    assert metric(gw, 'iotgw_messages_refused_total{protocol="amqp",reason="overload"}') >= 60
    call_on_loop(gw, lambda: setattr(ingest, "accepting", True))
    gw.wait_processed(30)
    eventually(lambda: consumer.acked == 30 and depth(queue) == 0)
    eventually(lambda: len(lake(tmp_path)) == 30)
    assert sorted(seqs(lake(tmp_path))) == list(range(30))  # each taken once


def test_headers_routing_keys_and_users_give_device_topic_and_classification(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        tmp_path: Path) -> None:
    rule = '[[classify.rules]]\nmatch = { username = "guest" }\ntier = "premium"\n'
    gw = gateway_factory(rule)
    queue = names.queue()
    exchange = names.exchange("ingress")
    amqp(gw, section_for(IngestQueue(name=queue, bindings=[
        QueueBinding(exchange=exchange, routing_key="#")])))
    publish([message(0)], "medical.pump-1.vitals", exchange)
    publish([message(1, headers={"device": "meter-7"}),
             message(2, app_id="sensor-9"),
             message(3, headers={"device": "b-1", "topic": "bulk/b-1/energy"}),
             message(4, headers={"device": "u-1"}, user_id="guest"),
             message(5, headers={"device": "x-1", "topic": "not/a/#/topic"})], queue)
    eventually(lambda: len(lake(tmp_path)) == 6, what="6 lake records")
    by_seq = {r["payload"]["seq"]: r for r in lake(tmp_path)}
    got = {seq: (r["device"], r["topic"], r["tier"]) for seq, r in by_seq.items()}
    assert got == {
        0: ("pump-1", "medical/pump-1/vitals", "critical"),  # routing key → topic → rule
        1: ("meter-7", f"amqp/{queue}/meter-7", "standard"),
        2: ("sensor-9", f"amqp/{queue}/sensor-9", "standard"),
        3: ("b-1", "bulk/b-1/energy", "bulk"),
        4: ("u-1", f"amqp/{queue}/u-1", "premium"),  # user_id → username rule
        5: ("x-1", f"amqp/{queue}/x-1", "standard"),  # a topic with a wildcard is ignored
    }
    assert by_seq[0]["device_class"] == "medical"


def test_priority_and_the_tier_header_choose_the_tier(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    amqp(gw, section_for(queue, priority_tiers=[PriorityTier(priority=8, tier="critical"),
                                                 PriorityTier(priority=4, tier="premium")]))
    publish([message(0, priority=9, headers={"device": "d0"}),
             message(1, priority=5, headers={"device": "d1"}),
             message(2, priority=1, headers={"device": "d2"}),
             message(3, priority=9, headers={"device": "d3", "tier": "bulk"}),
             message(4, priority=4, headers={"device": "d4", "tier": "no-such-tier"}),
             message(5, headers={"device": "d5", "topic": "medical/d5"}, priority=5)], queue)
    eventually(lambda: len(lake(tmp_path)) == 6, what="6 lake records")
    tiers = {r["payload"]["seq"]: r["tier"] for r in lake(tmp_path)}
    assert tiers == {0: "critical", 1: "premium", 2: "standard", 3: "bulk", 4: "premium",
                     5: "premium"}


def test_a_quorum_queue_is_consumed_too(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue("quorum")
    consumer = consumer_of(amqp(gw, section_for(IngestQueue(name=queue, type="quorum",
                                                            max_priority=None))))
    publish([message(i) for i in range(25)], queue)
    eventually(lambda: consumer.acked == 25 and depth(queue) == 0)
    eventually(lambda: len(lake(tmp_path)) == 25)
    assert sorted(seqs(lake(tmp_path))) == list(range(25))


def test_a_queue_declared_otherwise_is_reported_and_tried_again(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        caplog: pytest.LogCaptureFixture) -> None:
    queue = names.queue()

    async def declare_plain() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True)  # no x-max-priority

    run_async(declare_plain)
    gw = gateway_factory()
    handle = on_loop(gw, start_amqp(section_for(queue), gw.gateway.ingest, gw.gateway.metrics))
    try:
        eventually(lambda: metric(gw, 'iotgw_amqp_link_errors_total{link="ingest"}') >= 2,
                   what="refused, and tried again")
        assert consumer_of(handle).connects == 0
        refusals = [r for r in caplog.records if "PRECONDITION_FAILED" in r.getMessage()]
        assert len(refusals) >= 2 and {r.levelname for r in refusals} == {"ERROR"}
        assert gw.stats()["received"] == 0
    finally:
        on_loop(gw, handle.close())


def test_a_deleted_queue_is_declared_again_and_consumed(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names,
        tmp_path: Path) -> None:
    gw = gateway_factory()
    queue = names.queue()
    consumer = consumer_of(amqp(gw, section_for(queue)))
    publish([message(i) for i in range(5)], queue)
    gw.wait_processed(5)

    async def delete() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)

    run_async(delete)  # the server cancels the consumer
    eventually(lambda: consumer.connects == 2, what="consuming the new queue")
    publish([message(i) for i in range(5, 10)], queue)
    gw.wait_processed(10)
    eventually(lambda: len(lake(tmp_path)) == 10)
    assert sorted(seqs(lake(tmp_path))) == list(range(10))


# -- output ---------------------------------------------------------------------------------------

def sink_config(url: str, exchange: str) -> tuple[str, str]:
    """(base config routing to the lake and an ``amqp`` sink, its extra section)."""
    base = DEFAULT_TOML.replace('{ type = "route", sinks = ["lake"] }',
                                '{ type = "route", sinks = ["lake", "amqp"] }')
    assert base != DEFAULT_TOML
    options = {"url": url, "exchange": exchange, "confirm_timeout_s": 1.0,
               "heartbeat_s": 1, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5,
               "connect_timeout_s": 2.0}
    extra = "[sinks.amqp]\ntype = \"amqp\"\noptions = " + _inline(options) + "\n"
    return base, extra


def _inline(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


def submit(gw: RunningGateway, items: list[Inbound]) -> None:
    ingest = gw.gateway.ingest
    assert call_on_loop(gw, lambda: ingest.submit("coap", items)) is True


@pytest.fixture
def amqp_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until ``amqp`` is in BUILTIN_SINKS, register it for the gateway under test."""
    monkeypatch.setitem(sinks_module.SINKS, "amqp", AmqpSink)


def test_processed_results_are_published_with_confirms_then_retired(
        gateway_factory: Callable[..., RunningGateway], amqp_sink: None, names: Names) -> None:
    exchange = names.exchange("processed")
    collector = Collector(exchange).start()
    try:
        base, extra = sink_config(URL, exchange)
        gw = gateway_factory(extra, base)
        submit(gw, [Inbound(f"dev-{i}", f"t/dev-{i}", json.dumps({"seq": i}).encode(), qos=1)
                    for i in range(30)])
        eventually(lambda: len(collector.got) == 30, what="30 published")
        eventually(lambda: gw.stats()["wal_unretired"] == 0, what="retired once confirmed")
        keys = sorted(key for key, _, _ in collector.got)
        assert keys == sorted(f"default.standard.dev-{i}" for i in range(30))
        for _, body, message_id in collector.got:
            assert body["id"] == message_id
            assert body["protocol"] == "coap"
            assert body["payload"] == {"seq": int(body["device"].split("-")[1])}
        assert metric(gw, 'iotgw_sink_records_total{sink="amqp"}') == 30
    finally:
        collector.stop()


def test_the_sink_spools_while_rabbitmq_is_away_and_drains_in_order(
        proxy: TcpProxy, gateway_factory: Callable[..., RunningGateway], amqp_sink: None,
        names: Names) -> None:
    exchange = names.exchange("processed")
    collector = Collector(exchange).start()
    try:
        base, extra = sink_config(via(proxy), exchange)
        gw = gateway_factory(extra, base)

        def send(numbers: range) -> None:
            submit(gw, [Inbound("seq-dev", "t/seq-dev", json.dumps({"seq": i}).encode(),
                                qos=1) for i in numbers])

        send(range(20))
        eventually(lambda: len(collector.got) == 20, what="the first 20")
        eventually(lambda: gw.stats()["wal_unretired"] == 0)
        proxy.cut()
        for start in range(20, 120, 20):
            send(range(start, start + 20))
        gw.wait_processed(120)
        time.sleep(2.5)  # two sink flushes at least: both fail
        stats = gw.stats()
        assert stats["wal_unretired"] == 100, stats  # spooled in the WAL, none retired
        assert len(collector.got) == 20
        assert metric(gw, 'iotgw_sink_errors_total{sink="amqp"}') >= 2
        assert metric(gw, 'iotgw_amqp_connected{link="sink:amqp"}') == 0
        proxy.restore()
        eventually(lambda: len({b["payload"]["seq"] for _, b, _ in collector.got}) == 120,
                   what="everything published after the link came back")
        eventually(lambda: gw.stats()["wal_unretired"] == 0, what="all retired")
        order = [b["payload"]["seq"] for _, b, _ in collector.got]
        first_seen = list(dict.fromkeys(order))
        assert first_seen == list(range(120))  # in order
        assert len(order) - 120 <= 1000  # duplicates only within one window
    finally:
        collector.stop()


def test_alerts_are_published_to_the_alerts_exchange(
        gateway_factory: Callable[..., RunningGateway], amqp: Any, names: Names) -> None:
    exchange = names.exchange("alerts")
    collector = Collector(exchange).start()
    try:
        gw = gateway_factory()
        queue = names.queue()
        section = section_for(queue)
        section = msgspec.structs.replace(section, alerts=msgspec.structs.replace(
            section.alerts, exchange=exchange))
        handle = amqp(gw, section)
        payload = msgspec.json.encode(Alert(
            detector="heart-rate", device="pump.7", severity="critical", value=250.0,
            reason="above 180", raised_at=datetime(2026, 1, 1, tzinfo=UTC),
            escalated=False, tenant="acme", tier="critical"))
        call_on_loop(gw, lambda: handle.publish_alert("alerts/critical/pump.7", payload))
        eventually(lambda: len(collector.got) == 1, what="the alert")
        key, body, _ = collector.got[0]
        assert key == "acme.critical.pump%2E7"  # a dot in a device id is escaped
        assert body["device"] == "pump.7" and body["severity"] == "critical"
        eventually(lambda: metric(gw, 'iotgw_amqp_published_messages_total{link="alerts"}') == 1)
    finally:
        collector.stop()


# -- the daemon, wired ---------------------------------------------------------------------------

def test_serve_with_amqp_url_consumes_publishes_results_and_alerts(
        tmp_path: Path, names: Names) -> None:
    queue = names.queue()
    processed, alerts = names.exchange("processed"), names.exchange("alerts")
    (tmp_path / "gateway.toml").write_text(config_text_for(tmp_path) + f"""
[amqp]
queues = [{{ name = "{queue}" }}]
processed = {{ exchange = "{processed}", routing_key = "{{tenant}}.{{tier}}.{{device}}" }}
alerts = {{ exchange = "{alerts}", routing_key = "{{tenant}}.{{severity}}.{{device}}" }}
""")
    results, alarms = Collector(processed).start(), Collector(alerts).start()
    try:
        proc = start_serve(tmp_path, "--config", str(tmp_path / "gateway.toml"),
                           "--amqp-url", URL)
        eventually(lambda: "AMQP ingest: consuming" in proc.log_text(), what="consuming")
        publish([message(i, headers={"device": f"d{i}"}) for i in range(50)], queue)
        publish([aio_pika.Message(b'{"heart_rate": 250}', message_id="hr", headers={
            "device": "pump-7", "topic": "medical/pump-7/vitals"})], queue)
        eventually(lambda: len(results.got) == 51, what="51 results published")
        eventually(lambda: len(alarms.got) == 1, what="the alert")
        assert alarms.got[0][0] == "default.critical.pump-7"
        assert {key for key, _, _ in results.got} >= {"default.standard.d0",
                                                      "default.critical.pump-7"}
        eventually(lambda: admin_get(proc.admin_port, "/v1/stats")["wal_unretired"] == 0)
        assert stop(proc) == 0
        assert depth(queue) == 0
    finally:
        results.stop()
        alarms.stop()


def config_text_for(tmp_path: Path) -> str:
    from tests.conftest import config_text

    return config_text(tmp_path).replace('listen = "127.0.0.1:1883"',
                                         'listen = "127.0.0.1:0"')
