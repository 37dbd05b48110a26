"""The built-in maintenance tasks: WAL compaction, audit rotation, device registry rebuild.

Theory of operation
-------------------
Each task is a class registered by name in :data:`policies.maintenance.TASKS` when this
module is imported. The gateway builds one with ``TASKS[name](options)`` (options are checked
there, and a bad one raises ``MaintenanceError``) and advances ``steps(context)`` one
``next()`` per maintenance slot it grants, on the event loop, between batches of messages.

A slice does only loop-cheap work: bookkeeping, a decision, a swap of an object already
built. Anything that reads or writes a file, or parses, runs in a thread
(``loop.run_in_executor``, or the write-ahead log's own commit thread); the generator hands
the work over, then yields ``POLL_S`` ("nothing to do for that long") until the future is
done, and takes its result. A paused window stops calling ``next()``: the thread's work
finishes meanwhile, and the next slice finds the future done. Tasks keep no state that a
gap could make stale: each step re-reads what it needs (the WAL's sealed segments, the
audit log's current file). A task closed early (its window ended) leaves a thread's work to
finish on its own; whatever that work is, it is safe to stop after (an atomic rename, a
whole gzip, a registry parsed and dropped).

- ``wal-compaction`` (:class:`WALCompaction`): rewrites each sealed WAL segment whose live
  fraction is below ``max_live_fraction`` with only its unretired records
  (``WriteAheadLog.compact``), one segment at a time.
- ``audit-rotation`` (:class:`AuditRotation`): rotates the audit log now, gzips the closed
  files not yet compressed (one file per thread job), and deletes the compressed ones older
  than ``retain_days``; records ``audit.rotated`` and ``audit.archived``.
- ``registry-rebuild`` (:class:`RegistryRebuild`): reloads the device registry file in a
  thread, then installs it; a file that does not load leaves the registry in use as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gateway.audit import (
    AuditError,
    AuditLog,
    audit_files,
    compress_file,
    expired_files,
)
from gateway.errors import ConfigError, GatewayError, WALError
from gateway.registry import DeviceRegistry
from gateway.wal import SegmentInfo, WriteAheadLog
from policies.maintenance import TASKS, MaintenanceError

__all__ = [
    "POLL_S",
    "AuditRotation",
    "MaintenanceTaskError",
    "RegistryRebuild",
    "TaskContext",
    "WALCompaction",
]

POLL_S = 0.01
DEFAULT_ROWS_PER_SLICE = 200
"""What a slice yields while a thread works: seconds until the next poll is worth it."""

_T = TypeVar("_T")
Steps = Generator[float | None, None, _T]


class MaintenanceTaskError(GatewayError):
    """A maintenance task failed; the message names the task, the file and the reason."""


@dataclass
class TaskContext:
    """What the gateway hands every task's ``steps``."""

    wal: WriteAheadLog | None
    audit: AuditLog | None
    registry_path: str | None
    """The configured device registry file (CSV or TOML), or None."""
    tiers: Collection[str]
    """Valid tier names, to check the registry's against."""
    install_registry: Callable[[DeviceRegistry], DeviceRegistry | None]
    """Swaps the live registry in (called on the loop); returns the one it replaced."""
    log: logging.Logger
    registry: DeviceRegistry | None = None
    """The registry in use (a rebuild compares against it, to invalidate only what changed)."""


