"""Maintenance reservations: windows of dispatcher capacity for housekeeping tasks.

Theory of operation
-------------------
A reservation asks for ``min_slots..max_slots`` dispatcher slots during a window that
opens at a fixed ``start`` (ISO 8601, UTC when naive) or at every occurrence of a ``cron``
expression (UTC), and lasts ``duration_s``.

The planner is pure: no I/O, no asyncio, no clock of its own. The dispatcher calls
:meth:`MaintenancePlanner.tick` about once a second with the time and the loads it sees,
and audits every :class:`Decision` returned (decisions are emitted only on change).

A reservation takes its slots from routine work, never from anomaly or critical work:
``protected = max(ceil(critical_load), ceil(capacity * critical_headroom))`` slots are kept
for anomaly + critical work, the rest (``room``) may be reserved. Routine load only decides
how far above ``min_slots`` a window may grow (``spare = room - routine_load``).

Each tick, per reservation, in this order:

1. A running or paused window whose end has passed completes (``complete``, slots freed).
2. Running/paused windows (in the order they were added) are resized against the *real*
   load: with ``held`` the slots of the windows before it, less than ``min_slots`` of
   ``room - held`` → ``pause`` (0 slots); otherwise it holds
   ``min(max_slots, room - held, max(min_slots, spare - held))``: ``shrink`` toward min as
   routine load rises, ``grow`` back as it falls, ``resume`` after a pause.
3. Windows that are due are admitted only if both the real and the *forecast* critical load
   (anomaly + critical work expected during the window) leave room for ``min_slots``:
   ``min(room, capacity - max(headroom, ceil(forecast))) - held``. If not, the window is
   deferred (``defer``, retried each tick) until ``max_defer_s`` after its scheduled start,
   then skipped (``skip``; also when first seen that late). A granted window runs
   ``duration_s`` from the moment it was granted (a deferral shifts it, it does not shorten
   it). A cron reservation waits for its next occurrence at or after the first tick that
   sees it (a window already under way is not joined late).

Because every holding is bounded by ``room``, after any tick
``capacity - reserved_slots() >= max(ceil(capacity * critical_headroom), critical_load)``:
a reservation is never taken from anomaly or critical work.

Tasks are plugins (:class:`MaintenanceTask`), registered by name in :data:`TASKS` or
through the ``iot_gateway.maintenance_tasks`` entry-point group.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Generator
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import msgspec
from croniter import croniter  # type: ignore[import-untyped]

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASKS",
    "Action",
    "Decision",
    "MaintenanceError",
    "MaintenancePlanner",
    "MaintenanceSection",
    "MaintenanceTask",
    "Phase",
    "Reservation",
    "ReservationState",
    "load_task_plugins",
    "parse_start",
]


class MaintenanceError(ValueError):
    """A maintenance reservation or planner call was invalid."""


# --------------------------------------------------------------------------- config


def parse_start(text: str) -> float:
    """ISO 8601 → UNIX seconds; a naive timestamp is taken as UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Reservation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    task: Annotated[str, msgspec.Meta(min_length=1)]
    start: str | None = None
    cron: str | None = None
    duration_s: Annotated[float, msgspec.Meta(gt=0)]
    min_slots: Annotated[int, msgspec.Meta(ge=0)]
    max_slots: Annotated[int, msgspec.Meta(ge=1)]
    max_defer_s: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    """Passed to the task's constructor."""

    def __post_init__(self) -> None:
        if (self.start is None) == (self.cron is None):
            raise ValueError(
                f"reservation {self.name!r}: exactly one of `start` or `cron` is required"
                f" (got {'both' if self.start is not None else 'neither'})"
            )
        if self.start is not None:
            try:
                parse_start(self.start)
            except ValueError:
                raise ValueError(
                    f"reservation {self.name!r}: `start`: not an ISO 8601 timestamp: {self.start!r}"
                ) from None
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ValueError(
                f"reservation {self.name!r}: `cron`: invalid cron expression: {self.cron!r}"
            )
        if self.max_slots < self.min_slots:
            raise ValueError(
                f"reservation {self.name!r}: `max_slots` ({self.max_slots}) must be"
                f" >= `min_slots` ({self.min_slots})"
            )

    @property
    def effective_min(self) -> int:
        # A grant of zero slots is not a grant: a reservation needs at least one slot to run.
        return max(self.min_slots, 1)


class MaintenanceSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    reservations: list[Reservation] = msgspec.field(default_factory=list)
    # Fraction of capacity always left to anomaly + critical work.
    critical_headroom: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.3
    protected_tiers: list[str] = msgspec.field(default_factory=list)
    """Tiers counted as critical work, never displaced by maintenance (default: the first)."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for index, reservation in enumerate(self.reservations):
            if reservation.name in seen:
                raise ValueError(
                    f"reservations[{index}].name: duplicate reservation {reservation.name!r}"
                )
            seen.add(reservation.name)


# ------------------------------------------------------------------------- decisions

Action = Literal["grant", "shrink", "grow", "pause", "resume", "defer", "skip", "complete",
                 "cancel"]
Phase = Literal["waiting", "deferred", "running", "paused", "done"]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    action: Action
    slots: int
    reason: str
    at: float


class ReservationState(msgspec.Struct, frozen=True, kw_only=True):
    reservation: Reservation
    phase: Phase
    slots: int
    scheduled_start: float | None  # None until a cron window has been computed
    window_end: float | None  # set once granted

    @property
    def name(self) -> str:
        return self.reservation.name


class _Live:
    """Mutable bookkeeping of one reservation; never leaves the planner."""

    __slots__ = ("phase", "reservation", "scheduled_start", "slots", "window_end")

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation
        self.phase: Phase = "waiting"
        self.slots = 0
        self.scheduled_start: float | None = (
            parse_start(reservation.start) if reservation.start is not None else None
        )
        self.window_end: float | None = None

    def snapshot(self) -> ReservationState:
        return ReservationState(
            reservation=self.reservation,
            phase=self.phase,
            slots=self.slots,
            scheduled_start=self.scheduled_start,
            window_end=self.window_end,
        )


def _next_cron(expression: str, after: float) -> float:
    # croniter.get_next is strictly after its base; step back a second so an occurrence
    # falling exactly on `after` counts.
    return float(croniter(expression, after - 1).get_next(float))


# --------------------------------------------------------------------------- planner


class MaintenancePlanner:
    def __init__(self, section: MaintenanceSection) -> None:
        self.critical_headroom = section.critical_headroom
        self._live: dict[str, _Live] = {}
        for reservation in section.reservations:
            self.add(reservation)

    # -- admin API / CLI surface

    def add(self, reservation: Reservation) -> None:
        if reservation.name in self._live:
            raise MaintenanceError(f"reservation {reservation.name!r} already exists")
        self._live[reservation.name] = _Live(reservation)

    def finish(self, name: str, now: float) -> bool:
        """End a running or paused window early (its task is done): slots freed, a cron
        reservation waits for its next occurrence. False if no window of it is open."""
        live = self._live.get(name)
        if live is None or live.phase not in ("running", "paused"):
            return False
        self._close_window(live, now)
        return True

    def cancel(self, name: str) -> bool:
        """Drop a reservation, freeing its slots at once; the caller audits the cancel."""
        return self._live.pop(name, None) is not None

    def list(self) -> list[ReservationState]:
        return [live.snapshot() for live in self._live.values()]

    def reserved_slots(self) -> int:
        return sum(live.slots for live in self._live.values())

    def headroom_slots(self, capacity_slots: int) -> int:
        return math.ceil(capacity_slots * self.critical_headroom)

    # -- control step

    def tick(
        self,
        now: float,
        *,
        capacity_slots: int,
        critical_load_slots: float,
        total_load_slots: float,
        forecast_load_slots: float,
    ) -> builtins.list[Decision]:
        """One control step. Loads are in slots: ``critical_load_slots`` of anomaly and
        critical work now, ``total_load_slots`` of all work now, ``forecast_load_slots`` of
        anomaly and critical work expected over the coming window."""
        if capacity_slots < 0:
            raise MaintenanceError(f"capacity_slots: expected >= 0, got {capacity_slots}")
        critical = max(0.0, critical_load_slots)
        routine = max(0.0, total_load_slots - critical)
        forecast = max(0.0, forecast_load_slots)
        headroom = self.headroom_slots(capacity_slots)
        room = capacity_slots - max(math.ceil(critical), headroom)
        spare = room - math.ceil(routine)
        forecast_room = capacity_slots - max(math.ceil(forecast), headroom)

        decisions: builtins.list[Decision] = []

        def emit(live: _Live, action: Action, reason: str) -> None:
            decisions.append(
                Decision(
                    name=live.reservation.name,
                    action=action,
                    slots=live.slots,
                    reason=reason,
                    at=now,
                )
            )

        # 1. Windows that ended free their slots before anyone is sized.
        for live in self._live.values():
            ends = live.window_end
            if live.phase in ("running", "paused") and ends is not None and now >= ends:
                self._close_window(live, now)
                emit(live, "complete", "window ended")

        # 2. Resize running windows against the real load, oldest first.
        held = 0
        for live in self._live.values():
            if live.phase not in ("running", "paused"):
                continue
            res = live.reservation
            available = room - held
            before = live.slots
            if available < res.effective_min:
                if live.phase == "running":
                    live.slots = 0
                    live.phase = "paused"
                    emit(live, "pause", _why(available, res.effective_min,
                                             "anomaly and critical load"))
            else:
                live.slots = min(res.max_slots, available, max(res.effective_min, spare - held))
                if live.phase == "paused":
                    live.phase = "running"
                    emit(live, "resume", f"{available} slots available again")
                elif live.slots < before:
                    emit(live, "shrink", f"routine load rose: {max(spare - held, 0)} slots "
                                         "idle")
                elif live.slots > before:
                    emit(live, "grow", f"routine load fell: {max(spare - held, 0)} slots idle")
            held += live.slots

        # 3. Admit windows that are due.
        for live in self._live.values():
            if live.phase not in ("waiting", "deferred"):
                continue
            res = live.reservation
            if live.scheduled_start is None:
                assert res.cron is not None  # exactly one of start/cron, checked at decode
                live.scheduled_start = _next_cron(res.cron, now)
            if now < live.scheduled_start:
                continue
            admissible = min(room, forecast_room) - held
            waited = now - live.scheduled_start
            if waited <= res.max_defer_s and admissible >= res.effective_min:
                live.slots = min(res.max_slots, admissible,
                                 max(res.effective_min, spare - held))
                live.phase = "running"
                live.window_end = now + res.duration_s
                held += live.slots
                emit(live, "grant", f"{admissible} slots available under forecast and real "
                                    "critical load")
                continue
            if waited >= res.max_defer_s:
                reason = f"not admitted within max_defer_s={res.max_defer_s:g}s; " + _why(
                    admissible, res.effective_min, "forecast/real critical load"
                )
                self._close_window(live, now)
                emit(live, "skip", reason)
            elif live.phase == "waiting":
                live.phase = "deferred"
                emit(live, "defer", _why(admissible, res.effective_min,
                                         "forecast/real critical load"))

        return decisions

    def _close_window(self, live: _Live, now: float) -> None:
        """After completion or skip: a fixed window is done, a cron one waits for the next."""
        live.slots = 0
        live.window_end = None
        cron = live.reservation.cron
        if cron is None:
            live.phase = "done"
        else:
            live.phase = "waiting"
            live.scheduled_start = _next_cron(cron, now + 1)


def _why(available: int, needed: int, what: str) -> str:
    return f"{what} leaves {max(available, 0)} slots, min needs {needed}"


# --------------------------------------------------------------------------- plugins

ENTRY_POINT_GROUP = "iot_gateway.maintenance_tasks"


@runtime_checkable
class MaintenanceTask(Protocol):
    """A housekeeping job (WAL compaction, audit rotation, index rebuild …), run in slices.

    The gateway builds one with ``TASKS[name](options)`` (``options``: the reservation's
    ``options`` table) when its window is granted, then advances ``steps(context)`` one
    ``next()`` per maintenance slot the dispatcher grants it, on the event loop, after
    anomaly and critical work has been served. Each slice must be short (aim for ≤ 1 ms of
    loop time): blocking I/O belongs in a thread, whose future the generator polls. A slice
    yields ``None`` when more work is ready, or a float: seconds until the next slice is
    worth running (waiting for a thread). Returning ends the task; raising fails it (logged,
    audited). A paused window simply stops calling ``next()``: progress is kept.
    """

    name: str

    def steps(self, context: Any) -> Generator[float | None, None, None]: ...


TASKS: dict[str, type] = {}


def load_task_plugins() -> dict[str, type]:
    """Register the task classes advertised under the entry-point group; built-ins win."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in TASKS:
            loaded = entry.load()
            if not isinstance(loaded, type):
                raise MaintenanceError(
                    f"entry point {ENTRY_POINT_GROUP}:{entry.name}: expected a class,"
                    f" got {loaded!r}"
                )
            TASKS[entry.name] = loaded
    return TASKS
