"""``iot-gateway bench-regions``: three gateways, one per region, sharing RabbitMQ; the same
skewed global workload placed ``local-first`` and by the naive ``global-spread`` balancer.

Theory of operation
-------------------
A :class:`Cluster` is one ``iot-gateway serve`` process per region on loopback (port 0
listeners, the bound ports read from each one's log), each with its own state directory,
write-ahead log and JSON-lines lake, all sharing the real RabbitMQ under names unique to the
run (``[regions] exchange`` / ``queue`` and the ``[fleet]`` names), deleted afterwards. The
configs differ only in ``[gateway] region`` (and, for a fault test, the RabbitMQ URL, which
may go through a proxy the test controls).

The workload (:func:`build_workload`) is a fleet of devices, each with a home region, a
tenant and a tier, all in one device registry every gateway reads. Most devices publish to
their home region's gateway; ``roam_share`` of them publish to another region's gateway for
the whole run (travelling trucks, roaming phones). One tenant (``acme-health``, homed in the
first region) is resident there: its data may be processed and stored only there, so when
one of its devices roams, every placement policy must forward its messages home. During the
middle of the run one region's devices send ``spike_factor`` times their rate (the regional
spike). Every message is QoS 1 and carries its device's sequence number, so that the lakes
say what became of each one.

Load comes from raw asyncio MQTT 3.1.1 connections (:class:`Publisher`), a few per gateway,
each device always on the same connection (so a device's order is its connection's order).
Each connection sends its messages at their scheduled times and records which ones were
acknowledged (PUBACK by packet id). When its gateway goes away, the messages in flight are
counted as never acknowledged (not resent: a resend could be a second copy the gateway cannot
recognise); the rest wait, as a device's buffer does, and go out once the gateway is back.

What a run reports (:class:`RunReport`), from the gateways' ``/metrics`` and their lakes:
cross-region bytes (the sum of ``iotgw_region_transfer_bytes_total``), local bytes,
placements by action, per-tier latency p50/p99 (``iotgw_processing_latency_seconds``
merged over the gateways) against each tier's bound, messages sent / acknowledged /
processed, and the lake audit: every record's tenant must be allowed in the region of the
gateway whose lake holds it (a residency violation otherwise), every acknowledged message
must be in some lake, and none twice.

What the spike does: local-first forwards work that may stay here only when this gateway
says it is saturated (more than ``dispatch.shed_above`` queued; ``--saturated-above``). On one
machine a gateway with the WAL on keeps up with a 10 x (3,000 msg/s) or even 30 x spike, so
the spike is processed where it arrives and local-first's cross-region bytes are the
residency-forced forwards alone; the naive balancer moves two thirds of everything.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import click
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import GatewayError
from gateway.scenario_bench import quantile
from protocols.mqtt.packets import Connect, Publish, encode

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
LISTENING = re.compile(r"MQTT on [\d.]+:(\d+), admin on http://[\d.]+:(\d+)")
START_TIMEOUT_S = 60.0
RESIDENT_TENANT = "acme-health"
TIERS: tuple[tuple[str, float], ...] = (("critical", 100.0), ("standard", 2000.0),
                                        ("bulk", 60000.0))
"""Tier name and its bound (``max_latency_ms``), most urgent first."""


# ------------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class WorkloadSpec:
    regions: tuple[str, ...] = ("eu", "us", "ap")
    devices_per_region: int = 60
    seconds: float = 20.0
    rate_per_region: float = 300.0
    """Messages/s the devices homed in one region send together (outside the spike)."""
    spike_region: str = "us"
    spike_factor: float = 10.0
    spike_window: tuple[float, float] = (0.35, 0.65)
    """The spike's start and end, as shares of ``seconds``."""
    roam_share: float = 0.1
    """Devices that publish to another region's gateway than their home's."""
    resident_share: float = 0.25
    """Devices of the first region that belong to the resident tenant."""
    resident_roam_share: float | None = None
    """Of the resident devices, the first this share roam (to the other regions in turn);
    None: like every other device, by ``roam_share`` at random."""
    capacity_per_s: float = 2000.0
    """Each region's ``capacity_per_s`` in the topology."""
    saturated_above: int = 100_000
    """``dispatch.shed_above``: a gateway with more queued than this says it is saturated
    (local-first then forwards what it may to the cheapest region with room)."""
    payload_bytes: int = 160
    connections_per_gateway: int = 4
    seed: int = 1


@dataclass(frozen=True)
class Device:
    name: str
    home: str
    publishes_to: str
    """The region whose gateway it sends to: its home, or another one when it roams."""
    tenant: str
    tier: str
    device_class: str