# -- helpers --------------------------------------------------------------------------------
def _in_thread(function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    return asyncio.get_running_loop().run_in_executor(None, function, *args)


def _wait(future: asyncio.Future[_T]) -> Steps[_T]:
    """Poll ``future`` once a slice until it is done; its result (or its exception)."""
    try:
        while not future.done():
            yield POLL_S
    finally:
        if not future.done():  # closed early: the work goes on; do not lose its error
            future.add_done_callback(_log_outcome)
    return future.result()


def _log_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logging.getLogger(__name__).warning("maintenance: work left running by a task that "
                                            "was stopped failed: %s", future.exception())


def _check_options(task: str, options: Mapping[str, Any] | None,
                   known: Collection[str]) -> Mapping[str, Any]:
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise MaintenanceError(f"task {task!r}: options: expected a table, got {options!r}")
    unknown = sorted(str(key) for key in options if key not in known)
    if unknown:
        expected = f"known: {', '.join(sorted(known))}" if known else "it takes none"
        raise MaintenanceError(f"task {task!r}: unknown option {unknown[0]!r} ({expected})")
    return options


def _number(task: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MaintenanceError(f"task {task!r}: options.{key}: expected a number, "
                               f"got {value!r}")
    return float(value)


# -- wal-compaction -------------------------------------------------------------------------
class WALCompaction:
    """Rewrite the sealed WAL segments pinned by few unretired records.

    Option ``max_live_fraction`` (0 < x <= 1, default 0.5): a segment is compacted when
    fewer than this fraction of its records are unretired. Segments with none are left to
    the log, which deletes them."""

    name = "wal-compaction"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = _check_options(self.name, options, ("max_live_fraction",))
        fraction = _number(self.name, "max_live_fraction", options.get("max_live_fraction", 0.5))
        if not 0 < fraction <= 1:
            raise MaintenanceError(f"task {self.name!r}: options.max_live_fraction: expected "
                                   f"a number in (0, 1], got {fraction:g}")
        self.max_live_fraction = fraction
        self.segments_compacted = 0
        self.bytes_reclaimed = 0

    def steps(self, context: TaskContext) -> Iterator[float | None]:
        wal = context.wal
        if wal is None:
            context.log.info("%s: no write-ahead log in use; nothing to do", self.name)
            return
        # Only the segments sealed by now: on a busy log, new ones seal all the time.
        sealed = wal.sealed_segments()
        if not sealed:
            context.log.info("%s: no sealed segment; nothing to do", self.name)
            return
        last = sealed[-1].first
        seen: set[int] = set()
        while (segment := self._next_candidate(wal, seen, last)) is not None:
            seen.add(segment.first)
            try:
                result = yield from _wait(wal.compact(segment.first))
            except WALError as err:
                raise MaintenanceTaskError(f"{self.name}: {err}") from err
            if result is not None:
                self.segments_compacted += 1
                self.bytes_reclaimed += result.reclaimed
            yield None
        context.log.info("%s: %d segments compacted, %d bytes reclaimed", self.name,
                         self.segments_compacted, self.bytes_reclaimed)

    def _next_candidate(self, wal: WriteAheadLog, seen: set[int],
                        last: int) -> SegmentInfo | None:
        # Listed afresh each time: after a long pause, segments may have gone (or their
        # pending bytes may have been committed).
        for segment in wal.sealed_segments():
            if segment.first > last:
                break
            if (segment.first not in seen and segment.live
                    and segment.live_fraction < self.max_live_fraction):
                return segment
        return None


# -- audit-rotation -------------------------------------------------------------------------
class AuditRotation:
    """Rotate the audit log now, gzip the closed files, delete the expired compressed ones.

    Option ``retain_days`` (> 0, default: keep every file): compressed files last written
    longer ago than this are deleted, oldest first (never one newer than a file kept, so the
    chain left has no hole)."""

    name = "audit-rotation"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = _check_options(self.name, options, ("retain_days",))
        self.retain_days: float | None = None
        if "retain_days" in options:
            days = _number(self.name, "retain_days", options["retain_days"])
            if days <= 0:
                raise MaintenanceError(f"task {self.name!r}: options.retain_days: expected a "
                                       f"number > 0, got {days:g}")
            self.retain_days = days
        self.compressed: list[str] = []
        self.deleted: list[str] = []

    def steps(self, context: TaskContext) -> Iterator[float | None]:
        audit = context.audit
        if audit is None:
            context.log.info("%s: no audit log in use; nothing to do", self.name)
            return
        current = audit.current_file
        if current is None:
            raise MaintenanceTaskError(f"{self.name}: the audit log in {audit.directory} is "
                                       "not open")
        # Flush the file's pages from a thread, so that rotate()'s own fsync finds little.
        yield from self._thread(_sync_file, current)
        try:
            closed = audit.rotate(reason="maintenance")
        except AuditError as err:
            raise MaintenanceTaskError(f"{self.name}: {err}") from err
        yield None

        number = audit.current_number
        if number is None:
            raise MaintenanceTaskError(f"{self.name}: the audit log in {audit.directory} was "
                                       "closed")
        bytes_before = bytes_after = 0
        for path in (yield from self._thread(_plain_files_before, audit.directory, number)):
            packed, before, after = yield from self._thread(compress_file, path)
            self.compressed.append(packed.name)
            bytes_before += before
            bytes_after += after
        if self.retain_days is not None:
            cutoff = time.time() - self.retain_days * 86400
            self.deleted = yield from self._thread(_delete_expired, audit.directory, cutoff)
        if self.compressed or self.deleted:
            try:
                audit.record("audit.archived", compressed=self.compressed,
                             deleted=self.deleted, bytes_before=bytes_before,
                             bytes_after=bytes_after, retain_days=self.retain_days)
            except AuditError as err:
                raise MaintenanceTaskError(f"{self.name}: {err}") from err
        context.log.info("%s: rotated %s; %d files compressed (%d → %d bytes), %d deleted",
                         self.name, closed.name if closed is not None else "nothing (empty)",
                         len(self.compressed), bytes_before, bytes_after, len(self.deleted))

    def _thread(self, function: Callable[..., _T], *args: Any) -> Steps[_T]:
        try:
            return (yield from _wait(_in_thread(function, *args)))
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            raise MaintenanceTaskError(f"{self.name}:{where}: {err.strerror or err}") from err


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_files_before(directory: Path, number: int) -> list[Path]:
    return [path for n, path in audit_files(directory)
            if n < number and not path.name.endswith(".gz")]


def _delete_expired(directory: Path, cutoff: float) -> list[str]:
    expired = expired_files(directory, older_than=cutoff)
    for path in expired:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if expired:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return [path.name for path in expired]


# -- registry-rebuild -----------------------------------------------------------------------
class RegistryRebuild:
    """Reload the device registry file and swap it in. A CSV file is parsed on the loop in
    slices of ``rows_per_slice`` rows (default 500, about a millisecond), so the work stays
    inside the slots the reservation holds; a TOML file is parsed in a thread."""

    name = "registry-rebuild"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        _check_options(self.name, options, ("rows_per_slice",))
        rows = (options or {}).get("rows_per_slice", DEFAULT_ROWS_PER_SLICE)
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= 1_000_000:
            raise MaintenanceError(f"task {self.name!r}: rows_per_slice: expected an integer "
                                   f"from 1 to 1000000, got {rows!r}")
        self.rows_per_slice = rows
        self.devices = 0

    def steps(self, context: TaskContext) -> Iterator[float | None]:
        path = context.registry_path
        # Hold the registry in use only as long as the comparison needs it: the old one is
        # dismantled below only if nothing else refers to it.
        previous, context.registry = context.registry, None
        if not path:
            context.log.info("%s: no device registry configured; nothing to do", self.name)
            return
        try:
            if Path(path).suffix.lower() == ".csv":
                registry = yield from DeviceRegistry.loading(
                    path, tiers=context.tiers, rows_per_step=self.rows_per_slice,
                    previous=previous)
            else:
                load = partial(DeviceRegistry.load, path, tiers=context.tiers)
                registry = yield from _wait(_in_thread(load))
        except ConfigError as err:
            raise MaintenanceTaskError(f"{self.name}: {err}; the registry in use is unchanged"
                                       ) from err
        del previous
        old = context.install_registry(registry)
        self.devices = len(registry)
        context.log.info("%s: %d devices loaded from %s and installed", self.name,
                         self.devices, path)
        if old is not None and sys.getrefcount(old) <= 2:  # ours alone (and the call's)
            yield from old.dismantle()  # freed a shard per slice, not all at once


for _task in (WALCompaction, AuditRotation, RegistryRebuild):
    TASKS[_task.name] = _task
