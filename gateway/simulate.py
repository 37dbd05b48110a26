"""``iot-gateway simulate SCENARIO.toml``: a synthetic fleet driving a real gateway over
real sockets (MQTT 5 and CoAP), then a summary of what was sent, acknowledged, refused and
processed, per tier.

Theory of operation
-------------------
One event loop in this process plays the whole fleet (``gateway.simulate_scenario`` lays it
out). A scheduler ticks every few milliseconds: it integrates the scenario's rate (base
rate × daily and weekly factors of the simulated clock × regional spikes) into readings due,
draws each reading's device (a block by weight, then a device in it) and queues it on the
device's MQTT connection or on the CoAP pool. Timed events run from the same tick:
synchronisation bursts, spikes, anomaly injections, churn.

MQTT connections (``MqttLink``) keep a queue of readings and send them as fast as the
gateway's receive maximum allows QoS 1 messages in flight; every PUBACK is matched to its
message (reason code ≥ 0x80: refused). A link writes once per fill. A burst aborts a share
of the links (no DISCONNECT, as a network loss would), keeps their unacknowledged messages
to resend, holds them offline, reconnects them with new sessions and flushes each device's
buffered readings at QoS 1, generated lazily so a million-device burst costs no memory up
front. Churn closes links cleanly (after their acknowledgements) and reconnects them.

CoAP devices share a pool of UDP sockets (``CoapEndpoint``), each with a window of
confirmable POSTs in flight (2.04: acknowledged, 5.03: refused, unanswered ones resent with
the same message id). A socket is replaced before its message ids wrap, so that no id is
reused within the server's deduplication lifetime.

Accounting: a message is "sent" when first written; a resend is counted apart. At the end
the load stops, every link waits for its acknowledgements, then ``/metrics`` is polled
until the gateway's backlog has drained, and the deltas of its counters and its per-tier
processing-latency histogram (first byte read → end of the pipeline) give processed, shed,
refused and end-to-end latency. ``sent at QoS 1 = acknowledged + refused + failed +
unanswered`` always holds; the command exits 1 (after its summary) when anything was left
unanswered or the gateway could not be read after the load: it went away during the run.
Ctrl-C ends the load early and still drains and summarises; a second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import resource
import signal
import struct
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import click
import msgspec

from gateway.coap_bench import encode_post
from gateway.config import format_error, split_host_port
from gateway.errors import ConfigError, GatewayError
from gateway.simulate_scenario import (
    BlockPicker,
    Fleet,
    Scenario,
    ScenarioError,
    load_scenario,
    shape,
    shrunk,
    sim_clock,
)
from protocols.mqtt.errors import ProtocolViolation
from protocols.mqtt.packets import (
    MAX_PACKET_SIZE,
    Connack,
    Connect,
    Disconnect,
    Puback,
    Publish,
    check_first_byte,
    decode_packet_body,
    encode,
    read_fixed_header,
)

MQTT_5 = 5
TICK_S = 0.005
CONNECT_TIMEOUT_S = 10.0
CONNECT_BATCH = 200
"""Connections opened at once at the start."""
FILL_BYTES = 256 * 1024
"""Most bytes one link writes per fill; the rest waits for the next tick."""
RESERVOIR = 50_000
"""Acknowledgement latencies kept per group (a uniform sample beyond that)."""
PINGREQ = b"\xc0\x00"

COAP_CON, COAP_NON, COAP_ACK, COAP_RST = 0, 1, 2, 3
COAP_SERVICE_UNAVAILABLE = 0xA3  # 5.03
COAP_RESEND_S = 2.0
COAP_ATTEMPTS = 5
COAP_SEPARATE_GIVE_UP_S = 30.0
COAP_MIDS_PER_SOCKET = 60_000
"""Requests per socket before it is replaced: below 65536, so that no message id comes back
within the server's deduplication lifetime (247 s)."""

# A queued reading: (topic or CoAP device, payload, qos, group index; the anomaly index for
# injected anomalies). A queue may also hold an iterator of them: a burst's flush.
Item = tuple[str, bytes, int, int]


class SimulationError(GatewayError):
    """The simulation cannot run (the gateway is unreachable, too few file descriptors)."""


class _ScenarioClickException(click.ClickException):
    exit_code = 2


# ----------------------------------------------------------------------------- accounting


class Reservoir:
    """A uniform sample of at most ``size`` values (Vitter's algorithm R)."""

    __slots__ = ("random", "seen", "size", "values")

    def __init__(self, size: int, rnd: random.Random) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self.random = rnd

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            j = self.random.randrange(self.seen)
            if j < self.size:
                self.values[j] = value


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


class Stats:
    """What the fleet counts, per group; index ``len(groups)`` holds injected anomalies."""

    def __init__(self, groups: int, rnd: random.Random) -> None:
        n = groups + 1
        self.anomaly = groups
        self.sent = [[0] * n, [0] * n]  # by QoS (0, 1)
        self.acked = [0] * n
        self.refused = [0] * n
        self.failed = [0] * n
        self.unanswered = [0] * n
        self.latency = [Reservoir(RESERVOIR, rnd) for _ in range(n)]
        self.sent_by_protocol = {"mqtt": 0, "coap": 0}
        self.resent = 0
        self.reconnections = 0
        self.churned = 0
        self.dropped = 0
        """Connections aborted by bursts."""
        self.lost = 0
        """Connections the gateway closed or that broke (not our doing)."""
        self.connect_failures = 0
        self.device_dropped = 0
        self.bursts = 0
        self.flushed = 0
        self.anomalies_injected = 0


# ------------------------------------------------------------------------------- MQTT

OFFLINE, CONNECTING, ONLINE, CLOSING = range(4)


