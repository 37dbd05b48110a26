"""The gateway's lifecycle: one object owns it.

startup → serve → shutdown. Startup opens the audit log, replays what the write-ahead log
holds unretired (before any new traffic), binds the MQTT listener and the admin API, and
only then reports ready (``READY=1`` to systemd). Shutdown, a drain: stop accepting, tell
MQTT 5 clients the server is going away (0x8B), process what is queued within
``shutdown_timeout``, flush and close the sinks, retire what they hold, close the log;
whatever the deadline leaves is still in the WAL for the next start.

Signal handlers only set flags; the loop acts: SIGTERM drains, a first SIGINT drains and a
second one exits at once, SIGHUP reloads (the whole new config is validated and built, then
swapped in, or the old one is kept and the refusal logged and audited).

A message's WAL record is retired only after its pipeline finished AND the sinks flushed
it: the housekeeping timer collects finished messages, flushes the sinks, then retires what
it collected before the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gateway import __version__, systemd
from gateway.admin import make_app
from gateway.audit import AuditBusyError, AuditError, AuditLog
from gateway.auth import Security, build_security
from gateway.broker import Broker, BrokerStore
from gateway.classify import Classifier
from gateway.config import ANOMALY_LANES, Config, load_config, split_host_port
from gateway.dispatch import Dispatcher, Lane
from gateway.envelope import Envelope
from gateway.errors import ConfigError, GatewayError
from gateway.fleet.service import Fleet, with_fleet
from gateway.ingest import MQTTIngest
from gateway.maintenance import Maintenance
from gateway.maintenance import validate as validate_maintenance
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline, StageContext, build_pipelines
from gateway.regions import Regions
from gateway.registry import DeviceRegistry
from gateway.scaling import Elasticity
from gateway.sinks import Sink, build_sinks
from gateway.statedir import InstanceDir, release_orphan
from gateway.supervisor import WorkerRole
from gateway.wal import WriteAheadLog
from gateway.workers import Workers
from policies.alerts import Alerter
from policies.anomaly import AnomalyDetector
from policies.tasks import TaskContext
from protocols.amqp.service import AmqpHandle, start_amqp, with_amqp
from protocols.coap.server import CoapServer, start_coap
from protocols.mqtt.adapter import MQTTServerProtocol

log = logging.getLogger("iotgw")

SERVER_SHUTTING_DOWN = 0x8B
KEEP_ALIVE_TIMEOUT = 0x8D
HOUSEKEEPING_INTERVAL_S = 0.5
SINK_FLUSH_INTERVAL_S = 1.0
GIL_SWITCH_INTERVAL_S = 0.0005
LOOP_LAG_PROBE_S = 0.01
ALERT_CLOSE_TIMEOUT_S = 2.0  # how long queued webhook alerts may delay a reload or a stop
ADOPT_INTERVAL_S = 5.0  # how often to look for the logs of daemons that have exited

# Settings a reload cannot change: they need a restart (a side-by-side upgrade does it).
RESTART_ONLY = ("mqtt.listen", "admin.listen", "gateway.node_id", "gateway.state_dir",
                "wal", "audit", "amqp", "coap.listen", "coap.enabled", "fleet",
                "scaling.enabled", "regions")


@dataclass
class _Parts:
    """What a config builds and a reload swaps in whole."""

    config: Config
    registry: DeviceRegistry
    classifier: Classifier
    sinks: dict[str, Sink]
    pipelines: dict[str, Pipeline]
    detector: AnomalyDetector | None
    anomaly_lanes: tuple[str, ...]
    """The dispatcher's anomaly lanes, most severe first (when triage is configured)."""
    alerter: Alerter | None
    security: Security


def config_digest(config: Config) -> str:
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()


