"""Pipelines from config: building (and its errors), running, delivery, preemption, plugins."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import msgspec
import pytest

import gateway.pipeline
from gateway.config import Config, default_config_path, load_config, parse_config
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import (
    STAGES,
    Pipeline,
    StageContext,
    build_pipelines,
    build_stage,
    validate_pipelines,
)
from gateway.registry import DeviceInfo, DeviceRegistry
from gateway.sinks import Sink, build_sinks, load_plugins

TIERS = """
[[tiers]]
name = "critical"
max_latency_ms = 100
[[tiers]]
name = "premium"
max_latency_ms = 500
[[tiers]]
name = "standard"
max_latency_ms = 1000
"""


class Recorder:
    """A sink that remembers each write."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []

    def write(self, batch: list[Envelope]) -> None:
        self.writes.append([e.id for e in batch])

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


def context_for(config: Config, sinks: dict[str, Sink] | None = None,
                registry: DeviceRegistry | None = None) -> StageContext:
    return StageContext(config=config, registry=registry or DeviceRegistry.empty(),
                        metrics=Metrics(), schemas=config.schemas,
                        sinks=sinks if sinks is not None else {"lake": Recorder()})


def build(text: str, **kw: Any) -> dict[str, Pipeline]:
    config = parse_config(TIERS + text)
    return build_pipelines(config, context_for(config, **kw))


def env(i: int, *, payload: bytes = b'{"temp": 212}', tier: str = "standard",
        device: str = "dev-1", at: float = 7200.0, topic: str = "sensors/t") -> Envelope:
    return Envelope(id=f"m{i}", device=device, tenant="acme", tier=tier, region="",
                    topic=topic, payload=payload, received_ns=i, received_at=at)


# -- building ------------------------------------------------------------------------------


def test_tiers_map_to_pipelines_with_a_fallback() -> None:
    pipelines = build("""
[[pipelines]]
name = "fast"
tiers = ["critical"]
stages = [{ type = "route" }]
[[pipelines]]
name = "rest"
stages = [{ type = "decode" }, { type = "route" }]
""")
    assert {t: p.name for t, p in pipelines.items()} == {
        "critical": "fast", "premium": "rest", "standard": "rest"}
    assert list(pipelines) == ["critical", "premium", "standard"]
    assert len(pipelines["standard"]) == 2
    assert repr(pipelines["standard"]) == "Pipeline('rest', 2 stages)"


def test_tiers_without_a_pipeline_are_absent() -> None:
    pipelines = build("""
[[pipelines]]
name = "only"
tiers = ["premium"]
stages = []
""")
    assert list(pipelines) == ["premium"]
    assert build("") == {}


