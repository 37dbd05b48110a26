"""Pipelines: the stages a tier's batches go through, then the sinks.

Theory of operation
-------------------
``build_pipelines`` turns each ``[[pipelines]]`` table into a ``Pipeline``: every stage table
is ``{type = "<name>", <options>...}``; the type is looked up in ``STAGES`` (the built-ins of
``gateway.stages`` plus the entry-point group ``iot_gateway.stages``, loaded once, at import),
its options decoded into the type's ``Options`` Struct (unknown keys rejected) and the stage
built with a ``StageContext``. Any error is a ``ConfigError`` naming its place, e.g.
``pipelines[0].stages[2].rename: expected object, got int``.

Two more keys of a stage table belong to the pipeline, not to the stage's options:
``isolate = true`` runs the stage in a worker process (``gateway.workers`` owns the pool; the
stage is rebuilt there from its ``Isolation``), and ``timeout_s`` bounds how long it may take
on one batch there (default ``retry.stage_timeout_s``). A stage that emits on time (aggregate
windows) keeps its state in the loop's process and cannot be isolated.

A pipeline runs a batch (one tier's, as the dispatcher hands it) through its stages
synchronously, each stage taking and returning the whole batch; then it hands every envelope
to the sinks named in ``env.sinks``, one ``write`` per sink per batch. Stage boundaries are
where work may be preempted: ``advance`` runs a range of stages and records the next one in
``env.stage``, and ``run(batch, start)`` resumes from there. Time-based stages (aggregate
windows) emit on ``flush(now)``, called by the owner's timer. ``run``, ``advance`` and
``flush`` run every stage in the calling process, isolated ones included: the process pool,
timeouts and retries are ``gateway.workers``' business (``stage_types`` and ``isolation``
tell it what each stage is).

A pipeline neither counts processed messages nor observes their latency: its caller
(``gateway.workers``) does, once per batch.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

import msgspec

from gateway.config import Config, Schema
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.registry import DeviceRegistry
from gateway.sinks import Sink, build_sinks, format_validation_error, load_plugins
from gateway.stages import BUILTIN_STAGES, OptionError

log = logging.getLogger(__name__)

__all__ = ["BROKEN_STAGES", "PIPELINE_KEYS", "STAGES", "Isolation", "OptionError", "Pipeline",
           "Stage", "StageContext", "StageFactory", "WindowedStage", "build_pipelines",
           "build_stage", "validate_pipelines"]


class Stage(Protocol):
    def process(self, batch: list[Envelope]) -> list[Envelope]:
        """Mutate the envelopes in place; return the batch for the next stage (the same list,
        or a new one to add or remove envelopes: never resize the input list)."""


class WindowedStage(Stage, Protocol):
    """A stage that also emits on time (e.g. aggregate windows)."""

    def flush(self, now: float) -> list[Envelope]:
        """Envelopes due at wall-clock ``now``, for the following stages and the sinks."""


@dataclass
class StageContext:
    """What stages may use while they are built."""

    config: Config
    registry: DeviceRegistry
    metrics: Metrics
    schemas: dict[str, Schema]
    sinks: Mapping[str, Sink] | None = None
    """The sinks pipelines write to, which the caller flushes and closes. ``None``: those
    ``build_sinks(config, metrics)`` returns for this config and metrics (the same objects
    on every call)."""


class StageFactory(Protocol):
    """A registered stage type: its ``Options`` Struct (``forbid_unknown_fields=True``) is
    decoded from the stage table, then it is called with the options and the context."""

    Options: type[msgspec.Struct]

    def __call__(self, options: Any, context: StageContext) -> Stage: ...


@dataclass(frozen=True)
class Isolation:
    """An ``isolate = true`` stage: what a worker process needs to build it again."""

    factory: StageFactory
    options: Any
    """The decoded ``factory.Options``."""
    context: StageContext
    """The build context; a worker process gets its config, registry and schemas only."""
    timeout_s: float | None = None
    """Longest it may run on one batch; ``None``: ``retry.stage_timeout_s``."""


PIPELINE_KEYS = ("type", "isolate", "timeout_s")
"""Keys of a stage table that are not the stage's own options."""

STAGES: dict[str, StageFactory]
"""Stage types by name: the built-ins and the ``iot_gateway.stages`` entry points."""
BROKEN_STAGES: dict[str, str]
"""Entry points that failed to load: name → why."""
STAGES, BROKEN_STAGES = load_plugins("iot_gateway.stages", BUILTIN_STAGES)


