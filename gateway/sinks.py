"""Sinks: where processed envelopes go (data-lake files, and later AMQP, MQTT, webhooks).

Theory of operation
-------------------
A sink takes whole batches: ``write(batch)`` runs on the event loop, is synchronous and only
buffers (encoding included, so that the records no longer depend on the envelopes);
``flush()`` runs on a timer (about once a second) and at shutdown and hands the buffers to
the operating system; ``close()`` flushes and releases everything. A sink never raises on an
I/O failure: it logs at ERROR, counts ``iotgw_sink_errors_total{sink}`` and keeps what it
could not write, to retry on the next flush.

The ``parquet`` sink (``gateway.parquet_sink``) writes the same layout as Parquet files; it needs
the extra ``iot-gateway[parquet]``, whose pyarrow is imported only when such a sink is built.

Sink types are registered by name in ``SINKS`` (built-ins plus the entry-point group
``iot_gateway.sinks``); each has an ``Options`` Struct, decoded from ``[sinks.<name>.options]``.

The JSON-lines sink writes the data-lake layout::

    <dir>/region=<region>/date=<YYYY-MM-DD>/hour=<HH>/part-<n>.jsonl

partitioned by the UTC hour of each record's ``received_at``. Each process creates its files
exclusively (``O_EXCL``) with the next free ``<n>``, so it never appends to a file another
process (or an earlier run) wrote. Records are encoded into one ``bytearray`` per open file and
written with one ``write`` per file per flush (or as soon as the buffer passes
``buffer_bytes``): the buffering a ``BufferedWriter`` would do, but knowing exactly which bytes
reached the OS, so that on failure the rest stays buffered, whole lines, for the retry. A file
is closed and the next part started before it would pass ``max_file_bytes`` (unless one record
alone is larger); files of past hours are closed once idle, and at most ``max_open_files`` stay
open. Flushing does not fsync: durability is the write-ahead log's job.

Every ``writeback_bytes`` written to a file, a thread asks the kernel to start writing those
bytes to disk and to drop them from the page cache (``posix_fadvise(DONTNEED)``, PostgreSQL's
fallback for ``sync_file_range``). Left to itself, the kernel writes a file's dirty pages back
in one go after about 30 s; on ext4 (``data=ordered``) a journal commit must wait for such a
writeback, and the write-ahead log's ``fdatasync`` waits for the journal commit: measured
here, hundreds of MB of lake data held single WAL fsyncs for up to 380 ms (critical-tier p99
from 43 to 188 ms). Written back in small steps, no fsync waited longer than 20 ms.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar
from urllib.parse import quote

import msgspec
from msgspec import Meta

from gateway.broker import Broker, Message
from gateway.config import Config
from gateway.envelope import Envelope, SinkRecord
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.parquet_sink import ParquetSink  # pyarrow: imported when one is built
from protocols.amqp.sink import AmqpSink

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, batch: list[Envelope]) -> None:
        """Take ``batch`` (synchronously, buffering); never blocks on I/O for long."""

    async def flush(self) -> None:
        """Hand what is buffered to the OS (or the peer); called about once a second."""

    async def close(self) -> None:
        """Flush and release files and connections."""


class SinkFactory(Protocol):
    """A registered sink type: ``Options`` is decoded from the config, then the type called."""

    Options: type[msgspec.Struct]

    def __call__(self, name: str, options: Any, metrics: Metrics) -> Sink: ...


# --------------------------------------------------------------------------------------------
# Plugin registries (shared with gateway.pipeline)

F = TypeVar("F")


def load_plugins(group: str, builtins: Mapping[str, F], *,
                 entry_points: Callable[..., Iterable[Any]] = importlib.metadata.entry_points,
                 ) -> tuple[dict[str, F], dict[str, str]]:
    """Built-ins plus the entry points of ``group``: (name → factory, name → load error).

    A plugin must have an ``Options`` attribute that is a ``msgspec.Struct`` type and be
    callable. Built-ins win a name clash. A plugin that fails to load does not stop the
    gateway; using its name in a config is a ``ConfigError`` that says why.
    """
    loaded: dict[str, F] = dict(builtins)
    broken: dict[str, str] = {}
    for ep in entry_points(group=group):
        if ep.name in loaded:
            log.warning("%s plugin %r (%s) ignored: a built-in has that name",
                        group, ep.name, ep.value)
            continue
        try:
            factory = ep.load()
        except Exception as err:  # a third party's bug must not stop the gateway
            broken[ep.name] = f"{type(err).__name__}: {err}"
            log.error("%s plugin %r (%s) failed to load: %s", group, ep.name, ep.value,
                      broken[ep.name])
            continue
        options = getattr(factory, "Options", None)
        if not (callable(factory) and isinstance(options, type)
                and issubclass(options, msgspec.Struct)):
            broken[ep.name] = "not a factory (expected a callable with an Options Struct type)"
            log.error("%s plugin %r (%s): %s", group, ep.name, ep.value, broken[ep.name])
            continue
        loaded[ep.name] = factory
    return loaded, broken


_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")


def format_validation_error(where: str, err: msgspec.ValidationError) -> str:
    """``where`` + msgspec's error, e.g. ``"pipelines[0].stages[2].rename: expected object,
    got int"``; an unknown or missing field is named in the path."""
    text = str(err)
    path = ""
    m = _PATH_RE.search(text)
    if m is not None:
        path = m["path"]
        text = text[: m.start()]
    for regex, why in ((_UNKNOWN_RE, "unknown field"), (_MISSING_RE, "required")):
        fm = regex.match(text)
        if fm is not None:
            path = f"{path}.{fm['field']}"
            text = why
            break
    text = text.replace("`", "")
    text = text[:1].lower() + text[1:]
    return f"{where}{path}: {text}"