class Gateway:
    def __init__(self, config: Config, *, config_path: str | Path | None = None,
                 mqtt_listen: str | None = None, admin_listen: str | None = None,
                 shutdown_timeout: float = 10.0, amqp_url: str | None = None,
                 coap_listen: str | None = None, worker: WorkerRole | None = None,
                 fleet_url: str | None = None) -> None:
        self.amqp_url = amqp_url  # --amqp-url: kept across reloads
        self.amqp: AmqpHandle | None = None
        self.fleet_url = fleet_url  # --fleet-url: kept across reloads
        self.fleet: Fleet | None = None
        self.regions: Regions | None = None
        self.worker = worker  # serve --workers: one of several processes (gateway.supervisor)
        config = with_fleet(with_amqp(config, amqp_url), fleet_url)
        self.config = config = worker.apply(config) if worker is not None else config
        self.config_path = config_path
        self.mqtt_listen = mqtt_listen or config.mqtt.listen
        self.admin_listen = admin_listen or config.admin.listen
        self.coap_listen = coap_listen or config.coap.listen
        self._coap: CoapServer | None = None
        self.coap_address: tuple[str, int] | None = None
        self.shutdown_timeout = shutdown_timeout
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.started_at = time.time()
        self.mqtt_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._unwind: list[Callable[[], Any]] = []
        self._finished_seqs: list[int] = []
        self._failing_sinks: set[str] = set()  # logged once while they fail
        self._audit_backlog: list[tuple[str, dict[str, Any]]] = []
        self._reloading: asyncio.Task[bool] | None = None
        self._mqtt_server: asyncio.AbstractServer | None = None
        self._mqtt_tls_server: asyncio.AbstractServer | None = None
        self.mqtt_tls_address: tuple[str, int] | None = None

        state_dir = Path(config.gateway.state_dir)
        # Files of this process alone (a worker's siblings share state_dir, and the WAL in it).
        self.private_dir = worker.private_dir(state_dir) if worker is not None else state_dir
        self.audit = (AuditLog(config.audit.dir, node_id=config.gateway.node_id,
                               max_file_bytes=config.audit.max_file_bytes)
                      if config.audit.enabled else None)
        self.instance = InstanceDir(state_dir) if config.wal.enabled else None
        self.wal = (WriteAheadLog(self.instance.path, config.wal, self.metrics)
                    if self.instance is not None else None)
        parts = self._build(config)
        self.sinks = parts.sinks
        self.registry = parts.registry
        self.workers = Workers(parts.pipelines, self.metrics, config.retry,
                               on_finished=self._finished, audit=self._audit)
        self.dispatcher = Dispatcher(config.tiers, config.dispatch, self.workers.process,
                                     on_pressure=self._on_pressure,
                                     can_process=lambda: not self.workers.busy,
                                     anomaly_lanes=parts.anomaly_lanes,
                                     preempt=self.workers.preempt, on_shed=self._shed_late)
        self.workers.dispatcher = self.dispatcher
        self.maintenance = Maintenance(config.maintenance, self.dispatcher, self.metrics,
                                       audit=self._audit, context=self._task_context,
                                       state_dir=self.private_dir)
        self.elasticity = (Elasticity(config.scaling, self.dispatcher, self.workers,
                                      self.metrics, audit=self._audit,
                                      node_id=config.gateway.node_id,
                                      region=config.gateway.region,
                                      tier_bounds=_tier_bounds(config))
                           if config.scaling.enabled else None)
        self._export_queue_depth()
        self.ingest = MQTTIngest(config.gateway.node_id, config.mqtt, config.tiers,
                                 config.dispatch, parts.classifier, self.dispatcher,
                                 self.metrics, wal=self.wal,
                                 summarise=self.audit.summarise if self.audit else None,
                                 max_uncommitted=config.wal.max_uncommitted, audit=self._audit,
                                 broker=Broker(config.broker, self.metrics))
        self.broker_store = BrokerStore(self.ingest.broker, self.private_dir)
        self.ingest.security = parts.security
        self._attach_broker(self.sinks)
        self.ingest.configure(config.mqtt, config.tiers, config.dispatch, parts.classifier,
                              parts.detector)
        self.ingest.alerter = parts.alerter

    def _build(self, config: Config) -> _Parts:
        """Everything a config determines; raises ConfigError without touching what runs."""
        registry = (DeviceRegistry.load(config.classify.registry, tiers=config.tier_names)
                    if config.classify.registry else DeviceRegistry.empty())
        sinks = build_sinks(config, self.metrics)
        detector = None
        if config.anomaly.detectors:
            try:
                detector = AnomalyDetector(config.anomaly)
            except ValueError as err:
                raise ConfigError(f"anomaly.{err}") from None
        pipelines, classifier = self._routing(config, registry, sinks, detector is not None)
        # Anomalous messages jump every queue, most severe first.
        anomaly_lanes = tuple(ANOMALY_LANES.values()) if detector is not None else ()
        alerter = None
        if detector is not None:
            alerter = Alerter(config.anomaly.escalation.by_severity(),
                              publish=self._publish_alert, audit=self._audit,
                              alerts=self.metrics.alerts, failures=self.metrics.alert_failures,
                              node=config.gateway.node_id)
        validate_maintenance(config)
        # Paths in the config are relative to the working directory, as the others are.
        security = build_security(config.auth, Path.cwd())
        return _Parts(config, registry, classifier, sinks, pipelines, detector, anomaly_lanes,
                      alerter, security)

    def _routing(self, config: Config, registry: DeviceRegistry, sinks: dict[str, Sink],
                 anomalies: bool) -> tuple[dict[str, Pipeline], Classifier]:
        """The pipelines and the classifier for a config and a device registry."""
        context = StageContext(config=config, registry=registry, metrics=self.metrics,
                               schemas=config.schemas, sinks=sinks)
        pipelines = build_pipelines(config, context)
        classifier = Classifier(config.classify, registry, config.gateway.region,
                                config.tier_names)
        if anomalies:  # the anomaly lanes run the most urgent tier's pipeline
            served = [pipelines[t] for t in config.tier_names if t in pipelines]
            if served:
                pipelines.update(dict.fromkeys(ANOMALY_LANES.values(), served[0]))
        return pipelines, classifier

    def install_registry(self, registry: DeviceRegistry) -> DeviceRegistry:
        """A rebuilt device registry (the registry-rebuild maintenance task): classification
        and enrichment use it from the next message on; everything else is kept. Returns
        the registry it replaces."""
        config = self.config
        pipelines, classifier = self._routing(config, registry, self.sinks,
                                              self.ingest.detector is not None)
        self.workers.reconfigure(pipelines, config.retry)
        self.ingest.configure(config.mqtt, config.tiers, config.dispatch, classifier,
                              self.ingest.detector, forget=registry.changed)
        log.info("device registry installed: %d devices from %s", len(registry),
                 registry.source)
        self._audit("registry.installed", devices=len(registry), source=registry.source)
        old, self.registry = self.registry, registry
        return old

    def _task_context(self) -> TaskContext:
        return TaskContext(wal=self.wal, audit=self.audit,
                           registry_path=self.config.classify.registry,
                           tiers=self.config.tier_names, install_registry=self.install_registry,
                           log=logging.getLogger("iotgw.maintenance.task"),
                           registry=self.registry)

    def _publish_alert(self, topic: str, payload: bytes) -> None:
        self.ingest.publish_local(topic, payload)
        if self.amqp is not None:
            self.amqp.publish_alert(topic, payload)

    def _export_queue_depth(self) -> None:
        for lane in self.dispatcher.lanes:
            self.metrics.queue_depth.labels(lane.name).set_function(lane.__len__)

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        if not self.audit.is_open:  # held by a daemon we are taking over from: keep it for later
            self._audit_backlog.append((event, fields))
            return
        try:
            self.audit.record(event, **fields)
        except AuditError as err:
            self.metrics.audit_errors.inc()
            log.error("audit record %s not written: %s", event, err)

    def _open_audit(self) -> None:
        """Open the audit log; while another daemon holds it, keep records until it exits."""
        assert self.audit is not None
        try:
            self.audit.open()
        except AuditBusyError as err:
            if not self._audit_backlog:
                log.info("%s; its records wait in memory until it exits", err)
            return
        backlog, self._audit_backlog = self._audit_backlog, []
        for event, fields in backlog:
            self._audit(event, **fields)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._run_unwind()
            raise

    async def _start(self) -> None:
        if self.audit is not None:
            self._open_audit()
            self._unwind.append(self.audit.close)
        if self.config.regions.enabled:  # ahead of the replay: replayed work is placed too
            regions = self.regions = Regions(
                self.config, ingest=self.ingest, dispatcher=self.dispatcher, wal=self.wal,
                metrics=self.metrics, audit=self._audit,
                summarise=self.audit.summarise if self.audit else None)
            regions.start()
            self._unwind.append(lambda: regions.close(self.config.fleet.confirm_timeout_s))
        if self.wal is not None and self.instance is not None:
            self.instance.claim()
            self._unwind.append(self.instance.release)
            self._replay(self.wal.recover())
            self._unwind.append(self.wal.close)
            await self._adopt_orphans()  # before any new traffic
        self.broker_store.load()
        if self.config.fleet.url is not None:  # joins its region in the background
            fleet = self.fleet = Fleet(
                self.config, ingest=self.ingest, dispatcher=self.dispatcher, wal=self.wal,
                metrics=self.metrics, audit=self._audit,
                summarise=self.audit.summarise if self.audit else None)
            fleet.start()
            if self.regions is not None:  # placement first, then overflow of what stays
                self.regions.follow(self.ingest.divert)
            self._unwind.append(lambda: fleet.close(self.config.fleet.confirm_timeout_s))
        await self._listen()
        if self.config.amqp.url is not None:  # connects in the background, reconnects
            self.amqp = await start_amqp(self.config.amqp, self.ingest, self.metrics,
                                         name=f"iot-gateway {self.config.gateway.node_id}")
            self._unwind.append(self.amqp.close)
        self._unwind.append(asyncio.create_task(self._housekeep()).cancel)
        self._unwind.append(asyncio.create_task(self._measure_loop_lag()).cancel)
        if self.elasticity is not None:
            self._unwind.append(asyncio.create_task(self.elasticity.run()).cancel)
        # What start-up built (config, registry, pipelines) lives as long as the process:
        # keep it out of the collector's full passes, which would otherwise walk all of it
        # while the loop waits.
        gc.freeze()
        # Requests waiting a few ms for their group commit (CoAP, MQTT QoS 1) outlive young
        # collections and set off full ones: 45 % of the loop's CPU under a CoAP flood went
        # to the collector. Fewer, larger young collections: 245 → 182 µs per request.
        gc.set_threshold(20_000, 20, 10)
        self.ready = True
        self._audit("start", version=__version__, config_sha256=config_digest(self.config),
                    mqtt=_address(self.mqtt_address), admin=_address(self.admin_address),
                    coap=_address(self.coap_address), pid=os.getpid())
        systemd.notify("READY=1", f"STATUS=serving MQTT on {_hostport(self.mqtt_address)}")
        log.info("iot-gateway %s node %s region %s: MQTT on %s, admin on http://%s",
                 __version__, self.config.gateway.node_id, self.config.gateway.region,
                 _hostport(self.mqtt_address), _hostport(self.admin_address))

    def _replay(self, recovered: list[Envelope], source: str = "own") -> None:
        """Unretired WAL records go back to their lanes, in order, before new traffic."""
        if not recovered:
            return
        now = time.monotonic_ns()
        tiers = {t.name: int(t.max_latency_ms * 1_000_000) for t in self.config.tiers}
        default = self.config.classify.default_tier
        for envelope in recovered:
            if envelope.tier not in tiers:  # the tier is gone from the config
                envelope.tier = default
            envelope.received_ns = now
            envelope.deadline_ns = now + tiers[envelope.tier]
        self.ingest.enqueue(recovered)
        log.info("write-ahead log: replaying %d unretired messages (%s)", len(recovered), source)
        self._audit("wal.recovery", replayed=len(recovered), source=source)

    async def _adopt_orphans(self) -> None:
        """Take over the logs of daemons that have exited: re-append, then remove them."""
        assert self.instance is not None and self.wal is not None
        for path, lock in self.instance.lock_orphans():
            try:
                recovered = WriteAheadLog(path, self.config.wal, self.metrics).recover()
                if recovered:
                    done: asyncio.Future[OSError | None] = (
                        asyncio.get_running_loop().create_future())
                    self.wal.append(recovered, done.set_result)
                    error = await done
                    if error is not None:
                        log.error("cannot adopt the write-ahead log %s yet: %s", path, error)
                        continue
                    self._replay(recovered, source=str(path))
                shutil.rmtree(path)
            except GatewayError as err:
                log.error("cannot adopt the write-ahead log %s: %s", path, err)
            finally:
                release_orphan(lock)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        mqtt = self.config.mqtt
        codec_options = {"max_packet_size": mqtt.max_packet_size,
                         "receive_maximum": mqtt.receive_maximum,
                         "max_keepalive": mqtt.max_keepalive,
                         "topic_alias_maximum": mqtt.topic_alias_maximum}
        host, port = split_host_port(self.mqtt_listen)
        try:
            # SO_REUSEPORT: a new daemon can bind beside this one during an upgrade handover.
            server = await loop.create_server(
                lambda: MQTTServerProtocol(self.ingest, codec_options, mqtt.write_high_water),
                host, port, backlog=4096, reuse_port=True)
        except OSError as err:
            raise _listen_error("MQTT", self.mqtt_listen, err, "--mqtt-listen") from None
        self._mqtt_server = server
        self._unwind.append(server.close)
        self.mqtt_address = server.sockets[0].getsockname()[:2]
        tls = self.ingest.security.tls if self.ingest.security is not None else None
        if tls is not None:
            where = f"{tls.host}:{tls.port}"
            try:
                server = await loop.create_server(
                    lambda: MQTTServerProtocol(self.ingest, codec_options,
                                               mqtt.write_high_water),
                    tls.host, tls.port, ssl=tls.context, backlog=4096, reuse_port=True)
            except OSError as err:
                raise _listen_error("MQTT over TLS", where, err, "auth.tls.listen") from None
            self._mqtt_tls_server = server
            self._unwind.append(server.close)
            self.mqtt_tls_address = server.sockets[0].getsockname()[:2]
            log.info("MQTT over TLS on %s", _hostport(self.mqtt_tls_address))

        if self.config.coap.enabled:
            self._coap = await start_coap(self.config.coap, self.ingest, self.ingest.broker,
                                          self.metrics, self.coap_listen)
            self._unwind.append(self._coap.close)
            self.coap_address = self._coap.address

        runner = web.AppRunner(make_app(self), access_log=None)
        await runner.setup()
        self._unwind.append(runner.cleanup)
        host, port = split_host_port(self.admin_listen, "127.0.0.1")
        try:
            await web.TCPSite(runner, host, port, reuse_port=True).start()
        except OSError as err:
            raise _listen_error("admin HTTP", self.admin_listen, err, "--admin-listen") from None
        self.admin_address = runner.addresses[0][:2]

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop``), then drain and stop."""
        loop = asyncio.get_running_loop()
        # The write-ahead log's thread needs the GIL twice per group commit; with the default
        # 5 ms switch interval a busy loop makes it wait up to that long each time, and every
        # acknowledged message waits with it.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        handled = {signal.SIGTERM: lambda: self.request_stop("SIGTERM"),
                   signal.SIGINT: self._on_sigint, signal.SIGHUP: self.request_reload}
        for sig, handler in handled.items():  # before start: READY=1 invites signals
            loop.add_signal_handler(sig, handler)
        try:
            await self.start()
        except BaseException:
            for sig in handled:
                loop.remove_signal_handler(sig)
            raise
        try:
            await self.stopped()
        finally:
            await self.shutdown()
            for sig in handled:
                loop.remove_signal_handler(sig)

    def _on_sigint(self) -> None:
        if self._stop.is_set():
            log.warning("second SIGINT: exiting now; unprocessed acknowledged messages stay "
                        "in the write-ahead log")
            os._exit(1)
        self.request_stop("SIGINT")

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def stopped(self) -> None:
        """Return once a stop has been requested."""
        await self._stop.wait()

    async def shutdown(self) -> None:
        self.ready = False
        self.draining = True
        systemd.notify("STOPPING=1", "STATUS=draining")
        queued = self.dispatcher.queued
        log.info("draining (%s): %d queued", self._stop_reason or "stop", queued)
        self._audit("drain", reason=self._stop_reason, queued=queued)
        for server in (self._mqtt_server, self._mqtt_tls_server):
            if server is not None:
                server.close()
        self.ingest.accepting = False
        if self.amqp is not None:  # in-flight deliveries are acked, the rest requeued
            await self.amqp.stop_consuming()
        if self.fleet is not None:  # what it took is processed first, then handed back
            self.fleet.stop_taking()
        if self.regions is not None:  # forwarded work taken is processed first
            self.regions.stop_taking()
        for client in list(self.ingest.clients):
            client.close(SERVER_SHUTTING_DOWN)
        deadline = time.monotonic() + self.shutdown_timeout

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.dispatcher.wait_idle(), remaining())
        await self.workers.drain(remaining())
        self.workers.flush_windows(math.inf)  # the last aggregation windows
        await self.workers.drain(remaining())
        left = self.dispatcher.queued + self.workers.pending
        if left:
            log.warning("drain deadline: %d messages not processed; the acknowledged ones stay "
                        "in the write-ahead log for the next start", left)
        self.maintenance.close()
        self.broker_store.save_now()  # every connection is closed: sessions are final
        if self.regions is not None:  # confirmed forwards retired; the spool stays in the WAL
            await self.regions.close(self.config.fleet.confirm_timeout_s)
        if self.fleet is not None:  # confirmed work given away is retired
            await self.fleet.close(self.config.fleet.confirm_timeout_s)
        await self._flush_and_retire(close=True)
        self.workers.close()
        if self.ingest.alerter is not None:  # webhooks still queued: a last chance
            await self.ingest.alerter.close(min(remaining(), ALERT_CLOSE_TIMEOUT_S))
        self._audit("stopped", processed=self.workers.processed, left_unprocessed=left)
        await self._run_unwind()
        log.info("stopped: %d messages processed", self.workers.processed)

    def _attach_broker(self, sinks: dict[str, Sink]) -> None:
        """Sinks that publish over MQTT (type ``mqtt``) do so through this gateway's broker."""
        for sink in sinks.values():
            attach = getattr(sink, "attach_broker", None)
            if attach is not None:
                attach(self.ingest.broker)

    async def _run_unwind(self) -> None:
        while self._unwind:
            result = self._unwind.pop()()
            if asyncio.iscoroutine(result):
                await result

    # -- reload --------------------------------------------------------------------------
    def request_reload(self) -> None:
        if not self.ready:
            log.warning("SIGHUP ignored: not serving yet (or draining)")
            return
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> bool:
        """Validate and build the whole new config, then swap it in; or keep the old one."""
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = with_fleet(with_amqp(load_config(self.config_path), self.amqp_url),
                             self.fleet_url)
            new = self.worker.apply(new) if self.worker is not None else new
            _check_reloadable(self.config, new)
            parts = self._build(new)
        except GatewayError as err:  # ConfigError included
            log.error("reload refused, the running config is kept: %s", err)
            self._audit("reload", accepted=False, reason=str(err))
            systemd.notify("READY=1", "STATUS=reload refused; running config kept")
            return False
        old_sinks = self.sinks
        self.config = new
        self.sinks = parts.sinks
        self._attach_broker(self.sinks)
        self.registry = parts.registry
        self.dispatcher.reconfigure(new.tiers, new.dispatch,
                                    default_tier=new.classify.default_tier,
                                    anomaly_lanes=parts.anomaly_lanes)
        self._export_queue_depth()
        self.workers.reconfigure(parts.pipelines, new.retry)
        if self.elasticity is not None:  # the dispatcher's reload reset its slots
            self.elasticity.reconfigure(new.scaling, _tier_bounds(new))
        if self.fleet is not None:
            self.fleet.reconfigure(new)
        if self.regions is not None:
            self.regions.reconfigure(new)
        self.maintenance.reconfigure(new.maintenance)
        self.ingest.broker.settings = new.broker  # bounds apply to what comes next
        self.ingest.configure(new.mqtt, new.tiers, new.dispatch, parts.classifier,
                              parts.detector)
        self.ingest.reconfigure_security(parts.security)
        if self._coap is not None:
            self._coap.reconfigure(new.coap)
        old_alerter, self.ingest.alerter = self.ingest.alerter, parts.alerter
        if old_alerter is not None:
            await old_alerter.close(ALERT_CLOSE_TIMEOUT_S)
        for name, sink in old_sinks.items():
            if parts.sinks.get(name) is not sink:
                await _close_sink(name, sink)
        log.info("reloaded %s", self.config_path or "the built-in config")
        self._audit("reload", accepted=True, config_sha256=config_digest(new))
        systemd.notify("READY=1", "STATUS=reloaded")
        return True

    # -- processing results ----------------------------------------------------------------
    def _shed_late(self, lane: Lane, envelopes: list[Envelope]) -> None:
        """QoS 0 messages of a ``late = "shed"`` tier, past their deadline: dropped, counted."""
        self.metrics.messages_shed.labels(lane.name, "late").inc(len(envelopes))
        if self.audit is not None:
            self.audit.summarise("shed", f"{lane.name}/late", len(envelopes), tier=lane.name,
                                 reason="late")
        if self.fleet is not None:  # work taken from the region's queue ends here too
            self.fleet.finished(envelopes)

    def _finished(self, envelopes: list[Envelope]) -> None:
        """Their pipeline is done; retire their WAL records once the sinks have flushed them."""
        if self.wal is not None:
            self._finished_seqs.extend(e.wal_seq for e in envelopes if e.wal_seq)
        if self.fleet is not None:  # work taken from the region's queue: reported
            self.fleet.finished(envelopes)

    async def _flush_and_retire(self, close: bool = False) -> None:
        finished, self._finished_seqs = self._finished_seqs, []
        ok = True
        for name, sink in self.sinks.items():
            if close:
                ok = await _close_sink(name, sink) and ok
            else:
                try:
                    await sink.flush()
                except GatewayError as err:  # a sink's peer is away (AMQP): it says why
                    if name not in self._failing_sinks:
                        log.warning("sink %s cannot flush: %s; its records stay in the "
                                    "write-ahead log until it can", name, err)
                    self._failing_sinks.add(name)
                    ok = False
                    continue
                except Exception:
                    log.exception("sink %s failed to flush", name)
                    ok = False
                    continue
                if name in self._failing_sinks:
                    self._failing_sinks.discard(name)
                    log.info("sink %s flushes again", name)
        if self.wal is None:
            return
        if ok:
            self.wal.retire(finished)
        else:  # retry next time: nothing is retired that a sink may not have written
            self._finished_seqs[:0] = finished

    async def _measure_loop_lag(self) -> None:
        observe = self.metrics.loop_lag.observe
        while True:
            started = time.perf_counter()
            await asyncio.sleep(LOOP_LAG_PROBE_S)
            observe(max(0.0, time.perf_counter() - started - LOOP_LAG_PROBE_S))

    # -- periodic work: one coarse timer for every connection -------------------------
    async def _housekeep(self) -> None:
        connect_timeout = self.config.mqtt.connect_timeout_s
        next_flush = time.monotonic() + SINK_FLUSH_INTERVAL_S
        next_adopt = time.monotonic() + ADOPT_INTERVAL_S
        next_snapshot = time.monotonic()
        watchdog = systemd.watchdog_interval()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            now = time.monotonic()
            if watchdog is not None:  # pinged from the loop: a stuck loop gets restarted
                systemd.notify("WATCHDOG=1")
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
            self.ingest.resume_refused()
            self.ingest.broker.publish_metrics()
            if now >= next_snapshot:
                next_snapshot = now + self.config.broker.snapshot_interval_s
                await self.broker_store.save_if_changed()
            if self.instance is not None and now >= next_adopt:
                next_adopt = now + ADOPT_INTERVAL_S
                await self._adopt_orphans()
            if now >= next_flush:
                next_flush = now + SINK_FLUSH_INTERVAL_S
                detector = self.ingest.detector
                if detector is not None:  # devices gone silent, anomalies left unacknowledged
                    later = detector.check_silence(now) + detector.escalations(now)
                    if later:
                        self.ingest.raised(later)
                self.workers.flush_windows(time.time())
                self.maintenance.tick(time.time())
                await self._flush_and_retire()
                if self.audit is not None:
                    if not self.audit.is_open:
                        self._open_audit()
                    if self.audit.is_open:
                        try:
                            self.audit.flush_summaries()
                        except AuditError as err:
                            self.metrics.audit_errors.inc()
                            log.error("audit summaries not written: %s", err)


    def _on_pressure(self, paused: bool) -> None:
        if paused:
            log.info("back-pressure: %d messages queued, pausing reads", self.dispatcher.queued)
        else:
            log.info("back-pressure released: %d queued", self.dispatcher.queued)
        self.ingest.set_backpressure(paused)

    # -- introspection ----------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "node_id": self.config.gateway.node_id,
            "region": self.config.gateway.region,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "listeners": {
                "mqtt": _address(self.mqtt_address),
                "admin": _address(self.admin_address),
                "coap": _address(self.coap_address),
            },
        }

    def acknowledge_anomaly(self, device: str, detector: str) -> bool:
        """An operator saw it: stop escalating this (device, detector). False if not raised."""
        detector_ = self.ingest.detector
        if detector_ is None or not detector_.acknowledge(device, detector):
            return False
        log.info("anomaly %s on %s acknowledged", detector, device)
        self._audit("anomaly.acknowledged", device=device, detector=detector)
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.ingest.received,
            "refused": self.ingest.refused,
            "shed": self.ingest.shed,
            "processed": self.workers.processed,
            "failed": self.workers.failed,
            "pending": self.workers.pending,
            "queued": self.dispatcher.queued,
            "wal_unretired": self.wal.unretired if self.wal is not None else 0,
            "connections": len(self.ingest.clients),
            "lanes": {lane.name: len(lane) for lane in self.dispatcher.lanes},
        }