class Pipeline:
    """A named sequence of stages, then the sinks."""

    __slots__ = ("_processes", "_unrouted", "_warned", "_windowed", "isolation", "name", "sinks",
                 "stage_types", "stages")

    def __init__(self, name: str, stages: list[Stage], sinks: Mapping[str, Sink],
                 metrics: Metrics, *, stage_types: Sequence[str] | None = None,
                 isolation: Sequence[Isolation | None] | None = None) -> None:
        self.name = name
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.sinks = sinks
        self.stage_types: tuple[str, ...] = (
            tuple(stage_types) if stage_types is not None
            else tuple(type(stage).__name__ for stage in stages))
        """Each stage's registered type name (``"transform"``): its label in metrics."""
        self.isolation: tuple[Isolation | None, ...] = (
            tuple(isolation) if isolation is not None else (None,) * len(stages))
        """Per stage: how to run it in a worker process, or ``None`` (in the event loop)."""
        if len(self.stage_types) != len(stages) or len(self.isolation) != len(stages):
            raise ValueError("stage_types and isolation must have one entry per stage")
        self._processes = tuple(stage.process for stage in stages)
        self._windowed = tuple((i, cast(WindowedStage, stage)) for i, stage in enumerate(stages)
                               if callable(getattr(stage, "flush", None)))
        self._unrouted = metrics.pipeline_unrouted.labels(name)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {len(self.stages)} stages)"

    def run(self, batch: list[Envelope], start: int = 0) -> list[Envelope]:
        """Run the stages from ``start`` on, then deliver to the sinks; returns what was
        delivered (the batch, plus emitted aggregates, minus what a stage filtered out)."""
        for process in self._processes[start:]:
            batch = process(batch)
        self.deliver(batch)
        return batch

    def advance(self, batch: list[Envelope], start: int, stop: int) -> list[Envelope]:
        """Run stages ``start`` to ``stop - 1`` only and set ``env.stage = stop`` on the
        result, so that ``run(result, stop)`` finishes the work later (preemption)."""
        for process in self._processes[start:stop]:
            batch = process(batch)
        stop = min(stop, len(self._processes))
        for env in batch:
            env.stage = stop
        return batch

    def deliver(self, batch: list[Envelope]) -> None:
        """Hand each envelope to the sinks in ``env.sinks``: one ``write`` per sink."""
        if not batch:
            return
        first = batch[0].sinks
        for env in batch:
            if env.sinks is not first and env.sinks != first:
                break
        else:  # the usual case: the whole batch goes to the same sinks
            if first:
                self._write(first, batch)
            else:
                self._unrouted.inc(len(batch))
            return
        groups: dict[str, list[Envelope]] = {}
        unrouted = 0
        for env in batch:
            if not env.sinks:
                unrouted += 1
            for name in env.sinks:
                group = groups.get(name)
                if group is None:
                    groups[name] = [env]
                else:
                    group.append(env)
        if unrouted:
            self._unrouted.inc(unrouted)
        for name, group in groups.items():
            self._write((name,), group)

    def _write(self, names: tuple[str, ...], batch: list[Envelope]) -> None:
        sinks = self.sinks
        for name in names:
            sink = sinks.get(name)
            if sink is None:  # a third-party stage named a sink that does not exist
                self._unrouted.inc(len(batch))
                if name not in self._warned:
                    self._warned.add(name)
                    log.error("pipeline %s: no sink named %r; its messages are dropped",
                              self.name, name)
                continue
            sink.write(batch)

    def flush(self, now: float) -> list[Envelope]:
        """Let time-based stages emit what is due at wall-clock ``now`` (pass ``math.inf``
        at shutdown to close every window); the emitted envelopes go through the following
        stages and to the sinks, and are returned."""
        delivered: list[Envelope] = []
        for index, stage in self._windowed:
            emitted = stage.flush(now)
            if emitted:
                for process in self._processes[index + 1:]:
                    emitted = process(emitted)
                self.deliver(emitted)
                delivered.extend(emitted)
        return delivered


def build_stage(where: str, table: Mapping[str, Any], context: StageContext) -> Stage:
    """One stage from its config table; ``where`` (``pipelines[i].stages[j]``) prefixes
    errors. ``isolate`` and ``timeout_s`` are checked, then left to the pipeline."""
    return _build_stage(where, table, context)[0]


