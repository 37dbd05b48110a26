"""The scenario of ``iot-gateway simulate``: a TOML file decoded into msgspec Structs, and the
fleet it describes laid out without a per-device object.

Theory of operation
-------------------
A fleet of up to a million devices is a range of indices. Devices are cut into contiguous
*blocks*: per group (a tier, device class, topic and payload kind), per home region, and
inside that the CoAP devices first, then the MQTT ones. A device's id, tenant and region
follow from its index and block, so picking "a device of region eu-west" is a bisect over
a handful of blocks, and writing the registry CSV is one pass over the blocks.

MQTT devices are multiplexed over connections: a group has its own connections (so a group
may carry a username that the gateway's rules classify by), and device ``i`` of a group
talks over connection ``i % connections_of_group``. The gateway reads the device from the
topic (``[classify] device_id = "topic"``): every group's topic names the device at the
same level.

Times in a scenario are wall-clock seconds from the start of the run (``at_s``); the
simulated clock (``time.start``, one day every ``time.day_s``) only shapes the rate, by the
hour of the day and the day of the week. ``shrunk`` rescales a scenario for
``--duration`` (every time and the day length by the same factor, so the run keeps its
shape and its events) and ``--scale`` (devices, connections and rates).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from gateway.config import format_error, split_host_port
from gateway.errors import ConfigError

MAX_DEVICES = 1_000_000
DAY_S = 86_400.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

Share = Annotated[float, Meta(ge=0.0, le=1.0)]
PositiveShare = Annotated[float, Meta(gt=0.0, le=1.0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]
PositiveFloat = Annotated[float, Meta(gt=0.0)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]
Factor = Annotated[float, Meta(ge=0.0, le=1000.0)]

_START = re.compile(r"(?P<day>mon|tue|wed|thu|fri|sat|sun) (?P<h>[01]\d|2[0-3]):(?P<m>[0-5]\d)")
_TOPIC_LEVEL = re.compile(r"^[^+#]*$")
_SHARE_TOLERANCE = 1e-6


class ScenarioError(ConfigError):
    """The scenario file is invalid; the message names the field (exit code 2)."""


class _Base(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Target(_Base, frozen=True):
    """Where the gateway listens; an empty address turns that side off."""

    mqtt: str = "127.0.0.1:1883"
    coap: str = "127.0.0.1:5683"
    admin: str = "http://127.0.0.1:9883"
    """The admin API (``/metrics``): processed, shed, refused and latency come from it
    (without it the summary has only what the fleet saw)."""

    def __post_init__(self) -> None:
        for name in ("mqtt", "coap"):
            value = getattr(self, name)
            if value:
                try:
                    split_host_port(value)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        if self.admin and not re.match(r"^https?://[^/]+", self.admin):
            raise ValueError(f"admin: expected an http:// URL, got {self.admin!r}")


class TimeSection(_Base, frozen=True):
    duration_s: Annotated[float, Meta(gt=0.0, le=7 * DAY_S)]
    """Wall-clock length of the load."""
    day_s: Annotated[float, Meta(gt=0.0)] = DAY_S
    """Wall-clock seconds per simulated day: 60 runs a day in a minute."""
    start: str = "mon 00:00"
    """The simulated clock at the start: weekday and time, e.g. "fri 18:00"."""

    def __post_init__(self) -> None:
        if _START.fullmatch(self.start) is None:
            raise ValueError(f"start: expected a weekday and a time like \"mon 06:00\", got "
                             f"{self.start!r}")

    @property
    def start_s(self) -> float:
        """The simulated clock at the start, in seconds since Monday 00:00."""
        m = _START.fullmatch(self.start)
        assert m is not None
        return WEEKDAYS.index(m["day"]) * DAY_S + int(m["h"]) * 3600 + int(m["m"]) * 60


class Group(_Base, frozen=True):
    """Devices of one kind: their tier, class, topic, username and readings."""

    tier: Name
    share: PositiveShare
    """Fraction of the fleet's devices."""
    name: Name | None = None
    """Defaults to the tier; unique."""
    device_class: str = ""
    topic: str = "fleet/{device}"
    """MQTT topic; ``{device}`` is a whole level, at the same level in every group."""
    username: str | None = None
    """MQTT username of the group's connections (``{n}``: the connection's number)."""
    fields: dict[str, tuple[float, float]] = msgspec.field(
        default_factory=lambda: {"value": (0.0, 100.0)})
    """Reading fields and the range their values are drawn from."""
    rate_factor: Factor = 1.0
    """How often a device of this group sends, relative to the others."""
    qos1_share: Share | None = None
    """Share of steady readings sent at QoS 1 / CoAP CON (default: load.qos1_share)."""

    def __post_init__(self) -> None:
        levels = self.topic.split("/")
        if levels.count("{device}") != 1 or self.topic.count("{device}") != 1:
            raise ValueError(f"topic: {{device}} must be one whole topic level, got "
                             f"{self.topic!r}")
        if _TOPIC_LEVEL.match(self.topic) is None or any(not level for level in levels):
            raise ValueError(f"topic: {self.topic!r} is not a topic name (no wildcards, no "
                             f"empty levels)")
        if not self.fields:
            raise ValueError("fields: give at least one field")
        for field, (low, high) in self.fields.items():
            if not low <= high:
                raise ValueError(f"fields.{field}: expected [low, high] with low <= high")

    @property
    def label(self) -> str:
        return self.name or self.tier

    @property
    def device_level(self) -> int:
        return self.topic.split("/").index("{device}")


