"""The write-ahead log, on real files: round trips, retirement, segment deletion, torn and
corrupt records, group commit, callbacks on the loop, a full disk, kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import WALSection
from gateway.envelope import Envelope
from gateway.errors import GatewayError, WALError
from gateway.metrics import Metrics
from gateway.wal import COMMIT_BYTES, CompactionResult, WriteAheadLog

ROOT = Path(__file__).parents[2]

# The documented on-disk format, restated here so that a change to it breaks a test.
HEADER = struct.Struct("<6sH")
FRAME = struct.Struct("<IIB")
APPEND, RETIRE, RETIRE_EXCEPT = 1, 2, 3


def config(**overrides: Any) -> WALSection:
    return WALSection(**{"fsync": False, **overrides})


def envelopes(n: int, start: int = 0, payload_size: int = 100) -> list[Envelope]:
    return [Envelope(id=f"m{i}", device=f"dev-{i % 7}", tenant="acme", tier="premium",
                     region="eu-west", topic=f"telemetry/dev-{i % 7}",
                     payload=_payload(i, payload_size), received_ns=123,
                     received_at=1_700_000_000.0 + i, protocol="mqtt", qos=1,
                     device_class="thermo")
            for i in range(start, start + n)]


def _payload(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coro)


def recover(path: Path, metrics: Metrics | None = None, **overrides: Any) -> list[Envelope]:
    return WriteAheadLog(path, config(**overrides), metrics).recover()


def ids(envs: list[Envelope]) -> list[str]:
    return [e.id for e in envs]


async def commit(wal: WriteAheadLog, batch: list[Envelope]) -> OSError | None:
    """Append one batch and wait for its done()."""
    future: asyncio.Future[OSError | None] = asyncio.get_running_loop().create_future()
    wal.append(batch, future.set_result)
    return await future


async def commit_all(wal: WriteAheadLog, batches: list[list[Envelope]],
                     pause: bool = False) -> list[OSError | None]:
    """Append every batch (a loop turn apart if ``pause``), then wait for all done()s."""
    loop = asyncio.get_running_loop()
    results: list[OSError | None] = []
    finished = loop.create_future()

    def done(error: OSError | None) -> None:
        results.append(error)
        if len(results) == len(batches):
            finished.set_result(None)

    for batch in batches:
        wal.append(batch, done)
        if pause:
            await asyncio.sleep(0)
    await finished
    return results


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("wal-*.log"))


def frames(path: Path) -> list[tuple[int, int, int]]:
    """(offset, end, kind) of every record of a segment, parsed per the documented format."""
    data = path.read_bytes()
    magic, version = HEADER.unpack_from(data)
    assert (magic, version) == (b"IGWWAL", 1)
    out, offset = [], HEADER.size
    while offset < len(data):
        length, crc, kind = FRAME.unpack_from(data, offset)
        end = offset + FRAME.size + length
        assert zlib.crc32(data[offset + 8:end]) == crc
        out.append((offset, end, kind))
        offset = end
    return out


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def write_log(path: Path, count: int, **overrides: Any) -> list[Envelope]:
    async def main() -> list[Envelope]:
        wal = WriteAheadLog(path, config(**overrides))
        assert wal.recover() == []
        batch = envelopes(count)
        assert await commit(wal, batch) is None
        await wal.close()
        return batch

    result: list[Envelope] = run(main())
    return result


# -- round trips ---------------------------------------------------------------------------
def test_round_trip_through_close_and_recover(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wal"  # parents are created

    async def main() -> list[Envelope]:
        wal = WriteAheadLog(path, config(fsync=True))
        assert not path.exists()  # the constructor does no I/O
        assert wal.recover() == []
        batches = [envelopes(3), envelopes(5, 3), envelopes(1, 8)]
        batches[0][0].ack, batches[0][0].meta, batches[0][0].stage = object(), {"x": 1}, 2
        assert await commit_all(wal, batches) == [None, None, None]
        assert wal.unretired == 9
        await wal.close()
        return [e for b in batches for e in b]

    appended = run(main())
    assert [e.wal_seq for e in appended] == list(range(1, 10))
    before = time.monotonic_ns()
    back = recover(path)
    after = time.monotonic_ns()
    assert ids(back) == ids(appended)
    for got, sent in zip(back, appended, strict=True):
        for field in ("id", "device", "tenant", "tier", "region", "topic", "payload",
                      "received_at", "protocol", "qos", "device_class", "wal_seq"):
            assert getattr(got, field) == getattr(sent, field), field
        assert before <= got.received_ns <= after
        assert got.deadline_ns == got.received_ns
        assert got.ack is None and got.meta is None and got.stage == 0 and got.data is None


def test_sequence_numbers_continue_after_recovery(tmp_path: Path) -> None:
    write_log(tmp_path, 5)

    async def main() -> list[Envelope]:
        wal = WriteAheadLog(tmp_path, config())
        assert [e.wal_seq for e in wal.recover()] == [1, 2, 3, 4, 5]
        batch = envelopes(2, 5)
        assert await commit(wal, batch) is None
        await wal.close()
        return batch

    assert [e.wal_seq for e in run(main())] == [6, 7]
    assert len(segments(tmp_path)) == 2  # new appends never go after what was recovered
    assert [e.wal_seq for e in recover(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]


def test_close_commits_what_is_pending(tmp_path: Path) -> None:
    results: list[OSError | None] = []

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(commit_interval_ms=1000))
        wal.recover()
        wal.append(envelopes(10), results.append)
        wal.append([], results.append)
        await wal.close()  # long before the window ends
        assert results == [None, None]
        await wal.close()  # idempotent

    run(main())
    assert ids(recover(tmp_path)) == ids(envelopes(10))


def open_files_under(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                found.append(target)
    return found


def test_close_leaves_no_file_open(tmp_path: Path) -> None:
    write_log(tmp_path, 4)
    wal = WriteAheadLog(tmp_path, config())
    back = wal.recover()
    wal.retire([back[0].wal_seq])  # no loop running: written with the first commit
    run(wal.close())  # the only commit there is
    assert open_files_under(tmp_path) == []
    assert ids(recover(tmp_path)) == ["m1", "m2", "m3"]

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        wal.recover()
        results: list[OSError | None] = []
        wal.append(envelopes(COMMIT_BYTES // 100 + 1, 10), results.append)  # commits at once
        wal.append(envelopes(1, 5), results.append)
        await wal.close()  # waits for the commit in flight, then commits the rest
        assert results == [None, None]
        assert open_files_under(tmp_path) == []

    run(main())


def test_misuse_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        with pytest.raises(WALError, match="not recovered"):
            wal.append(envelopes(1), lambda error: None)
        wal.retire([1])  # nothing to retire yet: ignored
        wal.recover()
        with pytest.raises(WALError, match="only once"):
            wal.recover()
        await wal.close()
        with pytest.raises(WALError, match="closed"):
            wal.append(envelopes(1), lambda error: None)
        wal.retire([1])  # ignored
        never = WriteAheadLog(tmp_path / "never", config())
        await never.close()
        assert not (tmp_path / "never").exists()

    run(main())


def test_an_encoding_error_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        wal.recover()
        bad = envelopes(3)
        bad[1].payload = object()  # type: ignore[assignment]
        with pytest.raises(TypeError):
            wal.append(bad, lambda error: None)
        assert wal.unretired == 0
        assert await commit(wal, envelopes(2, 10)) is None
        await wal.close()

    run(main())
    assert ids(recover(tmp_path)) == ["m10", "m11"]


# -- retirement and segments ---------------------------------------------------------------
def test_retired_records_are_not_replayed(tmp_path: Path) -> None:
    async def first() -> None:
        wal = WriteAheadLog(tmp_path, config())
        wal.recover()
        batch = envelopes(100)
        assert await commit(wal, batch) is None
        wal.retire(e.wal_seq for e in batch if e.wal_seq % 2 == 0)
        wal.retire([])
        assert wal.unretired == 50
        await wal.close()

    run(first())
    metrics = Metrics()

    async def second() -> None:
        wal = WriteAheadLog(tmp_path, config(), metrics)
        back = wal.recover()
        assert [e.wal_seq for e in back] == list(range(1, 101, 2))
        wal.retire([e.wal_seq for e in back])
        wal.retire([e.wal_seq for e in back])  # twice: no harm
        wal.retire([0, 10_000])  # unknown: ignored
        assert wal.unretired == 0
        await wal.close()

    run(second())
    assert sample(metrics, "iotgw_wal_retired_records_total") == 50
    assert sample(metrics, "iotgw_wal_recovered_records_total") == 50
    assert recover(tmp_path) == []
    assert segments(tmp_path) == []  # all retired: deleted at start


def test_retiring_before_the_commit_is_fine(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        wal.recover()
        batch = envelopes(4)
        future: asyncio.Future[OSError | None] = asyncio.get_running_loop().create_future()
        wal.append(batch, future.set_result)
        wal.retire([batch[0].wal_seq, batch[3].wal_seq])  # still pending
        assert await future is None
        await wal.close()

    run(main())
    assert ids(recover(tmp_path)) == ["m1", "m2"]


def test_fully_retired_segments_are_deleted_but_not_the_active_one(tmp_path: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096), metrics)
        wal.recover()
        batches = [envelopes(30, 30 * i) for i in range(10)]  # ~5 KiB each: a segment each
        assert await commit_all(wal, batches) == [None] * 10
        files = segments(tmp_path)
        assert len(files) == 10
        for batch in batches[:-1]:
            wal.retire([e.wal_seq for e in batch])
        assert await commit(wal, []) is None  # the next commit deletes them
        # The last one is full: the retire markers went to a new, active, segment.
        last, active = segments(tmp_path)
        assert last == files[-1] and active.name > last.name
        wal.retire([e.wal_seq for e in batches[-1]])
        assert await commit(wal, []) is None
        assert segments(tmp_path) == [active]  # all retired, but active: it stays
        assert sample(metrics, "iotgw_wal_segments") == 1
        await wal.close()

    run(main())
    assert sample(metrics, "iotgw_wal_segments_deleted_total") == 10
    assert recover(tmp_path) == []
    assert segments(tmp_path) == []


def test_a_pinned_segment_does_not_bring_back_what_was_retired(tmp_path: Path) -> None:
    """Segment A keeps one unretired record; the markers that retired A's other records live
    in B; deleting B must not bring them back (a summary of A is written first)."""

    async def main() -> tuple[list[Envelope], list[Envelope]]:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096))
        wal.recover()
        a, b, c, d = (envelopes(30, 30 * i) for i in range(4))
        assert await commit(wal, a) is None
        assert await commit(wal, b) is None  # B is active now
        wal.retire([e.wal_seq for e in a[1:]])  # markers go to B
        assert await commit(wal, c) is None  # C is active now
        wal.retire([e.wal_seq for e in b])  # B is all retired: deleted
        assert await commit(wal, d) is None
        assert len(segments(tmp_path)) == 3  # A (pinned), C, D
        await wal.close()
        return a, c + d

    a, rest = run(main())
    assert ids(recover(tmp_path)) == ids(a[:1] + rest)


# -- compaction ----------------------------------------------------------------------------
def test_compaction_keeps_what_its_markers_retired_in_older_segments(tmp_path: Path) -> None:
    """B holds the markers that retired most of A's records and is itself pinned by one
    record; compacting B alone (A is mostly live) drops those markers, so B's new file
    carries a summary of A instead: A's retired records do not come back."""

    async def main() -> tuple[list[Envelope], list[Envelope], list[Envelope]]:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096))
        wal.recover()
        a, b, c = (envelopes(30, 30 * i) for i in range(3))
        assert await commit(wal, a) is None  # A is full
        assert await commit(wal, b[:10]) is None  # B is active now
        wal.retire([e.wal_seq for e in a[:3]])
        assert await commit(wal, b[10:]) is None  # the markers went to B; B is full
        wal.retire([e.wal_seq for e in b[1:]])
        assert await commit(wal, c) is None  # C is active now: A and B are sealed
        info = {s.first: s for s in wal.sealed_segments()}
        first_a, first_b = sorted(info)
        assert (info[first_a].live, info[first_b].live) == (27, 1)
        size = os.path.getsize(info[first_b].path)
        result = await wal.compact(first_b)
        assert result is not None and (result.kept, result.dropped) == (1, 29)
        assert result.bytes_before == size > result.bytes_after == os.path.getsize(
            info[first_b].path)
        kinds = [kind for _, _, kind in frames(Path(info[first_b].path))]
        assert kinds == [APPEND, RETIRE_EXCEPT]
        assert [s.records for s in wal.sealed_segments()] == [30, 1]
        await wal.close()
        return a[3:], b[:1], c

    kept_a, kept_b, c = run(main())
    assert ids(recover(tmp_path)) == ids(kept_a + kept_b + c)


