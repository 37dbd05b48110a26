"""One AMQP connection of the fleet that consumes, and comes back when it is lost.

``Link`` owns a connection (``protocols.amqp.client``) with one channel: ``start()`` connects
in the background, runs its owner's ``setup`` (declarations, ``basic.qos``, ``basic.consume``)
and hands every read's deliveries to ``on_deliveries`` as one list; when the link is lost it
calls ``on_down`` and tries again after an exponential backoff with jitter, as the AMQP
ingest consumer does. ``close()`` ends it for good (RabbitMQ requeues what was not
acknowledged). While it is up, ``call`` sends a method and waits for its reply (one at a time:
callers are serialised), ``ack``/``nack`` settle deliveries (``multiple``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pamqp import commands
from pamqp.base import Frame

from gateway.urls import display_url
from protocols.amqp.client import AmqpClientProtocol, Endpoint, LinkLost, open_client
from protocols.amqp.link import LINK_ERRORS, AmqpMetrics, Backoff
from protocols.amqp.publisher import LinkSettings
from protocols.amqp.wire import Delivery

log = logging.getLogger("iotgw.fleet")

CHANNEL = 1
_ERRORS = (*LINK_ERRORS, LinkLost)
F = TypeVar("F", bound=Frame)

__all__ = ["Link", "LinkSettings"]


class Link:
    """See the module doc. ``name`` labels its metrics (``iotgw_amqp_*{link}``) and logs."""

    def __init__(self, name: str, url: str, settings: LinkSettings, metrics: AmqpMetrics, *,
                 setup: Callable[[Link], Awaitable[None]],
                 on_deliveries: Callable[[list[Delivery]], None],
                 on_up: Callable[[], None] | None = None,
                 on_down: Callable[[], None] | None = None,
                 client_name: str = "iot-gateway") -> None:
        self.name = name
        self.settings = settings
        self.metrics = metrics
        self.endpoint = Endpoint(url, settings.heartbeat_s, f"{client_name} {name}")
        self.where = display_url(url)
        self._setup = setup
        self._on_deliveries = on_deliveries
        self._on_up = on_up
        self._on_down = on_down
        self.client: AmqpClientProtocol | None = None
        """The connection, from its channel's opening (``setup`` calls through it) on."""
        self._ready = False
        self.connects = 0
        self._calls = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self._down_logged = False
        self._closing: AmqpClientProtocol | None = None  # what close() is closing politely
        self._connected = metrics.connected.labels(name)

    @property
    def up(self) -> bool:
        """Connected and set up (declared, consuming)."""
        return self._ready and self.client is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name=f"fleet-{self.name}")

    async def call(self, method: Frame, reply: type[F]) -> F:
        """``method`` on the channel, its ``reply`` awaited; LinkLost if the link is down."""
        client = self.client
        if client is None:
            raise LinkLost("not connected")
        async with self._calls:
            return await client.call(CHANNEL, method, reply)

    def ack(self, delivery_tag: int) -> None:
        if self.client is not None:
            self.client.ack(CHANNEL, delivery_tag)

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        if self.client is not None:
            self.client.nack(CHANNEL, delivery_tag, requeue=requeue)

    async def _run(self) -> None:
        while not self._stop.is_set():
            client: AmqpClientProtocol | None = None
            try:
                client = await open_client(self.endpoint, self._deliveries,
                                           self.settings.connect_timeout_s)
                async with asyncio.timeout(self.settings.connect_timeout_s):
                    await client.call(CHANNEL, commands.Channel.Open(), commands.Channel.OpenOk)
                    self.client = client
                    await self._setup(self)
                self._ready = True
                self.connects += 1
                self.metrics.connects.labels(self.name).inc()
                self._connected.set(1)
                self._backoff.reset()
                if self._down_logged:
                    log.info("fleet %s: link to %s is back", self.name, self.where)
                    self._down_logged = False
                if self._on_up is not None:
                    self._on_up()
                stopping = asyncio.ensure_future(self._stop.wait())
                either: list[asyncio.Future[Any]] = [client.closed, stopping]
                try:
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                if self._stop.is_set():
                    return  # asked to stop: close() ends the connection
                raise client.closed.exception() or LinkLost("closed")
            except _ERRORS as err:
                if self._stop.is_set():
                    return
                self.metrics.link_errors.labels(self.name).inc()
                level = logging.DEBUG if self._down_logged else logging.WARNING
                if isinstance(err, LinkLost) and err.refused:  # the setup: every time
                    level = logging.ERROR
                self._down_logged = True
                log.log(level, "fleet %s to %s: %s", self.name, self.where,
                        f"{type(err).__name__}: {err}")
            except Exception:  # ours: logged, and the link is tried again all the same
                self._down_logged = True
                self.metrics.link_errors.labels(self.name).inc()
                log.exception("fleet %s to %s failed", self.name, self.where)
            finally:
                if not self._stop.is_set():
                    self._lost(client)
                elif client is not None and client is not self._closing:
                    client.abort("closed")  # close() came before it was up: not its to close
            delay = self._backoff.next_delay()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    def _lost(self, client: AmqpClientProtocol | None) -> None:
        was_up = self.up
        self._ready = False
        self.client = None
        self._connected.set(0)
        if client is not None:
            client.abort("link given up")
        if was_up and self._on_down is not None:
            self._on_down()

    def _deliveries(self, deliveries: list[Delivery]) -> None:
        if self.client is not None:
            self._on_deliveries(deliveries)

    async def close(self, timeout: float = 2.0) -> None:
        """End the link: the connection closes politely (RabbitMQ requeues what is not
        acknowledged) and no new one is made."""
        self._stop.set()
        task, self._task = self._task, None
        client = self.client
        was_up = self.up
        self._ready = False
        if client is not None:
            self.client = None
            self._closing = client
            self._connected.set(0)
            await client.close(timeout)
            if was_up and self._on_down is not None:
                self._on_down()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
