"""The Parquet data lake: layout and schema read back by pyarrow.dataset and DuckDB as one
dataset, rotation, visibility, failures and retries, crash recovery, options."""

from __future__ import annotations

import asyncio
import base64
import calendar
import datetime as dt
import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.dataset as ds  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

import gateway.envelope
import gateway.parquet_sink as parquet_sink
import gateway.sinks
from gateway.config import parse_config
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.parquet_sink import ParquetOptions, ParquetSink, run_bench
from gateway.sinks import build_sinks

REPO = Path(__file__).resolve().parents[2]

# 2024-05-06 13:45:10.250000 UTC
T0 = calendar.timegm((2024, 5, 6, 13, 45, 10)) + 0.25
EU13 = "region=eu/date=2024-05-06/hour=13"


def env(i: int = 0, *, region: str = "eu", at: float = T0, payload: bytes = b'{"t": 21.5}',
        **fields: Any) -> Envelope:
    base: dict[str, Any] = dict(
        id=f"gw-1-{i:04d}", device=f"dev-{i}", tenant="acme", tier="standard", region=region,
        topic=f"sensors/dev-{i}/temp", payload=payload, received_ns=i, received_at=at,
        protocol="mqtt", qos=1, device_class="thermometer")
    base.update(fields)
    return Envelope(**base)


def lake(tmp_path: Path, metrics: Metrics | None = None, **options: Any) -> ParquetSink:
    return ParquetSink("lake", ParquetOptions(dir=str(tmp_path / "lake"), **options),
                       metrics or Metrics())


def parts(root: Path) -> list[str]:
    """Published part files, each partition's in part-number order."""
    found = [p.relative_to(root) for p in root.rglob("*.parquet")]
    return [str(p) for p in sorted(found, key=lambda p: (str(p.parent), int(p.name[5:-8])))]