# --------------------------------------------------------------------------------------------
# null: counts only


class NullOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NullSink:
    """Counts records and drops them (benchmarks, and pipelines that only aggregate)."""

    Options: ClassVar[type[msgspec.Struct]] = NullOptions

    def __init__(self, name: str, options: NullOptions, metrics: Metrics) -> None:
        self.name = name
        self.records = 0
        self._counter = metrics.sink_records.labels(name)

    def write(self, batch: list[Envelope]) -> None:
        self.records += len(batch)
        self._counter.inc(len(batch))

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# jsonl: the data lake


class _Partition:
    """One ``region=/date=/hour=`` directory: its open part file and unwritten lines."""

    __slots__ = ("directory", "file", "hour", "mid_line", "number", "pending", "size",
                 "touched", "written_back")

    def __init__(self, directory: Path, hour: int) -> None:
        self.directory = directory
        self.hour = hour
        self.file: Any = None  # an unbuffered binary file (FileIO) while open
        self.number = -1  # the current (or last) part number; -1: none yet
        self.size = 0
        self.written_back = 0  # bytes of the current file handed to write-back so far
        self.pending = bytearray()
        self.mid_line = False  # a partial write left a line unfinished in the current file
        self.touched = True  # written to since the last flush


_PART_RE = re.compile(r"^part-(\d+)\.jsonl$")


class JsonLinesOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dir: str = "./data/lake"
    max_file_bytes: Annotated[int, Meta(ge=1)] = 64 * 2**20
    """A part file is closed and the next one started before it would pass this."""
    buffer_bytes: Annotated[int, Meta(ge=0)] = 2**20
    """Write a file's buffer to the OS as soon as it holds this much, not only on flush."""
    max_open_files: Annotated[int, Meta(ge=1)] = 64
    writeback_bytes: Annotated[int, Meta(ge=0)] = 4 * 2**20
    """Start writing a file to disk every this many bytes, so that the kernel never has
    hundreds of MB to write at once (which stalls the WAL's fsyncs); 0: leave it to the kernel."""


