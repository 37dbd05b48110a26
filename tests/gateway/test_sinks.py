"""Sinks: the JSON-lines data lake (layout, records, rotation, failures) and the registry."""

from __future__ import annotations

import base64
import calendar
import logging
import os
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

import gateway.sinks
from gateway.config import parse_config
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.sinks import (
    SINKS,
    JsonLinesOptions,
    JsonLinesSink,
    NullOptions,
    NullSink,
    build_sinks,
    load_plugins,
)

# 2024-05-06 13:45:10.250000 UTC
T0 = calendar.timegm((2024, 5, 6, 13, 45, 10)) + 0.25


def env(i: int = 0, *, region: str = "eu", at: float = T0, payload: bytes = b'{"t": 21.5}',
        **fields: Any) -> Envelope:
    base: dict[str, Any] = dict(
        id=f"gw-1-{i}", device=f"dev-{i}", tenant="acme", tier="standard", region=region,
        topic=f"sensors/dev-{i}/temp", payload=payload, received_ns=i, received_at=at,
        protocol="mqtt", qos=1, device_class="thermometer")
    base.update(fields)
    return Envelope(**base)


def lake(tmp_path: Path, metrics: Metrics | None = None, **options: Any) -> JsonLinesSink:
    return JsonLinesSink("lake", JsonLinesOptions(dir=str(tmp_path / "lake"), **options),
                         metrics or Metrics())


def lines(path: Path) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jsonl"))


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_records_land_in_the_partition_of_their_utc_hour(tmp_path: Path) -> None:
    metrics = Metrics()
    sink = lake(tmp_path, metrics)
    sink.write([env(1), env(2, region="us", at=T0 + 3600), env(3)])
    assert files(tmp_path) == []  # buffered until flush
    await sink.flush()
    root = tmp_path / "lake"
    assert files(root) == ["region=eu/date=2024-05-06/hour=13/part-0.jsonl",
                           "region=us/date=2024-05-06/hour=14/part-0.jsonl"]
    first, third = lines(root / "region=eu/date=2024-05-06/hour=13/part-0.jsonl")
    assert first == {
        "id": "gw-1-1", "device": "dev-1", "tenant": "acme", "tier": "standard",
        "topic": "sensors/dev-1/temp", "received_at": "2024-05-06T13:45:10.250000Z",
        "qos": 1, "protocol": "mqtt", "region": "eu", "device_class": "thermometer",
        "payload_encoding": "json", "payload": {"t": 21.5}}
    assert third["id"] == "gw-1-3"
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 3
    await sink.close()