def _build_stage(where: str, table: Mapping[str, Any],
                 context: StageContext) -> tuple[Stage, str, Isolation | None]:
    """(the stage, its type name, its isolation or ``None``)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected object, got {type(table).__name__}")
    stage_type = table.get("type")
    if stage_type is None:
        raise ConfigError(f"{where}.type: required")
    if not isinstance(stage_type, str):
        raise ConfigError(f"{where}.type: expected str, got {type(stage_type).__name__}")
    factory = STAGES.get(stage_type)
    if factory is None:
        if stage_type in BROKEN_STAGES:
            raise ConfigError(f"{where}.type: stage {stage_type!r} could not be loaded: "
                              f"{BROKEN_STAGES[stage_type]}")
        raise ConfigError(f"{where}.type: unknown stage {stage_type!r} "
                          f"(known: {', '.join(sorted(STAGES))})")
    isolate = table.get("isolate", False)
    if not isinstance(isolate, bool):
        raise ConfigError(f"{where}.isolate: expected bool, got {type(isolate).__name__}")
    timeout_s = table.get("timeout_s")
    if timeout_s is not None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise ConfigError(f"{where}.timeout_s: expected number, got "
                              f"{type(timeout_s).__name__}")
        if not 0 < timeout_s < math.inf:
            raise ConfigError(f"{where}.timeout_s: expected > 0")
        if not isolate:
            raise ConfigError(f"{where}.timeout_s: only an isolated stage (isolate = true) "
                              "can be timed out")
    raw = {k: v for k, v in table.items() if k not in PIPELINE_KEYS}
    try:
        options = msgspec.convert(raw, factory.Options)
    except msgspec.ValidationError as err:
        raise ConfigError(format_validation_error(where, err)) from None
    try:
        stage = factory(options, context)
    except OptionError as err:
        raise ConfigError(f"{where}.{err.field}: {err.message}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None
    if not isolate:
        return stage, stage_type, None
    if callable(getattr(stage, "flush", None)):
        raise ConfigError(f"{where}.isolate: stage {stage_type!r} emits on time and keeps its "
                          "windows in the gateway's process; it cannot be isolated")
    try:  # a worker process gets them by pickle: the factory must be importable by name
        pickle.dumps((factory, options))
    except Exception as err:
        raise ConfigError(f"{where}.isolate: stage {stage_type!r} cannot be sent to a worker "
                          f"process: {err}") from None
    return stage, stage_type, Isolation(factory, options, context,
                                        float(timeout_s) if timeout_s is not None else None)


def build_pipelines(config: Config, context: StageContext) -> dict[str, Pipeline]:
    """Tier name → the pipeline serving it, in the config's tier order.

    A pipeline with ``tiers`` serves those; the first pipeline without ``tiers`` serves all
    the others. A tier no pipeline serves is absent from the result.
    """
    if context.sinks is None:
        context = replace(context, sinks=build_sinks(config, context.metrics))
    sinks = context.sinks
    assert sinks is not None
    by_tier: dict[str, Pipeline] = {}
    claimed: dict[str, int] = {}
    names: dict[str, int] = {}
    fallback: Pipeline | None = None
    fallback_index = -1
    for i, spec in enumerate(config.pipelines):
        if spec.name in names:
            raise ConfigError(f"pipelines[{i}].name: {spec.name!r} is already the name of "
                              f"pipelines[{names[spec.name]}]")
        names[spec.name] = i
        built = [_build_stage(f"pipelines[{i}].stages[{j}]", table, context)
                 for j, table in enumerate(spec.stages)]
        pipeline = Pipeline(spec.name, [stage for stage, _, _ in built], sinks, context.metrics,
                            stage_types=[name for _, name, _ in built],
                            isolation=[isolation for _, _, isolation in built])
        if spec.tiers is None:
            if fallback is not None:
                raise ConfigError(f"pipelines[{i}].tiers: required (pipelines[{fallback_index}]"
                                  " already serves the tiers no other pipeline names)")
            fallback, fallback_index = pipeline, i
            continue
        for tier in spec.tiers:
            if tier in claimed:
                raise ConfigError(f"pipelines[{i}].tiers: tier {tier!r} is already served by "
                                  f"pipelines[{claimed[tier]}]")
            claimed[tier] = i
            by_tier[tier] = pipeline
    result: dict[str, Pipeline] = {}
    for tier in config.tier_names:
        served = by_tier.get(tier, fallback)
        if served is not None:
            result[tier] = served
    return result


def validate_pipelines(config: Config) -> None:
    """Build the sinks and pipelines of ``config`` against an empty device registry and
    throwaway metrics (nothing is opened or written); raise ``ConfigError`` if invalid."""
    context = StageContext(config=config, registry=DeviceRegistry.empty(), metrics=Metrics(),
                           schemas=config.schemas)
    build_pipelines(config, context)