@pytest.mark.parametrize(("text", "error"), [
    ("""[[pipelines]]
name = "p"
stages = [{ type = "decode" }, { type = "foo" }]""",
     r"^pipelines\[0\]\.stages\[1\]\.type: unknown stage 'foo' \(known: aggregate, decode, "
     r"enrich, route, transform, validate\)$"),
    ("""[[pipelines]]
name = "p"
stages = [{ type = "decode" }, { type = "route" }, { type = "transform", rename = 3 }]""",
     r"^pipelines\[0\]\.stages\[2\]\.rename: expected object, got int$"),
    ("""[[pipelines]]
name = "p"
stages = [{ type = "transform", renmae = {} }]""",
     r"^pipelines\[0\]\.stages\[0\]\.renmae: unknown field$"),
    ("""[[pipelines]]
name = "p"
stages = [{ sinks = ["lake"] }]""", r"^pipelines\[0\]\.stages\[0\]\.type: required$"),
    ("""[[pipelines]]
name = "p"
stages = [{ type = 3 }]""", r"^pipelines\[0\]\.stages\[0\]\.type: expected str, got int$"),
    ("""[[pipelines]]
name = "p"
stages = []
[[pipelines]]
name = "q"
stages = [{ type = "validate", on_invalid = "explode" }]""",
     r"^pipelines\[1\]\.stages\[0\]\.on_invalid: invalid enum value 'explode'$"),
    ("""[[pipelines]]
name = "p"
stages = []
[[pipelines]]
name = "p"
stages = []""", r"^pipelines\[1\]\.name: 'p' is already the name of pipelines\[0\]$"),
    ("""[[pipelines]]
name = "p"
stages = []
[[pipelines]]
name = "q"
stages = []""", r"^pipelines\[1\]\.tiers: required \(pipelines\[0\] already serves"),
    ("""[[pipelines]]
name = "p"
tiers = ["critical", "premium"]
stages = []
[[pipelines]]
name = "q"
tiers = ["premium"]
stages = []""",
     r"^pipelines\[1\]\.tiers: tier 'premium' is already served by pipelines\[0\]$"),
])
def test_config_errors_name_the_place(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        build(text)


def test_build_stage_rejects_a_non_table() -> None:
    config = parse_config(TIERS)
    with pytest.raises(ConfigError, match=r"^here: expected object, got list$"):
        build_stage("here", [], context_for(config))  # type: ignore[arg-type]


def test_validate_pipelines_checks_sinks_and_stages(tmp_path: Path) -> None:
    validate_pipelines(load_config(default_config_path()))  # the shipped default is valid
    config = parse_config(TIERS + f"""
[[pipelines]]
name = "p"
stages = [{{ type = "route", sinks = ["lake", "archive"] }}]
[sinks.lake]
type = "jsonl"
options = {{ dir = "{tmp_path / 'lake'}" }}
""")
    with pytest.raises(ConfigError, match=r"^pipelines\[0\]\.stages\[0\]\.sinks: unknown sink "
                                          r"'archive' \(known: lake\)$"):
        validate_pipelines(config)
    assert not (tmp_path / "lake").exists()  # checking creates nothing


# -- running -------------------------------------------------------------------------------

FULL = """
[schemas.thermometer.fields]
temp = { type = "number", max = 100 }

[[pipelines]]
name = "main"
stages = [
  { type = "decode" },
  { type = "enrich" },
  { type = "validate" },
  { type = "transform", convert = { temp = "f_to_c" }, round = { temp = 2 } },
  { type = "route", sinks = ["lake"], rules = [
      { match = { tier = "critical" }, sinks = ["alerts", "lake"] } ] },
]
"""

REGISTRY = DeviceRegistry.from_devices({"dev-1": DeviceInfo(
    tenant="acme", tier="standard", device_class="thermometer", region="eu",
    attributes={"site": "plant-3"})})


async def test_a_batch_runs_through_every_stage_into_the_lake(tmp_path: Path) -> None:
    config = parse_config(TIERS + FULL + f"""
[sinks.lake]
type = "jsonl"
options = {{ dir = "{tmp_path}" }}
[sinks.alerts]
type = "null"
""")
    metrics = Metrics()
    sinks = build_sinks(config, metrics)
    context = StageContext(config=config, registry=REGISTRY, metrics=metrics,
                           schemas=config.schemas, sinks=sinks)
    pipeline = build_pipelines(config, context)["standard"]
    batch = [env(1), env(2, payload=b"\x01binary"), env(3, payload=b'{"temp": "hot"}')]
    assert pipeline.run(batch) is batch
    for sink in sinks.values():
        await sink.close()
    out = tmp_path / "region=eu/date=1970-01-01/hour=02/part-0.jsonl"
    records = [msgspec.json.decode(line) for line in out.read_bytes().splitlines()]
    assert [r["payload"] for r in records] == [{"temp": 100.0}, "AWJpbmFyeQ==", {"temp": "hot"}]
    assert records[0]["errors"] == ["temp: 212 is above the maximum 100"]
    assert records[0]["meta"] == {"site": "plant-3"}
    assert records[2]["errors"] == ["temp: expected number, got string"]
    assert {r["device_class"] for r in records} == {"thermometer"}


def test_delivery_is_one_write_per_sink_per_batch() -> None:
    lake, alerts = Recorder(), Recorder()
    pipeline = build(FULL, sinks={"lake": lake, "alerts": alerts})["critical"]
    mixed = [env(1, tier="critical"), env(2), env(3, tier="critical"), env(4)]
    pipeline.run(mixed)
    assert lake.writes == [["m1", "m2", "m3", "m4"]]
    assert alerts.writes == [["m1", "m3"]]
    same = [env(5, tier="critical"), env(6, tier="critical")]
    pipeline.run(same)
    assert lake.writes[-1] == ["m5", "m6"] and alerts.writes[-1] == ["m5", "m6"]
    pipeline.run([])
    assert len(lake.writes) == 2


def unrouted(pipeline: Pipeline, context_metrics: Metrics) -> float:
    value = context_metrics.registry.get_sample_value(
        "iotgw_pipeline_unrouted_total", {"pipeline": pipeline.name})
    return 0.0 if value is None else value


def test_messages_without_sinks_are_counted_not_lost_silently(
        caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(TIERS + """
[[pipelines]]
name = "p"
stages = [{ type = "route", rules = [{ match = { tier = "premium" }, sinks = [] }] }]
""")
    lake = Recorder()
    context = context_for(config, sinks={"lake": lake})
    pipeline = build_pipelines(config, context)["standard"]
    pipeline.run([env(1), env(2, tier="premium")])
    pipeline.run([env(3, tier="premium")])
    assert lake.writes == [["m1"]]
    assert unrouted(pipeline, context.metrics) == 2
    # A sink name no sink has (a third-party stage's mistake): counted and logged once.
    ghost = [env(4), env(5)]
    for e in ghost:
        e.sinks = ("ghost",)
    with caplog.at_level(logging.ERROR, logger="gateway.pipeline"):
        pipeline.deliver(ghost)
        pipeline.deliver(ghost)
    assert caplog.text.count("no sink named 'ghost'") == 1
    assert unrouted(pipeline, context.metrics) == 6


class Tally:
    """A stage counting the envelopes it saw (to show nothing runs twice)."""

    Options: ClassVar[type[msgspec.Struct]]

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[str] = []

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        self.seen.extend(e.id for e in batch)
        return batch


def test_preempted_batches_resume_at_the_stage_they_stopped() -> None:
    stages = [Tally("a"), Tally("b"), Tally("c")]
    lake = Recorder()
    pipeline = Pipeline("p", stages, {"lake": lake}, Metrics())  # type: ignore[arg-type]
    batch = [env(1), env(2)]
    for e in batch:
        e.sinks = ("lake",)
    partial = pipeline.advance(batch, 0, 2)
    assert [e.stage for e in partial] == [2, 2]
    assert lake.writes == []
    pipeline.run(partial, start=partial[0].stage)
    assert [s.seen for s in stages] == [["m1", "m2"]] * 3
    assert lake.writes == [["m1", "m2"]]
    assert [e.stage for e in pipeline.advance(batch, 2, 99)] == [3, 3]


async def test_aggregate_windows_reach_the_sinks_via_run_and_flush() -> None:
    lake = Recorder()
    pipelines = build("""
[[pipelines]]
name = "p"
stages = [
  { type = "decode" },
  { type = "aggregate", window_s = 60, fields = ["temp"], passthrough = false },
  { type = "route" },
]
""", sinks={"lake": lake})
    pipeline = pipelines["standard"]
    batch = [env(1, at=60.0), env(2, at=70.0, device="dev-2")]
    assert pipeline.run(batch) == []
    assert lake.writes == []
    out = pipeline.run([env(3, at=125.0)])
    assert [e.id for e in out] == ["dev-1-agg-60"]
    assert lake.writes == [["dev-1-agg-60"]]
    assert pipeline.flush(110.0) == []
    flushed = pipeline.flush(120.0)
    assert [e.id for e in flushed] == ["dev-2-agg-60"]
    assert flushed[0].sinks == ("lake",)  # the following stages ran on it
    assert [e.id for e in pipeline.flush(math.inf)] == ["dev-1-agg-120"]
    assert lake.writes == [["dev-1-agg-60"], ["dev-2-agg-60"], ["dev-1-agg-120"]]


# -- third-party stages --------------------------------------------------------------------


class UpperOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    field: str


class UpperStage:
    """A plugin: upper-cases one field of dict data."""

    Options: ClassVar[type[msgspec.Struct]] = UpperOptions

    def __init__(self, options: UpperOptions, context: StageContext) -> None:
        self.field = options.field

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        for e in batch:
            if isinstance(e.data, dict) and isinstance(e.data.get(self.field), str):
                e.data[self.field] = e.data[self.field].upper()
        return batch


def test_a_stage_from_an_entry_point_is_built_from_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    module = ModuleType("acme_gateway_plugins")
    module.UpperStage = UpperStage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "acme_gateway_plugins", module)

    def entry_points(group: str) -> Iterator[EntryPoint]:
        assert group == "iot_gateway.stages"
        yield EntryPoint("upper", "acme_gateway_plugins:UpperStage", group)
        yield EntryPoint("broken", "acme_gateway_plugins:Nope", group)

    stages, broken = load_plugins("iot_gateway.stages", STAGES, entry_points=entry_points)
    monkeypatch.setattr(gateway.pipeline, "STAGES", stages)
    monkeypatch.setattr(gateway.pipeline, "BROKEN_STAGES", broken)
    lake = Recorder()
    pipeline = build("""
[[pipelines]]
name = "p"
stages = [{ type = "decode" }, { type = "upper", field = "state" }, { type = "route" }]
""", sinks={"lake": lake})["standard"]
    (out,) = pipeline.run([env(1, payload=b'{"state": "ok"}')])
    assert out.data == {"state": "OK"}
    with pytest.raises(ConfigError, match=r"^pipelines\[0\]\.stages\[1\]\.field: required$"):
        build("""
[[pipelines]]
name = "p"
stages = [{ type = "decode" }, { type = "upper" }]
""")
    with pytest.raises(ConfigError, match=r"^pipelines\[0\]\.stages\[0\]\.type: stage 'broken' "
                                          r"could not be loaded: AttributeError"):
        build("""
[[pipelines]]
name = "p"
stages = [{ type = "broken" }]
""")


def test_a_stage_factory_raising_value_error_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Fussy(UpperStage):
        def __init__(self, options: UpperOptions, context: StageContext) -> None:
            raise ValueError("field must name a string field")

    monkeypatch.setitem(STAGES, "fussy", Fussy)
    with pytest.raises(ConfigError, match=r"^pipelines\[0\]\.stages\[0\]: field must name"):
        build("""
[[pipelines]]
name = "p"
stages = [{ type = "fussy", field = "x" }]
""")


async def test_without_explicit_sinks_pipelines_write_to_the_sinks_build_sinks_gave(
        tmp_path: Path) -> None:
    config = parse_config(TIERS + f"""
[[pipelines]]
name = "p"
stages = [{{ type = "route" }}]
[sinks.lake]
type = "jsonl"
options = {{ dir = "{tmp_path}" }}
""")
    metrics = Metrics()
    sinks = build_sinks(config, metrics)  # what the application flushes and closes
    assert build_sinks(config, metrics) is sinks
    context = StageContext(config=config, registry=DeviceRegistry.empty(), metrics=metrics,
                           schemas=config.schemas)
    pipeline = build_pipelines(config, context)["standard"]
    assert pipeline.sinks is sinks
    pipeline.run([env(1)])
    await sinks["lake"].close()
    assert len(list(tmp_path.rglob("part-0.jsonl"))) == 1
    # Another config (a reload) gets sinks of its own.
    assert build_sinks(parse_config(TIERS), metrics) == {}
