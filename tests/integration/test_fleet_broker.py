"""The fleet as one broker, through the real RabbitMQ: MQTT clients of two gateways of one
region (paho-mqtt 5, mosquitto_sub) receive what is published on either, once; and a
subscription binds its filter to the replica's queue, an unsubscribe unbinds it (checked with
a mandatory publish of our own to the fleet exchange)."""

from __future__ import annotations

import queue
import shutil
import subprocess
import time
from collections.abc import Iterator

import aio_pika
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.fleet.codec import MQTT, encode_message
from tests.conftest import RunningGateway
from tests.fleet_helpers import URL, Region, eventually, on_loop, region, run_async

pytestmark = [pytest.mark.integration]
__all__ = ["region"]  # the fixture

WAIT_S = 5.0


class Client:
    """A paho MQTT 5 client collecting what it receives."""

    def __init__(self, gw: RunningGateway, client_id: str) -> None:
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=paho.MQTTv5)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.paho.on_message = lambda c, u, m: self.messages.put(m)
        self.acks: queue.Queue[int] = queue.Queue()
        self.paho.on_subscribe = lambda c, u, mid, codes, p: self.acks.put(mid)
        self.paho.on_unsubscribe = lambda c, u, mid, codes, p: self.acks.put(mid)
        self.paho.connect("127.0.0.1", gw.mqtt_port, keepalive=30)
        self.paho.loop_start()

    def subscribe(self, *filters: str, qos: int = 1) -> None:
        _, mid = self.paho.subscribe([(f, qos) for f in filters])
        assert self.acks.get(timeout=WAIT_S) == mid

    def unsubscribe(self, *filters: str) -> None:
        _, mid = self.paho.unsubscribe(list(filters))
        assert self.acks.get(timeout=WAIT_S) == mid

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def received(self, n: int, timeout: float = WAIT_S) -> list[paho.MQTTMessage]:
        return [self.messages.get(timeout=timeout) for _ in range(n)]

    def nothing_more(self, wait: float = 0.7) -> None:
        time.sleep(wait)
        assert self.messages.empty(), [m.topic for m in list(self.messages.queue)]

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def pair(region: Region) -> Iterator[tuple[RunningGateway, RunningGateway, list[Client]]]:
    clients: list[Client] = []
    a, b = region.start("a"), region.start("b")
    yield a, b, clients
    for c in clients:
        c.close()


def knows(gw: RunningGateway, *filters: str) -> bool:
    """Whether ``gw`` learnt that another replica subscribes to each of ``filters``."""
    def check() -> bool:
        fleet = gw.gateway.fleet
        assert fleet is not None
        known = {f for fs, _ in fleet.bridge.peers.values() for f in fs}
        return set(filters) <= known

    return on_loop(gw, check)


def bound(gw: RunningGateway) -> set[str]:
    def get() -> set[str]:
        assert gw.gateway.fleet is not None
        return set(gw.gateway.fleet.bridge.bound)

    return on_loop(gw, get)


def fleet_messages(gw: RunningGateway, direction: str) -> float:
    for line in gw.metrics().splitlines():
        if line.startswith(f'iotgw_fleet_messages_total{{direction="{direction}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_subscriber_on_one_replica_receives_what_is_published_on_another(
        pair: tuple[RunningGateway, RunningGateway, list[Client]]) -> None:
    a, b, clients = pair
    sub = Client(b, "sub-on-b")
    local = Client(a, "sub-on-a")
    pub = Client(a, "pub-on-a")
    clients += [sub, local, pub]
    sub.subscribe("commands/dev-1", "sensors/+/temp", "fleet/#")
    local.subscribe("commands/#")
    eventually(lambda: knows(a, "commands/dev-1", "sensors/+/temp", "fleet/#"),
               what="A knows B's subscriptions")
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.ResponseTopic = "replies/dev-1"
    props.CorrelationData = b"\x00\x01corr"
    props.UserProperty = [("k", "v"), ("k", "w")]
    props.MessageExpiryInterval = 3600
    pub.publish("commands/dev-1", b'{"set": 1}', properties=props)
    pub.publish("sensors/s-9/temp", b"21.5")
    pub.publish("sensors/s-9/humidity", b"40")  # nobody subscribes: never leaves A
    pub.publish("fleet", b"parent level")  # "fleet/#" matches its parent level too
    got = {m.topic: m for m in sub.received(3)}
    assert set(got) == {"commands/dev-1", "sensors/s-9/temp", "fleet"}
    command = got["commands/dev-1"]
    assert command.payload == b'{"set": 1}' and command.qos == 1
    p = command.properties
    assert p.ContentType == "application/json"
    assert p.ResponseTopic == "replies/dev-1"
    assert p.CorrelationData == b"\x00\x01corr"
    assert p.UserProperty == [("k", "v"), ("k", "w")]
    assert 3500 < p.MessageExpiryInterval <= 3600
    assert got["sensors/s-9/temp"].payload == b"21.5"
    # A's own subscriber gets its one copy, not a second one back from RabbitMQ.
    assert [m.topic for m in local.received(1)] == ["commands/dev-1"]
    sub.nothing_more()
    local.nothing_more(0.1)
    # No echo: B forwards nothing it received, A takes nothing of its own back.
    assert fleet_messages(b, "out") == 0
    assert fleet_messages(a, "in") == 0
    assert fleet_messages(a, "out") == 3
    assert fleet_messages(b, "in") == 3