def test_compaction_refuses_what_it_cannot_compact(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096))
        with pytest.raises(WALError, match="not recovered yet"):
            wal.compact(1)
        wal.recover()
        assert wal.sealed_segments() == []
        assert await commit(wal, envelopes(30)) is None
        assert await commit(wal, envelopes(30, 30)) is None
        (sealed,) = wal.sealed_segments()
        active = segments(tmp_path)[-1].name
        with pytest.raises(WALError, match=f"segment {active} is still being written"):
            wal.compact(int(active[4:24]))
        with pytest.raises(WALError, match=r"no segment wal-00000000000000000999\.log"):
            wal.compact(999)
        first = wal.compact(sealed.first)
        with pytest.raises(WALError, match="is being compacted already"):
            wal.compact(sealed.first)
        assert await first is not None  # nothing retired: rewritten all the same
        assert await wal.compact(sealed.first) is not None  # done: may be compacted again
        await wal.close()
        with pytest.raises(WALError, match="closed"):
            wal.compact(sealed.first)

    run(main())


@pytest.mark.parametrize("deleted", ["before it is read", "after it is read"])
def test_a_segment_retired_while_it_is_compacted_is_not_brought_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deleted: str) -> None:
    """The segment's last records are retired, and the commit that follows deletes it, while
    the compaction thread works: the compacted file is not renamed into its place."""
    from gateway import wal as wal_module

    rewrite = wal_module._rewrite

    def wait_for_the_unlink(path: str) -> None:
        deadline = time.monotonic() + 5
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.001)

    def racing_rewrite(job: Any) -> Any:
        if deleted == "before it is read":
            wait_for_the_unlink(job.path)
            return rewrite(job)
        result = rewrite(job)
        wait_for_the_unlink(job.path)
        return result

    monkeypatch.setattr(wal_module, "_rewrite", racing_rewrite)

    async def main() -> list[Envelope]:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096))
        wal.recover()
        a, b = envelopes(30), envelopes(30, 30)
        assert await commit(wal, a) is None
        assert await commit(wal, b) is None
        (sealed,) = wal.sealed_segments()
        compaction = wal.compact(sealed.first)
        await asyncio.sleep(0.01)  # under way
        wal.retire([e.wal_seq for e in a])  # all of A: the next commit deletes it
        assert await commit(wal, []) is None
        assert await compaction is None
        assert not os.path.exists(sealed.path)
        assert not list(tmp_path.glob("*.compact"))
        await wal.close()
        return b

    b = run(main())
    assert ids(recover(tmp_path)) == ids(b)


