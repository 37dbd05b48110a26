"""The priority dispatcher: which queued message is processed next.

Theory of operation
-------------------
One lane per tier, in the configured order (the first tier is the most urgent). Inside a
lane, earliest deadline first; since a lane's deadline is ``received_ns`` plus one constant
and the single event loop stamps ``received_ns`` in increasing order, EDF inside a lane is
plain FIFO, and a lane is a ``deque`` (O(1) in and out, messages of one device stay in order).

Between lanes, strict priority tempered by guaranteed shares, served as late as possible.
Every dispatched message earns each lane with work waiting ``share`` credit; a lane pays one
credit per message it is served. Keeping every credit within one batch means a tier with
work always waiting gets at least ``share × n - batch_size`` of any ``n`` dispatched
messages, so no tier starves. Before each batch the dispatcher checks the slack: could the
most urgent lane take this batch and every share still be met later (an EDF demand test over
the lanes' future due points, counted in batches)? If so it does; if not, the lane whose
share falls due first is served. A lower tier therefore never runs ahead of a higher one
except to honour its share. A lane that runs empty forfeits its credit: shares are not
banked while idle.

Ingest appends to lanes and calls ``kick()``; one drain is scheduled per loop turn at most
(no task, future or lock per message). A drain hands at most ``slots`` batches to the
processing callback, then yields to the loop so that sockets are read between batches.
Above ``max_queued`` waiting messages the dispatcher asks ingest to pause reading; below
``resume_queued`` it lets it resume: a flood is pushed back into TCP, not into memory.

Processing may hold batches beyond a drain (isolated stages, retries): while its
``can_process()`` says no, a drain hands out nothing more and does not reschedule itself;
processing calls ``kick()`` once it has room again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from gateway.config import DispatchSection, Tier
from gateway.envelope import Envelope

# Rounding allowance: ten shares of 0.1 add up to 0.999…, not 1.
EPSILON = 1e-9
# Shares adding up to within this of 1 leave no spare capacity to bound the horizon with.
SHARE_SLACK = 1e-3
# How many batches ahead the share test looks when the shares add up to (nearly) 1.
MAX_LOOKAHEAD_BATCHES = 256


class Lane:
    __slots__ = ("credit", "index", "items", "name", "share")

    def __init__(self, index: int, name: str, share: float) -> None:
        self.index = index
        self.name = name
        self.share = share
        self.credit = 0.0
        self.items: deque[Envelope] = deque()

    def __len__(self) -> int:
        return len(self.items)


ProcessBatch = Callable[[Lane, list[Envelope]], None]


class Dispatcher:
    def __init__(
        self,
        tiers: list[Tier],
        settings: DispatchSection,
        process: ProcessBatch,
        on_pressure: Callable[[bool], None] = lambda paused: None,
        can_process: Callable[[], bool] | None = None,
    ) -> None:
        self.lanes = [Lane(i, t.name, t.guaranteed_share) for i, t in enumerate(tiers)]
        self.lane_by_tier = {lane.name: lane for lane in self.lanes}
        self.batch_size = settings.batch_size
        self.slots = settings.slots
        self.max_queued = settings.max_queued
        self.resume_queued = settings.resume_queued
        self._process = process
        self._on_pressure = on_pressure
        self._can_process = can_process
        self.queued = 0
        self.pressure = False
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

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
        if self.queued and not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._drain)

    def put(self, envelope: Envelope) -> None:
        """Queue one message (convenience for callers outside the hot path)."""
        self.lane_by_tier[envelope.tier].items.append(envelope)
        self.accepted(1)

    # -- scheduling ----------------------------------------------------------------------
    def next_batch(self) -> tuple[Lane, list[Envelope]] | None:
        """Choose the next lane (priority, unless a share falls due) and take a batch from it."""
        waiting = [lane for lane in self.lanes if lane.items]
        if not waiting:
            return None
        chosen = waiting[0]
        if len(waiting) > 1:
            chosen = self._share_due(waiting) or chosen
        items = chosen.items
        n = min(self.batch_size, len(items))
        batch = [items.popleft() for _ in range(n)]
        for lane in waiting:
            lane.credit += lane.share * n
        chosen.credit -= n
        for lane in waiting:
            if not lane.items:
                lane.credit = 0.0
        self.queued -= n
        return chosen, batch

    def _share_due(self, waiting: list[Lane]) -> Lane | None:
        """The lane whose guaranteed share must be served now, or None if there is slack.

        Time is counted in batches. Lane i must have been served ``ceil(credit_i / batch +
        share_i × k - 1)`` more batches within the next k. Walking the lanes' due points in
        order (EDF), if the demand up to some point leaves no batch to spare, the lane that
        falls due first is served now; otherwise the most urgent lane is. Demand grows by
        ``sum(shares) < 1`` batch per batch, so past the horizon nothing can fall short.
        """
        unit = float(self.batch_size)
        sharing = [lane for lane in waiting if lane.share > 0.0]
        if not sharing:
            return None
        total = sum(lane.share for lane in sharing)
        owed = sum(max(lane.credit, 0.0) for lane in sharing) / unit + len(sharing) + 1
        horizon = (int(owed / (1.0 - total)) + 2 if total < 1.0 - SHARE_SLACK
                   else MAX_LOOKAHEAD_BATCHES)
        points: list[tuple[int, int, Lane]] = []
        for lane in sharing:
            credit, share = lane.credit / unit, lane.share
            j = 0
            while True:  # the j-th batch falls due at the first k with credit+share*k-1 > j
                k = max(1, int((j + 1.0 - credit) / share + EPSILON) + 1)
                if k > horizon:
                    break
                points.append((k, lane.index, lane))
                j += 1
        points.sort(key=lambda point: (point[0], point[1]))
        for demand, (k, _, _) in enumerate(points, start=1):
            if k - demand < 1:  # no batch to spare for priority
                return points[0][2]
        return None

    def _drain(self) -> None:
        self._scheduled = False
        can_process = self._can_process
        blocked = False
        for _ in range(self.slots):
            if can_process is not None and not can_process():
                blocked = True  # processing will kick() when it has room
                break
            picked = self.next_batch()
            if picked is None:
                break
            self._process(*picked)
        if self.pressure and self.queued < self.resume_queued:
            self.pressure = False
            self._on_pressure(False)
        if not self.queued:
            if self._idle is not None:
                self._idle.set()
        elif not blocked:
            self.kick()

    def reconfigure(self, tiers: list[Tier], settings: DispatchSection,
                    default_tier: str) -> None:
        """Take a reloaded config: new lanes, queued messages moved over in order.

        A message whose tier is gone goes to ``default_tier``; credits start afresh."""
        old = self.lanes
        self.lanes = [Lane(i, t.name, t.guaranteed_share) for i, t in enumerate(tiers)]
        self.lane_by_tier = {lane.name: lane for lane in self.lanes}
        for lane in old:
            target = self.lane_by_tier.get(lane.name)
            if target is None:
                target = self.lane_by_tier[default_tier]
            for envelope in lane.items:
                envelope.tier = target.name
            target.items.extend(lane.items)
        self.batch_size = settings.batch_size
        self.slots = settings.slots
        self.max_queued = settings.max_queued
        self.resume_queued = settings.resume_queued

    async def wait_idle(self) -> None:
        """Return once every queued message has been handed to processing."""
        while self.queued:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._idle = None
