"""AMQP ingest: RabbitMQ queues → ``MQTTIngest.submit``, acknowledged after the durable append.

Theory of operation
-------------------
One connection (``client.AmqpClientProtocol`` over the sans-I/O ``wire.ClientConnection``),
one channel, one consumer per configured queue, ``basic.qos`` prefetch sized from the
gateway's capacity. Everything one read of the socket delivered arrives as one list
(``take``), is mapped (``mapping.InboundMapper``) and handed to ``submit`` as one batch (at
most ``max_batch`` deliveries each) at QoS 1: made durable before ``done(True)``. No task,
future or lock per delivery.

Settling. Delivery tags are per channel and ascending, and each batch covers a contiguous run
of them. Batches are decided in any order (a commit may fail, a refused batch waits), but
settlements go out in tag order: the head of ``batches`` is settled as far as it is decided,
and consecutive batches with the same outcome make one ``basic.ack`` (or ``basic.nack`` with
requeue) with ``multiple=True``. Settling runs once per loop turn in which something was
decided (``call_soon``), and the WAL calls back every batch of a group commit in one turn, so
one frame usually acknowledges everything a commit made durable.

Overload. ``submit`` returns False when the gateway takes no work now (draining, the WAL
refusing, the backlog past ``dispatch.max_queued``): that batch and every later one are
parked, and ``refused_delay_s`` later all parked deliveries are nacked with requeue, so that
RabbitMQ hands them to another consumer or back to us without a busy loop; while refusals go
on the delay doubles (up to ``refused_max_delay_s``), and the first accepted batch resets it.
Later batches are parked too so that a queue's order holds.

Link loss. When the connection closes (the broker went away, the proxy cut it, heartbeats
found it silent, the server closed the channel or cancelled the consumer), the session is
abandoned: its tags mean nothing on the next channel, so outcomes that arrive later are
ignored; RabbitMQ requeues every unsettled delivery. Those already durable here come back
flagged ``redelivered``: if their ``message_id`` is among the last ``dedupe_window`` made
durable, they are acked without being taken again; otherwise they are taken twice.
Duplicates are therefore bounded by the deliveries in flight (the prefetch), and are none
for publishers that set message ids. A new connection is tried after an exponential backoff
with jitter (``reconnect_initial_s`` up to ``reconnect_max_s``), reset after each successful
connect.

Shutdown (``close``): the consumers are cancelled, in-flight appends get ``close_timeout_s``
to finish so that they are acked rather than redelivered, then the connection closes
(RabbitMQ requeues what is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from functools import partial
from typing import Any, Protocol

from pamqp import commands

from gateway.ingest import Inbound
from gateway.urls import display_url
from protocols.amqp.client import AmqpClientProtocol, Endpoint, LinkLost, open_client
from protocols.amqp.config import AmqpSection, IngestQueue
from protocols.amqp.link import LINK_ERRORS, AmqpMetrics, Backoff
from protocols.amqp.mapping import InboundMapper
from protocols.amqp.wire import Delivery

log = logging.getLogger("iotgw.amqp.ingest")

PROTOCOL = "amqp"
LINK = "ingest"
CHANNEL = 1
WAITING, ACK, NACK = 0, 1, 2
_ERRORS = (*LINK_ERRORS, LinkLost)


class Submitter(Protocol):
    """What the consumer needs from the gateway (``gateway.ingest.MQTTIngest``)."""

    def submit(self, protocol: str, items: list[Inbound],
               done: Callable[[bool], None] | None = None) -> bool: ...


class Settler(Protocol):
    """Where settlements go (``client.AmqpClientProtocol``): multiple, requeue on nack."""

    def ack(self, channel: int, delivery_tag: int) -> None: ...

    def nack(self, channel: int, delivery_tag: int) -> None: ...


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Batch:
    __slots__ = ("ids", "last_tag", "outcome", "size")

    def __init__(self, last_tag: int, size: int, ids: list[str]) -> None:
        self.last_tag = last_tag
        self.size = size
        self.ids = ids
        self.outcome = WAITING


class _Session:
    """One channel's deliveries: taking them in, and settling them in tag order."""

    def __init__(self, consumer: AmqpConsumer, link: Settler, queues: dict[str, str]) -> None:
        self.consumer = consumer
        self.link = link
        self.queues = queues
        """Consumer tag → queue name."""
        self.open = True
        self.taking = True
        self.batches: deque[_Batch] = deque()
        self.parked: list[_Batch] = []
        self.waiting = 0  # batches whose append is in flight
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._settle_scheduled = False
        self._requeue_timer: asyncio.TimerHandle | None = None

    # -- taking deliveries in ------------------------------------------------------------
    def take(self, deliveries: list[Delivery]) -> None:
        """What one read delivered (the adapter's ``on_deliveries``)."""
        if not self.open or not self.taking:
            return  # not settled: requeued when the channel closes
        size = self.consumer.max_batch
        if len(deliveries) <= size:
            self._submit(deliveries)
            return
        for start in range(0, len(deliveries), size):
            self._submit(deliveries[start:start + size])

    def _submit(self, chunk: list[Delivery]) -> None:
        consumer = self.consumer
        recent = consumer.recent
        remember = consumer.dedupe_window > 0
        map_ = consumer.mapper.map
        queues = self.queues
        items: list[Inbound] = []
        ids: list[str] = []
        duplicates = 0
        for d in chunk:
            props = d.properties
            message_id = props.message_id
            if message_id is not None:
                if d.redelivered and message_id in recent:
                    duplicates += 1
                    continue
                if remember:
                    ids.append(message_id)
            device, topic, username, tier = map_(
                queues.get(d.consumer_tag, ""), d.exchange, d.routing_key, props.headers,
                props.app_id, props.user_id, props.priority)
            items.append(Inbound(device, topic, d.body, 1, username, tier))
        if duplicates:
            consumer.duplicates += duplicates
            consumer.metrics.duplicates.inc(duplicates)
        batch = _Batch(chunk[-1].delivery_tag, len(chunk), ids)
        self.batches.append(batch)
        if self.parked:  # refusing: later batches wait too, so that order holds
            self._park(batch)
            return
        if not items:  # only duplicates
            batch.outcome = ACK
            self._settle_soon()
            return
        self.waiting += 1
        if consumer.ingest.submit(PROTOCOL, items, partial(self._done, batch)):
            consumer.refused_delay_s = consumer.section.refused_delay_s
        else:
            self.waiting -= 1
            self._park(batch)

    def _done(self, batch: _Batch, durable: bool) -> None:
        consumer = self.consumer
        if durable:
            consumer.remember(batch.ids)
        if not self.open:  # the link went away meanwhile: RabbitMQ redelivers them
            return
        self.waiting -= 1
        if durable:
            batch.outcome = ACK
        else:
            batch.outcome = NACK
            consumer.metrics.requeued.labels("commit_failed").inc(batch.size)
            log.error("%d AMQP deliveries not made durable: nacked with requeue", batch.size)
        self.changed.set()
        self._settle_soon()

    def _park(self, batch: _Batch) -> None:
        self.parked.append(batch)
        consumer = self.consumer
        consumer.refused += batch.size
        consumer.refused_counter.inc(batch.size)
        if self._requeue_timer is None:
            self._requeue_timer = self._loop.call_later(consumer.refused_delay_s,
                                                        self._requeue_parked)

    def _requeue_parked(self) -> None:
        self._requeue_timer = None
        if not self.open:
            return
        count = 0
        for batch in self.parked:
            batch.outcome = NACK
            count += batch.size
        self.parked.clear()
        consumer = self.consumer
        consumer.metrics.requeued.labels("overload").inc(count)
        # Still refused after this: wait longer next time (reset by the next accepted batch).
        consumer.refused_delay_s = min(consumer.section.refused_max_delay_s,
                                       consumer.refused_delay_s * 2)
        self._settle()

    # -- settling, in tag order ------------------------------------------------------------
    def _settle_soon(self) -> None:
        if not self._settle_scheduled:
            self._settle_scheduled = True
            self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        self._settle_scheduled = False
        if not self.open:
            return
        batches = self.batches
        consumer = self.consumer
        metrics = consumer.metrics
        while batches and batches[0].outcome != WAITING:
            outcome = batches[0].outcome
            last, count = 0, 0
            while batches and batches[0].outcome == outcome:
                batch = batches.popleft()
                last = batch.last_tag
                count += batch.size
            if outcome == ACK:
                self.link.ack(CHANNEL, last)
                consumer.acked += count
                metrics.acked.inc(count)
            else:
                self.link.nack(CHANNEL, last)
            consumer.settle_frames += 1
            metrics.settle_frames.inc()

    # -- endings -----------------------------------------------------------------------------
    async def finish(self, timeout: float) -> None:
        """Stop taking; wait for appends in flight (up to ``timeout``) and settle them."""
        self.taking = False
        loop = self._loop
        deadline = loop.time() + timeout
        while self.waiting > 0 and loop.time() < deadline:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await self.changed.wait()
        if self._requeue_timer is not None:
            self._requeue_timer.cancel()
            self._requeue_timer = None
        for batch in self.parked:
            batch.outcome = NACK
        self.parked.clear()
        self._settle()
        self.open = False

    def abandon(self) -> None:
        """The channel is gone: nothing of it can be settled any more."""
        self.open = False
        self.parked.clear()
        self.batches.clear()
        if self._requeue_timer is not None:
            self._requeue_timer.cancel()
            self._requeue_timer = None