def test_close_waits_for_a_compaction(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096))
        wal.recover()
        a = envelopes(30)
        assert await commit(wal, a) is None
        assert await commit(wal, envelopes(30, 30)) is None
        wal.retire([e.wal_seq for e in a[1:]])
        (sealed,) = wal.sealed_segments()
        compaction = wal.compact(sealed.first)
        await wal.close()
        assert compaction.done()
        assert not list(tmp_path.glob("*.compact"))

    run(main())
    assert ids(recover(tmp_path))[:2] == ["m0", "m30"]


def test_a_leftover_compaction_file_is_deleted_at_start(tmp_path: Path) -> None:
    write_log(tmp_path, 40, segment_bytes=4096)
    first = segments(tmp_path)[0]
    leftover = first.with_name(first.name + ".compact")
    leftover.write_bytes(first.read_bytes()[:100])  # torn: the process died writing it
    assert ids(recover(tmp_path)) == ids(envelopes(40))
    assert not leftover.exists()


def test_order_is_kept_across_many_segments(tmp_path: Path) -> None:
    sizes = [1, 7, 30, 2, 64, 13, 5, 40, 1, 22] * 8
    batches, start = [], 0
    for size in sizes:
        batches.append(envelopes(size, start))
        start += size

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096, commit_interval_ms=0.5))
        wal.recover()
        assert await commit_all(wal, batches, pause=True) == [None] * len(batches)
        await wal.close()

    run(main())
    assert len(segments(tmp_path)) > 20
    back = recover(tmp_path)
    assert ids(back) == [e.id for b in batches for e in b]
    assert [e.wal_seq for e in back] == sorted(e.wal_seq for e in back)


