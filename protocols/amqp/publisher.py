"""Publishing to one exchange with publisher confirms, in order, over a link that comes back.

Theory of operation
-------------------
``put`` (synchronous, on the loop) appends messages to ``queue``; nothing leaves the queue
before RabbitMQ confirmed it. One task owns the link: it connects (its own connection, as
RabbitMQ advises for publishers: flow control on a publishing connection must not stall a
consuming one), opens a channel in confirm mode, declares the exchange when asked to, then
keeps the first ``window`` messages of the queue published: the publish frames are written
synchronously, from ``put`` or from a confirm, with no task, future or await per message.
Confirms (``Basic.Ack``, usually ``multiple``) pop the confirmed head of the queue; a broker
``Basic.Nack`` or a lost link ends the connection, and on the next one everything still
unconfirmed is published again, first, so the order of first publication holds and a message
may arrive twice (at least once; receivers dedupe by ``message_id``).

``wait_confirmed(timeout)`` returns once everything put before the call is confirmed, and
raises ``AmqpUnavailable`` at once while the link is down (a connect failed or the link was
lost, and none succeeded since), or when the confirms take longer than ``timeout``. Callers
therefore never retire work that RabbitMQ has not taken.

While RabbitMQ is away the queue grows; past ``max_buffered`` messages, new messages that
may be dropped (``keep=False``: QoS 0 results, alerts) are dropped and counted; the others
are kept (for results, the write-ahead log bounds them: it refuses new work past
``wal.max_unretired``). Connection attempts back off exponentially with jitter. A lost link
is logged once at WARNING; failed attempts while it stays down go to DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, NamedTuple

from pamqp import commands
from pamqp.base import Frame

from gateway.urls import display_url
from protocols.amqp.client import AmqpClientProtocol, Endpoint, LinkLost, open_client
from protocols.amqp.errors import AmqpUnavailable
from protocols.amqp.link import LINK_ERRORS, AmqpMetrics, Backoff
from protocols.amqp.wire import short_str

log = logging.getLogger("iotgw.amqp.publish")

CHANNEL = 1
_LINK_ERRORS = (*LINK_ERRORS, AmqpUnavailable, LinkLost)


class Outgoing(NamedTuple):
    routing_key: str
    body: bytes
    properties: bytes
    """``wire.encode_properties(...)``."""
    keep: bool = True
    """False: may be dropped when too many messages wait (QoS 0 results, alerts)."""


class LinkSettings(NamedTuple):
    heartbeat_s: int = 15
    connect_timeout_s: float = 10.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0


DEFAULT_LINK = LinkSettings()


class ConfirmedPublisher:
    """Publishes what is ``put``, in order, to one exchange; see the module doc."""

    def __init__(self, link: str, url: str, exchange: str, metrics: AmqpMetrics, *,
                 exchange_type: str = "topic", declare: bool = True,
                 settings: LinkSettings = DEFAULT_LINK, window: int = 1000,
                 max_buffered: int = 100_000, name: str = "iot-gateway") -> None:
        self.link = link
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.declare = declare and bool(exchange)
        self.settings = settings
        self.window = window
        self.max_buffered = max_buffered
        self.endpoint = Endpoint(url, settings.heartbeat_s, f"{name} {link}")
        self.where = display_url(url)
        self.queue: deque[Outgoing] = deque()
        self.accepted = 0
        """Messages put and kept so far."""
        self.confirmed = 0
        """Messages RabbitMQ confirmed so far (the first ``confirmed`` of ``accepted``)."""
        self.dropped = 0
        self.connects = 0
        self.down = False
        """A connect failed or the link was lost, and no connect succeeded since: waiting for
        confirms fails at once (the first connect, still under way, is not "down")."""
        self.buffered_bytes = 0
        self._exchange = short_str(exchange)
        self._metrics = metrics
        self._published = metrics.published.labels(link)
        self._unconfirmed = metrics.unconfirmed.labels(link)
        self._dropped = metrics.dropped.labels(link)
        self._connected = metrics.connected.labels(link)
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Future[None] | None = None
        self._closing = False
        self._client: AmqpClientProtocol | None = None  # set while publishing
        self._in_flight = 0  # the first _in_flight of queue are published on this channel
        self._head_tag = 1  # the delivery tag of queue[0] on this channel
        self._acked_ahead: set[int] = set()

    @property
    def connected(self) -> bool:
        return self._client is not None

    # -- the loop's side: cheap, never blocks ------------------------------------------------
    def put(self, messages: list[Outgoing]) -> None:
        if self._closing:
            raise AmqpUnavailable(f"AMQP {self.link}: closed")
        queue = self.queue
        room = self.max_buffered - len(queue)
        kept = 0
        added = 0
        for message in messages:
            if room <= 0 and not message.keep:
                self.dropped += 1
                self._dropped.inc()
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.error("AMQP %s: %d messages held for %s; dropping those that may be "
                              "dropped (%d so far)", self.link, len(queue), self.where,
                              self.dropped)
                continue
            queue.append(message)
            room -= 1
            kept += 1
            added += len(message.body)
        if not kept:
            return
        self.accepted += kept
        self.buffered_bytes += added
        self._unconfirmed.set(len(queue))
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._changed = loop.create_future()
            self._task = loop.create_task(self._run(), name=f"amqp-{self.link}")
        elif self._client is not None:
            self._publish_more(self._client)

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            if not changed.done():
                changed.set_result(None)
            self._changed = asyncio.get_running_loop().create_future()

    # -- waiting for confirms ----------------------------------------------------------------
    async def wait_confirmed(self, timeout: float) -> None:
        """Return once everything put so far is confirmed; raise ``AmqpUnavailable`` while
        the link is down or after ``timeout`` seconds."""
        target = self.accepted
        if self.confirmed >= target:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.confirmed < target:
            if self.down:
                raise AmqpUnavailable(
                    f"AMQP {self.link}: RabbitMQ at {self.where} unreachable; "
                    f"{target - self.confirmed} messages wait for it")
            changed = self._changed
            assert changed is not None
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await asyncio.shield(changed)
            except TimeoutError:
                raise AmqpUnavailable(
                    f"AMQP {self.link}: {target - self.confirmed} messages not confirmed by "
                    f"RabbitMQ at {self.where} within {timeout:g} s") from None

    async def close(self, timeout: float) -> None:
        """Wait (up to ``timeout``, unless the link is down) for the confirms, then stop.
        Raises ``AmqpUnavailable`` if messages were left unconfirmed."""
        task = self._task
        try:
            if task is not None:
                await self.wait_confirmed(timeout)
        finally:
            self._closing = True
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._task = None
        left = self.accepted - self.confirmed
        if left:
            raise AmqpUnavailable(f"AMQP {self.link}: closed with {left} messages that "
                                  f"RabbitMQ at {self.where} did not confirm")

    # -- the link ------------------------------------------------------------------------------
    async def _run(self) -> None:
        down_logged = False
        while not self._closing:
            client: AmqpClientProtocol | None = None
            try:
                settings = self.settings
                client = await open_client(self.endpoint, _no_deliveries,
                                           settings.connect_timeout_s, self._on_method)
                async with asyncio.timeout(settings.connect_timeout_s):
                    await client.call(CHANNEL, commands.Channel.Open(),
                                      commands.Channel.OpenOk)
                    await client.call(CHANNEL, commands.Confirm.Select(),
                                      commands.Confirm.SelectOk)
                    if self.declare:
                        await client.call(CHANNEL, commands.Exchange.Declare(
                            exchange=self.exchange, exchange_type=self.exchange_type,
                            durable=True), commands.Exchange.DeclareOk)
                self.connects += 1
                self._metrics.connects.labels(self.link).inc()
                self.down = False
                self._backoff.reset()
                if down_logged:
                    log.info("AMQP %s: link to %s is back; %d messages to publish",
                             self.link, self.where, len(self.queue))
                    down_logged = False
                self._start_channel(client)
                # Shielded: a cancelled close() must not cancel the connection's own future,
                # which client.close() below waits on (else the socket is never aborted).
                await asyncio.shield(client.closed)
            except _LINK_ERRORS as err:
                self.down = True
                self._metrics.link_errors.labels(self.link).inc()
                level = logging.DEBUG if down_logged else logging.WARNING
                if isinstance(err, LinkLost) and err.refused:  # the setup: every time
                    level = logging.ERROR
                down_logged = True
                log.log(level, "AMQP %s to %s: %s; %d messages held", self.link, self.where,
                        f"{type(err).__name__}: {err}", len(self.queue))
            except Exception:  # ours: logged, and the link is tried again all the same
                self.down = True
                self._metrics.link_errors.labels(self.link).inc()
                log.exception("AMQP %s to %s failed", self.link, self.where)
            finally:
                self._stop_channel()
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close(timeout=2.0)
            await asyncio.sleep(self._backoff.next_delay())

    def _start_channel(self, client: AmqpClientProtocol) -> None:
        self._in_flight = 0
        self._head_tag = 1
        self._acked_ahead.clear()
        self._client = client
        self._connected.set(1)
        self._notify()
        self._publish_more(client)

    def _stop_channel(self) -> None:
        self._client = None
        self._in_flight = 0
        self._connected.set(0)
        self._notify()

    def _publish_more(self, client: AmqpClientProtocol) -> None:
        queue = self.queue
        first = self._in_flight
        last = min(len(queue), self.window)
        if first >= last:
            return
        exchange = self._exchange
        publish = client.publish
        for i in range(first, last):
            m = queue[i]
            publish(CHANNEL, exchange, m.routing_key, m.body, m.properties)
        self._in_flight = last
        client.flush()

    def _on_method(self, channel: int, method: Frame) -> None:
        client = self._client
        if isinstance(method, commands.Basic.Ack) and client is not None:
            tag = method.delivery_tag or 0
            if method.multiple:
                self._confirm(tag - self._head_tag + 1)
            elif tag == self._head_tag:
                self._confirm(1)
            elif tag > self._head_tag:  # confirms may come out of order, one by one
                self._acked_ahead.add(tag)
            ahead = self._acked_ahead
            while ahead:
                ahead.difference_update([t for t in ahead if t < self._head_tag])
                if self._head_tag not in ahead:
                    break
                ahead.discard(self._head_tag)
                self._confirm(1)
            self._publish_more(client)
        elif isinstance(method, commands.Basic.Nack) and client is not None:
            log.warning("AMQP %s: RabbitMQ nacked a publish to %s; publishing again",
                        self.link, self.exchange)
            client.abort("RabbitMQ nacked a publish")
        elif isinstance(method, commands.Connection.Blocked):
            log.warning("AMQP %s: RabbitMQ blocks publishing (%s)", self.link, method.reason)
        elif isinstance(method, commands.Connection.Unblocked):
            log.info("AMQP %s: RabbitMQ takes publishes again", self.link)

    def _confirm(self, count: int) -> None:
        if count <= 0:
            return
        count = min(count, self._in_flight)
        queue = self.queue
        done_bytes = 0
        for _ in range(count):
            done_bytes += len(queue.popleft().body)
        self._in_flight -= count
        self._head_tag += count
        self.buffered_bytes -= done_bytes
        self.confirmed += count
        self._published.inc(count)
        self._unconfirmed.set(len(queue))
        self._notify()


def _no_deliveries(deliveries: list[Any]) -> None:
    """A publishing connection consumes nothing."""
