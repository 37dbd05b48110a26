"""Processing: run dispatched batches through their tier's pipeline; retry what fails.

Theory of operation
-------------------
The normal path is synchronous and per batch: ``process(lane, batch)`` runs the tier's
pipeline stage by stage in the event loop, hands the result to the sinks, counts the batch
once, observes its latency, and calls ``on_finished(batch)`` with the envelopes that came in
(never the aggregates a stage added): the caller retires their write-ahead-log records once
the sinks have flushed them. No task, future, timer or lock is created for it.

Failures leave the normal path (they are rare, so the failure path may allocate):

* A stage that raises on a group of messages (a batch) blames none of them: each is run
  again *alone*, at once, from the failing stage (``env.stage`` keeps the progress: the
  stages before it are not run again), so the good part of a failed batch completes with
  one extra pass. A message that fails alone is to blame: it is retried after
  ``backoff_initial_ms × 2^(n-1)`` (at most ``backoff_max_ms``), ``n`` being how often it
  failed alone at that stage, and dead-lettered once it has failed ``retry.attempts``
  times. One timer per group that waits together; none on the normal path.
* An isolated stage (``isolate = true``) runs in a process pool (``forkserver``, or
  ``spawn``): each worker process builds the stage once from its factory, options and the
  config, registry and schemas (no live sinks or metrics), then runs ``process(batch)`` on
  pickled envelopes; the results are copied back into the loop's envelopes. Meanwhile the
  batch holds its slot; the pipeline resumes at the next stage when the result arrives. A
  batch that runs past its ``timeout_s`` tears the pool down (its processes are killed),
  and so does a worker process that dies; either way the batch takes the retry path. The
  other batches that a timeout teardown interrupted are run again at no cost in attempts;
  those caught in a crash count it (which batch killed the process is not known).
* A dead-lettered message is written, flushed and fsynced as one JSON line to
  ``<dead_letter_dir>/dead-letter-<UTC date>.jsonl`` (the data lake's record, with its raw
  payload, plus ``stage``, ``error`` and ``attempts``), counted, logged at ERROR and
  audited; only then is it finished. If the write fails, it stays pending and the write is
  tried again later: a message is finished exactly once, and never dropped.

Capacity: batches waiting on isolated stages and messages in retry count against the
dispatcher's ``slots`` (retries in batches' worth: ``messages / batch_size``). At that
capacity ``busy`` is true and the dispatcher hands out nothing more; ``dispatcher.kick()``
is called when there is room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec

from gateway.config import Config, DispatchSection, RetrySection, Schema
from gateway.dispatch import Dispatcher, Lane
from gateway.envelope import Envelope, SinkRecord
from gateway.metrics import Metrics
from gateway.pipeline import (
    Isolation,
    Pipeline,
    Stage,
    StageContext,
    StageFactory,
    WindowedStage,
)
from gateway.registry import DeviceInfo, DeviceRegistry
from gateway.sinks import build_sinks

log = logging.getLogger("iotgw.workers")

__all__ = ["Workers"]

DELIVER = "deliver"
"""The stage name of a failure while handing a batch to the sinks."""
POOL_START_TIMEOUT_S = 60.0
"""Longest the worker processes of a new pool may take to start."""
MIN_REWRITE_DELAY_S = 0.05
"""Shortest wait before writing dead letters again after the write failed."""

_DEFAULTS = DispatchSection()
_COPIED = tuple(f for f in Envelope.__struct_fields__ if f not in ("id", "ack"))
_tokens = itertools.count(1)


# ----------------------------------------------------------------------------------------
# Work in progress on the failure path


class _Retry:
    """A message on the retry path: where it failed, how often, why."""

    __slots__ = ("attempts", "env", "error", "original", "plan", "stage", "tier")

    def __init__(self, env: Envelope, plan: _Plan, tier: str, original: bool,
                 stage: int) -> None:
        self.env = env
        self.plan = plan
        self.tier = tier
        self.original = original  # it came from the dispatcher: finish it once
        self.stage = stage
        self.attempts = 0
        self.error: BaseException | None = None


class _Job:
    """A batch (or one retried message) that left the synchronous path."""

    __slots__ = ("batch", "held", "originals", "plan", "preempt", "retry", "stage", "tier")

    def __init__(self, plan: _Plan, tier: str, batch: list[Envelope], stage: int,
                 originals: list[Envelope], retry: _Retry | None, held: bool) -> None:
        self.plan = plan
        self.tier = tier
        self.batch = batch
        self.stage = stage
        self.originals = originals  # the envelopes to finish when the job is done
        self.retry = retry
        self.held = held  # a dispatched batch: it holds one slot of capacity
        self.preempt = False  # yield the slot at the next stage boundary


class _Plan:
    """A pipeline as the workers run it."""

    __slots__ = ("deliver", "isolated", "names", "pipeline", "processes", "windowed")

    def __init__(self, pipeline: Pipeline, isolated: tuple[tuple[int, float] | None, ...]):
        self.pipeline = pipeline
        self.processes = tuple(stage.process for stage in pipeline.stages)
        self.deliver = pipeline.deliver
        self.names = (*pipeline.stage_types, DELIVER)
        self.isolated = isolated if any(isolated) else None  # per stage: (recipe, timeout)
        self.windowed = tuple(i for i, stage in enumerate(pipeline.stages)
                              if callable(getattr(stage, "flush", None)))


# ----------------------------------------------------------------------------------------
# Dead letters


class _Error(msgspec.Struct, frozen=True):
    type: str
    message: str


class _DeadLetter(SinkRecord, kw_only=True):
    """A data-lake record (``gateway.sinks``) plus why the message could not be processed."""

    stage: str
    error: _Error
    attempts: int


def _stamp(at: float) -> str:
    """``received_at`` as the data lake writes it (UTC, microseconds)."""
    us = int(at * 1e6 + 0.5)
    sec = us // 1_000_000
    return "%s.%06dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)),  # noqa: UP031
                         us - sec * 1_000_000)


def _describe(error: BaseException | None) -> _Error:
    if error is None:  # pragma: no cover - every failure records its error
        return _Error("Error", "")
    return _Error(type(error).__name__, str(error))


# ----------------------------------------------------------------------------------------
# The process pool and what its worker processes run


@dataclass(frozen=True)
class _Recipe:
    """What a worker process needs to build an isolated stage (pickled once per process)."""

    factory: StageFactory
    options: Any
    config: Config
    schemas: dict[str, Schema]
    registry: tuple[str, Any]
    """("file", absolute path) or ("devices", {device: DeviceInfo})."""

    def build(self) -> Stage:
        kind, value = self.registry
        if kind == "file":
            registry = DeviceRegistry.load(value)
        else:
            registry = DeviceRegistry.from_devices(value) if value else DeviceRegistry.empty()
        metrics = _child_metrics()
        context = StageContext(config=self.config, registry=registry, metrics=metrics,
                               schemas=self.schemas, sinks=build_sinks(self.config, metrics))
        return self.factory(self.options, context)


def _portable_registry(registry: DeviceRegistry) -> tuple[str, Any]:
    source = registry.source
    if source and not source.startswith("<") and os.path.isfile(source):
        return ("file", os.path.abspath(source))
    devices: dict[str, DeviceInfo] = {}
    for device in registry:
        info = registry.lookup(device)
        if info is not None:
            devices[device] = info
    return ("devices", devices)


_CHILD_RECIPES: dict[int, _Recipe] = {}
_CHILD_STAGES: dict[int, Stage] = {}
_CHILD_METRICS: list[Metrics] = []


def _child_metrics() -> Metrics:
    if not _CHILD_METRICS:
        _CHILD_METRICS.append(Metrics())
    return _CHILD_METRICS[0]


def _child_init(paths: list[str], recipes: bytes) -> None:
    """Worker process start: the parent's import path, then the recipes (whose factories may
    live in modules only that path finds). Signals are the parent's business: it drains on
    SIGTERM/SIGINT and ends its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _child_load(paths, recipes)