def test_refusing_while_too_much_is_unretired(tmp_path: Path) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(max_unretired=10))
        wal.recover()
        batch = envelopes(10)
        assert not wal.refusing
        assert await commit(wal, batch) is None
        assert wal.refusing and wal.unretired == 10
        wal.retire([batch[0].wal_seq])
        assert not wal.refusing and wal.unretired == 9
        await wal.close()

    run(main())


# -- torn and corrupt records --------------------------------------------------------------
def test_a_torn_tail_is_cut_at_every_offset(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    original = tmp_path / "original"
    sent = write_log(original, 6)
    (segment,) = segments(original)
    start, end, kind = frames(segment)[-1]
    assert kind == APPEND
    for cut in range(start, end):
        case = tmp_path / f"cut-{cut}"
        shutil.copytree(original, case)
        victim = case / segment.name
        os.truncate(victim, cut)
        metrics = Metrics()
        with caplog.at_level(logging.WARNING, logger="gateway.wal"):
            caplog.clear()
            back = recover(case, metrics)
        assert ids(back) == ids(sent[:-1]), cut
        torn = cut > start
        assert sample(metrics, "iotgw_wal_corrupt_records_total") == int(torn)
        assert sample(metrics, "iotgw_wal_truncated_bytes_total") == cut - start
        assert victim.stat().st_size == start  # the file is cut there
        if torn:
            assert f"{victim}" in caplog.text and f"offset {start}" in caplog.text
        shutil.rmtree(case)


def test_after_a_cut_appends_go_to_a_new_segment(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    (segment,) = segments(tmp_path)
    with open(segment, "ab") as file:
        file.write(b"\x40\x00\x00\x00garbage")

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        assert ids(wal.recover()) == ["m0", "m1", "m2"]
        assert await commit(wal, envelopes(2, 3)) is None
        await wal.close()

    run(main())
    assert len(segments(tmp_path)) == 2
    assert ids(recover(tmp_path)) == ["m0", "m1", "m2", "m3", "m4"]


@pytest.mark.parametrize("where", ["body", "length", "crc", "kind"])
def test_a_bit_flip_recovers_the_records_before_it(tmp_path: Path, where: str) -> None:
    sent = write_log(tmp_path, 10)
    (segment,) = segments(tmp_path)
    start, end, _ = frames(segment)[5]
    at = {"body": (start + end) // 2, "length": start + 1, "crc": start + 5,
          "kind": start + 8}[where]
    data = bytearray(segment.read_bytes())
    data[at] ^= 0x10
    segment.write_bytes(bytes(data))
    metrics = Metrics()
    assert ids(recover(tmp_path, metrics)) == ids(sent[:5])
    assert sample(metrics, "iotgw_wal_corrupt_records_total") == 1
    assert segment.stat().st_size == start


def test_a_bit_flip_in_one_segment_keeps_the_others(tmp_path: Path) -> None:
    async def main() -> list[Envelope]:
        wal = WriteAheadLog(tmp_path, config(segment_bytes=4096))
        wal.recover()
        batches = [envelopes(30, 30 * i) for i in range(3)]
        assert await commit_all(wal, batches) == [None] * 3
        await wal.close()
        return [e for b in batches for e in b]

    sent = run(main())
    first = segments(tmp_path)[0]
    _, end, _ = frames(first)[10]
    data = bytearray(first.read_bytes())
    data[end - 1] ^= 0x01
    first.write_bytes(bytes(data))
    assert ids(recover(tmp_path)) == ids(sent[:10] + sent[30:])


def test_segment_headers(tmp_path: Path) -> None:
    metrics = Metrics()
    (tmp_path / f"wal-{1:020d}.log").write_bytes(b"IGW")  # torn while being created
    (tmp_path / f"wal-{2:020d}.log").write_bytes(b"NOTAWAL!" + bytes(20))
    (tmp_path / "lock").write_bytes(b"")  # not a segment: left alone
    assert recover(tmp_path, metrics) == []
    assert segments(tmp_path) == []
    assert (tmp_path / "lock").exists()
    assert sample(metrics, "iotgw_wal_corrupt_records_total") == 2

    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / f"wal-{1:020d}.log").write_bytes(HEADER.pack(b"IGWWAL", 2))
    with pytest.raises(WALError, match="format version 2"):
        recover(newer)


def _record(kind: int, body: bytes) -> bytes:
    return FRAME.pack(len(body), zlib.crc32(bytes([kind]) + body), kind) + body


def _append_body(seq: int, name: str) -> bytes:
    return msgspec.msgpack.encode((seq, name, "dev", "acme", "premium", "eu", "t/x", b"\x01",
                                   1.5, "mqtt", 1, "thermo"))


def test_a_segment_written_by_hand_per_the_documented_format(tmp_path: Path) -> None:
    encode = msgspec.msgpack.encode
    first = HEADER.pack(b"IGWWAL", 1) + b"".join(
        _record(APPEND, _append_body(seq, f"a{seq}")) for seq in range(1, 6))
    second = HEADER.pack(b"IGWWAL", 1) + b"".join([
        _record(APPEND, _append_body(10, "b10")),
        _record(RETIRE, encode([2, 10])),
        _record(RETIRE_EXCEPT, encode((1, 10, [3, 4]))),  # 1 and 5 retired, 3 and 4 kept
        _record(APPEND, _append_body(11, "b11")),
        _record(APPEND, _append_body(11, "dup")),  # out of order: cut here
        _record(APPEND, _append_body(12, "lost")),
    ])
    (tmp_path / f"wal-{1:020d}.log").write_bytes(first)
    (tmp_path / f"wal-{10:020d}.log").write_bytes(second)
    metrics = Metrics()
    back = recover(tmp_path, metrics)
    assert ids(back) == ["a3", "a4", "b11"]
    assert back[0].payload == b"\x01" and back[0].received_at == 1.5
    assert sample(metrics, "iotgw_wal_corrupt_records_total") == 1


@pytest.mark.parametrize("record", [
    _record(7, b"\x90"),  # unknown kind
    _record(APPEND, msgspec.msgpack.encode([1, 2, 3])),  # not an append body
    _record(APPEND, _append_body(0, "before the segment's first seq")),
])
def test_records_that_cannot_be_taken_cut_the_segment(tmp_path: Path, record: bytes) -> None:
    good = _record(APPEND, _append_body(5, "ok"))
    (tmp_path / f"wal-{5:020d}.log").write_bytes(HEADER.pack(b"IGWWAL", 1) + good + record)
    metrics = Metrics()
    assert ids(recover(tmp_path, metrics)) == ["ok"]
    assert sample(metrics, "iotgw_wal_corrupt_records_total") == 1


# -- group commit and callbacks ------------------------------------------------------------
def test_group_commit_makes_far_fewer_fsyncs_than_batches(tmp_path: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(fsync=True, commit_interval_ms=2), metrics)
        wal.recover()
        batches = [envelopes(100, 100 * i) for i in range(100)]
        assert await commit_all(wal, batches, pause=True) == [None] * 100
        await wal.close()

    run(main())
    commits = sample(metrics, "iotgw_wal_commits_total")
    fsyncs = sample(metrics, "iotgw_wal_fsync_seconds_count")
    assert sample(metrics, "iotgw_wal_appended_records_total") == 10_000
    assert 1 <= commits <= 20, commits
    assert 1 <= fsyncs <= 25, fsyncs  # one per commit, plus the directory's once
    assert sample(metrics, "iotgw_wal_commit_latency_seconds_count") >= 1
    assert sample(metrics, "iotgw_wal_written_bytes_total") > 10_000 * 100
    assert len(recover(tmp_path)) == 10_000


def test_no_fsync_when_disabled(tmp_path: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config(fsync=False), metrics)
        wal.recover()
        assert await commit(wal, envelopes(10)) is None
        await wal.close()

    run(main())
    assert sample(metrics, "iotgw_wal_commits_total") >= 1
    assert sample(metrics, "iotgw_wal_fsync_seconds_count") == 0


@pytest.mark.parametrize("interval_ms", [0, 2])
def test_done_is_called_on_the_loop_once_per_append_in_order(tmp_path: Path,
                                                             interval_ms: float) -> None:
    big = COMMIT_BYTES // 100 + 1  # records of ~100 bytes: more than COMMIT_BYTES at once

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wal = WriteAheadLog(tmp_path, config(commit_interval_ms=interval_ms))
        wal.recover()
        calls: list[tuple[int, OSError | None]] = []
        appending = False
        sizes = [1, 0, 5, big, 3, 0, 50, big, 1] * 5
        finished = loop.create_future()

        def make(i: int) -> Callable[[OSError | None], None]:
            def done(error: OSError | None) -> None:
                assert not appending  # never from inside append()
                assert threading.current_thread() is threading.main_thread()
                assert asyncio.get_running_loop() is loop
                calls.append((i, error))
                if len(calls) == len(sizes):
                    finished.set_result(None)
            return done

        start = 0
        for i, size in enumerate(sizes):
            appending = True
            wal.append(envelopes(size, start), make(i))
            appending = False
            start += size
            if i % 3 == 0:
                await asyncio.sleep(0)
        await finished
        await asyncio.sleep(0.01)
        assert calls == [(i, None) for i in range(len(sizes))]  # once each, in order
        await wal.close()

    run(main())


def test_a_callback_that_raises_does_not_stop_the_others(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        wal.recover()

        def bad(error: OSError | None) -> None:
            raise RuntimeError("caller bug")

        wal.append(envelopes(1), bad)
        assert await commit(wal, envelopes(1, 1)) is None  # still called, after it
        await wal.close()

    with caplog.at_level(logging.ERROR, logger="gateway.wal"):
        run(main())
    assert "callback raised" in caplog.text


# -- a full disk ---------------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_refuses_then_recovers(tiny_tmpfs: Path) -> None:
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(bytes(256 * 1024))
    path = tiny_tmpfs / "wal"
    metrics = Metrics()

    async def main() -> list[str]:
        wal = WriteAheadLog(path, WALSection(commit_interval_ms=1), metrics)
        assert wal.recover() == []
        acked: list[str] = []
        failed: OSError | None = None
        start = 0
        while failed is None:
            assert start < 2000, "the tmpfs never filled"
            batches = [envelopes(4, start + 4 * i, payload_size=4096) for i in range(4)]
            start += 16
            results = await commit_all(wal, batches)  # several per commit, some behind it
            for batch, error in zip(batches, results, strict=True):
                if error is None:
                    assert failed is None  # everything after a failure fails too
                    acked += ids(batch)
                else:
                    failed = failed or error
        assert failed.errno == errno.ENOSPC
        assert wal.refusing
        assert sample(metrics, "iotgw_wal_refusing") == 1
        assert sample(metrics, "iotgw_wal_commit_errors_total", {"errno": "ENOSPC"}) >= 1

        # Fill what the rollback freed: what is appended now waits for the next probe (about
        # a second), which fails too.
        with contextlib.suppress(OSError), open(tiny_tmpfs / "filler-2", "wb", 0) as more:
            while True:
                more.write(bytes(4096))
        late = await commit(wal, envelopes(2, start, payload_size=4096))
        assert late is not None and late.errno == errno.ENOSPC
        assert wal.refusing

        filler.unlink()
        (tiny_tmpfs / "filler-2").unlink()
        deadline = time.monotonic() + 5
        while wal.refusing:
            assert time.monotonic() < deadline, "still refusing after space came back"
            await asyncio.sleep(0.05)
        batch = envelopes(3, start + 10, payload_size=4096)
        assert await commit(wal, batch) is None
        acked += ids(batch)
        assert sample(metrics, "iotgw_wal_refusing") == 0
        await wal.close()
        return acked

    acked = run(main())
    assert ids(recover(path)) == acked


def test_closing_while_the_disk_is_full(tiny_tmpfs: Path) -> None:
    with contextlib.suppress(OSError), open(tiny_tmpfs / "filler", "wb", 0) as filler:
        while True:
            filler.write(bytes(4096))
    (tiny_tmpfs / "filler").unlink()
    with open(tiny_tmpfs / "filler", "wb", 0) as filler:
        filler.write(bytes(1024 * 1024 - 64 * 1024))  # 64 KiB left

    async def main() -> None:
        wal = WriteAheadLog(tiny_tmpfs / "wal", WALSection(commit_interval_ms=1))
        wal.recover()
        results: list[OSError | None] = []
        while not results or results[-1] is None:
            assert len(results) < 100
            results.append(await commit(wal, envelopes(4, payload_size=4096)))
        assert wal.refusing
        wal.append(envelopes(4, payload_size=4096), results.append)  # waits for the probe
        await wal.close()  # tries once more, fails, says so
        assert results[-1] is not None and results[-1].errno == errno.ENOSPC

    run(main())


def test_a_writer_bug_is_a_failed_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        wal = WriteAheadLog(tmp_path, config())
        wal.recover()
        real_run = wal._writer.run

        def broken(job: Any) -> Any:
            monkeypatch.setattr(wal._writer, "run", real_run)
            raise RuntimeError("writer bug")

        monkeypatch.setattr(wal._writer, "run", broken)
        error = await commit(wal, envelopes(2))
        assert error is not None and error.errno == errno.EIO
        assert wal.refusing
        deadline = time.monotonic() + 5
        while wal.refusing:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await commit(wal, envelopes(2, 2)) is None
        await wal.close()

    with caplog.at_level(logging.ERROR, logger="gateway.wal"):
        run(main())
    assert "commit raised" in caplog.text
    assert ids(recover(tmp_path)) == ["m2", "m3"]


# -- the directory -------------------------------------------------------------------------
def test_a_file_where_the_directory_should_be(tmp_path: Path) -> None:
    where = tmp_path / "wal"
    where.write_text("not a directory")
    with pytest.raises(WALError, match=str(where)) as caught:
        recover(where)
    assert isinstance(caught.value, GatewayError) and caught.value.exit_code == 1
    with pytest.raises(WALError, match=str(where)):
        recover(where / "below")


def test_an_unreadable_segment(tmp_path: Path) -> None:
    (tmp_path / f"wal-{1:020d}.log").mkdir()  # a directory with a segment's name
    with pytest.raises(WALError, match="cannot read"):
        recover(tmp_path)


# -- kill -9 -------------------------------------------------------------------------------
CHILD = """
import asyncio, sys, uvloop
from gateway.config import WALSection
from gateway.envelope import Envelope
from gateway.wal import WriteAheadLog

async def main():
    wal = WriteAheadLog(sys.argv[1], WALSection(segment_bytes=65536, commit_interval_ms=1))
    wal.recover()
    acked = []
    def done_for(batch):
        def done(error):
            if error is None:
                print("acked", *[f"{e.id}:{e.wal_seq}" for e in batch], flush=True)
                acked.extend(e.wal_seq for e in batch)
        return done
    for n in range(100000):
        batch = [Envelope(f"k{n}-{i}", "d", "t", "premium", "r", "t/x", bytes(64), 0, 0.0,
                          qos=1) for i in range(5)]
        wal.append(batch, done_for(batch))
        if n % 20 == 19 and len(acked) > 10:
            seqs = acked[:10]
            del acked[:10]
            print("retiring", *seqs, flush=True)
            wal.retire(seqs)
            # The markers go with the next commit: say so once it is done.
            wal.append([], lambda error, seqs=seqs: print("retired", *seqs, flush=True))
        await asyncio.sleep(0.0005)

uvloop.run(main())
"""


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stderr = (tmp_path / "child.stderr").open("w+")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "wal")], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert child.stdout is not None
    acked: dict[str, int] = {}  # id → seq
    retiring: set[int] = set()  # retire() called: may come back (a duplicate), or not
    retired: set[int] = set()  # and committed since: must not come back

    def take(line: str) -> None:
        word, *rest = line.split()
        if word == "acked":
            acked.update((i, int(seq)) for i, seq in (item.split(":") for item in rest))
        else:
            (retiring if word == "retiring" else retired).update(int(seq) for seq in rest)

    try:
        deadline = time.monotonic() + 30
        while len(acked) < 1500 or len(retired) < 50:
            line = child.stdout.readline()
            if not line:
                stderr.seek(0)
                pytest.fail(f"the child exited ({child.wait()}) early: {stderr.read()}")
            assert time.monotonic() < deadline
            take(line)
        child.send_signal(signal.SIGKILL)
        for line in child.stdout:  # whatever it printed before it died
            take(line)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        stderr.close()
    back = recover(tmp_path / "wal")
    assert [e.wal_seq for e in back] == sorted({e.wal_seq for e in back})
    seq_of = {e.id: e.wal_seq for e in back}
    for i, seq in acked.items():  # every ack that was not retired is there, as it was
        assert seq in retiring or seq_of.get(i) == seq, i
    assert retired and not retired & set(seq_of.values())  # what was retired stays so
    assert ids(recover(tmp_path / "wal")) == ids(back)  # a second start agrees


