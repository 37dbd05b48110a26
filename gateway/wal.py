"""The write-ahead log: what the gateway acknowledges is on disk before the ack goes out.

Theory of operation
-------------------
One event loop owns the log; one dedicated thread (a single-thread executor) does its disk
I/O. ``append`` runs on the loop: it numbers each envelope (``wal_seq``), encodes it as a
framed record into a pending buffer, and files the batch's ``done`` callback. Nothing else
happens per message: no task, future or lock.

Group commit. The first record that lands in an empty pending buffer starts a timer of
``commit_interval_ms``; when it fires (or at once when more than ``COMMIT_BYTES`` are
pending) the pending buffer becomes a *job*: the thread writes it durably, normally with a
single ``pwritev(..., RWF_DSYNC)`` (write and fdatasync in one syscall: every syscall gives
the GIL away and has to win it back from a busy loop), and reports back on the loop, which
calls every ``done`` of the job, in append order. At most one job is in flight; what is
appended meanwhile accumulates for the next one, which starts as soon as the previous one
ends if its window has already passed. A failed job (``ENOSPC``, ``EIO``) is rolled back (the
segment is truncated to where it was, so a refused record is not replayed), its callbacks
and those of everything still pending get the error, the segment is sealed, and the log
*refuses* (``refusing``) until a probe commit, tried about once a second into a fresh
segment, succeeds.

Retirement. ``retire`` drops records from the in-memory live sets at once and queues retire
markers, which ride along with the next job; a job holding only markers is not fsynced
(a lost marker costs a duplicate on replay, never a loss). A segment whose records are all
retired and that is not the active one is unlinked by the thread, after the job's writes.
Deleting a segment may delete markers that retired records of an *older* segment still on
disk (one pinned by a record that is not yet retired); so that those records do not come
back, the job writes a summary marker for such a segment into the active one first: "every
sequence number in [first, end) of that segment is retired except these few".

Compaction. A few unretired records (messages stuck in retry) pin their whole segment, which
then stays on disk and is read in full by every recovery. ``compact`` rewrites a sealed
segment (any but the active one) so that it holds only its unretired appends, byte for byte,
plus one summary marker for each older segment its own markers retired records of (they
would come back otherwise). Three steps, none of them on the loop: a no-op job through the
commit thread, so that every write to the segment has ended; then, in another thread (group
commits go on meanwhile), the segment is read and the kept frames are written to
``<segment>.compact`` and fsynced; last, as a job of the commit thread (serialized with the
writes and the unlinks of fully retired segments), the temp file is renamed over the segment
and the directory fsynced, unless the segment was deleted meanwhile. (The fsyncs, like all
of the log's, only when ``fsync`` is on.) The second thread reads the loop's live sets with
``in`` only (atomic under the GIL): a sealed segment's set only ever shrinks, and a record
retired meanwhile may be kept (its marker still retires it) or dropped (it is retired). A
crash leaves the old segment or the new one, which recover the same records, and maybe a
temp file, which recovery deletes.

Recovery reads every segment in order, drops what the markers retire, and hands back the
rest in append order. A torn or corrupt record (short frame, length past the end of file,
bad CRC, undecodable body, sequence number out of order) cuts its segment there: the file
is truncated at that offset, the cut is counted and logged, and new appends go to a new
segment. Sequence numbers continue after the highest one seen.

On-disk format (version 1, little-endian)
-----------------------------------------
A directory of segments ``wal-<first seq, 20 digits>.log`` (a segment's name is below every
sequence number it holds and above every one of the segments before it). Each segment::

    header   6s "IGWWAL" magic, u16 format version (1)
    records  u32 length of body | u32 crc32 of (kind byte + body) | u8 kind | body

    kind 1 append          msgpack array [seq, id, device, tenant, tier, region, topic,
                           payload (bin), received_at (float), protocol, qos, device_class]
    kind 2 retire          msgpack array of seqs
    kind 3 retire-except   msgpack array [lo, hi, [seqs]]: every seq in [lo, hi) is retired
                           except the listed ones (the summary of an older segment)

A segment is rotated once it holds ``segment_bytes``. Appends within a segment, and
segments in name order, have increasing sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import struct
import time
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path

import msgspec

from gateway.config import WALSection
from gateway.envelope import Envelope
from gateway.errors import WALError
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

Done = Callable[[OSError | None], None]

MAGIC = b"IGWWAL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<6sH")
SEGMENT_HEADER = _HEADER.pack(MAGIC, FORMAT_VERSION)
HEADER_SIZE = _HEADER.size
_FRAME = struct.Struct("<IIB")
FRAME_SIZE = _FRAME.size
KIND_APPEND = 1
KIND_RETIRE = 2
KIND_RETIRE_EXCEPT = 3
_APPEND_SEED = zlib.crc32(bytes([KIND_APPEND]))  # the crc covers the kind byte as well
SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
COMPACT_SUFFIX = ".compact"
"""A segment being compacted is written to ``<segment>.compact`` first."""
_COMPACT_NAME = re.compile(r"wal-\d{20}\.log\.compact")

COMMIT_BYTES = 1 << 20
"""Commit at once (not at the end of the window) when this much is pending."""
PROBE_INTERVAL_S = 1.0
"""While commits fail, how often to try one into a fresh segment."""
RETIRE_RECORD_SEQS = 65536
"""Most sequence numbers in one retire record (keeps records small)."""

class AppendRecord(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """The body of an append record (a msgpack array); what ``encode_appends`` writes."""

    seq: int
    id: str
    device: str
    tenant: str
    tier: str
    region: str
    topic: str
    payload: bytes
    received_at: float
    protocol: str
    qos: int
    device_class: str


_encode = msgspec.msgpack.Encoder().encode
_decode_append = msgspec.msgpack.Decoder(AppendRecord).decode
_decode_retire = msgspec.msgpack.Decoder(list[int]).decode
_decode_retire_except = msgspec.msgpack.Decoder(tuple[int, int, list[int]]).decode


class _SeqOnly(msgspec.Struct, array_like=True, gc=False):
    seq: int  # the other fields of an append record are skipped, not decoded


_decode_seq = msgspec.msgpack.Decoder(_SeqOnly).decode

_NEW, _OPEN, _CLOSING, _CLOSED = range(4)


def segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def encode_appends(out: bytearray, batch: list[Envelope], seq: int) -> int:
    """Number ``batch`` from ``seq`` and add its append records to ``out``; the next seq.

    The one per-message cost of the log (about 0.5 µs a record, a third of it the crc32):
    a tuple of the durable fields, one msgpack encode, one crc32, one struct.pack."""
    encode, frame, crc32, seed = _encode, _FRAME.pack, zlib.crc32, _APPEND_SEED
    for env in batch:
        env.wal_seq = seq
        body = encode((seq, env.id, env.device, env.tenant, env.tier, env.region, env.topic,
                       env.payload, env.received_at, env.protocol, env.qos, env.device_class))
        out += frame(len(body), crc32(body, seed), KIND_APPEND)
        out += body
        seq += 1
    return seq


def _frame(kind: int, body: bytes) -> bytes:
    return _FRAME.pack(len(body), zlib.crc32(bytes([kind]) + body), kind) + body


class _Segment:
    """One segment file, as the loop sees it."""

    __slots__ = ("deleted", "end", "first", "live", "path", "reserved", "stored",
                 "submitted", "targets")

    def __init__(self, first: int, path: str) -> None:
        self.first = first
        self.end: int | None = None
        """The next segment's first seq: every seq of this one is below it."""
        self.path = path
        self.live: set[int] = set()
        """Seqs appended here and not retired (including ones still pending)."""
        self.targets: set[_Segment] = set()
        """Older segments some of whose records were retired by markers in this one."""
        self.reserved = HEADER_SIZE
        """Bytes on disk, in flight and pending: the rotation check."""
        self.submitted = False
        """Whether a job has written (or is writing) its file."""
        self.deleted = False
        self.stored: int | None = None
        """Append records in its file, when known (read by recovery, or compacted)."""

    def records(self) -> int:
        """Append records in its file (an upper bound for one written since the start)."""
        if self.stored is not None:
            return self.stored
        return self.end - self.first if self.end is not None else len(self.live)