class Region(_Base, frozen=True):
    name: Name
    share: PositiveShare


class FleetSection(_Base, frozen=True):
    devices: Annotated[int, Meta(ge=1, le=MAX_DEVICES)]
    groups: Annotated[list[Group], Meta(min_length=1)]
    connections: Annotated[int, Meta(ge=1, le=20_000)] = 100
    """MQTT connections the devices are multiplexed over (at least one per group)."""
    regions: list[Region] = msgspec.field(
        default_factory=lambda: [Region(name="local", share=1.0)])
    tenants: Annotated[int, Meta(ge=1, le=1_000_000)] | Annotated[list[Name], Meta(
        min_length=1)] = 1
    """How many tenants ("tenant-000", ...), or their names; devices are dealt round robin."""
    id_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "dev"
    coap_share: Share = 0.0
    """Fraction of each group's devices that speak CoAP (the rest MQTT)."""
    coap_sockets: Annotated[int, Meta(ge=1, le=1024)] = 16
    coap_window: Annotated[int, Meta(ge=1, le=64)] = 4
    """Confirmable requests in flight per CoAP socket."""
    keepalive_s: Annotated[int, Meta(ge=0, le=65535)] = 60
    max_pending: Annotated[int, Meta(ge=1)] = 100_000
    """Readings a connection buffers while the gateway pushes back; more are dropped by the
    devices (counted)."""
    seed: int = 1

    def __post_init__(self) -> None:
        _check_shares("groups", [g.share for g in self.groups])
        _check_shares("regions", [r.share for r in self.regions])
        labels = [g.label for g in self.groups]
        for i, label in enumerate(labels):
            if labels.index(label) != i:
                raise ValueError(f"groups[{i}].name: duplicate group {label!r} (give each "
                                 f"group of one tier its own name)")
        names = [r.name for r in self.regions]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"regions[{i}].name: duplicate region {name!r}")
        level = self.groups[0].device_level
        for i, g in enumerate(self.groups):
            if g.device_level != level:
                raise ValueError(f"groups[{i}].topic: {{device}} is at level {g.device_level}, "
                                 f"groups[0] has it at level {level}: the gateway reads one "
                                 f"level (classify.device_topic_level)")

    @property
    def tenant_names(self) -> list[str]:
        if isinstance(self.tenants, int):
            width = max(3, len(str(self.tenants - 1)))
            return [f"tenant-{k:0{width}d}" for k in range(self.tenants)]
        return list(self.tenants)


def _check_shares(where: str, shares: list[float]) -> None:
    total = sum(shares)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise ValueError(f"{where}: the shares add up to {total:g}, expected 1")