async def test_payloads_json_decoded_data_or_base64(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    raw = b"\x00\xffnot json"
    sink.write([
        env(1, payload=b'[1, 2, "x"]'),  # no decode stage ran: the sink decodes
        env(2, payload=raw),  # not JSON: base64 of the raw bytes
        env(3, payload=b'{"t": 1}', data={"t": 2}),  # a stage's data wins over the payload
        env(4, payload=b"null"),  # JSON null is JSON
        env(5, payload=b"", meta={"site": "plant-3"}, errors=["t: above max"]),
        env(6, at=float(calendar.timegm((2024, 5, 6, 13, 0, 0)))),
    ])
    await sink.close()
    records = lines(tmp_path / "lake/region=eu/date=2024-05-06/hour=13/part-0.jsonl")
    assert [(r["payload_encoding"], r["payload"]) for r in records] == [
        ("json", [1, 2, "x"]),
        ("base64", base64.b64encode(raw).decode()),
        ("json", {"t": 2}),
        ("json", None),
        ("base64", ""),
        ("json", {"t": 21.5}),
    ]
    assert records[4]["meta"] == {"site": "plant-3"}
    assert records[4]["errors"] == ["t: above max"]
    assert "meta" not in records[0] and "errors" not in records[0]
    # Microseconds are always written, even when zero.
    assert records[5]["received_at"] == "2024-05-06T13:00:00.000000Z"


async def test_unencodable_data_is_kept_as_base64_with_an_error(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    sink.write([env(1), env(2, payload=b"raw", data={"x": object()}, meta={"m": object()})])
    await sink.close()
    good, bad = lines(tmp_path / "lake/region=eu/date=2024-05-06/hour=13/part-0.jsonl")
    assert good["payload"] == {"t": 21.5}
    assert bad["payload_encoding"] == "base64"
    assert base64.b64decode(bad["payload"]) == b"raw"
    assert "meta" not in bad
    assert bad["errors"][0].startswith("payload: not JSON-encodable")
    assert bad["errors"][1] == "meta: not JSON-encodable, dropped"


async def test_rotation_by_size_keeps_whole_lines(tmp_path: Path) -> None:
    sink = lake(tmp_path, max_file_bytes=700)
    sink.write([env(i) for i in range(10)])
    await sink.flush()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    names = sorted(os.listdir(part_dir), key=lambda n: int(n[5:-6]))
    assert names[:2] == ["part-0.jsonl", "part-1.jsonl"]
    ids = [r["id"] for name in names for r in lines(part_dir / name)]
    assert ids == [f"gw-1-{i}" for i in range(10)]
    for name in names:
        assert (part_dir / name).stat().st_size <= 700
    # Later flushes continue in the last part, then rotate again.
    sink.write([env(i) for i in range(10, 14)])
    await sink.close()
    later = sorted(os.listdir(part_dir), key=lambda n: int(n[5:-6]))
    assert len(later) > len(names)
    ids = [r["id"] for name in later for r in lines(part_dir / name)]
    assert ids == [f"gw-1-{i}" for i in range(14)]


@pytest.mark.parametrize("writeback_bytes", [0, 1, 300])
async def test_paced_write_back_keeps_every_line_across_rotations(
        tmp_path: Path, writeback_bytes: int) -> None:
    # Write-back runs in a thread on its own copy of the descriptor: files rotated and closed
    # meanwhile must lose nothing.
    sink = lake(tmp_path, max_file_bytes=900, buffer_bytes=0, writeback_bytes=writeback_bytes)
    for start in range(0, 200, 7):
        sink.write([env(i) for i in range(start, min(start + 7, 200))])
    await sink.close()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    names = sorted(os.listdir(part_dir), key=lambda n: int(n[5:-6]))
    assert len(names) > 10
    ids = [r["id"] for name in names for r in lines(part_dir / name)]
    assert ids == [f"gw-1-{i}" for i in range(200)]


async def test_a_record_larger_than_the_file_limit_gets_a_file_of_its_own(
        tmp_path: Path) -> None:
    sink = lake(tmp_path, max_file_bytes=300)
    big = b'{"blob": "' + b"x" * 500 + b'"}'
    sink.write([env(1), env(2, payload=big), env(3)])
    await sink.close()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    contents = [[r["id"] for r in lines(part_dir / f"part-{n}.jsonl")] for n in range(3)]
    assert contents == [["gw-1-1"], ["gw-1-2"], ["gw-1-3"]]


async def test_a_restart_never_appends_to_an_earlier_part(tmp_path: Path) -> None:
    first = lake(tmp_path)
    first.write([env(1)])
    await first.close()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    before = (part_dir / "part-0.jsonl").read_bytes()
    (part_dir / "part-7.jsonl").write_bytes(b"")  # another process's part
    second = lake(tmp_path)
    second.write([env(2)])
    await second.close()
    assert (part_dir / "part-0.jsonl").read_bytes() == before
    assert [r["id"] for r in lines(part_dir / "part-8.jsonl")] == ["gw-1-2"]


async def test_a_part_taken_by_another_process_is_skipped(tmp_path: Path) -> None:
    a, b = lake(tmp_path, max_file_bytes=300), lake(tmp_path)
    a.write([env(1)])
    await a.flush()  # a: part-0
    b.write([env(2)])
    await b.flush()  # b: part-1, the next free one
    a.write([env(3), env(4)])
    await a.flush()  # a rotates: part-1 is taken (O_EXCL), so part-2
    await a.close()
    await b.close()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    assert [r["id"] for r in lines(part_dir / "part-0.jsonl")] == ["gw-1-1"]
    assert [r["id"] for r in lines(part_dir / "part-1.jsonl")] == ["gw-1-2"]
    assert [r["id"] for r in lines(part_dir / "part-2.jsonl")] == ["gw-1-3"]


async def test_unsafe_region_names_stay_one_path_component(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    sink.write([env(1, region="../etc"), env(2, region=""), env(3, region=".."),
                env(4, region="eu west/2")])
    await sink.close()
    assert files(tmp_path / "lake") == [
        "region=%2E%2E%2Fetc/date=2024-05-06/hour=13/part-0.jsonl",
        "region=%2E%2E/date=2024-05-06/hour=13/part-0.jsonl",
        "region=__HIVE_DEFAULT_PARTITION__/date=2024-05-06/hour=13/part-0.jsonl",
        "region=eu%20west%2F2/date=2024-05-06/hour=13/part-0.jsonl",
    ]


async def test_a_full_buffer_is_written_before_the_flush(tmp_path: Path) -> None:
    sink = lake(tmp_path, buffer_bytes=0)
    sink.write([env(1)])
    assert files(tmp_path / "lake") == ["region=eu/date=2024-05-06/hour=13/part-0.jsonl"]
    await sink.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_files_of_past_hours_are_closed_once_idle(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    baseline = open_fds()
    sink.write([env(1), env(2, region="us")])  # 2024: long past
    await sink.flush()
    assert open_fds() == baseline + 2  # written this interval: kept open
    await sink.flush()
    assert open_fds() == baseline
    # A late record for that hour starts a new part, never reopens the old one.
    sink.write([env(3)])
    await sink.close()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    assert [r["id"] for r in lines(part_dir / "part-1.jsonl")] == ["gw-1-3"]


async def test_open_files_are_bounded(tmp_path: Path) -> None:
    sink = lake(tmp_path, max_open_files=2)
    baseline = open_fds()
    sink.write([env(i, region=f"r{i}") for i in range(5)])
    await sink.flush()
    assert open_fds() <= baseline + 2
    sink.write([env(i + 10, region=f"r{i}") for i in range(5)])
    await sink.close()
    assert open_fds() <= baseline
    all_ids = sorted(r["id"] for f in (tmp_path / "lake").rglob("*.jsonl") for r in lines(f))
    assert all_ids == sorted([f"gw-1-{i}" for i in range(5)] +
                             [f"gw-1-{i + 10}" for i in range(5)])


async def test_io_errors_are_logged_counted_and_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    blocker = tmp_path / "lake"
    blocker.write_bytes(b"not a directory")
    sink = lake(tmp_path, metrics)
    sink.write([env(1), env(2, region="us")])
    with caplog.at_level(logging.ERROR, logger="gateway.sinks"):
        await sink.flush()  # must not raise
    assert "sink lake: cannot write" in caplog.text
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 0
    assert sample(metrics, "iotgw_sink_buffered_bytes", {"sink": "lake"}) > 0
    sink.write([env(3)])  # still failing: buffered, no retry before the next flush
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    blocker.unlink()
    await sink.flush()
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 3
    assert sample(metrics, "iotgw_sink_buffered_bytes", {"sink": "lake"}) == 0
    eu = lines(tmp_path / "lake/region=eu/date=2024-05-06/hour=13/part-0.jsonl")
    assert [r["id"] for r in eu] == ["gw-1-1", "gw-1-3"]
    await sink.close()


async def test_close_reports_what_it_could_not_write(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "lake").write_bytes(b"")
    sink = lake(tmp_path)
    sink.write([env(1)])
    with caplog.at_level(logging.ERROR, logger="gateway.sinks"):
        await sink.close()
    assert "closing with" in caplog.text


class _Trickle:
    """A file that takes at most 7 bytes per write, then fails once, to exercise partial
    writes (a full disk can do both)."""

    def __init__(self, path: Any, mode: str, buffering: int) -> None:
        self.file = open(path, mode, buffering=buffering)  # noqa: SIM115
        self.calls = 0

    def write(self, data: memoryview) -> int:
        self.calls += 1
        if self.calls == 3:
            raise OSError(28, "No space left on device")
        return int(self.file.write(data[:7]))

    def close(self) -> None:
        self.file.close()


async def test_partial_writes_never_split_a_line_across_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.sinks, "open", _Trickle, raising=False)
    metrics = Metrics()
    sink = lake(tmp_path, metrics, max_file_bytes=250)
    sink.write([env(i) for i in range(4)])
    await sink.flush()  # fails after two partial writes, mid-line
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    for _ in range(400):
        await sink.flush()
    await sink.close()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    ids = [r["id"] for n in range(len(os.listdir(part_dir)))
           for r in lines(part_dir / f"part-{n}.jsonl")]
    assert ids == [f"gw-1-{i}" for i in range(4)]
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 4


async def test_a_removed_directory_is_recreated(tmp_path: Path) -> None:
    sink = lake(tmp_path, max_file_bytes=100)
    sink.write([env(1)])
    await sink.flush()
    part_dir = tmp_path / "lake/region=eu/date=2024-05-06/hour=13"
    for name in os.listdir(part_dir):
        (part_dir / name).unlink()
    part_dir.rmdir()
    sink.write([env(2)])
    await sink.close()
    assert [r["id"] for f in part_dir.glob("*.jsonl") for r in lines(f)] == ["gw-1-2"]


async def test_null_sink_counts_only() -> None:
    metrics = Metrics()
    sink = NullSink("bench", NullOptions(), metrics)
    sink.write([env(1), env(2)])
    await sink.flush()
    await sink.close()
    assert sink.records == 2
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "bench"}) == 2


CONFIG = """
[[tiers]]
name = "standard"
max_latency_ms = 1000
"""


def test_build_sinks_from_config(tmp_path: Path) -> None:
    config = parse_config(CONFIG + f"""
[sinks.lake]
type = "jsonl"
options = {{ dir = "{tmp_path}", max_file_bytes = 1024 }}
[sinks.bench]
type = "null"
""")
    sinks = build_sinks(config, Metrics())
    assert isinstance(sinks["lake"], JsonLinesSink) and isinstance(sinks["bench"], NullSink)
    assert sinks["lake"].options.max_file_bytes == 1024
    assert list(tmp_path.iterdir()) == []  # building opens nothing


@pytest.mark.parametrize(("table", "error"), [
    ('type = "kafka"',
     r"^sinks\.lake\.type: unknown sink 'kafka' \(known: amqp, jsonl, mqtt, null, parquet\)$"),
    ('type = "jsonl"\noptions = { max_file_bytes = 0 }',
     r"^sinks\.lake\.options\.max_file_bytes: expected int >= 1$"),
    ('type = "jsonl"\noptions = { dri = "x" }', r"^sinks\.lake\.options\.dri: unknown field$"),
    ('type = "jsonl"\noptions = { dir = 3 }',
     r"^sinks\.lake\.options\.dir: expected str, got int$"),
])
def test_sink_config_errors_name_the_place(table: str, error: str) -> None:
    config = parse_config(CONFIG + "[sinks.lake]\n" + table)
    with pytest.raises(ConfigError, match=error):
        build_sinks(config, Metrics())


def test_a_sink_factory_value_error_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Picky:
        Options = NullOptions

        def __init__(self, name: str, options: NullOptions, metrics: Metrics) -> None:
            raise ValueError("needs a broker")

    monkeypatch.setitem(SINKS, "picky", Picky)
    config = parse_config(CONFIG + '[sinks.x]\ntype = "picky"')
    with pytest.raises(ConfigError, match=r"^sinks\.x: needs a broker$"):
        build_sinks(config, Metrics())


class _PluginSink(NullSink):
    pass


def _entry_points(module: ModuleType) -> Any:
    def entry_points(group: str) -> Iterator[EntryPoint]:
        assert group == "iot_gateway.sinks"
        yield EntryPoint("kafka", f"{module.__name__}:KafkaSink", group)
        yield EntryPoint("broken", f"{module.__name__}:Missing", group)
        yield EntryPoint("plain", f"{module.__name__}:not_a_factory", group)
        yield EntryPoint("null", f"{module.__name__}:KafkaSink", group)  # a built-in's name
    return entry_points


def test_third_party_sinks_come_from_entry_points(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    module = ModuleType("fake_sink_plugin")
    module.KafkaSink = _PluginSink  # type: ignore[attr-defined]
    module.not_a_factory = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "fake_sink_plugin", module)
    with caplog.at_level(logging.WARNING, logger="gateway.sinks"):
        loaded, broken = load_plugins("iot_gateway.sinks", {"null": NullSink},
                                      entry_points=_entry_points(module))
    assert loaded == {"null": NullSink, "kafka": _PluginSink}
    assert broken["broken"].startswith("AttributeError")
    assert broken["plain"].startswith("not a factory")
    assert "'null'" in caplog.text and "ignored" in caplog.text
    monkeypatch.setattr(gateway.sinks, "SINKS", loaded)
    monkeypatch.setattr(gateway.sinks, "BROKEN_SINKS", broken)
    sinks = build_sinks(parse_config(CONFIG + '[sinks.k]\ntype = "kafka"'), Metrics())
    assert isinstance(sinks["k"], _PluginSink)
    with pytest.raises(ConfigError, match=r"^sinks\.k\.type: sink 'broken' could not be "
                                          r"loaded: AttributeError"):
        build_sinks(parse_config(CONFIG + '[sinks.k]\ntype = "broken"'), Metrics())


def test_mqtt_sink_template_errors_and_invalid_topics(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.broker import Broker
    from gateway.sinks import MQTTOptions, MQTTSink

    with pytest.raises(ValueError, match="unknown or bad field 'nope'"):
        MQTTSink("out", MQTTOptions(topic="x/{nope}"), Metrics())
    metrics = Metrics()
    sink = MQTTSink("out", MQTTOptions(topic="r/{device}", payload="raw"), metrics)
    sink.write([env(1)])  # no broker attached yet: nothing, no error
    broker = Broker()
    published: list[Any] = []
    broker.publish = published.append  # type: ignore[method-assign, assignment]
    sink.attach_broker(broker)
    with caplog.at_level(logging.ERROR):
        sink.write([env(2), env(3, device="a+b"), env(4, device="a+b")])
    assert [(m.topic, m.payload) for m in published] == [("r/dev-2", b'{"t": 21.5}')]
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "out"}) == 2
    assert caplog.text.count("is not a valid topic name") == 1
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "out"}) == 1


async def test_a_json_string_that_is_not_utf8_is_kept_as_base64(tmp_path: Path) -> None:
    # b'"\xff"' is JSON syntax but not UTF-8: msgspec raises UnicodeDecodeError for it.
    sink = lake(tmp_path)
    sink.write([env(1, payload=b'"\xff"')])
    await sink.close()
    [record] = lines(next((tmp_path / "lake").rglob("*.jsonl")))
    assert record["payload_encoding"] == "base64"
    assert base64.b64decode(record["payload"]) == b'"\xff"'
