"""The audit log: an append-only, hash-chained record of the gateway's decisions.

Theory of operation
-------------------
Records are JSON lines in ``<dir>/audit-<n>.jsonl`` (n = 000001, 000002, …), one JSON object
per line with its keys in a fixed order::

    {"ts":"2024-05-01T12:00:00.123456Z","node":"gw-1","event":"drain",<fields>,"prev":"<hex>"}

``prev`` is the SHA-256 (hex) of the previous line's bytes, its newline excluded; the first
record of a fresh log carries 64 zeros. The chain runs across files: when a record would
take the current file past ``max_file_bytes`` it goes to a new file (a single record larger
than that gets a file of its own), and its ``prev`` is the hash of the last line of the file
before. Changing, deleting, inserting or reordering a line breaks the chain at the line that
follows the change, and ``verify`` names that line as ``file:line``.

Writing: a record is encoded in full, then handed to the OS with ``os.write`` on an
``O_APPEND`` descriptor before ``record`` returns, so a crash of the process (``kill -9``
included) loses no record that was acknowledged. Only a crash of the machine can, as there is
no fsync per record (there is one at rotation and at close): audit records are rare, and the
write-ahead log is what makes messages durable. A write that fails (disk full, …) is rolled
back, the partial line truncated away, and raises ``AuditError``: the chain on disk stays
whole, and the caller knows the decision was not recorded.

Starting: ``open`` takes an exclusive ``flock`` on ``<dir>/.lock`` (one writer per
directory: two would fork the chain) and continues the chain from the last complete line of
the newest file. A torn last line (a partial line without newline, left when the machine
crashed mid-write or the disk filled up) is cut away, and an ``audit.recovered`` record notes
the bytes cut and how they began, so that ``verify`` keeps accepting the log: it reports a
torn line anywhere as a break.

Summaries: decisions that repeat many times a second (QoS 0 shedding per tier, …) are counted
with ``summarise`` (one dict update) and written by ``flush_summaries``, which the gateway
calls from its timer: one record per (event, key) per elapsed second, with ``count`` and
``window_s`` (the window's actual length; the record's ``ts`` is its end).

Rotation and archiving: ``rotate`` closes the current file at once (not only when it is
full) and continues the chain in the next one, whose first record is ``audit.rotated``.
Closed files may then be compressed (``compress_file``, from a thread: the gzip is written to
``<file>.gz.tmp``, fsynced and renamed to ``<file>.gz`` before the plain file is deleted, so
a crash leaves one whole copy or two), and the oldest compressed ones deleted
(``expired_files``). ``audit_files``, ``verify`` and ``open`` read a ``.gz`` file as the
plain file it holds; when both copies of a file exist, the plain one is read.

What a hash chain alone cannot show: whole lines cut off the end of the newest file, or whole
files removed from either end, leave a valid (shorter) chain. ``verify`` reports the hash of
the last record (the head); comparing it with a copy kept elsewhere (shipped off the node,
printed in a ticket) detects that too.

One writer, one thread: ``AuditLog`` is used from the event loop and takes no lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import msgspec

from gateway.errors import GatewayError

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "GENESIS",
    "AuditError",
    "AuditLog",
    "VerifyResult",
    "audit_files",
    "audit_group",
    "compress_file",
    "config_hash",
    "expired_files",
    "file_number",
    "verify",
]

GENESIS = "0" * 64
"""The ``prev`` of the first record of a fresh log."""
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
SUMMARY_WINDOW_S = 1.0
LOCK_NAME = ".lock"
_FILE_RE = re.compile(r"audit-(\d{6,})\.jsonl(\.gz)?")
GZ_SUFFIX = ".gz"
_GZ_LEVEL = 6
_COPY_CHUNK = 1 << 20
_RESERVED = frozenset({"ts", "node", "event", "prev"})
_SUMMARY_RESERVED = _RESERVED | {"key", "count", "window_s"}
_CUT_PREVIEW_BYTES = 200
_TAIL_CHUNK = 64 * 1024


class AuditError(GatewayError):
    """The audit log cannot be opened, written or read."""


class AuditBusyError(AuditError):
    """Another live process holds the audit log (e.g. the old daemon during a handover)."""


def config_hash(config_bytes: bytes) -> str:
    """SHA-256 (hex) of a config file's bytes, for the ``start`` and ``reload`` records."""
    return hashlib.sha256(config_bytes).hexdigest()


