"""The priority dispatcher: which queued message is processed next.

Theory of operation
-------------------
Lanes: the anomaly lanes (one per severity, most severe first) ▸ one lane per tier, in the
configured order (the first tier is the most urgent). Inside a lane, earliest deadline first;
since a lane's deadline is ``received_ns`` plus one constant and the single event loop stamps
``received_ns`` in increasing order, EDF inside a lane is plain FIFO, and a lane is a
``deque`` (O(1) in and out, messages of one device stay in order).

Two levels decide which lane is served, both with the same rule, *strict priority tempered
by guaranteed shares, served as late as possible*:

1. Anomalies before routine work: the anomaly lanes are served in severity order ahead of
   every tier, but while routine work waits it keeps ``routine_floor`` of the dispatches,
   so anomalies beyond capacity cannot starve it.
2. Between tiers: every routine dispatch earns each tier with work waiting its ``share``
   credit; a tier pays one credit per message it is served. Keeping every credit within one
   batch means a tier with work always waiting gets at least ``share × n - batch_size`` of
   any ``n`` routine messages dispatched, so no tier starves. A tier's share is its
   ``guaranteed_share`` plus, when some tiers have a ``weight``, the spare capacity (what
   the guaranteed shares of the tiers waiting leave) divided by weight among the waiting
   tiers that have one; with no weights the spare capacity goes to the most urgent tier.

Before each batch the dispatcher checks the slack: could the most urgent candidate take this
batch and every share still be met later (an EDF demand test over the candidates' future due
points, counted in batches)? If so it does; if not, the one whose share falls due first is
served. A lower tier therefore never runs ahead of a higher one except to honour its share.
A lane that runs empty forfeits its credit: shares are not banked while idle.

Preempted work (a routine batch that yielded its slot to an anomaly at a stage boundary,
``requeue``) goes back to the front of its lane and is resumed, progress kept, when the lane
is served next. A tier with ``late = "shed"`` drops the QoS 0 messages that are past their
deadline when their batch is taken (``on_shed``; never QoS ≥ 1: they were acknowledged).

Maintenance: while a reservation holds slots, each drain gives up to that many of its slots
to maintenance slices (``set_maintenance``), but only in place of a routine batch of an
unprotected tier, or when nothing waits: never in place of anomaly or protected (critical)
work.

Ingest appends to lanes and calls ``kick()``; one drain is scheduled per loop turn at most
(no task, future or lock per message). A drain hands at most ``slots`` batches to the
processing callback, then yields to the loop so that sockets are read between batches.
Above ``max_queued`` waiting messages the dispatcher asks ingest to pause reading; below
``resume_queued`` it lets it resume: a flood is pushed back into TCP, not into memory.

Processing may hold batches beyond a drain (isolated stages, retries): while its
``can_process()`` says no, a drain hands out nothing more and does not reschedule itself;
processing calls ``kick()`` once it has room again. If anomalies wait meanwhile, the drain
asks processing to preempt (``preempt(batches wanted)``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

from gateway.config import DispatchSection, Tier
from gateway.envelope import Envelope

# Rounding allowance: ten shares of 0.1 add up to 0.999…, not 1.
EPSILON = 1e-9
# Shares adding up to within this of 1 leave no spare capacity to bound the horizon with.
SHARE_SLACK = 1e-3
# How many batches ahead the share test looks when the shares add up to (nearly) 1.
MAX_LOOKAHEAD_BATCHES = 256
# Longest a drain goes on handing out batches before it yields to the loop.
DRAIN_BUDGET_NS = 2_000_000


class Lane:
    __slots__ = ("credit", "index", "items", "late_ns", "name", "resumed", "share", "weight")

    def __init__(self, index: int, name: str, share: float = 0.0, weight: float = 0.0,
                 late_ns: int | None = None) -> None:
        self.index = index
        self.name = name
        self.share = share
        self.weight = weight
        self.late_ns = late_ns
        """Set when the tier sheds QoS 0 messages past their deadline: its max latency."""
        self.credit = 0.0
        self.items: deque[Envelope] = deque()
        self.resumed: deque[tuple[int, Callable[[], None]]] = deque()
        """Preempted work to resume before the lane's new items: (messages, resume)."""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def waiting(self) -> bool:
        return bool(self.items or self.resumed)


class _Group:
    """The routine tiers as one candidate against the anomaly lanes."""

    __slots__ = ("credit", "index")

    def __init__(self) -> None:
        self.credit = 0.0
        self.index = 1


ProcessBatch = Callable[[Lane, list[Envelope]], None]


