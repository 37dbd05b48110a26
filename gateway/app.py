"""The gateway's lifecycle: one object owns it.

startup → serve → shutdown. Startup builds the parts from the config (registry, classifier,
pipelines, sinks, dispatcher), binds the MQTT listener and the admin API, and only then
reports ready. Shutdown stops the listener, tells MQTT 5 clients the server is going away,
drains queued work within ``shutdown_timeout``, flushes and closes the sinks, and unwinds
the rest in reverse. Signal handlers only set the stop event; the loop acts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.admin import make_app
from gateway.classify import Classifier
from gateway.config import Config, split_host_port
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError
from gateway.ingest import MQTTIngest
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline, StageContext, build_pipelines
from gateway.registry import DeviceRegistry
from gateway.sinks import Sink, build_sinks
from gateway.workers import Workers
from protocols.mqtt.adapter import MQTTServerProtocol

log = logging.getLogger("iotgw")

SERVER_SHUTTING_DOWN = 0x8B
KEEP_ALIVE_TIMEOUT = 0x8D
HOUSEKEEPING_INTERVAL_S = 0.5
SINK_FLUSH_INTERVAL_S = 1.0


class Gateway:
    def __init__(self, config: Config, *, mqtt_listen: str | None = None,
                 admin_listen: str | None = None, shutdown_timeout: float = 10.0) -> None:
        self.config = config
        self.mqtt_listen = mqtt_listen or config.mqtt.listen
        self.admin_listen = admin_listen or config.admin.listen
        self.shutdown_timeout = shutdown_timeout
        self.metrics = Metrics()
        self.ready = False
        self.started_at = time.time()
        self.mqtt_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self._unwind: list[Callable[[], Any]] = []
        self._housekeeping: asyncio.Task[None] | None = None

        registry = (DeviceRegistry.load(config.classify.registry) if config.classify.registry
                    else DeviceRegistry.empty())
        self.sinks: dict[str, Sink] = build_sinks(config, self.metrics)
        context = StageContext(config=config, registry=registry, metrics=self.metrics,
                               schemas=config.schemas, sinks=self.sinks)
        self.pipelines: dict[str, Pipeline] = build_pipelines(config, context)
        self.workers = Workers(self.pipelines, self.metrics)
        self.dispatcher = Dispatcher(config.tiers, config.dispatch, self.workers.process,
                                     on_pressure=self._on_pressure)
        for lane in self.dispatcher.lanes:
            self.metrics.queue_depth.labels(lane.name).set_function(lane.__len__)
        classifier = Classifier(config.classify, registry, config.gateway.region,
                                config.tier_names)
        self.ingest = MQTTIngest(config.gateway.node_id, config.mqtt, config.tiers, classifier,
                                 self.dispatcher, self.metrics)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        mqtt = self.config.mqtt
        codec_options = {"max_packet_size": mqtt.max_packet_size,
                         "receive_maximum": mqtt.receive_maximum,
                         "max_keepalive": mqtt.max_keepalive}
        host, port = split_host_port(self.mqtt_listen)
        try:
            server = await loop.create_server(
                lambda: MQTTServerProtocol(self.ingest, codec_options, mqtt.write_high_water),
                host, port, backlog=4096)
        except OSError as err:
            raise _listen_error("MQTT", self.mqtt_listen, err, "--mqtt-listen") from None
        self._unwind.append(server.close)
        self.mqtt_address = server.sockets[0].getsockname()[:2]

        runner = web.AppRunner(make_app(self), access_log=None)
        await runner.setup()
        self._unwind.append(runner.cleanup)
        host, port = split_host_port(self.admin_listen, "127.0.0.1")
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as err:
            await self._run_unwind()
            raise _listen_error("admin HTTP", self.admin_listen, err, "--admin-listen") from None
        self.admin_address = runner.addresses[0][:2]

        self._housekeeping = asyncio.create_task(self._housekeep())
        self._unwind.append(self._housekeeping.cancel)
        self._mqtt_server = server
        self.ready = True
        log.info("iot-gateway %s node %s region %s: MQTT on %s:%d, admin on http://%s:%d",
                 __version__, self.config.gateway.node_id, self.config.gateway.region,
                 *self.mqtt_address, *self.admin_address)

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop``), then shut down."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.stopped()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def stopped(self) -> None:
        """Return once a stop has been requested."""
        await self._stop.wait()

    async def shutdown(self) -> None:
        self.ready = False
        self._mqtt_server.close()
        self.ingest.accepting = False
        for client in list(self.ingest.clients):
            client.close(SERVER_SHUTTING_DOWN)
        try:
            await asyncio.wait_for(self.dispatcher.wait_idle(), self.shutdown_timeout)
        except TimeoutError:
            log.warning("shutdown: %d queued messages not processed within %.1f s",
                        self.dispatcher.queued, self.shutdown_timeout)
        self._close_windows(math.inf)
        for name, sink in self.sinks.items():
            try:
                await sink.close()
            except Exception:
                log.exception("sink %s failed to close", name)
        await self._run_unwind()
        log.info("stopped: %d messages processed", self.workers.processed)

    async def _run_unwind(self) -> None:
        while self._unwind:
            result = self._unwind.pop()()
            if asyncio.iscoroutine(result):
                await result

    # -- periodic work: one coarse timer for every connection -------------------------
    async def _housekeep(self) -> None:
        connect_timeout = self.config.mqtt.connect_timeout_s
        next_flush = time.monotonic() + SINK_FLUSH_INTERVAL_S
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            now = time.monotonic()
            for client in list(self.ingest.clients):
                conn = client.conn
                if conn.keepalive_expired(now):
                    self.metrics.protocol_errors.labels("mqtt", "keepalive_timeout").inc()
                    log.warning("mqtt client %s (%r): no packet within 1.5 × keepalive %d s",
                                client.peer, conn.client_id, conn.keepalive)
                    client.close(KEEP_ALIVE_TIMEOUT)
                elif conn.client_id is None and now - client.opened > connect_timeout:
                    self.metrics.protocol_errors.labels("mqtt", "connect_timeout").inc()
                    log.warning("mqtt client %s sent no CONNECT within %.0f s",
                                client.peer, connect_timeout)
                    client.close()
            if now >= next_flush:
                next_flush = now + SINK_FLUSH_INTERVAL_S
                self._close_windows(time.time())
                for name, sink in self.sinks.items():
                    try:
                        await sink.flush()
                    except Exception:
                        log.exception("sink %s failed to flush", name)

    def _close_windows(self, now: float) -> None:
        """Emit the aggregation windows that ``now`` has closed."""
        for pipeline in set(self.pipelines.values()):
            try:
                pipeline.flush(now)
            except Exception:
                log.exception("pipeline %s failed to close its windows", pipeline.name)

    def _on_pressure(self, paused: bool) -> None:
        if paused:
            log.info("back-pressure: %d messages queued, pausing reads", self.dispatcher.queued)
        else:
            log.info("back-pressure released: %d queued", self.dispatcher.queued)
        self.ingest.set_backpressure(paused)

    # -- introspection ----------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "node_id": self.config.gateway.node_id,
            "region": self.config.gateway.region,
            "uptime_s": round(time.time() - self.started_at, 3),
            "listeners": {
                "mqtt": _address(self.mqtt_address),
                "admin": _address(self.admin_address),
            },
        }

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.ingest.received,
            "processed": self.workers.processed,
            "failed": self.workers.failed,
            "queued": self.dispatcher.queued,
            "connections": len(self.ingest.clients),
            "lanes": {lane.name: len(lane) for lane in self.dispatcher.lanes},
        }


def _address(addr: tuple[str, int] | None) -> dict[str, Any] | None:
    return None if addr is None else {"host": addr[0], "port": addr[1]}


def _listen_error(what: str, listen: str, err: OSError, option: str) -> GatewayError:
    if err.errno == errno.EADDRINUSE:
        why = "address already in use (is another broker or gateway running there?)"
    else:
        why = err.strerror or str(err)
    return GatewayError(f"cannot listen for {what} on {listen}: {why}; "
                        f"choose another address with {option} HOST:PORT (port 0 = any free port)")
