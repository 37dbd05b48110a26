"""The data lake as Parquet files (the optional extra ``iot-gateway[parquet]``: pyarrow).

Theory of operation
-------------------
The layout is the JSON-lines sink's (``gateway.sinks``), partitioned by each record's region
and the UTC hour of its ``received_at``::

    <dir>/region=<region>/date=<YYYY-MM-DD>/hour=<HH>/part-<n>.parquet

with the same fields, typed (``arrow_schema``): ``received_at`` is a
``timestamp[us, tz=UTC]``, ``qos`` an ``int8``, ``payload`` and ``meta`` are JSON text (a
payload that is not JSON is the JSON string of its base64, as in the JSON lines),
``errors`` a ``list<string>``; every other field is a string. ``region`` is kept in the files
too, so that one file alone is complete; readers of the whole lake take region, date and hour
from the path (pyarrow.dataset and DuckDB agree: an empty region is the Hive null partition).

A Parquet file cannot be read before its footer is written, so a file being written is
useless after a crash; yet the gateway retires a message's WAL record as soon as the sinks'
``flush()`` returned, so what a flush took must survive a ``kill -9`` like the JSON lines do.
Each open part therefore has two files in ``<dir>/_spool/`` (which readers skip: pyarrow
ignores names starting with ``_``, and neither name ends in ``.parquet``):

- ``<token>.arrows``, the spool: an Arrow IPC stream (zstd), locked with ``flock`` for as long
  as its writer lives. Every ``flush()`` appends the rows buffered since the last one, with
  ``pwrite`` at known offsets; a failed append is cut back with ``ftruncate``, so that the
  stream never has a hole and what follows stays readable.
- ``<token>.parquet.tmp``, the Parquet file: as soon as the spool holds ``row_group_rows`` rows
  that are not in it yet, they are read back from the spool and written as one row group (the
  rest at close), so memory stays flat however many partitions are open.

A part is closed once its Parquet file reaches ``max_file_bytes`` (it may pass it by up to a
row group), after ``max_file_age_s``, when its hour is past and it got nothing for a flush
interval, to stay within ``max_open_files``, and at ``close()``: the last row group and the
footer are written and the file is published with ``link()`` under the next free
``part-<n>.parquet`` (``link`` fails rather than replace a part that another process
published meanwhile), then the spool and the temporary name are removed. Readers thus only
ever see complete files.

The spool is the only state that matters. A Parquet write that fails (a full disk) throws the
temporary file away, and the next flush rebuilds it from the spool; a process that died left
spools that nobody holds a lock on, and the first ``flush()`` of the next sink on that
directory makes parts of them (a torn last message is dropped: it was never acknowledged).
A temporary file that already has two links was published before the crash, and is only
cleaned up, never published twice.

``write()`` runs on the event loop and only appends Python values to per-partition column
lists (payload and meta are JSON-encoded there, so that the records no longer depend on the
envelopes). ``flush()`` detaches the lists and hands them to the sink's own thread, which
converts them to Arrow in slices of ``_CHUNK_ROWS`` (a conversion holds the GIL, so it must be
short), appends them to the spools, writes row groups and closes parts, one partition after
the other, in order. A failure is logged at ERROR, counted in ``iotgw_sink_errors_total`` and
stops the I/O of that flush; the rows stay buffered and the next flush retries. Records are
counted in ``iotgw_sink_records_total`` once they are in a spool: from then on they survive
the process, and they become visible when their part is closed.

Writing back is paced as in the JSON-lines sink: every ``writeback_bytes`` written to a spool
or a Parquet file, the kernel is asked to start writing it to disk (``posix_fadvise``), so that
it never has to write hundreds of MB at once while the WAL waits for an fsync.

``python -m gateway.parquet_sink --bench`` compares the write throughput with the JSON-lines
sink's, on the same envelopes, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import fcntl
import gc
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, BinaryIO, ClassVar, Literal

import msgspec
from msgspec import Meta

from gateway.envelope import Envelope
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

INSTALL_HINT = "the parquet sink needs pyarrow: install iot-gateway[parquet]"

COLUMNS = ("id", "device", "tenant", "tier", "topic", "received_at", "qos", "protocol",
           "region", "device_class", "payload_encoding", "payload", "meta", "errors")
"""The record fields, in ``SinkRecord``'s order: the columns of every file."""