class _MqttProtocol(asyncio.Protocol):
    """One TCP connection of a link; a link outlives its connections."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        link = self.link
        self.transport.write(encode(Connect(MQTT_5, link.client_id, True,
                                            link.sim.scenario.fleet.keepalive_s, link.username,
                                            None, None, {}), MQTT_5))

    def data_received(self, data: bytes) -> None:
        link = self.link
        if link.protocol is not self:
            return
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        try:
            while size - pos >= 2:
                first = buf[pos]
                check_first_byte(first, MQTT_5)
                length, start = read_fixed_header(buf, pos, MAX_PACKET_SIZE)
                if start < 0 or start + length > size:
                    break
                link.on_packet(decode_packet_body(buf, first, start, start + length, MQTT_5))
                pos = start + length
        except ProtocolViolation as err:
            link.sim.warn(f"{link.client_id}: the gateway sent a malformed packet ({err}); "
                          f"reconnecting")
            assert self.transport is not None
            self.transport.abort()
            return
        del buf[:pos]
        link.fill()

    def pause_writing(self) -> None:
        self.link.writable = False

    def resume_writing(self) -> None:
        self.link.writable = True
        self.link.sim.dirty.add(self.link)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link.protocol is self:
            self.link.on_lost()


def _same(protocol: _MqttProtocol) -> _MqttProtocol:
    return protocol


class MqttLink:
    """An MQTT 5 client carrying the readings of many devices of one group."""

    def __init__(self, sim: Simulation, group: int, number: int) -> None:
        self.sim = sim
        self.group = group
        self.number = number
        spec = sim.fleet.groups[group]
        self.client_id = f"sim-{spec.label}-{number}"
        self.username = spec.username.replace("{n}", str(number)) if spec.username else None
        self.protocol: _MqttProtocol | None = None
        self.state = OFFLINE
        self.writable = True
        self.window = 65535
        self.pid = 0
        self.pending: deque[Item | Iterator[Item]] = deque()
        self.queued = 0  # readings (not flush iterators) in ``pending``
        self.resend: deque[Item] = deque()
        self.inflight: dict[int, tuple[float, Item]] = {}
        self.last_write = 0.0
        self.connack: asyncio.Future[Connack] | None = None

    @property
    def idle(self) -> bool:
        return not (self.pending or self.resend or self.inflight)

    def enqueue(self, item: Item) -> None:
        if self.queued >= self.sim.max_pending:
            self.sim.stats.device_dropped += 1
            return
        self.pending.append(item)
        self.queued += 1
        if self.state == ONLINE:
            self.sim.dirty.add(self)

    def fill(self) -> None:
        """Write what the receive maximum and the socket allow, in one write."""
        if self.state != ONLINE or not self.writable or self.protocol is None:
            return
        transport = self.protocol.transport
        assert transport is not None
        stats = self.sim.stats
        inflight, window, resend, pending = self.inflight, self.window, self.resend, self.pending
        frames: list[bytes] = []
        size = 0
        now = time.perf_counter()
        while size < FILL_BYTES:
            if resend:
                item = resend[0]
                if item[2] and len(inflight) >= window:
                    break
                resend.popleft()
                stats.resent += 1
            elif pending:
                head = pending[0]
                if type(head) is tuple:
                    item = head
                    if item[2] and len(inflight) >= window:
                        break
                    pending.popleft()
                    self.queued -= 1
                else:  # a burst's flush: QoS 1 readings made on demand
                    if len(inflight) >= window:
                        break
                    nxt = next(cast(Iterator[Item], head), None)
                    if nxt is None:
                        pending.popleft()
                        continue
                    item = nxt
                    stats.flushed += 1
                stats.sent[item[2]][item[3]] += 1
                stats.sent_by_protocol["mqtt"] += 1
            else:
                break
            packet_id = None
            if item[2]:
                pid = self.pid
                while True:
                    pid = pid % 65535 + 1
                    if pid not in inflight:
                        break
                self.pid = packet_id = pid
                inflight[pid] = (now, item)
            frame = encode(Publish(item[0], item[1], item[2], False, False, packet_id, {}),
                           MQTT_5)
            frames.append(frame)
            size += len(frame)
        if frames:
            transport.write(b"".join(frames))
            self.last_write = now
            if size >= FILL_BYTES:
                self.sim.dirty.add(self)

    def on_packet(self, packet: object) -> None:
        if type(packet) is Puback:
            entry = self.inflight.pop(packet.packet_id, None)
            if entry is None:
                return
            sent_at, item = entry
            stats = self.sim.stats
            g = item[3]
            if packet.reason_code >= 0x80:
                stats.refused[g] += 1
            else:
                stats.acked[g] += 1
                stats.latency[g].add(time.perf_counter() - sent_at)
        elif type(packet) is Connack:
            if self.connack is not None and not self.connack.done():
                self.connack.set_result(packet)
        elif type(packet) is Disconnect:
            self.sim.note(f"gateway disconnected {self.client_id}: reason 0x"
                          f"{packet.reason_code:02x}")

    def _requeue_inflight(self) -> None:
        if self.inflight:
            self.resend.extendleft(item for _, item in reversed(list(self.inflight.values())))
            self.inflight.clear()

    def on_lost(self) -> None:
        """The connection broke without our asking: resend its unacknowledged messages over
        a new one."""
        self.protocol = None
        self._requeue_inflight()
        was = self.state
        self.state = OFFLINE
        if was == ONLINE:
            self.sim.stats.lost += 1
            self.sim.spawn(self.reconnect(delay=0.2))

    def abort(self) -> None:
        """Drop off the network at once (a burst): no DISCONNECT, acks in flight lost."""
        protocol, self.protocol = self.protocol, None
        self.state = OFFLINE
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        self._requeue_inflight()

    async def connect(self, first: bool = False) -> None:
        """Open a connection with a new session; retried with backoff unless ``first``."""
        sim = self.sim
        loop = asyncio.get_running_loop()
        delay = 0.2
        self.state = CONNECTING
        while True:
            protocol = _MqttProtocol(self)
            self.protocol = protocol
            self.connack = loop.create_future()
            try:
                opening = loop.create_connection(functools.partial(_same, protocol), *sim.mqtt)
                await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
                connack = await asyncio.wait_for(self.connack, CONNECT_TIMEOUT_S)
                if connack.reason_code >= 0x80:
                    raise SimulationError(f"CONNACK refused {self.client_id}: reason 0x"
                                          f"{connack.reason_code:02x}")
                self.window = min(65535, int(connack.properties.get("receive_maximum", 65535)))
                self.writable = True
                self.state = ONLINE
                sim.dirty.add(self)
                return
            except (OSError, TimeoutError, SimulationError) as err:
                self.protocol = None
                if protocol.transport is not None:
                    protocol.transport.abort()
                if first:
                    host, port = sim.mqtt
                    reason = err.strerror if isinstance(err, OSError) and err.strerror else (
                        str(err) or "timed out")
                    raise SimulationError(f"cannot connect to the gateway's MQTT listener at "
                                          f"{host}:{port}: {reason}") from None
                sim.stats.connect_failures += 1
                if sim.finished:
                    self.state = OFFLINE
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def reconnect(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.state != OFFLINE:
            return
        await self.connect()
        if self.state == ONLINE:
            self.sim.stats.reconnections += 1

    async def close(self, wait_s: float = 10.0) -> None:
        """Stop sending, wait for the acknowledgements in flight, DISCONNECT, close."""
        if self.state != ONLINE:
            return
        self.state = CLOSING
        deadline = time.monotonic() + wait_s
        while self.inflight and self.protocol is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        protocol, self.protocol = self.protocol, None
        self.state = OFFLINE
        if protocol is not None and protocol.transport is not None:
            protocol.transport.write(encode(Disconnect(0, {}), MQTT_5))
            protocol.transport.close()
        self._requeue_inflight()

    async def churn(self) -> None:
        await self.close()
        if self.state == OFFLINE and not self.sim.finished:
            await self.connect()
            if self.state == ONLINE:
                self.sim.stats.churned += 1
                self.sim.stats.reconnections += 1

    def ping(self, now: float) -> None:
        keepalive = self.sim.scenario.fleet.keepalive_s
        if (keepalive and self.state == ONLINE and self.protocol is not None
                and self.protocol.transport is not None
                and now - self.last_write > keepalive / 2):
            self.protocol.transport.write(PINGREQ)
            self.last_write = now


# ------------------------------------------------------------------------------- CoAP


class CoapEndpoint(asyncio.DatagramProtocol):
    """One UDP socket: a window of confirmable requests in flight, matched by token."""

    def __init__(self, pool: CoapPool) -> None:
        self.pool = pool
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = random.randrange(0x10000)
        self.requests = 0
        # token → [first send, last send, datagram, separate response awaited, item, attempts]
        self.outstanding: dict[bytes, list[Any]] = {}
        self.retired = False
        self.pong: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self, item: Item, now: float) -> None:
        self.requests += 1
        self.mid = (self.mid + 1) & 0xFFFF
        token = struct.pack("!I", self.requests)
        kind = COAP_CON if item[2] else COAP_NON
        datagram = encode_post(self.mid, token, (*self.pool.path, item[0]), item[1],
                               kind=kind)
        if kind == COAP_CON:
            self.outstanding[token] = [now, now, datagram, False, item, 1]
        assert self.transport is not None
        self.transport.sendto(datagram)
        if self.requests >= COAP_MIDS_PER_SOCKET:
            self.retired = True

    def ping(self) -> asyncio.Future[None]:
        """An empty CON: any CoAP server answers it with RST."""
        self.pong = asyncio.get_running_loop().create_future()
        self.mid = (self.mid + 1) & 0xFFFF
        assert self.transport is not None
        self.transport.sendto(struct.pack("!BBH", 0x40 | (COAP_CON << 4), 0, self.mid))
        return self.pong

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4:
            return
        first, code, mid = struct.unpack_from("!BBH", data)
        kind, token = (first >> 4) & 3, data[4:4 + (first & 0x0F)]
        if self.pong is not None and not self.pong.done() and kind == COAP_RST:
            self.pong.set_result(None)
            return
        assert self.transport is not None
        if kind == COAP_CON:  # a separate response: acknowledge it
            self.transport.sendto(struct.pack("!BBH", 0x40 | (COAP_ACK << 4), 0, mid))
        entry = self.outstanding.get(token)
        if entry is None:
            return  # a duplicate answer, or one given up on
        if kind == COAP_ACK and code == 0:  # empty ACK: the answer comes separately
            entry[3] = True
            return
        del self.outstanding[token]
        item: Item = entry[4]
        stats = self.pool.sim.stats
        g = item[3]
        if kind == COAP_RST:
            stats.failed[g] += 1
        elif 0x40 <= code < 0x60:  # 2.xx
            stats.acked[g] += 1
            stats.latency[g].add(time.perf_counter() - entry[0])
        elif code == COAP_SERVICE_UNAVAILABLE:
            stats.refused[g] += 1
        else:
            stats.failed[g] += 1
            self.pool.sim.note(f"CoAP {code >> 5}.{code & 0x1F:02d} for {item[0]}")
        self.pool.sim.coap_dirty = True

    def resend_overdue(self, now: float) -> None:
        assert self.transport is not None
        stats = self.pool.sim.stats
        for token, entry in list(self.outstanding.items()):
            if entry[3]:
                if now - entry[0] > COAP_SEPARATE_GIVE_UP_S:
                    del self.outstanding[token]
                    stats.unanswered[entry[4][3]] += 1
            elif now - entry[1] > COAP_RESEND_S:
                if entry[5] >= COAP_ATTEMPTS:
                    del self.outstanding[token]
                    stats.unanswered[entry[4][3]] += 1
                    continue
                entry[1] = now
                entry[5] += 1
                stats.resent += 1
                self.transport.sendto(entry[2])

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like
        if self.pong is not None and not self.pong.done():
            self.pong.set_exception(exc)
            return
        self.pool.sim.note(f"CoAP socket: {exc}")


class CoapPool:
    """The CoAP devices' sockets and their shared queue of readings."""

    def __init__(self, sim: Simulation, address: tuple[str, int], sockets: int, window: int,
                 path: tuple[str, ...]) -> None:
        self.sim = sim
        self.address = address
        self.size = sockets
        self.window = window
        self.path = path
        self.endpoints: list[CoapEndpoint] = []
        self.retired: list[CoapEndpoint] = []
        self.pending: deque[Item | Iterator[Item]] = deque()
        self.queued = 0

    async def _open(self) -> CoapEndpoint:
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: CoapEndpoint(self), remote_addr=self.address)
        return endpoint

    async def start(self) -> None:
        host, port = self.address
        try:
            probe = await self._open()
        except OSError as err:
            raise SimulationError(f"cannot reach the gateway's CoAP listener at {host}:{port} "
                                  f"(udp): {err.strerror or err}") from None
        for attempt in range(3):
            try:
                await asyncio.wait_for(probe.ping(), 1.0 + attempt)
                break
            except TimeoutError:
                continue
            except OSError as err:  # ICMP: nobody listens there
                assert probe.transport is not None
                probe.transport.close()
                raise SimulationError(f"cannot reach the gateway's CoAP listener at "
                                      f"{host}:{port} (udp): {err.strerror or err}") from None
        else:
            assert probe.transport is not None
            probe.transport.close()
            raise SimulationError(f"no answer from the gateway's CoAP listener at "
                                  f"{host}:{port} (udp): a CoAP ping went unanswered")
        self.endpoints = [probe, *[await self._open() for _ in range(self.size - 1)]]

    @property
    def outstanding(self) -> int:
        return sum(len(e.outstanding) for e in (*self.endpoints, *self.retired))

    @property
    def idle(self) -> bool:
        return not self.pending and not self.outstanding

    def enqueue(self, item: Item | Iterator[Item]) -> None:
        if type(item) is tuple:
            if self.queued >= self.sim.max_pending * self.size:
                self.sim.stats.device_dropped += 1
                return
            self.queued += 1
        self.pending.append(item)
        self.sim.coap_dirty = True

    def fill(self) -> None:
        now = time.perf_counter()
        stats = self.sim.stats
        pending = self.pending
        window = self.window
        for endpoint in self.endpoints:
            if endpoint.retired:
                continue
            outstanding = endpoint.outstanding
            while pending and len(outstanding) < window and not endpoint.retired:
                head = pending[0]
                if type(head) is tuple:
                    item = head
                    pending.popleft()
                    self.queued -= 1
                else:
                    nxt = next(cast(Iterator[Item], head), None)
                    if nxt is None:
                        pending.popleft()
                        continue
                    item = nxt
                    stats.flushed += 1
                endpoint.send(item, now)
                stats.sent[item[2]][item[3]] += 1
                stats.sent_by_protocol["coap"] += 1
        self._replace_retired()

    def _replace_retired(self) -> None:
        for endpoint in [e for e in self.endpoints if e.retired]:
            self.endpoints.remove(endpoint)
            self.retired.append(endpoint)
            self.sim.spawn(self._replacement())

    async def _replacement(self) -> None:
        self.endpoints.append(await self._open())
        self.sim.coap_dirty = True

    def tick(self, now: float) -> None:
        for endpoint in (*self.endpoints, *self.retired):
            endpoint.resend_overdue(now)
        for endpoint in [e for e in self.retired if not e.outstanding]:
            self.retired.remove(endpoint)
            if endpoint.transport is not None:
                endpoint.transport.close()

    def close(self) -> None:
        for endpoint in (*self.endpoints, *self.retired):
            if endpoint.transport is not None:
                endpoint.transport.close()