class JsonLinesSink:
    """JSON lines in the data-lake layout (see the module docstring)."""

    Options: ClassVar[type[msgspec.Struct]] = JsonLinesOptions

    def __init__(self, name: str, options: JsonLinesOptions, metrics: Metrics) -> None:
        self.name = name
        self.options = options
        self.directory = Path(options.dir)
        self._max_bytes = options.max_file_bytes
        self._buffer_bytes = options.buffer_bytes
        self._writeback_bytes = options.writeback_bytes
        self._writeback: ThreadPoolExecutor | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder()
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._open: dict[tuple[str, int], _Partition] = {}  # insertion order ≈ least recent
        self._region_dirs: dict[str, str] = {}
        self._second = -1
        self._second_text = ""
        self._failing = False  # the last I/O failed: leave retries to the next flush()
        self._records = metrics.sink_records.labels(name)
        self._errors = metrics.sink_errors.labels(name)
        self._buffered = metrics.sink_buffered.labels(name)

    # -- the hot path ---------------------------------------------------------------------

    def write(self, batch: list[Envelope]) -> None:
        groups: dict[tuple[str, int], list[SinkRecord]] = {}
        decode = self._decoder.decode
        record = SinkRecord
        second, second_text = self._second, self._second_text
        last_at = -1.0
        stamp = ""
        hour = -1
        last_region: str | None = None
        last_hour = -1
        current: list[SinkRecord] = []
        for env in batch:
            at = env.received_at
            if at != last_at:  # messages of one socket read share their timestamp
                last_at = at
                us = int(at * 1e6 + 0.5)
                sec = us // 1_000_000
                if sec != second:
                    second = sec
                    second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
                stamp = "%s.%06dZ" % (second_text, us - sec * 1_000_000)  # noqa: UP031 - faster
                hour = sec // 3600
            region = env.region
            if hour != last_hour or region != last_region:
                last_hour, last_region = hour, region
                current = groups.setdefault((region, hour), [])
            data = env.data
            encoding = "json"
            if data is None:
                try:
                    data = decode(env.payload)
                except (msgspec.DecodeError, UnicodeDecodeError):  # "\xff" is JSON, not UTF-8
                    data = env.payload  # bytes: the encoder writes base64
                    encoding = "base64"
            current.append(record(
                env.id, env.device, env.tenant, env.tier, env.topic, stamp, env.qos,
                env.protocol, region, env.device_class, encoding, data, env.meta, env.errors))
        self._second, self._second_text = second, second_text
        for key, records in groups.items():
            partition = self._partitions.get(key)
            if partition is None:
                partition = self._partitions[key] = _Partition(
                    self._partition_dir(key[0], key[1]), key[1])
            partition.touched = True
            try:
                lines = self._encoder.encode_lines(records)
            except (TypeError, ValueError, OverflowError):
                lines = self._encode_each(records, batch)
            partition.pending += lines
            if len(partition.pending) >= self._buffer_bytes and not self._failing:
                self._drain(key, partition)

    def _encode_each(self, records: list[SinkRecord], batch: list[Envelope]) -> bytes:
        """The slow path when some record's data cannot be encoded: keep it as base64."""
        out = bytearray()
        raw_payloads: dict[str, bytes] | None = None
        for record in records:
            try:
                out += self._encoder.encode(record)
            except (TypeError, ValueError, OverflowError) as err:
                if raw_payloads is None:
                    raw_payloads = {env.id: bytes(env.payload) for env in batch}
                raw = raw_payloads.get(record.id, b"")
                errors = [*(record.errors or ()), f"payload: not JSON-encodable: {err}"]
                meta = record.meta
                try:
                    self._encoder.encode(meta)
                except (TypeError, ValueError, OverflowError):
                    meta = None
                    errors.append("meta: not JSON-encodable, dropped")
                fixed = msgspec.structs.replace(record, payload_encoding="base64", payload=raw,
                                                meta=meta, errors=errors)
                out += self._encoder.encode(fixed)
            out += b"\n"
        return bytes(out)

    def _partition_dir(self, region: str, hour: int) -> Path:
        region_dir = self._region_dirs.get(region)
        if region_dir is None:
            region_dir = self._region_dirs[region] = f"region={_path_value(region)}"
        stamp = time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(hour * 3600))
        return self.directory / region_dir / stamp

    # -- I/O ------------------------------------------------------------------------------

    async def flush(self) -> None:
        self._failing = False
        for key, partition in list(self._partitions.items()):
            if partition.pending and not self._drain(key, partition):
                break  # the first failure is logged; retry all on the next flush
        current_hour = int(time.time()) // 3600
        for key, partition in list(self._partitions.items()):
            if partition.hour < current_hour and not partition.touched and not partition.pending:
                self._close_file(key, partition)
                del self._partitions[key]
            partition.touched = False
        self._buffered.set(sum(len(p.pending) for p in self._partitions.values()))

    async def close(self) -> None:
        await self.flush()
        lost = 0
        for key, partition in list(self._partitions.items()):
            lost += len(partition.pending)
            self._close_file(key, partition)
        self._partitions.clear()
        if lost:
            log.error("sink %s: closing with %d bytes it could not write", self.name, lost)
        if self._writeback is not None:
            self._writeback.shutdown(wait=False)  # hints only: nothing waits for them
            self._writeback = None

    def _drain(self, key: tuple[str, int], partition: _Partition) -> bool:
        """Write ``partition.pending`` to its part files; False (logged, counted) on failure."""
        pending = partition.pending
        total = len(pending)
        done = 0
        try:
            with memoryview(pending) as view:
                while done < total:
                    if partition.file is None or (partition.size >= self._max_bytes
                                                  and not partition.mid_line):
                        self._next_part(key, partition)
                    end = total
                    room = self._max_bytes - partition.size
                    if total - done > room and not partition.mid_line:
                        end = pending.rfind(b"\n", done, done + room) + 1
                        if end <= done:  # the next record does not fit
                            if partition.size > 0:
                                self._close_file(key, partition)
                                continue
                            end = pending.find(b"\n", done) + 1 or total  # alone, oversized
                    written: int = partition.file.write(view[done:end])
                    done += written
                    partition.size += written
                    partition.mid_line = pending[done - 1] != 0x0A if done else False
                    if (self._writeback_bytes
                            and partition.size - partition.written_back >= self._writeback_bytes):
                        self._write_back(partition)
            return True
        except OSError as err:
            self._failing = True
            self._errors.inc()
            log.error("sink %s: cannot write %s: %s (%d bytes kept for retry)", self.name,
                      partition.directory, err.strerror or err, total - done)
            return False
        finally:
            if done:
                self._records.inc(pending.count(b"\n", 0, done))
                del pending[:done]

    def _write_back(self, partition: _Partition) -> None:
        """Have a thread start the disk write of what the current file got since the last
        call (on its own copy of the descriptor: the file may be closed meanwhile)."""
        if self._writeback is None:
            self._writeback = ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.name}")
        start, partition.written_back = partition.written_back, partition.size
        fd = os.dup(partition.file.fileno())
        self._writeback.submit(_start_writeback, fd, start, partition.size - start)

    def _next_part(self, key: tuple[str, int], partition: _Partition) -> None:
        """Close the current part file, if any, and create the next free ``part-<n>``."""
        self._close_file(key, partition)
        if partition.number < 0:
            partition.directory.mkdir(parents=True, exist_ok=True)
            numbers = [int(m[1]) for entry in os.scandir(partition.directory)
                       if (m := _PART_RE.match(entry.name))]
            partition.number = max(numbers, default=-1)
        if len(self._open) >= self.options.max_open_files:
            # Close the longest-open files, except one with a line half written.
            excess = len(self._open) - self.options.max_open_files + 1
            for old_key, old in list(self._open.items()):
                if excess <= 0:
                    break
                if not old.mid_line:
                    self._close_file(old_key, old)
                    excess -= 1
        number = partition.number + 1
        while True:
            path = partition.directory / f"part-{number}.jsonl"
            try:
                partition.file = open(path, "xb", buffering=0)  # noqa: SIM115 - kept open
                break
            except FileExistsError:
                number += 1
            except FileNotFoundError:  # the directory was removed under us
                partition.directory.mkdir(parents=True, exist_ok=True)
        partition.number = number
        partition.size = partition.written_back = 0
        partition.mid_line = False
        self._open[key] = partition

    def _close_file(self, key: tuple[str, int], partition: _Partition) -> None:
        if partition.file is None:
            return
        self._open.pop(key, None)
        file, partition.file = partition.file, None
        try:
            file.close()
        except OSError as err:  # pragma: no cover - close of an unbuffered file
            log.error("sink %s: closing %s: %s", self.name, partition.directory, err)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:  # a hint: the kernel writes the data back later anyway
        pass
    finally:
        os.close(fd)


