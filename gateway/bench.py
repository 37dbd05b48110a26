"""``iot-gateway bench``: the gateway against Mosquitto, same load, same run.

The gateway runs as its own process (one event loop, null sink) and so does the peer. The
load generator pre-encodes PUBLISH frames for many connections and writes them as fast as
the server reads them. A run is over when the server has taken everything: for QoS 0 a
PINGREQ sent after the last PUBLISH is answered (the server read all before it) and, for the
gateway, its processed count equals what was sent; for QoS 1 every PUBACK has arrived. Then
a paced run at a fixed rate measures per-tier latency from the gateway's own histogram
(first byte read → end of pipeline).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import GatewayError
from protocols.mqtt.packets import Connect, Pingreq, Publish, encode

TIER_TOPICS = (("critical", "medical"), ("premium", "premium"), ("standard", "telemetry"),
               ("bulk", "bulk"))
# One message in ten is critical, two premium, five standard, two bulk.
TIER_MIX = (0, 1, 1, 2, 2, 2, 2, 2, 3, 3)

BENCH_CONFIG = """
[gateway]
node_id = "bench"
log_level = "WARNING"
[auth]
allow_anonymous = true
[dispatch]
batch_size = 512
slots = 4
shed_above = 200000  # no QoS 0 shedding: every message is processed (back-pressure only)
[[tiers]]
name = "critical"
max_latency_ms = 100
guaranteed_share = 0.4
[[tiers]]
name = "premium"
max_latency_ms = 500
guaranteed_share = 0.3
[[tiers]]
name = "standard"
max_latency_ms = 2000
guaranteed_share = 0.2
[[tiers]]
name = "bulk"
max_latency_ms = 60000
guaranteed_share = 0.05
[classify]
default_tier = "standard"
[[classify.rules]]
match = { topic = "medical/#" }
tier = "critical"
[[classify.rules]]
match = { topic = "premium/#" }
tier = "premium"
[[classify.rules]]
match = { topic = "bulk/#" }
tier = "bulk"
[sinks.null]
type = "null"
[sinks.lake]
type = "jsonl"
options = { dir = "lake" }
"""

PIPELINES = {
    # parse → classify → dispatch → null sink: the gateway's own overhead
    "null": '[[pipelines]]\nname = "bench"\nstages = [{ type = "route", sinks = ["null"] }]\n',
    # the built-in pipeline's work: JSON decode, validate, enrich, JSON-lines data lake
    "full": '[[pipelines]]\nname = "bench"\nstages = [{ type = "decode" }, '
            '{ type = "validate" }, { type = "enrich" }, { type = "route", sinks = ["lake"] }]\n',
}


@dataclass
class RunResult:
    server: str
    qos: int
    messages: int
    seconds: float
    rate: float
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_mb: float | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Frames(list[bytes]):
    """One connection's pre-encoded PUBLISH frames."""

    def blob(self) -> bytes:
        return b"".join(self)


def _frames(conn_index: int, count: int, qos: int, payload_size: int) -> Frames:
    pad = "x" * max(0, payload_size - 40)
    frames = Frames()
    for k in range(count):
        tier = TIER_MIX[k % len(TIER_MIX)]
        prefix = TIER_TOPICS[tier][1]
        device = f"dev-{conn_index}-{k % 100}"
        payload = f'{{"seq":{k},"t":21.5,"pad":"{pad}"}}'.encode()
        packet_id = (k % 65535) + 1 if qos else None
        frames.append(encode(Publish(topic=f"{prefix}/{device}/telemetry", payload=payload,
                                     qos=qos, retain=False, dup=False, packet_id=packet_id,
                                     properties={}), 4))
    return frames