def leftovers(root: Path) -> list[str]:
    """Anything but published parts (and the empty spool directory)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.suffix != ".parquet")


def ids_in(path: Path) -> list[str]:
    return list(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def lake_ids(root: Path) -> list[str]:
    return [i for part in parts(root) for i in ids_in(root / part)]


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def query(sql: str) -> list[tuple[Any, ...]]:
    relation = duckdb.sql(sql)
    assert relation is not None
    return relation.fetchall()


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


# --------------------------------------------------------------------------------------------
# The lake as one dataset


def mixed_envelopes() -> list[Envelope]:
    """Two regions × two hours, every kind of payload, meta and errors."""
    envelopes = []
    for i in range(40):
        region = "eu" if i % 2 else "us-east"
        at = T0 + (3600 if i >= 20 else 0) + i * 0.001
        fields: dict[str, Any] = {}
        if i % 5 == 1:
            fields["payload"] = b"\x00\xffnot json"
        elif i % 5 == 2:
            fields["data"] = {"t": i, "unit": "C"}  # a decode stage ran: its data wins
        elif i % 5 == 3:
            fields["meta"] = {"site": f"plant-{i}"}
            fields["errors"] = ["t: above max"]
        envelopes.append(env(i, region=region, at=at, **fields))
    return envelopes


def expected_payload(e: Envelope) -> tuple[str, Any]:
    if e.data is not None:
        return "json", e.data
    try:
        return "json", json.loads(e.payload)
    except ValueError:
        return "base64", base64.b64encode(e.payload).decode()


async def test_the_lake_reads_back_as_one_dataset_in_pyarrow_and_duckdb(tmp_path: Path) -> None:
    metrics = Metrics()
    sink = lake(tmp_path, metrics)
    envelopes = mixed_envelopes()
    for start in range(0, 40, 7):
        sink.write(envelopes[start:start + 7])
        await sink.flush()
    await sink.close()
    root = tmp_path / "lake"
    assert parts(root) == [
        "region=eu/date=2024-05-06/hour=13/part-0.parquet",
        "region=eu/date=2024-05-06/hour=14/part-0.parquet",
        "region=us-east/date=2024-05-06/hour=13/part-0.parquet",
        "region=us-east/date=2024-05-06/hour=14/part-0.parquet",
    ]
    assert leftovers(root) == []
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 40
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 0

    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    assert dataset.schema.field("received_at").type == pa.timestamp("us", tz="UTC")
    assert dataset.schema.field("qos").type == pa.int8()
    assert dataset.schema.field("errors").type == pa.list_(pa.string())
    assert dataset.schema.field("hour").type == pa.int32()
    rows = {r["id"]: r for r in dataset.to_table().to_pylist()}
    assert sorted(rows) == sorted(e.id for e in envelopes)
    for e in envelopes:
        row = rows[e.id]
        hour = 14 if e.received_at >= T0 + 3600 - 1 else 13
        encoding, payload = expected_payload(e)
        assert row == {
            "id": e.id, "device": e.device, "tenant": "acme", "tier": "standard",
            "topic": e.topic, "received_at": utc(round(e.received_at * 1e6) / 1e6), "qos": 1,
            "protocol": "mqtt", "region": e.region, "device_class": "thermometer",
            "payload_encoding": encoding, "payload": row["payload"],
            "meta": None if e.meta is None else json.dumps(e.meta, separators=(",", ":")),
            "errors": e.errors, "date": "2024-05-06", "hour": hour}
        assert json.loads(row["payload"]) == payload

    found = query(
        f"select id, region, date, hour, epoch_us(received_at) as us, payload_encoding, payload,"
        f" meta, errors from read_parquet('{root}/**/*.parquet', hive_partitioning=true)"
        f" order by id")
    assert [r[0] for r in found] == sorted(e.id for e in envelopes)
    by_id = {e.id: e for e in envelopes}
    for id_, region, date, hour, us, encoding, payload, meta, errors in found:
        e = by_id[id_]
        assert (region, date) == (e.region, dt.date(2024, 5, 6))
        assert hour == rows[id_]["hour"]
        assert us == int(e.received_at * 1e6 + 0.5)
        assert (encoding, json.loads(payload)) == expected_payload(e)
        assert (meta and json.loads(meta)) == (e.meta or None)
        assert errors == e.errors
    per_partition = query(
        f"select region, hour, count(*) from read_parquet('{root}/**/*.parquet',"
        f" hive_partitioning=true) group by all order by all")
    assert per_partition == [("eu", 13, 10), ("eu", 14, 10), ("us-east", 13, 10),
                             ("us-east", 14, 10)]


async def test_payloads_as_json_text_or_base64(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    raw = b"\x00\xffnot json"
    sink.write([
        env(1, payload=b'[1, 2, "x"]'),  # no decode stage ran: the JSON as received
        env(2, payload=raw),
        env(3, payload=b'{"t": 1}', data={"t": 2}),  # a stage's data wins over the payload
        env(4, payload=b"null"),
        env(5, payload=b"", meta={"site": "plant-3"}, errors=["t: above max"]),
        env(6, payload=b'"\xff"'),  # JSON syntax, but not UTF-8
        env(7, payload=b"raw", data={"x": object()}, meta={"m": object()}),
        env(8, at=float(calendar.timegm((2024, 5, 6, 13, 0, 0)))),
    ])
    await sink.close()
    table = pq.read_table(tmp_path / "lake" / EU13 / "part-0.parquet")
    records = table.to_pylist()
    assert [(r["payload_encoding"], json.loads(r["payload"])) for r in records] == [
        ("json", [1, 2, "x"]),
        ("base64", base64.b64encode(raw).decode()),
        ("json", {"t": 2}),
        ("json", None),
        ("base64", ""),
        ("base64", base64.b64encode(b'"\xff"').decode()),
        ("base64", base64.b64encode(b"raw").decode()),
        ("json", {"t": 21.5}),
    ]
    assert records[0]["payload"] == '[1, 2, "x"]'
    assert (records[4]["meta"], records[4]["errors"]) == ('{"site":"plant-3"}', ["t: above max"])
    assert records[0]["meta"] is None and records[0]["errors"] is None
    assert records[6]["meta"] is None
    assert records[6]["errors"][0].startswith("payload: not JSON-encodable")
    assert records[6]["errors"][1] == "meta: not JSON-encodable, dropped"
    assert records[7]["received_at"] == utc(calendar.timegm((2024, 5, 6, 13, 0, 0)))


async def test_values_of_the_wrong_type_are_coerced_not_fatal(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    sink.write([env(1), env(2, device=12345, qos=300, errors=["ok", 5], tier="\ud800"),
                env(3)])
    await sink.close()
    records = pq.read_table(tmp_path / "lake" / EU13 / "part-0.parquet").to_pylist()
    assert [r["id"] for r in records] == ["gw-1-0001", "gw-1-0002", "gw-1-0003"]
    assert (records[1]["device"], records[1]["qos"], records[1]["errors"],
            records[1]["tier"]) == ("12345", None, ["ok", "5"], "?")


async def test_unsafe_region_names_stay_one_path_component(tmp_path: Path) -> None:
    sink = lake(tmp_path)
    sink.write([env(1, region="../etc"), env(2, region=""), env(3, region="eu west/2")])
    await sink.close()
    root = tmp_path / "lake"
    assert parts(root) == [
        "region=%2E%2E%2Fetc/date=2024-05-06/hour=13/part-0.parquet",
        "region=__HIVE_DEFAULT_PARTITION__/date=2024-05-06/hour=13/part-0.parquet",
        "region=eu%20west%2F2/date=2024-05-06/hour=13/part-0.parquet",
    ]
    regions = ds.dataset(root, format="parquet", partitioning="hive").to_table(
        columns=["id", "region"]).sort_by("id").column("region").to_pylist()
    assert regions == ["../etc", None, "eu west/2"]  # the Hive null partition: ""


# --------------------------------------------------------------------------------------------
# Rotation, row groups, visibility


async def test_rotation_by_size_in_row_groups_keeps_order(tmp_path: Path) -> None:
    sink = lake(tmp_path, max_file_bytes=6000, row_group_rows=8)
    for start in range(0, 100, 5):
        sink.write([env(i) for i in range(start, start + 5)])
        await sink.flush()
    await sink.close()
    root = tmp_path / "lake"
    names = parts(root)
    assert len(names) >= 3
    assert lake_ids(root) == [f"gw-1-{i:04d}" for i in range(100)]
    for name in names:
        metadata = pq.ParquetFile(root / name).metadata
        groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        assert all(rows == 8 for rows in groups[:-1]) and 0 < groups[-1] <= 8
    for name in names[:-1]:  # closed once past the limit, not before
        assert (root / name).stat().st_size >= 6000


async def test_rotation_by_age(tmp_path: Path) -> None:
    sink = lake(tmp_path, max_file_age_s=0.5)
    now = time.time()  # the current hour: not closed for being idle
    sink.write([env(1, at=now)])
    await sink.flush()
    root = tmp_path / "lake"
    assert parts(root) == []  # open: not visible yet
    sink.write([env(2, at=now)])
    await sink.flush()
    assert parts(root) == []
    await asyncio.sleep(0.55)
    sink.write([env(3, at=now)])
    await sink.flush()  # old enough: closed, with what this flush brought
    assert len(parts(root)) == 1
    sink.write([env(4, at=now)])
    await sink.flush()
    await asyncio.sleep(0.55)
    await sink.flush()  # nothing new, but old enough
    assert [ids_in(root / p) for p in parts(root)] == [
        ["gw-1-0001", "gw-1-0002", "gw-1-0003"], ["gw-1-0004"]]
    await sink.close()


async def test_readers_see_only_closed_files(tmp_path: Path) -> None:
    sink = lake(tmp_path, row_group_rows=2)
    root = tmp_path / "lake"
    sink.write([env(i) for i in range(5)])
    await sink.flush()
    await sink.flush()  # a past hour, idle for a flush: closed
    assert parts(root) == [f"{EU13}/part-0.parquet"]
    sink.write([env(i) for i in range(5, 10)])
    await sink.flush()  # open: a spool, and a Parquet file with two row groups so far
    spool = sorted(p.name.split(".", 1)[1] for p in (root / "_spool").iterdir())
    assert spool == ["arrows", "parquet.tmp"]
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == [f"gw-1-{i:04d}" for i in range(5)]
    assert query(f"select count(*) from read_parquet('{root}/**/*.parquet')") == [(5,)]
    await sink.close()
    assert lake_ids(root) == [f"gw-1-{i:04d}" for i in range(10)]
    assert leftovers(root) == []
    assert list((root / "_spool").iterdir()) == []


async def test_open_parts_are_bounded(tmp_path: Path) -> None:
    sink = lake(tmp_path, max_open_files=2)
    root = tmp_path / "lake"
    baseline = len(os.listdir("/proc/self/fd"))
    sink.write([env(i, region=f"r{i}") for i in range(5)])
    await sink.flush()
    assert len(list((root / "_spool").glob("*.arrows"))) <= 2
    assert len(os.listdir("/proc/self/fd")) <= baseline + 2 + 1  # spools, the sink's thread
    sink.write([env(i + 10, region=f"r{i}") for i in range(5)])
    await sink.close()
    assert sorted(lake_ids(root)) == sorted(
        [f"gw-1-{i:04d}" for i in range(5)] + [f"gw-1-{i + 10:04d}" for i in range(5)])
    assert leftovers(root) == []


async def test_parts_never_replace_another_writers(tmp_path: Path) -> None:
    root = tmp_path / "lake"
    (root / EU13).mkdir(parents=True)
    (root / EU13 / "part-7.parquet").write_bytes(b"another process's")
    sink = lake(tmp_path)
    sink.write([env(1)])
    await sink.flush()
    await sink.flush()
    assert parts(root)[-1] == f"{EU13}/part-8.parquet"
    (root / EU13 / "part-9.parquet").write_bytes(b"published meanwhile")  # after our scan
    sink.write([env(2)])
    await sink.close()
    assert ids_in(root / EU13 / "part-10.parquet") == ["gw-1-0002"]
    assert (root / EU13 / "part-9.parquet").read_bytes() == b"published meanwhile"


# --------------------------------------------------------------------------------------------
# Failures: logged, counted, retried


class _Faults:
    """Makes ``_pwrite_all`` (spool appends) fail while ``on``, after writing ``partial``
    bytes of what it was given, as a full disk can."""

    def __init__(self, partial: int = 0) -> None:
        self.on = False
        self.partial = partial
        self.calls = 0
        self.real = parquet_sink._pwrite_all

    def __call__(self, fd: int, data: Any, offset: int) -> None:
        if self.on and offset > 0:  # appends, not spool headers
            self.calls += 1
            with memoryview(data) as view:
                os.pwrite(fd, view[:self.partial], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fd, data, offset)


@pytest.mark.parametrize("partial", [0, 37])
async def test_spool_write_failures_are_logged_counted_and_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        partial: int) -> None:
    faults = _Faults(partial)
    monkeypatch.setattr(parquet_sink, "_pwrite_all", faults)
    metrics = Metrics()
    sink = lake(tmp_path, metrics, row_group_rows=3)
    sink.write([env(i) for i in range(4)])
    await sink.flush()  # spooled: the first part is open
    faults.on = True
    sink.write([env(i) for i in range(4, 8)])
    sink.write([env(20, region="us")])
    with caplog.at_level(logging.ERROR, logger="gateway.parquet_sink"):
        await sink.flush()  # must not raise
    assert "sink lake: cannot write" in caplog.text and "No space left" in caplog.text
    assert faults.calls == 1  # the first failure stops this flush's I/O
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 4
    assert sample(metrics, "iotgw_sink_buffered_bytes", {"sink": "lake"}) > 0
    sink.write([env(i) for i in range(8, 10)])
    await sink.flush()
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 2
    faults.on = False
    await sink.flush()
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 11
    assert sample(metrics, "iotgw_sink_buffered_bytes", {"sink": "lake"}) == 0
    await sink.close()
    root = tmp_path / "lake"
    assert lake_ids(root) == [f"gw-1-{i:04d}" for i in range(10)] + ["gw-1-0020"]
    assert leftovers(root) == []


class _FailingFile:
    """A Parquet output file whose ``fail_at``-th write fails (a disk that filled up)."""

    writes = 0
    fail_at = 0

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, data: Any) -> int:
        type(self).writes += 1
        if type(self).writes == type(self).fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


async def test_a_failed_parquet_write_is_rebuilt_from_the_spool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parquet_sink, "_open_output", _FailingFile)
    monkeypatch.setattr(_FailingFile, "fail_at", 6)
    metrics = Metrics()
    sink = lake(tmp_path, metrics, row_group_rows=4)
    for start in range(0, 20, 5):
        sink.write([env(i) for i in range(start, start + 5)])
        await sink.flush()
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 20
    await sink.close()
    root = tmp_path / "lake"
    assert lake_ids(root) == [f"gw-1-{i:04d}" for i in range(20)]
    assert leftovers(root) == []


async def test_publishing_failures_are_retried_and_work_without_hard_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failures = [OSError(errno.EIO, "Input/output error"),
                OSError(errno.EPERM, "Operation not permitted")]  # no hard links here
    real_link = os.link

    def link(src: Any, dst: Any) -> None:
        if failures:
            raise failures.pop(0)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    metrics = Metrics()
    sink = lake(tmp_path, metrics)
    sink.write([env(1)])
    await sink.flush()
    await sink.flush()  # closing it: publishing fails
    root = tmp_path / "lake"
    assert parts(root) == []
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    sink.write([env(2)])  # a new part meanwhile
    await sink.flush()  # the retry falls back to rename
    assert parts(root) == [f"{EU13}/part-0.parquet"]
    await sink.close()
    assert [ids_in(root / p) for p in parts(root)] == [["gw-1-0001"], ["gw-1-0002"]]
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    assert leftovers(root) == []


async def test_a_spool_that_cannot_be_cut_back_is_finished_and_a_new_one_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faults = _Faults(partial=21)
    monkeypatch.setattr(parquet_sink, "_pwrite_all", faults)
    real_ftruncate = os.ftruncate

    def ftruncate(fd: int, length: int) -> None:
        if faults.on:
            raise OSError(errno.EIO, "Input/output error")
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    metrics = Metrics()
    sink = lake(tmp_path, metrics, row_group_rows=2)
    now = time.time()  # the current hour: closed for no other reason
    sink.write([env(i, at=now) for i in range(3)])
    await sink.flush()
    faults.on = True
    sink.write([env(i, at=now) for i in range(3, 6)])
    await sink.flush()  # the append fails and leaves 21 bytes of it in the spool
    faults.on = False
    await sink.flush()  # that part is closed with what it had, the rest goes to a new one
    root = tmp_path / "lake"
    assert len(parts(root)) == 1
    await sink.close()
    hour = time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(now))
    assert [ids_in(root / p) for p in parts(root)] == [
        ["gw-1-0000", "gw-1-0001", "gw-1-0002"], ["gw-1-0003", "gw-1-0004", "gw-1-0005"]]
    assert parts(root)[0] == f"region=eu/{hour}/part-0.parquet"
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    assert leftovers(root) == []


async def test_parts_unfinished_at_close_are_recovered_at_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def link(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    metrics = Metrics()
    with monkeypatch.context() as patch:
        patch.setattr(os, "link", link)
        sink = lake(tmp_path)
        sink.write([env(1), env(2, region="us")])
        with caplog.at_level(logging.ERROR, logger="gateway.parquet_sink"):
            await sink.close()
        assert "2 parts could not be finished" in caplog.text
        again = lake(tmp_path, metrics)
        await again.flush()  # recovering fails too: retried at the next flush
        assert "cannot recover" in caplog.text
    root = tmp_path / "lake"
    assert parts(root) == []
    assert len(list((root / "_spool").glob("*.arrows"))) == 2
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 2
    await again.flush()
    await again.close()
    assert sorted(lake_ids(root)) == ["gw-1-0001", "gw-1-0002"]
    assert leftovers(root) == []


async def test_close_reports_what_it_could_not_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "lake").write_bytes(b"not a directory")
    sink = lake(tmp_path)
    sink.write([env(1), env(2)])
    with caplog.at_level(logging.ERROR, logger="gateway.parquet_sink"):
        await sink.close()
    assert "creating a spool in" in caplog.text
    assert "closing with 2 records it could not write" in caplog.text


# --------------------------------------------------------------------------------------------
# A writer that died


def run_child(directory: Path, script: str) -> None:
    """Write with a sink in another process that dies without closing it."""
    code = textwrap.dedent(f"""
        import asyncio, calendar, os, sys
        import gateway.parquet_sink as ps
        from gateway.envelope import Envelope
        from gateway.metrics import Metrics

        T0 = {T0!r}
        def env(i, region="eu"):
            return Envelope(f"gw-1-{{i:04d}}", f"dev-{{i}}", "acme", "standard", region,
                            "t", b'{{"t": 1}}', i, T0, "mqtt", 1, "thermometer")

        async def main():
            sink = ps.ParquetSink("lake", ps.ParquetOptions(dir={str(directory)!r},
                                                            row_group_rows=3), Metrics())
        """) + textwrap.indent(textwrap.dedent(script), "    ") + textwrap.dedent("""
            os._exit(0)  # no close: as kill -9 would

        asyncio.run(main())
        """)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=30)


async def test_a_dead_writers_spool_becomes_a_part(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "lake"
    run_child(root, """
        sink.write([env(i) for i in range(4)])
        await sink.flush()  # acknowledged: spooled, and one row group in the Parquet file
        sink.write([env(4), env(5, region="us"), env(6, region="us")])
        await sink.flush()
    """)
    assert parts(root) == []
    spools = sorted((root / "_spool").glob("*.arrows"))
    assert len(spools) == 2 and len(list((root / "_spool").glob("*.parquet.tmp"))) == 1
    with open(spools[0], "ab") as spool:
        spool.write(b"\xff\xff\xff\xff\x40\x00\x00\x00torn")  # a message cut by the crash
    (root / "_spool/dead.arrows.new").write_bytes(b"")  # died creating a spool
    (root / "_spool/gone.parquet.tmp").write_bytes(b"PAR1")  # its spool was already removed
    (root / "_spool/junk.arrows").write_bytes(b"not arrow")
    metrics = Metrics()
    sink = lake(tmp_path, metrics)
    with caplog.at_level(logging.INFO, logger="gateway.parquet_sink"):
        await sink.flush()
    assert "torn message" in caplog.text
    assert caplog.text.count("recovered") == 2
    assert "junk.arrows is not a spool of this sink" in caplog.text
    assert sample(metrics, "iotgw_sink_errors_total", {"sink": "lake"}) == 1
    (root / "_spool/junk.arrows").unlink()
    assert parts(root) == [f"{EU13}/part-0.parquet",
                           "region=us/date=2024-05-06/hour=13/part-0.parquet"]
    assert sorted(lake_ids(root)) == [f"gw-1-{i:04d}" for i in range(7)]
    assert ids_in(root / EU13 / "part-0.parquet") == [f"gw-1-{i:04d}" for i in range(5)]
    assert sample(metrics, "iotgw_sink_records_total", {"sink": "lake"}) == 0  # counted before
    assert leftovers(root) == []
    await sink.close()


async def test_a_part_published_just_before_the_crash_is_not_published_twice(
        tmp_path: Path) -> None:
    root = tmp_path / "lake"
    run_child(root, """
        sink.write([env(i) for i in range(4)])
        await sink.flush()
        ps.ParquetSink._remove = lambda self, part: os._exit(0)  # dies right after the link
        await sink.close()
    """)
    assert parts(root) == [f"{EU13}/part-0.parquet"]
    assert len(list((root / "_spool").glob("*.arrows"))) == 1
    sink = lake(tmp_path)
    await sink.flush()
    await sink.close()
    assert parts(root) == [f"{EU13}/part-0.parquet"]
    assert ids_in(root / EU13 / "part-0.parquet") == [f"gw-1-{i:04d}" for i in range(4)]
    assert leftovers(root) == []


async def test_a_live_writers_spool_is_left_alone(tmp_path: Path) -> None:
    first, second = lake(tmp_path), lake(tmp_path)
    first.write([env(1)])
    await first.flush()
    second.write([env(2, region="us")])
    await second.flush()  # its recovery finds first's spool locked
    root = tmp_path / "lake"
    assert len(list((root / "_spool").glob("*.arrows"))) == 2
    await first.close()
    await second.close()
    assert sorted(lake_ids(root)) == ["gw-1-0001", "gw-1-0002"]
    assert leftovers(root) == []


# --------------------------------------------------------------------------------------------
# Configuration


CONFIG = """
[[tiers]]
name = "standard"
max_latency_ms = 1000
"""


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """As gateway.sinks registers it (a no-op once it does)."""
    monkeypatch.setitem(gateway.sinks.SINKS, "parquet", ParquetSink)


def test_build_from_config_opens_nothing(tmp_path: Path, registered: None) -> None:
    config = parse_config(CONFIG + f"""