async def _close_sink(name: str, sink: Sink) -> bool:
    try:
        await sink.close()
    except Exception:
        log.exception("sink %s failed to close", name)
        return False
    return True


def _tier_bounds(config: Config) -> dict[str, float]:
    return {t.name: t.max_latency_ms / 1000 for t in config.tiers}


def _check_reloadable(old: Config, new: Config) -> None:
    for path in RESTART_ONLY:
        before, after = old, new
        for part in path.split("."):
            before, after = getattr(before, part), getattr(after, part)
        if before != after:
            raise ConfigError(f"{path} changed ({before!r} → {after!r}): restart to apply it")


def _address(addr: tuple[str, int] | None) -> dict[str, Any] | None:
    return None if addr is None else {"host": addr[0], "port": addr[1]}


def _hostport(addr: tuple[str, int] | None) -> str:
    return "-" if addr is None else f"{addr[0]}:{addr[1]}"


def _listen_error(what: str, listen: str, err: OSError, option: str) -> GatewayError:
    if err.errno == errno.EADDRINUSE:
        why = "address already in use (is another broker or gateway running there?)"
    else:
        why = err.strerror or str(err)
    return GatewayError(f"cannot listen for {what} on {listen}: {why}; "
                        f"choose another address with {option} HOST:PORT (port 0 = any free port)")