def test_both_ways_and_mosquitto_sub(
        pair: tuple[RunningGateway, RunningGateway, list[Client]]) -> None:
    a, b, clients = pair
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed")
    sub_a = Client(a, "sub-on-a")
    clients.append(sub_a)
    sub_a.subscribe("up/#")
    proc = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(b.mqtt_port),
                             "-q", "1", "-t", "down/+", "-C", "2", "-v", "-i", "mosq-on-b"],
                            stdout=subprocess.PIPE, text=True)
    try:
        eventually(lambda: knows(a, "down/+") and knows(b, "up/#"),
                   what="both know the other's subscriptions")
        pub_b = Client(b, "pub-on-b")
        pub_a = Client(a, "pub-on-a")
        clients += [pub_a, pub_b]
        pub_b.publish("up/dev-2/status", b"online")
        pub_a.publish("down/dev-2", b"reboot")
        pub_a.publish("down/dev-3", b"update")
        assert [(m.topic, m.payload) for m in sub_a.received(1)] == [
            ("up/dev-2/status", b"online")]
        out, _ = proc.communicate(timeout=10)
        assert out.splitlines() == ["down/dev-2 reboot", "down/dev-3 update"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sub_a.nothing_more()


def test_retained_messages_reach_subscribers_that_come_later_on_any_replica(
        pair: tuple[RunningGateway, RunningGateway, list[Client]]) -> None:
    a, b, clients = pair
    pub = Client(a, "pub-on-a")
    clients.append(pub)
    eventually(lambda: on_loop(a, lambda: a.gateway.fleet is not None
                               and a.gateway.fleet.declared), what="A's fleet link up")
    eventually(lambda: on_loop(b, lambda: b.gateway.fleet is not None
                               and b.gateway.fleet.declared), what="B's fleet link up")
    pub.publish("state/dev-1", b"on", retain=True)
    eventually(lambda: on_loop(b, lambda: len(b.gateway.ingest.broker.retained)) == 1,
               what="B keeps the retained message")
    late = Client(b, "late-on-b")
    clients.append(late)
    late.subscribe("state/#")
    message = late.received(1)[0]
    assert (message.topic, message.payload, message.retain) == ("state/dev-1", b"on", True)
    pub.publish("state/dev-1", b"", retain=True)  # cleared everywhere
    eventually(lambda: on_loop(b, lambda: len(b.gateway.ingest.broker.retained)) == 0,
               what="B clears it too")


def test_unsubscribe_removes_the_binding(
        region: Region, pair: tuple[RunningGateway, RunningGateway, list[Client]]) -> None:
    a, b, clients = pair
    sub = Client(b, "sub-on-b")
    clients.append(sub)
    sub.subscribe("only-b/+/cmd")
    eventually(lambda: "only-b/+/cmd" in bound(b), what="the binding made")
    # A publish of our own, under the key a topic it matches gets: routed to B's queue
    # (mandatory: RabbitMQ would return it if no queue took it).
    body = encode_message("spy", "only-b/x/cmd", b"via the binding", 1, False, {}, None)
    assert spy_publish("only-b.x.cmd", body, region.exchange) == "routed"
    assert [m.payload for m in sub.received(1)] == [b"via the binding"]
    sub.unsubscribe("only-b/+/cmd")
    eventually(lambda: "only-b/+/cmd" not in bound(b), what="the binding removed")
    assert spy_publish("only-b.x.cmd", body, region.exchange) == "returned"
    eventually(lambda: not knows(a, "only-b/+/cmd"), what="A forgot B's interest")
    sub.nothing_more(0.3)


def spy_publish(key: str, body: bytes, exchange: str) -> str:
    async def go() -> str:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            target = await channel.get_exchange(exchange, ensure=False)
            try:
                await target.publish(aio_pika.Message(body, content_type=MQTT), key,
                                     mandatory=True)
            except aio_pika.exceptions.DeliveryError:
                return "returned"
            return "routed"

    return run_async(go)