def file_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def file_number(path: str | Path) -> int | None:
    """The ``n`` of ``audit-<n>.jsonl`` or ``audit-<n>.jsonl.gz``; None for another name."""
    m = _FILE_RE.fullmatch(Path(path).name)
    return int(m[1]) if m is not None else None


def audit_files(directory: str | Path) -> list[tuple[int, Path]]:
    """The ``audit-<n>.jsonl`` (or ``.jsonl.gz``) files of ``directory`` as (n, path), oldest
    first; when a file exists in both forms (a crash while compressing), the plain one."""
    directory = Path(directory)
    found: dict[int, Path] = {}
    for entry in os.scandir(directory):
        m = _FILE_RE.fullmatch(entry.name)
        if m is not None:
            number = int(m[1])
            if m[2] is None or number not in found:
                found[number] = directory / entry.name
    return sorted(found.items())


def _is_gz(path: Path) -> bool:
    return path.name.endswith(GZ_SUFFIX)


def compress_file(path: str | Path) -> tuple[Path, int, int]:
    """Gzip closed audit file ``path`` to ``<path>.gz`` and delete it (blocking: run it in a
    thread). Returns (the .gz path, bytes before, bytes after). The .gz keeps the file's
    modification time, which ``expired_files`` goes by."""
    path = Path(path)
    target = path.with_name(path.name + GZ_SUFFIX)
    temp = target.with_name(target.name + ".tmp")
    stat = os.stat(path)
    try:
        with open(path, "rb") as source, open(temp, "wb") as raw:
            with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw,
                               compresslevel=_GZ_LEVEL, mtime=int(stat.st_mtime)) as packed:
                shutil.copyfileobj(source, packed, _COPY_CHUNK)
            raw.flush()
            os.fsync(raw.fileno())
        os.utime(temp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)  # the .gz's name is durable before the only other copy goes
    os.unlink(path)
    _fsync_dir(path.parent)
    return target, stat.st_size, os.stat(target).st_size


def expired_files(directory: str | Path, *, older_than: float) -> list[Path]:
    """The oldest compressed audit files last written before ``older_than`` (UNIX seconds):
    the ones a retention period lets go. Only a run from the oldest file on, so that what is
    left is one unbroken chain (blocking: run it in a thread)."""
    expired = []
    for _, path in audit_files(directory):
        if not _is_gz(path) or os.stat(path).st_mtime >= older_than:
            break
        expired.append(path)
    return expired


def _str_fallback(value: Any) -> Any:
    """Values msgspec cannot encode natively (a Path, …) are recorded as ``str(value)``."""
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_str_fallback)
_decoder = msgspec.json.Decoder()


