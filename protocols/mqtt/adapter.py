"""A thin asyncio adapter: sockets in, ``ServerConnection`` in the middle, hooks out.

It feeds bytes to the sans-I/O codec, hands the events to the application's hooks (PUBLISH
events of one read in one batch), and writes everything the codec produced with one
``transport.write`` per read. It pauses reading when the application asks (back-pressure)
or when the client does not read its acks (write buffer above the high-water mark).
Keepalive and connect timeouts are checked by one coarse timer in the server, not per
connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol, cast

from protocols.mqtt.connection import (
    ClientDisconnect,
    ConnectionClosed,
    ConnectRequest,
    PublishAcknowledged,
    ServerConnection,
    SubscribeRequest,
    UnsubscribeRequest,
)
from protocols.mqtt.packets import Publish

log = logging.getLogger("iotgw.mqtt")


class MQTTHooks(Protocol):
    """What the application does with a connection's events."""

    def on_connect(self, client: MQTTServerProtocol, request: ConnectRequest) -> None:
        """Call ``client.conn.accept()`` or ``client.conn.refuse(code)``."""

    def on_publish(
        self, client: MQTTServerProtocol, batch: list[Publish], received_ns: int, received_at: float
    ) -> None:
        """Take a read's PUBLISH packets; ack QoS > 0 ones through ``client.conn.ack``."""

    def on_subscribe(self, client: MQTTServerProtocol, request: SubscribeRequest) -> None: ...

    def on_unsubscribe(self, client: MQTTServerProtocol, request: UnsubscribeRequest) -> None: ...

    def on_acknowledged(self, client: MQTTServerProtocol, event: PublishAcknowledged) -> None:
        """The client finished a QoS 1/2 delivery to it."""

    def on_disconnect(self, client: MQTTServerProtocol, event: ClientDisconnect) -> None:
        """The client sent DISCONNECT (the connection closes next)."""

    def on_violation(self, client: MQTTServerProtocol, reason: str, message: str) -> None: ...

    def on_open(self, client: MQTTServerProtocol) -> None: ...

    def on_close(self, client: MQTTServerProtocol) -> None: ...


READ_SLICE = 16 * 1024
"""Bytes of one read handled per loop turn."""
_NO_SLICES = (b"", 0, 0)