@dataclass(frozen=True)
class Message:
    at: float
    """Seconds after the run's start."""
    device: str
    seq: int


@dataclass
class Workload:
    spec: WorkloadSpec
    devices: dict[str, Device]
    connections: dict[str, list[list[Message]]]
    """Per gateway region, each connection's messages in the order they are sent."""

    @property
    def total(self) -> int:
        return sum(len(c) for conns in self.connections.values() for c in conns)

    def residency(self) -> list[dict[str, Any]]:
        """The ``[[regions.residency]]`` rules (first match wins)."""
        return [{"tenants": ["acme-*"], "device_classes": [], "allowed": [self.spec.regions[0]]}]

    def allowed(self, tenant: str, device_class: str) -> set[str]:
        """Where data of this tenant and class may be, by the rules (checked independently
        of the gateway's own policy code)."""
        for rule in self.residency():
            if ((not rule["tenants"] or any(fnmatchcase(tenant, g) for g in rule["tenants"]))
                    and (not rule["device_classes"]
                         or any(fnmatchcase(device_class, g) for g in rule["device_classes"]))):
                return set(rule["allowed"])
        return set(self.spec.regions)

    def registry_csv(self) -> str:
        lines = ["device,tenant,tier,device_class,region"]
        lines += [f"{d.name},{d.tenant},{d.tier},{d.device_class},{d.home}"
                  for d in self.devices.values()]
        return "\n".join(lines) + "\n"


def _tier_of(i: int) -> tuple[str, str]:
    """Tier and device class of a region's i-th device: 10 % critical (medical), 60 %
    standard, 30 % bulk."""
    k = i % 10
    if k == 0:
        return "critical", "medical"
    if k <= 6:
        return "standard", "sensor"
    return "bulk", "meter"


def build_workload(spec: WorkloadSpec) -> Workload:
    rng = random.Random(spec.seed)
    devices: dict[str, Device] = {}
    n = spec.devices_per_region
    for r, home in enumerate(spec.regions):
        for i in range(n):
            tier, device_class = _tier_of(i)
            others = [x for x in spec.regions if x != home]
            resident = r == 0 and i < round(spec.resident_share * n)
            tenant = RESIDENT_TENANT if resident else f"tenant-{home}-{i % 3}"
            to = home
            if resident and spec.resident_roam_share is not None:
                if i < round(spec.resident_roam_share * round(spec.resident_share * n)):
                    to = others[i % len(others)]
            elif rng.random() < spec.roam_share:
                to = rng.choice(others)
            name = f"{home}-dev-{i:04d}"
            devices[name] = Device(name, home, to, tenant, tier, device_class)
    # Each device sends evenly spaced messages (random phase) at its rate; the spike region's
    # devices at spike_factor times it inside the window.
    base = spec.rate_per_region / n
    s0, s1 = (w * spec.seconds for w in spec.spike_window)
    connections: dict[str, list[list[Message]]] = {
        r: [[] for _ in range(spec.connections_per_gateway)] for r in spec.regions}
    slots: dict[str, list[Message]] = {}
    for index, device in enumerate(devices.values()):
        out = connections[device.publishes_to][index % spec.connections_per_gateway]
        slots[device.name] = out
        at, seq = rng.random() / base, 0
        while at < spec.seconds:
            out.append(Message(at, device.name, seq))
            seq += 1
            rate = base * (spec.spike_factor if device.home == spec.spike_region
                           and s0 <= at < s1 else 1.0)
            at += 1.0 / rate
    for conns in connections.values():
        for conn in conns:
            conn.sort(key=lambda m: m.at)  # stable: a device's own order holds
    return Workload(spec, devices, connections)


def payload(device: str, seq: int, size: int) -> bytes:
    body = f'{{"seq":{seq},"device":"{device}","t":21.5,"pad":"'
    return (body + "x" * max(0, size - len(body) - 2) + '"}').encode()


def topic(device: Device) -> str:
    return f"{device.device_class}/{device.name}/telemetry"


# ------------------------------------------------------------------------ load generation