class _Client:
    """One load-generating MQTT 3.1.1 connection."""

    def __init__(self, index: int, frames: Frames, expected_acks: int) -> None:
        self.index = index
        self.frames = frames
        self.expected_acks = expected_acks
        self.acks = 0
        self.pong = asyncio.Event()
        self.acked = asyncio.Event()
        if expected_acks == 0:
            self.acked.set()

    async def run(self, port: int, rate: float | None) -> None:
        """Send every frame: as fast as the server reads, or ``rate`` messages a second."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode(Connect(protocol_level=4, client_id=f"bench-{self.index}",
                                    clean_start=True, keepalive=0, username=None,
                                    password=None, will=None, properties={}), 4))
        connack = await reader.readexactly(4)
        if connack[3] != 0:
            raise GatewayError(f"bench client refused: CONNACK {connack.hex()}")
        reading = asyncio.create_task(self._read(reader))
        if rate is None:
            blob, chunk = self.frames.blob(), 64 * 1024
            view = memoryview(blob)
            for start in range(0, len(view), chunk):
                writer.write(view[start:start + chunk])
                await writer.drain()
        else:  # every millisecond, whatever the rate says is due by now
            sent, begin = 0, time.perf_counter()
            while sent < len(self.frames):
                due = min(len(self.frames), int((time.perf_counter() - begin) * rate) + 1)
                if due > sent:
                    writer.write(b"".join(self.frames[sent:due]))
                    sent = due
                await asyncio.sleep(0.001)
        writer.write(encode(Pingreq(), 4))
        await writer.drain()
        await self.pong.wait()
        await self.acked.wait()
        reading.cancel()
        writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            pos, end = 0, len(buf)
            while end - pos >= 2:
                kind, length = buf[pos], buf[pos + 1]
                if end - pos < 2 + length:
                    break
                if kind == 0x40:
                    self.acks += 1
                elif kind == 0xD0:
                    self.pong.set()
                pos += 2 + length
            buf = buf[pos:]
            if self.acks >= self.expected_acks:
                self.acked.set()


async def _drive(port: int, frames: list[Frames], qos: int,
                 rate_per_client: float | None = None) -> float:
    clients = [_Client(i, f, len(f) if qos else 0) for i, f in enumerate(frames)]
    start = time.perf_counter()
    await asyncio.gather(*(c.run(port, rate_per_client) for c in clients))
    return time.perf_counter() - start


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _histograms(admin: str) -> dict[str, dict[float, float]]:
    text = _get(f"{admin}/metrics").decode()
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "iotgw_processing_latency_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                out.setdefault(sample.labels["tier"], {})[le] = sample.value
    return out


def _quantiles(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
               ) -> dict[str, dict[str, float]]:
    result = {}
    for tier, buckets in after.items():
        prior = before.get(tier, {})
        cumulative = sorted((le, n - prior.get(le, 0.0)) for le, n in buckets.items())
        total = cumulative[-1][1] if cumulative else 0
        if not total:
            continue
        q = {}
        for name, frac in (("p50", 0.5), ("p99", 0.99)):
            q[name] = next(le for le, n in cumulative if n >= frac * total) * 1000
        q["count"] = total
        result[tier] = q
    return result


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
                     seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if proc.poll() is not None:
            raise GatewayError(f"{what} exited with {proc.returncode} before listening")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise GatewayError(f"{what} did not listen on port {port}")


async def _bench_gateway(workdir: Path, label: str, config_text: str,
                         flood: dict[int, list[Frames]],
                         paced: dict[int, tuple[list[Frames], float]]) -> list[RunResult]:
    """One gateway process: flood runs per QoS, then paced runs per QoS."""
    rundir = workdir / label.replace(" ", "_").replace(",", "")
    rundir.mkdir()
    config = rundir / "bench.toml"
    config.write_text(config_text)
    mqtt_port, admin_port = _free_port(), _free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
         "--mqtt-listen", f"127.0.0.1:{mqtt_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
         "--coap-listen", "127.0.0.1:0"],
        cwd=rundir)
    results = []
    try:
        await _wait_port(admin_port, proc, "the gateway")
        for qos, qos_frames in flood.items():
            results.append(await _gateway_run(admin, mqtt_port, qos, qos_frames, label))
            results[-1].rss_mb = _rss_mb(proc.pid)
        for qos, (paced_frames, rate_per_client) in paced.items():
            before = _histograms(admin)
            seconds = await _drive(mqtt_port, paced_frames, qos, rate_per_client)
            await _wait_processed(admin)
            total = sum(map(len, paced_frames))
            results.append(RunResult(f"{label}, paced", qos, total, seconds, total / seconds,
                                     _quantiles(before, _histograms(admin)), _rss_mb(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return results


async def _wait_processed(admin: str) -> None:
    while True:
        stats = json.loads(_get(f"{admin}/v1/stats"))
        done = stats["processed"] + stats["failed"] + stats["refused"] + stats["shed"]
        if done >= stats["received"] and not stats["queued"]:
            return
        await asyncio.sleep(0.01)


async def _gateway_run(admin: str, port: int, qos: int, frames: list[Frames],
                       label: str) -> RunResult:
    before = _histograms(admin)
    start = time.perf_counter()
    await _drive(port, frames, qos)
    await _wait_processed(admin)
    seconds = time.perf_counter() - start
    total = sum(map(len, frames))
    return RunResult(label, qos, total, seconds, total / seconds,
                     _quantiles(before, _histograms(admin)))


async def _bench_mosquitto(workdir: Path, frames: dict[int, list[Frames]]) -> list[RunResult]:
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = []
    try:
        await _wait_port(port, proc, "mosquitto")
        for qos, qos_frames in frames.items():
            seconds = await _drive(port, qos_frames, qos)
            total = sum(map(len, qos_frames))
            results.append(RunResult("mosquitto", qos, total, seconds, total / seconds,
                                     rss_mb=_rss_mb(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def _mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or os.path.exists("/usr/sbin/mosquitto")


def run_bench(*, messages: int, connections: int, payload_size: int, qos_levels: list[int],
              with_peer: bool, as_json: bool, paced_rate: int, pipeline: str = "null") -> None:
    per_conn = [messages // connections + (i < messages % connections)
                for i in range(connections)]
    flood = {q: [_frames(i, n, q, payload_size) for i, n in enumerate(per_conn)]
             for q in qos_levels}
    paced_seconds = 5
    paced_per_conn = max(1, paced_rate * paced_seconds // connections)
    paced = {q: ([_frames(i, paced_per_conn, q, payload_size) for i in range(connections)],
                 paced_rate / connections) for q in sorted({0, *qos_levels} & {0, 1})}
    config = BENCH_CONFIG + PIPELINES[pipeline]
    label = "iot-gateway" if pipeline == "null" else f"iot-gateway ({pipeline})"

    async def main() -> list[RunResult]:
        with tempfile.TemporaryDirectory(prefix="iotgw-bench-") as tmp:
            results = await _bench_gateway(Path(tmp), label, config, flood, paced)
            if 1 in flood:  # the same QoS 1 load without the write-ahead log: what it costs
                results += await _bench_gateway(
                    Path(tmp), f"{label}, no WAL", config + "[wal]\nenabled = false\n",
                    {1: flood[1]}, {1: paced[1]})
            if with_peer and _mosquitto_available():
                results += await _bench_mosquitto(Path(tmp), flood)
            return results

    results = uvloop.run(main())
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return
    _print(results, messages, connections, payload_size)


def _print(results: list[RunResult], messages: int, connections: int, payload_size: int) -> None:
    print(f"iot-gateway bench: {messages} messages per QoS level, {connections} connections, "
          f"{payload_size}-byte payloads, {os.cpu_count()} CPUs")
    print(f"{'server':<28}{'qos':>4}{'msg/s':>12}{'seconds':>9}{'peak RSS MB':>13}")
    for r in results:
        rss = f"{r.rss_mb:.0f}" if r.rss_mb is not None else "-"
        print(f"{r.server:<28}{r.qos:>4}{r.rate:>12,.0f}{r.seconds:>9.2f}{rss:>13}")
    peers = {r.qos: r for r in results if r.server == "mosquitto"}
    for r in results:
        if r.server.startswith("iot-gateway") and "paced" not in r.server and r.qos in peers:
            print(f"ratio {r.server} / mosquitto, QoS {r.qos}: "
                  f"{r.rate / peers[r.qos].rate:.2f}")
    wal = {r.server.endswith("no WAL, paced"): r for r in results
           if r.qos == 1 and r.server.endswith("paced")}
    if len(wal) == 2:
        on, off = wal[False].latency_ms, wal[True].latency_ms
        added = {t: on[t]["p99"] - off[t]["p99"] for t in on if t in off}
        print("p99 added by the write-ahead log (paced QoS 1, fsync on vs no WAL): "
              + ", ".join(f"{t} {ms:+.2f} ms" for t, ms in added.items()))
    for r in results:
        if r.latency_ms:
            print(f"latency, {r.server} QoS {r.qos} at {r.rate:,.0f} msg/s "
                  "(first byte read → end of pipeline):")
            for tier, q in r.latency_ms.items():
                print(f"  {tier:<10} p50 {q['p50']:8.2f} ms   p99 {q['p99']:8.2f} ms"
                      f"   ({q['count']:.0f} messages)")