class MQTTServerProtocol(asyncio.Protocol):
    __slots__ = (
        "_paused_for",
        "_slices",
        "acl",
        "commits_pending",
        "conn",
        "hooks",
        "limiter",
        "opened",
        "peer",
        "peercert",
        "sends_protected",
        "session",
        "topic_cache",
        "transport",
        "write_high_water",
    )

    def __init__(
        self, hooks: MQTTHooks, codec_options: dict[str, Any], write_high_water: int
    ) -> None:
        self.hooks = hooks
        self.conn = ServerConnection(**codec_options)
        self.write_high_water = write_high_water
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.opened = time.monotonic()
        # Owned by the application: its per-connection classification cache and filters.
        self.topic_cache: dict[str, Any] = {}
        self.session: Any = None  # the broker's session, once connected
        self.acl: Any = None  # what this client may publish and subscribe to, once known
        self.limiter: Any = None  # its rate limits, if any
        self.peercert: dict[str, Any] | None = None  # a verified TLS client certificate
        self.commits_pending = 0  # group commits that hold this client's messages and acks
        self.sends_protected = False  # it sent work of a tier that is never shed
        self._paused_for: set[str] | None = None  # why reading is paused: "writes", "slices", or
        # the app's reasons
        self._slices: tuple[bytes, int, int] = _NO_SLICES  # (read, next offset, received_ns)

    # -- asyncio callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.transport.set_write_buffer_limits(high=self.write_high_water)
        self.peercert = transport.get_extra_info("peercert")
        self.hooks.on_open(self)
        if self._paused_for:  # pause_reading() before reading starts is lost: pause again
            asyncio.get_running_loop().call_soon(self._repause)

    def _repause(self) -> None:
        if self._paused_for and self.transport is not None:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        received_ns = time.monotonic_ns()
        pending, offset, first_ns = self._slices
        if offset < len(pending):  # still slicing an earlier read: this one goes after it
            self._slices = (pending[offset:] + data, 0, first_ns)
            return
        if len(data) <= READ_SLICE:
            self._handle(data, received_ns)
            return
        # A large read is handled a slice per loop turn: other connections, the dispatcher
        # and the write-ahead log's callbacks run in between, so a flood on one connection
        # cannot hold the loop (and everyone's latency) for tens of milliseconds.
        self._pause("slices")
        self._slices = (data, READ_SLICE, received_ns)
        self._handle(data[:READ_SLICE], received_ns)
        asyncio.get_running_loop().call_soon(self._next_slice)

    def _next_slice(self) -> None:
        data, offset, received_ns = self._slices
        if self.transport is None or self.conn.closed:
            self._slices = _NO_SLICES
            return
        end = offset + READ_SLICE
        if end < len(data):
            self._slices = (data, end, received_ns)
            asyncio.get_running_loop().call_soon(self._next_slice)
        else:
            self._slices = _NO_SLICES
        self._handle(data[offset:end], received_ns)
        if end >= len(data):
            self._resume("slices")

    def _handle(self, data: bytes, received_ns: int) -> None:
        conn = self.conn
        now = received_ns / 1e9
        events = conn.receive_data(data, now)
        batch: list[Publish] | None = None
        hooks = self.hooks
        for event in events:
            if type(event) is Publish:
                if batch is None:
                    batch = [event]
                else:
                    batch.append(event)
                continue
            if batch:  # keep order: what came before a control packet is handled first
                hooks.on_publish(self, batch, received_ns, time.time())
                batch = None
            if type(event) is ConnectRequest:
                hooks.on_connect(self, event)
                if not conn.closed:  # the codec holds what followed CONNECT until accepted
                    events += conn.receive_data(b"", now)
            elif type(event) is SubscribeRequest:
                hooks.on_subscribe(self, event)
            elif type(event) is UnsubscribeRequest:
                hooks.on_unsubscribe(self, event)
            elif type(event) is PublishAcknowledged:
                hooks.on_acknowledged(self, event)
            elif type(event) is ClientDisconnect:
                hooks.on_disconnect(self, event)
                self._close()
            elif type(event) is ConnectionClosed:
                violation = event.violation
                hooks.on_violation(self, violation.reason, str(violation))
                self._close()
        if batch:
            hooks.on_publish(self, batch, received_ns, time.time())
        self.flush()

    def connected(self) -> None:
        """The application answered a CONNECT it decided on later (after a password check
        in a thread): handle what the client sent behind it meanwhile."""
        if self.transport is not None and not self.conn.closed:
            self._handle(b"", time.monotonic_ns())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.hooks.on_close(self)

    def pause_writing(self) -> None:
        self._pause("writes")  # the client does not read its acks: stop reading its publishes

    def resume_writing(self) -> None:
        self._resume("writes")

    # -- called by the application and the server --------------------------------------
    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def pause_for_backpressure(self, paused: bool, reason: str = "backlog") -> None:
        if paused:
            self._pause(reason)
        else:
            self._resume(reason)

    def close(self, reason_code: int | None = None) -> None:
        """Close, first telling an MQTT 5 client why when ``reason_code`` is given."""
        if reason_code is not None and not self.conn.closed:
            self.conn.disconnect(reason_code)
        self._close()

    def _close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _pause(self, reason: str) -> None:
        if not self._paused_for and self.transport is not None:
            self.transport.pause_reading()
        if self._paused_for is None:
            self._paused_for = set()
        self._paused_for.add(reason)

    def _resume(self, reason: str) -> None:
        if self._paused_for is None or reason not in self._paused_for:
            return
        self._paused_for.discard(reason)
        if not self._paused_for and self.transport is not None:
            self.transport.resume_reading()