class AmqpConsumer:
    """Consumes ``section.queues`` into ``ingest``; ``start()``, then ``close()``."""

    def __init__(self, section: AmqpSection, ingest: Submitter, metrics: AmqpMetrics,
                 refused_counter: _Inc, *, prefetch: int, tiers: Collection[str],
                 name: str = "iot-gateway") -> None:
        assert section.url is not None
        self.section = section
        self.ingest = ingest
        self.metrics = metrics
        self.refused_counter = refused_counter
        self.prefetch = prefetch
        self.max_batch = section.max_batch
        self.refused_delay_s = section.refused_delay_s
        self.dedupe_window = section.dedupe_window
        self.mapper = InboundMapper(section, tiers)
        self.endpoint = Endpoint(section.url, section.heartbeat_s, f"{name} ingest")
        self.where = display_url(section.url)
        self.recent: OrderedDict[str, None] = OrderedDict()
        """Message ids of the latest deliveries made durable (the dedupe window)."""
        self.connected = asyncio.Event()
        self.connects = 0
        self.acked = 0
        self.refused = 0
        self.duplicates = 0
        self.settle_frames = 0
        self._backoff = Backoff(section.reconnect_initial_s, section.reconnect_max_s)
        self._down = False  # the link is lost and that was logged
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected_gauge = metrics.connected.labels(LINK)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="amqp-ingest")

    def remember(self, ids: list[str]) -> None:
        if not ids:
            return
        recent = self.recent
        for message_id in ids:
            recent[message_id] = None
        for _ in range(len(recent) - self.dedupe_window):
            recent.popitem(last=False)

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._serve()
            except _ERRORS as err:
                self.metrics.link_errors.labels(LINK).inc()
                # Once per outage at WARNING, the attempts while it lasts at DEBUG; a setup the
                # broker refuses (a queue declared otherwise, access) at ERROR every time.
                level = logging.DEBUG if self._down else logging.WARNING
                if isinstance(err, LinkLost) and err.refused:
                    level = logging.ERROR
                self._down = True
                log.log(level, "AMQP ingest from %s: %s", self.where, _describe(err))
            except Exception:  # ours: logged, and the link is tried again all the same
                self._down = True
                self.metrics.link_errors.labels(LINK).inc()
                log.exception("AMQP ingest from %s failed", self.where)
            if self._stop.is_set():
                break
            delay = self._backoff.next_delay()
            log.debug("AMQP ingest: reconnecting to %s in %.1f s", self.where, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _serve(self) -> None:
        section = self.section
        queues: dict[str, str] = {}
        session: _Session | None = None

        def deliveries(batch: list[Delivery]) -> None:
            if session is not None:
                session.take(batch)

        client = await open_client(self.endpoint, deliveries, section.connect_timeout_s)
        try:
            async with asyncio.timeout(section.connect_timeout_s):
                await client.call(CHANNEL, commands.Channel.Open(), commands.Channel.OpenOk)
                await client.call(CHANNEL, commands.Basic.Qos(prefetch_count=self.prefetch),
                                  commands.Basic.QosOk)
                for queue in section.queues:
                    await _declare(client, queue, passive=not section.declare)
            session = _Session(self, client, queues)
            async with asyncio.timeout(section.connect_timeout_s):
                for queue in section.queues:
                    tag = f"{self.endpoint.name}:{queue.name}"
                    queues[tag] = queue.name
                    await client.call(CHANNEL, commands.Basic.Consume(
                        queue=queue.name, consumer_tag=tag), commands.Basic.ConsumeOk)
            self.connects += 1
            self.metrics.connects.labels(LINK).inc()
            self._connected_gauge.set(1)
            self.connected.set()
            self._backoff.reset()
            self._down = False
            log.info("AMQP ingest: consuming %s from %s (prefetch %d)",
                     ", ".join(q.name for q in section.queues), self.where, self.prefetch)
            stopping = asyncio.ensure_future(self._stop.wait())
            either: list[asyncio.Future[Any]] = [client.closed, stopping]
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not client.closed.done():  # asked to stop: a clean end
                with contextlib.suppress(*_ERRORS):
                    async with asyncio.timeout(section.close_timeout_s):
                        for tag in queues:
                            await client.call(CHANNEL, commands.Basic.Cancel(consumer_tag=tag),
                                              commands.Basic.CancelOk)
                await session.finish(section.close_timeout_s)
                return
            self.metrics.link_errors.labels(LINK).inc()
            self._down = True
            log.warning("AMQP ingest from %s: link lost (%s); RabbitMQ redelivers the %d "
                        "deliveries not acknowledged", self.where,
                        _describe(client.closed.exception() or "closed"),
                        sum(b.size for b in session.batches))
        finally:
            if session is not None:
                session.abandon()
            self._connected_gauge.set(0)
            self.connected.clear()
            await client.close(timeout=2.0)

    async def close(self) -> None:
        """Stop consuming: in-flight appends are acked (up to ``close_timeout_s``), the rest
        is requeued by RabbitMQ when the connection closes."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        if not self.connected.is_set():  # connecting, or waiting to: nothing to finish
            task.cancel()
        try:
            async with asyncio.timeout(self.section.close_timeout_s + 5.0):
                await task
        except TimeoutError:
            log.warning("AMQP ingest did not stop in time; its connection is dropped")
        except asyncio.CancelledError:
            if not task.cancelled():
                raise


async def _declare(client: AmqpClientProtocol, queue: IngestQueue, passive: bool) -> None:
    if passive:
        await client.call(CHANNEL, commands.Queue.Declare(queue=queue.name, passive=True),
                          commands.Queue.DeclareOk)
        return
    await client.call(CHANNEL, commands.Queue.Declare(
        queue=queue.name, durable=True, arguments=dict(queue.declare_arguments())),
        commands.Queue.DeclareOk)
    for binding in queue.bindings:
        await client.call(CHANNEL, commands.Exchange.Declare(
            exchange=binding.exchange, exchange_type="topic", durable=True),
            commands.Exchange.DeclareOk)
        await client.call(CHANNEL, commands.Queue.Bind(
            queue=queue.name, exchange=binding.exchange, routing_key=binding.routing_key),
            commands.Queue.BindOk)


def _describe(err: BaseException | str) -> str:
    if isinstance(err, str):
        return err
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
