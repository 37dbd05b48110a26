"""``Regions``: this gateway in the multi-region topology, as the gateway runs it (see the
package doc for the theory of operation)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

from pamqp import commands

from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.fleet.codec import WORK, WorkItem, encode_work
from gateway.fleet.link import Link, LinkSettings
from gateway.fleet.overflow import Durability, Taken, Taker
from gateway.ingest import base36
from gateway.metrics import Metrics
from gateway.regions.codec import HEARTBEAT, RegionDecodeError, decode_heartbeat, encode_heartbeat
from gateway.regions.health import RegionHealth, Transition
from gateway.regions.spool import Spool
from policies.regions import Placement, RegionsSection, Topology, build_placement
from protocols.amqp.errors import AmqpError
from protocols.amqp.publisher import ConfirmedPublisher, Outgoing
from protocols.amqp.wire import Delivery, encode_properties

log = logging.getLogger("iotgw.regions")

SPOOL_PASS = 20_000
"""Spooled messages placed again per pass (a pass runs on the loop; the rest waits for the
next turn, in order)."""
TICK_S = 0.05
_LINK_DOWN = Placement("spool", "", "link down")


class Ingest(Protocol):
    """What regions need from ``gateway.ingest.MQTTIngest``."""

    accepting: bool
    divert: Callable[[list[Envelope]], list[Envelope]] | None

    def enqueue(self, envelopes: list[Envelope]) -> None: ...


class RegionTaken:
    """``Envelope.ack`` of work taken from this region's queue: placed already, never again
    (nor reported anywhere: its origin retired it on RabbitMQ's confirm)."""

    __slots__ = ("origin",)

    def __init__(self, origin: str) -> None:
        self.origin = origin


def region_queue_arguments(section: RegionsSection) -> dict[str, Any]:
    """How every gateway declares a region queue (the same everywhere, or RabbitMQ refuses):
    one active consumer at a time (order), refusals dead-lettered to ``refused_queue``."""
    return {"x-single-active-consumer": True, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": refused_queue(section)}


def refused_queue(section: RegionsSection) -> str:
    """Where work a region refused (residency) is dead-lettered, for an operator to see."""
    return f"{section.exchange}.refused"


def health_exchange(section: RegionsSection) -> str:
    return f"{section.exchange}.health"


class Regions:
    """Placement, forwarding, taking, health and the spool of one gateway."""

    link_name = "regions:work"

    def __init__(self, config: Config, *, ingest: Ingest, dispatcher: Dispatcher,
                 wal: Durability | None, metrics: Metrics,
                 audit: Callable[..., None] | None = None,
                 summarise: Callable[..., None] | None = None) -> None:
        regions: RegionsSection = config.regions
        if not regions.enabled:
            raise ConfigError("regions: none configured (regional processing is off)")
        if config.fleet.url is None:
            raise ConfigError("regions: the regions' RabbitMQ is [fleet] url (or "
                              "serve --fleet-url), which is not set")
        self.regions = regions
        self.section = config.fleet
        """Link settings (``TakerHost``): the fleet's RabbitMQ and timeouts."""
        self.url: str = config.fleet.url
        self.here = config.gateway.region
        self.node = config.gateway.node_id
        self.origin = f"{self.node}/{base36(time.time_ns() // 1000)}"
        self.ingest = ingest
        self.dispatcher = dispatcher
        self.wal = wal
        self.metrics = metrics
        self._audit = audit
        self._summarise = summarise
        self.topology = Topology(regions)
        self.policy = build_placement(regions)
        self.names = [spec.name for spec in regions.regions]
        self.queues = [regions.queue_for(self.here)]
        self.health = RegionHealth(self.names, self.here, regions.heartbeat_interval_s,
                                   regions.down_after_missed, time.monotonic())
        self.spool = Spool(regions.max_spooled)
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.saturated_above = config.dispatch.shed_above
        """This gateway is saturated (for placement and its heartbeat) past this backlog."""
        settings = LinkSettings(self.section.heartbeat_s, self.section.connect_timeout_s,
                                self.section.reconnect_initial_s, self.section.reconnect_max_s)
        client = f"iot-gateway {self.node}"
        self.publisher = ConfirmedPublisher(
            "regions:forward", self.url, regions.exchange, metrics.amqp,
            exchange_type="direct", declare=True, settings=settings,
            max_buffered=self.section.max_buffered, name=client)
        self.beats = ConfirmedPublisher(
            "regions:heartbeat", self.url, health_exchange(regions), metrics.amqp,
            exchange_type="fanout", declare=True, settings=settings, max_buffered=16,
            name=client)
        self.health_queue = f"{health_exchange(regions)}.{self.origin}"
        self.health_link = Link("regions:health", self.url, settings, metrics.amqp,
                                setup=self._setup_health, on_deliveries=self._heard,
                                on_up=self._link_up, on_down=self._link_down,
                                client_name=client)
        self.declared = False
        """Every region queue is declared (a forward to a missing one would be lost)."""
        self.taker = Taker(self)
        self.reconfigure(config)
        self._bypass = False
        self._next_divert: Callable[[list[Envelope]], list[Envelope]] | None = None
        self._unconfirmed: deque[tuple[int, list[int], float]] = deque()
        self._closed = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._next_beat = 0.0
        self._next_retry = 0.0
        self._drain_now = False
        self._bad_beats = 0
        self._self_heard: float | None = None
        """When this gateway last heard its own heartbeat: the round trip through RabbitMQ
        works (a link cut silently is noticed within the down window, not the AMQP
        heartbeat's)."""
        m = metrics.regions
        self._local_bytes = m.local_bytes
        self._placed = {a: m.placements.labels(a) for a in ("local", "forward", "spool")}
        self._transfer = {name: m.transfer_bytes.labels(self.here, name) for name in self.names}
        self._up = {name: m.up.labels(name) for name in self.names}
        for name in self.names:
            self._up[name].set(1 if name == self.here else 0)
        self.forwarded = 0
        self.refused = 0
        self.drained = 0

    def reconfigure(self, config: Config) -> None:
        """The tiers of a (re)loaded config (the section itself needs a restart)."""
        self.deadlines_ns = {t.name: int(t.max_latency_ms * 1_000_000) for t in config.tiers}
        self.default_tier = config.classify.default_tier
        self.anomaly_lanes = bool(config.anomaly.detectors)
        self.take_below = 4 * config.dispatch.batch_size * config.dispatch.slots

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Hook into ingest (ahead of the fleet's overflow: ``follow``); connect in the
        background. Before the write-ahead log is replayed: replayed work is placed too."""
        self.follow(self.ingest.divert)
        self.health_link.start()
        self.taker.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="regions")
        log.info("regions: %s (node %s) in %s, placement %s, through %s", self.here,
                 self.node, ", ".join(self.names), self.policy.name, self.health_link.where)

    def follow(self, divert: Callable[[list[Envelope]], list[Envelope]] | None) -> None:
        """Be ingest's hook, handing what stays here to ``divert`` (the fleet's overflow)."""
        self._next_divert = divert
        self.ingest.divert = self.divert

    def stop_taking(self) -> None:
        """A drain: take no more forwarded work (what was taken is processed)."""
        self._stopping = True
        self.taker.stop("drain")

    async def close(self, timeout: float) -> None:
        """Stop placing (what is spooled stays in the write-ahead log for the next start),
        finish taking, wait (up to ``timeout``) for the confirms of forwarded work (retired),
        close every link."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        if self.ingest.divert == self.divert:
            self.ingest.divert = self._next_divert
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.taker.finish(self.section.close_timeout_s)
        await self.taker.close()
        try:
            await self.publisher.close(timeout)
        except AmqpError as err:
            log.warning("regions: %s; forwards not confirmed stay in the write-ahead log", err)
        self._retire_confirmed()
        with contextlib.suppress(AmqpError):
            await self.beats.close(min(timeout, 1.0))
        await self.health_link.close(self.section.close_timeout_s)
        if self.spool.items:
            log.info("regions: %d spooled messages left (the QoS >= 1 ones stay in the "
                     "write-ahead log)", len(self.spool))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # ours: logged; the next tick tries again
                log.exception("regions tick failed")

    # -- the periodic look ----------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        self._retire_confirmed()
        self.health.link(self._link_ok(now), now)
        for change in self.health.update(now):
            self._transition(change)
        self.taker.pump()
        if now >= self._next_beat:
            self._next_beat = now + self.regions.heartbeat_interval_s
            self._beat()
        if self.spool.items and (self._drain_now or now >= self._next_retry):
            self._drain_now = False
            self._next_retry = now + self.regions.spool_retry_s
            self._drain_spool()
        self.metrics.regions.spooled.set(len(self.spool))

    def _link_ok(self, now: float) -> bool:
        """Connected, hearing its own heartbeats, and forwards confirmed in time."""
        if not self.health_link.up or not self.declared or self.publisher.down:
            return False
        heard = self._self_heard
        if heard is None or now - heard > self.health.window:
            return False
        unconfirmed = self._unconfirmed
        return not unconfirmed or now - unconfirmed[0][2] <= self.health.window

    def _transition(self, change: Transition) -> None:
        self._up[change.region].set(1 if change.up else 0)
        if change.up:
            log.info("regions: %s is up again (down %.1f s)", change.region, change.after_s)
            self._drain_now = True
        else:
            log.warning("regions: %s is down (%s; detected %.2f s after its last heartbeat "
                        "or the link's loss)", change.region, change.cause, change.after_s)
        self._record("region.up" if change.up else "region.down", region=change.region,
                     cause=change.cause, after_s=round(change.after_s, 3),
                     spooled=len(self.spool))

    def _beat(self) -> None:
        body = encode_heartbeat(self.here, self.node, self.local_saturated(), time.time())
        with contextlib.suppress(AmqpError):
            self.beats.put([Outgoing("", body, encode_properties(content_type=HEARTBEAT,
                                                                  delivery_mode=1),
                                     keep=False)])

    def local_saturated(self) -> bool:
        dispatcher = self.dispatcher
        return dispatcher.pressure or dispatcher.queued > self.saturated_above

    # -- placement (ingest's hook, ahead of the lanes) ------------------------------------------
    def divert(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Every message arriving here gets a placement: kept (local), forwarded or spooled;
        returns the kept ones, in order, through the fleet's overflow hook if any."""
        keep = envelopes if self._bypass else self._place(envelopes)
        following = self._next_divert
        if following is not None and keep:
            keep = following(keep)
        return keep

    def _place(self, envelopes: list[Envelope]) -> list[Envelope]:
        if self._closed:  # shutting down: the lanes take only what was placed before
            return [e for e in envelopes if type(e.ack) in (RegionTaken, Taken)]
        keep: list[Envelope] = []
        forward: list[tuple[Envelope, Placement]] = []
        spool = self.spool
        place = self.policy.place
        here = self.here
        states = self.health.states
        saturated = self.local_saturated()
        local_bytes = 0
        local = 0
        spooled = 0
        decided: dict[Placement, int] = {}
        for env in envelopes:
            ack = env.ack
            if type(ack) is RegionTaken or type(ack) is Taken:  # placed already
                keep.append(env)
                continue
            if spool.items and spool.holds(env):  # behind its earlier work
                spooled += self._spool(env)
                continue
            p = place(env.tenant, env.device_class, here, saturated, states)
            action = p.action
            if action == "local":
                keep.append(env)
                local += 1
                local_bytes += len(env.payload)
            elif action == "forward" and self.declared:
                forward.append((env, p))
            else:
                spooled += self._spool(env)
                if action == "forward":
                    p = _LINK_DOWN
            decided[p] = decided.get(p, 0) + 1
        if local:
            self._local_bytes.inc(local_bytes)
            self._placed["local"].inc(local)
        if forward:
            self._forward(forward)
        if spooled:
            self._placed["spool"].inc(spooled)
        summarise = self._summarise
        if summarise is not None:
            for p, n in decided.items():
                summarise("region.placement", f"{p.action}/{p.region}/{p.reason}", n,
                          action=p.action, region=p.region, reason=p.reason)
        return keep

    def _spool(self, env: Envelope) -> int:
        if self.spool.add(env):
            return 1
        self.metrics.regions.spool_dropped.inc()
        if self.spool.dropped == 1 or self.spool.dropped % 10_000 == 0:
            log.error("regions: spool full (%d QoS 0 messages): QoS 0 dropped (%d so far)",
                      self.spool.max_qos0, self.spool.dropped)
        return 0

    def _forward(self, items: list[tuple[Envelope, Placement]]) -> None:
        """Published in order, persistent; WAL records retired on RabbitMQ's confirm."""
        messages: list[Outgoing] = []
        seqs: list[int] = []
        origin = self.origin
        transfer = self._transfer
        for env, p in items:
            body = encode_work(env, origin, "", 0)
            properties = encode_properties(content_type=WORK,
                                           delivery_mode=2 if env.qos else 1,
                                           message_id=env.id)
            messages.append(Outgoing(p.region, body, properties, keep=env.qos > 0))
            transfer[p.region].inc(len(body))
            if env.wal_seq:
                seqs.append(env.wal_seq)
        try:
            self.publisher.put(messages)
        except AmqpError:  # closed meanwhile: they stay in the log for the next start
            return
        self._unconfirmed.append((self.publisher.accepted, seqs, time.monotonic()))
        self.forwarded += len(messages)
        self._placed["forward"].inc(len(messages))

    def _retire_confirmed(self) -> None:
        unconfirmed = self._unconfirmed
        confirmed = self.publisher.confirmed
        while unconfirmed and unconfirmed[0][0] <= confirmed:
            _, seqs, _ = unconfirmed.popleft()
            if seqs and self.wal is not None:
                self.wal.retire(seqs)

    def _drain_spool(self) -> None:
        """Places the spool again, oldest first; what may still go nowhere goes back to the
        front, and nothing of its (tenant, class) passes it."""
        spool = self.spool
        batch = spool.take(SPOOL_PASS)
        stuck: list[Envelope] = []
        blocked: set[tuple[str, str]] = set()
        keep: list[Envelope] = []
        forward: list[tuple[Envelope, Placement]] = []
        place = self.policy.place
        here, states = self.here, self.health.states
        saturated = self.local_saturated()
        for env in batch:
            key = (env.tenant, env.device_class)
            if key not in blocked:
                p = place(env.tenant, env.device_class, here, saturated, states)
                if p.action == "local":
                    keep.append(env)
                    continue
                if p.action == "forward" and self.declared:
                    forward.append((env, p))
                    continue
                blocked.add(key)
            stuck.append(env)
        spool.put_back(stuck)
        moved = len(keep) + len(forward)
        if not moved:
            return
        self.drained += moved
        if forward:
            self._forward(forward)
        if keep:
            self._placed["local"].inc(len(keep))
            self._bypass = True
            try:
                self.ingest.enqueue(keep)
            finally:
                self._bypass = False
        log.info("regions: %d spooled messages placed (%d forwarded), %d still spooled",
                 moved, len(forward), len(spool))
        if self._summarise is not None:
            self._summarise("region.spool_drained", "drained", moved)
        if spool.items and len(stuck) < len(batch):
            self._drain_now = True  # more to place: the next tick, not a retry period later

    # -- the health link: declarations, heartbeats ----------------------------------------------
    async def _setup_health(self, link: Link) -> None:
        regions = self.regions
        await self._declare_regions(link, self.names)
        exchange = health_exchange(regions)
        await link.call(commands.Exchange.Declare(exchange=exchange, exchange_type="fanout",
                                                  durable=True), commands.Exchange.DeclareOk)
        await link.call(commands.Queue.Declare(queue=self.health_queue, exclusive=True,
                                               auto_delete=True), commands.Queue.DeclareOk)
        await link.call(commands.Queue.Bind(queue=self.health_queue, exchange=exchange,
                                            routing_key=""), commands.Queue.BindOk)
        await link.call(commands.Basic.Consume(queue=self.health_queue, no_ack=True,
                                               consumer_tag=self.health_queue),
                        commands.Basic.ConsumeOk)

    async def _declare_regions(self, link: Link, names: list[str]) -> None:
        regions = self.regions
        await link.call(commands.Exchange.Declare(exchange=regions.exchange,
                                                  exchange_type="direct", durable=True),
                        commands.Exchange.DeclareOk)
        await link.call(commands.Queue.Declare(queue=refused_queue(regions), durable=True),
                        commands.Queue.DeclareOk)
        arguments = region_queue_arguments(regions)
        for name in names:
            queue = regions.queue_for(name)
            await link.call(commands.Queue.Declare(queue=queue, durable=True,
                                                   arguments=arguments),
                            commands.Queue.DeclareOk)
            await link.call(commands.Queue.Bind(queue=queue, exchange=regions.exchange,
                                                routing_key=name), commands.Queue.BindOk)

    def _link_up(self) -> None:
        self.declared = True
        self._next_beat = 0.0  # say so at once

    def _link_down(self) -> None:
        self.declared = False

    def _heard(self, deliveries: list[Delivery]) -> None:
        now, wall = time.monotonic(), time.time()
        health = self.health
        for d in deliveries:
            if d.properties.content_type != HEARTBEAT:
                continue
            try:
                beat = decode_heartbeat(d.body)
            except RegionDecodeError as err:
                self._bad_beats += 1
                if self._bad_beats == 1 or self._bad_beats % 1000 == 0:
                    log.warning("regions: %s (%d so far)", err, self._bad_beats)
                continue
            age = max(0.0, wall - beat.sent_at)
            if beat.node == self.node and beat.region == self.here:
                if age <= health.window:
                    self._self_heard = now
                continue
            health.beat(beat.region, beat.node, beat.saturated, now, age)

    # -- the taker's host (``gateway.fleet.overflow.TakerHost``) --------------------------------
    async def declare(self, link: Link) -> None:
        await self._declare_regions(link, [self.here])

    def room(self) -> int:
        ingest, wal = self.ingest, self.wal
        if (not ingest.accepting or self.dispatcher.pressure or self._stopping
                or (wal is not None and wal.refusing)):
            return 0
        return self.take_below - self.dispatcher.queued - self.taker.committing

    def admit(self, item: WorkItem) -> bool:
        """Residency, checked again where the work lands: refused work is dead-lettered."""
        allowed = self.topology.allowed(item.tenant, item.device_class)
        if allowed is None or self.here in allowed:
            return True
        self.refused += 1
        self.metrics.regions.residency_refused.inc()
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("regions: work of tenant %r (%s) from %s may not be processed in %s "
                        "(only %s): dead-lettered to %s (%d so far)", item.tenant,
                        item.device_class, item.origin, self.here, ",".join(sorted(allowed)),
                        refused_queue(self.regions), self.refused)
        if self._summarise is not None:
            self._summarise("region.residency_refused", item.tenant, tenant=item.tenant,
                            device_class=item.device_class, origin=item.origin)
        return False

    def taken(self, item: WorkItem) -> object:
        return RegionTaken(item.origin)

    def took(self, envelopes: list[Envelope]) -> None:
        """Forwarded work, durable here: into the lanes (placed already)."""
        self.metrics.regions.taken.inc(len(envelopes))
        self.ingest.enqueue(envelopes)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit(event, **fields)