_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _path_value(value: str) -> str:
    """A partition value that is one safe path component (Hive-style escaping)."""
    if not value:
        return "__HIVE_DEFAULT_PARTITION__"
    if _SAFE_VALUE.match(value) and value not in (".", ".."):
        return value
    return quote(value, safe="").replace(".", "%2E")


# --------------------------------------------------------------------------------------------
# mqtt: processed results published through the gateway's own broker

_TOPIC_FIELDS = ("tier", "device", "tenant", "region", "topic", "device_class")


class MQTTOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    topic: str = "processed/{tenant}/{device}"
    """Topic template; fields: {tier}, {device}, {tenant}, {region}, {topic}, {device_class}."""
    qos: Annotated[int, Meta(ge=0, le=2)] = 0
    retain: bool = False
    payload: Literal["record", "raw"] = "record"
    """``record``: a JSON object (id, device, tenant, tier, region, topic, received_at, data,
    meta); ``raw``: the payload as it came in."""


class MQTTSink:
    """Publishes each processed message through the gateway's broker, so operators and
    downstream services subscribe with plain MQTT. Until the gateway attaches its broker
    (``attach_broker``) nothing is published; a topic that comes out invalid (a device id
    with a wildcard, say) is counted as a sink error and logged once per device."""

    Options: ClassVar[type[msgspec.Struct]] = MQTTOptions

    def __init__(self, name: str, options: MQTTOptions, metrics: Metrics) -> None:
        try:
            options.topic.format(**dict.fromkeys(_TOPIC_FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"options.topic {options.topic!r}: unknown or bad field {err} "
                             f"(known: {', '.join(_TOPIC_FIELDS)})") from None
        self.name = name
        self.options = options
        self._publish: Callable[[Message], int] | None = None
        self._encode = msgspec.json.Encoder().encode
        self._records = metrics.sink_records.labels(name)
        self._errors = metrics.sink_errors.labels(name)
        self._bad: set[str] = set()

    def attach_broker(self, broker: Broker) -> None:
        self._publish = broker.publish

    def write(self, batch: list[Envelope]) -> None:
        publish = self._publish
        if publish is None:
            return
        options = self.options
        template, qos, retain, raw = options.topic, options.qos, options.retain, (
            options.payload == "raw")
        encode = self._encode
        sent = 0
        for env in batch:
            topic = template.format(tier=env.tier, device=env.device, tenant=env.tenant,
                                    region=env.region, topic=env.topic,
                                    device_class=env.device_class)
            if "+" in topic or "#" in topic or not topic or "\x00" in topic:
                self._errors.inc()
                if env.device not in self._bad:
                    self._bad.add(env.device)
                    log.error("sink %s: topic %r from device %r is not a valid topic name",
                              self.name, topic, env.device)
                continue
            payload = bytes(env.payload) if raw else encode({
                "id": env.id, "device": env.device, "tenant": env.tenant, "tier": env.tier,
                "region": env.region, "topic": env.topic, "received_at": env.received_at,
                "data": env.data, "meta": env.meta})
            publish(Message(topic, payload, qos, retain))
            sent += 1
        if sent:
            self._records.inc(sent)

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        self._publish = None


# --------------------------------------------------------------------------------------------
# Registry and construction

BUILTIN_SINKS: dict[str, SinkFactory] = {"null": NullSink, "jsonl": JsonLinesSink,
                                          "mqtt": MQTTSink, "parquet": ParquetSink,
                                          "amqp": AmqpSink}

SINKS: dict[str, SinkFactory]
BROKEN_SINKS: dict[str, str]
SINKS, BROKEN_SINKS = load_plugins("iot_gateway.sinks", BUILTIN_SINKS)


def build_sink(name: str, sink_type: str, raw_options: Mapping[str, Any],
               metrics: Metrics) -> Sink:
    where = f"sinks.{name}"
    factory = SINKS.get(sink_type)
    if factory is None:
        if sink_type in BROKEN_SINKS:
            raise ConfigError(f"{where}.type: sink {sink_type!r} could not be loaded: "
                              f"{BROKEN_SINKS[sink_type]}")
        raise ConfigError(f"{where}.type: unknown sink {sink_type!r} "
                          f"(known: {', '.join(sorted(SINKS))})")
    try:
        options = msgspec.convert(dict(raw_options), factory.Options)
    except msgspec.ValidationError as err:
        raise ConfigError(format_validation_error(f"{where}.options", err)) from None
    try:
        return factory(name, options, metrics)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


# metrics → (config, its sinks): the sinks last built for that config and metrics.
_BUILT: weakref.WeakKeyDictionary[Metrics, tuple[Config, dict[str, Sink]]] = (
    weakref.WeakKeyDictionary())


def build_sinks(config: Config, metrics: Metrics) -> dict[str, Sink]:
    """One sink per ``[sinks.<name>]``; nothing is opened until the first write or flush.

    Calls with the same ``config`` and ``metrics`` objects return the same sinks, so that
    the pipelines built with ``StageContext(sinks=None)`` write to the sinks that the caller
    of ``build_sinks`` flushes and closes. A new config (a reload) builds new ones.
    """
    built = _BUILT.get(metrics)
    if built is not None and built[0] is config:
        return built[1]
    sinks = {name: build_sink(name, spec.type, spec.options, metrics)
             for name, spec in config.sinks.items()}
    _BUILT[metrics] = (config, sinks)
    return sinks