class _Chunk:
    """Pending bytes for one segment, holding the appends numbered [lo, hi)."""

    __slots__ = ("data", "hi", "lo", "segment")

    def __init__(self, segment: _Segment, lo: int) -> None:
        self.segment = segment
        self.data = bytearray()
        self.lo = self.hi = lo


class _Job:
    """One group commit: what the thread writes and unlinks, and what the loop does after."""

    __slots__ = ("callbacks", "chunks", "close", "fsync", "records", "retired", "retired_from",
                 "since_ns", "summaries", "unlinks", "writes")

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytearray, bool]] = []  # path, bytes, new file
        self.unlinks: list[str] = []
        self.fsync = False
        self.close = False
        self.chunks: list[_Chunk] = []
        self.callbacks: list[Done] = []
        self.records = 0
        self.retired: list[int] = []
        self.retired_from: set[_Segment] = set()
        self.summaries: list[_Segment] = []
        self.since_ns = 0


class _Outcome:
    __slots__ = ("error", "fsync_seconds", "written")

    def __init__(self, error: OSError | None, fsync_seconds: list[float], written: int) -> None:
        self.error = error
        self.fsync_seconds = fsync_seconds
        self.written = written


_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)
"""pwritev2 flag: write and fdatasync in one syscall (Linux ≥ 4.7), else two syscalls."""


