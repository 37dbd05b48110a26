"""Anomaly triage on the ingest path, on real sockets: detected before queueing, counted,
timed, audited, and processed ahead of every tier."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningGateway
from tests.raw_mqtt import connect_frame, publish_frame

pytestmark = pytest.mark.integration

# The built-in config already flags a medical heart rate above 180 as critical.
DETECTORS = """
[[anomaly.detectors]]
name = "pump-silent"
kind = "silence"
silent_s = 1.0
severity = "warning"
device_class = "medical"
"""


def connect(port: int, client_id: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(connect_frame(client_id))
    assert s.recv(4)[:1] == b"\x20"
    return s


@pytest.fixture
def triage(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory(DETECTORS)


def metric(text: str, key: str) -> float:
    return float(text.split(key + " ")[1].split()[0]) if key + " " in text else 0.0


def test_an_anomalous_reading_is_raised_timed_audited_and_processed_first(
        triage: RunningGateway, tmp_path: Path) -> None:
    with connect(triage.mqtt_port, "pump-7") as s:
        for rate in (70, 72, 71):
            reading = json.dumps({"heart_rate": rate}).encode()
            s.sendall(publish_frame("medical/pump-7/vitals", reading))
        s.sendall(publish_frame("medical/pump-7/vitals", b'{"heart_rate": 210}'))
        # not medical: no triage
        s.sendall(publish_frame("telemetry/other", b'{"heart_rate": 999}'))
        triage.wait_processed(5)
        metrics = triage.metrics()
    assert metric(metrics, 'iotgw_anomalies_total{severity="critical"}') == 1
    assert metric(metrics, 'iotgw_anomaly_detect_latency_seconds_count{path="all"}') == 1
    assert metric(metrics, 'iotgw_messages_processed_total{tier="anomaly-critical"}') == 1
    assert metric(metrics, 'iotgw_messages_processed_total{tier="critical"}') == 3
    # Detected within a few milliseconds of the first byte read (upper bucket bound).
    assert 'iotgw_anomaly_detect_latency_seconds_bucket{le="0.01",path="all"} 1.0' in metrics
    def lake() -> list[dict]:
        return [json.loads(line) for p in (tmp_path / "lake").rglob("*.jsonl")
                for line in p.read_text().splitlines()]

    triage.wait_for(lambda: len(lake()) >= 5)  # the sinks flush about once a second
    records = lake()
    spike = next(r for r in records if r["payload"] == {"heart_rate": 210})
    assert spike["tier"] == "critical"  # its tier is kept; only its place in line changed
    audit = "".join(p.read_text() for p in (tmp_path / "audit").glob("*.jsonl"))
    events = [json.loads(line) for line in audit.splitlines()]
    raised = [e for e in events if e["event"] == "anomaly"]
    assert raised and raised[0]["detector"] == "heart-rate-out-of-range"
    assert raised[0]["device"] == "pump-7" and raised[0]["value"] == 210


def test_a_device_gone_silent_is_raised_by_the_timer(triage: RunningGateway) -> None:
    with connect(triage.mqtt_port, "pump-9") as s:
        s.sendall(publish_frame("medical/pump-9/vitals", b'{"heart_rate": 70}'))
        triage.wait_processed(1)
        deadline = time.monotonic() + 5
        while 'iotgw_anomalies_total{severity="warning"} 1.0' not in triage.metrics():
            assert time.monotonic() < deadline, "silence not detected"
            time.sleep(0.1)


SEVERITIES = """
[[anomaly.detectors]]
name = "warm"
kind = "threshold"
field = "t"
above = 50
severity = "warning"

[[anomaly.detectors]]
name = "burning"
kind = "threshold"
field = "t"
above = 100
severity = "emergency"
"""


def test_anomalies_are_served_in_severity_order_ahead_of_routine_work(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    gw = gateway_factory(SEVERITIES)
    # One write, so that all of it is queued before the dispatcher picks anything.
    with connect(gw.mqtt_port, "boiler") as s:
        s.sendall(publish_frame("medical/routine", b'{"t": 20}')  # critical tier, but routine
                  + publish_frame("plant/boiler", b'{"t": 60}')  # a warning
                  + publish_frame("plant/boiler", b'{"t": 150}'))  # an emergency (and a warning)
        gw.wait_processed(3)

    def lake() -> list[dict]:
        return [json.loads(line) for p in sorted((tmp_path / "lake").rglob("*.jsonl"))
                for line in p.read_text().splitlines()]

    gw.wait_for(lambda: len(lake()) >= 3)
    assert [r["payload"]["t"] for r in lake()] == [150, 60, 20]