_DICTIONARY = ("device", "tenant", "tier", "topic", "qos", "protocol", "region", "device_class",
               "payload_encoding")  # few distinct values: dictionary-encoded (ids, JSON: not)
_STATISTICS = tuple(name for name in COLUMNS if name not in ("payload", "meta", "errors"))

SPOOL_DIR = "_spool"
_PARTITION_KEY = b"iotgw.partition"  # spool schema metadata: the part's directory in the lake
_PARTITION_RE = re.compile(r"^region=[^/\x00]+/date=\d{4}-\d{2}-\d{2}/hour=\d{2}$")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
_CHUNK_ROWS = 16384  # rows per spool message: converting a column of it holds the GIL < 1 ms
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP}


def load_pyarrow() -> Any:
    """pyarrow, imported on first use: the gateway runs without it unless a parquet sink is
    configured. ``ValueError`` (a ``ConfigError`` from ``build_sink``) when it is missing."""
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.ipc  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError as err:
        raise ValueError(f"{INSTALL_HINT} ({err})") from None
    return pyarrow


def arrow_schema(pa: Any) -> Any:
    """The schema of the lake's files (``pa`` is the pyarrow module)."""
    string = pa.string()
    special = {"received_at": pa.timestamp("us", tz="UTC"), "qos": pa.int8(),
               "errors": pa.list_(string)}
    return pa.schema([pa.field(name, special.get(name, string)) for name in COLUMNS])


class ParquetOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dir: str = "./data/lake-parquet"
    """Not the JSON-lines sink's: pyarrow.dataset would try to read its files as Parquet."""
    max_file_bytes: Annotated[int, Meta(ge=1)] = 64 * 2**20
    """A part is closed once its file reaches this (it may pass it by up to a row group)."""
    max_file_age_s: Annotated[float, Meta(gt=0)] = 300.0
    """A part is closed this long after it was opened: how late its records become visible."""
    row_group_rows: Annotated[int, Meta(ge=1)] = 128 * 1024
    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = "zstd"
    max_open_files: Annotated[int, Meta(ge=1)] = 64
    """Parts open at once (each holds a spool and, past its first row group, a Parquet file)."""
    writeback_bytes: Annotated[int, Meta(ge=0)] = 4 * 2**20
    """Start writing a file to disk every this many bytes (see the JSON-lines sink); 0: leave
    it to the kernel."""


class _Part:
    """One part being written: its spool and its Parquet file under a temporary name."""

    __slots__ = ("batches", "file", "next_batch", "opened", "rows_spooled", "rows_written",
                 "schema", "size", "skip", "spool", "spool_back", "spool_fd", "spool_size",
                 "tmp", "torn", "writer", "written_back")

    def __init__(self, spool: Path, fd: int, header_size: int, schema: Any) -> None:
        self.spool = spool
        self.tmp = spool.with_name(spool.name.removesuffix(".arrows") + ".parquet.tmp")
        self.spool_fd = fd  # holds the flock
        self.spool_size = header_size  # bytes of whole messages; appends go there
        self.spool_back = 0  # spool bytes handed to write-back so far
        self.schema = schema
        self.batches: list[tuple[int, int, int]] = []  # (offset, length, rows) per message
        self.rows_spooled = 0
        self.next_batch = 0  # the first message not entirely in the Parquet file...
        self.skip = 0  # ...and how many of its rows are
        self.rows_written = 0
        self.file: BinaryIO | None = None
        self.writer: Any = None  # a pyarrow.parquet.ParquetWriter on ``file``
        self.size = 0
        self.written_back = 0
        self.torn = False  # a failed append could not be cut back: append nothing more
        self.opened = time.monotonic()


class _Partition:
    """One ``region=/date=/hour=`` directory: rows buffered since the last flush, rows
    converted but not yet spooled, its open part and parts awaiting publication."""

    __slots__ = ("appends", "columns", "directory", "hour", "key", "number", "part",
                 "relative", "sealed", "touched", "unspooled")

    def __init__(self, key: tuple[str, int], relative: str, directory: Path) -> None:
        self.key = key
        self.hour = key[1]
        self.relative = relative
        self.directory = directory
        self.columns: list[list[Any]] = []
        self.appends: tuple[Callable[[Any], None], ...] = ()
        self.take_columns()
        self.unspooled: list[tuple[Any, int]] = []  # (IPC message, rows), oldest first
        self.part: _Part | None = None
        self.sealed: list[_Part] = []  # finished, but publishing failed: retried
        self.number = -1  # the last part number seen here; -1: not looked yet
        self.touched = True

    def take_columns(self) -> list[list[Any]]:
        columns = self.columns
        self.columns = [[] for _ in COLUMNS]
        self.appends = tuple(column.append for column in self.columns)
        return columns

    def busy(self) -> bool:
        return bool(self.part or self.sealed or self.unspooled or self.columns[0])