class _Writer:
    """The disk side: runs one job at a time in the commit thread; holds the open segment.

    Each syscall hands the GIL back and must win it again from a loop that may be busy (up
    to the interpreter's switch interval, 5 ms), so a commit makes as few as it can: one
    ``pwritev`` with ``RWF_DSYNC`` per segment written, a new segment's header included;
    the directory stays open for the fsync that makes a new segment's name durable."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.dir_fd = -1
        self.fd = -1
        self.path = ""
        self.size = 0
        self.dir_synced = True

    def run(self, job: _Job) -> _Outcome:
        syncs: list[float] = []
        written = 0
        error: OSError | None = None
        touched: list[tuple[str, int, bool]] = []  # path, size before the job, created now
        try:
            for path, data, new in job.writes:
                buffers: list[bytes | bytearray] = [data]
                if path != self.path:
                    self._close()
                    self._open(path, new, touched)
                    if new:
                        buffers.insert(0, SEGMENT_HEADER)
                else:
                    touched.append((path, self.size, False))
                start = time.perf_counter()
                written += self._write(buffers, job.fsync)
                if job.fsync:
                    syncs.append(time.perf_counter() - start)
            if job.fsync and not self.dir_synced:  # a new file's name must be durable too
                if self.dir_fd < 0:
                    self.dir_fd = os.open(self.directory,
                                          os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                syncs.append(_timed_fsync(self.dir_fd))
                self.dir_synced = True
        except OSError as err:
            error = err
            self._roll_back(touched)
        finally:
            for path in job.unlinks:
                if path == self.path:
                    self._close()
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    log.error("write-ahead log: cannot delete %s: %s", path, err.strerror)
            if job.close:
                self._close()
                if self.dir_fd >= 0:
                    os.close(self.dir_fd)
                    self.dir_fd = -1
        return _Outcome(error, syncs, written)

    def _open(self, path: str, new: bool, touched: list[tuple[str, int, bool]]) -> None:
        if not new:  # pragma: no cover - a segment is written in one stretch; kept safe anyway
            self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            self.path, self.size = path, os.fstat(self.fd).st_size
            touched.append((path, self.size, False))
            return
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.path, self.size, self.dir_synced = path, 0, False
        touched.append((path, 0, True))

    def _write(self, buffers: list[bytes | bytearray], sync: bool) -> int:
        """Write at the end of the segment (durably if ``sync``); the bytes written."""
        flags = _RWF_DSYNC if sync else 0
        total = sum(map(len, buffers))
        done = os.pwritev(self.fd, buffers, self.size, flags)
        if done < total:  # a short write: the disk is filling up; the next call says why
            with memoryview(b"".join(buffers)) as rest:
                while done < total:
                    done += os.pwritev(self.fd, [rest[done:]], self.size + done, flags)
        if sync and not flags:  # pragma: no cover - kernels older than 4.7
            os.fdatasync(self.fd)
        self.size += total
        return total

    def _roll_back(self, touched: list[tuple[str, int, bool]]) -> None:
        """Undo a failed job, so that none of its records (all refused) is replayed."""
        self._close()
        for path, size, created in reversed(touched):
            try:
                if created:
                    os.unlink(path)
                else:
                    os.truncate(path, size)
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            except OSError as err:  # pragma: no cover - needs a disk failing in two ways
                log.error("write-ahead log: cannot roll back %s to %d bytes: %s (its refused "
                          "records may be replayed as duplicates)", path, size, err.strerror)

    def _close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):  # nothing to do about it
                os.close(self.fd)
            self.fd, self.path = -1, ""

    def install(self, temp: str, path: str, sync: bool) -> bool:
        """Rename a compacted ``temp`` over segment ``path``, unless a job deleted it."""
        if not os.path.exists(path):  # only this thread unlinks segments: no race here
            _unlink_quietly(temp)
            return False
        if self.path == path:  # else the old file's blocks stay held by our descriptor
            self._close()
        try:
            os.replace(temp, path)
        except OSError:
            _unlink_quietly(temp)
            raise
        if sync:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return True


def _timed_fsync(fd: int) -> float:
    start = time.perf_counter()
    os.fsync(fd)
    return time.perf_counter() - start


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _nothing() -> None:
    """A job for the commit thread that only waits for the jobs before it."""


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """A sealed segment, as ``WriteAheadLog.sealed_segments`` lists it."""

    first: int
    """Its name's sequence number: what ``compact`` takes."""
    path: str
    live: int
    """Unretired records."""
    records: int
    """Append records in its file (for one written since the log was opened, an upper
    bound: the sequence numbers it was given)."""

    @property
    def live_fraction(self) -> float:
        return self.live / self.records if self.records else 0.0


@dataclass(frozen=True, slots=True)
class CompactionResult:
    path: str
    kept: int
    """Append records kept (the unretired ones)."""
    dropped: int
    """Retired append records dropped."""
    bytes_before: int
    bytes_after: int

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass(frozen=True, slots=True)
class _Rewrite:
    """What the compaction thread needs: read-only views of the loop's live sets."""

    path: str
    temp: str
    live: Set[int]
    summaries: Sequence[tuple[int, int, Set[int]]]  # an older segment's first, end, live set
    sync: bool