[sinks.lake]
type = "parquet"
[sinks.lake.options]
dir = "{tmp_path}"
max_file_bytes = 1024
max_file_age_s = 60
row_group_rows = 1000
compression = "snappy"
""")
    sink = build_sinks(config, Metrics())["lake"]
    assert isinstance(sink, ParquetSink)
    assert sink.options == ParquetOptions(dir=str(tmp_path), max_file_bytes=1024,
                                          max_file_age_s=60.0, row_group_rows=1000,
                                          compression="snappy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "error"), [
    ("max_file_bytes = 0", r"^sinks\.lake\.options\.max_file_bytes: expected int >= 1$"),
    ("max_file_age_s = 0", r"^sinks\.lake\.options\.max_file_age_s: expected float > 0"),
    ("row_group_rows = 0", r"^sinks\.lake\.options\.row_group_rows: expected int >= 1$"),
    ("max_open_files = 0", r"^sinks\.lake\.options\.max_open_files: expected int >= 1$"),
    ("writeback_bytes = -1", r"^sinks\.lake\.options\.writeback_bytes: expected int >= 0$"),
    ('compression = "brotli"',
     r"^sinks\.lake\.options\.compression: invalid enum value 'brotli'$"),
    ('dri = "x"', r"^sinks\.lake\.options\.dri: unknown field$"),
    ("dir = 3", r"^sinks\.lake\.options\.dir: expected str, got int$"),
])
def test_option_errors_name_the_place(options: str, error: str, registered: None) -> None:
    config = parse_config(CONFIG + f'[sinks.lake]\ntype = "parquet"\noptions = {{ {options} }}')
    with pytest.raises(ConfigError, match=error):
        build_sinks(config, Metrics())


def test_without_pyarrow_the_config_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, registered: None) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow: ImportError
    config = parse_config(CONFIG + '[sinks.lake]\ntype = "parquet"')
    with pytest.raises(ConfigError, match=r"^sinks\.lake: the parquet sink needs pyarrow: "
                                          r"install iot-gateway\[parquet\]"):
        build_sinks(config, Metrics())


def test_the_module_imports_without_pyarrow() -> None:
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "import gateway.sinks, gateway.parquet_sink\n"
            "assert 'pyarrow.parquet' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=30)


# --------------------------------------------------------------------------------------------
# The benchmark runs (its figures are for `python -m gateway.parquet_sink --bench`)


async def test_the_benchmark_runs(tmp_path: Path) -> None:
    results = await run_bench(records=3000, batch=100, flush_records=1000, directory=tmp_path)
    assert set(results) == {"jsonl", "parquet"}
    assert all(r["records_per_s"] > 0 and r["bytes"] > 0 for r in results.values())
    assert list(tmp_path.iterdir()) == []


def test_the_files_have_the_fields_of_the_json_lines_in_order() -> None:
    schema = parquet_sink.arrow_schema(pa)
    assert schema.names == list(parquet_sink.COLUMNS)
    assert [f.name for f in msgspec.structs.fields(gateway.envelope.SinkRecord)] == schema.names
