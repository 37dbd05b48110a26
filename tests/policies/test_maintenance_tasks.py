"""The built-in maintenance tasks, on real files and a real event loop, driven slice by slice
the way the gateway drives them: WAL compaction, audit rotation, registry rebuild."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog, audit_files, verify
from gateway.config import WALSection
from gateway.envelope import Envelope
from gateway.registry import DeviceRegistry
from gateway.wal import WriteAheadLog
from policies.maintenance import TASKS, MaintenanceError, MaintenanceTask
from policies.tasks import (
    AuditRotation,
    MaintenanceTaskError,
    RegistryRebuild,
    TaskContext,
    WALCompaction,
)

SLICE_BOUND_S = 0.05  # generous: the aim is ~1 ms, the machine may be a noisy 2-core VM
SEGMENT_BYTES = 4096  # the smallest allowed: a few dozen records a segment
log = logging.getLogger("test.maintenance")


# -- driving a task like the gateway does ------------------------------------------------------
async def drive(task: Any, context: TaskContext, *, pause_every: int = 0,
                pause_s: float = 0.0) -> float:
    """Run ``task.steps(context)`` to its end, one next() per slice, the loop turning between
    slices (and, every ``pause_every`` slices, a paused window of ``pause_s``); the longest
    slice, in seconds."""
    steps = task.steps(context)
    longest = 0.0
    slices = 0
    while True:
        start = time.perf_counter()
        try:
            delay = next(steps)
        except StopIteration:
            return max(longest, time.perf_counter() - start)
        longest = max(longest, time.perf_counter() - start)
        slices += 1
        await asyncio.sleep(delay or 0)
        if pause_every and slices % pause_every == 0:
            await asyncio.sleep(pause_s)


def context(*, wal: WriteAheadLog | None = None, audit: AuditLog | None = None,
            registry_path: str | None = None,
            installed: list[DeviceRegistry] | None = None) -> TaskContext:
    sink = installed if installed is not None else []
    return TaskContext(wal=wal, audit=audit, registry_path=registry_path,
                       tiers=("critical", "premium", "standard"), install_registry=sink.append,
                       log=log)


def test_the_three_tasks_are_registered_by_name() -> None:
    assert TASKS["wal-compaction"] is WALCompaction
    assert TASKS["audit-rotation"] is AuditRotation
    assert TASKS["registry-rebuild"] is RegistryRebuild
    for name in ("wal-compaction", "audit-rotation", "registry-rebuild"):
        task = TASKS[name]({})
        assert isinstance(task, MaintenanceTask)
        assert task.name == name


@pytest.mark.parametrize(("name", "options", "message"), [
    ("wal-compaction", {"max_live_fraction": 0}, "options.max_live_fraction: expected a number "
                                                 "in (0, 1], got 0"),
    ("wal-compaction", {"max_live_fraction": 1.5}, "in (0, 1], got 1.5"),
    ("wal-compaction", {"max_live_fraction": "half"}, "expected a number, got 'half'"),
    ("wal-compaction", {"max_live_fraction": True}, "expected a number, got True"),
    ("wal-compaction", {"max_live": 0.5}, "unknown option 'max_live' (known: max_live_fraction)"),
    ("audit-rotation", {"retain_days": -1}, "options.retain_days: expected a number > 0, got -1"),
    ("audit-rotation", {"retain_days": float("nan")}, "expected a number, got nan"),
    ("audit-rotation", {"keep": 3}, "unknown option 'keep' (known: retain_days)"),
    ("registry-rebuild", {"path": "x.csv"}, "unknown option 'path' (known: rows_per_slice)"),
    ("registry-rebuild", {"rows_per_slice": 0}, "rows_per_slice: expected an integer"),
])
def test_bad_options_are_refused_clearly(name: str, options: dict[str, Any],
                                         message: str) -> None:
    with pytest.raises(MaintenanceError, match=f"task '{name}'") as caught:
        TASKS[name](options)
    assert message in str(caught.value)


# -- wal-compaction ---------------------------------------------------------------------------
def wal_config(**overrides: Any) -> WALSection:
    return WALSection(**{"fsync": False, "segment_bytes": SEGMENT_BYTES,
                         "commit_interval_ms": 0.5, **overrides})


def envelopes(start: int, n: int) -> list[Envelope]:
    return [Envelope(id=f"m{i}", device=f"dev-{i % 5}", tenant="acme", tier="premium",
                     region="eu", topic=f"t/dev-{i % 5}", payload=i.to_bytes(4, "big") * 25,
                     received_ns=0, received_at=1.7e9 + i, protocol="mqtt", qos=1,
                     device_class="thermo")
            for i in range(start, start + n)]


async def append(wal: WriteAheadLog, batch: list[Envelope]) -> None:
    done: asyncio.Future[OSError | None] = asyncio.get_running_loop().create_future()
    wal.append(batch, done.set_result)
    assert await done is None


def durable(envs: list[Envelope]) -> list[tuple[int | None, str, bytes, float]]:
    """What recovery must give back, field for field that the log stores."""
    return [(e.wal_seq, e.id, bytes(e.payload), e.received_at) for e in envs]


async def pinned_log(path: Path, *, batches: int = 40, pin_every: int = 37) -> tuple[
        WriteAheadLog, dict[int, Envelope]]:
    """A log over many segments whose records are all retired but every ``pin_every``-th,
    each batch retired only once the next one is durable, so that retire markers of a
    segment's records sit in later segments; returns it open, and the unretired records."""
    wal = WriteAheadLog(path, wal_config())
    assert wal.recover() == []
    unretired: dict[int, Envelope] = {}
    previous: list[Envelope] = []
    for b in range(batches):
        batch = envelopes(b * 10, 10)
        await append(wal, batch)
        wal.retire([e.wal_seq for e in previous if e.wal_seq is not None
                    and e.wal_seq % pin_every != 0])
        unretired.update((e.wal_seq, e) for e in previous
                         if e.wal_seq is not None and e.wal_seq % pin_every == 0)
        previous = batch
    unretired.update((e.wal_seq, e) for e in previous if e.wal_seq is not None)
    await append(wal, [])  # let the last markers reach the disk
    return wal, unretired


