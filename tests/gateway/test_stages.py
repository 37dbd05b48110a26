"""The built-in stages, each built from its table as a config would give it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.stages
from gateway.config import parse_config
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import Stage, StageContext, build_stage
from gateway.registry import DeviceInfo, DeviceRegistry
from gateway.sinks import NullOptions, NullSink
from gateway.stages import AggregateStage

BASE = """
[[tiers]]
name = "critical"
max_latency_ms = 100
[[tiers]]
name = "standard"
max_latency_ms = 1000

[schemas.thermometer]
allow_extra = false
[schemas.thermometer.fields]
temperature = { type = "number", min = -40, max = 85, required = true }
unit = { type = "string" }
count = { type = "integer", min = 0 }
ok = { type = "boolean" }
tags = { type = "array" }
extra = { type = "object" }

[schemas.meter.fields]
kwh = { type = "number", min = 0 }
"""


def make_context(config_text: str = BASE, registry: DeviceRegistry | None = None,
                 sinks: tuple[str, ...] = ("lake", "alerts", "archive")) -> StageContext:
    config = parse_config(config_text)
    metrics = Metrics()
    return StageContext(config=config, registry=registry or DeviceRegistry.empty(),
                        metrics=metrics, schemas=config.schemas,
                        sinks={name: NullSink(name, NullOptions(), metrics) for name in sinks})


def stage(table: dict[str, Any], context: StageContext | None = None) -> Stage:
    return build_stage("pipelines[0].stages[0]", table, context or make_context())


def env(i: int = 0, *, data: Any = None, payload: bytes = b"{}", tier: str = "standard",
        device: str | None = None, device_class: str = "thermometer", at: float = 1000.0,
        **fields: Any) -> Envelope:
    return Envelope(id=f"m{i}", device=device or f"dev-{i}", tenant="acme", tier=tier,
                    region=fields.pop("region", "eu"), topic=fields.pop("topic", "s/t"),
                    payload=payload, received_ns=i, received_at=at,
                    device_class=device_class, data=data, **fields)


def count(context: StageContext, name: str, labels: dict[str, str]) -> float:
    value = context.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- decode --------------------------------------------------------------------------------


def test_decode_json_and_keep_what_is_not() -> None:
    context = make_context()
    decode = stage({"type": "decode"}, context)
    batch = [env(1, payload=b'{"t": 1}'), env(2, payload=b"\x00garbage"),
             env(3, payload=memoryview(b"[1, 2]")),  # type: ignore[arg-type]
             env(4, payload=b"{broken", tier="standard"), env(5, payload=b"x", data={"k": 1})]
    assert decode.process(batch) is batch
    assert [e.data for e in batch] == [{"t": 1}, None, [1, 2], None, {"k": 1}]
    assert count(context, "iotgw_payload_decode_errors_total", {"tier": "standard"}) == 2


def test_decode_counts_per_tier_when_a_batch_mixes_them() -> None:
    context = make_context()
    decode = stage({"type": "decode"}, context)
    decode.process([env(1, payload=b"x", tier="critical"), env(2, payload=b"y")])
    assert count(context, "iotgw_payload_decode_errors_total", {"tier": "critical"}) == 1
    assert count(context, "iotgw_payload_decode_errors_total", {"tier": "standard"}) == 1


# -- validate ------------------------------------------------------------------------------


def test_validate_marks_out_of_range_and_counts_per_class() -> None:
    context = make_context()
    validate = stage({"type": "validate"}, context)
    good = env(1, data={"temperature": 21.5, "unit": "C", "count": 3, "ok": True,
                        "tags": [], "extra": {}})
    hot = env(2, data={"temperature": 120})
    cold = env(3, data={"temperature": -41.5, "count": -1})
    batch = [good, hot, cold]
    assert validate.process(batch) is batch
    assert good.errors is None
    assert hot.errors == ["temperature: 120 is above the maximum 85"]
    assert cold.errors == ["temperature: -41.5 is below the minimum -40",
                           "count: -1 is below the minimum 0"]
    assert hot.data == {"temperature": 120}  # marked, not changed
    assert count(context, "iotgw_validation_failures_total", {"device_class": "thermometer"}) == 2


def test_validate_types_required_and_extra_fields() -> None:
    validate = stage({"type": "validate"})
    e = env(1, data={"unit": 3, "count": 2.5, "ok": 1, "tags": {}, "extra": [],
                     "surprise": None})
    whole_float = env(2, data={"temperature": 20, "count": 4.0})
    boolean_number = env(3, data={"temperature": True})
    validate.process([e, whole_float, boolean_number])
    assert e.errors == [
        "temperature: required", "unit: expected string, got integer",
        "count: expected integer, got number", "ok: expected boolean, got integer",
        "tags: expected array, got object", "extra: expected object, got array",
        "surprise: unexpected field"]
    assert whole_float.errors is None  # 4.0 is an integer, as in JSON Schema
    assert boolean_number.errors == ["temperature: expected number, got boolean"]


def test_validate_drop_field_removes_offending_fields_and_appends_errors() -> None:
    validate = stage({"type": "validate", "on_invalid": "drop_field"})
    e = env(1, data={"temperature": 99, "unit": "C", "surprise": 1}, errors=["earlier"])
    validate.process([e])
    assert e.data == {"unit": "C"}
    assert e.errors == ["earlier", "temperature: 99 is above the maximum 85",
                        "surprise: unexpected field"]


def test_validate_passes_what_it_has_no_schema_for() -> None:
    context = make_context()
    validate = stage({"type": "validate"}, context)
    batch = [env(1, data={"anything": 1}, device_class="unknown"),
             env(2, data=[1, 2]), env(3, data=None), env(4, data={"kwh": 2}, device_class="meter")]
    validate.process(batch)
    assert all(e.errors is None for e in batch)
    assert batch[0].data == {"anything": 1}  # allow_extra defaults to true: meter extra ok
    nothing = stage({"type": "validate"}, make_context(BASE.split("[schemas")[0]))
    assert nothing.process(batch) is batch


@pytest.mark.parametrize(("field", "error"), [
    ('name = { type = "string", min = 1 }',
     r"^schemas\.c\.fields\.name: min and max apply to number and integer fields only"),
    ("v = { min = 5, max = 1 }", r"^schemas\.c\.fields\.v: min 5 is above max 1$"),
])
def test_schema_mistakes_are_config_errors(field: str, error: str) -> None:
    context = make_context(BASE.split("[schemas")[0] + "[schemas.c.fields]\n" + field)
    with pytest.raises(ConfigError, match=error):
        stage({"type": "validate"}, context)


# -- enrich --------------------------------------------------------------------------------

REGISTRY = DeviceRegistry.from_devices({
    "dev-1": DeviceInfo(tenant="acme", tier="critical", device_class="thermometer",
                        region="eu", attributes={"site": "plant-3", "model": "TX-9"}),
    "dev-2": DeviceInfo(tenant="acme", tier="standard", device_class="meter", region="us"),
})


def test_enrich_copies_attributes_and_fills_empty_class_and_region() -> None:
    enrich = stage({"type": "enrich"}, make_context(registry=REGISTRY))
    a = env(1, device="dev-1", device_class="", region="")
    b = env(2, device="dev-1", device_class="custom", region="ap")
    c = env(3, device="dev-2", device_class="")
    unknown = env(4, device="nobody", device_class="")
    assert enrich.process([a, b, c, unknown]) == [a, b, c, unknown]
    assert a.meta == {"site": "plant-3", "model": "TX-9"}
    assert (a.device_class, a.region) == ("thermometer", "eu")
    assert (b.device_class, b.region) == ("custom", "ap")  # set values are kept
    assert c.meta is None and c.device_class == "meter"
    assert unknown.meta is None and unknown.device_class == ""
    # Each envelope gets its own dict.
    assert a.meta is not b.meta
    a.meta["site"] = "moved"
    assert b.meta == {"site": "plant-3", "model": "TX-9"}


def test_enrich_selected_fields_and_earlier_meta_wins() -> None:
    enrich = stage({"type": "enrich", "fields": ["site", "missing"]},
                   make_context(registry=REGISTRY))
    e = env(1, device="dev-1", meta={"site": "override", "other": 1})
    enrich.process([e])
    assert e.meta == {"site": "override", "other": 1}
    f = env(2, device="dev-1")
    enrich.process([f])
    assert f.meta == {"site": "plant-3"}


def test_enrich_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.stages, "CACHE_LIMIT", 1)
    enrich = stage({"type": "enrich"}, make_context(registry=REGISTRY))
    batch = [env(i, device=d) for i, d in enumerate(["dev-1", "dev-2", "dev-1", "x", "dev-1"])]
    enrich.process(batch)
    assert [e.meta for e in batch] == [{"site": "plant-3", "model": "TX-9"}, None,
                                       {"site": "plant-3", "model": "TX-9"}, None,
                                       {"site": "plant-3", "model": "TX-9"}]


def test_enrich_without_a_registry_does_nothing() -> None:
    batch = [env(1, device="dev-1")]
    assert stage({"type": "enrich"}).process(batch) is batch
    assert batch[0].meta is None


# -- transform -----------------------------------------------------------------------------


def test_transform_converts_100_f_to_37_78_c() -> None:
    transform = stage({"type": "transform", "convert": {"temp": "f_to_c"},
                       "round": {"temp": 2}})
    e = env(1, data={"temp": 100})
    transform.process([e])
    assert e.data == {"temp": 37.78}


@pytest.mark.parametrize(("conversion", "value", "expected"), [
    ("c_to_f", 100, 212.0), ("f_to_c", 100, 37.7778), ("k_to_c", 0, -273.15),
    ("c_to_k", 25, 298.15), ("kpa_to_psi", 100, 14.5038), ("psi_to_kpa", 1, 6.8948),
    ("ms_to_s", 1500, 1.5), ("s_to_ms", 2, 2000.0), ("mph_to_kmh", 60, 96.5606),
    ("kmh_to_mph", 100, 62.1371),
])
def test_conversions(conversion: str, value: float, expected: float) -> None:
    e = env(1, data={"v": value})
    stage({"type": "transform", "convert": {"v": conversion}}).process([e])
    assert e.data["v"] == pytest.approx(expected, abs=1e-4)


def test_transform_rename_scale_drop_in_order() -> None:
    transform = stage({"type": "transform", "rename": {"t": "temperature_c", "p": "pressure"},
                       "convert": {"temperature_c": "c_to_f"},
                       "scale": {"pressure": {"factor": 0.5, "offset": 1}, "level": {}},
                       "drop": ["secret", "absent"]})
    e = env(1, data={"t": 10, "p": 4.0, "level": 3, "secret": "x", "label": "keep"})
    text = env(2, data={"t": "warm", "p": None, "level": True})
    raw = env(3, data=[1, 2])
    transform.process([e, text, raw])
    assert e.data == {"level": 3.0, "label": "keep", "temperature_c": 50.0, "pressure": 3.0}
    assert text.data == {"level": True, "temperature_c": "warm", "pressure": None}
    assert raw.data == [1, 2]


def test_transform_without_operations_returns_at_once() -> None:
    batch = [env(1, data={"a": 1})]
    assert stage({"type": "transform"}).process(batch) is batch


@pytest.mark.parametrize(("table", "error"), [
    ({"rename": 3}, r"^pipelines\[0\]\.stages\[0\]\.rename: expected object, got int$"),
    ({"convert": {"t": "c_to_x"}},
     r"^pipelines\[0\]\.stages\[0\]\.convert\.t: unknown conversion 'c_to_x' \(known: c_to_f, "),
    ({"rename": {"t": "temp"}, "convert": {"t": "c_to_f"}},
     r"^pipelines\[0\]\.stages\[0\]\.convert\.t: 't' is renamed to 'temp' first; use the new "
     r"name$"),
    ({"scale": {"t": {"factr": 2}}},
     r"^pipelines\[0\]\.stages\[0\]\.scale\[\.\.\.\]\.factr: unknown field$"),
    ({"round": {"t": 20}}, r"round\[\.\.\.\]: expected int <= 15"),
])
def test_transform_option_errors(table: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        stage({"type": "transform", **table})


# -- aggregate -----------------------------------------------------------------------------


def reading(i: int, at: float, device: str = "dev-1", **data: Any) -> Envelope:
    return env(i, device=device, data=data, at=at, topic=f"sensors/{device}",
               sinks=("lake",))


def test_aggregate_emits_a_closed_window_and_nothing_for_an_open_one() -> None:
    agg = stage({"type": "aggregate", "window_s": 60, "fields": ["t", "h"]})
    first = [reading(1, 1200.0, t=20), reading(2, 1210.0, t=24, h=50),
             reading(3, 1259.9, t=22.5, h="n/a")]
    assert agg.process(first) is first  # window [1200, 1260) still open: nothing
    later = [reading(4, 1260.0, t=30)]
    out = agg.process(later)
    assert out[:1] == later and len(out) == 2
    record = out[1]
    assert record.id == "dev-1-agg-1200"
    assert record.topic == "sensors/dev-1/aggregate"
    assert record.received_at == 1200.0
    assert (record.tenant, record.tier, record.region, record.device_class, record.sinks) == (
        "acme", "standard", "eu", "thermometer", ("lake",))
    assert record.data == {
        "window_start": 1200.0, "window_end": 1260.0, "messages": 3,
        "fields": {"t": {"count": 3, "min": 20, "max": 24, "mean": pytest.approx(22.1666667),
                         "sum": 66.5},
                   "h": {"count": 1, "min": 50, "max": 50, "mean": 50.0, "sum": 50}}}
    assert record.payload.startswith(b'{"window_start":1200.0')


def test_aggregate_flush_closes_windows_by_wall_clock() -> None:
    agg = stage({"type": "aggregate", "window_s": 10, "fields": ["t"]})
    assert isinstance(agg, AggregateStage)
    agg.process([reading(1, 100.5, t=1), reading(2, 103.0, device="dev-2", t=5),
                 reading(3, 111.0, device="dev-3", t=7)])
    assert agg.flush(109.9) == []
    assert agg.flush(105.0) == []
    closed = agg.flush(110.0)
    assert sorted(e.id for e in closed) == ["dev-1-agg-100", "dev-2-agg-100"]
    assert agg.flush(110.0) == []  # already emitted, and forgotten
    assert [e.id for e in agg.flush(math.inf)] == ["dev-3-agg-110"]
    assert agg.flush(math.inf) == []


def test_aggregate_without_passthrough_and_fractional_windows() -> None:
    agg = stage({"type": "aggregate", "window_s": 0.5, "fields": ["t"], "passthrough": False})
    assert isinstance(agg, AggregateStage)
    assert agg.process([reading(1, 10.1, t=1), env(9, data="not a dict")]) == []
    out = agg.process([reading(2, 10.6, t=2)])
    assert [e.id for e in out] == ["dev-1-agg-10.0"]
    # A late message (earlier window) counts in the open one; no field values: no stats.
    agg.process([reading(3, 10.2, h=1)])
    (record,) = agg.flush(11.0)
    assert record.id == "dev-1-agg-10.5"
    assert record.data["messages"] == 2 and record.data["fields"] == {"t": {
        "count": 1, "min": 2, "max": 2, "mean": 2.0, "sum": 2}}


@pytest.mark.parametrize(("table", "error"), [
    ({}, r"^pipelines\[0\]\.stages\[0\]\.fields: required$"),
    ({"fields": []}, r"\.fields: expected array of length >= 1$"),
    ({"fields": ["t"], "window_s": 0}, r"\.window_s: expected float > 0"),
    ({"fields": ["t", "t"]}, r"^pipelines\[0\]\.stages\[0\]: fields must be unique$"),
])
def test_aggregate_option_errors(table: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        stage({"type": "aggregate", **table})


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 100),
                          st.one_of(st.integers(-50, 50), st.floats(-1e3, 1e3),
                                    st.text(max_size=1))),
                max_size=40),
       st.sampled_from([1.0, 7.0, 30.0]))
def test_aggregate_matches_a_plain_computation(
        events: list[tuple[str, float, Any]], window: float) -> None:
    events.sort(key=lambda e: e[1])  # in arrival order
    agg = stage({"type": "aggregate", "window_s": window, "fields": ["v"]})
    assert isinstance(agg, AggregateStage)
    out: list[Envelope] = []
    for i, (device, at, value) in enumerate(events):
        out += agg.process([reading(i, at, device=device, v=value)])[1:]
    out += agg.flush(math.inf)
    expected: dict[str, dict[str, Any]] = {}
    for device, at, value in events:
        start = (at // window) * window
        key = f"{device}-agg-{int(start)}"
        entry = expected.setdefault(key, {"messages": 0, "values": []})
        entry["messages"] += 1
        if not isinstance(value, str):
            entry["values"].append(value)
    assert sorted(e.id for e in out) == sorted(expected)
    for record in out:
        want = expected[record.id]
        assert record.data["messages"] == want["messages"]
        values = want["values"]
        if not values:
            assert record.data["fields"] == {}
            continue
        stats = record.data["fields"]["v"]
        assert stats["count"] == len(values)
        assert stats["min"] == min(values) and stats["max"] == max(values)
        assert stats["sum"] == pytest.approx(math.fsum(values), abs=1e-6)
        assert stats["mean"] == pytest.approx(math.fsum(values) / len(values), abs=1e-6)


# -- route ---------------------------------------------------------------------------------


def test_route_default_and_first_matching_rule() -> None:
    route = stage({"type": "route", "sinks": ["lake"], "rules": [
        {"match": {"tier": "critical", "topic": "alerts/#"}, "sinks": ["alerts", "lake"]},
        {"match": {"device_class": "meter"}, "sinks": ["archive"]},
        {"match": {"tenant": "globex", "region": "us"}, "sinks": []},
        {"match": {"topic": "+/raw"}, "sinks": ["archive", "archive"]},
    ]})
    alert = env(1, tier="critical", topic="alerts/fire/3")
    alert_root = env(2, tier="critical", topic="alerts")
    standard_alert = env(3, tier="standard", topic="alerts/x")
    meter = env(4, tier="critical", topic="alerts/x", device_class="meter")
    meter_std = env(5, device_class="meter", topic="m")
    globex = env(6, region="us", topic="q")
    globex.tenant = "globex"
    raw = env(7, topic="x/raw")
    sys_raw = env(8, topic="$SYS/raw")
    batch = [alert, alert_root, standard_alert, meter, meter_std, globex, raw, sys_raw]
    route.process(batch)
    route.process(batch)  # again: from the topic cache
    assert [e.sinks for e in batch] == [
        ("alerts", "lake"), ("alerts", "lake"), ("lake",), ("alerts", "lake"), ("archive",),
        (), ("archive",), ("lake",)]


def test_route_without_rules_and_default_sinks() -> None:
    batch = [env(1), env(2)]
    stage({"type": "route"}).process(batch)
    assert [e.sinks for e in batch] == [("lake",), ("lake",)]
    assert batch[0].sinks is batch[1].sinks


def test_route_topic_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.stages, "CACHE_LIMIT", 2)
    route = stage({"type": "route", "rules": [{"match": {"topic": "a/+"}, "sinks": ["alerts"]}]})
    batch = [env(i, topic=t) for i, t in enumerate(["a/1", "b/1", "a/2", "a/1", "c"])]
    route.process(batch)
    assert [e.sinks for e in batch] == [("alerts",), ("lake",), ("alerts",), ("alerts",),
                                        ("lake",)]


@pytest.mark.parametrize(("table", "error"), [
    ({"sinks": ["nowhere"]}, r"^pipelines\[0\]\.stages\[0\]\.sinks: unknown sink 'nowhere' "
                             r"\(known: alerts, archive, lake\)$"),
    ({"rules": [{"match": {}, "sinks": ["lake"]}, {"match": {}, "sinks": ["x"]}]},
     r"\.rules\[1\]\.sinks: unknown sink 'x'"),
    ({"rules": [{"match": {"tier": "gold"}, "sinks": []}]},
     r"\.rules\[0\]\.match\.tier: unknown tier 'gold' \(known: critical, standard\)$"),
    ({"rules": [{"match": {"topic": "a/#/b"}, "sinks": []}]},
     r"\.rules\[0\]\.match: invalid topic filter 'a/#/b': '#' must be last$"),
    ({"rules": [{"match": {"topic": "a+"}, "sinks": []}]},
     r"invalid topic filter 'a\+': a wildcard must be a whole level$"),
    ({"rules": [{"match": {"topic": ""}, "sinks": []}]}, r"invalid topic filter '': empty"),
    ({"rules": [{"match": {"topics": "a"}, "sinks": []}]},
     r"\.rules\[0\]\.match\.topics: unknown field$"),
    ({"rules": [{"sinks": []}]}, r"\.rules\[0\]\.match: required$"),
])
def test_route_option_errors(table: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        stage({"type": "route", **table})


def test_route_with_no_sinks_configured_says_so() -> None:
    with pytest.raises(ConfigError, match=r"unknown sink 'lake' \(known: none\)"):
        stage({"type": "route"}, make_context(sinks=()))