class Publisher:
    """One MQTT 3.1.1 connection sending its messages on schedule, QoS 1, recording each
    PUBACK. ``port_of()`` says where its gateway listens now (None: it is down)."""

    def __init__(self, name: str, messages: list[Message], workload: Workload,
                 port_of: Callable[[], int | None]) -> None:
        self.name = name
        self.messages = messages
        self.port_of = port_of
        self.times = [m.at for m in messages]
        size = workload.spec.payload_bytes
        self.frames = [encode(Publish(topic=topic(workload.devices[m.device]),
                                      payload=payload(m.device, m.seq, size), qos=1,
                                      retain=False, dup=False, packet_id=k % 65535 + 1,
                                      properties={}), 4)
                       for k, m in enumerate(messages)]
        self.acked = bytearray(len(messages))
        self.sent = 0
        self.inflight: dict[int, int] = {}
        self.lost_in_flight = 0
        self.connects = 0
        self.bytes_sent = 0

    @property
    def acked_count(self) -> int:
        return sum(self.acked)

    def acked_keys(self) -> Iterator[tuple[str, int]]:
        for k, m in enumerate(self.messages):
            if self.acked[k]:
                yield m.device, m.seq

    async def run(self, begin: float, give_up_at: float) -> None:
        total = len(self.messages)
        while self.sent < total or self.inflight:
            if time.monotonic() > give_up_at:
                break
            port = self.port_of()
            if port is None:
                await asyncio.sleep(0.05)
                continue
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                await self._session(reader, writer, begin, give_up_at)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()
                self.lost_in_flight += len(self.inflight)  # never acknowledged, never resent
                self.inflight.clear()
            if self.sent < total:
                await asyncio.sleep(0.1)
            else:
                break

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       begin: float, give_up_at: float) -> None:
        self.connects += 1
        writer.write(encode(Connect(protocol_level=4, client_id=self.name, clean_start=True,
                                    keepalive=0, username=None, password=None, will=None,
                                    properties={}), 4))
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        if connack[3] != 0:
            raise GatewayError(f"{self.name} refused: CONNACK {connack.hex()}")
        reading = asyncio.ensure_future(self._read(reader))
        try:
            total = len(self.messages)
            while self.sent < total and not reading.done():
                due = bisect.bisect_right(self.times, time.monotonic() - begin)
                if due > self.sent:
                    for k in range(self.sent, due):
                        self.inflight[k % 65535 + 1] = k
                    chunk = b"".join(self.frames[self.sent:due])
                    writer.write(chunk)
                    self.bytes_sent += len(chunk)
                    self.sent = due
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
                await asyncio.sleep(0.002)
            while self.inflight and not reading.done() and time.monotonic() < give_up_at:
                await asyncio.sleep(0.01)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError,
                                     asyncio.IncompleteReadError):
                await reading

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        while data := await reader.read(65536):
            buf += data
            pos, end = 0, len(buf)
            while pos + 2 <= end:
                length, shift, i = 0, 0, pos + 1
                while i < end:  # remaining length, a varint
                    byte = buf[i]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not byte & 0x80:
                        break
                else:
                    break
                if i + length > end:
                    break
                if buf[pos] == 0x40 and length == 2:
                    k = self.inflight.pop(int.from_bytes(buf[i:i + 2], "big"), None)
                    if k is not None:
                        self.acked[k] = 1
                pos = i + length
            buf = buf[pos:]