def _rewrite(job: _Rewrite) -> CompactionResult | None:
    """Write the segment's unretired appends and summaries to the temp file (thread side).

    None if the segment is gone (deleted as fully retired). Raises ``WALError`` on a corrupt
    segment or an I/O error; the segment is then left as it was."""
    try:
        with open(job.path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise WALError(f"cannot read the write-ahead log segment {job.path}: "
                       f"{err.strerror}") from None
    size = len(data)
    if size < HEADER_SIZE or data[:len(MAGIC)] != MAGIC:
        raise WALError(f"cannot compact {job.path}: no valid segment header")
    out = [SEGMENT_HEADER]
    live, unpack, crc32 = job.live, _FRAME.unpack_from, zlib.crc32
    kept = dropped = 0
    offset = HEADER_SIZE
    with memoryview(data) as view:
        while offset < size:
            if size - offset < FRAME_SIZE:
                raise WALError(f"cannot compact {job.path}: torn record at offset {offset}")
            length, crc, kind = unpack(data, offset)
            end = offset + FRAME_SIZE + length
            if end > size or crc32(view[offset + FRAME_SIZE - 1:end]) != crc:
                raise WALError(f"cannot compact {job.path}: corrupt record at offset {offset}")
            if kind == KIND_APPEND:
                try:
                    seq = _decode_seq(view[offset + FRAME_SIZE:end]).seq
                except msgspec.DecodeError as err:
                    raise WALError(f"cannot compact {job.path}: undecodable record at offset "
                                   f"{offset} ({err})") from None
                if seq in live:
                    out.append(data[offset:end])
                    kept += 1
                else:
                    dropped += 1
            offset = end
    for first, end_seq, target_live in job.summaries:
        # Membership tests only: iterating a set the loop is shrinking would raise.
        kept_seqs = [seq for seq in range(first, end_seq) if seq in target_live]
        out.append(_frame(KIND_RETIRE_EXCEPT, _encode((first, end_seq, kept_seqs))))
    compacted = b"".join(out)
    try:
        fd = os.open(job.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with memoryview(compacted) as rest:
                written = 0
                while written < len(compacted):
                    written += os.write(fd, rest[written:])
            if job.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        _unlink_quietly(job.temp)
        raise WALError(f"cannot write {job.temp}: {err.strerror}") from None
    return CompactionResult(job.path, kept, dropped, size, len(compacted))


class _Recovery:
    """What reading the segments collects: the unretired envelopes, built as they are read
    (a decoded record is not kept), and the segments' live sets and targets."""

    def __init__(self, segments: list[_Segment], now_ns: int) -> None:
        self.records: dict[int, Envelope] = {}  # unretired, in seq order
        self.summaries: list[tuple[int, int, set[int]]] = []
        self.segments = segments
        self.firsts = [s.first for s in segments]
        self.by_first = {s.first: s for s in segments}
        self.last_seq = 0
        self.now_ns = now_ns
        # Tenants, tiers, topics … repeat: share one str each, as ingest's caches do.
        self.strings: dict[str, str] = {}

    def apply(self, segment: _Segment, bound: int | None, kind: int,
              body: memoryview) -> str | None:
        """Take one record in; the reason it is corrupt, or None."""
        try:
            if kind == KIND_APPEND:
                r = _decode_append(body)
                seq = r.seq
                if seq <= self.last_seq or seq < segment.first or (bound is not None
                                                                   and seq >= bound):
                    return f"sequence number {seq} out of order"
                self.last_seq = seq
                same, now = self.strings.setdefault, self.now_ns
                self.records[seq] = Envelope(
                    r.id, same(r.device, r.device), same(r.tenant, r.tenant),
                    same(r.tier, r.tier), same(r.region, r.region), same(r.topic, r.topic),
                    r.payload, now, r.received_at, same(r.protocol, r.protocol), r.qos,
                    same(r.device_class, r.device_class), deadline_ns=now, wal_seq=seq)
                segment.live.add(seq)
            elif kind == KIND_RETIRE:  # always after the appends it retires
                for seq in _decode_retire(body):
                    self._retire(seq, segment)
            elif kind == KIND_RETIRE_EXCEPT:
                lo, hi, kept = _decode_retire_except(body)
                self.summaries.append((lo, hi, set(kept)))
                target = self.by_first.get(lo)
                if target is not None and target is not segment:
                    segment.targets.add(target)
            else:
                return f"unknown record kind {kind}"
        except msgspec.DecodeError as err:
            return f"undecodable record ({err})"
        return None

    def _retire(self, seq: int, marker_in: _Segment | None) -> None:
        if self.records.pop(seq, None) is not None:
            owner = self.segments[bisect_right(self.firsts, seq) - 1]
            owner.live.discard(seq)
            if marker_in is not None and owner is not marker_in:
                marker_in.targets.add(owner)

    def unretired(self) -> list[Envelope]:
        if self.summaries:
            seqs = list(self.records)  # in file order, which is seq order
            for lo, hi, kept in self.summaries:
                for seq in seqs[bisect_left(seqs, lo):bisect_left(seqs, hi)]:
                    if seq not in kept:
                        self._retire(seq, None)
        return list(self.records.values())


class WriteAheadLog:
    """Durable, group-committed log of the envelopes the gateway acknowledges."""

    def __init__(self, directory: str | Path, settings: WALSection,
                 metrics: Metrics | None = None) -> None:
        self.directory = Path(directory)
        self.settings = settings
        self._metrics = metrics if metrics is not None else Metrics()
        self._dir = str(self.directory)
        self._fsync = settings.fsync
        self._interval = settings.commit_interval_ms / 1000.0
        self._segment_bytes = settings.segment_bytes
        self._max_unretired = settings.max_unretired
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._writer = _Writer(self._dir)
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []
        self._active: _Segment | None = None
        self._next_seq = 1
        self._max_first = 0
        self._unretired = 0
        # What the next job takes.
        self._chunks: list[_Chunk] = []
        self._chunk: _Chunk | None = None
        self._callbacks: list[Done] = []
        self._retired: list[int] = []
        self._retired_from: set[_Segment] = set()
        self._summaries_needed: set[_Segment] = set()
        self._pending_bytes = 0
        self._since: float | None = None  # loop time of the first pending thing
        self._since_ns = 0
        self._gc_hint = False
        # Commit scheduling.
        self._inflight: asyncio.Future[_Outcome] | None = None
        self._timer: asyncio.Handle | None = None
        self._due = False
        self._failing = False
        self._probe_timer: asyncio.TimerHandle | None = None
        self._compactions: dict[int, asyncio.Task[CompactionResult | None]] = {}

    # -- state -----------------------------------------------------------------------------
    @property
    def unretired(self) -> int:
        return self._unretired

    @property
    def refusing(self) -> bool:
        return self._failing or self._unretired >= self._max_unretired

    # -- recovery --------------------------------------------------------------------------
    def recover(self) -> list[Envelope]:
        """Read the log back: the unretired records, in append order. Call once, first."""
        if self._state != _NEW:
            raise WALError(f"write-ahead log {self._dir}: recover() may be called only once")
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            names = os.listdir(directory)
            probe = directory / ".wal-probe"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as err:
            raise WALError(f"cannot use the write-ahead log directory {directory}: "
                           f"{err.strerror or err}") from None

        for name in names:  # a compaction the process did not finish: the segment is whole
            if _COMPACT_NAME.fullmatch(name):
                try:
                    os.unlink(directory / name)
                except OSError as err:
                    raise WALError(f"cannot delete {directory / name}: {err.strerror}") from None
                log.info("write-ahead log %s: deleted %s, left by an unfinished compaction",
                         self._dir, name)
        found = sorted((int(m[1]), name) for name in names if (m := SEGMENT_NAME.fullmatch(name)))
        segments = [_Segment(first, os.path.join(self._dir, name)) for first, name in found]
        for older, newer in pairwise(segments):
            older.end = newer.first
        for segment in segments:
            segment.submitted = True
        state = _Recovery(segments, time.monotonic_ns())
        for segment in segments:
            self._read_segment(segment, state)
        envelopes = state.unretired()

        # Delete what is fully retired, unless its markers still retire records of an older
        # segment that stays: the first commit deletes those after writing a summary.
        for segment in segments:
            if (not segment.deleted and not segment.live
                    and all(t.deleted for t in segment.targets)):
                try:
                    os.unlink(segment.path)
                except OSError as err:
                    raise WALError(f"cannot delete the write-ahead log segment {segment.path}: "
                                   f"{err.strerror}") from None
                segment.deleted = True
                self._metrics.wal_segments_deleted.inc()
        self._segments = [s for s in segments if not s.deleted]
        self._firsts = [s.first for s in self._segments]
        self._gc_hint = any(not s.live for s in self._segments)
        self._max_first = found[-1][0] if found else 0
        self._next_seq = state.last_seq + 1
        self._unretired = len(envelopes)
        self._state = _OPEN
        if envelopes:
            self._metrics.wal_recovered.inc(len(envelopes))
        log.info("write-ahead log %s: %d unretired records in %d segments", self._dir,
                 len(envelopes), len(self._segments))
        return envelopes

    def _read_segment(self, segment: _Segment, state: _Recovery) -> None:
        path = segment.path
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as err:
            raise WALError(f"cannot read the write-ahead log segment {path}: "
                           f"{err.strerror}") from None
        size = len(data)
        if size < HEADER_SIZE or data[:len(MAGIC)] != MAGIC:
            self._cut(segment, 0, size, "no valid segment header")
            return
        version = _HEADER.unpack_from(data)[1]
        if version != FORMAT_VERSION:
            raise WALError(f"write-ahead log segment {path} has format version {version}; this "
                           f"gateway reads version {FORMAT_VERSION} only")
        unpack = _FRAME.unpack_from
        crc32 = zlib.crc32
        bound = segment.end
        offset = HEADER_SIZE
        appends = 0
        with memoryview(data) as view:
            while offset < size:
                reason: str | None
                end = offset
                if size - offset < FRAME_SIZE:
                    reason = "torn record header"
                else:
                    length, crc, kind = unpack(data, offset)
                    end = offset + FRAME_SIZE + length
                    if end > size:
                        reason = f"record of {length} bytes runs past the end of the file"
                    elif crc32(view[offset + FRAME_SIZE - 1:end]) != crc:
                        reason = "bad CRC"
                    else:
                        reason = state.apply(segment, bound, kind, view[offset + FRAME_SIZE:end])
                        appends += kind == KIND_APPEND
                if reason is not None:
                    segment.stored = appends
                    self._cut(segment, offset, size, reason)
                    return
                offset = end
        segment.stored = appends

    def _cut(self, segment: _Segment, offset: int, size: int, reason: str) -> None:
        log.warning("write-ahead log segment %s: %s at offset %d; cutting the segment there "
                    "(%d bytes dropped)", segment.path, reason, offset, size - offset)
        self._metrics.wal_corrupt_records.inc()
        self._metrics.wal_truncated_bytes.inc(size - offset)
        try:
            if offset <= HEADER_SIZE:  # nothing left worth keeping
                os.unlink(segment.path)
                segment.deleted = True
                return
            os.truncate(segment.path, offset)
            fd = os.open(segment.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise WALError(f"cannot cut the write-ahead log segment {segment.path}: "
                           f"{err.strerror}") from None

    # -- the hot path ----------------------------------------------------------------------
    def append(self, batch: list[Envelope], done: Done) -> None:
        """Number and log ``batch``; ``done`` runs on the loop once it is durable (or not)."""
        if self._state != _OPEN:
            raise WALError(f"write-ahead log {self._dir} is "
                           f"{'not recovered yet' if self._state == _NEW else 'closed'}")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if batch:
            chunk = self._chunk
            if chunk is None or chunk.segment.reserved >= self._segment_bytes:
                chunk = self._new_chunk()
            data = chunk.data
            size = len(data)
            first = self._next_seq
            try:
                seq = encode_appends(data, batch, first)
            except BaseException:
                del data[size:]
                raise
            self._next_seq = chunk.hi = seq
            segment = chunk.segment
            segment.live.update(range(first, seq))
            self._unretired += seq - first
            added = len(data) - size
            segment.reserved += added
            self._pending_bytes += added
        self._callbacks.append(done)
        if self._since is None:
            self._mark_pending()
        self._schedule()

    def retire(self, seqs: Iterable[int]) -> None:
        """These records are processed: never replay them."""
        if self._state not in (_OPEN, _CLOSING):
            return
        seqs = seqs if isinstance(seqs, list) else list(seqs)
        if not seqs:
            return
        active = self._active
        removed = 0
        marked = False
        if active is not None and min(seqs) >= active.first:  # the common case
            live = active.live
            before = len(live)
            live.difference_update(seqs)
            removed = before - len(live)
            self._retired += seqs
            self._retired_from.add(active)
            marked = True
        else:
            firsts, segments, retired, touched = (self._firsts, self._segments, self._retired,
                                                  self._retired_from)
            for seq in seqs:
                i = bisect_right(firsts, seq) - 1
                if i < 0:
                    continue
                segment = segments[i]
                live = segment.live
                if seq in live:
                    live.remove(seq)
                    retired.append(seq)
                    touched.add(segment)
                    removed += 1
                    if not live and segment is not active:
                        self._gc_hint = True
            marked = removed > 0
        if removed:
            self._unretired -= removed
            self._metrics.wal_retired.inc(removed)
        if not marked or self._state != _OPEN:
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # written with the first commit
        if self._since is None:
            self._mark_pending()
        self._schedule()

    async def close(self) -> None:
        """Commit what is pending, wait for it, close the files."""
        if self._state in (_CLOSING, _CLOSED):
            return
        if self._state == _NEW:
            self._state = _CLOSED
            return
        self._state = _CLOSING
        if self._compactions:  # each one sees _CLOSING and stops at its next step
            await asyncio.wait(list(self._compactions.values()))
        self._cancel_timer()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        while self._inflight is not None:
            await asyncio.wait([self._inflight])
        final = self._submit(close=True)
        if final is not None:
            await asyncio.wait([final])
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._state = _CLOSED
        self._publish_gauges()

    # -- compaction ------------------------------------------------------------------------
    def sealed_segments(self) -> list[SegmentInfo]:
        """The segments that take no more writes, oldest first: what ``compact`` may rewrite.

        A sealed segment whose last bytes are still waiting for their group commit is left
        out until they are handed to the commit thread."""
        active = self._active
        pending = {chunk.segment for chunk in self._chunks}
        return [SegmentInfo(s.first, s.path, len(s.live), s.records())
                for s in self._segments
                if s is not active and not s.deleted and s not in pending]

    def compact(self, first: int) -> asyncio.Task[CompactionResult | None]:
        """Rewrite sealed segment ``first`` with only its unretired records; see the module's
        theory of operation. Call on the loop; the task's result is None if the segment was
        deleted (fully retired) before it could be rewritten. Raises ``WALError`` at once if
        ``first`` is not a sealed segment or is being compacted already; the task raises
        ``WALError`` if the segment cannot be read or the new one written (it stays as it
        was)."""
        if self._state != _OPEN:
            raise WALError(f"write-ahead log {self._dir} is "
                           f"{'not recovered yet' if self._state == _NEW else 'closed'}")
        i = bisect_left(self._firsts, first)
        if i == len(self._firsts) or self._firsts[i] != first:
            raise WALError(f"write-ahead log {self._dir}: no segment {segment_name(first)}")
        segment = self._segments[i]
        if segment is self._active or any(c.segment is segment for c in self._chunks):
            raise WALError(f"write-ahead log {self._dir}: segment {segment_name(first)} is "
                           "still being written")
        running = self._compactions.get(first)
        if running is not None and not running.done():
            raise WALError(f"write-ahead log {self._dir}: segment {segment_name(first)} is "
                           "being compacted already")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        task = self._loop.create_task(self._compact(segment))
        self._compactions[first] = task
        task.add_done_callback(partial(self._compaction_ended, first))
        return task

    def _compaction_ended(self, first: int, task: asyncio.Task[CompactionResult | None]
                          ) -> None:
        if self._compactions.get(first) is task:  # not a later one of the same segment
            del self._compactions[first]

    async def _compact(self, segment: _Segment) -> CompactionResult | None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._commit_thread(), _nothing)
        if segment.deleted or self._state != _OPEN:
            return None
        summaries = [(t.first, t.end, t.live) for t in segment.targets
                     if not t.deleted and t.end is not None]
        temp = segment.path + COMPACT_SUFFIX
        job = _Rewrite(segment.path, temp, segment.live, summaries, self._fsync)
        result = await loop.run_in_executor(None, _rewrite, job)
        if result is None:
            return None
        if segment.deleted or self._state != _OPEN:
            # Its unlink is queued (or done) already: renaming now would bring it back.
            await loop.run_in_executor(None, _unlink_quietly, temp)
            return None
        try:
            installed = await loop.run_in_executor(self._commit_thread(), self._writer.install,
                                                   temp, segment.path, self._fsync)
        except OSError as err:
            raise WALError(f"cannot rename {temp} over {segment.path}: {err.strerror}"
                           ) from None
        if not installed:
            return None
        segment.stored = result.kept
        log.info("write-ahead log %s: compacted %s: kept %d records, dropped %d, %d bytes "
                 "reclaimed", self._dir, os.path.basename(segment.path), result.kept,
                 result.dropped, result.reclaimed)
        return result

    def _commit_thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-commit")
        return self._executor

    # -- group commit ----------------------------------------------------------------------
    def _mark_pending(self) -> None:
        assert self._loop is not None
        self._since = self._loop.time()
        self._since_ns = time.monotonic_ns()

    def _schedule(self) -> None:
        if self._failing or self._state != _OPEN:
            return  # the probe (or close) commits what is pending
        if self._pending_bytes >= COMMIT_BYTES:
            if self._inflight is None:
                self._cancel_timer()
                self._submit()
            else:
                self._due = True
        elif self._timer is None and not self._due:
            self._start_timer()

    def _start_timer(self) -> None:
        assert self._loop is not None and self._since is not None
        if self._interval <= 0:
            self._timer = self._loop.call_soon(self._on_timer)
        else:
            self._timer = self._loop.call_at(self._since + self._interval, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._failing or self._state != _OPEN:
            return
        if self._inflight is not None:
            self._due = True
        else:
            self._submit()

    def _new_chunk(self) -> _Chunk:
        segment = self._active
        if segment is None or segment.reserved >= self._segment_bytes:
            segment = self._open_segment()
        chunk = _Chunk(segment, self._next_seq)
        self._chunks.append(chunk)
        self._chunk = chunk
        return chunk

    def _open_segment(self) -> _Segment:
        # Names never repeat, not even those of segments deleted since.
        first = max(self._next_seq, self._max_first + 1)
        self._next_seq = self._max_first = first
        segment = _Segment(first, os.path.join(self._dir, segment_name(first)))
        if self._segments and self._segments[-1].end is None:
            self._segments[-1].end = first
        self._segments.append(segment)
        self._firsts.append(first)
        self._active = segment
        self._gc_hint = True
        return segment

    def _collect_garbage(self) -> tuple[list[str], list[_Segment]]:
        """Segments to delete now, and the older segments that need a summary marker."""
        needed = self._summaries_needed
        self._summaries_needed = set()
        unlinks: list[str] = []
        if self._gc_hint:
            self._gc_hint = False
            active = self._active
            doomed = [s for s in self._segments if not s.live and s is not active]
            if doomed:
                for segment in doomed:
                    segment.deleted = True
                    needed |= segment.targets
                    unlinks.append(segment.path)
                self._segments = [s for s in self._segments if not s.deleted]
                self._firsts = [s.first for s in self._segments]
                for segment in self._segments:  # let the deleted ones be freed
                    if segment.targets:
                        segment.targets = {t for t in segment.targets if not t.deleted}
                self._metrics.wal_segments_deleted.inc(len(doomed))
        summaries = sorted((t for t in needed if not t.deleted and t.end is not None),
                           key=lambda t: t.first)
        return unlinks, summaries

    def _take_job(self, *, probe: bool, close: bool) -> _Job | None:
        unlinks, summaries = self._collect_garbage()
        retired = self._retired
        if retired or summaries or (probe and not self._chunks):
            chunk = self._chunks[-1] if self._chunks else self._new_chunk()
            dest = chunk.segment
            data = chunk.data
            size = len(data)
            for i in range(0, len(retired), RETIRE_RECORD_SEQS):
                data += _frame(KIND_RETIRE, _encode(retired[i:i + RETIRE_RECORD_SEQS]))
            for target in summaries:
                data += _frame(KIND_RETIRE_EXCEPT,
                               _encode((target.first, target.end, target.live)))
            dest.reserved += len(data) - size
            dest.targets.update(t for t in self._retired_from if not t.deleted)
            dest.targets.update(summaries)
            dest.targets.discard(dest)
        chunks = self._chunks
        closing_a_file = close and self._executor is not None  # else none was ever opened
        if not (chunks or unlinks or self._callbacks or closing_a_file):
            return None
        job = _Job()
        for chunk in chunks:
            segment = chunk.segment
            job.writes.append((segment.path, chunk.data, not segment.submitted))
            segment.submitted = True
            job.records += chunk.hi - chunk.lo
        job.chunks = chunks
        job.unlinks = unlinks
        job.close = close
        job.fsync = self._fsync and (job.records > 0 or probe)
        job.callbacks = self._callbacks
        job.retired, job.retired_from, job.summaries = retired, self._retired_from, summaries
        job.since_ns = self._since_ns
        self._chunks, self._chunk, self._callbacks = [], None, []
        self._retired, self._retired_from = [], set()
        self._pending_bytes = 0
        self._since = None
        return job

    def _submit(self, *, probe: bool = False,
                close: bool = False) -> asyncio.Future[_Outcome] | None:
        job = self._take_job(probe=probe, close=close)
        if job is None:
            return None
        assert self._loop is not None
        future = self._loop.run_in_executor(self._commit_thread(), self._writer.run, job)
        self._inflight = future
        future.add_done_callback(partial(self._on_committed, job))
        return future

    def _on_committed(self, job: _Job, future: asyncio.Future[_Outcome]) -> None:
        self._inflight = None
        try:
            outcome = future.result()
        except BaseException as exc:  # a bug in the writer: treat it as a failed commit
            log.exception("write-ahead log: commit raised")
            outcome = _Outcome(OSError(errno.EIO, f"commit raised {exc!r}"), [], 0)
        if outcome.error is None:
            self._committed(job, outcome)
        else:
            self._failed(job, outcome.error)

    def _committed(self, job: _Job, outcome: _Outcome) -> None:
        m = self._metrics
        m.wal_commits.inc()
        if job.records:
            m.wal_appended.inc(job.records)
        if outcome.written:
            m.wal_written_bytes.inc(outcome.written)
        for seconds in outcome.fsync_seconds:
            m.wal_fsync_seconds.observe(seconds)
        if job.callbacks:
            m.wal_commit_latency.observe((time.monotonic_ns() - job.since_ns) / 1e9)
        if self._failing:
            self._failing = False
            log.info("write-ahead log %s: commits succeed again; taking work", self._dir)
        self._publish_gauges()
        if self._state == _OPEN and self._since is not None:
            assert self._loop is not None
            if (self._due or self._pending_bytes >= COMMIT_BYTES
                    or self._loop.time() >= self._since + self._interval):
                self._due = False
                self._cancel_timer()
                self._submit()
            elif self._timer is None:
                self._start_timer()
        _call_all(job.callbacks, None)

    def _failed(self, job: _Job, error: OSError) -> None:
        log.error("write-ahead log %s: commit failed: %s; refusing new work until a commit "
                  "succeeds", self._dir, error)
        self._metrics.wal_commit_errors.labels(errno.errorcode.get(error.errno or 0, "other")).inc()
        # Nothing of this job, nor of what is pending behind it, is durable: refuse it all.
        callbacks = job.callbacks + self._callbacks
        for chunk in job.chunks + self._chunks:
            live = chunk.segment.live
            before = len(live)
            live.difference_update(range(chunk.lo, chunk.hi))
            self._unretired -= before - len(live)
        self._chunks, self._chunk, self._callbacks = [], None, []
        self._pending_bytes = 0
        self._retired[:0] = job.retired
        self._retired_from |= job.retired_from
        self._summaries_needed.update(job.summaries)
        self._active = None  # sealed: the next commit starts a fresh segment
        self._gc_hint = True
        self._failing = True
        self._due = False
        self._cancel_timer()
        if self._retired or self._summaries_needed:
            self._mark_pending()
        else:
            self._since = None
        if self._state == _OPEN and self._probe_timer is None:
            assert self._loop is not None
            self._probe_timer = self._loop.call_later(PROBE_INTERVAL_S, self._probe)
        self._publish_gauges()
        _call_all(callbacks, error)

    def _probe(self) -> None:
        self._probe_timer = None
        if self._state != _OPEN or not self._failing:
            return  # pragma: no cover - a success or close got there first
        if self._inflight is not None:  # pragma: no cover - the probe is the only committer
            assert self._loop is not None
            self._probe_timer = self._loop.call_later(PROBE_INTERVAL_S, self._probe)
            return
        self._submit(probe=True)

    def _publish_gauges(self) -> None:
        m = self._metrics
        m.wal_unretired.set(self._unretired)
        m.wal_segments.set(len(self._segments))
        m.wal_refusing.set(1 if self.refusing else 0)


def _call_all(callbacks: list[Done], error: OSError | None) -> None:
    for callback in callbacks:
        try:
            callback(error)
        except Exception:
            log.exception("write-ahead log: a commit callback raised")