# ------------------------------------------------------------------------ gateway metrics


@dataclass
class GatewaySnapshot:
    """The figures of the gateway's /metrics this simulation reads."""

    received: dict[str, float] = field(default_factory=dict)  # protocol →
    processed: dict[str, float] = field(default_factory=dict)  # tier (or anomaly lane) →
    shed: dict[str, float] = field(default_factory=dict)  # tier →
    refused: dict[str, float] = field(default_factory=dict)  # protocol →
    """MQTT refusals (PUBACK ≥ 0x80), and CoAP 5.03 answers (counted as protocol errors)."""
    anomalies: dict[str, float] = field(default_factory=dict)  # severity →
    dead_letters: float = 0.0
    queued: float = 0.0
    pending: float = 0.0
    latency: dict[str, dict[float, float]] = field(default_factory=dict)  # tier → le → n
    latency_sum: dict[str, float] = field(default_factory=dict)


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


def read_metrics(admin: str) -> GatewaySnapshot:
    from prometheus_client.parser import text_string_to_metric_families

    url = admin.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as err:
        raise SimulationError(f"the gateway's admin API at {admin} answered /metrics with "
                              f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise SimulationError(f"cannot reach the gateway's admin API at {admin}: {reason}"
                              ) from None
    snap = GatewaySnapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "iotgw_messages_received_total":
                _add(snap.received, labels["protocol"], value)
            elif name == "iotgw_messages_processed_total":
                _add(snap.processed, labels["tier"], value)
            elif name == "iotgw_messages_shed_total":
                _add(snap.shed, labels["tier"], value)
            elif name == "iotgw_messages_refused_total":
                _add(snap.refused, labels["protocol"], value)
            elif name == "iotgw_anomalies_total":
                _add(snap.anomalies, labels["severity"], value)
            elif name == "iotgw_dead_letters_total":
                snap.dead_letters += value
            elif name == "iotgw_queue_depth":
                snap.queued += value
            elif name == "iotgw_workers_pending_messages":
                snap.pending += value
            elif name == "iotgw_processing_latency_seconds_bucket":
                snap.latency.setdefault(labels["tier"], {})[float(labels["le"])] = value
            elif name == "iotgw_processing_latency_seconds_sum":
                snap.latency_sum[labels["tier"]] = value
    return snap


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in sorted(after.items())
            if round(v - before.get(k, 0.0))}