def _share_due(candidates: Sequence[tuple[Lane | _Group, float]], unit: float,
               ) -> Lane | _Group | None:
    """The candidate whose share must be served now, or None if there is slack.

    Time is counted in batches of ``unit`` messages. A candidate with credit c and share s
    must have been served ``ceil(c / unit + s × k - 1)`` more batches within the next k.
    Walking the candidates' due points in order (EDF), if the demand up to some point leaves
    no batch to spare, the candidate that falls due first is served now; otherwise the most
    urgent one is. Demand grows by ``sum(shares) < 1`` batch per batch, so past the horizon
    nothing can fall short.
    """
    sharing = [(c, s) for c, s in candidates if s > 0.0]
    if not sharing:
        return None
    total = sum(s for _, s in sharing)
    owed = sum(max(c.credit, 0.0) for c, _ in sharing) / unit + len(sharing) + 1
    horizon = (int(owed / (1.0 - total)) + 2 if total < 1.0 - SHARE_SLACK
               else MAX_LOOKAHEAD_BATCHES)
    points: list[tuple[int, int, Lane | _Group]] = []
    for candidate, share in sharing:
        credit = candidate.credit / unit
        j = 0
        while True:  # the j-th batch falls due at the first k with credit+share*k-1 > j
            k = max(1, int((j + 1.0 - credit) / share + EPSILON) + 1)
            if k > horizon:
                break
            points.append((k, candidate.index, candidate))
            j += 1
    points.sort(key=lambda point: (point[0], point[1]))
    for demand, (k, _, _) in enumerate(points, start=1):
        if k - demand < 1:  # no batch to spare for priority
            return points[0][2]
    return None


