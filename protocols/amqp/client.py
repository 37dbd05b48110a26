"""The thin asyncio adapter over ``wire.ClientConnection``: one AMQP connection (a consumer's
or a publisher's).

``data_received`` feeds the codec, writes what it answered (handshake replies, CloseOk), hands
the deliveries one read completed to ``on_deliveries`` as one list, resolves the reply an
``await call(...)`` waits for, and passes other methods (publisher confirms) to ``on_method``.
``ack``/``nack`` write their frame at once (the consumer calls them at most once per loop
turn, each settling a run of deliveries); ``publish`` buffers, ``flush`` writes.
Heartbeats: one timer per connection sends one every half interval and gives the link up
(``abort``) when nothing arrived for ``2 × heartbeat + 1`` seconds: a half-open link ends
within that.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from pamqp import commands
from pamqp.base import Frame

from protocols.amqp.errors import AmqpError
from protocols.amqp.wire import (
    ChannelClosed,
    ClientConnection,
    ConnectionClosed,
    Delivery,
    Event,
    MethodReceived,
    Opened,
    ProtocolError,
)

F = TypeVar("F", bound=Frame)
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


REFUSALS = frozenset({403, 404, 405, 406, 530})
"""Reply codes that mean "your setup is wrong" (access refused, not found, locked, precondition
failed, not allowed): retrying does not help until someone changes the config or the broker."""


class LinkLost(AmqpError, ConnectionError):
    """The connection went away (closed by the server, reset, silent, or refused a method)."""

    def __init__(self, why: str, reply_code: int | None = None) -> None:
        super().__init__(why)
        self.reply_code = reply_code

    @property
    def refused(self) -> bool:
        return self.reply_code in REFUSALS


class AmqpClientProtocol(asyncio.Protocol):
    def __init__(self, codec: ClientConnection,
                 on_deliveries: Callable[[list[Delivery]], None],
                 on_method: Callable[[int, Frame], None] | None = None) -> None:
        self.codec = codec
        self.on_deliveries = on_deliveries
        self.on_method = on_method
        """Methods nobody waits for (publisher confirms, Connection.Blocked)."""
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[Opened] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        """Done when the connection is gone; its exception says why (LinkLost)."""
        self.last_received = self._loop.time()
        self._waiting: dict[int, tuple[type[Frame], asyncio.Future[Frame]]] = {}
        self._reason: LinkLost | None = None
        self._closing = False
        self._heartbeat: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.codec.initiate()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.last_received = self._loop.time()
        try:
            events, deliveries = self.codec.receive(data)
        except ProtocolError as err:
            self.abort(f"protocol error: {err}")
            return
        self._flush()
        for event in events:
            self._event(event)
        if deliveries:
            self.on_deliveries(deliveries)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        reason = self._reason or LinkLost(
            f"connection lost: {exc}" if exc is not None else "connection closed")
        for _, waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(reason)
        self._waiting.clear()
        if not self.opened.done():
            self.opened.set_exception(reason)
            self.opened.exception()  # retrieved: whoever awaits it sees it too
        if not self.closed.done():
            self.closed.set_exception(reason)
            self.closed.exception()

    # -- what the owner calls -------------------------------------------------------------------
    async def call(self, channel: int, method: Frame, reply: type[F]) -> F:
        """Send ``method`` on ``channel`` and wait for its ``reply`` (one call per channel at a
        time). Raises LinkLost when the connection or the channel closes instead."""
        if self.transport is None:
            raise self._reason or LinkLost("not connected")
        future: asyncio.Future[Frame] = self._loop.create_future()
        self._waiting[channel] = (reply, future)
        self.codec.send_method(channel, method)
        self._flush()
        got = await future
        assert isinstance(got, reply)
        return got

    def publish(self, channel: int, exchange: bytes, routing_key: str, body: bytes,
                properties: bytes) -> None:
        """Buffer one publish in the codec; ``flush()`` writes what was buffered."""
        self.codec.publish(channel, exchange, routing_key, body, properties)

    def flush(self) -> None:
        self._flush()

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def ack(self, channel: int, delivery_tag: int) -> None:
        """Acknowledge every delivery up to ``delivery_tag`` (multiple)."""
        if self.transport is not None:
            self.codec.ack(channel, delivery_tag, multiple=True)
            self._flush()

    def nack(self, channel: int, delivery_tag: int, requeue: bool = True) -> None:
        """Reject every delivery up to ``delivery_tag`` (multiple): requeued, or (``requeue``
        false) dropped or dead-lettered, as the queue says."""
        if self.transport is not None:
            self.codec.nack(channel, delivery_tag, multiple=True, requeue=requeue)
            self._flush()

    async def close(self, timeout: float) -> None:
        """Close politely (Connection.Close, wait for CloseOk), then drop the socket."""
        if self.transport is None:
            return
        self._closing = True
        self._reason = self._reason or LinkLost("closed")
        self.codec.close()
        self._flush()
        with contextlib.suppress(TimeoutError, LinkLost):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        if self.transport is not None:
            self.transport.abort()

    def abort(self, why: str, graceful: bool = False, reply_code: int | None = None) -> None:
        """Give the link up. ``graceful``: after writing what is buffered (the CloseOk of a
        close the server started); otherwise at once (a silent link may never take it)."""
        if self._reason is None:
            self._reason = LinkLost(why, reply_code)
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    # -- inside ------------------------------------------------------------------------------
    def _flush(self) -> None:
        out = self.codec.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _event(self, event: Event) -> None:
        if isinstance(event, MethodReceived):
            waiting = self._waiting.get(event.channel)
            if waiting is not None and isinstance(event.method, waiting[0]):
                del self._waiting[event.channel]
                if not waiting[1].done():
                    waiting[1].set_result(event.method)
            elif isinstance(event.method, commands.Basic.Cancel):
                self.abort(f"the server cancelled consumer {event.method.consumer_tag!r} "
                           "(its queue was deleted?)")
            elif self.on_method is not None:
                self.on_method(event.channel, event.method)
        elif isinstance(event, Opened):
            if event.heartbeat:
                self._heartbeat = self._loop.call_later(max(0.5, event.heartbeat / 2),
                                                        self._beat, event.heartbeat)
            if not self.opened.done():
                self.opened.set_result(event)
        elif isinstance(event, ChannelClosed):
            self.abort(f"the server closed channel {event.channel}: {event.reply_code} "
                       f"{event.reply_text}", graceful=True, reply_code=event.reply_code)
        elif isinstance(event, ConnectionClosed):
            if self._closing:  # the CloseOk of our own close
                if self.transport is not None:
                    self.transport.close()
            else:
                self.abort(f"the server closed the connection: {event.reply_code} "
                           f"{event.reply_text}", graceful=True, reply_code=event.reply_code)

    def _beat(self, interval: int) -> None:
        if self.transport is None:
            return
        silent = self._loop.time() - self.last_received
        if silent > 2 * interval + 1:
            self.abort(f"no frames from the server for {silent:.0f} s (heartbeat {interval} s)")
            return
        self.codec.send_heartbeat()
        self._flush()
        self._heartbeat = self._loop.call_later(max(0.5, interval / 2), self._beat, interval)


class Endpoint:
    """Where and how to connect, from an ``amqp://`` or ``amqps://`` URL."""

    def __init__(self, url: str, heartbeat: int, name: str) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.host = parts.hostname or "localhost"
        self.port = parts.port or DEFAULT_PORTS.get(parts.scheme, 5672)
        self.username = unquote(parts.username or "guest")
        self.password = unquote(parts.password or "guest")
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.heartbeat = int(query.get("heartbeat", heartbeat))
        self.name = query.get("name", name)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "amqps":
            self.ssl = ssl.create_default_context(cafile=query.get("cafile"))
            if "certfile" in query:
                self.ssl.load_cert_chain(query["certfile"], query.get("keyfile"))


async def open_client(endpoint: Endpoint, on_deliveries: Callable[[list[Delivery]], None],
                      timeout: float, on_method: Callable[[int, Frame], None] | None = None,
                      ) -> AmqpClientProtocol:
    """Connect and finish the handshake within ``timeout``; raises LinkLost, OSError or
    TimeoutError (nothing is left open)."""
    loop = asyncio.get_running_loop()
    codec = ClientConnection(username=endpoint.username, password=endpoint.password,
                             vhost=endpoint.vhost, heartbeat=endpoint.heartbeat,
                             client_properties={"connection_name": endpoint.name})
    protocol: AmqpClientProtocol | None = None

    def make() -> AmqpClientProtocol:
        nonlocal protocol
        protocol = AmqpClientProtocol(codec, on_deliveries, on_method)
        return protocol

    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(make, endpoint.host, endpoint.port, ssl=endpoint.ssl)
            assert protocol is not None
            await protocol.opened
    except BaseException:
        if protocol is not None:
            protocol.abort("connect failed")
        raise
    return protocol