def _latency_delta(before: GatewaySnapshot, after: GatewaySnapshot
                   ) -> dict[str, dict[str, float]]:
    """Per tier: p50, p99 (bucket upper bounds) and mean in ms, and the count, of what was
    processed between the two snapshots."""
    out: dict[str, dict[str, float]] = {}
    for tier, buckets in sorted(after.latency.items()):
        prior = before.latency.get(tier, {})
        cumulative = sorted((le, n - prior.get(le, 0.0)) for le, n in buckets.items())
        total = cumulative[-1][1] if cumulative else 0.0
        if total <= 0:
            continue
        figures: dict[str, float] = {"count": round(total)}
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            le = next(le for le, n in cumulative if n >= q * total)
            figures[f"{name}_ms"] = le * 1000 if le != math.inf else math.inf
        spent = after.latency_sum.get(tier, 0.0) - before.latency_sum.get(tier, 0.0)
        figures["mean_ms"] = round(spent / total * 1000, 3)
        out[tier] = figures
    return out


# ----------------------------------------------------------------------------- the fleet


@dataclass
class SimulateArgs:
    scenario: Path
    mqtt: str | None = None
    coap: str | None = None
    admin: str | None = None
    duration_s: float | None = None
    scale: float | None = None
    drain_timeout_s: float = 60.0
    write_registry: Path | None = None
    as_json: bool = False
    progress: bool | None = None
    """Show the status line: default when stderr is a terminal."""