class Load:
    """Every connection of a workload, driven from one event loop in a thread of its own, so
    that the caller (a benchmark or a fault test) stays free to act meanwhile."""

    def __init__(self, workload: Workload, cluster: Cluster, slack_s: float = 30.0) -> None:
        self.workload = workload
        self.publishers = [
            Publisher(f"load-{region}-{c}", messages, workload, cluster.port_of(region))
            for region, conns in workload.connections.items()
            for c, messages in enumerate(conns) if messages]
        self.slack_s = slack_s
        self.began = 0.0
        self.finished = 0.0
        self._thread = threading.Thread(target=self._run, name="regions-load", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> Load:
        self.began = time.monotonic()
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def _run(self) -> None:
        async def drive() -> None:
            give_up = self.began + self.workload.spec.seconds + self.slack_s
            await asyncio.gather(*(p.run(self.began, give_up) for p in self.publishers))

        try:
            asyncio.run(drive())
        except BaseException as err:  # handed to join()
            self._error = err
        self.finished = time.monotonic()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise GatewayError("the load did not finish")
        if self._error is not None:
            raise self._error

    @property
    def sent(self) -> int:
        return sum(p.sent for p in self.publishers)

    @property
    def acked(self) -> int:
        return sum(p.acked_count for p in self.publishers)

    @property
    def lost_in_flight(self) -> int:
        return sum(p.lost_in_flight for p in self.publishers)

    def acked_keys(self) -> set[tuple[str, int]]:
        return {key for p in self.publishers for key in p.acked_keys()}


# ------------------------------------------------------------------------ the gateways


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


@dataclass
class Metrics:
    """One scrape of one gateway's ``/metrics``, the families the benchmark reads."""

    transfer: dict[tuple[str, str], float] = field(default_factory=dict)
    local_bytes: float = 0.0
    placements: dict[str, float] = field(default_factory=dict)
    up: dict[str, float] = field(default_factory=dict)
    spooled: float = 0.0
    processed: dict[str, float] = field(default_factory=dict)
    latency: dict[str, dict[float, float]] = field(default_factory=dict)
    received: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Metrics:
        m = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name, labels = s.name, s.labels
                if name == "iotgw_region_transfer_bytes_total":
                    key = (labels["src"], labels["dst"])
                    m.transfer[key] = m.transfer.get(key, 0.0) + s.value
                elif name == "iotgw_region_local_bytes_total":
                    m.local_bytes += s.value
                elif name == "iotgw_region_placements_total":
                    action = labels.get("action", "")
                    m.placements[action] = m.placements.get(action, 0.0) + s.value
                elif name == "iotgw_region_up":
                    m.up[labels["region"]] = s.value
                elif name == "iotgw_region_spooled_messages":
                    m.spooled += s.value
                elif name == "iotgw_messages_processed_total":
                    tier = labels["tier"]
                    m.processed[tier] = m.processed.get(tier, 0.0) + s.value
                elif name == "iotgw_messages_received_total":
                    m.received += s.value
                elif name == "iotgw_processing_latency_seconds_bucket":
                    buckets = m.latency.setdefault(labels["tier"], {})
                    buckets[float(labels["le"])] = s.value
        return m


@dataclass
class LakeRecord:
    region: str
    """The region of the gateway whose lake holds it."""
    device: str
    seq: int
    tenant: str
    device_class: str
    tier: str
    id: str


class RegionGateway:
    """``iot-gateway serve`` for one region: started, killed, restarted on its own state."""

    def __init__(self, region: str, root: Path, config: str) -> None:
        self.region = region
        self.root = root
        self.config_path = root / "gateway.toml"
        self.config_path.write_text(config)
        self.log_path = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mqtt_port: int | None = None
        self.admin_port: int | None = None
        self.starts = 0

    def start(self) -> None:
        self.mqtt_port = self.admin_port = None
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config",
                 str(self.config_path), "--mqtt-listen", "127.0.0.1:0",
                 "--admin-listen", "127.0.0.1:0", "--log-level", "INFO"],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log)
        self.starts += 1

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                found = LISTENING.search(log.read().decode(errors="replace"))
            if found:
                self.mqtt_port, self.admin_port = int(found[1]), int(found[2])
                return
            if self.proc.poll() is not None:
                raise GatewayError(f"the {self.region} gateway exited with "
                                   f"{self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise GatewayError(f"the {self.region} gateway did not listen in {timeout:.0f} s")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; what it acknowledged is in its write-ahead log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.mqtt_port = self.admin_port = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.mqtt_port = self.admin_port = None

    def admin(self, path: str) -> bytes:
        if self.admin_port is None:
            raise GatewayError(f"the {self.region} gateway is not running")
        return _get(f"http://127.0.0.1:{self.admin_port}{path}")

    def metrics(self) -> Metrics:
        return Metrics.parse(self.admin("/metrics").decode())

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.admin("/v1/stats")))

    def lake(self) -> list[LakeRecord]:
        """Every whole record of its lake, in the order written (files by partition, then
        part number)."""
        def order(path: Path) -> tuple[str, int]:
            number = path.stem.rpartition("-")[2]
            return str(path.parent), int(number) if number.isdigit() else -1

        out = []
        for path in sorted((self.root / "lake").rglob("*.jsonl"), key=order):
            for line in path.read_bytes().split(b"\n")[:-1]:  # whole lines only
                if not line:
                    continue
                r = json.loads(line)
                data = r.get("payload")
                seq = data.get("seq", -1) if isinstance(data, dict) else -1
                out.append(LakeRecord(self.region, r["device"], int(seq), r["tenant"],
                                      r.get("device_class", ""), r["tier"], r["id"]))
        return out


