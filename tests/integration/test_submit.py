"""Messages from protocols other than MQTT enter through ``MQTTIngest.submit``: classified,
durable before they are acknowledged, processed, and routed to MQTT subscribers."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.ingest import Inbound
from tests.conftest import RunningGateway

pytestmark = pytest.mark.integration


def on_loop(gw: RunningGateway, call: Any) -> Any:
    async def run() -> Any:
        return call()

    return asyncio.run_coroutine_threadsafe(run(), gw.loop).result(5)


def test_submitted_messages_are_durable_processed_and_routed(gateway: RunningGateway,
                                                           tmp_path: Path) -> None:
    received: list[paho.MQTTMessage] = []
    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=paho.MQTTv5)
    sub.on_message = lambda c, u, m: received.append(m)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", gateway.mqtt_port)
    sub.loop_start()
    sub.subscribe("coap/#", 1)
    assert subscribed.wait(5)
    results: list[bool] = []
    done = threading.Event()

    def finished(ok: bool) -> None:
        results.append(ok)
        done.set()

    items = [Inbound("pump-3", "coap/pump-3", b'{"heart_rate": 71}', qos=1),
             Inbound("meter-9", "coap/meter-9", b'{"kwh": 2}', qos=0)]
    taken = on_loop(gateway, lambda: gateway.gateway.ingest.submit("coap", items, finished))
    assert taken is True
    assert done.wait(5) and results == [True]
    gateway.wait_processed(2)
    gateway.wait_for(lambda: len(received) == 2)
    assert sorted(m.topic for m in received) == ["coap/meter-9", "coap/pump-3"]
    gateway.wait_for(lambda: any((tmp_path / "lake").rglob("*.jsonl")) and bool(
        "".join(p.read_text() for p in (tmp_path / "lake").rglob("*.jsonl"))))
    gateway.wait_for(lambda: len([line for p in (tmp_path / "lake").rglob("*.jsonl")
                                  for line in p.read_text().splitlines()]) == 2)
    records = [json.loads(line) for p in (tmp_path / "lake").rglob("*.jsonl")
               for line in p.read_text().splitlines()]
    assert {r["protocol"] for r in records} == {"coap"}
    assert {r["device"] for r in records} == {"pump-3", "meter-9"}
    assert 'iotgw_messages_received_total{protocol="coap"} 2.0' in gateway.metrics()
    sub.loop_stop()
    sub.disconnect()


def test_a_draining_gateway_takes_nothing(gateway: RunningGateway) -> None:
    ingest = gateway.gateway.ingest

    def refuse() -> bool:
        ingest.accepting = False
        try:
            return ingest.submit("amqp", [Inbound("d", "amqp/d", b"{}", qos=1)])
        finally:
            ingest.accepting = True

    assert on_loop(gateway, refuse) is False


def test_broker_watchers_see_messages_of_their_filter(gateway: RunningGateway) -> None:
    broker = gateway.gateway.ingest.broker
    seen: list[str] = []
    stop = on_loop(gateway, lambda: broker.watch("commands/+", lambda m: seen.append(m.topic)))
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="ops", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", gateway.mqtt_port)
    pub.loop_start()
    pub.publish("commands/dev-1", b"open", qos=1).wait_for_publish(5)
    pub.publish("other/dev-1", b"x", qos=1).wait_for_publish(5)
    gateway.wait_for(lambda: seen == ["commands/dev-1"])
    on_loop(gateway, stop)
    pub.publish("commands/dev-2", b"open", qos=1).wait_for_publish(5)
    gateway.wait_processed(3)
    assert seen == ["commands/dev-1"]
    pub.loop_stop()
    pub.disconnect()
