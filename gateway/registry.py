"""The device registry: device id → tenant, tier, device class, region and extra attributes.

Theory of operation
-------------------
A registry may hold a million devices, so it is stored compactly and read without
allocating: one ``dict`` from device id to a ``DeviceRecord``, a frozen, untracked (``gc=False``)
array-like Struct of six slots (64 bytes). Its strings are shared: tenant, tier, class and
region are interned; extra attributes are kept as a tuple of values aligned with a tuple of
attribute names, and both tuples are shared between devices whenever they are equal (every
CSV row shares the header's names; equal value tuples are deduplicated, up to a bound so that
loading a registry of unique values does not pay for a table it cannot use).

``lookup()`` builds the public, self-contained ``DeviceInfo`` (with its own ``attributes``
dict) on each call; hot paths that run per message use ``record()``, which allocates nothing.

The records are split over ``SHARDS`` dicts by the device id's hash, so that a registry is
built and freed in short steps (``loading``, ``dismantle``): the maintenance task that rebuilds
it runs on the event loop in slices.

Formats::

    # devices.toml                          # devices.csv
    [devices."dev-1"]                       device,tenant,tier,device_class,region,site
    tenant = "acme"                         dev-1,acme,critical,thermometer,eu,plant-3
    tier = "critical"
    device_class = "thermometer"
    region = "eu"
    site = "plant-3"        # any other key is an extra attribute

Empty values mean "not set" (classification applies its defaults; an empty CSV cell is no
attribute). Errors raise ``ConfigError`` naming the file and, for CSV, the line.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import sys
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec

from gateway.errors import ConfigError

CORE_COLUMNS: tuple[str, ...] = ("device", "tenant", "tier", "device_class", "region")

# Distinct values remembered per extra column (and distinct attribute tuples) while loading.
# Beyond this a column is treated as high-cardinality (serial numbers, install dates...): its
# values are no longer interned, since sharing would save nothing and the table would cost.
_DEDUP_LIMIT = 65_536
# The records live in SHARDS dicts chosen by the device id's hash: growing or freeing one
# small dict at a time keeps every step of a rebuild short (a 1M-entry dict's last resize
# copies it whole: ~30 ms).
SHARDS = 64
SHARD_MASK = SHARDS - 1


class DeviceInfo(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """What the registry knows about one device."""

    tenant: str
    tier: str
    device_class: str
    region: str
    attributes: dict[str, str] = {}


class DeviceRecord(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """The stored form of a device: shared strings, no per-device dict or tuple.

    Each registry stores instances of a subclass with one string slot per extra attribute
    (``""`` when the device lacks it); ``DeviceRegistry.attributes(record)`` names them.
    """

    tenant: str
    tier: str
    device_class: str
    region: str


_CORE_SLOTS = 4


@functools.cache
def _record_type(width: int) -> type[DeviceRecord]:
    """The record class with ``width`` attribute slots (``a0``, ``a1``, ...): one class per
    width, so that the records of two loads of a file compare equal."""
    if width == 0:
        return DeviceRecord
    cls = msgspec.defstruct(f"DeviceRecord{width}", [(f"a{i}", str) for i in range(width)],
                            bases=(DeviceRecord,), frozen=True, gc=False, array_like=True,
                            module=__name__)
    assert issubclass(cls, DeviceRecord)
    return cls


class DeviceRegistry:
    """An immutable device id → ``DeviceRecord`` map."""

    __slots__ = ("_names", "_shards", "_size", "changed", "source")

    def __init__(self, records: dict[str, DeviceRecord] | list[dict[str, DeviceRecord]]
                 | None = None, attribute_names: tuple[str, ...] = (), source: str = "") -> None:
        """``records``: device → record, or already split into ``SHARDS`` shards by
        ``shard_of``."""
        if isinstance(records, list):
            self._shards = tuple(records)
        else:
            shards: list[dict[str, DeviceRecord]] = [{} for _ in range(SHARDS)]
            for device, record in (records or {}).items():
                shards[hash(device) & SHARD_MASK][device] = record
            self._shards = tuple(shards)
        self._size = sum(map(len, self._shards))
        self._names = attribute_names
        self.source = source
        self.changed: frozenset[str] | None = None
        """Set by ``loading(previous=...)``: the devices whose record differs from the
        previous registry (None: unknown, or some were removed)."""

    @classmethod
    def empty(cls) -> DeviceRegistry:
        return cls({}, (), "<empty>")

    @classmethod
    def from_devices(cls, devices: Mapping[str, DeviceInfo]) -> DeviceRegistry:
        """Build from ``DeviceInfo`` values (tests, and callers that load from elsewhere)."""
        names = tuple(sorted({k for info in devices.values() for k in info.attributes}))
        record = _record_type(len(names))
        intern = sys.intern
        records = {
            device: record(intern(info.tenant), intern(info.tier), intern(info.device_class),
                           intern(info.region), *(info.attributes.get(k, "") for k in names))
            for device, info in devices.items()
        }
        return cls(records, names, "<memory>")

    @classmethod
    def load(cls, path: str | Path, *, tiers: Collection[str] | None = None) -> DeviceRegistry:
        """Load a ``.toml`` or ``.csv`` file; ``tiers``, if given, are the valid tier names."""
        loading = cls.loading(path, tiers=tiers)
        while True:
            try:
                next(loading)
            except StopIteration as done:
                return cast(DeviceRegistry, done.value)

    @classmethod
    def loading(cls, path: str | Path, *, tiers: Collection[str] | None = None,
                rows_per_step: int = 0, previous: DeviceRegistry | None = None,
                ) -> Generator[None, None, DeviceRegistry]:
        """``load`` in steps: with ``rows_per_step``, a CSV file's rows are read that many
        at a time, the generator yielding in between (to run on an event loop in slices);
        it returns the registry. A TOML file is read in one step. With ``previous``, the
        new registry's ``changed`` says which devices differ from it."""
        name = str(path)
        suffix = Path(path).suffix.lower()
        if suffix not in (".toml", ".csv"):
            raise ConfigError(f"registry {name}: unsupported format {suffix or '(none)'!r} "
                              "(expected .toml or .csv)")
        checker = _TierCheck(tiers)
        found: set[str] = set()  # with ``previous``: devices new or different
        try:
            records: dict[str, DeviceRecord] | list[dict[str, DeviceRecord]]
            if suffix == ".csv":
                with open(path, encoding="utf-8-sig", newline="") as file:
                    records, names = yield from _load_csv(file, name, checker, rows_per_step,
                                                          previous, found)
            else:
                with open(path, "rb") as binary:
                    records, names = _load_toml(binary.read(), name, checker)
        except OSError as err:
            raise ConfigError(f"registry {name}: cannot read: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"registry {name}: not UTF-8: {err.reason}") from None
        registry = cls(records, names, name)
        if previous is not None and isinstance(records, list):
            registry.changed = _changes(registry, previous, found)
        return registry

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The extra attributes any device of this registry may have."""
        return self._names

    def lookup(self, device: str) -> DeviceInfo | None:
        """The device's information as a new ``DeviceInfo``; ``None`` if unknown."""
        record = self._shards[hash(device) & SHARD_MASK].get(device)
        if record is None:
            return None
        return DeviceInfo(tenant=record.tenant, tier=record.tier,
                          device_class=record.device_class, region=record.region,
                          attributes=self.attributes(record))

    def record(self, device: str) -> DeviceRecord | None:
        """The stored record (no allocation): for per-message use."""
        return self._shards[hash(device) & SHARD_MASK].get(device)

    def attributes(self, record: DeviceRecord) -> dict[str, str]:
        """A new dict of the extra attributes ``record`` (of this registry) has."""
        if not self._names:
            return {}
        values = msgspec.structs.astuple(record)[_CORE_SLOTS:]
        return {k: v for k, v in zip(self._names, values, strict=True) if v}

    def __len__(self) -> int:
        return self._size

    def __contains__(self, device: object) -> bool:
        return isinstance(device, str) and device in self._shards[hash(device) & SHARD_MASK]

    def __iter__(self) -> Iterator[str]:
        for shard in self._shards:
            yield from shard

    def dismantle(self, per_step: int = 2_000) -> Generator[None, None, None]:
        """Empty the registry ``per_step`` records at a time: freeing a million records at
        once would hold the loop for tens of milliseconds. Only for a registry nobody uses
        any more."""
        yield from _emptied(self._shards, per_step)
        self._size = 0

    def __repr__(self) -> str:
        return f"DeviceRegistry({self.source!r}, {len(self)} devices)"


class _TierCheck:
    """Checks tier names against the configured ones, once per distinct value."""

    def __init__(self, tiers: Collection[str] | None) -> None:
        self._tiers = frozenset(tiers) if tiers is not None else None
        self._seen: set[str] = {""}

    def __call__(self, tier: str) -> str | None:
        if tier in self._seen or self._tiers is None:
            return None
        if tier not in self._tiers:
            return f"unknown tier {tier!r} (known: {', '.join(sorted(self._tiers))})"
        self._seen.add(tier)
        return None


def _changes(new: DeviceRegistry, previous: DeviceRegistry,
             found: set[str]) -> frozenset[str] | None:
    """The devices ``_load_csv`` found new or different, or None when devices were removed
    or the attribute columns differ (then anything may have changed)."""
    if new.attribute_names != previous.attribute_names:
        return None
    kept = len(new) - sum(1 for d in found if d not in previous)  # devices of both
    if kept != len(previous):
        return None  # devices were removed
    return frozenset(found)


def _load_csv(file: Any, name: str, check_tier: _TierCheck, rows_per_step: int = 0,
              previous: DeviceRegistry | None = None, found: set[str] | None = None,
              ) -> Generator[None, None, tuple[list[dict[str, DeviceRecord]], tuple[str, ...]]]:
    reader: Any = csv.reader(file)
    if rows_per_step:  # rows come in slices; the generator yields between them
        reader = _sliced(reader, rows_per_step)
    shards: list[dict[str, DeviceRecord]] = [{} for _ in range(SHARDS)]
    try:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"registry {name}: empty file (expected a header row "
                              f"{','.join(CORE_COLUMNS)}[,...])")
        header = [h.strip() for h in header]
        if tuple(header[:5]) != CORE_COLUMNS:
            raise ConfigError(f"registry {name}:{reader.line_num}: expected header "
                              f"{','.join(CORE_COLUMNS)}[,...], got {','.join(header)}")
        names = tuple(sys.intern(h) for h in header[5:])
        if len(set(names)) != len(names) or "" in names:
            raise ConfigError(f"registry {name}:{reader.line_num}: "
                              "extra column names must be unique and non-empty")
        width = len(header)
        record = _record_type(len(names))
        padding = ("",) * len(names)
        intern = sys.intern
        # Per extra column: value → shared value, or None once the column is high-cardinality.
        columns: list[dict[str, str] | None] = [{} for _ in names]
        for row in reader:
            n = len(row)
            if n != width:
                if n == 0:
                    if row is _STEP:
                        yield  # a slice is done
                    continue  # blank line
                if n < 5:
                    raise ConfigError(f"registry {name}:{reader.line_num}: "
                                      f"expected 5+ columns, got {n}")
                if n > width:
                    raise ConfigError(f"registry {name}:{reader.line_num}: "
                                      f"expected at most {width} columns, got {n}")
                row.extend(padding[: width - n])
            device = row[0]
            if not device:
                raise ConfigError(f"registry {name}:{reader.line_num}: empty device id")
            tier = row[2]
            problem = check_tier(tier)
            if problem is not None:
                raise ConfigError(f"registry {name}:{reader.line_num}: {problem}")
            for i, table in enumerate(columns):
                if table is not None:
                    value = row[5 + i]
                    known = table.get(value)
                    if known is not None:
                        row[5 + i] = known
                    elif len(table) < _DEDUP_LIMIT:
                        table[value] = value
                    else:
                        columns[i] = None
            shard = shards[hash(device) & SHARD_MASK]
            size = len(shard)
            entry = shard[device] = record(intern(row[1]), intern(tier), intern(row[3]),
                                           intern(row[4]), *row[5:])
            if len(shard) == size:
                raise ConfigError(f"registry {name}:{reader.line_num}: "
                                  f"duplicate device {device!r}")
            if previous is not None and found is not None and previous.record(device) != entry:
                found.add(device)
    except csv.Error as err:
        _free_in_slices(shards)
        raise ConfigError(f"registry {name}:{reader.line_num}: {err}") from None
    except BaseException:  # a bad row, or stopped half way (a maintenance window ended)
        _free_in_slices(shards)
        raise
    return shards, names


