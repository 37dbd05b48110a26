"""``iot-gateway bench-scenario``: tiers, anomalies and maintenance under overload, measured.

The gateway runs as its own process with the full pipeline (decode, validate, enrich from a
device registry, JSON-lines data lake) and anomaly triage. First its processing capacity is
measured: a standard-tier QoS 0 flood, messages processed per second. Then, on real
sockets, the scenario:

* standard tier: QoS 0 at ``overload`` × that capacity (default 2 ×), over several
  connections: more than the gateway can process, so the excess is shed (counted);
* premium and critical tiers: QoS 1 at a few percent of capacity each, beside it;
* anomalies: critical-tier readings out of range, ``anomaly_rate`` a second;
* maintenance: phases alternate, off and on. In an "on" phase a reservation runs the
  ``registry-rebuild`` task (a 1,000,000-device CSV registry parsed on the loop in slices,
  then installed; rescheduled when it finishes) in the slots the planner grants.

Per phase the gateway's own histograms give per-tier p50/p99 (first byte read → end of the
pipeline, interpolated within buckets as Prometheus' ``histogram_quantile`` does), anomaly
detection latency (first byte read → anomaly raised), and the counters processed and shed
messages. Phases of each kind are added up. The same scenario then runs against a peer: the
same gateway with one FIFO lane (no tiers, no triage), which is what priority buys.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from gateway.bench import _free_port, _get, _wait_port
from gateway.errors import GatewayError
from protocols.mqtt.packets import Connect, Publish, encode

TIERS = ("critical", "premium", "standard")
REGISTRY_DEVICES = 1_000_000
TOPICS = 500
"""Devices (one topic each) a load connection speaks for: it stands for a site gateway or a
group of devices whose topics the per-connection classification cache holds."""

SCENARIO_CONFIG = """
[gateway]
node_id = "scenario"
log_level = "WARNING"
[auth]
allow_anonymous = true
[dispatch]
batch_size = 256
slots = 4
shed_above = 20000
max_queued = 60000
resume_queued = 30000
[[tiers]]
name = "critical"
max_latency_ms = 100
guaranteed_share = 0.4
shed_qos0 = false
[[tiers]]
name = "premium"
max_latency_ms = 500
guaranteed_share = 0.3
[[tiers]]
name = "standard"
max_latency_ms = 2000
guaranteed_share = 0.2
[classify]
default_tier = "standard"
registry = "devices.csv"
device_id = "topic"
device_topic_level = 1
[[classify.rules]]
match = { topic = "medical/#" }
tier = "critical"
device_class = "medical"
[[classify.rules]]
match = { topic = "premium/#" }
tier = "premium"
[schemas.medical.fields]
heart_rate = { type = "number", min = 0, max = 300 }
[[anomaly.detectors]]
name = "heart-rate-out-of-range"
kind = "threshold"
field = "heart_rate"
above = 180
severity = "critical"
device_class = "medical"
suppress_s = 0
[anomaly.escalation.critical]
mqtt = false
audit = false
[maintenance]
critical_headroom = 0.5
[sinks.lake]
type = "jsonl"
options = { dir = "lake" }
[[pipelines]]
name = "main"
stages = [{ type = "decode" }, { type = "validate" }, { type = "enrich" },
          { type = "route", sinks = ["lake"] }]
"""

# The peer: the same work through one FIFO lane, no triage.
FIFO_CONFIG = SCENARIO_CONFIG.split("[[tiers]]")[0] + """
[[tiers]]
name = "standard"
max_latency_ms = 2000
[classify]
default_tier = "standard"
registry = "devices.csv"
device_id = "topic"
device_topic_level = 1
[[classify.rules]]
match = { topic = "medical/#" }
device_class = "medical"
[schemas.medical.fields]
heart_rate = { type = "number", min = 0, max = 300 }
[sinks.lake]
type = "jsonl"
options = { dir = "lake" }
[[pipelines]]
name = "main"
stages = [{ type = "decode" }, { type = "validate" }, { type = "enrich" },
          { type = "route", sinks = ["lake"] }]
