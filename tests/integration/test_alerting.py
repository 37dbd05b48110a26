"""Alerts for raised anomalies, end to end on real sockets: an MQTT subscriber of the gateway
receives ``alerts/<severity>/<device>``, a real HTTP server receives the webhook, the audit
log records them; unacknowledged anomalies escalate until acknowledged on the admin API."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import RunningGateway

pytestmark = pytest.mark.integration


class Hooks:
    """A real HTTP server on a free loopback port recording the JSON POSTed to it."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.put((self.path, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    server = Hooks()
    yield server
    server.close()


class Subscriber:
    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="operator-console")
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, json.loads(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
        self.client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topic_filter, 1)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(5), "no SUBACK"

    def next(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(port: int, client_id: str, topic: str, payloads: list[dict[str, Any]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    for payload in payloads:
        client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def post(gw: RunningGateway, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(gw.admin_url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_critical_anomaly_alerts_subscribers_the_webhook_and_the_audit_log(
        gateway_factory: Callable[..., RunningGateway], hooks: Hooks, tmp_path: Path) -> None:
    gw = gateway_factory(f"""
[anomaly.escalation.critical]
webhook = "{hooks.url}"
webhook_timeout_s = 2.0
""")
    console = Subscriber(gw.mqtt_port, "alerts/#")
    try:
        # The built-in config flags a medical heart rate above 180 as critical.
        publish(gw.mqtt_port, "pump-7", "medical/pump-7/vitals",
                [{"heart_rate": 72}, {"heart_rate": 210}])
        topic, alert = console.next()
    finally:
        console.close()
    assert topic == "alerts/critical/pump-7"
    assert alert["detector"] == "heart-rate-out-of-range" and alert["value"] == 210
    assert alert["device"] == "pump-7" and alert["tier"] == "critical"
    path, hooked = hooks.received.get(timeout=5)
    assert path == "/hook" and hooked == alert
    gw.wait_for(lambda: 'iotgw_alerts_total{channel="webhook",severity="critical"} 1.0'
                in gw.metrics())
    metrics = gw.metrics()
    assert 'iotgw_alerts_total{channel="mqtt",severity="critical"} 1.0' in metrics
    audit = [json.loads(line) for p in (tmp_path / "audit").glob("*.jsonl")
             for line in p.read_text().splitlines()]
    alerts = [e for e in audit if e["event"] == "anomaly.alert"]
    assert len(alerts) == 1 and alerts[0]["device"] == "pump-7"


ESCALATING = """
[[anomaly.detectors]]
name = "boiler-hot"
kind = "threshold"
field = "t"
above = 100
severity = "warning"
suppress_s = 5.0
escalate_after_s = 0.5

[anomaly.escalation.info]
mqtt = false
"""


def test_an_unacknowledged_anomaly_escalates_until_acknowledged(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    gw = gateway_factory(ESCALATING)
    console = Subscriber(gw.mqtt_port, "alerts/+/boiler-1")
    try:
        publish(gw.mqtt_port, "boiler-1", "plant/boiler-1", [{"t": 150}])
        assert console.next()[0] == "alerts/warning/boiler-1"
        # Still too hot, nobody acknowledged: one level up, then the next.
        publish(gw.mqtt_port, "boiler-1", "plant/boiler-1", [{"t": 160}])
        topic, alert = console.next()
        assert topic == "alerts/critical/boiler-1" and alert["escalated"] is True
        assert post(gw, "/v1/anomalies/ack",
                    b'{"device": "boiler-1", "detector": "boiler-hot"}') == (
            200, {"acknowledged": True})
        publish(gw.mqtt_port, "boiler-1", "plant/boiler-1", [{"t": 170}])
        time.sleep(1.5)  # three escalation periods: nothing more once acknowledged
        later = []
        while not console.messages.empty():
            later.append(console.messages.get()[0])
        assert "alerts/emergency/boiler-1" not in later
    finally:
        console.close()


def test_acknowledging_needs_a_raised_anomaly_and_a_valid_request(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    gw = gateway_factory(ESCALATING)
    status, body = post(gw, "/v1/anomalies/ack", b'{"device": "nobody", "detector": "x"}')
    assert status == 404 and "nobody" in body["error"]
    status, body = post(gw, "/v1/anomalies/ack", b'{"device": "d"}')
    assert status == 400 and "detector" in body["error"]
    status, body = post(gw, "/v1/anomalies/ack", b"not json")
    assert status == 400 and "not JSON" in body["error"]