def _child_load(paths: list[str], recipes: bytes) -> None:
    sys.path[:] = [*paths, *(p for p in sys.path if p not in paths)]
    _CHILD_RECIPES.update(pickle.loads(recipes))


def _child_ping() -> int:
    return os.getpid()


def _child_run(key: int, batch: list[Envelope]) -> list[Envelope]:
    stage = _CHILD_STAGES.get(key)
    if stage is None:
        stage = _CHILD_STAGES[key] = _CHILD_RECIPES[key].build()
    return stage.process(batch)


def _mp_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (workers fork from a small server that has imported the gateway), else
    ``spawn``; never ``fork``: the parent runs an event loop and threads."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")  # pragma: no cover - not on Linux


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: nobody may be waiting for it any more."""
    if not future.cancelled():
        future.exception()


class _Pool:
    """One generation of worker processes."""

    __slots__ = ("discarded", "executor", "jobs", "ready")

    def __init__(self, size: int, recipes: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.executor = ProcessPoolExecutor(size, mp_context=_mp_context(),
                                            initializer=_child_init,
                                            initargs=(list(sys.path), recipes))
        self.ready: asyncio.Future[int] = loop.run_in_executor(self.executor, _child_ping)
        self.ready.add_done_callback(_consume)
        self.jobs = 0
        self.discarded = ""  # why: "timeout", "crash", "retired", "closed"

    def discard(self, why: str) -> None:
        """Stop using this pool: let its work finish ("retired"), or kill its processes."""
        self.discarded = why
        if why == "retired" or (why == "closed" and not self.jobs):
            self.executor.shutdown(wait=why == "closed")
            return
        for process in list((self.executor._processes or {}).values()):
            process.kill()
        # The executor's own thread notices the dead processes, fails what they were
        # running with BrokenProcessPool and reaps them.
        self.executor.shutdown(wait=why == "closed")


# ----------------------------------------------------------------------------------------


class Workers:
    """Runs dispatched batches through their tier's pipeline; see the module docstring.

    ``dispatcher`` (set by the owner once the dispatcher exists) gives the capacity
    (``slots``, ``batch_size``) and is kicked when capacity frees.
    """

    def __init__(self, pipelines: dict[str, Pipeline], metrics: Metrics, retry: RetrySection,
                 *, on_finished: Callable[[list[Envelope]], None],
                 audit: Callable[..., None] | None = None) -> None:
        self.metrics = metrics
        self.on_finished = on_finished
        self.audit = audit
        self.dispatcher: Dispatcher | None = None
        self.processed = 0
        """Messages that went through their whole pipeline."""
        self.failed = 0
        """Messages dead-lettered."""
        self.pipelines: dict[str, Pipeline] = {}
        self.retry = retry
        self._plans: dict[str, _Plan] = {}
        self._recipes: dict[int, _Recipe] = {}
        self._stale_recipes = False
        self._processed: dict[str, Any] = {}  # tier → its messages_processed child
        self._latency = metrics.processing_latency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held_jobs = 0  # dispatched batches off the synchronous path
        self._held: set[_Job] = set()  # ... those batches
        self._preempted = 0  # messages of batches that yielded, waiting to be resumed
        self._held_messages = 0  # ... the messages they hold in isolated stages
        self._loose = 0  # messages on the retry path (including unwritten dead letters)
        self._unwritten: list[_Retry] = []
        self._rewrite: asyncio.TimerHandle | None = None
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: _Pool | None = None
        self._turns: asyncio.Semaphore | None = None
        self._turns_size = 0  # the pool size _turns was made for
        self._idle: asyncio.Event | None = None
        self._unserved: set[str] = set()
        self._closed = False
        self._encoder = msgspec.json.Encoder()
        self._decode = msgspec.json.Decoder().decode
        metrics.workers_pending.set_function(lambda: self.pending)
        self.reconfigure(pipelines, retry)

    def reconfigure(self, pipelines: dict[str, Pipeline], retry: RetrySection) -> None:
        """Serve new pipelines and retry settings. Work in progress finishes with the
        pipelines it started with; a new process pool starts with the next isolated batch."""
        plans: dict[int, _Plan] = {id(p.pipeline): p for p in self._plans.values()}
        registries: dict[int, tuple[str, Any]] = {}
        fresh: dict[str, _Plan] = {}
        added = False
        for tier, pipeline in pipelines.items():
            plan = plans.get(id(pipeline))
            if plan is None or plan.pipeline is not pipeline:
                isolated: list[tuple[int, float] | None] = []
                for isolation in pipeline.isolation:
                    if isolation is None:
                        isolated.append(None)
                        continue
                    key = next(_tokens)
                    self._recipes[key] = self._recipe(isolation, registries)
                    isolated.append((key, isolation.timeout_s or retry.stage_timeout_s))
                    added = True
                plan = plans[id(pipeline)] = _Plan(pipeline, tuple(isolated))
            fresh[tier] = plan
        self.pipelines = dict(pipelines)
        self.retry = retry
        self._plans = fresh
        isolating = any(plan.isolated for plan in fresh.values())
        if self._pool is not None and (added or not isolating):
            self._pool.discard("retired")  # its work still completes; new work gets new recipes
            self._pool = None
        self._stale_recipes = True
        self._settle()

    @staticmethod
    def _recipe(isolation: Isolation, registries: dict[int, tuple[str, Any]]) -> _Recipe:
        context = isolation.context
        registry = registries.get(id(context.registry))
        if registry is None:
            registry = registries[id(context.registry)] = _portable_registry(context.registry)
        return _Recipe(isolation.factory, isolation.options, context.config,
                       dict(context.schemas), registry)

    # -- state ---------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages waiting for a retry or in isolated stages (not yet finished)."""
        return self._held_messages + self._loose + self._preempted

    @property
    def busy(self) -> bool:
        """True while held batches (isolated stages, retries) fill the dispatcher's slots."""
        dispatcher = self.dispatcher
        slots = dispatcher.slots if dispatcher is not None else _DEFAULTS.slots
        size = dispatcher.batch_size if dispatcher is not None else _DEFAULTS.batch_size
        return self._held_jobs + self._loose / size >= slots

    def _settle(self) -> None:
        """After work left: let the dispatcher go on, wake ``drain``, forget old recipes."""
        if self.pending:
            if self.dispatcher is not None and not self.busy:
                self.dispatcher.kick()
            return
        if self._idle is not None:
            self._idle.set()
        if self._stale_recipes:
            self._stale_recipes = False
            live = {entry[0] for plan in self._plans.values() if plan.isolated
                    for entry in plan.isolated if entry is not None}
            for key in [key for key in self._recipes if key not in live]:
                del self._recipes[key]
        if self.dispatcher is not None:
            self.dispatcher.kick()

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- the normal path -----------------------------------------------------------------

    def process(self, lane: Lane, batch: list[Envelope]) -> None:
        """Run ``batch`` (all of ``lane``'s tier) through its pipeline."""
        tier = lane.name
        plan = self._plans.get(tier)
        if plan is None:
            self._no_pipeline(tier, batch)
            return
        if plan.isolated is not None:
            job = _Job(plan, tier, batch, 0, batch, None, True)
            self._held_jobs += 1
            self._held.add(job)
            self._step(job)
            return
        n = len(batch)
        items = batch
        stage = 0
        try:
            for process in plan.processes:
                items = process(items)
                stage += 1
            plan.deliver(items)
        except Exception as err:
            self._fail(_Job(plan, tier, batch, 0, batch, None, False), items, stage, err,
                       "error")
            return
        self._finish(tier, batch if len(batch) == n else batch[:n])

    def _finish(self, tier: str, envelopes: list[Envelope]) -> None:
        n = len(envelopes)
        if not n:
            return
        now = time.monotonic_ns()
        self._latency.observe_many(tier, [now - e.received_ns for e in envelopes])
        self.processed += n
        counter = self._processed.get(tier)
        if counter is None:
            counter = self._processed[tier] = self.metrics.messages_processed.labels(tier)
        counter.inc(n)
        self.on_finished(envelopes)

    def _no_pipeline(self, tier: str, batch: list[Envelope]) -> None:
        if tier not in self._unserved:
            self._unserved.add(tier)
            log.error("no pipeline serves tier %s: its messages are finished unprocessed", tier)
        self._finish(tier, batch)

    # -- off the normal path -------------------------------------------------------------

    def _step(self, job: _Job) -> None:
        """Run ``job`` from ``job.stage`` on: synchronously, up to the end (then the sinks),
        a failure, or an isolated stage (then a task picks it up)."""
        plan = job.plan
        items = job.batch
        stage = job.stage
        isolated = plan.isolated
        try:
            for stage in range(job.stage, len(plan.processes)):
                if isolated is not None and isolated[stage] is not None and items:
                    job.batch, job.stage = items, stage
                    if job.held:
                        self._held_messages += len(items)
                    task = self._get_loop().create_task(self._isolated(job))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
                    return
                items = plan.processes[stage](items)
            stage = len(plan.processes)
            plan.deliver(items)
        except Exception as err:
            self._fail(job, items, stage, err, "error")
            return
        self._end(job)
        if job.retry is not None:
            self._loose -= 1
        self._finish(job.tier, job.originals)
        self._settle()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - a bug
            log.error("isolated stage work failed", exc_info=task.exception())

    def _end(self, job: _Job) -> None:
        if job.held:
            job.held = False
            self._held_jobs -= 1
            self._held.discard(job)

    # -- preemption ----------------------------------------------------------------------

    def preempt(self, wanted: int) -> None:
        """Anomalies wait and every slot is busy: mark up to ``wanted`` held routine batches,
        lowest tier first, to yield their slot at their next stage boundary. Routine work
        keeps ``ceil(routine_floor × slots)`` slots."""
        dispatcher = self.dispatcher
        if dispatcher is None or not self._held:
            return
        urgent = {lane.name for lane in dispatcher.anomaly_lanes}
        routine = [job for job in self._held if job.tier not in urgent]
        marked = sum(job.preempt for job in routine)
        floor = math.ceil(dispatcher.routine_floor * dispatcher.slots)
        more = min(wanted - marked, len(routine) - marked - floor)
        if more <= 0:
            return
        rank = {lane.name: lane.index for lane in dispatcher.routine_lanes}
        candidates = sorted((job for job in routine if not job.preempt),
                            key=lambda job: rank.get(job.tier, 0), reverse=True)
        for job in candidates[:more]:
            job.preempt = True

    def _yield(self, job: _Job) -> None:
        """``job`` reached a stage boundary with its preempt mark: free its slot and go back
        to the front of its lane, progress kept; the dispatcher resumes it."""
        assert self.dispatcher is not None
        job.preempt = False
        self._end(job)
        for env in job.batch:
            env.stage = job.stage
        self.metrics.preemptions.labels(job.tier).inc()
        n = max(len(job.originals), 1)
        self._preempted += n
        self.dispatcher.requeue(job.tier, n, lambda: self._resume(job, n))
        self._settle()

    def _resume(self, job: _Job, n: int) -> None:
        self._preempted -= n
        job.held = True
        self._held_jobs += 1
        self._held.add(job)
        self._step(job)

    async def _isolated(self, job: _Job) -> None:
        items, stage = job.batch, job.stage
        assert job.plan.isolated is not None
        entry = job.plan.isolated[stage]
        assert entry is not None
        key, timeout = entry
        held = len(items) if job.held else 0  # counted when the job was handed over
        try:
            result, error, reason = await self._run_isolated(key, timeout, items)
        finally:
            self._held_messages -= held
        if self._closed:
            return
        if error is not None:
            self._fail(job, items, stage, error, reason)
            return
        assert result is not None
        job.batch = _adopt(items, result)
        job.stage = stage + 1
        if job.preempt and job.held and job.stage < len(job.plan.processes):
            self._yield(job)
            return
        self._step(job)

    async def _run_isolated(self, key: int, timeout: float, items: list[Envelope],
                            ) -> tuple[list[Envelope] | None, BaseException | None, str]:
        """(result, None, "") or (None, error, reason: "error", "timeout" or "crash")."""
        loop = self._get_loop()
        sent = [e if e.ack is None else msgspec.structs.replace(e, ack=None) for e in items]
        if self._turns is None:
            self._turns_size = self._pool_size()
            self._turns = asyncio.Semaphore(self._turns_size)
        async with self._turns:  # one batch per worker process: timeouts time the work only
            while True:
                pool = self._pool
                if pool is None:
                    pool = self._pool = _Pool(self._pool_size(), pickle.dumps(self._recipes),
                                              loop)
                future: asyncio.Future[list[Envelope]] | None = None
                try:
                    started, _ = await asyncio.wait((pool.ready,), timeout=POOL_START_TIMEOUT_S)
                    if not started:
                        self._discard_pool(pool, "timeout")
                        return None, TimeoutError("the worker processes did not start within "
                                                  f"{POOL_START_TIMEOUT_S:g} s"), "timeout"
                    pool.ready.result()
                    if pool.discarded:
                        continue  # torn down while we waited: take the next one
                    future = loop.run_in_executor(pool.executor, _child_run, key, sent)
                    pool.jobs += 1
                    try:
                        done, _ = await asyncio.wait((future,), timeout=timeout)
                    finally:
                        pool.jobs -= 1
                    if not done:
                        future.cancel()
                        self._discard_pool(pool, "timeout")
                        late = TimeoutError(f"no result within its timeout of {timeout:g} s")
                        return None, late, "timeout"
                    return future.result(), None, ""
                except BrokenProcessPool as err:
                    if pool.discarded in ("timeout", "closed"):
                        continue  # killed for another batch's timeout: this one was innocent
                    self._discard_pool(pool, "crash")
                    return None, err, "crash"
                except asyncio.CancelledError:
                    if future is not None:
                        future.cancel()
                    raise
                except Exception as err:  # the stage raised in the worker process
                    return None, err, "error"

    def resize(self) -> None:
        """The dispatcher's slots changed (in-node scaling): isolated stages get a process
        pool of the new size. The old pool finishes what it runs; the next batch starts the
        new one."""
        if self._turns is None or self._pool_size() == self._turns_size:
            return
        self._turns = None
        if self._pool is not None:
            self._pool.discard("retired")
            self._pool = None

    def _pool_size(self) -> int:
        slots = self.dispatcher.slots if self.dispatcher is not None else _DEFAULTS.slots
        return max(1, min(slots, os.cpu_count() or 1))

    def _discard_pool(self, pool: _Pool, why: str) -> None:
        if not pool.discarded:
            self.metrics.isolated_pool_restarts.labels(why).inc()
            log.warning("isolated stages: process pool torn down (%s); a new one starts with "
                        "the next batch", why)
            pool.discard(why)
        if self._pool is pool:
            self._pool = None

    # -- failures, retries, dead letters -------------------------------------------------

    def _fail(self, job: _Job, items: list[Envelope], stage: int, error: BaseException,
              reason: str) -> None:
        """Stage ``stage`` failed on ``items`` (its input). Alone, a message is to blame: it
        waits its backoff, or is dead-lettered after its last attempt. In a group, no one is:
        each is retried alone at once. Originals an earlier stage consumed are finished."""
        plan, tier = job.plan, job.tier
        name = plan.names[stage]
        self.metrics.stage_failures.labels(name, reason).inc()
        self.metrics.pipeline_failures.labels(tier).inc(len(items))
        present = {id(e) for e in items}
        finished = [e for e in job.originals if id(e) not in present]
        originals = {id(e) for e in job.originals}
        retry, kept = job.retry, False
        alone = len(items) == 1
        records: list[_Retry] = []
        for env in items:
            if retry is not None and retry.env is env:
                record, kept = retry, True
            else:
                record = _Retry(env, plan, tier, id(env) in originals, stage)
                self._loose += 1
            if record.stage != stage:
                record.attempts = 0  # progress: a new stage, a new count
            record.stage = env.stage = stage
            record.error = error
            if alone:
                record.attempts += 1
            records.append(record)
        if retry is not None and not kept:
            self._loose -= 1  # consumed by an earlier stage: finished below
        self._end(job)
        if not alone:
            log.warning("stage %s of pipeline %s failed on %d messages (tier %s): %s: %s; "
                        "each is retried alone", name, plan.pipeline.name, len(items), tier,
                        type(error).__name__, error,
                        exc_info=error if reason == "error" else None)
        elif records:
            log.warning("stage %s of pipeline %s failed on message %s (attempt %d of %d): "
                        "%s: %s", name, plan.pipeline.name, records[0].env.id,
                        records[0].attempts, self.retry.attempts, type(error).__name__, error)
        self._finish(tier, finished)
        if not alone:
            if records:
                self._schedule(0.0, records)
        elif records and records[0].attempts >= self.retry.attempts:
            self._dead_letter(records)
        elif records:
            self._schedule(min(self.retry.backoff_initial_ms * 2.0 ** (records[0].attempts - 1),
                               self.retry.backoff_max_ms) / 1000.0, records)
        self._settle()

    def _schedule(self, delay: float, group: list[_Retry]) -> None:
        token = next(_tokens)
        self._timers[token] = self._get_loop().call_later(delay, self._retry_round, token, group)

    def _retry_round(self, token: int, group: list[_Retry]) -> None:
        self._timers.pop(token, None)
        retries = self.metrics.stage_retries
        for record in group:
            retries.labels(record.plan.names[record.stage]).inc()
            env = record.env
            self._step(_Job(record.plan, record.tier, [env], record.stage,
                            [env] if record.original else [], record, False))

    def _dead_letter(self, records: list[_Retry]) -> None:
        try:
            path = self._write_dead_letters(records)
        except OSError as err:
            self._unwritten.extend(records)
            delay = max(self.retry.backoff_max_ms / 1000.0, MIN_REWRITE_DELAY_S)
            log.error("cannot write %d dead letters to %s: %s; they stay pending, next try in "
                      "%.1f s", len(records), self.retry.dead_letter_dir, err.strerror or err,
                      delay)
            if self._rewrite is None:
                self._rewrite = self._get_loop().call_later(delay, self._write_unwritten)
            return
        self._loose -= len(records)
        self.failed += len(records)
        for record in records:
            env, name = record.env, record.plan.names[record.stage]
            error = f"{type(record.error).__name__}: {record.error}"
            self.metrics.dead_letters.labels(name).inc()
            log.error("message %s dead-lettered to %s: stage %s failed %d times, last: %s",
                      env.id, path, name, record.attempts, error)
            if self.audit is not None:
                try:
                    self.audit("dead_letter", id=env.id, stage=name, error=error,
                               attempts=record.attempts)
                except Exception:
                    log.exception("cannot audit the dead letter %s", env.id)
        originals = [record.env for record in records if record.original]
        if originals:
            self.on_finished(originals)

    def _write_unwritten(self) -> None:
        self._rewrite = None
        records, self._unwritten = self._unwritten, []
        self._dead_letter(records)
        self._settle()

    def _write_dead_letters(self, records: Iterable[_Retry]) -> Path:
        """Append one line per message, then fsync; on failure nothing partial is left."""
        lines = bytearray()
        for record in records:
            lines += self._dead_line(record)
        directory = Path(self.retry.dead_letter_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / time.strftime("dead-letter-%Y-%m-%d.jsonl", time.gmtime())
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            start = os.fstat(fd).st_size
            try:
                with memoryview(lines) as view:
                    done = 0
                    while done < len(view):
                        done += os.write(fd, view[done:])
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # leave no partial line behind
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if created:  # the new file's name must survive a crash too
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return path

    def _dead_line(self, record: _Retry) -> bytes:
        env = record.env
        payload: Any
        try:
            payload, encoding = self._decode(env.payload), "json"
        except (msgspec.DecodeError, UnicodeDecodeError):
            payload, encoding = bytes(env.payload), "base64"
        letter = _DeadLetter(
            env.id, env.device, env.tenant, env.tier, env.topic, _stamp(env.received_at),
            env.qos, env.protocol, env.region, env.device_class, encoding, payload, env.meta,
            env.errors, stage=record.plan.names[record.stage], error=_describe(record.error),
            attempts=record.attempts)
        try:
            return self._encoder.encode(letter) + b"\n"
        except (TypeError, ValueError, OverflowError) as err:  # meta a stage filled oddly
            letter = msgspec.structs.replace(
                letter, meta=None, errors=[*(env.errors or ()), f"meta: not JSON-encodable, "
                                           f"dropped: {err}"])
            return self._encoder.encode(letter) + b"\n"

    # -- time-based stages ---------------------------------------------------------------

    def flush_windows(self, now: float) -> None:
        """Close the aggregation windows that wall-clock ``now`` has ended (``math.inf`` at
        shutdown). What they emit runs through the following stages like any batch (isolated
        stages in the pool, failures retried and dead-lettered) and goes to the sinks."""
        seen: set[int] = set()
        for plan in self._plans.values():
            if not plan.windowed or id(plan) in seen:
                continue
            seen.add(id(plan))
            for index in plan.windowed:
                stage = cast(WindowedStage, plan.pipeline.stages[index])
                try:
                    emitted = stage.flush(now)
                except Exception:
                    self.metrics.stage_failures.labels(plan.names[index], "error").inc()
                    log.exception("stage %s of pipeline %s failed to close its windows",
                                  plan.names[index], plan.pipeline.name)
                    continue
                if emitted:
                    self._step(_Job(plan, emitted[0].tier, emitted, index + 1, [], None,
                                    False))

    # -- shutdown ------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending (retries done, isolated stages back); False if
        ``timeout`` seconds pass first."""
        if not self.pending:
            return True
        if self._idle is None or self._idle.is_set():
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return not self.pending
        return True

    def close(self) -> None:
        """Stop: cancel retries and isolated work (what was pending is not finished, so its
        write-ahead-log records stay for the next start) and end the worker processes."""
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._rewrite is not None:
            self._rewrite.cancel()
            self._rewrite = None
        for task in self._tasks:
            task.cancel()
        if self._pool is not None:
            self._pool.discard("closed")
            self._pool = None


def _adopt(sent: list[Envelope], returned: list[Envelope]) -> list[Envelope]:
    """The result of an isolated stage with the loop's own envelopes in it: what a worker
    process changed is copied back into them (ack handles never left); new envelopes (a
    stage's additions) are taken as they are."""
    mine = {env.id: env for env in sent}
    result: list[Envelope] = []
    for env in returned:
        own = mine.get(env.id)
        if own is None:
            result.append(env)
            continue
        for field in _COPIED:
            setattr(own, field, getattr(env, field))
        result.append(own)
    return result