def gateway_config(region: str, root: Path, workload: Workload, *, placement: str,
                   url: str, tag: str, regions: dict[str, Any] | None = None,
                   fleet: dict[str, Any] | None = None) -> str:
    """One region's gateway: the workload's registry and residency, WAL with fsync, a JSON
    lake; every RabbitMQ name unique to ``tag``."""
    spec = workload.spec
    links = []
    costs = {0: 0.02, 1: 0.05, 2: 0.09}
    names = spec.regions
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            links.append({"between": [names[a], names[b]],
                          "cost_per_gb": costs[(a + b) % 3], "latency_ms": 40.0 * (a + b)})
    section: dict[str, Any] = {
        "placement": placement,
        "exchange": f"bench.{tag}.regions",
        "queue": f"bench.{tag}.region.{{region}}",
        "heartbeat_interval_s": 0.5,
        "down_after_missed": 3,
        "spool_retry_s": 0.5,
        **(regions or {}),
    }
    fleet_section: dict[str, Any] = {
        "url": url,
        "exchange": f"bench.{tag}.fleet",
        "node_queue": f"bench.{tag}.node.{{node}}",
        "work_queue": f"bench.{tag}.work.{{region}}.{{partition}}",
        "partitions": 1,
        "overflow_tiers": [],  # regions only: no overflow to the region's own work queue
        "heartbeat_s": 2, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5,
        "connect_timeout_s": 2.0, "confirm_timeout_s": 2.0, "close_timeout_s": 2.0,
        **(fleet or {}),
    }

    def toml_table(values: dict[str, Any]) -> str:
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None)

    def toml_array(name: str, items: Iterable[dict[str, Any]]) -> str:
        return "\n".join(f"[[{name}]]\n{toml_table(item)}" for item in items)

    tiers = "\n".join(f'[[tiers]]\nname = "{name}"\nmax_latency_ms = {bound}\n'
                      f"guaranteed_share = {share}"
                      for (name, bound), share in zip(TIERS, (0.4, 0.3, 0.1), strict=True))
    return f"""
[gateway]
node_id = "bench-{region}"
region = "{region}"
state_dir = {json.dumps(str(root / "state"))}
log_level = "INFO"
[mqtt]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[coap]
enabled = false
[auth]
allow_anonymous = true
[dispatch]
batch_size = 256
slots = 4
shed_above = {spec.saturated_above}
max_queued = 200000
resume_queued = 100000
[audit]
dir = {json.dumps(str(root / "audit"))}
[retry]
dead_letter_dir = {json.dumps(str(root / "dead-letter"))}
{tiers}
[classify]
device_id = "topic"
device_topic_level = 1
default_tier = "standard"
registry = {json.dumps(str(root.parent / "devices.csv"))}
[[pipelines]]
name = "default"
stages = [{{ type = "decode" }}, {{ type = "route", sinks = ["lake"] }}]
[sinks.lake]
type = "jsonl"
options = {{ dir = {json.dumps(str(root / "lake"))} }}
[fleet]
{toml_table(fleet_section)}
[regions]
{toml_table(section)}
{toml_array("regions.regions", ({"name": r, "capacity_per_s": spec.capacity_per_s}
                                for r in spec.regions))}
{toml_array("regions.links", links)}
{toml_array("regions.residency", workload.residency())}
"""