class LoadSection(_Base, frozen=True):
    rate: PositiveFloat
    """Readings a second across the fleet (wall clock) when the daily and weekly factors
    are 1."""
    qos1_share: Share = 1.0
    """Share of steady readings at QoS 1 (MQTT) or confirmable (CoAP); the rest QoS 0 / NON."""
    daily: Annotated[list[Factor], Meta(min_length=24, max_length=24)] | None = None
    """Rate factor per simulated hour, 00:00 first (interpolated between hours)."""
    weekly: Annotated[list[Factor], Meta(min_length=7, max_length=7)] | None = None
    """Rate factor per simulated day, Monday first."""
    payload_bytes: Annotated[int, Meta(ge=0, le=65_536)] = 0
    """Pad each reading to about this size."""


class Burst(_Base, frozen=True):
    """A synchronisation burst: a share of the fleet drops off the network at once, comes
    back ``offline_s`` later and flushes its buffered readings at QoS 1."""

    at_s: NonNegFloat
    share: PositiveShare
    """Fraction of MQTT connections (and of CoAP devices) that drop."""
    offline_s: NonNegFloat = 1.0
    buffered: Annotated[int, Meta(ge=0, le=10_000)] = 1
    """Readings each device kept while offline, flushed on reconnect."""
    spread_s: NonNegFloat = 0.0
    """The reconnects are spread over this long (0: all at once)."""


class Spike(_Base, frozen=True):
    """One region sends ``factor`` times its usual rate for a while."""

    region: Name
    at_s: NonNegFloat
    duration_s: PositiveFloat
    factor: Annotated[float, Meta(gt=0.0, le=1000.0)]


class AnomalyInjection(_Base, frozen=True):
    """Readings with one field out of range, each from a different device of a group, at
    QoS 1 / confirmable."""

    group: Name
    field: str
    value: float
    at_s: list[NonNegFloat] = []
    per_minute: NonNegFloat = 0.0
    """Also this many a (wall-clock) minute, evenly spaced."""


class ChurnSection(_Base, frozen=True):
    per_minute: Annotated[float, Meta(ge=0.0, le=60.0)] = 0.0
    """Fraction of the MQTT connections that close and reconnect (a new session) each
    minute, spread evenly; each waits for its acknowledgements before it closes."""


class Scenario(_Base, frozen=True):
    time: TimeSection
    fleet: FleetSection
    load: LoadSection
    name: str = ""
    description: str = ""
    target: Target = Target()
    bursts: list[Burst] = []
    spikes: list[Spike] = []
    anomalies: list[AnomalyInjection] = []
    churn: ChurnSection = ChurnSection()

    def __post_init__(self) -> None:
        duration = self.time.duration_s
        for i, b in enumerate(self.bursts):
            if b.at_s >= duration:
                raise ValueError(f"bursts[{i}].at_s: {b.at_s:g} is not before the end of the "
                                 f"run (time.duration_s = {duration:g})")
        regions = {r.name for r in self.fleet.regions}
        for i, s in enumerate(self.spikes):
            if s.region not in regions:
                raise ValueError(f"spikes[{i}].region: unknown region {s.region!r} (fleet."
                                 f"regions has {sorted(regions)})")
            if s.at_s >= duration:
                raise ValueError(f"spikes[{i}].at_s: {s.at_s:g} is not before the end of the "
                                 f"run (time.duration_s = {duration:g})")
        groups = {g.label: g for g in self.fleet.groups}
        for i, a in enumerate(self.anomalies):
            if a.group not in groups:
                raise ValueError(f"anomalies[{i}].group: unknown group {a.group!r} (fleet."
                                 f"groups has {sorted(groups)})")
            for k, at in enumerate(a.at_s):
                if at >= duration:
                    raise ValueError(f"anomalies[{i}].at_s[{k}]: {at:g} is not before the end "
                                     f"of the run (time.duration_s = {duration:g})")
        if self.fleet.coap_share > 0 and not self.target.coap:
            raise ValueError("target.coap: fleet.coap_share > 0 needs a CoAP address")
        if self.fleet.coap_share < 1 and not self.target.mqtt:
            raise ValueError("target.mqtt: MQTT devices (fleet.coap_share < 1) need an MQTT "
                             "address")


