"""A TCP proxy that tests control: put it between the gateway and RabbitMQ, then break the link.

It runs its own event loop in a thread, so synchronous and asynchronous tests drive it alike:

* ``cut()``: close every connection (both sides, at once) and refuse new ones (the listening
  socket is closed: connects get ECONNREFUSED) until ``restore()``;
* ``delay(seconds)``: hold each chunk that long before forwarding it (order kept);
* ``half_open()``: stop forwarding, in both directions, without closing anything: the peers
  see a silent link (what a dead NAT entry or a pulled cable looks like) until ``restore()``;
* ``restore()``: listen again on the same port, forward again, no delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 65536


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.accepted = 0
        """Connections accepted so far."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._delay = 0.0

    # -- control, from any thread -----------------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._restore())

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def half_open(self) -> None:
        self._loop.call_soon_threadsafe(self._stop_flowing)

    @property
    def connections(self) -> int:
        return len(self._links)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy's loop ---------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def _stop_flowing(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for link in list(self._links):
            link.abort()
        self._links.clear()

    async def _restore(self) -> None:
        self._delay = 0.0
        assert self._flowing is not None
        self._flowing.set()
        if self._server is None:
            await self._listen()

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        pumps = [asyncio.ensure_future(self._pump(client_reader, upstream_writer)),
                 asyncio.ensure_future(self._pump(upstream_reader, client_writer))]
        link = _Link(pumps, client_writer, upstream_writer)
        self._links.add(link)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            link.abort()
            self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flowing = self._flowing
        assert flowing is not None
        try:
            while data := await reader.read(CHUNK):
                if self._delay:
                    await asyncio.sleep(self._delay)
                await flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


class _Link:
    def __init__(self, pumps: list[asyncio.Future[None]],
                 *writers: asyncio.StreamWriter) -> None:
        self.pumps = pumps
        self.writers = writers

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for pump in self.pumps:  # one may wait for a half-open link to flow again
            pump.cancel()