class Cluster:
    """One gateway per region of a workload, sharing RabbitMQ under names unique to this
    cluster; ``close()`` stops them and deletes what they declared."""

    def __init__(self, workload: Workload, placement: str, root: Path, *,
                 url: str = RABBITMQ_URL, urls: dict[str, str] | None = None,
                 regions: dict[str, Any] | None = None,
                 fleet: dict[str, Any] | None = None) -> None:
        self.workload = workload
        self.placement = placement
        self.tag = uuid.uuid4().hex[:10]
        self.root = root
        self.url = url
        root.mkdir(parents=True, exist_ok=True)
        (root / "devices.csv").write_text(workload.registry_csv())
        self.gateways: dict[str, RegionGateway] = {}
        for region in workload.spec.regions:
            gw_root = root / region
            gw_root.mkdir(exist_ok=True)
            self.gateways[region] = RegionGateway(region, gw_root, gateway_config(
                region, gw_root, workload, placement=placement,
                url=(urls or {}).get(region, url), tag=self.tag, regions=regions,
                fleet=fleet))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        for gw in self.gateways.values():
            gw.start()
        for gw in self.gateways.values():
            gw.wait_listening(timeout)
        self.wait_all_up(timeout)

    def wait_all_up(self, timeout: float = 30.0) -> float:
        """Until every gateway sees every region up; returns how long that took."""
        names = set(self.workload.spec.regions)
        return self.wait_for(lambda: all(
            self._sees_up(gw, names) for gw in self.gateways.values()), timeout,
            "every region up on every gateway")

    @staticmethod
    def _sees_up(gw: RegionGateway, names: Iterable[str], up: bool = True) -> bool:
        try:
            seen = gw.metrics().up
        except (OSError, GatewayError):
            return False
        return all((seen.get(n, 0.0) >= 1.0) == up for n in names)

    def sees(self, observer: str, region: str, up: bool) -> bool:
        return self._sees_up(self.gateways[observer], [region], up)

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
        began = time.monotonic()
        while not predicate():
            if time.monotonic() - began > timeout:
                raise GatewayError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - began

    def port_of(self, region: str) -> Callable[[], int | None]:
        gw = self.gateways[region]
        return lambda: gw.mqtt_port

    def close(self) -> None:
        for gw in self.gateways.values():
            gw.stop()
        self.delete_rabbitmq_names()

    def delete_rabbitmq_names(self) -> None:
        import aio_pika

        regions = self.workload.spec.regions
        exchange = f"bench.{self.tag}.regions"
        queues = [f"bench.{self.tag}.region.{r}" for r in regions]
        queues += [f"{exchange}.refused"]
        queues += [f"bench.{self.tag}.node.bench-{r}" for r in regions]
        queues += [f"bench.{self.tag}.work.{r}.0" for r in regions]
        exchanges = [exchange, f"{exchange}.health", f"bench.{self.tag}.fleet"]

        async def delete() -> None:
            connection = await aio_pika.connect(self.url, timeout=10)
            async with connection:
                for name in queues:
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.queue_delete(name)
                for name in exchanges:
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.exchange_delete(name)

        with contextlib.suppress(OSError, asyncio.TimeoutError):
            asyncio.run(delete())

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what happened -----------------------------------------------------------------------
    def metrics(self) -> dict[str, Metrics]:
        return {r: gw.metrics() for r, gw in self.gateways.items() if gw.admin_port}

    def lakes(self) -> list[LakeRecord]:
        return [record for gw in self.gateways.values() for record in gw.lake()]

    def settled(self) -> bool:
        """Every gateway runs with nothing queued, spooled or unretired in its write-ahead
        log (a record is retired once processed and in the lake, or forwarded and confirmed
        by RabbitMQ)."""
        for gw in self.gateways.values():
            if not gw.running:
                return False
            try:
                s = gw.stats()
                spooled = gw.metrics().spooled
            except (OSError, GatewayError):
                return False
            if s["queued"] or spooled or s.get("wal_unretired", 0):
                return False
        return True

    def wait_processed(self, keys: set[tuple[str, int]], timeout: float = 60.0) -> float:
        """Until every key is in some lake and the gateways are settled; then one more sink
        flush, so that a late duplicate would show. Returns the seconds waited."""
        began = time.monotonic()

        def done() -> bool:
            return self.settled() and keys <= {(r.device, r.seq) for r in self.lakes()}

        self.wait_for(done, timeout, "every acknowledged message in a lake")
        elapsed = time.monotonic() - began
        time.sleep(1.3)
        return elapsed


# ------------------------------------------------------------------------ the audit


@dataclass
class LakeAudit:
    records: int
    distinct: int
    duplicates: int
    """Messages (device, seq) found more than once over all lakes."""
    duplicate_ids: int
    """Of those, copies carrying the same message id (a replay, which consumers drop)."""
    missing_acked: int
    """Acknowledged messages found in no lake."""
    violations: int
    """Records in a lake of a region their tenant's data may not be in."""
    violation_examples: list[str]
    by_region: dict[str, int]


def audit_lakes(workload: Workload, records: list[LakeRecord],
                acked: set[tuple[str, int]]) -> LakeAudit:
    counts: Counter[tuple[str, int]] = Counter()
    ids: dict[tuple[str, int], set[str]] = {}
    violations, examples = 0, list[str]()
    by_region: Counter[str] = Counter()
    for r in records:
        key = (r.device, r.seq)
        counts[key] += 1
        ids.setdefault(key, set()).add(r.id)
        by_region[r.region] += 1
        if r.region not in workload.allowed(r.tenant, r.device_class):
            violations += 1
            if len(examples) < 5:
                examples.append(f"{r.device}#{r.seq} ({r.tenant}) in {r.region}")
    dups = [k for k, n in counts.items() if n > 1]
    return LakeAudit(len(records), len(counts), len(dups),
                     sum(1 for k in dups if len(ids[k]) < counts[k]),
                     len(acked - set(counts)), violations, examples, dict(by_region))


# ------------------------------------------------------------------------ one run


@dataclass
class TierLatency:
    bound_ms: float
    count: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def ok(self) -> bool:
        return self.p99_ms is None or self.p99_ms <= self.bound_ms


@dataclass
class RunReport:
    placement: str
    seconds: float
    sent: int
    acked: int
    processed: int
    cross_region_bytes: float
    local_bytes: float
    transfer: dict[str, float]
    """``src->dst``: bytes."""
    placements: dict[str, float]
    latency: dict[str, TierLatency]
    lake: LakeAudit
    per_region: dict[str, dict[str, float]]

    @property
    def latency_ok(self) -> bool:
        return all(t.ok for t in self.latency.values())


