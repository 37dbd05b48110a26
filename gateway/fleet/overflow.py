"""Overflow: work of a saturated replica goes to the region's work queue; replicas with spare
capacity take it in. See ``gateway.fleet`` for why nothing is lost and order holds.

Giving (``Overflow.tick``, every ``check_interval_s`` on the loop): a tier that may overflow is
saturated when its lane holds more than ``overflow_backlog`` messages, or its oldest one has
waited ``overflow_latency_share`` of the tier's max latency. Then whole devices, oldest first,
are taken out of the lane (``Dispatcher.withdraw``, order kept) until what stays is half the
backlog and young enough; each (device, tier) is marked, and ``divert`` (ingest's hook, ahead
of the lanes) sends its later messages after them while it stays marked. Each message is
published, persistent, to the device's partition with its tier's AMQP priority, numbered
(``seq``) per process; its WAL record is retired once RabbitMQ confirmed the publish (the
confirms of one channel come in publishing order, so "confirmed count ≥ the count after this
batch was put" is enough). A (device, tier) goes back to local processing once the takers
reported every message of it finished (``DoneReport``, to this replica's own queue), or
after ``report_timeout_s`` without a report; and only while its tier is not saturated.

Taking (``_Taker``): while this replica has spare capacity (fewer than ``take_below``
messages waiting, no tier saturated) it consumes every partition of its region. Each
partition queue is single-active-consumer: RabbitMQ delivers it to one replica at a time,
the others wait as standbys. Deliveries are held, and handed in only as far as there is room
(``take_below`` minus what waits): made durable in the write-ahead log, acknowledged in tag
order after the group commit (as the AMQP ingest consumer does), then queued with their
origin's classification and receipt time (``Taken`` in ``Envelope.ack`` marks them, so they
are never given away again). A replica that holds work it has no room for during
``handoff_after_s``, or whose own tiers saturate, or that drains, stops taking: it waits until
everything it took is finished, then closes its consumer; RabbitMQ requeues what it held, in
place, and makes a standby the active consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from pamqp import commands

from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.fleet.codec import (
    DONE,
    WORK,
    DoneReport,
    FleetDecodeError,
    WorkItem,
    decode_work,
    encode_done,
    encode_work,
    envelope_of,
    partition_of,
    tier_priorities,
)
from gateway.fleet.config import FleetSection, overflow_tiers
from gateway.fleet.link import Link, LinkSettings
from gateway.metrics import Metrics
from protocols.amqp.errors import AmqpError
from protocols.amqp.publisher import ConfirmedPublisher, Outgoing
from protocols.amqp.wire import Delivery, encode_properties

log = logging.getLogger("iotgw.fleet.overflow")

WAITING, ACK, NACK, REJECT = 0, 1, 2, 3
"""Outcomes of a batch of deliveries: waiting for its commit, acknowledged, requeued, refused
(rejected without requeue: RabbitMQ dead-letters it if the queue says where)."""
SCAN_PAUSE_S = 0.2
"""After a scan of a saturated lane found nothing to give away, wait this long to scan it
again (scanning a long lane costs milliseconds)."""
RETAKE_AFTER_S = 1.0
"""After a hand-off, the least time before taking work again."""
TIMEOUT_SWEEP_S = 1.0
RECENT_IDS = 65536
"""Ids of work taken in, remembered to drop a second copy (a redelivery, or a publish
repeated after a lost confirm)."""


class Durability(Protocol):
    """What the taker needs from the write-ahead log (``gateway.wal.WriteAheadLog``)."""

    @property
    def refusing(self) -> bool: ...

    def append(self, batch: list[Envelope],
               done: Callable[[OSError | None], None]) -> None: ...

    def retire(self, seqs: list[int]) -> None: ...


class Ingest(Protocol):
    """What overflow needs from ``gateway.ingest.MQTTIngest``."""

    accepting: bool

    def enqueue(self, envelopes: list[Envelope]) -> None: ...


class TakerHost(Protocol):
    """What a ``Taker`` needs from the one it takes work for: ``Overflow`` (the region's work
    queues) or ``gateway.regions.Regions`` (a region's forwarded work)."""

    section: FleetSection
    """Its link settings (url, heartbeat, timeouts, prefetch)."""
    queues: list[str]
    origin: str
    metrics: Metrics
    dispatcher: Dispatcher
    wal: Durability | None
    recent: OrderedDict[str, None]
    deadlines_ns: dict[str, int]
    default_tier: str
    anomaly_lanes: bool
    link_name: str
    """Names its link (``iotgw_amqp_*{link}``) and its log lines."""

    async def declare(self, link: Link) -> None:
        """Declares ``queues`` (and whatever they need) before consuming them."""

    def room(self) -> int: ...

    def admit(self, item: WorkItem) -> bool:
        """False: the item must not be processed here (rejected, never requeued)."""

    def taken(self, item: WorkItem) -> object:
        """The ``Envelope.ack`` marking work taken in."""

    def took(self, envelopes: list[Envelope]) -> None: ...


class Taken:
    """``Envelope.ack`` of work taken from the region's queue: who gave it, and its number
    there (for the report once it is finished)."""

    __slots__ = ("origin", "reply", "seq", "tier")

    def __init__(self, origin: str, reply: str, seq: int, tier: str) -> None:
        self.origin = origin
        self.reply = reply
        self.seq = seq
        self.tier = tier  # as the origin named it (the taker may lack the tier)


class _Given:
    """A (device, tier) whose work goes to the work queue."""

    __slots__ = ("last", "progress", "reported")

    def __init__(self, now: float) -> None:
        self.last = 0  # seq of the latest message given away
        self.reported = 0  # the highest seq reported finished
        self.progress = now  # monotonic time of the marking or of the latest report


class _Batch:
    __slots__ = ("last_tag", "outcome", "session")

    def __init__(self, last_tag: int, session: int) -> None:
        self.last_tag = last_tag
        self.session = session
        self.outcome = WAITING


class Overflow:
    """Both sides of overflow for one replica (see the module doc)."""

    def __init__(self, section: FleetSection, config: Config, *, origin: str, reply: str,
                 ingest: Ingest, dispatcher: Dispatcher, wal: Durability | None,
                 metrics: Metrics, publisher: ConfirmedPublisher,
                 ready: Callable[[], bool],
                 audit: Callable[..., None] | None = None,
                 summarise: Callable[..., None] | None = None) -> None:
        assert section.url is not None
        self.section = section
        self.origin = origin
        """Node id and process epoch: names this replica's work and its reports."""
        self.reply = reply
        self.ingest = ingest
        self.dispatcher = dispatcher
        self.wal = wal
        self.metrics = metrics
        self.publisher = publisher
        self.ready = ready
        """Whether the work queues are declared on a live link (overflow waits for it)."""
        self._audit = audit
        self._summarise = summarise
        region = config.gateway.region
        self.queues = [section.work_queue.format(region=region, partition=p)
                       for p in range(section.partitions)]
        self.given: dict[tuple[str, str], _Given] = {}
        self.taken_unfinished = 0
        self.taker: Taker | None = None
        self.given_out = 0
        self.taken_in = 0
        self._seq = 0
        self._unconfirmed: deque[tuple[int, list[int]]] = deque()
        self._returnable: set[tuple[str, str]] = set()
        self._reports: dict[str, tuple[str, dict[tuple[str, str], int]]] = {}
        self._saturated: set[str] = set()
        self._scan_after: dict[str, float] = {}
        self._retake_at = 0.0
        self._next_report = 0.0
        self._next_sweep = 0.0
        self._stopping = False  # draining: take nothing more
        self._closed = False  # give nothing more
        self._task: asyncio.Task[None] | None = None
        self._handoff: asyncio.Task[None] | None = None
        self.recent: OrderedDict[str, None] = OrderedDict()
        self._taking_gauge = metrics.fleet.taking
        self._devices_gauge = metrics.fleet.overflow_devices
        self._counters: dict[tuple[str, str], Any] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """The tiers of a (re)loaded config: names, order, max latencies."""
        tiers = config.tiers
        names = [t.name for t in tiers]
        self.overflow_tiers = overflow_tiers(self.section, names)
        self.deadlines_ns = {t.name: int(t.max_latency_ms * 1_000_000) for t in tiers}
        self.priorities = tier_priorities(names, self.section.max_priority)
        self.default_tier = config.classify.default_tier
        self.anomaly_lanes = bool(config.anomaly.detectors)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-overflow")

    async def _run(self) -> None:
        interval = self.section.check_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:  # ours: logged; the next tick tries again
                log.exception("fleet overflow tick failed")

    def stop_taking(self) -> None:
        """A drain: take no more work; what was taken is finished before the consumer
        closes (``close``)."""
        self._stopping = True
        if self.taker is not None:
            self.taker.stop("drain")

    async def close(self, timeout: float) -> None:
        """Hand the partitions back, report what was finished, stop giving work away and
        wait (up to ``timeout``) for RabbitMQ's confirms of what was given; confirmed work is
        retired, the rest stays in the write-ahead log for the next start."""
        self._stopping = True
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        taker, self.taker = self.taker, None
        if taker is not None:
            await taker.finish(self.section.close_timeout_s)
            await taker.close()
        if self._handoff is not None:
            with contextlib.suppress(Exception):
                await self._handoff
        self._report()
        try:
            await self.publisher.close(timeout)
        except AmqpError as err:
            log.warning("fleet: %s; the work not confirmed stays in the write-ahead log", err)
        self._retire_confirmed()
        self._taking_gauge.set(0)

    # -- the periodic look ---------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        self._retire_confirmed()
        saturated = self._saturation(now_ns)
        if saturated and not self._closed and self.ready() and not self.publisher.down:
            for tier in saturated:
                if now >= self._scan_after.get(tier, 0.0):
                    self._give_away(tier, now, now_ns)
        if self._returnable or now >= self._next_sweep:
            self._return_devices(now)
        self._steer(saturated, now)
        taker = self.taker
        if taker is not None:
            taker.pump()
            if taker.stopping and taker.drained(self.taken_unfinished) and self._handoff is None:
                self._handoff = asyncio.get_running_loop().create_task(self._hand_off(taker))
        if now >= self._next_report:
            self._next_report = now + self.section.report_interval_s
            self._report()

    def _saturation(self, now_ns: int) -> set[str]:
        """The tiers saturated now. Age counts for this replica's own work only: work taken
        in may have waited long in the queue (its clock started on its origin), which says
        nothing of the capacity here; and it is never more than half the backlog limit."""
        section = self.section
        share = section.overflow_latency_share
        saturated: set[str] = set()
        lanes = self.dispatcher.lane_by_tier
        ages: dict[str, int] = {}
        for tier in self.overflow_tiers:
            lane = lanes.get(tier)
            if lane is None or not lane.items:
                continue
            items = lane.items
            age = ages[tier] = now_ns - _oldest_own(items, now_ns)
            budget = self.deadlines_ns.get(tier, 0) * share
            if len(items) > section.overflow_backlog or (budget and age > budget):
                saturated.add(tier)
        for tier in saturated - self._saturated:
            lane = lanes[tier]
            age_ms = round(ages[tier] / 1e6, 3)
            log.info("fleet: tier %s saturated (%d queued, oldest %.0f ms): giving work away",
                     tier, len(lane.items), age_ms)
            self._record("fleet.saturated", tier=tier, queued=len(lane.items), oldest_ms=age_ms,
                         backlog_limit=section.overflow_backlog,
                         latency_limit_ms=self.deadlines_ns.get(tier, 0) * share / 1e6)
        for tier in self._saturated - saturated:
            self._record("fleet.relieved", tier=tier,
                         queued=len(lanes[tier].items) if tier in lanes else 0)
        self._saturated = saturated
        return saturated

    # -- giving --------------------------------------------------------------------------------
    def _give_away(self, tier: str, now: float, now_ns: int) -> None:
        """Whole devices of ``tier``'s lane, oldest first, to the work queue."""
        lane = self.dispatcher.lane_by_tier[tier]
        items = lane.items
        counts: dict[str, int] = {}
        pinned: set[str] = set()  # devices with work taken from the queue here: it stays
        for env in items:
            if type(env.ack) is Taken:
                pinned.add(env.device)
            else:
                counts[env.device] = counts.get(env.device, 0) + 1
        target = self.section.overflow_backlog // 2
        young_ns = self.deadlines_ns.get(tier, 0) * self.section.overflow_latency_share / 2
        remaining = len(items)
        chosen: set[str] = set()
        for env in items:
            device = env.device
            if device in chosen or device in pinned:
                continue
            if remaining <= target and now_ns - env.received_ns <= young_ns:
                break
            chosen.add(device)
            remaining -= counts[device]
        if not chosen:
            self._scan_after[tier] = now + SCAN_PAUSE_S
            return
        moving = self.dispatcher.withdraw(
            lane, lambda env: env.device in chosen and type(env.ack) is not Taken)
        for device in chosen:
            self.given.setdefault((device, tier), _Given(now))
        self._devices_gauge.set(len(self.given))
        self._give(moving)
        log.debug("fleet: %d messages of %d %s devices given away", len(moving), len(chosen),
                  tier)

    def divert(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Ingest's hook ahead of the lanes: messages of marked (device, tier)s follow their
        predecessors to the work queue; returns the rest, in order."""
        given = self.given
        if not given or self._closed:
            return envelopes
        keep: list[Envelope] = []
        out: list[Envelope] = []
        for env in envelopes:
            if env.anomaly or type(env.ack) is Taken or (env.device, env.tier) not in given:
                keep.append(env)
            else:
                out.append(env)
        if out:
            self._give(out)
        return keep

    def _give(self, envelopes: list[Envelope]) -> None:
        messages: list[Outgoing] = []
        seqs: list[int] = []
        counts: dict[str, int] = {}
        given = self.given
        origin, reply = self.origin, self.reply
        queues, partitions = self.queues, self.section.partitions
        for env in envelopes:
            self._seq += 1
            given[(env.device, env.tier)].last = self._seq
            body = encode_work(env, origin, reply, self._seq)
            properties = encode_properties(
                content_type=WORK, delivery_mode=2 if env.qos else 1, message_id=env.id,
                priority=self.priorities.get(env.tier, 0))
            messages.append(Outgoing(queues[partition_of(env.device, partitions)], body,
                                     properties, keep=env.qos > 0))
            if env.wal_seq:
                seqs.append(env.wal_seq)
            counts[env.tier] = counts.get(env.tier, 0) + 1
        self.publisher.put(messages)
        if seqs:  # retired once RabbitMQ confirmed everything put so far
            self._unconfirmed.append((self.publisher.accepted, seqs))
        self.given_out += len(envelopes)
        for tier, n in counts.items():
            self._count(tier, "out", n)

    def _retire_confirmed(self) -> None:
        unconfirmed = self._unconfirmed
        confirmed = self.publisher.confirmed
        while unconfirmed and unconfirmed[0][0] <= confirmed:
            _, seqs = unconfirmed.popleft()
            if self.wal is not None:
                self.wal.retire(seqs)

    def on_report(self, report: DoneReport) -> None:
        """Takers finished work of ours (a report to an earlier run of this replica is
        ignored: its marks are gone)."""
        if report.origin != self.origin:
            return
        now = time.monotonic()
        given = self.given
        for device, tier, seq in report.finished:
            key = (device, tier)
            state = given.get(key)
            if state is not None and seq > state.reported:
                state.reported = seq
                state.progress = now
                if seq >= state.last:
                    self._returnable.add(key)

    def _return_devices(self, now: float) -> None:
        """Marked (device, tier)s whose work is all finished elsewhere (or whose takers went
        silent) come back, unless their tier is still saturated."""
        lanes = self.dispatcher.lane_by_tier
        target = self.section.overflow_backlog // 2

        def calm(tier: str) -> bool:
            lane = lanes.get(tier)
            return tier not in self._saturated and (lane is None or len(lane.items) <= target)

        returned: dict[str, int] = {}
        given = self.given
        for key in list(self._returnable):
            state = given.get(key)
            if state is None or state.reported < state.last:
                self._returnable.discard(key)
            elif calm(key[1]):
                self._returnable.discard(key)
                del given[key]
                returned[key[1]] = returned.get(key[1], 0) + 1
        if now >= self._next_sweep:
            self._next_sweep = now + TIMEOUT_SWEEP_S
            limit = self.section.report_timeout_s
            late = [(key, state) for key, state in given.items()
                    if now - state.progress > limit and calm(key[1])]
            for key, state in late:
                del given[key]
                log.warning("fleet: no report of %s's %s work for %.0f s: processing it "
                            "here again", key[0], key[1], limit)
                self._record("fleet.report_timeout", device=key[0], tier=key[1],
                             last_given=state.last, last_reported=state.reported)
        if returned:
            for tier, n in returned.items():
                if self._summarise is not None:
                    self._summarise("fleet.returned", tier, n, tier=tier)
        self._devices_gauge.set(len(given))

    # -- taking ----------------------------------------------------------------------------------
    def take_below(self) -> int:
        """At most half ``overflow_backlog``: work taken in never saturates the taker."""
        section = self.section
        limit = section.take_below
        if limit is None:
            limit = 4 * self.dispatcher.batch_size * self.dispatcher.slots
        return min(limit, section.overflow_backlog // 2)

    def room(self) -> int:
        """How many more messages of the work queue this replica takes now."""
        ingest = self.ingest
        wal = self.wal
        if (not ingest.accepting or self.dispatcher.pressure or self._stopping
                or (wal is not None and wal.refusing)):
            return 0
        waiting = self.dispatcher.queued + (self.taker.committing if self.taker else 0)
        return self.take_below() - waiting

    def _steer(self, saturated: set[str], now: float) -> None:
        taker = self.taker
        if taker is None:
            if (not self._stopping and not saturated and now >= self._retake_at
                    and self.take_below() > 0 and self.room() > 0):
                self.taker = Taker(self)
                self.taker.start()
                self._taking_gauge.set(1)
                self._record("fleet.taking", state="start", queued=self.dispatcher.queued)
            return
        if taker.stopping:
            return
        if saturated:
            taker.stop(f"saturated: {', '.join(sorted(saturated))}")
        elif (taker.blocked_since is not None and not taker.checking
              and now - taker.blocked_since > self.section.handoff_after_s):
            taker.check_standbys()  # hands over if another replica waits for the work

    async def _hand_off(self, taker: Taker) -> None:
        try:
            await taker.close()
        finally:
            if self.taker is taker:
                self.taker = None
                self._taking_gauge.set(0)
            self._retake_at = time.monotonic() + RETAKE_AFTER_S
            self._handoff = None
            self._record("fleet.taking", state="stop", reason=taker.why,
                         queued=self.dispatcher.queued)

    def took(self, envelopes: list[Envelope]) -> None:
        """Work made durable here: into the lanes."""
        self.taken_unfinished += len(envelopes)
        self.taken_in += len(envelopes)
        counts: dict[str, int] = {}
        for env in envelopes:
            counts[env.tier] = counts.get(env.tier, 0) + 1
        self.ingest.enqueue(envelopes)
        for tier, n in counts.items():
            self._count(tier, "in", n)

    # -- as the taker's host (``TakerHost``) ---------------------------------------------------
    link_name = "fleet:work"

    async def declare(self, link: Link) -> None:
        for name in self.queues:
            await link.call(commands.Queue.Declare(
                queue=name, durable=True, arguments=work_queue_arguments(self.section)),
                commands.Queue.DeclareOk)

    def admit(self, item: WorkItem) -> bool:
        return True

    def taken(self, item: WorkItem) -> object:
        return Taken(item.origin, item.reply, item.seq, item.tier)

    def finished(self, envelopes: list[Envelope]) -> None:
        """Processing finished these (or shed them): work taken in is reported to its origin."""
        if not self.taken_unfinished:
            return
        reports = self._reports
        for env in envelopes:
            taken = env.ack
            if type(taken) is not Taken:
                continue
            self.taken_unfinished -= 1
            entry = reports.get(taken.origin)
            if entry is None:
                entry = reports[taken.origin] = (taken.reply, {})
            key = (env.device, taken.tier)
            if entry[1].get(key, 0) < taken.seq:
                entry[1][key] = taken.seq

    def _report(self) -> None:
        if not self._reports:
            return
        reports, self._reports = self._reports, {}
        properties = encode_properties(content_type=DONE)
        messages = [Outgoing(reply, encode_done(origin, [(d, t, s) for (d, t), s in
                                                         finished.items()]),
                             properties, keep=False)
                    for origin, (reply, finished) in reports.items()]
        with contextlib.suppress(AmqpError):  # closed: origins fall back on report_timeout_s
            self.publisher.put(messages)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _count(self, tier: str, direction: str, n: int) -> None:
        counter = self._counters.get((tier, direction))
        if counter is None:
            counter = self._counters[(tier, direction)] = \
                self.metrics.fleet.overflow_messages.labels(tier, direction)
        counter.inc(n)
        if self._summarise is not None:
            self._summarise("fleet.overflow", f"{direction}/{tier}", n, tier=tier,
                            direction=direction)

    def _record(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit(event, **fields)


class Taker:
    """One period of taking work: a consumer of every partition, held deliveries, settling
    in tag order (see the module doc). Serves any ``TakerHost``: overflow's work queues, or a
    region's queue of forwarded work (``gateway.regions``), whose host refuses work its
    region may not hold (``admit``): such deliveries are rejected without requeue."""

    def __init__(self, overflow: TakerHost) -> None:
        self.overflow = overflow
        section = overflow.section
        assert section.url is not None
        self.link = Link(overflow.link_name, section.url, LinkSettings(
            section.heartbeat_s, section.connect_timeout_s, section.reconnect_initial_s,
            section.reconnect_max_s), overflow.metrics.amqp, setup=self._setup,
            on_deliveries=self._take, on_down=self._lost,
            client_name=f"iot-gateway {overflow.origin}")
        self.held: deque[Delivery] = deque()
        self.batches: deque[_Batch] = deque()
        self.session = 0
        self.appends = 0  # batches whose durable append is in flight
        self.committing = 0  # their messages
        self.stopping = False
        self.why = ""
        self.blocked_since: float | None = None
        self.checking = False
        self._check: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._settle_scheduled = False
        self._decode_errors = 0

    def start(self) -> None:
        self.link.start()

    async def _setup(self, link: Link) -> None:
        self._lost()  # a new channel: tags of the last one mean nothing here
        overflow = self.overflow
        section = overflow.section
        await link.call(commands.Basic.Qos(prefetch_count=section.prefetch),
                        commands.Basic.QosOk)
        await overflow.declare(link)
        for name in overflow.queues:
            await link.call(commands.Basic.Consume(queue=name, consumer_tag=f"{name} "
                                                   f"{overflow.origin}"),
                            commands.Basic.ConsumeOk)
        log.info("%s: taking work from %d queues (%s ...)", overflow.link_name,
                 len(overflow.queues), overflow.queues[0])

    def _lost(self) -> None:
        """The channel is gone: RabbitMQ requeues what it did not get an ack for."""
        self.session += 1
        self.held.clear()
        self.batches.clear()

    def stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.why = why
            log.info("fleet: handing the work partitions over (%s)", why)

    def drained(self, taken_unfinished: int) -> bool:
        return self.appends == 0 and taken_unfinished == 0

    def check_standbys(self) -> None:
        """Held work and no room for it: hand it over, if another replica waits as a
        standby (a passive declare counts the consumers of a partition); else hold on."""
        self.checking = True
        self._check = asyncio.get_running_loop().create_task(self._check_standbys())

    async def _check_standbys(self) -> None:
        try:
            ok = await self.link.call(commands.Queue.Declare(
                queue=self.overflow.queues[0], passive=True), commands.Queue.DeclareOk)
            if (ok.consumer_count or 0) > 1:
                self.stop("no room; another replica waits")
            else:
                self.blocked_since = time.monotonic()  # nobody to hand over to
        except (AmqpError, ConnectionError, OSError, TimeoutError):
            pass  # the link went: what was held is requeued anyway
        finally:
            self.checking = False

    async def finish(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the appends in flight, so that they are acked rather
        than taken again elsewhere."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.appends and loop.time() < deadline:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await self._settled.wait()

    async def close(self) -> None:
        self._settle()
        await self.link.close(self.overflow.section.close_timeout_s)

    # -- deliveries ------------------------------------------------------------------------------
    def _take(self, deliveries: list[Delivery]) -> None:
        self.held.extend(deliveries)
        self.pump()

    def pump(self) -> None:
        held = self.held
        if self.stopping or not held or not self.link.up:
            self.blocked_since = None
            return
        room = self.overflow.room()
        limit = self.overflow.dispatcher.batch_size
        while held and room > 0:
            n = min(len(held), room, limit)
            chunk = [held.popleft() for _ in range(n)]
            room -= self._submit(chunk)
        if held:
            if self.blocked_since is None:
                self.blocked_since = time.monotonic()
        else:
            self.blocked_since = None

    def _submit(self, chunk: list[Delivery]) -> int:
        """Takes ``chunk`` in (durably, then acked in tag order); deliveries the host refuses
        split it: they are rejected, in their place of the tag order. Returns the number of
        messages taken in."""
        overflow = self.overflow
        recent = overflow.recent
        envelopes: list[Envelope] = []
        deadlines, default = overflow.deadlines_ns, overflow.default_tier
        anomaly_lanes = overflow.anomaly_lanes
        now_ns, now = time.monotonic_ns(), time.time()
        taken = 0
        refused_tag = 0  # the last of a run of refused deliveries
        last_tag = 0  # the last of the run being taken
        for d in chunk:
            if d.properties.content_type != WORK:
                self._bad(d, "not a work item")
                item = None
            else:
                try:
                    item = decode_work(d.body)
                except FleetDecodeError as err:
                    self._bad(d, str(err))
                    item = None
            if item is not None and not overflow.admit(item):
                if last_tag:
                    taken += self._take_run(last_tag, envelopes)
                    envelopes, last_tag = [], 0
                refused_tag = d.delivery_tag
                continue
            if refused_tag:
                self._reject_run(refused_tag)
                refused_tag = 0
            last_tag = d.delivery_tag
            if item is None or item.id in recent:  # a second copy: acked, not taken again
                continue
            recent[item.id] = None
            env = envelope_of(item, deadlines, default, anomaly_lanes, now_ns, now)
            env.ack = overflow.taken(item)
            envelopes.append(env)
        for _ in range(len(recent) - RECENT_IDS):
            recent.popitem(last=False)
        if refused_tag:
            self._reject_run(refused_tag)
        if last_tag:
            taken += self._take_run(last_tag, envelopes)
        return taken

    def _reject_run(self, last_tag: int) -> None:
        batch = _Batch(last_tag, self.session)
        batch.outcome = REJECT
        self.batches.append(batch)
        self._settle_soon()

    def _take_run(self, last_tag: int, envelopes: list[Envelope]) -> int:
        overflow = self.overflow
        batch = _Batch(last_tag, self.session)
        self.batches.append(batch)
        wal = overflow.wal
        durable = [e for e in envelopes if e.qos]
        if wal is None or not durable:
            overflow.took(envelopes)
            batch.outcome = ACK
            self._settle_soon()
            return len(envelopes)
        self.appends += 1
        self.committing += len(envelopes)
        wal.append(durable, partial(self._committed, batch, envelopes))
        return len(envelopes)

    def _committed(self, batch: _Batch, envelopes: list[Envelope],
                   error: OSError | None) -> None:
        self.appends -= 1
        self.committing -= len(envelopes)
        overflow = self.overflow
        if error is not None:
            log.error("fleet: %d work items not made durable (%s): requeued", len(envelopes),
                      error)
            for env in envelopes:
                overflow.recent.pop(env.id, None)
            batch.outcome = NACK
        else:
            overflow.took(envelopes)  # durable: processed here, acked or not
            batch.outcome = ACK
        if batch.session == self.session:
            self._settle_soon()
        self._settled.set()

    def _bad(self, delivery: Delivery, why: str) -> None:
        self._decode_errors += 1
        self.overflow.metrics.protocol_errors.labels("fleet", "bad_work_item").inc()
        if self._decode_errors == 1 or self._decode_errors % 1000 == 0:
            log.error("fleet: a delivery from %s is no work item (%s): dropped (%d so far)",
                      delivery.routing_key, why, self._decode_errors)

    # -- settling, in tag order --------------------------------------------------------------------
    def _settle_soon(self) -> None:
        if not self._settle_scheduled:
            self._settle_scheduled = True
            asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self) -> None:
        self._settle_scheduled = False
        batches = self.batches
        link = self.link
        while batches and batches[0].outcome != WAITING:
            outcome = batches[0].outcome
            last = 0
            while batches and batches[0].outcome == outcome:
                last = batches.popleft().last_tag
            if outcome == ACK:
                link.ack(last)
            else:
                link.nack(last, requeue=outcome == NACK)


def _oldest_own(items: deque[Envelope], now_ns: int, look: int = 256) -> int:
    """``received_ns`` of the first message of the lane that was not taken in (among the
    first ``look``: a lane of taken work only is no sign of saturation); ``now_ns`` if none."""
    for i, env in enumerate(items):
        if type(env.ack) is not Taken:
            return env.received_ns
        if i >= look:
            break
    return now_ns


def work_queue_arguments(section: FleetSection) -> dict[str, Any]:
    """How every replica declares a work queue (the same arguments everywhere, or RabbitMQ
    refuses the declaration)."""
    return {"x-max-priority": section.max_priority, "x-single-active-consumer": True}
