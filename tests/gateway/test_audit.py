"""The audit log: the hash chain across rotation and restarts, tampering, summaries, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    audit_files,
    audit_group,
    compress_file,
    config_hash,
    expired_files,
    verify,
)
from gateway.errors import GatewayError

ROOT = Path(__file__).parents[2]


def write_records(directory: Path, n: int, *, max_file_bytes: int = 4096,
                  node_id: str = "gw-test") -> AuditLog:
    log = AuditLog(directory, node_id=node_id, max_file_bytes=max_file_bytes)
    log.open()
    for i in range(n):
        log.record("decision", seq=i, tier="gold", detail="x" * 40)
    log.close()
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A directory whose chain spans several files (about 25 records each)."""
    directory = tmp_path / "audit"
    write_records(directory, 100)
    assert len(audit_files(directory)) >= 3
    return directory


# -- the records -------------------------------------------------------------------------
def test_records_carry_fixed_keys_and_chain_from_genesis(tmp_path: Path) -> None:
    with AuditLog(tmp_path, node_id="gw-7") as log:
        log.record("start", version="1.0", config_sha256=config_hash(b"x = 1\n"),
                   where=tmp_path, listeners={"mqtt": 1883})
        log.record("drain", queued=3)
        head = log.head
    lines = lines_of(tmp_path / "audit-000001.jsonl")
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["ts", "node", "event", "version", "config_sha256", "where",
                           "listeners", "prev"]
    assert first["node"] == "gw-7" and first["event"] == "start"
    assert first["prev"] == GENESIS
    assert first["config_sha256"] == hashlib.sha256(b"x = 1\n").hexdigest()
    assert first["where"] == str(tmp_path)  # not JSON-native: recorded as str()
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2024-01-01T00:00:00.000000Z")
    assert second["prev"] == hashlib.sha256(lines[0].rstrip(b"\n")).hexdigest()
    assert head == hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()
    assert verify(tmp_path).ok


def test_reserved_field_names_are_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path, node_id="n") as log:
        with pytest.raises(ValueError, match="prev"):
            log.record("x", prev="0")
        with pytest.raises(ValueError, match="window_s"):
            log.summarise("shed", "gold", window_s=2)
        log.record("ok")
    assert verify(tmp_path).records == 1


def test_init_does_no_io_and_record_needs_open(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "not-yet", node_id="n")
    assert not (tmp_path / "not-yet").exists()
    assert not log.is_open and log.current_file is None
    with pytest.raises(AuditError, match="not open"):
        log.record("x")
    log.close()  # closing what was never opened is a no-op
    with pytest.raises(ValueError):
        AuditLog(tmp_path, node_id="n", max_file_bytes=0)


# -- rotation and restarts ---------------------------------------------------------------
def test_chain_is_intact_across_rotation(chain: Path) -> None:
    files = audit_files(chain)
    assert [n for n, _ in files] == list(range(1, len(files) + 1))
    for _, path in files:
        assert path.stat().st_size <= 4096
    # the first record of each later file carries the hash of the last line before it
    for (_, before), (_, after) in itertools.pairwise(files):
        last = lines_of(before)[-1].rstrip(b"\n")
        assert json.loads(lines_of(after)[0])["prev"] == hashlib.sha256(last).hexdigest()
    result = verify(chain)
    assert result.ok and result.error is None
    assert (result.records, result.files) == (100, len(files))


def test_a_record_larger_than_max_file_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    with AuditLog(tmp_path, node_id="n", max_file_bytes=4096) as log:
        log.record("small")
        log.record("big", blob="y" * 5000)
        log.record("small")
    assert [len(lines_of(p)) for _, p in audit_files(tmp_path)] == [1, 1, 1]
    assert verify(tmp_path).ok


def test_restart_continues_the_chain(chain: Path) -> None:
    head = verify(chain).head
    with AuditLog(chain, node_id="gw-test", max_file_bytes=4096) as log:
        assert log.head == head
        log.record("start", run=2)
    result = verify(chain)
    assert result.ok and result.records == 101


def test_restart_after_a_single_record(tmp_path: Path) -> None:
    write_records(tmp_path, 1)
    with AuditLog(tmp_path, node_id="n") as log:
        log.record("start")
    result = verify(tmp_path)
    assert result.ok and result.records == 2


