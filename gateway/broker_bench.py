"""``iot-gateway bench-broker``: the gateway as an MQTT broker against Mosquitto, same run.

Theory of operation
-------------------
Each broker runs as its own process, started here on a free loopback port, one after the
other, and gets the same load from this process (the load generator: asyncio on uvloop, raw
sockets, hand-written MQTT 3.1.1 frames, one small ``asyncio.Protocol`` per connection that
walks fixed headers to count packets, so that tens of thousands of clients cost little):

* idle: N connections each send CONNECT (clean session, keep alive 600 s), wait for their
  CONNACK and stay idle. At most ``HANDSHAKE_WINDOW`` handshakes are outstanding at once
  (so that the listen backlog never overflows into SYN retries). The broker's resident
  memory (VmRSS from /proc) is read, once it has settled, before the first connection, at
  a third of N and at N: bytes per connection = (RSS at N − RSS before) / N, and the
  marginal figure between the two steps. Connect rate = N / time to the last CONNACK.
  Extrapolated to 1,000,000 connections: RSS before + 10⁶ × bytes per connection.
* fan-out: subscribers on ``bench/fanout``, one publisher floods that topic; fan-in:
  publishers flood ``bench/<n>``, one subscriber holds ``bench/#``. Throughput = PUBLISH
  packets received by all subscribers / (last delivery − first PUBLISH sent). QoS 1
  subscribers answer every PUBLISH with a PUBACK; QoS 1 publishers keep at most
  ``PUBLISH_WINDOW`` messages unacknowledged. The broker's CPU time (/proc stat) is read
  around each flow: on shared cores, CPU per delivery is the steadier comparison.

A flow ends when everything expected has arrived; when nothing arrived within
``delivery_timeout`` of the first PUBLISH ("no deliveries": a broker that does not route);
when deliveries stop for as long ("stalled", the count so far is reported); or at
``seconds`` ("cut"). It never waits on a broker that does not answer.

KB are 1024 bytes, MB 1024², GB 1024³.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import uvloop

from gateway.bench import _free_port, _get, _wait_port
from gateway.errors import GatewayError

HOST = "127.0.0.1"
KEEPALIVE_S = 600
HANDSHAKE_WINDOW = 512
"""Connection handshakes (TCP connect → CONNACK, or → SUBACK) in flight at once."""
PUBLISH_WINDOW = 1000
"""QoS 1 messages a publisher keeps unacknowledged (below 65535: packet ids never clash)."""
CHUNK_BYTES = 64 * 1024
READ_BATCH_S = 0.005
"""QoS 0 subscribers read at most this often (``--read-batch-ms``): what the generator spends
per delivery then does not depend on how the broker splits its writes (Mosquitto: one send()
per message), and the broker keeps a core of the shared ones. With reads at once, the
generator spent 3 s of CPU per 1,000,000 Mosquitto deliveries; at 5 ms, 1.1 s. QoS 1
subscribers read at once: their PUBACKs pace the broker."""
PORTS_PER_SOURCE_IP = 20_000
"""Beyond this many connections, connections come from 127.0.0.2, 127.0.0.3…"""
FANOUT_TOPIC = "bench/fanout"
FANIN_FILTER = "bench/#"

MOSQUITTO_CONFIG = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
# no per-client queue limit: a flood is delivered late rather than dropped (QoS 0 and 1)
max_queued_messages 0
# errors and warnings only, as the gateway logs (no line per connection)
log_dest stderr
log_type error
log_type warning
connection_messages false
"""

GATEWAY_CONFIG = """[gateway]
node_id = "broker-bench"
state_dir = "state"
log_level = "WARNING"
@SECTIONS@[dispatch]
shed_above = 10000000   # no QoS 0 shedding: what is published is delivered
max_queued = 20000000
resume_queued = 10000000
[wal]
enabled = false         # a pure broker benchmark: no write-ahead log...
[audit]
enabled = false         # ...and no audit trail
[[tiers]]
name = "standard"
max_latency_ms = 60000
[classify]
default_tier = "standard"
[sinks.null]
type = "null"
[[pipelines]]
name = "bench"
stages = [{ type = "route", sinks = ["null"] }]
"""

GATEWAY_SECTIONS = {
    # anonymous clients, as Mosquitto's allow_anonymous
    "auth": "[auth]\nallow_anonymous = true\n",
    # no per-session queue limit, as Mosquitto's max_queued_messages 0
    "broker": "[broker]\nmax_queued = 100000000\n",
}


