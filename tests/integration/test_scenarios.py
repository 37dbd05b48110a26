"""The seed's critical scenarios, end to end on real sockets.

1. Mixed-priority traffic at peak load: critical and premium traffic beside a standard
   flood far beyond capacity is all processed, fast, in tier order, while standard still
   gets its guaranteed share.
2. A critical anomaly during a maintenance window: detected at once, processed ahead of
   the routine backlog, not delayed by the window, which keeps running.
3. Anomalies beyond processing capacity: most severe first, routine work keeps its floor,
   nothing acknowledged is lost.
4. Total ingestion beyond capacity: graceful degradation. QoS 0 of the lower tiers is shed
   first and counted (metrics and audit), critical never; reading pauses instead of the
   backlog growing without bound; QoS 1 is either acknowledged and processed, or refused
   explicitly.

Processing capacity is made finite and known with a pipeline stage that costs a fixed time
per message (``WorkStage``, a stage plugin registered for the test), so that "more than the
gateway can process" holds on any machine without flooding it with millions of messages.
Assertions compare tiers and lanes with one another (orderings, ratios) with generous
margins, never absolute timings tight enough to flake.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from gateway.envelope import Envelope
from gateway.pipeline import STAGES
from policies.maintenance import TASKS
from tests.conftest import DEFAULT_TOML, RunningGateway
from tests.raw_mqtt import connect_frame, publish_frame

pytestmark = pytest.mark.integration

PROCESSED = "iotgw_messages_processed_total"
SHED = "iotgw_messages_shed_total"
LATENCY = "iotgw_processing_latency_seconds"


# ---------------------------------------------------------------------------- plugins


class WorkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    us_per_message: float = 100.0


class WorkStage:
    """Real work has a cost: this stage takes ``us_per_message`` per message (sleeping, so
    that the test's own threads keep running), which bounds the gateway's capacity."""

    Options: ClassVar[type[msgspec.Struct]] = WorkOptions

    def __init__(self, options: WorkOptions, context: Any) -> None:
        self.seconds = options.us_per_message / 1e6

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        time.sleep(self.seconds * len(batch))
        return batch


SLICES: list[float] = []
"""``time.monotonic()`` of every slice the busy maintenance task ran."""


class BusyTask:
    """A maintenance task with always more to do: each slice takes ``slice_ms``."""

    name = "scenario-busy"

    def __init__(self, options: dict[str, Any]) -> None:
        self.slice_s = float(options.get("slice_ms", 1.0)) / 1000

    def steps(self, context: Any) -> Generator[float | None, None, None]:
        while True:
            time.sleep(self.slice_s)
            SLICES.append(time.monotonic())
            yield None


@pytest.fixture(autouse=True)
def _plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(STAGES, "scenario-work", WorkStage)
    monkeypatch.setitem(TASKS, "scenario-busy", BusyTask)
    SLICES.clear()
    yield
    SLICES.clear()


def config(*, us_per_message: float, batch_size: int = 32, slots: int = 1,
           shed_above: int = 150_000, max_queued: int = 200_000,
           resume_queued: int = 100_000, max_unretired: int = 1_000_000) -> str:
    """The default config with a costly pipeline and the given dispatch settings."""
    text = DEFAULT_TOML
    for old, new in (
        ('{ type = "enrich" },',
         f'{{ type = "enrich" }},\n  {{ type = "scenario-work", '
         f'us_per_message = {us_per_message} }},'),
        ("batch_size = 512", f"batch_size = {batch_size}"),
        ("slots = 4", f"slots = {slots}"),
        ("shed_above = 150000", f"shed_above = {shed_above}"),
        ("max_queued = 200000", f"max_queued = {max_queued}"),
        ("resume_queued = 100000", f"resume_queued = {resume_queued}"),
        ("max_unretired = 1000000", f"max_unretired = {max_unretired}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    # A node of fixed capacity: what these scenarios overload (elasticity has its own tests).
    return text + f"\n[scaling]\nmin_slots = {slots}\nmax_slots = {slots}\n"


# ------------------------------------------------------------------------- MQTT wire


def publish(topic: str, payload: dict[str, Any], qos: int = 0, packet_id: int = 0) -> bytes:
    """One MQTT 3.1.1 PUBLISH packet of a JSON payload."""
    return publish_frame(topic, json.dumps(payload).encode(), qos, packet_id)


def connect(port: int, client_id: str, username: str | None = None) -> socket.socket:
    """An MQTT 3.1.1 connection (clean session), CONNACK received."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(connect_frame(client_id, username=username))
    assert s.recv(4) == b"\x20\x02\x00\x00"
    return s


def read_through(s: socket.socket) -> None:
    """Return once the gateway has read everything sent on ``s`` before (PINGREQ answered)."""
    s.sendall(b"\xc0\x00")
    assert _recv_exactly(s, 2) == b"\xd0\x00"


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def flood(port: int, client_id: str, frames: bytes, username: str | None = None,
          ) -> threading.Thread:
    """Send ``frames`` on a connection of their own, in a thread; joined: all read."""
    def run() -> None:
        with connect(port, client_id, username) as s:
            s.sendall(frames)
            read_through(s)

    thread = threading.Thread(target=run, name=f"flood-{client_id}", daemon=True)
    thread.start()
    return thread


def paced(port: int, client_id: str, chunks: list[bytes], period: float,
          username: str | None = None) -> threading.Thread:
    """Send one chunk every ``period`` seconds on a connection of its own, in a thread."""
    def run() -> None:
        with connect(port, client_id, username) as s:
            due = time.monotonic()
            for chunk in chunks:
                s.sendall(chunk)
                due += period
                time.sleep(max(0.0, due - time.monotonic()))
            read_through(s)

    thread = threading.Thread(target=run, name=f"paced-{client_id}", daemon=True)
    thread.start()
    return thread


def send_through(s: socket.socket, frames: bytes) -> threading.Thread:
    """Send ``frames`` on an open connection, in a thread; joined: all read, then closed."""
    def run() -> None:
        with s:
            s.sendall(frames)
            read_through(s)

    thread = threading.Thread(target=run, name="send-through", daemon=True)
    thread.start()
    return thread


class AckCounter:
    """Reads the PUBACKs of an MQTT 3.1.1 connection in a thread."""

    def __init__(self, s: socket.socket) -> None:
        self.socket = s
        self.acked: list[int] = []
        self.thread = threading.Thread(target=self._run, name="pubacks", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = self.socket.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(buf) and buf[i] & 0x80:
                    length |= (buf[i] & 0x7F) << shift
                    shift += 7
                    i += 1
                if i >= len(buf):
                    break
                length |= buf[i] << shift
                end = i + 1 + length
                if len(buf) < end:
                    break
                if buf[0] >> 4 == 4:  # PUBACK
                    self.acked.append(struct.unpack_from("!H", buf, i + 1)[0])
                del buf[:end]

    def wait(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, f"{len(self.acked)} of {count} acknowledged"
            time.sleep(0.02)


def publish_v5(port: int, client_id: str, topic: str, count: int,
               ) -> tuple[set[int], set[int]]:
    """QoS 1 messages ``{"seq": 0..count-1}`` from an MQTT 5 client, in bursts; returns the
    (acknowledged, refused) sequence numbers once every one of them was answered."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    answers: list[tuple[int, bool]] = []
    client.on_publish = lambda c, u, mid, rc, props: answers.append((mid, rc.is_failure))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        seq_of_mid = {}
        for seq in range(count):
            seq_of_mid[client.publish(topic, json.dumps({"seq": seq}), qos=1).mid] = seq
            if seq % 50 == 49:
                time.sleep(0.01)
        deadline = time.monotonic() + 40
        while len(answers) < count:
            assert time.monotonic() < deadline, f"{len(answers)} of {count} answered"
            time.sleep(0.02)
    finally:
        client.loop_stop()
        client.disconnect()
    acked = {seq_of_mid[mid] for mid, failed in answers if not failed}
    refused = {seq_of_mid[mid] for mid, failed in answers if failed}
    return acked, refused


# ------------------------------------------------------------------------ observation


class Scrape:
    """One scrape of /metrics."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over the series matching ``labels`` (any value of the other labels)."""
        want = set(labels.items())
        return sum(v for (n, lbl), v in self.samples.items() if n == name and want <= lbl)

    def processed(self, tier: str) -> float:
        return self.value(PROCESSED, tier=tier)

    def shed(self, tier: str) -> float:
        return self.total(SHED, tier=tier)

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        want = set(labels.items())
        out = []
        for (n, lbl), v in self.samples.items():
            if n == name + "_bucket" and want <= lbl:
                out.append((float(dict(lbl)["le"]), v))
        return sorted(out)

    def quantile(self, name: str, q: float, **labels: str) -> float:
        """Upper bound of the bucket holding the ``q`` quantile."""
        buckets = self.buckets(name, **labels)
        assert buckets and buckets[-1][1] > 0, f"no observations of {name} {labels}"
        rank = q * buckets[-1][1]
        return next(le for le, cumulative in buckets if cumulative >= rank)

    def latency(self, tier: str, q: float) -> float:
        return self.quantile(LATENCY, q, tier=tier)

    def mean_latency(self, tier: str) -> float:
        count = self.value(LATENCY + "_count", tier=tier)
        assert count, f"no latency observed for {tier}"
        return self.value(LATENCY + "_sum", tier=tier) / count


def scrape(gw: RunningGateway) -> Scrape:
    return Scrape(gw.metrics())


class Sampler:
    """Scrapes /metrics and /v1/stats every ``period`` seconds in a thread."""

    def __init__(self, gw: RunningGateway, period: float = 0.05) -> None:
        self.gw = gw
        self.period = period
        self.samples: list[tuple[float, Scrape, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stats = self.gw.stats()
            self.samples.append((time.monotonic(), scrape(self.gw), stats))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def lake(tmp_path: Path) -> list[dict[str, Any]]:
    """The data lake's records, in the order they were written (complete lines only)."""
    records: list[dict[str, Any]] = []
    for path in sorted((tmp_path / "lake").rglob("*.jsonl")):
        text = path.read_text()
        lines = text.split("\n")[:-1]  # a line still being written is left for later
        records.extend(json.loads(line) for line in lines)
    return records


def lake_until(gw: RunningGateway, tmp_path: Path, count: int) -> list[dict[str, Any]]:
    gw.wait_for(lambda: len(lake(tmp_path)) >= count, timeout=10)  # flushed once a second
    return lake(tmp_path)


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for path in sorted((tmp_path / "audit").glob("*.jsonl")):
        events.extend(json.loads(line) for line in path.read_text().split("\n")[:-1])
    return events


def _nth(items: list[str], value: str, n: int) -> int:
    seen = 0
    for i, item in enumerate(items):
        if item == value:
            seen += 1
            if seen == n:
                return i
    raise AssertionError(f"fewer than {n} of {value!r}")


# -------------------------------------------------------------------------- scenarios


def test_mixed_priority_traffic_at_peak_load(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    """Standard and premium floods far beyond capacity, critical devices reporting beside
    them: critical and premium all processed, in tier order, standard keeps its share."""
    # About 10 000 messages a second; 40 000 arrive at once, and critical ones keep coming.
    gw = gateway_factory(base=config(us_per_message=100))
    standard_n, premium_n, critical_n = 30_000, 10_000, 150
    standard = b"".join(publish(f"plant/line-{i % 50}", {"seq": i}) for i in range(standard_n))
    premium = b"".join(publish(f"fleet/truck-{i % 50}", {"seq": i}) for i in range(premium_n))
    sampler = Sampler(gw)
    floods = [flood(gw.mqtt_port, "standard-flood", standard),
              flood(gw.mqtt_port, "premium-flood", premium, username="premium-fleet")]
    gw.wait_for(lambda: gw.stats()["queued"] > 5_000)
    with connect(gw.mqtt_port, "valve-1") as s:
        for i in range(critical_n):  # about 100 a second, one read each
            s.sendall(publish("safety/valve-1/pressure", {"seq": i, "bar": 3.2}))
            time.sleep(0.01)
        read_through(s)
    for thread in floods:
        thread.join(30)
    gw.wait_processed(standard_n + premium_n + critical_n, timeout=30)
    sampler.stop()
    end = scrape(gw)

    # Everyone's messages were processed; under the shedding threshold nothing was shed.
    assert end.processed("critical") == critical_n
    assert end.processed("premium") == premium_n
    assert end.processed("standard") == standard_n
    assert end.total(SHED) == 0

    # Latency in tier order: critical not held up by the backlog, premium ahead of standard.
    critical_p99, premium_p50 = end.latency("critical", 0.99), end.latency("premium", 0.5)
    standard_p50 = end.latency("standard", 0.5)
    assert critical_p99 <= 0.1, critical_p99  # the critical tier's max_latency_ms
    assert critical_p99 < standard_p50 / 5, (critical_p99, standard_p50)
    # (bucket bounds are coarse in seconds: the means tell apart what one bucket holds)
    assert premium_p50 <= standard_p50, (premium_p50, standard_p50)
    premium_mean, standard_mean = end.mean_latency("premium"), end.mean_latency("standard")
    assert premium_mean < standard_mean, (premium_mean, standard_mean)

    # While both floods were backlogged, standard got its guaranteed share (0.2) of the
    # dispatches, and no more than a share's worth beyond it: premium went first.
    both = [(s.processed("standard"), s.processed("premium")) for _, s, stats in
            sampler.samples if min(stats["lanes"]["standard"], stats["lanes"]["premium"]) > 500]
    assert len(both) >= 2, "the floods were never backlogged together"
    standard_done = both[-1][0] - both[0][0]
    premium_done = both[-1][1] - both[0][1]
    assert standard_done + premium_done >= 1_000, both
    fraction = standard_done / (standard_done + premium_done)
    assert 0.15 <= fraction <= 0.45, (fraction, both)


def _start_now() -> str:
    return (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


RESERVATION = f"""
[[maintenance.reservations]]
name = "index-rebuild"
task = "scenario-busy"
start = "{_start_now()}"
max_defer_s = 86400
duration_s = 120
min_slots = 1
max_slots = 2
options = {{ slice_ms = 1.0 }}
"""


def maintenance(gw: RunningGateway) -> dict[str, Any]:
    body = json.loads(gw.get("/v1/maintenance")[1])
    assert isinstance(body, dict)
    return body


def window_running(gw: RunningGateway) -> bool:
    """The reservation is granted, holds slots, and its task has run."""
    listed = maintenance(gw)["reservations"]
    return bool(listed and listed[0]["phase"] == "running" and listed[0]["task_running"]
                and listed[0]["slots"] >= 1 and SLICES)


def test_critical_anomaly_during_a_maintenance_window(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    """A maintenance window holds dispatcher slots and routine work is backlogged when a
    patient's heart rate spikes: the anomaly is detected at once and processed ahead of
    the backlog; the window neither delays it nor stops for it."""
    gw = gateway_factory(RESERVATION, base=config(us_per_message=100, slots=4))
    gw.wait_for(lambda: window_running(gw), timeout=10)  # granted at the planner's tick
    assert scrape(gw).value("iotgw_maintenance_reserved_slots") >= 1

    standard_n = 25_000
    standard = b"".join(publish(f"plant/line-{i % 50}", {"seq": i}) for i in range(standard_n))
    flooding = flood(gw.mqtt_port, "standard-flood", standard)
    flooding.join(30)  # every routine message is queued before the spike
    gw.wait_for(lambda: gw.stats()["lanes"]["standard"] > 10_000)
    slices_before = len(SLICES)
    with connect(gw.mqtt_port, "monitor-3") as critical, connect(gw.mqtt_port, "pump-7") as pump:
        for i in range(100):  # critical (routine) readings beside the window
            critical.sendall(publish("safety/monitor-3/level", {"seq": i}))
            if i == 50:
                pump.sendall(publish("medical/pump-7/vitals", {"heart_rate": 210}))
                read_through(pump)
            time.sleep(0.01)
        read_through(critical)
        gw.wait_for(lambda: scrape(gw).processed("anomaly-critical") == 1, timeout=5)
        backlog_behind = gw.stats()["lanes"]["standard"]
    mid = scrape(gw)
    slices_during = len(SLICES)
    gw.wait_processed(standard_n + 101, timeout=30)
    end = scrape(gw)

    # Detected on the ingest path, within 10 ms of its first byte.
    assert end.value("iotgw_anomalies_total", severity="critical") == 1
    assert end.value("iotgw_anomaly_detect_latency_seconds_count", path="all") == 1
    assert end.value("iotgw_anomaly_detect_latency_seconds_bucket", path="all", le="0.01") == 1
    # Processed ahead of the routine backlog, within the critical tier's deadline.
    assert backlog_behind > 1_000, "the spike did not overtake the routine backlog"
    anomaly_latency = end.latency("anomaly-critical", 1.0)
    assert anomaly_latency <= 0.1, anomaly_latency
    standard_p50 = end.latency("standard", 0.5)
    assert anomaly_latency < standard_p50 / 5, (anomaly_latency, standard_p50)
    records = lake_until(gw, tmp_path, standard_n + 101)
    spike = next(i for i, r in enumerate(records) if r["device"] == "pump-7")
    assert records[spike]["tier"] == "critical"
    routine_after = sum(1 for r in records[spike:] if r["tier"] == "standard")
    assert routine_after > 1_000, routine_after  # sent before it, processed after it

    # The window went on: its task kept running slices through the spike and the backlog,
    # it was never paused for the anomaly, and critical devices stayed within their deadline.
    assert slices_during > slices_before, "the maintenance task stopped during the spike"
    assert window_running(gw), maintenance(gw)
    assert mid.value("iotgw_maintenance_reserved_slots") >= 1
    assert end.value("iotgw_maintenance_decisions_total", action="pause") == 0
    assert end.value("iotgw_maintenance_steps_total", task="scenario-busy") > 0
    assert end.processed("critical") == 100
    critical_p99 = end.latency("critical", 0.99)
    assert critical_p99 <= 0.1 and critical_p99 < standard_p50 / 5, (critical_p99, standard_p50)
    time.sleep(0.5)
    assert len(SLICES) > slices_during  # and still does


def test_an_idle_gateway_gives_maintenance_its_reserved_slots(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    """With nothing else to do, a granted window's task keeps running: its slices follow
    one another, a drain after the other, not one per planner tick."""
    gw = gateway_factory(RESERVATION)
    gw.wait_for(lambda: window_running(gw), timeout=10)
    before = len(SLICES)
    time.sleep(1.0)
    ran = len(SLICES) - before
    # Slices of 1 ms in 1 or 2 reserved slots per drain: hundreds a second when idle.
    assert ran >= 50, f"{ran} maintenance slices in a second of idle time"


SEVERITIES = """
[[anomaly.detectors]]
name = "boiler-warm"
kind = "threshold"
field = "t"
above = 50
severity = "warning"
topic = "boiler/#"
suppress_s = 0

[[anomaly.detectors]]
name = "boiler-burning"
kind = "threshold"
field = "t"
above = 100
severity = "emergency"
topic = "boiler/#"
suppress_s = 0
"""


def test_anomalies_beyond_processing_capacity(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    """More anomalous readings (QoS 1) than the gateway can process, of two severities, on
    top of a routine backlog: emergencies first, routine work keeps its floor, and every
    acknowledged message is processed."""
    gw = gateway_factory(SEVERITIES, base=config(us_per_message=100))
    routine_n, per_severity = 30_000, 8_000
    routine = b"".join(publish(f"plant/line-{i % 50}", {"seq": i}) for i in range(routine_n))
    flooding = flood(gw.mqtt_port, "standard-flood", routine)
    gw.wait_for(lambda: gw.stats()["lanes"]["standard"] > 5_000)
    sampler = Sampler(gw)
    counters = []
    for client_id, t in (("boiler-warm", 60), ("boiler-burning", 150)):
        s = connect(gw.mqtt_port, client_id)
        counters.append((s, AckCounter(s)))
        frames = b"".join(publish(f"boiler/{client_id}/temp", {"t": t, "seq": i}, qos=1,
                                  packet_id=i + 1) for i in range(per_severity))
        threading.Thread(target=s.sendall, args=(frames,), daemon=True).start()
    for s, acks in counters:
        acks.wait(per_severity)  # the gateway acknowledged them all (durable first) ...
        s.close()
    flooding.join(30)
    gw.wait_processed(routine_n + 2 * per_severity, timeout=30)
    sampler.stop()
    end = scrape(gw)

    # ... and processed them all, each in the lane of its severity.
    assert end.processed("anomaly-emergency") == per_severity
    assert end.processed("anomaly-warning") == per_severity
    assert end.processed("standard") == routine_n
    assert end.value("iotgw_anomalies_total", severity="warning") == 2 * per_severity
    assert end.value("iotgw_anomalies_total", severity="emergency") == per_severity

    # Most severe first: emergencies overtook the warnings sent beside them.
    emergency_p50 = end.latency("anomaly-emergency", 0.5)
    warning_p50 = end.latency("anomaly-warning", 0.5)
    assert emergency_p50 <= warning_p50, (emergency_p50, warning_p50)
    emergency_mean = end.mean_latency("anomaly-emergency")
    warning_mean = end.mean_latency("anomaly-warning")
    assert emergency_mean < warning_mean, (emergency_mean, warning_mean)

    # Anomalies beyond capacity took most of it, but routine work kept its floor (0.2).
    def anomalies(s: Scrape) -> float:
        return s.processed("anomaly-emergency") + s.processed("anomaly-warning")

    beyond = [(s.processed("standard"), anomalies(s)) for _, s, stats in sampler.samples
              if stats["lanes"]["standard"] > 500
              and stats["lanes"]["anomaly-emergency"] + stats["lanes"]["anomaly-warning"] > 500]
    assert len(beyond) >= 2, "the anomalies never exceeded capacity"
    routine_done = beyond[-1][0] - beyond[0][0]
    anomalies_done = beyond[-1][1] - beyond[0][1]
    assert routine_done + anomalies_done >= 1_000, beyond
    fraction = routine_done / (routine_done + anomalies_done)
    assert 0.12 <= fraction <= 0.45, (fraction, beyond)

    # Nothing acknowledged was lost: every reading is in the data lake, once.
    records = lake_until(gw, tmp_path, routine_n + 2 * per_severity)
    for device in ("boiler-warm", "boiler-burning"):
        seqs = Counter(r["payload"]["seq"] for r in records if r["device"] == device)
        assert set(seqs) == set(range(per_severity)) and max(seqs.values()) == 1, device
    order = [r["device"] for r in records if r["device"].startswith("boiler")]
    # Lake order agrees: half the emergencies were written before half the warnings.
    assert (_nth(order, "boiler-burning", per_severity // 2)
            < _nth(order, "boiler-warm", per_severity // 2))


# Field gateways multiplex devices of every tier over one MQTT connection; premium devices
# are known by topic here (the built-in config knows them by MQTT user name).
FLEET_IS_PREMIUM = """
[[classify.rules]]
match = { topic = "fleet/#" }
tier = "premium"
"""
TOPICS = {"critical": "medical/ward-{}/vitals", "premium": "fleet/truck-{}",
          "standard": "plant/line-{}", "bulk": "bulk/meter-{}"}


def rounds(per_round: dict[str, int], count: int, start: int = 0) -> bytes:
    """``count`` rounds of readings, each with ``per_round[tier]`` readings of every tier,
    interleaved; payload ``seq`` numbers the readings of a tier from ``start``."""
    out = []
    for r in range(start, start + count):
        for k in range(max(per_round.values())):
            for tier, n in per_round.items():
                if k < n:
                    seq = r * n + k
                    out.append(publish(TOPICS[tier].format(seq % 50),
                                       {"heart_rate": 70, "seq": seq}))
    return b"".join(out)


def test_total_ingestion_beyond_capacity_degrades_gracefully(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    """Field gateways carrying every tier's devices send, together, far more than the
    gateway can process; then a storm of critical readings; QoS 1 meanwhile. The lower
    tiers' QoS 0 is shed first and counted (metrics and audit), critical never; reading
    pauses rather than the backlog growing with the offered load; QoS 1 is acknowledged
    and processed, or refused explicitly."""
    shed_above, max_queued = 2_000, 20_000
    # At most about 20 000 messages a second; the field gateways offer about 40 000.
    gw = gateway_factory(FLEET_IS_PREMIUM, base=config(
        us_per_message=50, shed_above=shed_above, max_queued=max_queued,
        resume_queued=1_000, max_unretired=200))
    per_round = {"critical": 1, "premium": 3, "standard": 3, "bulk": 3}
    period, rounds_per_chunk, chunks = 0.005, 10, 300  # 1.5 s
    senders = 2
    sent = {tier: n * rounds_per_chunk * chunks * senders for tier, n in per_round.items()}
    frames = [[rounds(per_round, rounds_per_chunk, (g * chunks + j) * rounds_per_chunk)
               for j in range(chunks)] for g in range(senders)]
    storm_n = 30_000
    storm = b"".join(publish("medical/ward-icu/vitals", {"heart_rate": 70, "seq": i})
                     for i in range(storm_n))
    sent["critical"] += storm_n
    storm_socket = connect(gw.mqtt_port, "icu-gateway")  # connected before the overload
    qos1_n = 1_500
    qos1: dict[str, set[int]] = {}

    def publish_qos1() -> None:
        qos1["acked"], qos1["refused"] = publish_v5(gw.mqtt_port, "bulk-meter-q1",
                                                    "bulk/meter-q1", qos1_n)

    sampler = Sampler(gw, period=0.02)
    field = [paced(gw.mqtt_port, f"field-gateway-{g}", frames[g], period)
             for g in range(senders)]
    time.sleep(0.5)
    qos1_thread = threading.Thread(target=publish_qos1, name="qos1", daemon=True)
    qos1_thread.start()
    for thread in field:
        thread.join(30)
        assert not thread.is_alive(), f"{thread.name} was never read to its end"
    before_storm = scrape(gw)
    storming = send_through(storm_socket, storm)
    for thread in (storming, qos1_thread):
        thread.join(40)
        assert not thread.is_alive(), f"{thread.name} was never read to its end"
    acked, refused = qos1["acked"], qos1["refused"]
    gw.wait_for(lambda: not gw.stats()["queued"], timeout=30)
    sampler.stop()
    end = scrape(gw)

    # Lowest tier first; critical never; every QoS 0 message processed or counted as shed.
    shed = {tier: end.shed(tier) for tier in per_round}
    assert shed["critical"] == 0 and end.processed("critical") == sent["critical"]
    assert shed["bulk"] > 0, shed
    assert shed["bulk"] >= shed["standard"] >= shed["premium"], shed
    assert shed["bulk"] > shed["premium"], shed
    assert shed == {tier: before_storm.shed(tier) for tier in per_round}  # QoS 1 never
    for tier in ("premium", "standard"):
        assert end.processed(tier) + shed[tier] == sent[tier], tier
    # bulk also carries the acknowledged QoS 1 messages
    assert end.processed("bulk") + shed["bulk"] == sent["bulk"] + len(acked)
    first_shed = {tier: next((i for i, (_, s, _) in enumerate(sampler.samples)
                              if s.shed(tier) > 0), len(sampler.samples))
                  for tier in per_round}
    assert first_shed["bulk"] <= first_shed["standard"] <= first_shed["premium"], first_shed

    # The shedding is in the audit log too, summarised per tier, the same counts.
    def audited() -> dict[str, float]:
        out: Counter[str] = Counter()
        for event in audit(tmp_path):
            if event["event"] == "shed" and event.get("reason") == "overload":
                out[event["key"]] += event["count"]
        return dict(out)

    gw.wait_for(lambda: audited() == {t: n for t, n in shed.items() if n}, timeout=5)

    # The backlog stayed bounded: the storm was shed or waited in TCP instead of being
    # queued whole.
    peak = max(stats["queued"] for _, _, stats in sampler.samples)
    assert peak < max_queued + storm_n / 2, peak

    # QoS 1 under overload: every message answered; the acknowledged ones processed, once;
    # the others refused explicitly (MQTT 5: 0x97), and counted.
    assert acked | refused == set(range(qos1_n)) and not acked & refused
    assert acked and refused, (len(acked), len(refused))
    assert end.value("iotgw_messages_refused_total", protocol="mqtt",
                     reason="quota_exceeded") == len(refused)
    records = lake_until(gw, tmp_path, int(sum(end.processed(t) for t in per_round)))
    seqs = Counter(r["payload"]["seq"] for r in records if r["device"] == "bulk-meter-q1")
    assert set(seqs) == acked and max(seqs.values()) == 1


def test_devices_connecting_during_back_pressure_are_held_back_too(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    """Devices (re)connecting in the middle of an overload are paused like the others: the
    backlog stays bounded whenever a connection was opened, and nothing sent is lost."""
    max_queued = 8_000
    gw = gateway_factory(base=config(us_per_message=100, shed_above=2_000,
                                     max_queued=max_queued, resume_queued=1_000))
    first_n, second_n = 12_000, 20_000
    first = b"".join(publish("medical/ward-1/vitals", {"seq": i}) for i in range(first_n))
    second = b"".join(publish("medical/ward-2/vitals", {"seq": i}) for i in range(second_n))
    errors: list[BaseException] = []

    def send(client_id: str, frames: bytes) -> threading.Thread:
        def run() -> None:
            try:
                with connect(gw.mqtt_port, client_id) as s:
                    s.sendall(frames)
                    read_through(s)
            except (OSError, AssertionError) as err:
                errors.append(err)

        thread = threading.Thread(target=run, name=client_id, daemon=True)
        thread.start()
        return thread

    flooding = send("ward-1", first)
    gw.wait_for(lambda: scrape(gw).value("iotgw_ingest_paused") == 1, timeout=10)
    late = send("ward-2", second)  # connects while reading is paused
    peak = 0
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        peak = max(peak, gw.stats()["queued"])
        time.sleep(0.02)
    for thread in (flooding, late):
        thread.join(30)
    gw.wait_for(lambda: not gw.stats()["queued"], timeout=30)
    # Paused, the late connection adds nothing until the backlog is below resume_queued;
    # unpaused, its 20 000 messages are queued at once on top of the first flood's.
    assert peak < max_queued + 10_000, peak
    assert not errors, errors
    assert scrape(gw).processed("critical") == first_n + second_n


def test_a_higher_tier_is_not_shed_while_a_lower_tier_waits(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    """A bulk burst fills the backlog, then a field gateway's critical and premium readings
    arrive: if QoS 0 must be shed, bulk's (the lowest tier) goes first, not premium's."""
    gw = gateway_factory(FLEET_IS_PREMIUM, base=config(
        us_per_message=250, shed_above=5_000, max_queued=8_000, resume_queued=1_000))
    bulk_n = 4_500
    bulk = b"".join(publish(f"bulk/meter-{i % 50}", {"seq": i}) for i in range(bulk_n))
    per_round = {"critical": 1, "premium": 1}
    field = [rounds(per_round, 100, j * 100) for j in range(30)]  # 6 000 readings
    flood(gw.mqtt_port, "bulk-meters", bulk).join(30)  # under shed_above: all queued
    sampler = Sampler(gw, period=0.01)
    # then the field gateway, 40 000 readings a second for 0.15 s
    paced(gw.mqtt_port, "field-gateway", field, 0.005).join(30)
    gw.wait_for(lambda: not gw.stats()["queued"], timeout=30)
    sampler.stop()
    end = scrape(gw)
    assert end.processed("critical") == 3_000
    assert end.processed("premium") + end.shed("premium") == 3_000
    assert end.processed("bulk") + end.shed("bulk") == bulk_n
    # Premium messages are shed only once no bulk QoS 0 is left to shed instead.
    premium_shed, bulk_shed = end.shed("premium"), end.shed("bulk")
    bulk_waiting = next((stats["lanes"]["bulk"] for _, scraped, stats in sampler.samples
                         if scraped.shed("premium") > 0), 0)
    assert premium_shed == 0 or bulk_shed >= premium_shed, (
        f"{premium_shed:.0f} premium messages shed, the first while {bulk_waiting} bulk "
        f"ones waited; {bulk_shed:.0f} bulk shed")