class Simulation:
    """The fleet, its clock and its events, driving one gateway."""

    def __init__(self, scenario: Scenario, fleet: Fleet, args: SimulateArgs) -> None:
        self.scenario = scenario
        self.fleet = fleet
        self.args = args
        self.random = random.Random(scenario.fleet.seed)
        self.stats = Stats(len(fleet.groups), self.random)
        self.max_pending = scenario.fleet.max_pending
        target = scenario.target
        self.mqtt = split_host_port(target.mqtt, "127.0.0.1") if target.mqtt else ("", 0)
        self.admin = target.admin or None
        self.links: list[list[MqttLink]] = [
            [MqttLink(self, g, n) for n in range(count)]
            for g, count in enumerate(fleet.group_connections)
        ]
        self.all_links = [link for links in self.links for link in links]
        self.coap: CoapPool | None = None
        if fleet.coap_devices and target.coap:
            self.coap = CoapPool(self, split_host_port(target.coap, "127.0.0.1"),
                                 scenario.fleet.coap_sockets, scenario.fleet.coap_window,
                                 ("t",))
        self.dirty: set[MqttLink] = set()
        self.coap_dirty = False
        self.picker = BlockPicker(fleet)
        self.tasks: set[asyncio.Task[None]] = set()
        self.finished = False
        self.gateway_unreadable = False
        self.unsent = 0
        self.stop_requested = False
        self.notes: dict[str, int] = {}
        self.warnings: list[str] = []
        self.seq = 0
        self.progress = args.progress if args.progress is not None else sys.stderr.isatty()
        self.started = 0.0
        self.phase = "connecting"
        self._status_len = 0
        self._rate_window: deque[tuple[float, int]] = deque()
        self._payloads = [self._payload_maker(g) for g in range(len(fleet.groups))]
        self._topics = [tuple(g.topic.split("{device}", 1)) for g in fleet.groups]
        self._anomaly_cursor: dict[int, int] = {}

    # -- small helpers -----------------------------------------------------------------
    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def note(self, text: str) -> None:
        """Something worth a count in the summary (not a line per occurrence)."""
        key = text.split(":", 1)[0] if text.startswith("gateway disconnected") else text
        self.notes[key] = self.notes.get(key, 0) + 1

    def warn(self, text: str) -> None:
        if len(self.warnings) < 20:
            self.warnings.append(text)

    def _payload_maker(self, g: int) -> Callable[[int], bytes]:
        spec = self.fleet.groups[g]
        names = list(spec.fields)
        ranges = [spec.fields[n] for n in names]
        head = "{\"seq\":%d," + ",".join(f"{json.dumps(n)}:%.2f" for n in names)
        base = len(head) + 8 * len(names)
        pad = self.scenario.load.payload_bytes - base - 10
        template = (head + (f",\"pad\":\"{'x' * pad}\"" if pad > 0 else "") + "}")
        rnd = self.random.random

        def make(seq: int) -> bytes:
            return (template % (seq, *[lo + (hi - lo) * rnd() for lo, hi in ranges])).encode()

        return make

    def _device_topic(self, g: int, device: int) -> str:
        before, after = self._topics[g]
        return before + self.fleet.device_id(device) + after

    # -- readings ------------------------------------------------------------------------
    def generate(self, n: int) -> None:
        """Queue ``n`` steady readings, devices drawn by the current weights."""
        rnd = self.random.random
        fleet = self.fleet
        pick = self.picker.pick
        qos1 = [g.qos1_share if g.qos1_share is not None else self.scenario.load.qos1_share
                for g in fleet.groups]
        payloads = self._payloads
        for _ in range(n):
            block = pick(rnd())
            device = block.start + int(rnd() * block.count)
            g = block.group
            qos = 1 if rnd() < qos1[g] else 0
            self.seq += 1
            payload = payloads[g](self.seq)
            if device < block.start + block.coap:
                if self.coap is not None:
                    self.coap.enqueue((fleet.device_id(device), payload, qos, g))
            else:
                link = self.links[g][fleet.connection_of(g, device)]
                link.enqueue((self._device_topic(g, device), payload, qos, g))

    def _flush_readings(self, g: int, devices: Iterator[int], buffered: int, coap: bool
                        ) -> Iterator[Item]:
        make = self._payloads[g]
        for device in devices:
            key = self.fleet.device_id(device) if coap else self._device_topic(g, device)
            for _ in range(buffered):
                self.seq += 1
                yield (key, make(self.seq), 1, g)

    def inject_anomaly(self, index: int) -> None:
        spec = self.scenario.anomalies[index]
        g = next(i for i, grp in enumerate(self.fleet.groups) if grp.label == spec.group)
        start, count = self.fleet.group_ranges[g]
        # A different device each time (a repeat within the detector's suppression window
        # would not be raised again).
        cursor = self._anomaly_cursor.get(g, self.random.randrange(count))
        self._anomaly_cursor[g] = cursor + 1
        device = start + cursor % count
        group = self.fleet.groups[g]
        reading: dict[str, Any] = {"seq": self.seq,
                                   **{f: round(lo + (hi - lo) * self.random.random(), 2)
                                      for f, (lo, hi) in group.fields.items()}}
        reading[spec.field] = spec.value
        payload = msgspec.json.encode(reading)
        self.seq += 1
        self.stats.anomalies_injected += 1
        a = self.stats.anomaly
        block = next(b for b in self.fleet.blocks if b.start <= device < b.start + b.count)
        if device < block.start + block.coap:
            if self.coap is not None:
                self.coap.enqueue((self.fleet.device_id(device), payload, 1, a))
        else:
            link = self.links[g][self.fleet.connection_of(g, device)]
            link.pending.appendleft((self._device_topic(g, device), payload, 1, a))
            link.queued += 1
            if link.state == ONLINE:
                self.dirty.add(link)

    # -- events --------------------------------------------------------------------------
    def _timeline(self) -> list[tuple[float, int, Callable[[], None]]]:
        events: list[tuple[float, int, Callable[[], None]]] = []
        seq = 0

        def at(t: float, action: Callable[[], None]) -> None:
            nonlocal seq
            seq += 1
            events.append((t, seq, action))

        duration = self.scenario.time.duration_s
        for i, burst in enumerate(self.scenario.bursts):
            at(burst.at_s, functools.partial(self.burst, i))
        factors = [1.0] * len(self.fleet.regions)

        def set_factor(region: int, factor: float) -> None:
            factors[region] *= factor
            self.picker.set_region_factors(factors)

        for spike in self.scenario.spikes:
            r = self.fleet.regions.index(spike.region)
            at(spike.at_s, functools.partial(set_factor, r, spike.factor))
            if spike.at_s + spike.duration_s < duration:
                end = spike.at_s + spike.duration_s
                at(end, functools.partial(set_factor, r, 1 / spike.factor))
        for i, anomaly in enumerate(self.scenario.anomalies):
            for t in anomaly.at_s:
                at(t, functools.partial(self.inject_anomaly, i))
            if anomaly.per_minute > 0:
                interval = 60.0 / anomaly.per_minute
                t = interval / 2
                while t < duration:
                    at(t, functools.partial(self.inject_anomaly, i))
                    t += interval
        events.sort(key=lambda e: (e[0], e[1]))
        return events

    def burst(self, index: int) -> None:
        spec = self.scenario.bursts[index]
        self.stats.bursts += 1
        online = [link for link in self.all_links if link.state == ONLINE]
        dropped = self.random.sample(online, round(len(online) * spec.share))
        loop = asyncio.get_running_loop()
        for link in dropped:
            link.abort()
            self.stats.dropped += 1
            if spec.buffered:
                devices = self.fleet.mqtt_devices_of(link.group, link.number)
                link.pending.appendleft(self._flush_readings(link.group, devices,
                                                             spec.buffered, coap=False))
            delay = spec.offline_s + self.random.random() * spec.spread_s
            loop.call_later(delay, self._back_online, link)
        if self.coap is not None and spec.buffered:
            for g in range(len(self.fleet.groups)):
                chosen = [d for d in self.fleet.coap_devices_of(g)
                          if self.random.random() < spec.share]
                if chosen:
                    flush = self._flush_readings(g, iter(chosen), spec.buffered, coap=True)
                    loop.call_later(spec.offline_s, self.coap.enqueue, flush)

    def _back_online(self, link: MqttLink) -> None:
        if not self.finished:
            self.spawn(link.reconnect())

    def _churn(self, dt: float, carry: float) -> float:
        per_s = self.scenario.churn.per_minute / 60.0
        if not per_s or not self.all_links:
            return 0.0
        carry += per_s * len(self.all_links) * dt
        while carry >= 1.0:
            carry -= 1.0
            link = self.all_links[self.random.randrange(len(self.all_links))]
            if link.state == ONLINE:
                self.spawn(link.churn())
        return carry

    # -- the run -------------------------------------------------------------------------
    def flush(self) -> None:
        dirty, self.dirty = self.dirty, set()
        for link in dirty:
            link.fill()
        if self.coap is not None and self.coap_dirty:
            self.coap_dirty = False
            self.coap.fill()

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        before = read_metrics(self.admin) if self.admin else None
        await self._connect_all()
        if self.coap is not None:
            await self.coap.start()
        self.started = time.perf_counter()
        self.phase = "load"
        await self._load()
        self.phase = "waiting for acknowledgements"
        await self._settle()
        self.finished = True
        self.phase = "closing"
        await asyncio.gather(*(link.close(wait_s=1.0) for link in self.all_links))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for link in self.all_links:  # still connecting when the time ran out
            link.abort()
        # what never got an answer (timeouts, a gateway gone) counts as unanswered
        for link in self.all_links:
            for item in (*link.resend, *[i for _, i in link.inflight.values()]):
                self.stats.unanswered[item[3]] += 1
        if self.coap is not None:
            for endpoint in (*self.coap.endpoints, *self.coap.retired):
                for entry in endpoint.outstanding.values():
                    self.stats.unanswered[entry[4][3]] += 1
            self.coap.close()
        self.unsent = sum(link.queued for link in self.all_links) + (
            self.coap.queued if self.coap is not None else 0)
        loaded_s = time.perf_counter() - self.started
        after, drained = None, None
        if self.admin and before is not None:
            self.phase = "waiting for the gateway to drain"
            try:
                after, drained = await self._drain(before)
            except SimulationError as err:
                self.gateway_unreadable = True
                self.warn(f"after the load: {err}")
        self._clear_status()
        return self.summary(before, after, drained, loaded_s)

    def _interrupt(self) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        self.warn("interrupted: the load stopped early")

    async def _connect_all(self) -> None:
        if not self.all_links:
            return
        await self.all_links[0].connect(first=True)
        for k in range(1, len(self.all_links), CONNECT_BATCH):
            batch = self.all_links[k:k + CONNECT_BATCH]
            await asyncio.gather(*(link.connect() for link in batch))
            self._status(0.0)

    async def _load(self) -> None:
        duration = self.scenario.time.duration_s
        rate = self.scenario.load.rate
        events = self._timeline()
        next_event = 0
        owed = 0.0
        churn_carry = 0.0
        last = 0.0
        last_ping = last_status = 0.0
        while not self.stop_requested:
            now = time.perf_counter()
            t = min(now - self.started, duration)
            dt = t - last
            last = t
            while next_event < len(events) and events[next_event][0] <= t:
                events[next_event][2]()
                next_event += 1
            owed += rate * shape(self.scenario, t) * self.picker.spike_factor * dt
            n = int(owed)
            owed -= n
            if n:
                self.generate(n)
            churn_carry = self._churn(dt, churn_carry)
            self.flush()
            if now - last_ping >= 1.0:
                last_ping = now
                self._keep_alive(now)
            if now - last_status >= 0.25:
                last_status = now
                self._status(t)
            if t >= duration:
                break
            await asyncio.sleep(TICK_S)

    def _keep_alive(self, now: float) -> None:
        """Keepalive pings on idle connections; CoAP resends and give-ups."""
        for link in self.all_links:
            link.ping(now)
        if self.coap is not None:
            self.coap.tick(now)

    async def _settle(self) -> None:
        """Until everything queued is sent and answered (or the drain timeout passes)."""
        deadline = time.perf_counter() + self.args.drain_timeout_s
        last_ping = last_status = 0.0
        while time.perf_counter() < deadline:
            links_idle = all(link.idle and link.state in (ONLINE, OFFLINE)
                             for link in self.all_links)
            reconnecting = any(link.state != ONLINE for link in self.all_links)
            coap_idle = self.coap is None or self.coap.idle
            if links_idle and coap_idle and not reconnecting:
                return
            now = time.perf_counter()
            if self.coap is not None:
                self.coap_dirty = True
            self.dirty.update(link for link in self.all_links if not link.idle)
            self.flush()
            if now - last_ping >= 0.5:
                last_ping = now
                self._keep_alive(now)
            if now - last_status >= 0.25:
                last_status = now
                self._status(now - self.started)
            await asyncio.sleep(TICK_S)
        self.warn(f"not everything was answered within --drain-timeout "
                  f"({self.args.drain_timeout_s:g} s)")

    async def _drain(self, before: GatewaySnapshot) -> tuple[GatewaySnapshot, bool]:
        """Poll /metrics until what the gateway received is processed, shed or
        dead-lettered and nothing is queued."""
        assert self.admin is not None
        deadline = time.perf_counter() + self.args.drain_timeout_s
        while True:
            after = await asyncio.to_thread(read_metrics, self.admin)
            received = sum(after.received.values()) - sum(before.received.values())
            done = (sum(after.processed.values()) - sum(before.processed.values())
                    + sum(after.shed.values()) - sum(before.shed.values())
                    + after.dead_letters - before.dead_letters)
            if not after.queued and not after.pending and done >= received:
                return after, True
            if time.perf_counter() > deadline:
                self.warn(f"the gateway had not drained its backlog within --drain-timeout "
                          f"({self.args.drain_timeout_s:g} s): {received - done:.0f} messages "
                          f"not processed yet")
                return after, False
            self._status(time.perf_counter() - self.started)
            await asyncio.sleep(0.2)

    # -- output --------------------------------------------------------------------------
    def _status(self, t: float) -> None:
        if not self.progress:
            return
        s = self.stats
        duration = self.scenario.time.duration_s
        width = 20
        done = min(width, int(width * t / duration)) if duration else width
        bar = "#" * done + "-" * (width - done)
        sent = sum(s.sent[0]) + sum(s.sent[1])
        online = sum(1 for link in self.all_links if link.state == ONLINE)
        window = self._rate_window  # the rate over the last second or so
        window.append((t, sent))
        while len(window) > 2 and t - window[1][0] >= 1.0:
            window.popleft()
        t0, sent0 = window[0]
        rate = (sent - sent0) / (t - t0) if t > t0 else 0.0
        line = (f"[{bar}] {t:5.1f}/{duration:g}s  {sim_clock(self.scenario, min(t, duration))}"
                f"  sent {sent:,}  acked {sum(s.acked):,}  refused {sum(s.refused):,}"
                f"  {rate:,.0f}/s  online {online}/{len(self.all_links)}  {self.phase}")
        pad = max(0, self._status_len - len(line))
        sys.stderr.write("\r" + line + " " * pad)
        sys.stderr.flush()
        self._status_len = len(line)

    def _clear_status(self) -> None:
        if self.progress and self._status_len:
            sys.stderr.write("\r" + " " * self._status_len + "\r")
            sys.stderr.flush()

    def summary(self, before: GatewaySnapshot | None, after: GatewaySnapshot | None,
                drained: bool | None, loaded_s: float) -> dict[str, Any]:
        s = self.stats
        fleet = self.fleet
        a = s.anomaly
        tiers: dict[str, dict[str, Any]] = {}
        samples: dict[str, list[float]] = {}
        for g, group in enumerate(fleet.groups):
            row = tiers.setdefault(group.tier, {"sent": 0, "sent_qos1": 0, "acked": 0,
                                                "refused": 0, "failed": 0, "unanswered": 0})
            row["sent"] += s.sent[0][g] + s.sent[1][g]
            row["sent_qos1"] += s.sent[1][g]
            row["acked"] += s.acked[g]
            row["refused"] += s.refused[g]
            row["failed"] += s.failed[g]
            row["unanswered"] += s.unanswered[g]
            samples.setdefault(group.tier, []).extend(s.latency[g].values)
        for tier, values in samples.items():
            values.sort()
            tiers[tier]["ack_ms"] = ({"p50": round(_quantile(values, 0.5) * 1000, 3),
                                      "p99": round(_quantile(values, 0.99) * 1000, 3)}
                                     if values else None)
        gateway: dict[str, Any] | None = None
        if before is not None and after is not None:
            processed = _delta(after.processed, before.processed)
            shed = _delta(after.shed, before.shed)
            latency = _latency_delta(before, after)
            for tier in sorted({*processed, *latency} - set(tiers)):
                tiers[tier] = {}
            for tier, row in tiers.items():
                row["processed"] = processed.get(tier, 0)
                row["shed"] = shed.get(tier, 0)
                row["latency_ms"] = latency.get(tier)
            gateway = {
                "received": _delta(after.received, before.received),
                "processed": sum(processed.values()),
                "shed": sum(shed.values()),
                "refused": sum(_delta(after.refused, before.refused).values()),
                "dead_letters": round(after.dead_letters - before.dead_letters),
                "anomalies": _delta(after.anomalies, before.anomalies),
                "drained": drained,
            }
        scenario = self.scenario
        end = min(loaded_s, scenario.time.duration_s)
        return {
            "scenario": scenario.name or self.args.scenario.stem,
            "ok": not sum(s.unanswered) and not self.gateway_unreadable,
            "duration_s": round(loaded_s, 3),
            "simulated": {"from": sim_clock(scenario, 0.0), "to": sim_clock(scenario, end),
                          "days": round(end / scenario.time.day_s, 3)},
            "fleet": {"devices": fleet.devices, "mqtt_devices": sum(fleet.mqtt_devices),
                      "coap_devices": fleet.coap_devices, "connections": fleet.connections,
                      "coap_sockets": self.coap.size if self.coap is not None else 0,
                      "tenants": len(fleet.tenants), "regions": fleet.regions},
            "sent": sum(s.sent[0]) + sum(s.sent[1]),
            "sent_qos0": sum(s.sent[0]),
            "sent_qos1": sum(s.sent[1]),
            "acked": sum(s.acked),
            "refused": sum(s.refused),
            "failed": sum(s.failed),
            "unanswered": sum(s.unanswered),
            "resent": s.resent,
            "flushed": s.flushed,
            "unsent": self.unsent,
            "device_dropped": s.device_dropped,
            "by_protocol": dict(s.sent_by_protocol),
            "connections": {"bursts": s.bursts, "dropped": s.dropped,
                            "reconnections": s.reconnections, "churned": s.churned,
                            "lost": s.lost, "connect_failures": s.connect_failures},
            "anomalies": {"injected": s.anomalies_injected,
                          "sent": s.sent[1][a] + s.sent[0][a], "acked": s.acked[a],
                          "refused": s.refused[a],
                          "counted": (sum(gateway["anomalies"].values())
                                      if gateway is not None else None)},
            "tiers": tiers,
            "gateway": gateway,
            "notes": self.notes,
            "warnings": self.warnings,
        }


