"""End to end over real loopback sockets with independent clients: paho-mqtt (3.1.1 and 5),
amqtt's client and mosquitto_pub, through classification and dispatch into the data lake."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import RunningGateway

pytestmark = pytest.mark.integration


def lake_records(root: Path) -> list[dict]:
    records = []
    for path in sorted((root / "lake").rglob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def wait_records(gw: RunningGateway, root: Path, n: int) -> list[dict]:
    gw.wait_processed(n)
    gw.wait_for(lambda: len(lake_records(root)) >= n)  # the sink flushes on a ~1 s timer
    return lake_records(root)


def paho_client(version: int, client_id: str, username: str | None = None) -> paho.Client:
    protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if username:
        client.username_pw_set(username, "x")
    return client


def connect(client: paho.Client, port: int) -> None:
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props: connected.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    assert connected.wait(5), "no CONNACK"


@pytest.mark.parametrize("version", [4, 5])
def test_paho_publishes_reach_the_lake_with_their_tier(
        gateway: RunningGateway, tmp_path: Path, version: int) -> None:
    client = paho_client(version, f"pump-{version}")
    connect(client, gateway.mqtt_port)
    infos = [
        client.publish("medical/pump-7/vitals", b'{"heart_rate": 72}', qos=1),
        client.publish("factory/line-1/temp", b'{"t": 21.5}', qos=0),
        client.publish("bulk/archive", b"\x00\x01binary", qos=2),
    ]
    for info in infos:
        info.wait_for_publish(5)
        assert info.is_published()
    records = {r["topic"]: r for r in wait_records(gateway, tmp_path, 3)}
    client.loop_stop()
    client.disconnect()

    vitals = records["medical/pump-7/vitals"]
    assert vitals["tier"] == "critical"
    assert vitals["device"] == f"pump-{version}"
    assert vitals["payload"] == {"heart_rate": 72}
    assert vitals["qos"] == 1
    assert vitals["received_at"].endswith("Z")
    assert records["factory/line-1/temp"]["tier"] == "standard"
    binary = records["bulk/archive"]
    assert binary["tier"] == "bulk"
    assert binary["payload_encoding"] == "base64"
    assert base64.b64decode(binary["payload"]) == b"\x00\x01binary"
    # data-lake layout: region=/date=/hour=/part-N.jsonl
    files = list((tmp_path / "lake").rglob("*.jsonl"))
    assert files and all(p.relative_to(tmp_path / "lake").parts[0] == "region=local"
                         for p in files)
    assert all(p.parent.name.startswith("hour=") and p.parent.parent.name.startswith("date=")
               for p in files)


def test_mqtt5_connack_announces_limits_and_username_rule_sets_tier(
        gateway: RunningGateway, tmp_path: Path) -> None:
    client = paho_client(5, "meter-1", username="premium-acme")
    got: dict = {}
    connected = threading.Event()

    def on_connect(c, u, flags, rc, props):  # type: ignore[no-untyped-def]
        got["rc"], got["props"] = rc, props
        connected.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", gateway.mqtt_port)
    client.loop_start()
    assert connected.wait(5)
    assert got["rc"] == 0
    assert got["props"].ReceiveMaximum == 1024
    assert got["props"].MaximumPacketSize == 1048576
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v")]
    client.publish("meters/1", b'{"kwh": 3}', qos=1, properties=props).wait_for_publish(5)
    records = wait_records(gateway, tmp_path, 1)
    client.loop_stop()
    client.disconnect()
    assert records[0]["tier"] == "premium"


def test_subscribe_and_unsubscribe_are_answered(gateway: RunningGateway) -> None:
    client = paho_client(5, "sub-1")
    subscribed, unsubscribed = threading.Event(), threading.Event()
    granted: list = []
    unsub_codes: list = []

    def on_subscribe(c, u, mid, codes, props):  # type: ignore[no-untyped-def]
        granted.extend(codes)
        subscribed.set()

    def on_unsubscribe(c, u, mid, codes, props):  # type: ignore[no-untyped-def]
        unsub_codes.extend(codes)
        unsubscribed.set()

    client.on_subscribe = on_subscribe
    client.on_unsubscribe = on_unsubscribe
    connect(client, gateway.mqtt_port)
    client.subscribe([("alerts/#", 1), ("cmd/+/set", 2)])
    assert subscribed.wait(5)
    assert [c.value for c in granted] == [1, 2]
    client.unsubscribe(["alerts/#", "never/subscribed"])
    assert unsubscribed.wait(5)
    assert [c.value for c in unsub_codes] == [0x00, 0x11]
    client.loop_stop()
    client.disconnect()


def test_amqtt_client_publishes_at_every_qos(gateway: RunningGateway, tmp_path: Path) -> None:
    from amqtt.client import MQTTClient

    async def run() -> None:
        client = MQTTClient(client_id="amqtt-dev", config={"auto_reconnect": False})
        await client.connect(f"mqtt://127.0.0.1:{gateway.mqtt_port}/")
        for qos in (0, 1, 2):
            await client.publish(f"safety/valve-{qos}", f'{{"open": {qos}}}'.encode(), qos=qos)
        await client.disconnect()

    asyncio.run(run())
    records = {r["topic"]: r for r in wait_records(gateway, tmp_path, 3)}
    assert {r["qos"] for r in records.values()} == {0, 1, 2}
    assert all(r["tier"] == "critical" and r["device"] == "amqtt-dev" for r in records.values())


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients missing")
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_is_answered(gateway: RunningGateway, tmp_path: Path, qos: int) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gateway.mqtt_port), "-V", "mqttv5",
         "-i", "mosq-dev", "-q", str(qos), "-t", "telemetry/mosq", "-m", '{"v": 1}'],
        check=True, timeout=10)
    records = wait_records(gateway, tmp_path, 1)
    assert records[0]["device"] == "mosq-dev" and records[0]["payload"] == {"v": 1}


def test_many_messages_from_many_clients_are_all_processed(gateway: RunningGateway) -> None:
    clients = [paho_client(4, f"fleet-{i}") for i in range(5)]
    for c in clients:
        connect(c, gateway.mqtt_port)
    infos = [c.publish(f"fleet/{i}/t", b'{"n": %d}' % k, qos=1)
             for i, c in enumerate(clients) for k in range(400)]
    for info in infos:
        info.wait_for_publish(10)
    gateway.wait_processed(2000)
    for c in clients:
        c.loop_stop()
        c.disconnect()
    assert gateway.stats()["received"] == 2000
    assert 'iotgw_messages_processed_total{tier="standard"} 2000.0' in gateway.metrics()


PAYLOAD_RULE = """
[[classify.rules]]
match = { topic = "factory/#", payload = { alarm = true } }
tier = "critical"
"""


def test_a_payload_field_rule_classifies_each_message(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    # Rules are tried in order; the built-in rules come first and none matches factory/#.
    gw = gateway_factory(PAYLOAD_RULE)
    client = paho_client(4, "press-1")
    connect(client, gw.mqtt_port)
    for payload in (b'{"alarm": true, "p": 7}', b'{"alarm": false}', b"not json"):
        client.publish("factory/press-1", payload, qos=1).wait_for_publish(5)
    records = wait_records(gw, tmp_path, 3)
    client.loop_stop()
    client.disconnect()
    tiers = {json.dumps(r["payload"]): r["tier"] for r in records}
    assert tiers == {'{"alarm": true, "p": 7}': "critical", '{"alarm": false}': "standard",
                     json.dumps(base64.b64encode(b"not json").decode()): "standard"}