def recovered(path: Path) -> list[Envelope]:
    return WriteAheadLog(path, wal_config()).recover()


def sizes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.glob("wal-*.log"))}


async def test_compaction_shrinks_pinned_segments_and_recovers_the_same_records(
        tmp_path: Path) -> None:
    path = tmp_path / "wal"
    wal, unretired = await pinned_log(path)
    before = sizes(path)
    sealed = wal.sealed_segments()
    assert len(sealed) >= 5 and all(s.live_fraction < 0.2 for s in sealed[:-1])

    task = WALCompaction({"max_live_fraction": 0.5})
    longest = await drive(task, context(wal=wal))

    after = sizes(path)
    assert task.segments_compacted >= 5
    assert task.bytes_reclaimed == sum(before.values()) - sum(after.values()) > 0
    shrunk = [name for name in after if after[name] < before[name] / 2]
    assert len(shrunk) == task.segments_compacted
    assert not list(path.glob("*.compact"))
    assert longest < SLICE_BOUND_S
    # Compacted, a segment is not compacted again: nothing left below the fraction.
    again = WALCompaction({})
    await drive(again, context(wal=wal))
    assert again.segments_compacted == 0

    await wal.close()
    assert durable(recovered(path)) == durable(sorted(unretired.values(),
                                                      key=lambda e: e.wal_seq or 0))