def _merge_latency(scrapes: Iterable[Metrics]) -> dict[str, TierLatency]:
    merged: dict[str, dict[float, float]] = {}
    for m in scrapes:
        for tier, buckets in m.latency.items():
            mine = merged.setdefault(tier, {})
            for le, n in buckets.items():
                mine[le] = mine.get(le, 0.0) + n
    out = {}
    for tier, bound in TIERS:
        buckets = merged.get(tier, {})
        count = int(max(buckets.values(), default=0.0))
        out[tier] = TierLatency(bound, count, quantile(buckets, 0.5), quantile(buckets, 0.99))
    return out


def summarise(cluster: Cluster, load: Load, seconds: float) -> RunReport:
    scrapes = cluster.metrics()
    transfer: dict[str, float] = {}
    for m in scrapes.values():
        for (src, dst), value in m.transfer.items():
            if not value:
                continue
            transfer[f"{src}->{dst}"] = transfer.get(f"{src}->{dst}", 0.0) + value
    placements: dict[str, float] = {}
    for m in scrapes.values():
        for action, n in m.placements.items():
            placements[action] = placements.get(action, 0.0) + n
    acked = load.acked_keys()
    lake = audit_lakes(cluster.workload, cluster.lakes(), acked)
    per_region = {r: {"received": m.received, "processed": sum(m.processed.values()),
                      "lake_records": float(lake.by_region.get(r, 0)),
                      "local_bytes": m.local_bytes,
                      "sent_bytes": sum(v for (src, _), v in m.transfer.items() if src == r)}
                  for r, m in scrapes.items()}
    return RunReport(
        placement=cluster.placement, seconds=seconds, sent=load.sent, acked=len(acked),
        processed=lake.distinct, cross_region_bytes=sum(transfer.values()),
        local_bytes=sum(m.local_bytes for m in scrapes.values()), transfer=transfer,
        placements=placements, latency=_merge_latency(scrapes.values()), lake=lake,
        per_region=per_region)


def run_once(workload: Workload, placement: str, root: Path, *,
             url: str = RABBITMQ_URL, progress: bool = True) -> RunReport:
    with Cluster(workload, placement, root, url=url) as cluster:
        if progress:
            print(f"  {placement}: gateways up ({', '.join(workload.spec.regions)}); "
                  f"{workload.total:,} messages over {workload.spec.seconds:.0f} s",
                  file=sys.stderr, flush=True)
        load = Load(workload, cluster).start()
        load.join(workload.spec.seconds + 60)
        cluster.wait_processed(load.acked_keys())
        seconds = load.finished - load.began
        report = summarise(cluster, load, seconds)
    if progress:
        print(f"  {placement}: cross-region {report.cross_region_bytes / 1e6:.2f} MB, "
              f"local {report.local_bytes / 1e6:.2f} MB", file=sys.stderr, flush=True)
    return report


# ------------------------------------------------------------------------ the benchmark


@dataclass
class BenchReport:
    workload: dict[str, Any]
    runs: dict[str, RunReport]
    reduction: float | None
    """1 - cross-region bytes of local-first / those of global-spread."""
    target: float = 0.8
    aim: float = 0.95

    @property
    def ok(self) -> bool:
        """The target met, local-first inside every tier's bound (the naive balancer is the
        peer: its latency is reported, not required), no run losing or misplacing data."""
        return (self.reduction is not None and self.reduction >= self.target
                and self.runs["local-first"].latency_ok
                and all(r.lake.violations == 0 and r.lake.missing_acked == 0
                        for r in self.runs.values()))