class Dispatcher:
    def __init__(
        self,
        tiers: list[Tier],
        settings: DispatchSection,
        process: ProcessBatch,
        on_pressure: Callable[[bool], None] = lambda paused: None,
        can_process: Callable[[], bool] | None = None,
        *,
        anomaly_lanes: Sequence[str] = (),
        preempt: Callable[[int], None] | None = None,
        on_shed: Callable[[Lane, list[Envelope]], None] | None = None,
    ) -> None:
        self._process = process
        self._on_pressure = on_pressure
        self._can_process = can_process
        self._preempt = preempt
        self._on_shed = on_shed
        self._routine_group = _Group()
        self._maintenance: Callable[[], bool] | None = None
        self._maintenance_ready = False
        self.maintenance_slots = 0
        self.protected: frozenset[str] = frozenset()
        self._urgent: list[Lane] = []  # the anomaly lanes and the protected tiers' lanes
        """Tiers whose work maintenance never takes a slot from (besides the anomaly lanes)."""
        self.queued = 0
        self.drains = 0
        """Drains run so far (with ``served``: the load, for maintenance admission)."""
        self.busy_ns = 0
        """Time spent handing out and processing batches (the scaling policy's slot rate)."""
        self.pressure = False
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._below: tuple[int, Callable[[], None]] | None = None
        self._configure(tiers, settings, anomaly_lanes)

    def _configure(self, tiers: list[Tier], settings: DispatchSection,
                   anomaly_lanes: Sequence[str]) -> None:
        self.anomaly_lanes = [Lane(i, name) for i, name in enumerate(anomaly_lanes)]
        base = len(self.anomaly_lanes)
        self.routine_lanes = [
            Lane(base + i, t.name, t.guaranteed_share, t.weight,
                 int(t.max_latency_ms * 1e6) if t.late == "shed" else None)
            for i, t in enumerate(tiers)]
        self.lanes = self.anomaly_lanes + self.routine_lanes
        self.served = [0] * len(self.lanes)
        """Messages handed to processing so far, per lane index."""
        self.lane_by_tier = {lane.name: lane for lane in self.lanes}
        self._weighted = any(lane.weight > 0.0 for lane in self.routine_lanes)
        self.batch_size = settings.batch_size
        self.slots = settings.slots
        self.max_queued = settings.max_queued
        self.resume_queued = settings.resume_queued
        self.routine_floor = settings.routine_floor
        self._routine_group.credit = 0.0
        self.protect(self.protected)  # the urgent lanes are the new ones

    # -- ingest side -------------------------------------------------------------------
    def accepted(self, count: int) -> None:
        """Ingest appended ``count`` messages to the lanes' deques: schedule a drain."""
        self.queued += count
        if self.queued > self.max_queued and not self.pressure:
            self.pressure = True
            self._on_pressure(True)
        self.kick()

    def kick(self) -> None:
        """Schedule a drain if work is waiting (processing calls it when it has room again)."""
        if (self.queued or self._maintenance_ready) and not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._drain)

    def put(self, envelope: Envelope) -> None:
        """Queue one message (convenience for callers outside the hot path)."""
        self.lane_by_tier[envelope.tier].items.append(envelope)
        self.accepted(1)

    def requeue(self, tier: str, count: int, resume: Callable[[], None]) -> None:
        """Preempted work of ``count`` messages goes back to the front of its tier's lane;
        ``resume()`` is called when the lane is served next."""
        self.lane_by_tier[tier].resumed.append((count, resume))
        self.accepted(count)

    def withdraw(self, lane: Lane, take: Callable[[Envelope], bool]) -> list[Envelope]:
        """Take the queued messages ``take`` selects out of ``lane`` (work that leaves this
        node: fleet overflow); both parts keep their order. The deque stays the same object
        (ingest holds it)."""
        taken: list[Envelope] = []
        kept: list[Envelope] = []
        for envelope in lane.items:
            (taken if take(envelope) else kept).append(envelope)
        if taken:
            lane.items.clear()
            lane.items.extend(kept)
            self.queued -= len(taken)
            if self.pressure and self.queued < self.resume_queued:
                self.pressure = False
                self._on_pressure(False)
            if not self.queued and self._idle is not None:
                self._idle.set()
        return taken

    def set_maintenance(self, slots: int, run_slice: Callable[[], bool] | None) -> None:
        """Give maintenance up to ``slots`` slots per drain (0 or None: none); ``run_slice()``
        runs one slice of its work and says whether another one is ready now. Once it said
        no, ``maintenance_ready()`` says when it is."""
        self.maintenance_slots = slots if run_slice is not None else 0
        self._maintenance = run_slice if slots else None
        self._maintenance_ready = self._maintenance is not None
        self.kick()

    def when_below(self, level: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, after a drain leaves fewer than ``level`` messages queued
        (one waiter: a new call replaces the last)."""
        self._below = (level, callback)
        if self.queued < level:
            self._below = None
            callback()

    def maintenance_ready(self) -> None:
        if self._maintenance is not None:
            self._maintenance_ready = True
            self.kick()

    # -- scheduling ----------------------------------------------------------------------
    def choose(self) -> Lane | None:
        """The lane to serve next: anomalies first, unless the routine floor falls due;
        among the tiers, priority, unless a share falls due."""
        urgent = None
        for lane in self.anomaly_lanes:
            if lane.waiting:
                urgent = lane
                break
        routine = [lane for lane in self.routine_lanes if lane.waiting]
        if urgent is not None:
            if not routine or self.routine_floor <= 0.0:
                return urgent
            if _share_due(((self._routine_group, self.routine_floor),),
                          float(self.batch_size)) is None:
                return urgent
        if not routine:
            return None
        if len(routine) == 1:
            return routine[0]
        due = _share_due(self._shares(routine), float(self.batch_size))
        return due if isinstance(due, Lane) else routine[0]

    def _shares(self, waiting: list[Lane]) -> list[tuple[Lane, float]]:
        if not self._weighted:
            return [(lane, lane.share) for lane in waiting]
        weights = sum(lane.weight for lane in waiting)
        if weights <= 0.0:
            return [(lane, lane.share) for lane in waiting]
        spare = max(0.0, 1.0 - sum(lane.share for lane in waiting))
        return [(lane, lane.share + spare * lane.weight / weights) for lane in waiting]

    def _charge(self, chosen: Lane, n: int) -> None:
        """Credit bookkeeping for ``n`` messages served from ``chosen``."""
        routine = [lane for lane in self.routine_lanes if lane.waiting]
        group = self._routine_group
        if chosen.index < len(self.anomaly_lanes):
            group.credit = group.credit + self.routine_floor * n if routine else 0.0
            return
        if any(lane.waiting for lane in self.anomaly_lanes):
            group.credit += self.routine_floor * n - n
        else:
            group.credit = 0.0
        if chosen not in routine:
            routine.append(chosen)
        for lane, share in self._shares(routine):
            lane.credit += share * n
        chosen.credit -= n

    def _settle_credits(self) -> None:
        for lane in self.routine_lanes:
            if not lane.waiting:
                lane.credit = 0.0

    def next_batch(self) -> tuple[Lane, list[Envelope]] | None:
        """Choose the next lane and take a batch of new messages from it (preempted work
        waiting in a lane is resumed by the drain, not returned here)."""
        lane = self.choose()
        if lane is None:
            return None
        return lane, self._take(lane)

    def _take(self, lane: Lane) -> list[Envelope]:
        items = lane.items
        n = min(self.batch_size, len(items))
        self._charge(lane, n)
        batch = [items.popleft() for _ in range(n)]
        self._settle_credits()
        self.queued -= n
        self.served[lane.index] += n
        if lane.late_ns is not None and self._on_shed is not None:
            too_old = time.monotonic_ns() - lane.late_ns
            if batch and batch[0].received_ns < too_old:  # oldest first: none late otherwise
                late = [e for e in batch if e.received_ns < too_old and not e.qos]
                if late:
                    batch = [e for e in batch if e.received_ns >= too_old or e.qos]
                    self._on_shed(lane, late)
        return batch

    def _resume(self, lane: Lane) -> None:
        count, resume = lane.resumed.popleft()
        self._charge(lane, count)
        self._settle_credits()
        self.queued -= count
        self.served[lane.index] += count
        resume()

    def express(self) -> None:
        """Serve the urgent lanes now, in the caller's turn, not the next one: called by
        ingest when it queued anomalous or protected-tier work, so that it does not wait
        behind a loop turn of reads and routine batches (each hop of a loop under load costs
        milliseconds). It hands out the batches the normal choice picks (a share that falls
        due is served first, so shares still hold) while urgent work waits."""
        can_process = self._can_process
        urgent = self._urgent
        started = time.monotonic_ns()
        for _ in range(self.slots):
            if can_process is not None and not can_process():
                break
            if not any(lane.waiting for lane in urgent):
                break
            lane = self.choose()
            if lane is None:
                break
            if lane.resumed:
                self._resume(lane)
                continue
            batch = self._take(lane)
            if batch:
                self._process(lane, batch)
        self.busy_ns += time.monotonic_ns() - started

    def _drain(self) -> None:
        self._scheduled = False
        self.drains += 1
        started = time.monotonic_ns()
        deadline = started + DRAIN_BUDGET_NS
        can_process = self._can_process
        blocked = False
        maintenance = self._maintenance
        budget = self.maintenance_slots if self._maintenance_ready else 0
        protected = self.protected
        for _ in range(self.slots):
            if can_process is not None and not can_process():
                blocked = True  # processing will kick() when it has room
                break
            lane = self.choose()
            if budget and (lane is None or (lane.index >= len(self.anomaly_lanes)
                                            and lane.name not in protected)):
                budget -= 1
                assert maintenance is not None
                if not maintenance():
                    self._maintenance_ready = False
                    budget = 0
                continue
            if lane is None:
                break
            if lane.resumed:
                self._resume(lane)
                continue
            batch = self._take(lane)
            if batch:
                self._process(lane, batch)
            if time.monotonic_ns() > deadline:
                break  # the rest in the next turn: sockets and callbacks wait meanwhile
        self.busy_ns += time.monotonic_ns() - started
        if blocked and self._preempt is not None:
            urgent = sum(len(lane) for lane in self.anomaly_lanes)
            if urgent:
                self._preempt(math.ceil(urgent / self.batch_size))
        if self.pressure and self.queued < self.resume_queued:
            self.pressure = False
            self._on_pressure(False)
        if self._below is not None and self.queued < self._below[0]:
            callback = self._below[1]
            self._below = None
            callback()
        if not self.queued:
            if self._idle is not None:
                self._idle.set()
            if self._maintenance_ready and not blocked:
                self.kick()  # maintenance still has slices ready
        elif not blocked:
            self.kick()

    def reconfigure(self, tiers: list[Tier], settings: DispatchSection,
                    default_tier: str, anomaly_lanes: Sequence[str] = ()) -> None:
        """Take a reloaded config: new lanes, queued messages moved over in order.

        A message whose tier is gone goes to ``default_tier``; credits start afresh."""
        old = self.lanes
        self._configure(tiers, settings, anomaly_lanes)
        for lane in old:
            target = self.lane_by_tier.get(lane.name)
            if target is None:
                target = self.lane_by_tier[default_tier]
            for envelope in lane.items:
                envelope.tier = target.name
            target.items.extend(lane.items)
            target.resumed.extend(lane.resumed)

    def protect(self, tiers: Collection[str]) -> None:
        """Maintenance never takes a slot in place of these tiers' work, and ``express``
        serves it at once."""
        self.protected = frozenset(tiers)
        self._urgent = [*self.anomaly_lanes,
                        *(lane for lane in self.routine_lanes if lane.name in self.protected)]

    async def wait_idle(self) -> None:
        """Return once every queued message has been handed to processing."""
        while self.queued:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._idle = None