def gateway_config() -> str:
    """The benchmark's gateway config, with those of GATEWAY_SECTIONS the code knows (the
    gateway rejects unknown sections, and gains some as it grows)."""
    from gateway.config import Config

    known = Config.__struct_fields__
    return GATEWAY_CONFIG.replace("@SECTIONS@", "".join(
        text for name, text in GATEWAY_SECTIONS.items() if name in known))


AMQTT_MAIN = """
import asyncio, logging, sys
from amqtt.broker import Broker
logging.basicConfig(level=logging.WARNING)
config = {
    "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:" + sys.argv[1]}},
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
}
async def main():
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""

SERVERS = ("mosquitto", "iot-gateway", "amqtt")
TESTS = ("idle", "fanout", "fanin")


# ------------------------------------------------------------------------ MQTT 3.1.1 frames


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_frame(client_id: str, keepalive: int = KEEPALIVE_S) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no will, no credentials."""
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keepalive) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def subscribe_frame(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8(topic_filter) + bytes((qos,))
    return b"\x82" + _remaining_length(len(body)) + body


def publish_head(topic: str, payload_size: int, qos: int) -> bytes:
    """A PUBLISH up to its packet id (QoS > 0) or payload (QoS 0)."""
    name = _utf8(topic)
    length = len(name) + (2 if qos else 0) + payload_size
    return bytes((0x30 | qos << 1,)) + _remaining_length(length) + name


_PACKET_IDS = [struct.pack("!H", i) for i in range(65536)]
_PUBACK = b"\x40\x02"


# ------------------------------------------------------------------------ brokers


def _raise_nofile() -> None:
    """In the load generator and (as preexec_fn) in each broker: open files up to the hard
    limit, since every connection is a file descriptor."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Broker:
    """One broker process under test."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    admin: str | None = None

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        raise GatewayError(f"{self.name}: no {key} in /proc/{self.proc.pid}/status")

    def rss_kb(self) -> int:
        return self._status("VmRSS:")

    def peak_rss_kb(self) -> int:
        return self._status("VmHWM:")

    def reset_peak_rss(self) -> bool:
        """Start VmHWM again from the current RSS (so that a flow's peak is its own); False
        where the kernel does not let us."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise GatewayError(f"{self.name} exited with {self.proc.returncode}\n{tail}")

    def gateway_connections(self) -> int | None:
        """Connections the gateway says it holds (a cross-check), when its admin API says."""
        if self.admin is None:
            return None
        try:
            return int(json.loads(_get(f"{self.admin}/v1/stats"))["connections"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None


def _spawn(argv: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_raise_nofile)


async def _start(name: str, workdir: Path) -> Broker:
    rundir = workdir / name
    rundir.mkdir()
    port = _free_port()
    log = rundir / "broker.log"
    admin: str | None = None
    if name == "mosquitto":
        mosquitto = _mosquitto_path()
        if mosquitto is None:
            raise GatewayError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        conf = rundir / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONFIG.format(port=port))
        proc = _spawn([mosquitto, "-c", str(conf)], log, rundir)
    elif name == "iot-gateway":
        config = rundir / "broker-bench.toml"
        config.write_text(gateway_config())
        admin_port = _free_port()
        admin = f"http://{HOST}:{admin_port}"
        proc = _spawn([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                       "--mqtt-listen", f"{HOST}:{port}",
                       "--admin-listen", f"{HOST}:{admin_port}", "--coap-listen", f"{HOST}:0"],
                      log, rundir)
    elif name == "amqtt":
        proc = _spawn([sys.executable, "-c", AMQTT_MAIN, str(port)], log, rundir)
    else:
        raise GatewayError(f"unknown broker {name!r}")
    broker = Broker(name, proc, port, log, admin)
    try:
        if admin is not None:
            await _wait_port(int(admin.rsplit(":", 1)[1]), proc, name, seconds=30)
        await _wait_port(port, proc, name, seconds=30)
    except BaseException:
        broker.stop()
        raise
    return broker


def _config_of(name: str) -> str:
    if name == "mosquitto":
        return MOSQUITTO_CONFIG.format(port="PORT")
    if name == "iot-gateway":
        return gateway_config()
    return "amqtt.broker.Broker: one tcp listener, AnonymousAuthPlugin only, logging WARNING"


# ------------------------------------------------------------------------ load generator


class Tally:
    """PUBLISH packets received, shared by a flow's subscribers."""

    __slots__ = ("last_at", "received")

    def __init__(self) -> None:
        self.received = 0
        self.last_at = 0.0


class Client(asyncio.Protocol):
    """One raw MQTT 3.1.1 connection. ``ready`` resolves on CONNACK (or, when it subscribes,
    on SUBACK); PUBLISH packets are counted into ``tally`` (QoS 1 ones answered with PUBACK),
    PUBACKs into ``acks``."""

    __slots__ = ("_buf", "_paused", "_waiting_ack", "acks", "hello", "read_every", "ready",
                 "subscribes", "tally", "transport")

    def __init__(self, hello: bytes, tally: Tally | None = None,
                 subscribes: bool = False, read_every: float = 0.0) -> None:
        self.hello = hello
        self.tally = tally
        self.subscribes = subscribes
        self.read_every = read_every
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.acks = 0
        self._buf = b""
        self._paused: asyncio.Future[None] | None = None
        self._waiting_ack: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.hello)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        publishes = 0
        acks: list[bytes] = []
        while end - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            start = pos + 2
            if length & 0x80:  # a longer remaining length
                length &= 0x7F
                shift = 7
                while start < end and buf[start] & 0x80 and shift < 28:
                    length |= (buf[start] & 0x7F) << shift
                    shift += 7
                    start += 1
                if start >= end:
                    break
                length |= buf[start] << shift
                start += 1
            stop = start + length
            if stop > end:
                break
            kind = first >> 4
            if kind == 3:
                publishes += 1
                if first & 0x06:  # QoS 1 (or 2): its packet id follows the topic
                    topic_end = start + 2 + (buf[start] << 8 | buf[start + 1])
                    acks.append(_PUBACK + buf[topic_end:topic_end + 2])
            elif kind == 4:
                self.acks += 1
            elif kind == 2:
                self._on_handshake(buf[start + 1], "CONNACK", done=not self.subscribes)
            elif kind == 9:
                self._on_handshake(buf[stop - 1] if buf[stop - 1] == 0x80 else 0, "SUBACK",
                                   done=True)
            pos = stop
        self._buf = buf[pos:] if pos < end else b""
        if publishes and self.tally is not None:
            self.tally.received += publishes
            self.tally.last_at = time.perf_counter()
            if self.read_every and self.transport is not None:
                self.transport.pause_reading()
                asyncio.get_running_loop().call_later(self.read_every, self._read_again)
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))
        waiting = self._waiting_ack
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _read_again(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _on_handshake(self, code: int, what: str, done: bool) -> None:
        if self.ready.done():
            return
        if code:
            self.ready.set_exception(GatewayError(f"{what} refused: 0x{code:02x}"))
        elif done:
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(GatewayError(f"connection closed before the handshake "
                                                  f"({exc or 'EOF'})"))
        for waiter in (self._paused, self._waiting_ack):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    async def writable(self) -> None:
        if self._paused is not None:
            await self._paused

    async def acked_more(self) -> None:
        self._waiting_ack = asyncio.get_running_loop().create_future()
        await self._waiting_ack

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # RST, no TIME_WAIT left behind
            self.transport = None


async def _open(port: int, clients: Sequence[Client], deadline_s: float) -> tuple[int, list[str]]:
    """Connect every client, at most HANDSHAKE_WINDOW handshakes at a time. Returns how many
    failed and the first few errors."""
    loop = asyncio.get_running_loop()
    pending: Iterator[int] = iter(range(len(clients)))
    failed = 0
    errors: list[str] = []

    async def worker() -> None:
        nonlocal failed
        for i in pending:  # one iterator shared by every worker: each client once
            client = clients[i]
            local = None
            if len(clients) > PORTS_PER_SOURCE_IP:
                local = (f"127.0.0.{1 + i // PORTS_PER_SOURCE_IP}", 0)
            try:
                await loop.create_connection(lambda c=client: c, HOST, port,
                                             local_addr=local)
                await client.ready
            except (OSError, GatewayError) as err:
                failed += 1
                if len(errors) < 3:
                    errors.append(str(err))

    workers = [asyncio.create_task(worker()) for _ in range(min(HANDSHAKE_WINDOW, len(clients)))]
    try:
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(*workers)
    except TimeoutError:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        unfinished = sum(1 for c in clients if not c.ready.done())
        failed += unfinished
        errors.append(f"{unfinished} handshakes unanswered after {deadline_s:.0f} s")
    for client in clients:  # exceptions of futures nobody awaited: retrieved, not warned about
        if client.ready.done() and not client.ready.cancelled():
            client.ready.exception()
    return failed, errors


def _close_all(clients: Sequence[Client]) -> None:
    for client in clients:
        client.close()


# ------------------------------------------------------------------------ idle connections


@dataclass
class IdleResult:
    server: str
    connections: int
    failed: int
    connect_seconds: float
    connect_rate: float
    rss_before_kb: int
    rss_steps_kb: list[tuple[int, int]]
    """(connections open, RSS in KB) at each step."""
    bytes_per_connection: float
    marginal_bytes_per_connection: float | None
    million_gb: float
    """RSS extrapolated to 1,000,000 connections: before + 10⁶ × bytes per connection."""
    errors: list[str] = field(default_factory=list)
    note: str = ""


async def _settled_rss(broker: Broker, timeout_s: float = 4.0) -> int:
    """VmRSS once three readings 0.2 s apart agree within 64 KB (or after timeout_s)."""
    readings = [broker.rss_kb()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        readings.append(broker.rss_kb())
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= 64:
            break
    return readings[-1]


async def _handshake_once(broker: Broker, client_id: str) -> None:
    """One connection in and out: lazy first-connection work is done before the baseline."""
    client = Client(connect_frame(client_id))
    failed, errors = await _open(broker.port, [client], 10.0)
    client.close()
    if failed:
        raise GatewayError(f"{broker.name} refused a connection: {'; '.join(errors)}")


async def measure_idle(broker: Broker, n: int) -> IdleResult:
    await _handshake_once(broker, "warmup")
    await asyncio.sleep(0.3)
    before = await _settled_rss(broker)
    clients = [Client(connect_frame(f"idle-{i:06d}")) for i in range(n)]
    steps: list[tuple[int, int]] = []
    failed = 0
    errors: list[str] = []
    connect_seconds = 0.0
    bounds = sorted({n // 3, n}) if n >= 3 else [n]
    start_index = 0
    try:
        for bound in bounds:
            began = time.perf_counter()
            f, e = await _open(broker.port, clients[start_index:bound], 120.0)
            connect_seconds += time.perf_counter() - began
            failed += f
            errors += e
            start_index = bound
            broker.check_alive()
            steps.append((bound - failed, await _settled_rss(broker)))
        note = ""
        held = broker.gateway_connections()
        if held is not None and held != n - failed:
            note = f"the gateway reports {held} connections"
    finally:
        _close_all(clients)
    established = n - failed
    after = steps[-1][1]
    per_conn = (after - before) * 1024 / established if established else 0.0
    marginal = None
    if len(steps) == 2 and steps[1][0] > steps[0][0]:
        marginal = (steps[1][1] - steps[0][1]) * 1024 / (steps[1][0] - steps[0][0])
    await asyncio.sleep(0.5)  # let the broker see the connections go
    return IdleResult(
        server=broker.name, connections=established, failed=failed,
        connect_seconds=connect_seconds,
        connect_rate=established / connect_seconds if connect_seconds else 0.0,
        rss_before_kb=before, rss_steps_kb=steps, bytes_per_connection=per_conn,
        marginal_bytes_per_connection=marginal,
        million_gb=(before * 1024 + per_conn * 1_000_000) / 2**30, errors=errors, note=note)


# ------------------------------------------------------------------------ fan-out, fan-in


@dataclass
class FlowResult:
    flow: str
    server: str
    qos: int
    publishers: int
    subscribers: int
    published: int
    expected: int
    delivered: int
    outcome: str
    """complete, no deliveries, stalled, cut, or refused (a SUBSCRIBE or CONNECT was)."""
    seconds: float
    rate: float
    """Deliveries per second: received by all subscribers / (last delivery − first send)."""
    publish_seconds: float | None
    broker_cpu_s: float
    generator_cpu_s: float
    peak_rss_mb: float
    """During the flow; since the broker started when ``peak_is_the_flows`` is False."""
    peak_is_the_flows: bool = True
    errors: list[str] = field(default_factory=list)

    @property
    def broker_cpu_us_per_delivery(self) -> float | None:
        return self.broker_cpu_s * 1e6 / self.delivered if self.delivered else None


@dataclass
class FlowLimits:
    seconds: float
    delivery_timeout: float
    payload_size: int
    read_every: float = READ_BATCH_S


async def _publish(client: Client, topic: str, payload: bytes, qos: int, count: int) -> None:
    """Send ``count`` PUBLISH packets as fast as the broker reads them (QoS 1: within
    PUBLISH_WINDOW unacknowledged), then wait for the last PUBACK."""
    head = publish_head(topic, len(payload), qos)
    if qos == 0:
        frame = head + payload
        per_chunk = max(1, CHUNK_BYTES // len(frame))
        chunk = frame * per_chunk
        sent = 0
        while sent < count and client.transport is not None:
            n = min(per_chunk, count - sent)
            client.transport.write(chunk if n == per_chunk else frame * n)
            sent += n
            await client.writable()
        return
    ids = _PACKET_IDS
    sent = 0
    while sent < count and client.transport is not None:
        while sent - client.acks >= PUBLISH_WINDOW and client.transport is not None:
            await client.acked_more()
        n = min(count - sent, PUBLISH_WINDOW - (sent - client.acks), 256)
        if n <= 0 or client.transport is None:
            continue
        client.transport.write(b"".join([head + ids[k % 65535 + 1] + payload
                                         for k in range(sent, sent + n)]))
        sent += n
        await client.writable()
    while client.acks < count and client.transport is not None:
        await client.acked_more()


async def run_flow(broker: Broker, flow: str, qos: int, publishers: int, subscribers: int,
                   deliveries: int, limits: FlowLimits) -> FlowResult:
    """One fan-out (1 → subscribers) or fan-in (publishers → 1) flow against ``broker``."""
    tally = Tally()
    tag = f"{flow}-q{qos}"
    topic_filter = FANOUT_TOPIC if flow == "fanout" else FANIN_FILTER
    subs = [Client(connect_frame(f"{tag}-sub-{i}") + subscribe_frame(1, topic_filter, qos),
                   tally, subscribes=True, read_every=0.0 if qos else limits.read_every)
            for i in range(subscribers)]
    pubs = [Client(connect_frame(f"{tag}-pub-{i}")) for i in range(publishers)]
    per_pub = [deliveries // subscribers // publishers] * publishers
    for i in range((deliveries // subscribers) % publishers):
        per_pub[i] += 1
    published = sum(per_pub)
    expected = published * subscribers
    payload = b"x" * limits.payload_size
    topics = ([FANOUT_TOPIC] * publishers if flow == "fanout"
              else [f"bench/{i}" for i in range(publishers)])
    peak_rss_mb = 0.0
    peak_reset = False

    def result(outcome: str, delivered: int, seconds: float, publish_s: float | None,
               cpu: float, gen_cpu: float, errors: list[str]) -> FlowResult:
        return FlowResult(flow, broker.name, qos, publishers, subscribers, published, expected,
                          delivered, outcome, seconds, delivered / seconds if seconds else 0.0,
                          publish_s, cpu, gen_cpu, peak_rss_mb, peak_reset, errors)

    try:
        failed, errors = await _open(broker.port, subs, 60.0)
        if not failed:
            more_failed, more_errors = await _open(broker.port, pubs, 60.0)
            failed += more_failed
            errors += more_errors
        if failed:
            return result("refused", 0, 0.0, None, 0.0, 0.0, errors)
        await asyncio.sleep(0.1)  # subscriptions in place before the first PUBLISH
        peak_reset = broker.reset_peak_rss()
        cpu0, gen0 = broker.cpu_s(), time.process_time()
        t0 = time.perf_counter()
        sending = [asyncio.create_task(_publish(p, topic, payload, qos, count))
                   for p, topic, count in zip(pubs, topics, per_pub, strict=True)]
        publish_done: float | None = None
        outcome = "complete"
        last_seen, last_change = 0, t0
        while tally.received < expected:
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            if publish_done is None and all(t.done() for t in sending):
                publish_done = now - t0
            if tally.received != last_seen:
                last_seen, last_change = tally.received, now
            if not tally.received and now - t0 > limits.delivery_timeout:
                outcome = "no deliveries"
                break
            if tally.received and now - last_change > limits.delivery_timeout:
                outcome = "stalled"
                break
            if now - t0 > limits.seconds:
                outcome = "cut"
                break
            broker.check_alive()
        cpu, gen_cpu = broker.cpu_s() - cpu0, time.process_time() - gen0
        seconds = (tally.last_at - t0) if tally.received else time.perf_counter() - t0
        if publish_done is None and outcome == "complete":  # the last PUBACKs may be on the way
            await asyncio.wait(sending, timeout=2.0)
        if publish_done is None and all(t.done() for t in sending):
            publish_done = time.perf_counter() - t0
        for task in sending:
            task.cancel()
        done = await asyncio.gather(*sending, return_exceptions=True)
        errors = [repr(e) for e in done if isinstance(e, Exception)][:3]
        peak_rss_mb = broker.peak_rss_kb() / 1024
        return result(outcome, tally.received, seconds, publish_done, cpu, gen_cpu, errors)
    finally:
        _close_all(subs)
        _close_all(pubs)
        await asyncio.sleep(0.3)


# ------------------------------------------------------------------------ the run


@dataclass
class BenchArgs:
    connections: int = 15_000
    amqtt_connections: int = 2_000
    fanout_subscribers: int = 100
    fanin_publishers: int = 1_000
    messages: int = 1_000_000
    payload_size: int = 64
    qos_levels: tuple[int, ...] = (0, 1)
    seconds: float = 60.0
    delivery_timeout: float = 5.0
    read_batch_s: float = READ_BATCH_S
    tests: tuple[str, ...] = TESTS
    servers: tuple[str, ...] = SERVERS


@dataclass
class BenchReport:
    args: BenchArgs
    configs: dict[str, str]
    idle: list[IdleResult]
    flows: list[FlowResult]
    ratios: dict[str, float | None]
    failures: dict[str, str] = field(default_factory=dict)
    """Brokers that could not be measured (did not start, exited): why."""
    cpus: int | None = os.cpu_count()


def _progress(text: str) -> None:
    print(f"bench-broker: {text}", file=sys.stderr, flush=True)


async def _bench_server(name: str, workdir: Path, args: BenchArgs
                        ) -> tuple[list[IdleResult], list[FlowResult]]:
    idle: list[IdleResult] = []
    flows: list[FlowResult] = []
    broker = await _start(name, workdir)
    try:
        if "idle" in args.tests:
            n = args.amqtt_connections if name == "amqtt" else args.connections
            _progress(f"{name}: {n} idle connections")
            idle.append(await measure_idle(broker, n))
        if name == "amqtt":  # idle memory only: it is no throughput peer
            return idle, flows
        limits = FlowLimits(args.seconds, args.delivery_timeout, args.payload_size,
                            args.read_batch_s)
        for flow, pubs, subs in (("fanout", 1, args.fanout_subscribers),
                                 ("fanin", args.fanin_publishers, 1)):
            if flow not in args.tests:
                continue
            for qos in args.qos_levels:
                _progress(f"{name}: {flow} QoS {qos}, {pubs} → {subs}")
                flows.append(await run_flow(broker, flow, qos, pubs, subs, args.messages,
                                            limits))
                broker.check_alive()
    finally:
        broker.stop()
    return idle, flows


def _ratios(idle: list[IdleResult], flows: list[FlowResult]) -> dict[str, float | None]:
    ratios: dict[str, float | None] = {}
    by_server = {r.server: r for r in idle}
    gw, mq = by_server.get("iot-gateway"), by_server.get("mosquitto")
    if gw and mq and mq.bytes_per_connection > 0:
        ratios["idle memory per connection, iot-gateway / mosquitto"] = (
            gw.bytes_per_connection / mq.bytes_per_connection)
    if gw and mq and mq.connect_rate > 0:
        ratios["connect rate, iot-gateway / mosquitto"] = gw.connect_rate / mq.connect_rate
    peers = {(f.flow, f.qos): f for f in flows if f.server == "mosquitto"}
    for f in flows:
        peer = peers.get((f.flow, f.qos))
        if f.server != "iot-gateway" or peer is None or not peer.rate:
            continue
        ratios[f"{f.flow} QoS {f.qos}, iot-gateway / mosquitto"] = (
            f.rate / peer.rate if f.delivered else None)
    return ratios


def run_broker_bench(args: BenchArgs) -> BenchReport:
    _raise_nofile()
    need = max(args.connections, args.amqtt_connections, args.fanin_publishers + 1,
               args.fanout_subscribers + 1) + 256
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if "idle" in args.tests and need > limit:
        raise GatewayError(f"{need - 256} connections need {need} open files; the limit is "
                           f"{limit} (raise the hard limit: ulimit -Hn)")
    servers = [s for s in args.servers if s != "mosquitto" or _mosquitto_available()]
    if "amqtt" in servers and ("idle" not in args.tests or not args.amqtt_connections):
        servers.remove("amqtt")

    failures: dict[str, str] = {}

    async def main() -> tuple[list[IdleResult], list[FlowResult]]:
        idle: list[IdleResult] = []
        flows: list[FlowResult] = []
        with tempfile.TemporaryDirectory(prefix="iotgw-broker-bench-") as tmp:
            for name in servers:
                try:  # one broker failing does not cost the others' figures
                    i, f = await _bench_server(name, Path(tmp), args)
                except GatewayError as err:
                    _progress(f"{name}: {err}")
                    failures[name] = str(err)
                    continue
                idle += i
                flows += f
        return idle, flows

    idle, flows = uvloop.run(main())
    if failures and not idle and not flows:
        raise GatewayError("; ".join(f"{k}: {v}" for k, v in failures.items()))
    return BenchReport(args, {name: _config_of(name) for name in servers}, idle, flows,
                       _ratios(idle, flows), failures)


def _mosquitto_available() -> bool:
    return _mosquitto_path() is not None


# ------------------------------------------------------------------------ output


def _json(report: BenchReport) -> str:
    data: dict[str, Any] = asdict(report)
    for flow, obj in zip(data["flows"], report.flows, strict=True):
        flow["broker_cpu_us_per_delivery"] = obj.broker_cpu_us_per_delivery
    return json.dumps(data, indent=2)


def _print(report: BenchReport) -> None:
    a = report.args
    print(f"iot-gateway bench-broker: {a.connections:,} idle connections (amqtt "
          f"{a.amqtt_connections:,}), fan-out 1 → {a.fanout_subscribers}, fan-in "
          f"{a.fanin_publishers} → 1, {a.messages:,} deliveries per flow, "
          f"{a.payload_size}-byte payloads, {report.cpus} CPUs")
    if "iot-gateway" in report.configs:
        print("iot-gateway config: WAL off, audit off, one tier, pipeline route → null sink, "
              "no QoS 0 shedding, log WARNING (--json shows the file)")
    if "mosquitto" in report.configs:
        print("mosquitto config: persistence false, max_queued_messages 0 (no drops), "
              "log errors and warnings only")
    if report.idle:
        print()
        print(f"{'idle connections':<14}{'conns':>8}{'connect/s':>11}{'RSS before MB':>15}"
              f"{'RSS after MB':>14}{'KB/conn':>9}{'marginal':>10}{'1M conns GB':>13}")
        for r in report.idle:
            marginal = (f"{r.marginal_bytes_per_connection / 1024:.2f}"
                        if r.marginal_bytes_per_connection is not None else "-")
            print(f"{r.server:<14}{r.connections:>8,}{r.connect_rate:>11,.0f}"
                  f"{r.rss_before_kb / 1024:>15.1f}{r.rss_steps_kb[-1][1] / 1024:>14.1f}"
                  f"{r.bytes_per_connection / 1024:>9.2f}{marginal:>10}{r.million_gb:>13.2f}")
            if r.failed or r.note:
                print(f"  {r.failed} failed {'; '.join(r.errors)} {r.note}".rstrip())
    if report.flows:
        print()
        print(f"{'flow':<9}{'qos':>4}  {'server':<13}{'delivered':>21}{'msg/s':>12}"
              f"{'seconds':>9}{'CPU µs/msg':>12}{'peak RSS MB':>13}")
        for f in report.flows:
            cpu = f.broker_cpu_us_per_delivery
            got = f"{f.delivered:,}/{f.expected:,}"
            if f.outcome == "no deliveries":
                print(f"{f.flow:<9}{f.qos:>4}  {f.server:<13}  no deliveries (0 of "
                      f"{f.expected:,} within {a.delivery_timeout:g} s of the first PUBLISH)")
                continue
            if f.outcome == "refused":
                print(f"{f.flow:<9}{f.qos:>4}  {f.server:<13}  refused: {'; '.join(f.errors)}")
                continue
            print(f"{f.flow:<9}{f.qos:>4}  {f.server:<13}{got:>21}{f.rate:>12,.0f}"
                  f"{f.seconds:>9.2f}{(f'{cpu:.2f}' if cpu else '-'):>12}"
                  f"{f.peak_rss_mb:>12.0f}{' ' if f.peak_is_the_flows else '*'}"
                  + ("" if f.outcome == "complete"
                                               else f"  ({f.outcome})"))
    if any(not f.peak_is_the_flows for f in report.flows):
        print("* peak since the broker started (its VmHWM could not be reset)")
    for name, why in report.failures.items():
        print(f"{name}: not measured: {why.splitlines()[0] if why else '?'}")
    if report.ratios:
        print()
        for name, ratio in report.ratios.items():
            target = " (target ≥ 0.5)" if "QoS" in name else ""
            value = f"{ratio:.2f}" if ratio is not None else "n/a: no deliveries"
            print(f"ratio {name}: {value}{target}")


# ------------------------------------------------------------------------ command


def _csv(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in items if x not in allowed]
    if unknown:
        raise click.BadParameter(f"unknown {what} {unknown}: choose from {', '.join(allowed)}")
    return items


@click.command("bench-broker")
@click.option("--connections", type=click.IntRange(1), default=15_000, show_default=True,
              help="Idle connections per broker.")
@click.option("--amqtt-connections", type=click.IntRange(0), default=2_000, show_default=True,
              help="Idle connections for amqtt (a slow connector; 0 leaves it out).")
@click.option("--fanout-subscribers", type=click.IntRange(1), default=100, show_default=True)
@click.option("--fanin-publishers", type=click.IntRange(1), default=1_000, show_default=True)
@click.option("--messages", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Deliveries per flow: fan-out publishes N / subscribers messages, fan-in N.")
@click.option("--payload-size", type=click.IntRange(0), default=64, show_default=True)
@click.option("--qos", "qos_levels", default="0,1", show_default=True,
              help="Comma-separated QoS levels of the fan-out and fan-in flows (0, 1).")
@click.option("--seconds", type=float, default=60.0, show_default=True,
              help="Longest a flow may run; what arrived by then counts.")
@click.option("--delivery-timeout", type=float, default=5.0, show_default=True,
              help="Nothing delivered this long after the first PUBLISH: 'no deliveries' "
                   "(and a flow whose deliveries stop this long is 'stalled').")
@click.option("--read-batch-ms", type=click.FloatRange(0), default=READ_BATCH_S * 1000,
              show_default=True,
              help="QoS 0 subscribers read at most this often (0: as soon as data arrives).")
@click.option("--only", "only", type=click.Choice(TESTS), multiple=True,
              help="Run only this test (repeatable); default: all.")
@click.option("--servers", default=",".join(SERVERS), show_default=True,
              help="Brokers to measure (amqtt: idle memory only).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_broker_command(connections: int, amqtt_connections: int, fanout_subscribers: int,
                         fanin_publishers: int, messages: int, payload_size: int,
                         qos_levels: str, seconds: float, delivery_timeout: float,
                         read_batch_ms: float, only: tuple[str, ...], servers: str,
                         as_json: bool) -> None:
    """The gateway as an MQTT broker against Mosquitto: idle memory per connection, connect
    rate, fan-out and fan-in throughput, same load, same run."""
    levels = tuple(int(q) for q in _csv(qos_levels, ("0", "1"), "QoS level"))
    args = BenchArgs(connections=connections, amqtt_connections=amqtt_connections,
                     fanout_subscribers=fanout_subscribers, fanin_publishers=fanin_publishers,
                     messages=messages, payload_size=payload_size, qos_levels=levels,
                     seconds=seconds, delivery_timeout=delivery_timeout,
                     read_batch_s=read_batch_ms / 1000, tests=only or TESTS,
                     servers=_csv(servers, SERVERS, "server"))
    if messages < fanout_subscribers and "fanout" in args.tests:
        raise click.BadParameter("--messages must be at least --fanout-subscribers")
    try:
        report = run_broker_bench(args)
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(_json(report))
    else:
        _print(report)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        bench_broker_command()