class _IOFailure(Exception):
    """An I/O step failed; it has been logged and counted, and its state left retryable."""


class ParquetSink:
    """Parquet files in the data-lake layout (see the module docstring)."""

    Options: ClassVar[type[msgspec.Struct]] = ParquetOptions

    def __init__(self, name: str, options: ParquetOptions, metrics: Metrics) -> None:
        from gateway.sinks import _path_value  # the JSON-lines layout; sinks imports this module

        pa = load_pyarrow()
        self._pa = pa
        self.name = name
        self.options = options
        self.directory = Path(options.dir)
        self._spool_dir = self.directory / SPOOL_DIR
        self._path_value = _path_value
        self._schema = arrow_schema(pa)
        self._types = [field.type for field in self._schema]
        self._compression = None if options.compression == "none" else options.compression
        if self._compression is not None and not pa.Codec.is_available(self._compression):
            raise ValueError(f"options.compression: {self._compression} is not available in "
                             f"this build of pyarrow")
        spool_codec = next((c for c in ("zstd", "lz4") if pa.Codec.is_available(c)), None)
        self._ipc_options = pa.ipc.IpcWriteOptions(compression=spool_codec)
        self._validate = msgspec.json.Decoder(msgspec.Raw).decode  # syntax only: no objects
        self._encode = msgspec.json.Encoder().encode
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._open: dict[tuple[str, int], _Partition] = {}  # with a part; least recent first
        self._region_dirs: dict[str, str] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._recovered = False
        self._failing = False
        self._records = metrics.sink_records.labels(name)
        self._errors = metrics.sink_errors.labels(name)
        self._buffered = metrics.sink_buffered.labels(name)

    # -- the hot path (event loop) ---------------------------------------------------------

    def write(self, batch: list[Envelope]) -> None:
        validate, encode = self._validate, self._encode
        partitions = self._partitions
        last_at = -1.0
        hour = -1
        last_hour = -1
        last_region: str | None = None
        us = 0
        for env in batch:
            at = env.received_at
            if at != last_at:  # messages of one socket read share their timestamp
                last_at = at
                us = int(at * 1e6 + 0.5)
                hour = us // 3_600_000_000
            region = env.region
            if hour != last_hour or region != last_region:
                last_hour, last_region = hour, region
                partition = partitions.get((region, hour))
                if partition is None:
                    partition = partitions[(region, hour)] = self._partition(region, hour)
                partition.touched = True
                (a_id, a_device, a_tenant, a_tier, a_topic, a_at, a_qos, a_protocol, a_region,
                 a_class, a_encoding, a_payload, a_meta, a_errors) = partition.appends
            errors = env.errors
            data = env.data
            encoding = "json"
            if data is None:
                try:
                    validate(env.payload)
                    payload = env.payload.decode()
                except (msgspec.DecodeError, UnicodeDecodeError):
                    payload, encoding = _base64_json(env.payload), "base64"
            else:
                try:
                    payload = encode(data).decode()
                except (TypeError, ValueError, OverflowError) as err:
                    payload, encoding = _base64_json(env.payload), "base64"
                    errors = [*(errors or ()), f"payload: not JSON-encodable: {err}"]
            meta: Any = env.meta
            if meta is not None:
                try:
                    meta = encode(meta).decode()
                except (TypeError, ValueError, OverflowError):
                    meta = None
                    errors = [*(errors or ()), "meta: not JSON-encodable, dropped"]
            a_id(env.id)
            a_device(env.device)
            a_tenant(env.tenant)
            a_tier(env.tier)
            a_topic(env.topic)
            a_at(us)
            a_qos(env.qos)
            a_protocol(env.protocol)
            a_region(region)
            a_class(env.device_class)
            a_encoding(encoding)
            a_payload(payload)
            a_meta(meta)
            a_errors(None if errors is None else list(errors))

    def _partition(self, region: str, hour: int) -> _Partition:
        region_dir = self._region_dirs.get(region)
        if region_dir is None:
            region_dir = self._region_dirs[region] = f"region={self._path_value(region)}"
        relative = region_dir + time.strftime("/date=%Y-%m-%d/hour=%H", time.gmtime(hour * 3600))
        return _Partition((region, hour), relative, self.directory / relative)

    # -- flush and close (event loop, then the sink's thread) -------------------------------

    async def flush(self) -> None:
        async with self._lock:
            await self._run(closing=False)

    async def close(self) -> None:
        async with self._lock:
            await self._run(closing=True)
            lost = 0
            left = 0
            for partition in self._partitions.values():
                lost += sum(rows for _, rows in partition.unspooled) + len(partition.columns[0])
                for part in [*partition.sealed, *([partition.part] if partition.part else [])]:
                    self._release(part)
                    left += 1
            self._partitions.clear()
            self._open.clear()
            self._buffered.set(0)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        if lost:
            log.error("sink %s: closing with %d records it could not write", self.name, lost)
        if left:
            log.error("sink %s: %d parts could not be finished; their spools in %s are made "
                      "into parts at the next start", self.name, left, self._spool_dir)

    async def _run(self, closing: bool) -> None:
        current_hour = int(time.time()) // 3600
        jobs: list[tuple[_Partition, list[list[Any]] | None, bool]] = []
        for partition in self._partitions.values():
            columns = partition.take_columns() if partition.columns[0] else None
            idle = partition.hour < current_hour and not partition.touched
            partition.touched = False
            if columns is not None or partition.busy():
                jobs.append((partition, columns, closing or idle))
        if jobs or not self._recovered:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.name}")
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._work, jobs, closing)
        for key, partition in list(self._partitions.items()):
            if not partition.busy() and not partition.touched:
                del self._partitions[key]
        self._buffered.set(sum(message.size for partition in self._partitions.values()
                               for message, _ in partition.unspooled))

    def _work(self, jobs: list[tuple[_Partition, list[list[Any]] | None, bool]],
              closing: bool) -> None:
        """In the sink's thread: convert, spool, write row groups, close; then recover.
        The first failure ends the I/O of a flush (the next retries), not of the last one."""
        self._failing = False
        for partition, columns, close in jobs:
            if columns is not None:
                self._convert(partition, columns)
            if closing or not self._failing:
                try:
                    self._advance(partition, close)
                except _IOFailure:
                    self._failing = True
        if not self._recovered and not self._failing:
            self._recover()

    def _convert(self, partition: _Partition, columns: list[list[Any]]) -> None:
        total = len(columns[0])
        for start in range(0, total, _CHUNK_ROWS):
            chunk = columns if total <= _CHUNK_ROWS else [
                column[start:start + _CHUNK_ROWS] for column in columns]
            batch = self._to_batch(chunk)
            partition.unspooled.append((self._message(batch), batch.num_rows))

    def _to_batch(self, columns: list[list[Any]]) -> Any:
        pa = self._pa
        arrays = []
        for name, column, arrow_type in zip(COLUMNS, columns, self._types, strict=True):
            try:
                arrays.append(pa.array(column, type=arrow_type))
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                arrays.append(pa.array(_coerce(name, column), type=arrow_type))
        return pa.RecordBatch.from_arrays(arrays, schema=self._schema)

    def _message(self, batch: Any) -> Any:
        """``batch`` as one IPC stream message (zstd), to append to a spool."""
        pa = self._pa
        sink = pa.BufferOutputStream()
        writer = pa.ipc.new_stream(sink, self._schema, options=self._ipc_options)
        writer.write_batch(batch)
        writer.close()
        stream = sink.getvalue()
        reader = pa.BufferReader(stream)
        pa.ipc.read_message(reader)  # the schema
        start = reader.tell()
        pa.ipc.read_message(reader)  # the batch (an end-of-stream marker follows)
        return stream.slice(start, reader.tell() - start)

    def _advance(self, partition: _Partition, close: bool) -> None:
        for sealed in list(partition.sealed):
            self._step(partition, "publishing", sealed.tmp, self._publish, partition, sealed)
        part: _Part | None
        while partition.unspooled:
            part = partition.part
            if part is not None and part.torn:
                self._step(partition, "closing", part.tmp, self._finish, partition)
                part = None
            if part is None:
                part = self._step(partition, "creating a spool in", self._spool_dir,
                                  self._open_part, partition)
            message, rows = partition.unspooled[0]
            self._step(partition, "cannot write", part.spool, self._append, part, message, rows)
            del partition.unspooled[0]
            self._records.inc(rows)
            self._open[partition.key] = self._open.pop(partition.key, partition)  # recent
        part = partition.part
        if part is None:
            return
        self._step(partition, "cannot write", part.tmp, self._write_row_groups, part, False)
        if (close or part.size >= self.options.max_file_bytes
                or time.monotonic() - part.opened >= self.options.max_file_age_s):
            self._step(partition, "closing", part.tmp, self._finish, partition)

    def _step(self, partition: _Partition, what: str, path: Path,
              action: Callable[..., Any], *args: Any) -> Any:
        try:
            return action(*args)
        except (OSError, self._pa.ArrowException) as err:
            self._errors.inc()
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            log.error("sink %s: %s %s: %s (%s kept for retry)", self.name, what, path, reason,
                      partition.relative)
            raise _IOFailure from err

    # -- parts: spool, row groups, publication (the sink's thread) ---------------------------

    def _open_part(self, partition: _Partition) -> _Part:
        excess = len(self._open) - self.options.max_open_files + 1
        for other in list(self._open.values()):
            if excess <= 0:
                break
            if other is not partition:
                with contextlib.suppress(_IOFailure):  # logged; the bound is passed for now
                    self._step(other, "closing", self._spool_dir, self._finish, other)
                excess -= 1
        token = uuid.uuid4().hex
        new = self._spool_dir / f"{token}.arrows.new"
        try:
            fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the first part, or the directory was removed
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            # Locked and complete before it has its name, so that no recovery takes it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            header = self._schema.with_metadata(
                {_PARTITION_KEY: partition.relative.encode()}).serialize()
            _pwrite_all(fd, header, 0)
            spool = self._spool_dir / f"{token}.arrows"
            os.rename(new, spool)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(new)
            raise
        part = partition.part = _Part(spool, fd, header.size, self._schema)
        self._open[partition.key] = partition
        return part

    def _append(self, part: _Part, message: Any, rows: int) -> None:
        offset = part.spool_size
        try:
            _pwrite_all(part.spool_fd, message, offset)
        except OSError:
            try:
                os.ftruncate(part.spool_fd, offset)
            except OSError:
                part.torn = True
            raise
        part.batches.append((offset, message.size, rows))
        part.spool_size += message.size
        part.rows_spooled += rows
        part.spool_back = self._write_back(part.spool_fd, part.spool_back, part.spool_size)

    def _write_row_groups(self, part: _Part, final: bool) -> None:
        """Each ``row_group_rows`` spooled rows not yet in the Parquet file become a row group
        (``final``: the rest too). A failure throws the file away, to be rebuilt."""
        pa = self._pa
        target = self.options.row_group_rows
        try:
            while True:
                left = part.rows_spooled - part.rows_written
                if left == 0 or (left < target and not final):
                    return
                count = min(left, target)
                chunks = []
                index, skip, got = part.next_batch, part.skip, 0
                while got < count:
                    offset, length, rows = part.batches[index]
                    data = _pread_all(part.spool_fd, length, offset)
                    batch = pa.ipc.read_record_batch(pa.py_buffer(data), part.schema)
                    take = min(rows - skip, count - got)
                    chunks.append(batch.slice(skip, take))
                    got += take
                    skip += take
                    if skip == rows:
                        index, skip = index + 1, 0
                if part.writer is None:
                    part.file = _open_output(part.tmp)
                    part.writer = pa.parquet.ParquetWriter(
                        part.file, part.schema, compression=self._compression,
                        use_dictionary=[n for n in _DICTIONARY if n in part.schema.names],
                        write_statistics=[n for n in _STATISTICS if n in part.schema.names])
                    part.size = part.written_back = 0
                assert part.file is not None
                part.writer.write_table(pa.Table.from_batches(chunks, schema=part.schema),
                                        row_group_size=count)
                part.file.flush()
                part.next_batch, part.skip = index, skip
                part.rows_written += count
                part.size = part.file.tell()
                part.written_back = self._write_back(part.file.fileno(), part.written_back,
                                                     part.size)
        except BaseException:
            self._discard_parquet(part)
            raise

    def _finish(self, partition: _Partition) -> None:
        """Write the rest and the footer of the open part, then publish it."""
        part = partition.part
        assert part is not None
        if part.rows_spooled:
            self._seal(part)
            partition.sealed.append(part)
        else:  # every append failed: nothing to publish
            self._remove(part)
        partition.part = None
        self._open.pop(partition.key, None)
        if part.rows_spooled:
            self._publish(partition, part)

    def _seal(self, part: _Part) -> None:
        self._write_row_groups(part, True)
        assert part.file is not None
        try:
            part.writer.close()
            part.file.flush()
            part.size = part.file.tell()
            self._write_back(part.file.fileno(), part.written_back, part.size, force=True)
            part.file.close()
        except BaseException:
            self._discard_parquet(part)
            raise
        part.writer = part.file = None

    def _publish(self, partition: _Partition, part: _Part) -> None:
        partition.number = self._link(part, partition.directory, partition.number)
        partition.sealed.remove(part)
        log.debug("sink %s: %s/part-%d.parquet: %d records", self.name, partition.relative,
                  partition.number, part.rows_written)

    def _link(self, part: _Part, directory: Path, number: int) -> int:
        """Publish the finished ``part.tmp`` as the next free ``part-<n>.parquet`` in
        ``directory``, then remove its spool: ``n``."""
        if number < 0:
            try:
                number = max((int(m[1]) for entry in os.scandir(directory)
                              if (m := _PART_RE.match(entry.name))), default=-1)
            except FileNotFoundError:
                number = -1
        number += 1
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            final = directory / f"part-{number}.parquet"
            try:
                os.link(part.tmp, final)
            except FileExistsError:
                number += 1
                continue
            except OSError as err:  # a file system without hard links
                if err.errno not in _NO_HARD_LINKS:
                    raise
                if final.exists():
                    number += 1
                    continue
                os.rename(part.tmp, final)  # a crash before the spool is gone: a duplicate
            break
        self._remove(part)
        return number

    def _remove(self, part: _Part) -> None:
        """Delete the spool, then the temporary name (after publication: the other link), and
        let go of the lock; never raises, so that a published part is never published again.
        A spool that outlives its publication keeps its second link, so that the recovery
        only cleans up."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part.spool)
        except OSError as err:
            self._errors.inc()
            log.error("sink %s: cannot remove %s: %s (cleaned up at the next start)",
                      self.name, part.spool, err.strerror or err)
        else:
            with contextlib.suppress(OSError):
                os.unlink(part.tmp)
        os.close(part.spool_fd)

    def _discard_parquet(self, part: _Part) -> None:
        """Throw the Parquet file away; the next attempt starts it again from the spool."""
        writer, file = part.writer, part.file
        part.writer = part.file = None
        part.next_batch = part.skip = part.rows_written = part.size = part.written_back = 0
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            writer.is_open = False  # else its __del__ tries again
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        with contextlib.suppress(OSError):
            os.unlink(part.tmp)

    def _release(self, part: _Part) -> None:
        """Let go of a part that could not be finished: its spool stays, for recovery."""
        self._discard_parquet(part)
        os.close(part.spool_fd)

    def _write_back(self, fd: int, done: int, size: int, force: bool = False) -> int:
        step = self.options.writeback_bytes
        if step and size > done and (force or size - done >= step):
            with contextlib.suppress(OSError):  # a hint
                os.posix_fadvise(fd, done, size - done, os.POSIX_FADV_DONTNEED)
            return size
        return done

    # -- recovery of a dead writer's spools (the sink's thread, first flush) ----------------

    def _recover(self) -> None:
        try:
            names = sorted(os.listdir(self._spool_dir))
        except FileNotFoundError:
            self._recovered = True
            return
        except OSError as err:
            self._errors.inc()
            log.error("sink %s: cannot read %s: %s", self.name, self._spool_dir,
                      err.strerror or err)
            return
        ok = True
        for name in names:
            if name.endswith((".arrows", ".arrows.new")):
                ok = self._recover_spool(self._spool_dir / name) and ok
        for name in names:
            if name.endswith(".parquet.tmp"):
                spool = self._spool_dir / (name.removesuffix(".parquet.tmp") + ".arrows")
                if not spool.exists():  # its spool was removed: published, or nothing in it
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._spool_dir / name)
        self._recovered = ok

    def _recover_spool(self, path: Path) -> bool:
        """Make a part of a spool that nobody holds: False (logged, counted) on failure."""
        pa = self._pa
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        except OSError as err:
            self._errors.inc()
            log.error("sink %s: cannot open %s: %s", self.name, path, err.strerror or err)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer's
            os.close(fd)
            return True
        part = _Part(path, fd, 0, None)
        try:
            if os.fstat(fd).st_nlink == 0 or path.name.endswith(".new"):
                self._remove(part)  # finished meanwhile, or its writer died creating it
                return True
            with contextlib.suppress(FileNotFoundError):
                if os.stat(part.tmp).st_nlink > 1:  # published just before the crash
                    self._remove(part)
                    return True
            relative = self._scan_spool(part)
            if relative is None:
                os.close(fd)
                return True
            directory = self.directory / relative
            if part.rows_spooled:
                self._seal(part)
                number = self._link(part, directory, -1)
                log.info("sink %s: recovered %d records of an unfinished part into "
                         "%s/part-%d.parquet", self.name, part.rows_spooled, relative, number)
            else:
                self._remove(part)
            return True
        except (OSError, pa.ArrowException) as err:
            self._errors.inc()
            log.error("sink %s: cannot recover %s: %s (retried at the next flush)", self.name,
                      path, err.strerror if isinstance(err, OSError) and err.strerror else err)
            self._discard_parquet(part)
            with contextlib.suppress(OSError):
                os.close(fd)
            return False

    def _scan_spool(self, part: _Part) -> str | None:
        """Read the spool's schema and index its messages (up to a torn one): its partition
        directory, or None (logged) when it is not a spool of this sink."""
        pa = self._pa
        relative: str | None
        with pa.OSFile(str(part.spool), "rb") as source:
            try:
                schema = pa.ipc.read_schema(source)
            except (OSError, pa.ArrowException) as err:
                relative = None
                why = f"no schema ({err})"
            else:
                raw = (schema.metadata or {}).get(_PARTITION_KEY, b"")
                relative = raw.decode(errors="replace")
                why = f"unexpected partition {relative!r}"
            if relative is None or not _PARTITION_RE.match(relative):
                self._errors.inc()
                log.error("sink %s: %s is not a spool of this sink (%s); left alone", self.name,
                          part.spool, why)
                return None
            part.schema = schema.remove_metadata()
            offset = source.tell()
            while True:
                try:
                    message = pa.ipc.read_message(source)
                    if message.type != "record batch":
                        break
                    rows = pa.ipc.read_record_batch(message, part.schema).num_rows
                except EOFError:
                    break
                except (OSError, pa.ArrowException):  # torn by the crash: never acknowledged
                    log.info("sink %s: %s ends with a torn message at byte %d: dropped",
                             self.name, part.spool, offset)
                    break
                end = source.tell()
                part.batches.append((offset, end - offset, rows))
                part.rows_spooled += rows
                offset = end
        return relative


def _base64_json(raw: bytes) -> str:
    return f'"{base64.b64encode(raw).decode()}"'


def _text(value: Any) -> str:
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _coerce(name: str, column: Sequence[Any]) -> list[Any]:
    """The slow path when some value of a column does not fit its type (a stage that set a
    field to a number, a lone surrogate): strings by ``str``, anything else null."""
    if name == "qos":
        return [v if type(v) is int and -128 <= v <= 127 else None for v in column]
    if name == "received_at":
        return list(column)  # computed by the sink: always an int
    if name == "errors":
        return [None if v is None else [_text(e) for e in v] if isinstance(v, (list, tuple))
                else [_text(v)] for v in column]
    return [None if v is None else _text(v) for v in column]


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"spool shorter than expected ({offset} + {length} bytes)")
    return data


def _open_output(path: Path) -> BinaryIO:
    return open(path, "wb")


# --------------------------------------------------------------------------------------------
# Benchmark: python -m gateway.parquet_sink --bench


def bench_envelopes(count: int) -> list[Envelope]:
    """``count`` envelopes as a decode and an enrich stage leave them: two regions, 2,000
    devices, two hours."""
    start = 1714998600.0  # 2024-05-06 12:30 UTC
    step = 7200 / count
    envelopes = []
    for i in range(count):
        device = f"dev-{i % 2000:05d}"
        data = {"temp": round(18 + (i % 97) * 0.125, 3), "humidity": 30 + i % 41,
                "battery": 100 - i % 100, "status": "ok" if i % 50 else "low"}
        envelopes.append(Envelope(
            f"gw-1-{i}", device, "acme", "standard" if i % 10 else "critical",
            "eu-west" if i % 2 else "us-east", f"telemetry/{device}/reading",
            msgspec.json.encode(data), i, start + i * step, "mqtt", 1, "thermometer",
            data=data, meta={"site": f"plant-{i % 7}", "model": "T-100"}))
    return envelopes


async def _bench_one(sink: Any, batches: list[list[Envelope]], flush_every: int
                     ) -> dict[str, float]:
    stall = 0.0
    running = True

    async def watch() -> None:  # the longest a 1 ms timer was late
        nonlocal stall
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stall = max(stall, time.perf_counter() - before - 0.001)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    in_write = 0.0
    flushing: asyncio.Task[None] | None = None
    started = time.perf_counter()
    for i, batch in enumerate(batches, 1):
        before = time.perf_counter()
        sink.write(batch)
        in_write += time.perf_counter() - before
        # As the gateway's timer does: one flush at a time, while messages keep coming.
        if i % flush_every == 0 and (flushing is None or flushing.done()):
            flushing = asyncio.create_task(sink.flush())
        await asyncio.sleep(0)
    if flushing is not None:
        await flushing
    await sink.close()
    elapsed = time.perf_counter() - started
    running = False
    await watcher
    return {"seconds": elapsed, "write_seconds": in_write, "stall": stall}


def _disk_bytes(root: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in root.rglob(f"*{suffix}"))


async def run_bench(records: int = 200_000, batch: int = 512, flush_records: int = 20_000,
                    directory: Path | None = None) -> dict[str, dict[str, float]]:
    """The same envelopes through the JSON-lines and the Parquet sink, written ``batch`` at a
    time and flushed every ``flush_records`` (a flush a second at that rate), then closed.

    The envelopes are made first and frozen out of the garbage collector's sight, as the
    gateway freezes what it holds after startup: else each collection would scan all of
    them, which a gateway with a few batches in flight never does."""
    from gateway.sinks import JsonLinesOptions, JsonLinesSink

    envelopes = bench_envelopes(records)
    batches = [envelopes[i:i + batch] for i in range(0, records, batch)]
    flush_every = max(1, flush_records // batch)
    root = Path(tempfile.mkdtemp(prefix="iotgw-bench-", dir=directory))
    results: dict[str, dict[str, float]] = {}
    gc.collect()
    gc.freeze()
    try:
        sinks: list[tuple[str, Any, str]] = [
            ("jsonl", JsonLinesSink("bench", JsonLinesOptions(dir=str(root / "jsonl")),
                                    Metrics()), ".jsonl"),
            ("parquet", ParquetSink("bench", ParquetOptions(dir=str(root / "parquet")),
                                    Metrics()), ".parquet")]
        for name, sink, suffix in sinks:
            result = await _bench_one(sink, batches, flush_every)
            result["records_per_s"] = records / result["seconds"]
            result["bytes"] = _disk_bytes(root / name, suffix)
            results[name] = result
    finally:
        gc.unfreeze()
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.parquet_sink")
    parser.add_argument("--bench", action="store_true", required=True,
                        help="Parquet vs JSON-lines sink write throughput")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--flush-records", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a temp dir)")
    args = parser.parse_args(argv)
    results = asyncio.run(run_bench(args.records, args.batch, args.flush_records, args.dir))
    print(f"{args.records:,} envelopes, batches of {args.batch}, "
          f"a flush every {args.flush_records:,} records, then close")
    print(f"{'sink':<8} {'records/s':>11} {'write() µs/rec':>15} {'max loop stall':>15} "
          f"{'on disk':>10}")
    for name, r in results.items():
        print(f"{name:<8} {r['records_per_s']:>11,.0f} "
              f"{r['write_seconds'] / args.records * 1e6:>15.2f} "
              f"{r['stall'] * 1e3:>12.1f} ms {r['bytes'] / 2**20:>7.1f} MB")
    jsonl, parquet = results["jsonl"], results["parquet"]
    print(f"parquet / jsonl: throughput {parquet['records_per_s'] / jsonl['records_per_s']:.2f} x,"
          f" write() time {parquet['write_seconds'] / jsonl['write_seconds']:.2f} x,"
          f" size {parquet['bytes'] / jsonl['bytes']:.2f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