"""


# ------------------------------------------------------------------------ load generation


class _Stream:
    """One paced MQTT 3.1.1 connection cycling through a pool of pre-encoded PUBLISH frames."""

    def __init__(self, name: str, frames: list[bytes], rate: float, qos: int) -> None:
        self.name = name
        self.rate = rate
        self.qos = qos
        self.blob = b"".join(frames)
        self.offsets = [0]
        for frame in frames:
            self.offsets.append(self.offsets[-1] + len(frame))
        self.sent = 0
        self.acks = 0

    async def run(self, port: int, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode(Connect(protocol_level=4, client_id=f"scenario-{self.name}",
                                    clean_start=True, keepalive=0, username=None,
                                    password=None, will=None, properties={}), 4))
        connack = await reader.readexactly(4)
        if connack[3] != 0:
            raise GatewayError(f"scenario client {self.name} refused: CONNACK {connack.hex()}")
        acks = asyncio.create_task(self._count_acks(reader))
        pool = len(self.offsets) - 1
        view = memoryview(self.blob)
        begin = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - begin) * self.rate) + 1
            if self.sent < due:  # at most one pool's worth per tick
                first = self.sent % pool
                n = min(due - self.sent, pool - first)
                writer.write(view[self.offsets[first]:self.offsets[first + n]])
                self.sent += n
            if writer.transport.get_write_buffer_size() > 1024 * 1024:
                await writer.drain()  # the gateway pushes back: wait, as a device would
            await asyncio.sleep(0.001)
        acks.cancel()
        writer.close()

    async def _count_acks(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            self.acks += data.count(b"\x40\x02")  # PUBACKs (close enough for a progress count)


def _frames(topic_of: Any, payload_of: Any, count: int, qos: int) -> list[bytes]:
    out = []
    for k in range(count):
        out.append(encode(Publish(topic=topic_of(k), payload=payload_of(k), qos=qos,
                                  retain=False, dup=False,
                                  packet_id=(k % 65535) + 1 if qos else None,
                                  properties={}), 4))
    return out


def _streams(capacity: float, overload: float, anomaly_rate: float, connections: int,
             ) -> list[_Stream]:
    rng = random.Random(7)
    streams = []
    standard_rate = capacity * overload / connections
    for c in range(connections):
        streams.append(_Stream(
            f"standard-{c}",
            _frames(lambda k, c=c: f"telemetry/dev-{c * TOPICS + k % TOPICS:07d}/t",
                    lambda k: b'{"t":%d,"hum":41.5}' % (k % 40), 20_000, 0),
            standard_rate, 0))
    streams.append(_Stream(
        "premium",
        _frames(lambda k: f"premium/dev-{100_000 + k % TOPICS:07d}/t",
                lambda k: b'{"t":%d,"hum":41.5}' % (k % 40), 20_000, 1),
        capacity * 0.03, 1))
    streams.append(_Stream(
        "critical",
        _frames(lambda k: f"medical/dev-{200_000 + k % TOPICS:07d}/vitals",
                lambda k: b'{"heart_rate":%d,"spo2":98}' % rng.randint(60, 100), 20_000, 1),
        capacity * 0.02, 1))
    streams.append(_Stream(
        "anomalies",
        _frames(lambda k: f"medical/dev-{300_000 + k % TOPICS:07d}/vitals",
                lambda k: b'{"heart_rate":%d,"spo2":91}' % rng.randint(190, 240), 5_000, 1),
        anomaly_rate, 1))
    return streams


def _registry(path: Path) -> None:
    # Tiers come from the rules (by topic), so the FIFO peer can read the same file.
    with open(path, "w", encoding="utf-8") as out:
        out.write("device,tenant,tier,device_class,region,site\n")
        for i in range(REGISTRY_DEVICES):
            out.write(f"dev-{i:07d},tenant-{i % 200:03d},,sensor,local,site-{i % 5000:05d}\n")


# ------------------------------------------------------------------------ measurement


@dataclass
class Snapshot:
    latency: dict[str, dict[float, float]] = field(default_factory=dict)  # tier → le → count
    detect: dict[float, float] = field(default_factory=dict)
    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # (metric, label)


def _snapshot(admin: str) -> Snapshot:
    snap = Snapshot()
    for family in text_string_to_metric_families(_get(f"{admin}/metrics").decode()):
        for s in family.samples:
            if s.name == "iotgw_processing_latency_seconds_bucket":
                snap.latency.setdefault(s.labels["tier"], {})[float(s.labels["le"])] = s.value
            elif (s.name == "iotgw_anomaly_detect_latency_seconds_bucket"
                  and s.labels.get("path") == "all"):
                snap.detect[float(s.labels["le"])] = s.value
            elif s.name == "iotgw_wal_commit_latency_seconds_bucket":
                snap.latency.setdefault("(wal commit)", {})[float(s.labels["le"])] = s.value
            elif s.name == "iotgw_loop_lag_seconds_bucket":
                snap.latency.setdefault("(loop lag)", {})[float(s.labels["le"])] = s.value
            elif s.name == "iotgw_messages_processed_total":
                snap.counters[("processed", s.labels["tier"])] = s.value
            elif s.name == "iotgw_messages_shed_total":
                key = ("shed", s.labels["tier"])
                snap.counters[key] = snap.counters.get(key, 0.0) + s.value
            elif s.name in ("iotgw_maintenance_steps_total", "iotgw_preemptions_total",
                            "iotgw_anomalies_total", "iotgw_ingest_pauses_total"):
                key = (s.name, "")
                snap.counters[key] = snap.counters.get(key, 0.0) + s.value
    return snap


@dataclass
class Phase:
    """What happened between two snapshots, added up over the phases of one kind."""

    seconds: float = 0.0
    latency: dict[str, dict[float, float]] = field(default_factory=dict)
    detect: dict[float, float] = field(default_factory=dict)
    counters: dict[tuple[str, str], float] = field(default_factory=dict)

    def add(self, before: Snapshot, after: Snapshot, seconds: float) -> None:
        self.seconds += seconds
        for tier, buckets in after.latency.items():
            mine = self.latency.setdefault(tier, {})
            prior = before.latency.get(tier, {})
            for le, n in buckets.items():
                mine[le] = mine.get(le, 0.0) + n - prior.get(le, 0.0)
        for le, n in after.detect.items():
            self.detect[le] = self.detect.get(le, 0.0) + n - before.detect.get(le, 0.0)
        for key, n in after.counters.items():
            self.counters[key] = self.counters.get(key, 0.0) + n - before.counters.get(key, 0.0)

    def rate(self, metric: str, label: str) -> float:
        return self.counters.get((metric, label), 0.0) / self.seconds if self.seconds else 0.0


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """``histogram_quantile``: linear interpolation inside the bucket holding rank q·total;
    milliseconds. None without observations."""
    points = sorted(buckets.items())
    if not points or points[-1][1] <= 0:
        return None
    rank = q * points[-1][1]
    lower, below = 0.0, 0.0
    for le, count in points:
        if count >= rank:
            if math.isinf(le):
                return lower * 1000
            inside = count - below
            fraction = (rank - below) / inside if inside else 1.0
            return (lower + (le - lower) * fraction) * 1000
        lower, below = le, count
    return lower * 1000


# ------------------------------------------------------------------------ the runs


async def _maintenance(admin: str, on: asyncio.Event, stop: asyncio.Event,
                       phase_s: float) -> None:
    """While ``on``: keep a registry-rebuild reservation running; cancel it when off."""
    number = 0
    current: str | None = None
    while not stop.is_set():
        if on.is_set():
            listed = await asyncio.to_thread(_get, f"{admin}/v1/maintenance")
            states = json.loads(listed)["reservations"]
            live = {r["name"]: r for r in states}
            if current is None or live.get(current, {}).get("phase") in (None, "done"):
                number += 1
                current = f"bench-rebuild-{number}"
                body = {"name": current, "task": "registry-rebuild",
                        "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "duration_s": phase_s, "min_slots": 1, "max_slots": 1}
                await asyncio.to_thread(_post, f"{admin}/v1/maintenance", body)
        elif current is not None:
            await asyncio.to_thread(_delete, f"{admin}/v1/maintenance/{current}")
            current = None
        await asyncio.sleep(0.25)
    if current is not None:
        await asyncio.to_thread(_delete, f"{admin}/v1/maintenance/{current}")


def _post(url: str, body: Any) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def _delete(url: str) -> None:
    request = urllib.request.Request(url, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError:
        pass  # already over


async def _calibrate(port: int, admin: str, seconds: float, connections: int) -> float:
    """Messages a second the gateway processes from a standard-tier QoS 0 flood."""
    streams = [_Stream(f"calibrate-{c}",
                       _frames(lambda k, c=c: f"telemetry/dev-{c * TOPICS + k % TOPICS:07d}/t",
                               lambda k: b'{"t":%d,"hum":41.5}' % (k % 40), 20_000, 0),
                       rate=1e7, qos=0) for c in range(connections)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(port, stop)) for s in streams]
    await asyncio.sleep(1.0)  # warm up
    before = await asyncio.to_thread(_snapshot, admin)
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(_snapshot, admin)
    elapsed = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*tasks)
    done = after.counters.get(("processed", "standard"), 0.0) - before.counters.get(
        ("processed", "standard"), 0.0)
    await asyncio.sleep(2.0)  # let the backlog drain
    return done / elapsed


async def _scenario(workdir: Path, label: str, config: str, capacity: float | None,
                    args: ScenarioArgs, maintenance: bool) -> tuple[float, dict[str, Phase]]:
    """Run the scenario at ``capacity``; without one, measure the capacity instead."""
    rundir = workdir / label
    rundir.mkdir()
    (rundir / "devices.csv").symlink_to(workdir / "devices.csv")
    (rundir / "scenario.toml").write_text(config)
    mqtt_port, admin_port = _free_port(), _free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", "scenario.toml",
         "--mqtt-listen", f"127.0.0.1:{mqtt_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
         "--coap-listen", "127.0.0.1:0"],
        cwd=rundir)
    try:
        await _wait_port(admin_port, proc, "the gateway", 120.0)  # loads a 1M-device registry
        await _wait_port(mqtt_port, proc, "the gateway", 120.0)
        if capacity is None:  # measure it: no shedding, back-pressure only
            capacity = await _calibrate(mqtt_port, admin, args.calibrate_s, args.connections)
            return capacity, {}
        streams = _streams(capacity, args.overload, args.anomaly_rate, args.connections)
        stop, on = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(s.run(mqtt_port, stop)) for s in streams]
        if maintenance:
            tasks.append(asyncio.create_task(_maintenance(admin, on, stop, args.phase_s)))
        phases = {"maintenance off": Phase(), "maintenance on": Phase()}
        await asyncio.sleep(args.warmup_s)
        for number in range(args.phases):
            active = maintenance and number % 2 == 1
            if active:
                on.set()
                await asyncio.sleep(1.5)  # the planner grants at its next tick
            else:
                on.clear()
                await asyncio.sleep(0.5)
            before, start = await asyncio.to_thread(_snapshot, admin), time.perf_counter()
            sent = {s.name: s.sent for s in streams}
            await asyncio.sleep(args.phase_s)
            after = await asyncio.to_thread(_snapshot, admin)
            for stream in streams:  # what the load generator managed to offer
                tier = stream.name.split("-")[0]
                key = ("offered", tier)
                after.counters[key] = after.counters.get(key, 0.0) + stream.sent - sent[
                    stream.name]
            phases["maintenance on" if active else "maintenance off"].add(
                before, after, time.perf_counter() - start)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return capacity, phases


@dataclass
class ScenarioArgs:
    overload: float = 2.0
    anomaly_rate: float = 20.0
    connections: int = 4
    warmup_s: float = 3.0
    phase_s: float = 5.0
    phases: int = 8
    calibrate_s: float = 4.0
    peer: bool = True


def run_scenario(args: ScenarioArgs, as_json: bool) -> None:
    async def main() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="iotgw-scenario-") as tmp:
            workdir = Path(tmp)
            _registry(workdir / "devices.csv")
            capacity, _ = await _scenario(
                workdir, "calibration",
                SCENARIO_CONFIG.replace("shed_above = 20000", "shed_above = 60000"), None,
                args, maintenance=False)
            _, phases = await _scenario(workdir, "tiered", SCENARIO_CONFIG, capacity, args,
                                        maintenance=True)
            fifo = None
            if args.peer:
                _, fifo = await _scenario(workdir, "fifo", FIFO_CONFIG, capacity, args,
                                          maintenance=False)
            return {"capacity": capacity, "phases": phases, "fifo": fifo}

    result = uvloop.run(main())
    report = _report(result["capacity"], result["phases"], result["fifo"], args)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, args)


def _tier_figures(phase: Phase, tier: str) -> dict[str, float | None]:
    buckets = phase.latency.get(tier, {})
    return {"p50_ms": quantile(buckets, 0.5), "p99_ms": quantile(buckets, 0.99),
            "p999_ms": quantile(buckets, 0.999), "max_ms": quantile(buckets, 1.0),
            "offered_per_s": phase.rate("offered", tier),
            "processed_per_s": phase.rate("processed", tier),
            "shed": phase.counters.get(("shed", tier), 0.0)}


def _report(capacity: float, phases: dict[str, Phase], fifo: dict[str, Phase] | None,
            args: ScenarioArgs) -> dict[str, Any]:
    report: dict[str, Any] = {"capacity_msg_s": capacity, "cpus": os.cpu_count(),
                              "offered_standard_msg_s": capacity * args.overload, "runs": {}}
    for name, phase in phases.items():
        processed = sum(v for (m, _), v in phase.counters.items() if m == "processed")
        report["runs"][f"tiered, {name}"] = {
            "seconds": phase.seconds,
            "tiers": {t: _tier_figures(phase, t)
                      for t in (*TIERS, "anomaly-critical", "(wal commit)", "(loop lag)")},
            "standard_share": (phase.counters.get(("processed", "standard"), 0.0) / processed
                               if processed else 0.0),
            "detect_p50_ms": quantile(phase.detect, 0.5),
            "detect_p99_ms": quantile(phase.detect, 0.99),
            "anomalies": phase.counters.get(("iotgw_anomalies_total", ""), 0.0),
            "maintenance_slices": phase.counters.get(("iotgw_maintenance_steps_total", ""), 0.0),
            "reads_paused": phase.counters.get(("iotgw_ingest_pauses_total", ""), 0.0),
        }
    if fifo is not None:
        phase = fifo["maintenance off"]
        report["runs"]["fifo peer"] = {"seconds": phase.seconds,
                                       "tiers": {"all": _tier_figures(phase, "standard")}}
    return report


def _ms(value: float | None) -> str:
    return f"{value:8.2f}" if value is not None else "       -"


def _print(report: dict[str, Any], args: ScenarioArgs) -> None:
    capacity = report["capacity_msg_s"]
    print(f"iot-gateway bench-scenario: {report['cpus']} CPUs; processing capacity "
          f"{capacity:,.0f} msg/s (standard QoS 0, full pipeline, 1,000,000-device registry)")
    print(f"offered: standard {capacity * args.overload:,.0f} msg/s QoS 0 ({args.overload:g} × "
          f"capacity), premium {capacity * 0.03:,.0f} and critical {capacity * 0.02:,.0f} "
          f"msg/s QoS 1, anomalies {args.anomaly_rate:g}/s; {args.phases} phases of "
          f"{args.phase_s:g} s, maintenance (registry-rebuild) in every second one")
    for run, figures in report["runs"].items():
        print(f"\n{run} ({figures['seconds']:.1f} s measured)")
        print(f"  {'lane':<17}{'p50 ms':>9}{'p99 ms':>9}{'offered/s':>11}{'processed/s':>13}"
              f"{'shed':>11}")
        for tier, f in figures["tiers"].items():
            print(f"  {tier:<17}{_ms(f['p50_ms'])} {_ms(f['p99_ms'])}"
                  f"{f['offered_per_s']:>11,.0f}{f['processed_per_s']:>13,.0f}{f['shed']:>11,.0f}")
        if "detect_p99_ms" in figures:
            print(f"  anomaly detection p50 {_ms(figures['detect_p50_ms']).strip()} ms, p99 "
                  f"{_ms(figures['detect_p99_ms']).strip()} ms ({figures['anomalies']:.0f} "
                  f"anomalies); standard's share of dispatches {figures['standard_share']:.2f}; "
                  f"maintenance slices {figures['maintenance_slices']:,.0f}; reads paused "
                  f"{figures['reads_paused']:.0f} times")
    runs = report["runs"]
    off, on = runs.get("tiered, maintenance off"), runs.get("tiered, maintenance on")
    if off is None or on is None:
        return
    print("\ntargets")

    def check(name: str, value: float | None, ok: bool) -> None:
        shown = f"{value:.2f}" if value is not None else "-"
        print(f"  {'met ' if ok else 'MISSED'} {name}: {shown}")

    for label, run in (("off", off), ("on", on)):
        crit = run["tiers"]["critical"]["p99_ms"]
        check(f"critical p99 ≤ 50 ms (maintenance {label})", crit,
              crit is not None and crit <= 50)
        prem, std = run["tiers"]["premium"]["p50_ms"], run["tiers"]["standard"]["p50_ms"]
        ratio = std / prem if prem and std else None
        check(f"standard p50 / premium p50 ≥ 3 (maintenance {label})", ratio,
              ratio is not None and ratio >= 3)
        detect = run["detect_p99_ms"]
        check(f"anomaly detection p99 ≤ 10 ms (maintenance {label})", detect,
              detect is not None and detect <= 10)
        share = run["standard_share"]
        check(f"standard share of dispatches ≥ 0.2 (maintenance {label})", share, share >= 0.2)
    c_off, c_on = off["tiers"]["critical"]["p99_ms"], on["tiers"]["critical"]["p99_ms"]
    change = c_on / c_off if c_off and c_on else None
    check("critical p99 with maintenance / without ≤ 1.10", change,
          change is not None and change <= 1.10)
    fifo = runs.get("fifo peer")
    if fifo is not None and c_off:
        p99 = fifo["tiers"]["all"]["p99_ms"]
        if p99:
            print(f"  ratio fifo p99 / tiered critical p99: {p99 / c_off:,.1f} ×")