async def test_compaction_of_a_reopened_log_recovers_the_same_records(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    wal, _ = await pinned_log(path)
    await wal.close()
    baseline = tmp_path / "baseline"
    shutil.copytree(path, baseline)
    expected = durable(recovered(baseline))
    assert expected

    wal = WriteAheadLog(path, wal_config())
    assert durable(wal.recover()) == expected
    task = WALCompaction({})
    await drive(task, context(wal=wal))
    assert task.segments_compacted > 0
    assert sum(sizes(path).values()) < sum(sizes(baseline).values())
    await wal.close()
    assert durable(recovered(path)) == expected
    assert durable(recovered(path)) == expected  # and again, after that recovery's own cleanup


async def test_appends_and_retires_go_on_during_and_after_compaction(tmp_path: Path) -> None:
    """A producer appends and retires (and retires pinned records of segments being
    compacted) while the task runs in short windows with long pauses between them."""
    path = tmp_path / "wal"
    wal, unretired = await pinned_log(path, batches=60, pin_every=11)
    stop = asyncio.Event()

    async def producer() -> None:
        n = 10_000
        while not stop.is_set():
            batch = envelopes(n, 5)
            n += 5
            await append(wal, batch)
            unretired.update((e.wal_seq, e) for e in batch if e.wal_seq is not None)
            # Retire the new batch's first record and the oldest pinned one.
            retired = [min(unretired), batch[0].wal_seq or 0]
            wal.retire(retired)
            for seq in retired:
                del unretired[seq]
            await asyncio.sleep(0.001)

    background = asyncio.create_task(producer())
    task = WALCompaction({"max_live_fraction": 0.9})
    longest = await drive(task, context(wal=wal), pause_every=2, pause_s=0.03)
    stop.set()
    await background
    assert task.segments_compacted > 0
    assert longest < SLICE_BOUND_S

    # After it: the compacted segments take retirements (and are deleted once empty) …
    oldest = sorted(unretired)[: len(unretired) // 2]
    wal.retire(oldest)
    for seq in oldest:
        del unretired[seq]
    batch = envelopes(50_000, 3)  # … and appends (whose commit carries the markers)
    await append(wal, batch)
    unretired.update((e.wal_seq, e) for e in batch if e.wal_seq is not None)
    await wal.close()
    assert durable(recovered(path)) == durable([unretired[s] for s in sorted(unretired)])


async def test_a_crash_in_the_middle_of_a_compaction_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file is written, then the process dies before the rename (the rename fails
    here, and the temp is put back by hand): recovery ignores it, deletes it, and gives
    back the same records; likewise a crash just after the rename."""
    path = tmp_path / "wal"
    wal, _ = await pinned_log(path)
    await wal.close()
    expected = durable(recovered(path))
    wal = WriteAheadLog(path, wal_config())
    wal.recover()
    left: list[tuple[str, str, bytes]] = []

    from gateway import wal as wal_module

    def dying_install(self: Any, temp: str, segment: str, sync: bool) -> bool:
        left.append((temp, segment, Path(temp).read_bytes()))
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal_module._Writer, "install", dying_install)
    with pytest.raises(MaintenanceTaskError,
                       match=r"wal-compaction: cannot rename .*\.compact over .*wal-\d{20}\.log"
                             r": Input/output error"):
        await drive(WALCompaction({}), context(wal=wal))
    await wal.close()
    monkeypatch.undo()
    temp, segment, compacted = left[0]
    assert len(compacted) < Path(segment).stat().st_size

    Path(temp).write_bytes(compacted[: len(compacted) // 2])  # torn, as a crash leaves it
    assert durable(recovered(path)) == expected
    assert not Path(temp).exists()

    Path(temp).write_bytes(compacted)
    os.replace(temp, segment)  # a crash just after the rename
    assert durable(recovered(path)) == expected


async def test_a_corrupt_segment_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "wal"
    wal, _ = await pinned_log(path)
    first = wal.sealed_segments()[0]
    data = bytearray(Path(first.path).read_bytes())
    data[200] ^= 0xFF  # inside the second record: its CRC no longer matches
    Path(first.path).write_bytes(bytes(data))
    with pytest.raises(MaintenanceTaskError, match=r"wal-compaction: cannot compact "
                                                   r".*wal-\d{20}\.log: corrupt record at "
                                                   r"offset \d+"):
        await drive(WALCompaction({}), context(wal=wal))
    assert Path(first.path).read_bytes() == data
    assert not list(path.glob("*.compact"))
    await wal.close()


async def test_a_task_stopped_mid_compaction_lets_it_finish(tmp_path: Path) -> None:
    """The window ends (the gateway closes the generator) while a segment is rewritten: the
    rewrite completes on its own, and close() waits for it."""
    path = tmp_path / "wal"
    wal, unretired = await pinned_log(path)
    steps = WALCompaction({}).steps(context(wal=wal))
    assert next(steps) == pytest.approx(0.01)  # waiting for the first segment's rewrite
    steps.close()
    await wal.close()
    assert not list(path.glob("*.compact"))
    assert durable(recovered(path)) == durable([unretired[s] for s in sorted(unretired)])


async def test_nothing_to_compact(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    await drive(WALCompaction({}), context())
    assert "wal-compaction: no write-ahead log in use; nothing to do" in caplog.text
    wal = WriteAheadLog(tmp_path, wal_config())
    wal.recover()
    await append(wal, envelopes(0, 3))
    await drive(WALCompaction({}), context(wal=wal))
    assert "wal-compaction: no sealed segment; nothing to do" in caplog.text
    await wal.close()


# -- audit-rotation ---------------------------------------------------------------------------
def open_audit(directory: Path, *, max_file_bytes: int = 4096) -> AuditLog:
    audit = AuditLog(directory, node_id="gw-test", max_file_bytes=max_file_bytes)
    audit.open()
    return audit


def fill(audit: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        audit.record("decision", seq=i, tier="gold", detail="x" * 60)


def events(directory: Path) -> list[dict[str, Any]]:
    out = []
    for _, path in audit_files(directory):
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        out.extend(json.loads(line) for line in data.splitlines())
    return out


async def test_rotation_compresses_closed_files_and_the_chain_still_verifies(
        tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 100)  # several files, rotated by size
    plain_before = audit_files(directory)
    assert len(plain_before) >= 3
    head_before = audit.head
    last_line_before = plain_before[-1][1].read_bytes().splitlines()[-1]

    task = AuditRotation({})
    longest = await drive(task, context(audit=audit))
    assert longest < SLICE_BOUND_S

    files = audit_files(directory)
    assert [p.name for _, p in files[:-1]] == [p.name + ".gz" for _, p in plain_before]
    assert task.compressed == [p.name for _, p in files[:-1]]
    current = audit.current_file
    assert current is not None and files[-1][1] == current
    assert not list(directory.glob("*.tmp"))
    rotated, archived = events(directory)[-2:]
    assert rotated["event"] == "audit.rotated"
    assert rotated["closed"] == plain_before[-1][1].name
    assert rotated["file"] == current.name and rotated["reason"] == "maintenance"
    assert rotated["prev"] == hashlib.sha256(last_line_before).hexdigest() == head_before
    assert archived["event"] == "audit.archived"
    assert archived["compressed"] == task.compressed and archived["deleted"] == []
    assert archived["bytes_after"] < archived["bytes_before"]

    fill(audit, 5, start=100)
    audit.close()
    result = verify(directory)
    assert result.ok, result.error
    assert result.records == 100 + 2 + 5
    assert result.head == audit.head

    # Resume-at-open continues the chain after the rotation.
    audit = open_audit(directory)
    fill(audit, 3, start=200)
    audit.close()
    assert verify(directory).ok
    assert verify(directory).records == 110


async def test_a_tampered_gz_file_is_detected(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 60)
    await drive(AuditRotation({}), context(audit=audit))
    audit.close()
    assert verify(directory).ok
    first = audit_files(directory)[0][1]
    assert first.name == "audit-000001.jsonl.gz"
    original = first.read_bytes()

    # A line changed, and the file compressed again: the chain breaks at the next line.
    lines = gzip.decompress(original).splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"seq":2', b'"seq":7')
    first.write_bytes(gzip.compress(b"".join(lines)))
    result = verify(directory)
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("audit-000001.jsonl.gz:4: hash chain broken")

    # Bytes of the compressed stream changed: it no longer decompresses (CRC, or worse).
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    first.write_bytes(bytes(damaged))
    result = verify(directory)
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("audit-000001.jsonl.gz:")
    assert "cannot decompress" in result.error or "hash chain broken" in result.error \
        or "not JSON" in result.error

    first.write_bytes(original[:-20])  # cut short
    result = verify(directory)
    assert not result.ok and result.error is not None and "audit-000001.jsonl.gz:" in result.error


async def test_retention_deletes_the_oldest_compressed_files_only(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 100)
    await drive(AuditRotation({}), context(audit=audit))
    gz = [p for _, p in audit_files(directory) if p.suffix == ".gz"]
    assert len(gz) >= 4
    old = time.time() - 40 * 86400
    for path in gz[:2] + gz[3:4]:  # the third is recent: the fourth must stay too (no hole)
        os.utime(path, (old, old))
    fill(audit, 30, start=100)

    task = AuditRotation({"retain_days": 30})
    await drive(task, context(audit=audit))
    assert task.deleted == [p.name for p in gz[:2]]
    assert not gz[0].exists() and not gz[1].exists() and gz[3].exists()
    assert events(directory)[-1]["deleted"] == task.deleted
    audit.close()
    result = verify(directory)  # the chain left starts elsewhere, and is whole
    assert result.ok, result.error


async def test_a_crash_while_compressing_leaves_a_whole_copy(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 60)
    audit.close()
    plain = audit_files(directory)[0][1]
    # Crashed after the rename, before the unlink: both copies exist; a torn temp too.
    (directory / (plain.name + ".gz")).write_bytes(gzip.compress(plain.read_bytes()))
    (directory / (plain.name + ".gz.tmp")).write_bytes(b"\x1f\x8b torn")
    assert audit_files(directory)[0][1] == plain
    assert verify(directory).ok

    audit = open_audit(directory)
    await drive(AuditRotation({}), context(audit=audit))
    audit.close()
    assert not plain.exists()
    assert verify(directory).ok


async def test_open_resumes_after_compressed_files(tmp_path: Path) -> None:
    """The newest file holds no complete line (cut by a crash): the head is read from the
    compressed file before it. And a newest file compressed by hand starts a new one."""
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 30)
    await drive(AuditRotation({}), context(audit=audit))
    audit.close()
    newest = audit_files(directory)[-1][1]
    newest.write_bytes(b'{"ts":"torn')  # only a torn line left
    for _, path in audit_files(directory)[:-1]:
        assert path.suffix == ".gz"
    audit = open_audit(directory)
    fill(audit, 2, start=30)
    audit.close()
    result = verify(directory)
    assert result.ok, result.error

    newest = audit_files(directory)[-1][1]
    packed = newest.with_name(newest.name + ".gz")
    packed.write_bytes(gzip.compress(newest.read_bytes()))
    newest.unlink()
    audit = open_audit(directory)
    assert audit.current_file == directory / f"audit-{int(newest.name[6:12]) + 1:06d}.jsonl"
    fill(audit, 2, start=40)
    audit.close()
    assert verify(directory).ok


async def test_rotating_an_empty_file_only_compresses(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 60)
    audit.close()
    (directory / "audit-000099.jsonl").touch()  # a fresh, empty current file
    audit = open_audit(directory)
    assert audit.rotate() is None
    task = AuditRotation({})
    await drive(task, context(audit=audit))
    assert audit.current_file == directory / "audit-000099.jsonl"
    assert len(task.compressed) >= 2
    audit.close()
    assert verify(directory).ok


async def test_audit_rotation_failures_name_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    audit = open_audit(directory)
    fill(audit, 60)
    current = audit.current_number
    assert current is not None
    blocker = directory / f"audit-{current + 1:06d}.jsonl"
    blocker.mkdir()  # the next file cannot be created
    with pytest.raises(MaintenanceTaskError,
                       match=r"audit-rotation: cannot rotate the audit log in .*: File exists"):
        await drive(AuditRotation({}), context(audit=audit))
    blocker.rmdir()
    (directory / "audit-000001.jsonl.gz.tmp").mkdir()  # the first gzip cannot be written
    with pytest.raises(MaintenanceTaskError,
                       match=r"audit-rotation: .*audit-000001\.jsonl\.gz\.tmp: Is a directory"):
        await drive(AuditRotation({}), context(audit=audit))
    (directory / "audit-000001.jsonl.gz.tmp").rmdir()
    await drive(AuditRotation({}), context(audit=audit))
    audit.close()
    assert verify(directory).ok


def test_options_must_be_a_table() -> None:
    with pytest.raises(MaintenanceError, match=r"task 'audit-rotation': options: expected a "
                                               r"table, got \[1\]"):
        AuditRotation([1])  # type: ignore[arg-type]


async def test_no_audit_log_or_a_closed_one(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    await drive(AuditRotation({}), context())
    assert "audit-rotation: no audit log in use; nothing to do" in caplog.text
    closed = AuditLog(tmp_path, node_id="gw")
    with pytest.raises(MaintenanceTaskError, match=r"audit-rotation: the audit log in .* is not "
                                                   r"open"):
        await drive(AuditRotation({}), context(audit=closed))


# -- registry-rebuild -------------------------------------------------------------------------
def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    text = "device,tenant,tier,device_class,region\n"
    text += "".join(f"{d},{t},{tier},thermo,eu\n" for d, t, tier in rows)
    path.write_text(text)


async def test_rebuild_swaps_the_new_registry_in(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    write_csv(path, [("dev-1", "acme", "premium")])
    installed: list[DeviceRegistry] = []
    await drive(RegistryRebuild({}), context(registry_path=str(path), installed=installed))
    assert [list(r) for r in installed] == [["dev-1"]]

    write_csv(path, [("dev-1", "acme", "critical"), ("dev-2", "globex", "standard")])
    task = RegistryRebuild({})
    await drive(task, context(registry_path=str(path), installed=installed))
    new = installed[-1]
    assert task.devices == 2 and sorted(new) == ["dev-1", "dev-2"]
    info = new.lookup("dev-1")
    assert info is not None and info.tier == "critical"


async def test_rebuild_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text('[devices."dev-9"]\ntenant = "acme"\ntier = "premium"\nsite = "p3"\n')
    installed: list[DeviceRegistry] = []
    await drive(RegistryRebuild(None), context(registry_path=str(path), installed=installed))
    info = installed[0].lookup("dev-9")
    assert info is not None and info.attributes == {"site": "p3"}


@pytest.mark.parametrize(("content", "reason"), [
    ("device,tenant,tier,device_class,region\ndev-1,acme,gold,thermo,eu\n",
     ":2: unknown tier 'gold'"),
    ("device,tenant\n", ":1: expected header device,tenant,tier,device_class,region"),
    ("device,tenant,tier,device_class,region\ndev-1,a,premium,c,eu\ndev-1,a,premium,c,eu\n",
     ":3: duplicate device 'dev-1'"),
])
async def test_a_broken_file_keeps_the_old_registry_and_says_why(
        tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(content)
    installed: list[DeviceRegistry] = []
    with pytest.raises(MaintenanceTaskError) as caught:
        await drive(RegistryRebuild({}), context(registry_path=str(path), installed=installed))
    message = str(caught.value)
    assert message.startswith(f"registry-rebuild: registry {path}{reason}")
    assert message.endswith("; the registry in use is unchanged")
    assert installed == []


async def test_a_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "gone.csv"
    with pytest.raises(MaintenanceTaskError,
                       match=f"registry-rebuild: registry {path}: cannot read: No such file"):
        await drive(RegistryRebuild({}), context(registry_path=str(path)))


async def test_no_registry_configured_ends_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    steps = RegistryRebuild({}).steps(context(registry_path=None))
    with pytest.raises(StopIteration):
        next(steps)
    assert "registry-rebuild: no device registry configured; nothing to do" in caplog.text


async def test_a_large_registry_is_parsed_off_the_loop(tmp_path: Path) -> None:
    """200k rows take a good fraction of a second to parse: the loop keeps turning."""
    path = tmp_path / "devices.csv"
    write_csv(path, [(f"dev-{i:07d}", f"tenant-{i % 50}", "standard") for i in range(200_000)])
    installed: list[DeviceRegistry] = []
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    background = asyncio.create_task(ticker())
    started = time.perf_counter()
    longest = await drive(RegistryRebuild({}), context(registry_path=str(path),
                                                       installed=installed))
    elapsed = time.perf_counter() - started
    done.set()
    await background
    assert len(installed[0]) == 200_000
    assert longest < SLICE_BOUND_S
    assert ticks >= 3 and elapsed > 0