def _sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _why(err: OSError) -> str:
    return err.strerror or str(err)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_tail(fd: int, size: int) -> tuple[bytes | None, bytes]:
    """(the last complete line without its newline or None, the torn bytes after it)."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        end = buf.rfind(b"\n")
        if end != -1:
            start = buf.rfind(b"\n", 0, end)
            if start != -1:
                return buf[start + 1:end], buf[end + 1:]
    end = buf.rfind(b"\n")
    if end == -1:
        return None, buf
    return buf[:end], buf[end + 1:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Summary:
    __slots__ = ("count", "fields")

    def __init__(self, count: int, fields: dict[str, Any]) -> None:
        self.count = count
        self.fields = fields


class AuditLog:
    """The gateway's audit log in ``directory``; see the module's theory of operation."""

    def __init__(self, directory: str | Path, *, node_id: str,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        if max_file_bytes < 1:
            raise ValueError("max_file_bytes must be at least 1")
        self.directory = Path(directory)
        self.node_id = node_id
        self.max_file_bytes = max_file_bytes
        self.records_written = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._number = 0
        self._size = 0
        self._head = GENESIS
        self._torn = False  # a failed write left bytes past _size that a truncate did not cut
        self._summaries: dict[tuple[str, str], _Summary] = {}
        self._window_start = time.monotonic()

    # -- state --------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def head(self) -> str:
        """SHA-256 of the last record written (the next record's ``prev``)."""
        return self._head

    @property
    def current_file(self) -> Path | None:
        return self.directory / file_name(self._number) if self._fd is not None else None

    @property
    def current_number(self) -> int | None:
        """The ``n`` of the file being written: the files numbered below it are closed."""
        return self._number if self._fd is not None else None

    # -- open / close ---------------------------------------------------------------------
    def open(self) -> None:
        """Create the directory, lock it, continue the chain (cutting a torn tail)."""
        if self._fd is not None:
            return
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            lock_fd = os.open(self.directory / LOCK_NAME,
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as err:
            raise AuditError(f"cannot open the audit log in {self.directory}: {_why(err)}"
                             ) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(lock_fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AuditBusyError(f"the audit log in {self.directory} is in use by another "
                                 f"process (it holds {self.directory / LOCK_NAME})") from None
            raise AuditError(f"cannot lock the audit log in {self.directory}: {_why(err)}"
                             ) from None
        self._lock_fd = lock_fd
        try:
            cut = self._resume()
        except OSError as err:
            self._release()
            raise AuditError(f"cannot open the audit log in {self.directory}: {_why(err)}"
                             ) from None
        self._window_start = time.monotonic()
        if cut is not None:
            name, torn = cut
            try:
                self.record("audit.recovered", file=name, bytes_cut=len(torn),
                            cut_prefix=torn[:_CUT_PREVIEW_BYTES].decode("utf-8", "replace"))
            except AuditError:
                self._release()
                raise

    def _resume(self) -> tuple[str, bytes] | None:
        """Open the newest file for appending and find the head; return a torn tail cut."""
        files = audit_files(self.directory)
        if not files:
            self._create(1)
            self._head = GENESIS
            return None
        number, path = files[-1]
        if _is_gz(path):  # compressed by hand: it is closed; the chain goes on in a new file
            last = self._last_line_before(files)
            self._create(number + 1)
            self._head = GENESIS if last is None else _sha256(last)
            return None
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._fd, self._number = fd, number
        size = os.fstat(fd).st_size
        last, torn = _read_tail(fd, size)
        if torn:
            size -= len(torn)
            os.ftruncate(fd, size)
        self._size = size
        if last is None:  # nothing complete here: the head is in an earlier file, if any
            last = self._last_line_before(files[:-1])
        self._head = GENESIS if last is None else _sha256(last)
        return (path.name, torn) if torn else None

    @staticmethod
    def _last_line_before(files: list[tuple[int, Path]]) -> bytes | None:
        for _, path in reversed(files):
            if _is_gz(path):
                last = _last_line_gz(path)
                if last is not None:
                    return last
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                last, _ = _read_tail(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            if last is not None:
                return last
        return None

    def _create(self, number: int) -> None:
        """Start file ``number`` (it must not exist) and make it the current one."""
        fd = os.open(self.directory / file_name(number),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        with contextlib.suppress(OSError):  # the entry's durability is best effort too
            _fsync_dir(self.directory)
        old, self._fd, self._number, self._size, self._torn = self._fd, fd, number, 0, False
        if old is not None:
            try:
                os.fsync(old)
            finally:
                os.close(old)

    def rotate(self, **fields: Any) -> Path | None:
        """Close the current file now and continue the chain in the next one, whose first
        record is ``audit.rotated`` (``closed``, ``file`` and ``fields``). Returns the file
        closed, or None if the current one is empty (there is nothing to close). Raises
        ``AuditError``.

        The closed file is fsynced here, on the caller's thread: a caller on the event loop
        syncs it from a thread first (``os.fsync`` of any descriptor of the file), which
        leaves little for this one."""
        if self._fd is None:
            raise AuditError(f"the audit log in {self.directory} is not open")
        if self._size == 0:
            return None
        closed = self.directory / file_name(self._number)
        try:
            if self._torn:
                os.ftruncate(self._fd, self._size)
                self._torn = False
            self._create(self._number + 1)
        except OSError as err:
            raise AuditError(f"cannot rotate the audit log in {self.directory}: {_why(err)}"
                             ) from None
        self.record("audit.rotated", closed=closed.name, file=file_name(self._number),
                    **fields)
        return closed

    def close(self) -> None:
        """Write the pending summaries, fsync, release the directory. Idempotent."""
        if self._fd is None:
            return
        try:
            self._flush_summaries(time.monotonic(), force=True)
            try:
                os.fsync(self._fd)
            except OSError as err:
                raise AuditError(f"cannot sync the audit log {self.current_file}: {_why(err)}"
                                 ) from None
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        lock_fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
        if lock_fd is not None:
            os.close(lock_fd)  # releases the flock

    def __enter__(self) -> AuditLog:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def record(self, event: str, **fields: Any) -> None:
        """Append one record; it is with the OS when this returns. Raises ``AuditError``."""
        if fields and not _RESERVED.isdisjoint(fields):
            taken = sorted(k for k in fields if k in _RESERVED)
            raise ValueError(f"audit fields may not be named {taken}")
        body = {"ts": _now_iso(), "node": self.node_id, "event": event}
        body.update(fields)
        body["prev"] = self._head
        line = _encoder.encode(body)
        self._append(line + b"\n")
        self._head = _sha256(line)
        self.records_written += 1

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            raise AuditError(f"the audit log in {self.directory} is not open")
        written = 0
        try:
            if self._torn:
                os.ftruncate(self._fd, self._size)
                self._torn = False
            if self._size and self._size + len(data) > self.max_file_bytes:
                self._create(self._number + 1)
            view = memoryview(data)
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as err:
            if written:
                self._torn = True
                try:
                    os.ftruncate(self._fd, self._size)
                    self._torn = False
                except OSError:
                    pass  # retried before the next write
            raise AuditError(f"cannot write the audit log in {self.directory}: {_why(err)}; "
                             "the record was not written") from None
        self._size += len(data)

    # -- summaries ------------------------------------------------------------------------
    def summarise(self, event: str, key: str, count: int = 1, **fields: Any) -> None:
        """Count ``count`` occurrences of (event, key) for the next summary record.

        The hot path: a dict lookup and an add. ``fields`` of the first call in a window are
        the ones recorded.
        """
        entry = self._summaries.get((event, key))
        if entry is not None:
            entry.count += count
            return
        if fields and not _SUMMARY_RESERVED.isdisjoint(fields):
            raise ValueError("summary fields may not be named "
                             f"{sorted(k for k in fields if k in _SUMMARY_RESERVED)}")
        self._summaries[(event, key)] = _Summary(count, fields)

    def flush_summaries(self, now: float | None = None) -> None:
        """Write the summaries once a second has elapsed (``now``: ``time.monotonic()``).

        Called more often, it writes nothing until the window is a second old. If a write
        fails (``AuditError``), the counts not written are kept for the next call.
        """
        self._flush_summaries(time.monotonic() if now is None else now, force=False)

    def _flush_summaries(self, now: float, *, force: bool) -> None:
        window = now - self._window_start
        if window < SUMMARY_WINDOW_S and not force:
            return
        window_s = round(max(window, 0.0), 3)
        while self._summaries:
            (event, key), entry = next(iter(self._summaries.items()))
            self.record(event, key=key, count=entry.count, window_s=window_s, **entry.fields)
            del self._summaries[(event, key)]
        self._window_start = now


# -- verification -------------------------------------------------------------------------
@dataclass
class VerifyResult:
    ok: bool
    records: int
    """Records checked and found intact (before the break, if there is one)."""
    files: int
    error: str | None
    """The first break, naming file and line: ``audit-000002.jsonl:17: hash chain broken …``"""
    head: str | None = None
    """SHA-256 of the last intact record: compare it with a copy kept off the node."""


def verify(path: str | Path) -> VerifyResult:
    """Check the chain of one audit file, or of a directory's ``audit-*.jsonl`` in order.

    The first record's ``prev`` must be 64 zeros when the chain starts at
    ``audit-000001.jsonl``; a file or directory starting later is taken to continue a chain
    whose beginning is elsewhere. Raises ``AuditError`` if ``path`` cannot be read.
    """
    path = Path(path)
    try:
        if path.is_dir():
            files = [p for _, p in audit_files(path)]
            if not files:
                return VerifyResult(False, 0, 0, f"no audit-*.jsonl files in {path}")
        elif path.exists():
            files = [path]
        else:
            raise AuditError(f"{path}: no such file or directory")
        return _verify_files(files)
    except OSError as err:
        raise AuditError(f"cannot read {err.filename or path}: {_why(err)}") from None


def _verify_files(files: list[Path]) -> VerifyResult:
    expected: str | None = GENESIS if file_number(files[0]) == 1 else None
    previous: tuple[str, int] | None = None  # (file name, line) of the last intact record
    records = 0

    def broken(where: str, why: str) -> VerifyResult:
        return VerifyResult(False, records, len(files), f"{where}: {why}",
                            head=expected if previous is not None else None)

    for file in files:
        lineno = 0
        try:
            lines = _read_lines(file)
            for lineno, raw in enumerate(lines, 1):
                where = f"{file.name}:{lineno}"
                if not raw.endswith(b"\n"):
                    return broken(where, "torn line (no newline at the end: the writer stopped "
                                         "mid-record or the file was cut)")
                line = raw[:-1]
                try:
                    obj = _decoder.decode(line)
                except msgspec.DecodeError:
                    return broken(where, "not JSON")
                if not isinstance(obj, dict):
                    return broken(where, "not a JSON object")
                prev = obj.get("prev")
                if not isinstance(prev, str):
                    return broken(where, "missing prev")
                if expected is not None and prev != expected:
                    if previous is None:
                        why = "the first record's prev is not 64 zeros"
                    elif previous[0] == file.name:
                        why = f"prev does not match line {previous[1]}"
                    else:
                        why = f"prev does not match {previous[0]}:{previous[1]}"
                    return broken(where, f"hash chain broken ({why})")
                expected = _sha256(line)
                previous = (file.name, lineno)
                records += 1
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # a changed or cut .gz
            return broken(f"{file.name}:{lineno + 1}", f"cannot decompress ({err})")
    return VerifyResult(True, records, len(files), None, head=expected)


def _read_lines(file: Path) -> Iterator[bytes]:
    """The lines of an audit file, newline included; a ``.gz`` one read as what it holds."""
    if _is_gz(file):
        with gzip.open(file, "rb") as packed:
            yield from packed
    else:
        with file.open("rb") as plain:
            yield from plain


def _last_line_gz(path: Path) -> bytes | None:
    last = None
    try:
        for raw in _read_lines(path):
            if raw.endswith(b"\n"):
                last = raw[:-1]
    except (EOFError, zlib.error) as err:
        raise gzip.BadGzipFile(f"{path.name}: {err}") from None
    return last


# -- the CLI: `iot-gateway audit verify PATH` ----------------------------------------------
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@click.group("audit", context_settings={"help_option_names": ["-h", "--help"]})
def audit_group() -> None:
    """The tamper-evident audit log."""


@audit_group.command("verify")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def verify_command(path: Path) -> None:
    """Check the hash chain of an audit directory or file.

    Exit 0 if it is intact, 1 at the first break (named as file:line), 2 on a usage error.
    """
    try:
        result = verify(path)
    except AuditError as err:
        raise click.ClickException(str(err)) from None
    if result.ok:
        head = f"; head {result.head}" if result.head else ""
        click.echo(f"{path}: intact, {_plural(result.records, 'record')} in "
                   f"{_plural(result.files, 'file')}{head}")
        return
    click.echo(f"{path}: {result.error} "
               f"({_plural(result.records, 'record')} intact before it)")
    click.get_current_context().exit(1)