def test_restart_on_an_empty_newest_file_takes_the_head_from_the_one_before(
        tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    (tmp_path / "audit-000002.jsonl").touch()  # e.g. created, then the machine went down
    with AuditLog(tmp_path, node_id="n") as log:
        log.record("start")
    assert verify(tmp_path).ok
    assert len(lines_of(tmp_path / "audit-000002.jsonl")) == 1


def test_restart_cuts_a_torn_tail_and_records_it(chain: Path) -> None:
    _, newest = audit_files(chain)[-1]
    torn = b'{"ts":"2024-01-01T00:00:00.000000Z","node":"gw-test","ev'
    with newest.open("ab") as f:
        f.write(torn)
    assert "torn line" in (verify(chain).error or "")
    with AuditLog(chain, node_id="gw-test", max_file_bytes=4096) as log:
        log.record("start")
    result = verify(chain)
    assert result.ok, result.error
    recovered = [json.loads(line) for _, p in audit_files(chain) for line in lines_of(p)][-2]
    assert recovered["event"] == "audit.recovered"
    assert recovered["file"] == newest.name and recovered["bytes_cut"] == len(torn)
    assert recovered["cut_prefix"].startswith('{"ts":"2024-01-01')


def test_restart_when_the_only_line_is_torn(tmp_path: Path) -> None:
    (tmp_path / "audit-000001.jsonl").write_bytes(b'{"ts":"2024')
    with AuditLog(tmp_path, node_id="n") as log:
        log.record("start")
    first = json.loads(lines_of(tmp_path / "audit-000001.jsonl")[0])
    assert first["event"] == "audit.recovered" and first["prev"] == GENESIS
    assert verify(tmp_path).ok


def test_one_writer_per_directory(tmp_path: Path) -> None:
    with AuditLog(tmp_path, node_id="a"):
        second = AuditLog(tmp_path, node_id="b")
        with pytest.raises(AuditError, match="in use by another process"):
            second.open()
    with AuditLog(tmp_path, node_id="b") as log:  # free again once the first is closed
        log.open()  # opening twice is harmless
        log.record("x")


def test_open_reports_an_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(GatewayError, match="cannot open the audit log in"):
        AuditLog(blocker / "audit", node_id="n").open()
    with pytest.raises(AuditError, match="cannot open"):
        AuditLog(blocker, node_id="n").open()


def test_open_reports_an_unreadable_newest_file(tmp_path: Path) -> None:
    (tmp_path / "audit-000001.jsonl").mkdir()  # a directory where the newest file should be
    log = AuditLog(tmp_path, node_id="n")
    with pytest.raises(AuditError, match="cannot open the audit log"):
        log.open()
    assert not log.is_open
    with pytest.raises(AuditError, match="cannot open the audit log"):  # not "in use":
        AuditLog(tmp_path, node_id="n").open()  # the failed open released its lock


# -- write failures: rolled back, the chain stays whole ----------------------------------
@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """Lets a test lower RLIMIT_FSIZE (EFBIG instead of SIGXFSZ), restored afterwards."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_write_is_rolled_back(tmp_path: Path, file_size_limit: None) -> None:
    log = AuditLog(tmp_path, node_id="n")
    log.open()
    log.record("before")
    head = log.head
    size = (tmp_path / "audit-000001.jsonl").stat().st_size
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))  # room for part of a line
    with pytest.raises(AuditError, match="the record was not written"):
        log.record("lost", detail="z" * 100)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    assert (tmp_path / "audit-000001.jsonl").stat().st_size == size  # the partial line is gone
    assert log.head == head
    log.record("after")
    log.close()
    result = verify(tmp_path)
    assert result.ok and result.records == 2


def test_a_partial_line_that_could_not_be_cut_is_cut_before_the_next_write(
        tmp_path: Path, file_size_limit: None, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path, node_id="n")
    log.open()
    log.record("before")
    path = tmp_path / "audit-000001.jsonl"
    size = path.stat().st_size
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(AuditError):
        log.record("lost", detail="z" * 100)
    monkeypatch.undo()
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    assert path.stat().st_size == size + 20  # the partial line is still there
    log.record("after")
    log.close()
    assert verify(tmp_path).ok


def test_open_fails_cleanly_if_the_recovery_record_cannot_be_written(
        tmp_path: Path, file_size_limit: None) -> None:
    write_records(tmp_path, 2)
    path = tmp_path / "audit-000001.jsonl"
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b'{"torn')
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))  # no room for another byte
    log = AuditLog(tmp_path, node_id="n")
    with pytest.raises(AuditError, match="not written"):
        log.open()
    assert not log.is_open
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    assert path.stat().st_size == size and verify(tmp_path).ok  # cut; the chain is whole
    with AuditLog(tmp_path, node_id="n") as log:  # the lock was released
        log.record("start")
    assert verify(tmp_path).ok


def test_a_failed_rotation_keeps_the_current_file(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, node_id="n", max_file_bytes=4096)
    log.open()
    log.record("first", blob="a" * 3000)
    (tmp_path / "audit-000002.jsonl").mkdir()  # the next file cannot be created
    with pytest.raises(AuditError, match="cannot write"):
        log.record("second", blob="b" * 3000)
    assert log.current_file == tmp_path / "audit-000001.jsonl"
    (tmp_path / "audit-000002.jsonl").rmdir()
    log.record("second", blob="b" * 3000)
    assert log.current_file == tmp_path / "audit-000002.jsonl"
    log.close()
    assert verify(tmp_path).ok


# -- rotation on request, compressed files ------------------------------------------------
def test_rotate_continues_the_chain_in_a_new_file(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, node_id="n")
    with pytest.raises(AuditError, match="not open"):
        log.rotate()
    log.open()
    log.record("first")
    head = log.head
    assert log.rotate(reason="test") == tmp_path / "audit-000001.jsonl"
    assert log.current_file == tmp_path / "audit-000002.jsonl" and log.current_number == 2
    (line,) = lines_of(tmp_path / "audit-000002.jsonl")
    record = json.loads(line)
    assert (record["event"], record["closed"], record["file"], record["reason"],
            record["prev"]) == ("audit.rotated", "audit-000001.jsonl", "audit-000002.jsonl",
                                "test", head)
    log.close()
    assert verify(tmp_path).records == 2


def test_rotating_an_empty_file_does_nothing(tmp_path: Path) -> None:
    (tmp_path / "audit-000003.jsonl").touch()
    with AuditLog(tmp_path, node_id="n") as log:
        assert log.rotate() is None
        assert log.current_number == 3
    assert log.current_number is None


def test_compressed_files_read_as_the_plain_ones(chain: Path, tmp_path: Path) -> None:
    plain = [p for _, p in audit_files(chain)]
    before = verify(chain)
    mtime = plain[0].stat().st_mtime_ns
    packed, size, packed_size = compress_file(plain[0])
    assert packed == plain[0].with_name("audit-000001.jsonl.gz") and not plain[0].exists()
    assert size > packed_size == packed.stat().st_size and packed.stat().st_mtime_ns == mtime
    compress_file(plain[1])
    assert [p.name for _, p in audit_files(chain)][:2] == [packed.name, plain[1].name + ".gz"]
    after = verify(chain)
    assert (after.ok, after.records, after.files, after.head) == (True, before.records,
                                                                  before.files, before.head)
    assert verify(packed).ok and verify(packed).records == len(lines_of_gz(packed))
    result = CliRunner().invoke(audit_group, ["verify", str(chain)])
    assert result.exit_code == 0 and f"{before.records} records" in result.output
    # A restart resumes after them, even when the newest file holds nothing complete.
    newest = audit_files(chain)[-1][1]
    for _, path in audit_files(chain)[2:-1]:
        compress_file(path)
    newest.write_bytes(b"")
    with AuditLog(chain, node_id="n", max_file_bytes=4096) as log:
        log.record("after")
    assert verify(chain).ok


def test_only_the_oldest_compressed_files_expire(chain: Path) -> None:
    files = [p for _, p in audit_files(chain)]
    packed = [compress_file(p)[0] for p in files[:-1]]
    old = time.time() - 3600
    for path in [packed[0], packed[2]]:
        os.utime(path, (old, old))
    assert expired_files(chain, older_than=time.time() - 60) == [packed[0]]
    assert expired_files(chain, older_than=time.time() + 60) == packed  # never the plain one


def lines_of_gz(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines(keepends=True)


# -- tampering: each found at the right file:line ---------------------------------------
def tamper(path: Path, edit: Callable[[list[bytes]], object]) -> None:
    lines = lines_of(path)
    edit(lines)
    path.write_bytes(b"".join(lines))


def middle_file(chain: Path) -> Path:
    return audit_files(chain)[1][1]


def test_changed_character_breaks_the_chain_at_the_next_line(chain: Path) -> None:
    path = middle_file(chain)

    def edit(lines: list[bytes]) -> None:
        lines[9] = lines[9].replace(b'"tier":"gold"', b'"tier":"gola"')

    tamper(path, edit)
    result = verify(chain)
    assert not result.ok
    assert result.error == (f"{path.name}:11: hash chain broken (prev does not match line 10)")


def test_deleted_line_is_detected(chain: Path) -> None:
    path = middle_file(chain)
    tamper(path, lambda lines: lines.pop(4))
    assert verify(chain).error == (
        f"{path.name}:5: hash chain broken (prev does not match line 4)")


def test_reordered_lines_are_detected(chain: Path) -> None:
    path = middle_file(chain)

    def edit(lines: list[bytes]) -> None:
        lines[6], lines[7] = lines[7], lines[6]

    tamper(path, edit)
    assert verify(chain).error == (
        f"{path.name}:7: hash chain broken (prev does not match line 6)")


def test_file_truncated_mid_line_is_detected(chain: Path) -> None:
    path = middle_file(chain)
    data = path.read_bytes()
    cut = data.index(b"\n", len(data) // 2) - 10  # ten bytes before the end of a line
    path.write_bytes(data[:cut])
    line = data[:cut].count(b"\n") + 1
    result = verify(chain)
    assert result.error is not None
    assert result.error.startswith(f"{path.name}:{line}: torn line")
    # the rest of the chain was intact up to there
    assert result.records == sum(len(lines_of(p)) for _, p in audit_files(chain)[:1]) + line - 1


def test_forged_line_with_a_valid_prev_is_caught_by_the_line_after_it(chain: Path) -> None:
    path = middle_file(chain)

    def edit(lines: list[bytes]) -> None:
        forged = json.loads(lines[2])
        forged["event"] = "forged"
        forged["prev"] = hashlib.sha256(lines[2].rstrip(b"\n")).hexdigest()
        lines.insert(3, json.dumps(forged, separators=(",", ":")).encode() + b"\n")

    tamper(path, edit)
    assert verify(chain).error == (
        f"{path.name}:5: hash chain broken (prev does not match line 4)")


def test_break_at_a_file_boundary_names_the_previous_file(chain: Path) -> None:
    (_, first), (_, second) = audit_files(chain)[:2]
    tamper(first, lambda lines: lines.pop())  # the last line of the first file
    last_line = len(lines_of(first))
    assert verify(chain).error == (
        f"{second.name}:1: hash chain broken (prev does not match {first.name}:{last_line})")


def test_a_removed_middle_file_is_detected(chain: Path) -> None:
    middle = middle_file(chain)
    middle.unlink()
    error = verify(chain).error or ""
    assert error.startswith("audit-000003.jsonl:1: hash chain broken")


def test_a_changed_first_record_is_detected(chain: Path) -> None:
    first = audit_files(chain)[0][1]

    def edit(lines: list[bytes]) -> None:
        record = json.loads(lines[0])
        record["prev"] = "f" * 64
        lines[0] = json.dumps(record, separators=(",", ":")).encode() + b"\n"

    tamper(first, edit)
    assert verify(chain).error == (
        "audit-000001.jsonl:1: hash chain broken (the first record's prev is not 64 zeros)")


@pytest.mark.parametrize(("line", "why"), [
    (b"{not json\n", "not JSON"),
    (b"\n", "not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'{"ts":"x","event":"y"}\n', "missing prev"),
    (b'{"prev":17}\n', "missing prev"),
])
def test_malformed_lines_are_named(tmp_path: Path, line: bytes, why: str) -> None:
    write_records(tmp_path, 3)
    path = tmp_path / "audit-000001.jsonl"
    lines = lines_of(path)
    lines.insert(1, line)
    path.write_bytes(b"".join(lines))
    result = verify(tmp_path)
    assert (result.ok, result.error, result.records) == (False, f"{path.name}:2: {why}", 1)


def test_verify_a_single_file_and_odd_paths(chain: Path, tmp_path: Path) -> None:
    files = audit_files(chain)
    result = verify(files[1][1])  # a later file: its first prev is taken on trust
    assert result.ok and result.files == 1 and result.records == len(lines_of(files[1][1]))
    assert verify(files[0][1]).ok
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify(empty).error == f"no audit-*.jsonl files in {empty}"
    with pytest.raises(AuditError, match="no such file"):
        verify(tmp_path / "missing")


def test_verify_reports_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "audit-000001.jsonl").mkdir()
    with pytest.raises(AuditError, match="cannot read"):
        verify(tmp_path)


# -- summaries ---------------------------------------------------------------------------
def test_ten_thousand_summarise_calls_in_a_second_make_one_record(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, node_id="n")
    log.open()
    start = time.monotonic()
    for _ in range(10_000):
        log.summarise("shed", "bronze", reason="overload")
    log.summarise("shed", "silver", 5, reason="overload")
    log.flush_summaries(start + 0.5)  # less than a second: nothing yet
    assert log.records_written == 0
    log.flush_summaries(start + 1.0)
    log.flush_summaries(start + 1.5)  # nothing new, nothing written
    log.close()
    records = [json.loads(line) for line in lines_of(tmp_path / "audit-000001.jsonl")]
    assert [(r["event"], r["key"], r["count"], r["reason"]) for r in records] == [
        ("shed", "bronze", 10_000, "overload"), ("shed", "silver", 5, "overload")]
    assert list(records[0]) == ["ts", "node", "event", "key", "count", "window_s", "reason",
                                "prev"]
    assert records[0]["window_s"] == pytest.approx(1.0, abs=0.01)
    assert verify(tmp_path).ok


def test_summaries_per_elapsed_second_and_at_close(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, node_id="n")
    log.open()
    log.summarise("shed", "bronze", 3)
    log.flush_summaries(time.monotonic() + 1.0)
    log.summarise("shed", "bronze", 4)
    log.flush_summaries()  # the real clock: this window is not a second old
    log.close()  # writes what is pending, with the window's actual length
    records = [json.loads(line) for line in lines_of(tmp_path / "audit-000001.jsonl")]
    assert [r["count"] for r in records] == [3, 4]
    assert records[1]["window_s"] < 0.5


def test_summaries_survive_a_failed_write(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, node_id="n")
    log.summarise("shed", "bronze", 7)  # counted even before the log is open
    with pytest.raises(AuditError):
        log.flush_summaries(time.monotonic() + 2.0)
    log.open()
    log.summarise("shed", "bronze", 1)
    log.close()
    record = json.loads(lines_of(tmp_path / "audit-000001.jsonl")[0])
    assert record["count"] == 8


# -- the CLI -----------------------------------------------------------------------------
def test_cli_verify_in_process(chain: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(audit_group, ["verify", str(chain)])
    n_files = len(audit_files(chain))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{chain}: intact, 100 records in {n_files} files; head ")

    result = runner.invoke(audit_group, ["verify", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output

    tamper(middle_file(chain), lambda lines: lines.pop(4))
    result = runner.invoke(audit_group, ["verify", str(chain)])
    assert result.exit_code == 1
    assert "audit-000002.jsonl:5: hash chain broken (prev does not match line 4)" in result.output


def test_cli_verify_reports_read_errors_with_exit_1(tmp_path: Path) -> None:
    (tmp_path / "audit-000001.jsonl").mkdir()
    result = CliRunner().invoke(audit_group, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "cannot read" in result.output


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from gateway.audit import audit_group; audit_group(prog_name='iot-gateway audit')"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_verify_as_a_process(chain: Path, tmp_path: Path) -> None:
    ok = run_cli("verify", str(chain))
    assert ok.returncode == 0 and "intact, 100 records" in ok.stdout

    single = run_cli("verify", str(audit_files(chain)[0][1]))
    assert single.returncode == 0 and "intact" in single.stdout

    missing = run_cli("verify", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    usage = run_cli("verify")
    assert usage.returncode == 2 and "Missing argument" in usage.stderr

    path = middle_file(chain)
    tamper(path, lambda lines: lines.pop(0))
    broken = run_cli("verify", str(chain))
    assert broken.returncode == 1
    assert f"{path.name}:1: hash chain broken" in broken.stdout