def run_bench(spec: WorkloadSpec, *, url: str = RABBITMQ_URL, keep: Path | None = None,
              progress: bool = True) -> BenchReport:
    workload = build_workload(spec)
    runs: dict[str, RunReport] = {}
    with tempfile.TemporaryDirectory(prefix="iotgw-bench-regions-") as tmp:
        root = keep or Path(tmp)
        for placement in ("local-first", "global-spread"):
            runs[placement] = run_once(workload, placement, root / placement, url=url,
                                       progress=progress)
    naive = runs["global-spread"].cross_region_bytes
    reduction = 1 - runs["local-first"].cross_region_bytes / naive if naive else None
    described = asdict(spec)
    described.update(devices=len(workload.devices), messages=workload.total,
                     roaming=sum(1 for d in workload.devices.values() if d.home != d.publishes_to),
                     resident_devices=sum(1 for d in workload.devices.values()
                                          if d.tenant == RESIDENT_TENANT))
    return BenchReport(described, runs, reduction)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_report(report: BenchReport) -> None:
    w = report.workload
    print(f"iot-gateway bench-regions: {len(w['regions'])} gateways ({', '.join(w['regions'])}), "
          f"one per region, sharing RabbitMQ; {w['devices']} devices ({w['roaming']} roaming, "
          f"{w['resident_devices']} of tenant {RESIDENT_TENANT} resident in "
          f"{w['regions'][0]}), {w['messages']:,} QoS 1 messages over {w['seconds']:.0f} s, "
          f"{w['spike_region']} at {w['spike_factor']:g} x during "
          f"{w['spike_window'][0]:.0%}-{w['spike_window'][1]:.0%} of the run")
    for name, r in report.runs.items():
        print(f"\n{name}: sent {r.sent:,}, acked {r.acked:,}, processed {r.processed:,} "
              f"(in {r.seconds:.1f} s)")
        print(f"  cross-region bytes {r.cross_region_bytes:,.0f}   local bytes "
              f"{r.local_bytes:,.0f}   placements "
              + ", ".join(f"{a} {n:,.0f}" for a, n in sorted(r.placements.items())))
        if r.transfer:
            print("  per link: " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                             sorted(r.transfer.items())))
        lake = r.lake
        where = ", ".join(f"{k} {v:,}" for k, v in sorted(lake.by_region.items()))
        print(f"  lakes: {lake.records:,} records ({where}); "
              f"residency violations {lake.violations}; acked but missing "
              f"{lake.missing_acked}; duplicates {lake.duplicates}")
        for example in lake.violation_examples:
            print(f"    violation: {example}")
        for tier, t in r.latency.items():
            print(f"  {tier:<9} p50 {_ms(t.p50_ms):>7} ms  p99 {_ms(t.p99_ms):>7} ms  "
                  f"bound {t.bound_ms:,.0f} ms  {'ok' if t.ok else 'OVER'}  ({t.count:,} msgs)")
    if report.reduction is None:
        print("\nreduction: n/a (the naive balancer moved no bytes: is the regions runtime on?)")
    else:
        verdict = ("met" if report.reduction >= report.target else "NOT met")
        print(f"\ncross-region bytes, local-first vs global-spread: "
              f"{report.reduction:.1%} less (target {report.target:.0%}, aim "
              f"{report.aim:.0%}): {verdict}")
    local = report.runs["local-first"]
    print(f"local-first: residency violations {local.lake.violations}, every tier inside its "
          f"bound: {'yes' if local.latency_ok else 'NO'}; overall: "
          f"{'ok' if report.ok else 'NOT ok'}")


def report_json(report: BenchReport) -> dict[str, Any]:
    data = asdict(report)
    data["ok"] = report.ok
    for name, run in report.runs.items():
        data["runs"][name]["latency_ok"] = run.latency_ok
        for tier, t in run.latency.items():
            data["runs"][name]["latency"][tier]["ok"] = t.ok
    return data


@click.command("bench-regions")
@click.option("--seconds", type=click.FloatRange(min=2), default=20.0, show_default=True,
              help="Length of each run's load.")
@click.option("--rate", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Messages/s the devices of one region send (outside the spike).")
@click.option("--devices", type=click.IntRange(min=10), default=60, show_default=True,
              help="Devices homed in each region.")
@click.option("--spike-factor", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="The spike region's rate during the spike, times its normal rate.")
@click.option("--roam-share", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Share of devices publishing to another region's gateway.")
@click.option("--capacity", type=click.FloatRange(min=0), default=2000.0, show_default=True,
              help="Each region's capacity_per_s in the topology.")
@click.option("--saturated-above", type=click.IntRange(min=1), default=100_000,
              show_default=True,
              help="dispatch.shed_above: a gateway with more queued says it is saturated.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--url", default=RABBITMQ_URL, show_default=True, help="RabbitMQ.")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the gateways' directories (configs, logs, lakes) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_regions_command(seconds: float, rate: float, devices: int, spike_factor: float,
                          roam_share: float, capacity: float, saturated_above: int,
                          seed: int, url: str,
                          keep: Path | None, as_json: bool) -> None:
    """Local-first placement against a naive global balancer: three regions, one skewed
    workload with a regional spike; cross-region bytes, residency, per-tier latency."""
    spec = WorkloadSpec(seconds=seconds, rate_per_region=rate, devices_per_region=devices,
                        spike_factor=spike_factor, roam_share=roam_share,
                        capacity_per_s=capacity, saturated_above=saturated_above,
                        seed=seed)
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise click.UsageError(f"--keep {keep}: not empty")
        keep.mkdir(parents=True, exist_ok=True)
    try:
        report = run_bench(spec, url=url, keep=keep, progress=not as_json)
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report)


