"""The priority dispatcher: which queued message is processed next.

Theory of operation
-------------------
One lane per tier, in the configured order (the first tier is the most urgent). Inside a
lane, earliest deadline first; since a lane's deadline is ``received_ns`` plus one constant
and the single event loop stamps ``received_ns`` in increasing order, EDF inside a lane is
plain FIFO, and a lane is a ``deque`` (O(1) in and out, messages of one device stay in order).

Between lanes, strict priority tempered by guaranteed shares, served as late as possible.
Every dispatched message earns each lane with work waiting ``share`` credit; a lane pays one
credit per message it is served. Keeping every credit at or below one means a tier with work
always waiting gets at least ``share × n - 1`` of any ``n`` dispatches, so no tier starves.
Before each batch the dispatcher computes the slack: how many messages can go to the most
urgent lane before some share would fall due and could no longer be met (the EDF demand
test over the lanes' future due points). With slack, the most urgent lane takes up to that
many; without, the lane whose share falls due first is served. A lower tier therefore
never runs ahead of a higher one except to honour its share. A lane that runs empty
forfeits its credit: shares are not banked while idle.

Ingest appends to lanes and calls ``kick()``; one drain is scheduled per loop turn at most
(no task, future or lock per message). A drain hands at most ``slots`` batches to the
processing callback, then yields to the loop so that sockets are read between batches.
Above ``max_queued`` waiting messages the dispatcher asks ingest to pause reading; below
``resume_queued`` it lets it resume: a flood is pushed back into TCP, not into memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from gateway.config import DispatchSection, Tier
from gateway.envelope import Envelope


# Rounding allowance: ten shares of 0.1 add up to 0.999…, not 1.
EPSILON = 1e-9
# How far ahead the share test looks beyond one batch when the shares add up to (nearly) 1.
MAX_LOOKAHEAD = 4096


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
    ) -> None:
        self.lanes = [Lane(i, t.name, t.guaranteed_share) for i, t in enumerate(tiers)]
        self.lane_by_tier = {lane.name: lane for lane in self.lanes}
        self.batch_size = settings.batch_size
        self.slots = settings.slots
        self.max_queued = settings.max_queued
        self.resume_queued = settings.resume_queued
        self._process = process
        self._on_pressure = on_pressure
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
        if not self._scheduled:
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
        slack, due_first = (self._slack(waiting) if len(waiting) > 1
                             else (self.batch_size, None))
        if slack >= 1:
            chosen, n = waiting[0], slack
        else:
            assert due_first is not None
            chosen, n = due_first, max(1, int(due_first.credit + due_first.share + EPSILON))
        items = chosen.items
        n = min(n, self.batch_size, len(items))
        batch = [items.popleft() for _ in range(n)]
        for lane in waiting:
            lane.credit += lane.share * n
        chosen.credit -= n
        for lane in self.lanes:
            if not lane.items:
                lane.credit = 0.0
        self.queued -= n
        return chosen, batch

    def _slack(self, waiting: list[Lane]) -> tuple[int, Lane | None]:
        """Messages the most urgent lane may take now, and the lane whose share falls due first.

        Lane i must have been served ``ceil(credit_i + share_i × k - 1)`` more times within
        the next k dispatches. Walking the due points in order, the slack is the smallest
        ``k - demand(k)``. Demand grows by at most ``sum(shares) < 1`` per dispatch, so past
        the horizon below no due point can lower the slack any more.
        """
        sharing = [lane for lane in waiting if lane.share > 0.0]
        total = sum(lane.share for lane in sharing)
        backlog = sum(max(lane.credit, 0.0) for lane in sharing) + len(sharing) + 1
        horizon = self.batch_size + (int(backlog / (1.0 - total)) + 1 if total < 0.999
                                     else MAX_LOOKAHEAD)
        horizon = min(horizon, self.batch_size + MAX_LOOKAHEAD)
        points: list[tuple[int, int, Lane]] = []
        for lane in sharing:
            share = lane.share
            # The j-th unit falls due at the first k with credit + share*k - 1 > j.
            j = 0
            while True:
                k = max(1, int((j + 1.0 - lane.credit) / share + EPSILON) + 1)
                if k > horizon:
                    break
                points.append((k, lane.index, lane))
                j += 1
        if not points:
            return self.batch_size, None
        points.sort(key=lambda p: (p[0], p[1]))
        slack, demand = self.batch_size, 0
        for k, _, _lane in points:
            demand += 1
            slack = min(slack, k - demand)
        return slack, points[0][2]

    def _drain(self) -> None:
        self._scheduled = False
        for _ in range(self.slots):
            picked = self.next_batch()
            if picked is None:
                break
            self._process(*picked)
        if self.pressure and self.queued < self.resume_queued:
            self.pressure = False
            self._on_pressure(False)
        if self.queued and not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._drain)
        elif not self.queued and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once every queued message has been handed to processing."""
        while self.queued:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._idle = None
