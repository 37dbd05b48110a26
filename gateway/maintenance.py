"""Maintenance windows at run time: the planner's decisions applied to the dispatcher.

Theory of operation
-------------------
Once a second (``tick``) the gateway measures its load in *slots* (a slot is one batch per
dispatcher drain, the unit of ``dispatch.slots``) and asks the planner
(``policies.maintenance``) what the reservations may hold. Every decision is counted and
audited; the live figure is ``iotgw_maintenance_reserved_slots``.

Load. The dispatcher counts, per drain, the messages it handed out from each lane. Over the
last tick, ``messages / batch_size / drains`` is the slots' worth of work a drain served; the
lanes' backlog (``queued / batch_size``) is added, and the sum capped at ``slots``. Critical
load is that of the anomaly lanes and the protected tiers (``protected_tiers``, default: the
first tier); total load that of every lane. The forecast of critical load for admission is
the larger of a fast and a slow moving average (about 10 s and 10 min) of the critical load:
a burst that just happened, or the level of the last minutes, both count.

Tasks. A granted reservation builds its task (``TASKS[task](options)``) and advances its
``steps(context)`` generator one slice per slot the dispatcher gives maintenance: at most
the reserved slots per drain, and only in place of a routine batch of an unprotected tier or
when nothing waits (``Dispatcher.set_maintenance``). A slice that yields a delay makes its
task wait that long (a timer, not a poll). A paused window keeps its generator: it goes on
where it stopped when resumed. A task that returns ends its window early (``complete``,
slots freed); one that raises is logged, counted and audited, and its window ends too; a
window that ends before its task does closes the generator (``incomplete``). A cron
reservation builds a fresh task for each window.

Reservations come from the config (replaced on reload) and from the admin API / CLI (kept in
``<state_dir>/maintenance.json`` so that a restart does not forget them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

import policies.tasks  # noqa: F401 - registers the built-in tasks in TASKS
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.statedir import write_atomically
from policies.maintenance import (
    TASKS,
    Decision,
    MaintenanceError,
    MaintenancePlanner,
    MaintenanceSection,
    Reservation,
    ReservationState,
)

log = logging.getLogger("iotgw.maintenance")

__all__ = ["Maintenance", "build_task", "validate"]

FAST_ALPHA = 0.1  # per tick (about a second): a time constant of about 10 s
SLOW_ALPHA = 1 / 600  # about 10 minutes
STATE_FILE = "maintenance.json"


def build_task(reservation: Reservation) -> Any:
    """The reservation's task, built from its options; MaintenanceError names what is wrong."""
    factory = TASKS.get(reservation.task)
    if factory is None:
        raise MaintenanceError(f"reservation {reservation.name!r}: unknown task "
                               f"{reservation.task!r} (known: {', '.join(sorted(TASKS))})")
    try:
        return factory(dict(reservation.options))
    except MaintenanceError as err:
        raise MaintenanceError(f"reservation {reservation.name!r}: {err}") from None
    except (TypeError, ValueError) as err:
        raise MaintenanceError(f"reservation {reservation.name!r}: options: {err}") from None


def validate(config: Config) -> None:
    """The config's reservations and protected tiers; ConfigError names what is wrong."""
    for reservation in config.maintenance.reservations:
        try:
            build_task(reservation)
        except MaintenanceError as err:
            raise ConfigError(f"maintenance.reservations: {err}") from None
    unknown = set(config.maintenance.protected_tiers) - set(config.tier_names)
    if unknown:
        raise ConfigError(f"maintenance.protected_tiers: unknown tiers {sorted(unknown)}")


class _Running:
    """A granted window's task and where it is."""

    __slots__ = ("name", "ready", "steps", "task", "timer")

    def __init__(self, name: str, task: Any, steps: Generator[float | None, None, None]) -> None:
        self.name = name
        self.task = task
        self.steps = steps
        self.ready = True
        self.timer: asyncio.TimerHandle | None = None