# -- a model ---------------------------------------------------------------------------------
def reap(compacting: dict[int, asyncio.Task[CompactionResult | None]]) -> None:
    """Forget the compactions that ended (raising if one failed)."""
    for first, task in list(compacting.items()):
        if task.done():
            task.result()
            del compacting[first]


operations = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 40)),
    st.tuples(st.just("retire"), st.lists(st.integers(0, 10_000), max_size=30)),
    st.tuples(st.just("retire_oldest"), st.integers(1, 60)),
    st.tuples(st.just("reopen"), st.just(0)),
    st.tuples(st.just("compact"), st.integers(0, 3)),
), max_size=40)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_the_log_matches_a_model(tmp_path_factory: pytest.TempPathFactory,
                                 ops: list[tuple[str, Any]]) -> None:
    """Whatever the appends, retirements, compactions and restarts: a start hands back
    exactly the acknowledged records not yet retired, in order, and fully retired segments
    go away. ``compact`` starts compacting up to three sealed segments, the newest (0: all
    of them, and waits), and lets the next operations run while it goes on."""
    path = tmp_path_factory.mktemp("model")
    overrides = {"segment_bytes": 4096, "commit_interval_ms": 0.2}

    async def main() -> None:
        wal = WriteAheadLog(path, config(**overrides))
        model: dict[str, int] = {}  # id → seq, in append order
        assert wal.recover() == []
        counter = 0
        compacting: dict[int, asyncio.Task[CompactionResult | None]] = {}
        for op, arg in ops:
            reap(compacting)
            if op == "append":
                batch = envelopes(arg, counter)
                counter += arg
                assert await commit(wal, batch) is None
                model.update((e.id, e.wal_seq) for e in batch)
            elif op in ("retire", "retire_oldest"):
                live = list(model)
                chosen = (live[:arg] if op == "retire_oldest"
                          else [live[i % len(live)] for i in arg] if live else [])
                wal.retire([model.pop(i) for i in dict.fromkeys(chosen)])
            elif op == "compact":
                sealed = [s.first for s in wal.sealed_segments()
                          if s.live and s.first not in compacting]
                for first in sealed[-arg:] if arg else sealed:  # newest first: summaries
                    compacting[first] = wal.compact(first)
                if arg == 0:
                    await asyncio.gather(*compacting.values())
            else:
                await wal.close()
                reap(compacting)
                assert not compacting
                wal = WriteAheadLog(path, config(**overrides))
                back = wal.recover()
                assert [(e.id, e.wal_seq) for e in back] == list(model.items())
            assert wal.unretired == len(model)
        wal.retire(list(model.values()))
        await wal.close()
        assert len(segments(path)) <= 2
        assert WriteAheadLog(path, config(**overrides)).recover() == []
        assert segments(path) == []

    run(main())


def test_the_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """Not a measurement (that is ``python -m gateway._wal_bench``): it must not rot."""
    from gateway import _wal_bench

    monkeypatch.setattr(sys, "argv", ["_wal_bench", "--dir", str(tmp_path), "--seconds", "0.1",
                                      "--window", "1000", "--rate", "20000"])
    _wal_bench.main()
    out = capsys.readouterr().out
    assert out.count("records/s durable") == 2 and out.count("commit latency p50") == 2
    assert list(tmp_path.iterdir()) == []  # it cleans up