def _emptied(shards: Sequence[dict[str, DeviceRecord]], per_step: int,
             ) -> Generator[None, None, None]:
    """Empty ``shards`` ``per_step`` records at a time, yielding in between."""
    left = per_step
    for shard in shards:
        while shard:
            n = min(left, len(shard))
            for _ in range(n):
                shard.popitem()
            left -= n
            if not left:
                yield
                left = per_step
        shard.clear()  # the table itself, which popping does not shrink


def _free_in_slices(shards: list[dict[str, DeviceRecord]], per_step: int = 2_000) -> None:
    """Free records nobody will use, in slices on the running event loop (one per loop
    turn): a load stopped half way may have built hundreds of thousands, and freeing them
    at once would hold the loop for tens of milliseconds. Without a loop: now."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    steps = _emptied(shards, per_step)

    def step() -> None:
        if next(steps, StopIteration) is not StopIteration:
            loop.call_soon(step)

    loop.call_soon(step)


_STEP: list[str] = []
"""An empty row (skipped like a blank line) that marks the end of a slice."""


class _sliced:
    """A csv reader that gives the ``_STEP`` row after every ``size`` rows."""

    def __init__(self, reader: Any, size: int) -> None:
        self._reader = reader
        self._size = size
        self._left = size

    @property
    def line_num(self) -> int:
        return int(self._reader.line_num)

    def __iter__(self) -> _sliced:
        return self

    def __next__(self) -> list[str]:
        if not self._left:
            self._left = self._size
            return _STEP
        self._left -= 1
        return cast(list[str], next(self._reader))


_CORE_TOML = ("tenant", "tier", "device_class", "region")


def _load_toml(text: bytes, name: str,
               check_tier: _TierCheck) -> tuple[dict[str, DeviceRecord], tuple[str, ...]]:
    try:
        doc = msgspec.toml.decode(text)
    except msgspec.DecodeError as err:
        raise ConfigError(f"registry {name}: {err}") from None
    unknown = sorted(k for k in doc if k != "devices")
    if unknown:
        raise ConfigError(f"registry {name}: unknown key {unknown[0]!r} (expected [devices])")
    devices = doc.get("devices", {})
    if not isinstance(devices, dict):
        raise ConfigError(f"registry {name}: devices: expected a table, "
                          f"got {_toml_type(devices)}")
    parsed: list[tuple[str, dict[str, str], dict[str, str]]] = []
    all_names: set[str] = set()
    for device, entry in devices.items():
        place = f"registry {name}: devices.{_toml_key(device)}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{place}: expected a table, got {_toml_type(entry)}")
        core: dict[str, str] = {}
        attrs: dict[str, str] = {}
        for key, value in entry.items():
            if key in _CORE_TOML:
                if not isinstance(value, str):
                    raise ConfigError(f"{place}.{key}: expected string, got {_toml_type(value)}")
                core[key] = value
            elif isinstance(value, bool):
                attrs[key] = "true" if value else "false"
            elif isinstance(value, str | int | float):
                attrs[key] = str(value)
            else:
                raise ConfigError(f"{place}.{_toml_key(key)}: expected a string, number or "
                                  f"boolean attribute, got {_toml_type(value)}")
        problem = check_tier(core.get("tier", ""))
        if problem is not None:
            raise ConfigError(f"{place}.tier: {problem}")
        all_names.update(attrs)
        parsed.append((device, core, attrs))
    names = tuple(sys.intern(k) for k in sorted(all_names))
    record = _record_type(len(names))
    intern = sys.intern
    records = {
        device: record(intern(core.get("tenant", "")), intern(core.get("tier", "")),
                       intern(core.get("device_class", "")), intern(core.get("region", "")),
                       *(intern(attrs.get(k, "")) for k in names))
        for device, core, attrs in parsed
    }
    return records, names


def _toml_key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else f'"{key}"'


def _toml_type(value: object) -> str:
    return {str: "string", int: "integer", float: "float", bool: "boolean", dict: "table",
            list: "array"}.get(type(value), type(value).__name__)