class Maintenance:
    def __init__(self, section: MaintenanceSection, dispatcher: Dispatcher, metrics: Metrics,
                 *, audit: Callable[..., None], context: Callable[[], Any],
                 state_dir: str | Path | None = None) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._audit = audit
        self._context = context
        self._state = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="maintenance-state")
        self._running: dict[str, _Running] = {}
        self._order: list[str] = []  # round robin over the running tasks
        self._turn = 0
        self._served = [0] * len(dispatcher.lanes)
        self._drains = 0
        self._fast = 0.0
        self._slow = 0.0
        self._api: dict[str, Reservation] = self._load_api_reservations()
        self.planner = MaintenancePlanner(MaintenanceSection(
            critical_headroom=section.critical_headroom))
        self._from_config: set[str] = set()
        self.reconfigure(section)
        metrics.maintenance_reserved_slots.set_function(self.planner.reserved_slots)

    # -- reservations ------------------------------------------------------------------
    def reconfigure(self, section: MaintenanceSection) -> None:
        """A (re)loaded config: its reservations replace the config's old ones (a window
        under way whose reservation is unchanged goes on); the API's are kept."""
        self.planner.critical_headroom = section.critical_headroom
        self.dispatcher.protect(section.protected_tiers
                                or [self.dispatcher.routine_lanes[0].name])
        wanted = {r.name: r for r in section.reservations}
        for name in list(self._from_config):
            current = self._state_of(name)
            if current is None or wanted.get(name) != current.reservation:
                self._drop(name, "removed from the config")
                self._from_config.discard(name)
        for name, reservation in wanted.items():
            if name in self._from_config:
                continue
            if name in self._api:
                log.warning("maintenance reservation %r of the config replaces the one "
                            "scheduled through the admin API", name)
                self._drop(name, "replaced by the config")
                del self._api[name]
                self._save_api_reservations()
            self.planner.add(reservation)
            self._from_config.add(name)
        for name, reservation in self._api.items():
            if self._state_of(name) is None:
                self.planner.add(reservation)

    def schedule(self, reservation: Reservation) -> None:
        """Add a reservation (admin API, CLI); MaintenanceError if it is invalid or taken."""
        build_task(reservation)  # its task and options must be valid now, not at its window
        if self._state_of(reservation.name) is not None:
            raise MaintenanceError(f"reservation {reservation.name!r} already exists")
        self.planner.add(reservation)
        self._api[reservation.name] = reservation
        self._save_api_reservations()
        self._audit("maintenance.scheduled", name=reservation.name, task=reservation.task,
                    start=reservation.start, cron=reservation.cron,
                    duration_s=reservation.duration_s, min_slots=reservation.min_slots,
                    max_slots=reservation.max_slots)

    def cancel(self, name: str) -> bool:
        if self._state_of(name) is None:
            return False
        self._drop(name, "cancelled")
        self._from_config.discard(name)
        if self._api.pop(name, None) is not None:
            self._save_api_reservations()
        return True

    def list(self) -> list[dict[str, Any]]:
        out = []
        for state in self.planner.list():
            res = state.reservation
            out.append({
                "name": res.name, "task": res.task, "phase": state.phase, "slots": state.slots,
                "start": res.start, "cron": res.cron, "duration_s": res.duration_s,
                "min_slots": res.min_slots, "max_slots": res.max_slots,
                "options": res.options,
                "source": "config" if res.name in self._from_config else "api",
                "scheduled_start": _iso(state.scheduled_start),
                "window_end": _iso(state.window_end),
                "task_running": res.name in self._running,
            })
        return out

    def _state_of(self, name: str) -> ReservationState | None:
        return next((s for s in self.planner.list() if s.name == name), None)

    def _drop(self, name: str, why: str) -> None:
        self._stop_task(name, "cancelled")
        if self.planner.cancel(name):
            self._decided(Decision(name=name, action="cancel", slots=0, reason=why,
                                   at=time.time()))
        self._apply()

    # -- the control step --------------------------------------------------------------
    def tick(self, now: float) -> None:
        """About once a second, ``now`` wall-clock: measure, decide, apply."""
        dispatcher = self.dispatcher
        unit = float(dispatcher.batch_size)
        slots = dispatcher.slots
        drains = max(dispatcher.drains - self._drains, 1)  # reset on reload: then 1
        self._drains = dispatcher.drains
        served = dispatcher.served
        if len(self._served) != len(served):  # lanes changed on reload
            self._served = [0] * len(served)
        protected = dispatcher.protected
        critical = total = 0.0
        for lane in dispatcher.lanes:
            i = lane.index
            load = max(served[i] - self._served[i], 0) / unit / drains + len(lane) / unit
            total += load
            if lane in dispatcher.anomaly_lanes or lane.name in protected:
                critical += load
        self._served = list(served)
        critical, total = min(critical, slots), min(total, slots)
        self._fast += FAST_ALPHA * (critical - self._fast)
        self._slow += SLOW_ALPHA * (critical - self._slow)
        for decision in self.planner.tick(now, capacity_slots=slots,
                                          critical_load_slots=critical,
                                          total_load_slots=total,
                                          forecast_load_slots=max(self._fast, self._slow)):
            self._decided(decision)
            if decision.action == "grant":
                self._start_task(decision.name)
            elif decision.action in ("complete", "skip"):
                self._stop_task(decision.name, "incomplete")
                self._forget_if_over(decision.name)
        self._apply()

    def _forget_if_over(self, name: str) -> None:
        """A one-off reservation of the API whose window is over is not kept for the next
        start (it would run again)."""
        reservation = self._api.get(name)
        if reservation is not None and reservation.start is not None:
            del self._api[name]
            self._save_api_reservations()

    def _decided(self, decision: Decision) -> None:
        self.metrics.maintenance_decisions.labels(decision.action).inc()
        log.info("maintenance %s: %s (%d slots): %s", decision.name, decision.action,
                 decision.slots, decision.reason)
        self._audit("maintenance", name=decision.name, action=decision.action,
                    slots=decision.slots, reason=decision.reason)

    # -- running tasks -----------------------------------------------------------------
    def _start_task(self, name: str) -> None:
        state = self._state_of(name)
        assert state is not None
        try:
            task = build_task(state.reservation)
            steps = task.steps(self._context())
        except Exception as err:
            self._task_failed(name, state.reservation.task, err)
            return
        self._running[name] = _Running(name, task, steps)
        self._order.append(name)

    def _stop_task(self, name: str, outcome: str) -> None:
        running = self._running.pop(name, None)
        if running is None:
            return
        self._order.remove(name)
        if running.timer is not None:
            running.timer.cancel()
        running.steps.close()
        task = getattr(running.task, "name", "?")
        self.metrics.maintenance_tasks.labels(task, outcome).inc()
        log.warning("maintenance %s: task %s %s before it finished", name, task, outcome)
        self._audit("maintenance.task", name=name, task=task, outcome=outcome)

    def _task_failed(self, name: str, task: str, err: BaseException) -> None:
        self.metrics.maintenance_tasks.labels(task, "failed").inc()
        log.error("maintenance %s: task %s failed: %s: %s", name, task, type(err).__name__, err)
        self._audit("maintenance.task", name=name, task=task, outcome="failed",
                    error=f"{type(err).__name__}: {err}")
        self._end_window(name, f"task failed: {err}")

    def _end_window(self, name: str, why: str) -> None:
        if self.planner.finish(name, time.time()):
            self._decided(Decision(name=name, action="complete", slots=0, reason=why,
                                   at=time.time()))
            self._forget_if_over(name)
        self._apply()

    def _apply(self) -> None:
        """Tell the dispatcher how many slots maintenance has, if a task can use them."""
        slots = sum(s.slots for s in self.planner.list() if s.name in self._running)
        ready = any(r.ready for r in self._running.values())
        self.dispatcher.set_maintenance(slots if ready else 0,
                                        self._run_slice if slots and ready else None)

    def _run_slice(self) -> bool:
        """One slice of the next ready task (round robin); whether another is ready now."""
        order = self._order
        for _ in range(len(order)):
            self._turn = (self._turn + 1) % len(order)
            running = self._running[order[self._turn]]
            if running.ready:
                self._step(running)
                break
        return any(r.ready for r in self._running.values())

    def _step(self, running: _Running) -> None:
        name = running.name
        task = getattr(running.task, "name", "?")
        self.metrics.maintenance_steps.labels(task).inc()
        try:
            delay = next(running.steps)
        except StopIteration:
            del self._running[name]
            self._order.remove(name)
            self.metrics.maintenance_tasks.labels(task, "done").inc()
            log.info("maintenance %s: task %s done", name, task)
            self._audit("maintenance.task", name=name, task=task, outcome="done")
            self._end_window(name, "task done")
            return
        except Exception as err:
            del self._running[name]
            self._order.remove(name)
            self._task_failed(name, task, err)
            return
        if delay:
            running.ready = False
            running.timer = asyncio.get_running_loop().call_later(delay, self._wake, running)

    def _wake(self, running: _Running) -> None:
        running.timer = None
        running.ready = True
        if self._running.get(running.name) is running:
            self.dispatcher.maintenance_ready()
            self._apply()

    def close(self) -> None:
        for name in list(self._running):
            self._stop_task(name, "stopped")
        self.dispatcher.set_maintenance(0, None)
        self._io.shutdown(wait=True)  # the last state written

    # -- persistence of the API's reservations -----------------------------------------
    def _load_api_reservations(self) -> dict[str, Reservation]:
        if self._state is None or not self._state.exists():
            return {}
        try:
            listed = msgspec.json.decode(self._state.read_bytes(), type=list[Reservation])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as err:
            log.error("maintenance reservations in %s not loaded: %s", self._state, err)
            return {}
        return {r.name: r for r in listed}

    def _save_api_reservations(self) -> None:
        """Write the API's reservations, in a thread: an fsync under load can take a hundred
        milliseconds, which the loop (and every message) must not wait for. Writes happen in
        order, one thread; the last one wins."""
        if self._state is None:
            return
        data = msgspec.json.encode(list(self._api.values()))
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not serving yet: write now
            self._write_state(data)
            return
        self._io.submit(self._write_state, data)

    def _write_state(self, data: bytes) -> None:
        assert self._state is not None
        try:
            self._state.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._state, data, mode=0o644)
        except OSError as err:
            log.error("maintenance reservations not saved to %s: %s (they hold until the "
                      "next restart)", self._state, err)


def _iso(stamp: float | None) -> str | None:
    if stamp is None or math.isinf(stamp):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