# ------------------------------------------------------------------------------- loading

def parse_scenario(text: str | bytes, source: str = "<scenario>") -> Scenario:
    try:
        return msgspec.toml.decode(text, type=Scenario)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise ScenarioError(f"{source}: {format_error(err)}") from None


def load_scenario(path: str | Path) -> Scenario:
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as err:
        raise ScenarioError(f"{file}: cannot read: {err.strerror}") from None
    return parse_scenario(text, str(file))


def shrunk(scenario: Scenario, duration_s: float | None = None, scale: float | None = None,
           ) -> Scenario:
    """The scenario run in ``duration_s`` (its times, day length and per-minute rates scaled
    so that the same events and the same simulated span fit) and/or with ``scale`` times the
    devices, connections and rate."""
    replace = msgspec.structs.replace
    s = scenario
    if duration_s is not None and duration_s != s.time.duration_s:
        k = duration_s / s.time.duration_s
        s = replace(
            s,
            time=replace(s.time, duration_s=duration_s, day_s=s.time.day_s * k),
            bursts=[replace(b, at_s=b.at_s * k, offline_s=b.offline_s * k,
                            spread_s=b.spread_s * k) for b in s.bursts],
            spikes=[replace(p, at_s=p.at_s * k, duration_s=p.duration_s * k)
                    for p in s.spikes],
            anomalies=[replace(a, at_s=[t * k for t in a.at_s], per_minute=a.per_minute / k)
                       for a in s.anomalies],
            churn=replace(s.churn, per_minute=min(60.0, s.churn.per_minute / k)),
        )
    if scale is not None and scale != 1.0:
        fleet = s.fleet
        devices = max(len(fleet.groups), min(MAX_DEVICES, round(fleet.devices * scale)))
        s = replace(
            s,
            fleet=replace(fleet, devices=devices,
                          connections=max(1, min(20_000, round(fleet.connections * scale)))),
            load=replace(s.load, rate=s.load.rate * scale),
        )
    return s


# ---------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Block:
    """Devices ``start`` .. ``start + count`` of one group and home region: the first
    ``coap`` of them speak CoAP, the rest MQTT."""

    group: int
    region: int
    start: int
    count: int
    coap: int


def _split(total: int, shares: list[float]) -> list[int]:
    """``total`` cut by ``shares`` (largest remainders), every part ≥ 0, summing to total."""
    raw = [total * s for s in shares]
    parts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