# ------------------------------------------------------------------------------ the command


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SimulationError(f"the fleet needs about {needed} open files and this process may "
                              f"have {hard} (ulimit -n): lower fleet.connections or "
                              f"fleet.coap_sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def prepare(args: SimulateArgs) -> tuple[Scenario, Fleet]:
    """The scenario with the command line's overrides applied, and its fleet."""
    raw = msgspec.to_builtins(shrunk(load_scenario(args.scenario), args.duration_s, args.scale))
    for name, value in (("mqtt", args.mqtt), ("coap", args.coap), ("admin", args.admin)):
        if value is not None:
            raw.setdefault("target", {})[name] = value
    try:  # validated again as a whole: the overrides name their field when they are wrong
        scenario = msgspec.convert(raw, Scenario)
    except msgspec.ValidationError as err:
        raise ScenarioError(f"{args.scenario} with the command line's options: "
                            f"{format_error(err)}") from None
    return scenario, Fleet(scenario)


def run_simulate(args: SimulateArgs) -> dict[str, Any] | None:
    """Run the scenario (or only write its registry); the summary, or None."""
    import uvloop

    scenario, fleet = prepare(args)
    if args.write_registry is not None:
        n = fleet.write_registry(args.write_registry)
        click.echo(f"{args.write_registry}: {n:,} devices (device,tenant,tier,device_class,"
                   f"region); the gateway reads the device from topic level "
                   f"{fleet.groups[0].device_level}", err=args.as_json)
        return None
    _raise_file_limit(fleet.connections + 2 * scenario.fleet.coap_sockets + 64)
    simulation = Simulation(scenario, fleet, args)
    return uvloop.run(simulation.run())


def _ms(figures: dict[str, Any] | None, *keys: str) -> str:
    if not figures:
        return "-"
    return "/".join(f"{figures[k]:.1f}" if figures[k] != math.inf else "inf" for k in keys)


def format_summary(summary: dict[str, Any]) -> str:
    fleet, conn, anomalies = summary["fleet"], summary["connections"], summary["anomalies"]
    gw = summary["gateway"]
    sim = summary["simulated"]
    coap = (f", {fleet['coap_devices']:,} CoAP over {fleet['coap_sockets']} sockets"
            if fleet["coap_devices"] else "")
    lines = [
        f"scenario {summary['scenario']}: {fleet['devices']:,} devices "
        f"({fleet['mqtt_devices']:,} MQTT over {fleet['connections']:,} connections{coap})",
        f"ran           {summary['duration_s']:.1f} s, simulated {sim['from']} → {sim['to']} "
        f"({sim['days']:g} days)",
        f"sent          {summary['sent']:>10,}  (QoS 1/CON {summary['sent_qos1']:,}, "
        f"QoS 0/NON {summary['sent_qos0']:,}; MQTT {summary['by_protocol']['mqtt']:,}, "
        f"CoAP {summary['by_protocol']['coap']:,}; {summary['flushed']:,} flushed by bursts)",
        f"acknowledged  {summary['acked']:>10,}  refused {summary['refused']:,}  "
        f"failed {summary['failed']:,}  unanswered {summary['unanswered']:,}  "
        f"resent {summary['resent']:,}  dropped by devices {summary['device_dropped']:,}",
    ]
    if gw is not None:
        lines.append(
            f"processed     {gw['processed']:>10,}  shed {gw['shed']:,}  refused by the "
            f"gateway {gw['refused']:,}  dead letters {gw['dead_letters']:,}  "
            f"({'drained' if gw['drained'] else 'NOT drained'})")
    lines.append(
        f"connections   bursts {conn['bursts']} (dropped {conn['dropped']:,}); reconnections "
        f"{conn['reconnections']:,} (churn {conn['churned']:,}); lost {conn['lost']:,}; "
        f"connect failures {conn['connect_failures']:,}")
    counted = anomalies["counted"]
    lines.append(
        f"anomalies     injected {anomalies['injected']:,}, acknowledged {anomalies['acked']:,}"
        + (f", counted by the gateway {counted:,}" if counted is not None else "")
        + (f" ({', '.join(f'{k} {v:,}' for k, v in gw['anomalies'].items())})"
           if gw is not None and gw["anomalies"] else ""))
    lines.append("")
    lines.append(f"{'tier':<18}{'sent':>10}{'acked':>10}{'refused':>9}{'processed':>11}"
                 f"{'shed':>8}   {'ack p50/p99 ms':<16}{'end-to-end p50/p99/mean ms'}")
    for tier, row in summary["tiers"].items():
        lines.append(
            f"{tier:<18}{row.get('sent', 0):>10,}{row.get('acked', 0):>10,}"
            f"{row.get('refused', 0):>9,}{row.get('processed', 0):>11,}{row.get('shed', 0):>8,}"
            f"   {_ms(row.get('ack_ms'), 'p50', 'p99'):<16}"
            f"{_ms(row.get('latency_ms'), 'p50_ms', 'p99_ms', 'mean_ms')}")
    for key, count in summary["notes"].items():
        lines.append(f"note: {key} (×{count})")
    for warning in summary["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


@click.command("simulate")
@click.argument("scenario", metavar="SCENARIO.toml",
                type=click.Path(path_type=Path, dir_okay=False))
@click.option("--mqtt", metavar="HOST:PORT", help="The gateway's MQTT listener (overrides "
              "target.mqtt).")
@click.option("--coap", metavar="HOST:PORT", help="The gateway's CoAP listener, UDP "
              "(overrides target.coap).")
@click.option("--admin", metavar="URL", help="The gateway's admin API, e.g. "
              "http://127.0.0.1:9883 (overrides target.admin).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True),
              help="Run in this many seconds: the scenario's times and day length are scaled "
                   "to fit, so its events and simulated span stay.")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True),
              help="Multiply the devices, connections and rate.")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(min=0),
              default=60.0, show_default=True,
              help="Longest to wait after the load for the answers, then for the gateway's "
                   "backlog.")
@click.option("--write-registry", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the fleet's device registry CSV (for classify.registry) and exit.")
@click.option("--progress/--no-progress", default=None,
              help="The status line on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def simulate_command(scenario: Path, mqtt: str | None, coap: str | None, admin: str | None,
                     duration_s: float | None, scale: float | None, drain_timeout_s: float,
                     write_registry: Path | None, progress: bool | None,
                     as_json: bool) -> None:
    """Drive a running gateway with a synthetic fleet over MQTT and CoAP, as SCENARIO.toml
    describes (examples in config/scenarios/), and summarise what it sent, what was
    acknowledged, refused and processed, per tier."""
    args = SimulateArgs(scenario=scenario, mqtt=mqtt, coap=coap, admin=admin,
                        duration_s=duration_s, scale=scale, drain_timeout_s=drain_timeout_s,
                        write_registry=write_registry, as_json=as_json, progress=progress)
    try:
        summary = run_simulate(args)
    except ConfigError as err:
        raise _ScenarioClickException(f"invalid scenario: {err}") from None
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        raise click.Abort() from None
    if summary is None:
        return
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if not summary["ok"]:  # the gateway went away, or stopped answering, during the run
        raise click.exceptions.Exit(1)