class Fleet:
    """A scenario's devices: blocks, connections per group, ids, tenants, regions."""

    def __init__(self, scenario: Scenario) -> None:
        fleet = scenario.fleet
        self.scenario = scenario
        self.groups = fleet.groups
        self.regions = [r.name for r in fleet.regions]
        self.tenants = fleet.tenant_names
        self.id_prefix = fleet.id_prefix
        self.width = max(7, len(str(fleet.devices - 1)))
        self.blocks: list[Block] = []
        self.group_ranges: list[tuple[int, int]] = []
        mqtt_devices = [0] * len(self.groups)
        start = 0
        for g, group_count in enumerate(_split(fleet.devices, [g.share for g in self.groups])):
            self.group_ranges.append((start, group_count))
            for r, count in enumerate(_split(group_count, [r.share for r in fleet.regions])):
                if count:
                    coap = round(count * fleet.coap_share)
                    self.blocks.append(Block(g, r, start, count, coap))
                    mqtt_devices[g] += count - coap
                    start += count
        self.devices = start
        self.mqtt_devices = mqtt_devices
        # Connections per group, in proportion to its MQTT devices, at least one each.
        total_mqtt = sum(mqtt_devices)
        shares = [n / total_mqtt for n in mqtt_devices] if total_mqtt else mqtt_devices
        self.group_connections = [
            max(1, n) if devices else 0
            for n, devices in zip(_split(fleet.connections, [float(s) for s in shares]),
                                  mqtt_devices, strict=True)
        ] if total_mqtt else [0] * len(self.groups)
        self.coap_devices = sum(b.coap for b in self.blocks)

    @property
    def connections(self) -> int:
        return sum(self.group_connections)

    def device_id(self, index: int) -> str:
        return f"{self.id_prefix}-{index:0{self.width}d}"

    def tenant(self, index: int) -> str:
        return self.tenants[index % len(self.tenants)]

    def connection_of(self, group: int, index: int) -> int:
        """The connection (within its group) of MQTT device ``index``."""
        return (index - self.group_ranges[group][0]) % self.group_connections[group]

    def mqtt_devices_of(self, group: int, connection: int) -> Iterator[int]:
        """The MQTT devices of one of ``group``'s connections, in index order."""
        first = self.group_ranges[group][0]
        n = self.group_connections[group]
        for block in self.blocks:
            if block.group != group:
                continue
            lo = block.start + block.coap
            hi = block.start + block.count
            # the first index ≥ lo with (index - first) % n == connection
            k = lo + (connection - (lo - first)) % n
            yield from range(k, hi, n)

    def coap_devices_of(self, group: int | None = None) -> Iterator[int]:
        for block in self.blocks:
            if group is None or block.group == group:
                yield from range(block.start, block.start + block.coap)

    def write_registry(self, path: Path) -> int:
        """The fleet as a device registry CSV (device,tenant,tier,device_class,region) for
        the gateway's ``classify.registry``; returns the number of devices written."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            out.write("device,tenant,tier,device_class,region\n")
            for block in self.blocks:
                group = self.groups[block.group]
                tail = f",{group.tier},{group.device_class},{self.regions[block.region]}\n"
                out.writelines(f"{self.device_id(i)},{self.tenant(i)}{tail}"
                               for i in range(block.start, block.start + block.count))
        tmp.replace(path)
        return self.devices


def shape(scenario: Scenario, t: float) -> float:
    """The daily × weekly rate factor at ``t`` wall seconds into the run."""
    daily, weekly = scenario.load.daily, scenario.load.weekly
    if daily is None and weekly is None:
        return 1.0
    sim = (scenario.time.start_s + t * DAY_S / scenario.time.day_s) % (7 * DAY_S)
    factor = 1.0
    if daily is not None:
        hour = (sim % DAY_S) / 3600.0
        h = int(hour)
        frac = hour - h
        factor *= daily[h] * (1 - frac) + daily[(h + 1) % 24] * frac
    if weekly is not None:
        factor *= weekly[int(sim // DAY_S)]
    return factor


def sim_clock(scenario: Scenario, t: float) -> str:
    """The simulated weekday and time at ``t`` wall seconds into the run: "tue 14:05"."""
    sim = (scenario.time.start_s + t * DAY_S / scenario.time.day_s) % (7 * DAY_S)
    minutes = int(sim % DAY_S) // 60
    return f"{WEEKDAYS[int(sim // DAY_S)]} {minutes // 60:02d}:{minutes % 60:02d}"


class BlockPicker:
    """Chooses the block of the next reading: weighted by devices × the group's rate
    factor × the region's spike factor (rebuilt when a spike starts or ends)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.cumulative: list[float] = []
        self.total = 0.0
        self.set_region_factors([1.0] * len(fleet.regions))
        self.base_total = self.total

    def set_region_factors(self, factors: list[float]) -> None:
        acc = 0.0
        self.cumulative = []
        for block in self.fleet.blocks:
            acc += block.count * self.fleet.groups[block.group].rate_factor * factors[block.region]
            self.cumulative.append(acc)
        self.total = acc

    @property
    def spike_factor(self) -> float:
        """The fleet's rate now relative to its rate without spikes."""
        return self.total / self.base_total if self.base_total else 1.0

    def pick(self, u: float) -> Block:
        """The block at ``u`` ∈ [0, 1)."""
        i = bisect_right(self.cumulative, u * self.total)
        return self.fleet.blocks[min(i, len(self.fleet.blocks) - 1)]
