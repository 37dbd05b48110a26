"""The gateway as a conforming MQTT broker, checked over loopback with independent clients
(paho-mqtt 3.1.1 and 5, amqtt, mosquitto_pub / mosquitto_sub). Each test names the normative
statements of OASIS MQTT 3.1.1 (``3.1.1:``) or 5.0 (``5.0:``) it checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.conftest import RunningGateway, config_text, start_serve
from tests.raw_mqtt import connect_frame, publish_frame

pytestmark = pytest.mark.integration

WAIT_S = 5.0


class Client:
    """A paho client on its own network thread, collecting what it receives."""

    def __init__(self, port: int, client_id: str, version: int = 5, *, clean: bool = True,
                 expiry: int | None = None, will: tuple[str, bytes, int, bool] | None = None,
                 will_delay: int | None = None, manual_ack: bool = False,
                 receive_maximum: int | None = None) -> None:
        self.version = version
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if version != 5:
            kwargs["clean_session"] = clean
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, manual_ack=manual_ack, **kwargs)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.session_present: bool | None = None
        self.disconnect_reason: Any = None
        self.paho.on_message = lambda c, u, m: self.messages.put(m)
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        if will is not None:
            props = None
            if will_delay is not None:
                props = Properties(PacketTypes.WILLMESSAGE)
                props.WillDelayInterval = will_delay
            self.paho.will_set(*will, properties=props)
        connect_props = None
        if version == 5:
            connect_props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                connect_props.SessionExpiryInterval = expiry
            if receive_maximum is not None:
                connect_props.ReceiveMaximum = receive_maximum
        self.paho.reconnect_delay_set(60, 60)  # a test decides when to reconnect
        if version == 5:
            self.paho.connect("127.0.0.1", port, keepalive=30, clean_start=clean,
                              properties=connect_props)
        else:
            self.paho.connect("127.0.0.1", port, keepalive=30)
        self.paho.loop_start()
        assert self.connected.wait(WAIT_S), f"{client_id}: no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def subscribe(self, topic: str, qos: int = 0, **options: Any) -> list[Any]:
        done = threading.Event()
        granted: list[Any] = []

        def on_subscribe(c: Any, u: Any, mid: int, codes: list[Any], props: Any) -> None:
            granted.extend(codes)
            done.set()

        self.paho.on_subscribe = on_subscribe
        props = None
        identifier = options.pop("identifier", None)
        if identifier is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = identifier
        if self.version == 5:
            self.paho.subscribe(topic, options=SubscribeOptions(qos=qos, **options),
                                properties=props)
        else:
            self.paho.subscribe(topic, qos)
        assert done.wait(WAIT_S), "no SUBACK"
        return granted

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties: Properties | None = None) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def receive(self, n: int = 1, timeout: float = WAIT_S) -> list[paho.MQTTMessage]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out.append(self.messages.get(timeout=max(0.01, deadline - time.monotonic())))
        return out

    def nothing_more(self, wait: float = 0.5) -> bool:
        time.sleep(wait)
        return self.messages.empty()

    def drop(self) -> None:
        """Go away without DISCONNECT: the network connection just closes."""
        self.paho.loop_stop()
        sock = self.paho.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients(gateway: RunningGateway) -> Any:
    made: list[Client] = []

    def make(client_id: str, version: int = 5, **kwargs: Any) -> Client:
        client = Client(gateway.mqtt_port, client_id, version, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):  # already gone
            client.close()


Make = Callable[..., Client]


# -- topic filters ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_wildcards_match_per_level_and_never_dollar_topics(clients: Make, version: int) -> None:
    """3.1.1: [MQTT-4.7.1-2] '#' matches the parent and any number of levels, [MQTT-4.7.1-3]
    '+' exactly one level, [MQTT-4.7.2-1] a filter starting with a wildcard does not match a
    topic starting with '$'. 5.0: 4.7.1.2, 4.7.1.3, [MQTT-4.7.2-1]."""
    sub = clients(f"wild-{version}", version)
    sub.subscribe("sport/tennis/+", 0)
    sub.subscribe("sport/#", 0)
    sub.subscribe("+/monitor/#", 0)
    pub = clients(f"wild-pub-{version}", version)
    for topic in ("sport/tennis/player1", "sport", "sport/tennis/player1/ranking",
                  "$SYS/monitor/clients", "finance/monitor", "finance"):
        pub.publish(topic, topic.encode())
    got = [m.topic for m in sub.receive(4)]
    assert sorted(got) == ["finance/monitor", "sport", "sport/tennis/player1",
                           "sport/tennis/player1/ranking"]
    assert sub.nothing_more()


@pytest.mark.parametrize("sub_qos,pub_qos", [(0, 2), (1, 2), (2, 1), (2, 2), (1, 0)])
def test_delivery_at_the_lower_of_subscription_and_message_qos(
        clients: Make, sub_qos: int, pub_qos: int) -> None:
    """3.1.1 [MQTT-3.8.4-6], 5.0 [MQTT-3.8.4-8]: delivered at the minimum of the published
    QoS and the QoS granted."""
    sub = clients("qos-sub")
    assert [int(c.value) for c in sub.subscribe("q/t", sub_qos)] == [sub_qos]
    clients("qos-pub").publish("q/t", b"x", qos=pub_qos)
    (message,) = sub.receive()
    assert message.qos == min(sub_qos, pub_qos)


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos_with_every_identifier(
        clients: Make) -> None:
    """5.0 [MQTT-3.3.4-2] overlapping subscriptions: the maximum QoS of them; [MQTT-3.3.4-3]
    every subscription identifier; [MQTT-3.8.4-3] a repeated filter replaces the earlier
    subscription."""
    sub = clients("overlap")
    sub.subscribe("plant/+/temp", 0, identifier=1)
    sub.subscribe("plant/#", 1, identifier=2)
    sub.subscribe("plant/#", 1, identifier=3)  # replaces identifier 2
    clients("overlap-pub").publish("plant/a/temp", b"21", qos=2)
    (message,) = sub.receive()
    assert message.qos == 1
    assert sorted(message.properties.SubscriptionIdentifier) == [1, 3]
    assert sub.nothing_more()


# -- retained messages ---------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_retained_messages_set_replace_clear(clients: Make, version: int) -> None:
    """3.1.1 [MQTT-3.3.1-5] stored and replaced, [MQTT-3.3.1-6] sent on subscribe to
    matching filters, [MQTT-3.3.1-8] with RETAIN set, [MQTT-3.3.1-9] RETAIN cleared on
    normal delivery, [MQTT-3.3.1-10] an empty payload clears it. 5.0 [MQTT-3.3.1-5],
    [MQTT-3.3.1-6], [MQTT-3.3.1-7], [MQTT-3.3.1-9], [MQTT-3.3.1-12]."""
    pub = clients(f"ret-pub-{version}", version)
    pub.publish("cfg/a", b"one", qos=1, retain=True)
    pub.publish("cfg/a", b"two", qos=1, retain=True)  # replaces
    pub.publish("cfg/b", b"bee", qos=0, retain=True)
    pub.publish("other/c", b"sea", qos=1, retain=True)
    sub = clients(f"ret-sub-{version}", version)
    sub.subscribe("cfg/+", 1)
    got = {m.topic: (m.payload, m.retain) for m in sub.receive(2)}
    assert got == {"cfg/a": (b"two", True), "cfg/b": (b"bee", True)}
    pub.publish("cfg/a", b"three", qos=1, retain=True)
    (live,) = sub.receive()
    assert (live.payload, live.retain) == (b"three", False)
    pub.publish("cfg/a", b"", qos=1, retain=True)  # clears
    sub.receive()  # the clearing message itself is delivered
    late = clients(f"ret-late-{version}", version)
    late.subscribe("cfg/#", 1)
    (only,) = late.receive()
    assert only.topic == "cfg/b"
    assert late.nothing_more()


def test_retain_handling_and_retain_as_published(clients: Make) -> None:
    """5.0 [MQTT-3.3.1-9] retain handling 0 sends retained messages on every subscribe,
    [MQTT-3.3.1-10] 1 only when the subscription is new, [MQTT-3.3.1-11] 2 never;
    [MQTT-3.3.1-13] retain as published keeps the RETAIN flag."""
    pub = clients("rh-pub")
    pub.publish("rh/t", b"kept", qos=1, retain=True)
    sub = clients("rh-sub")
    sub.subscribe("rh/#", 1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    assert sub.receive()[0].retain
    sub.subscribe("rh/#", 1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
    assert sub.nothing_more()
    sub.subscribe("rh/+", 1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    assert sub.nothing_more()
    sub.subscribe("rh/t", 1, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
    assert sub.receive()[0].payload == b"kept"
    rap = clients("rh-rap")
    rap.subscribe("rh/t", 1, retainAsPublished=True,
                  retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    pub.publish("rh/t", b"new", qos=1, retain=True)
    assert rap.receive()[0].retain


# -- wills ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_will_published_on_abnormal_close_not_after_disconnect(
        clients: Make, version: int) -> None:
    """3.1.1 [MQTT-3.1.2-8] the will is published when the connection closes without
    DISCONNECT, [MQTT-3.1.2-10] and removed on DISCONNECT; 5.0 [MQTT-3.1.2-8],
    [MQTT-3.1.2-10]."""
    watcher = clients(f"will-watch-{version}", version)
    watcher.subscribe("status/#", 1)
    polite = clients(f"will-polite-{version}", version,
                     will=("status/polite", b"gone", 1, False))
    polite.close()
    assert watcher.nothing_more()
    rude = clients(f"will-rude-{version}", version, will=("status/rude", b"lost", 1, False))
    rude.drop()
    (will,) = watcher.receive()
    assert (will.topic, will.payload, will.qos) == ("status/rude", b"lost", 1)


def test_will_delay_lets_a_quick_reconnect_cancel_the_will(clients: Make,
                                                           gateway: RunningGateway) -> None:
    """5.0 [MQTT-3.1.3-9]: no will if the session is resumed before the will delay passes;
    otherwise it is published once the delay has passed."""
    watcher = clients("delay-watch")
    watcher.subscribe("status/#", 1)
    flaky = clients("delay-flaky", clean=False, expiry=60, will_delay=2,
                    will=("status/flaky", b"down", 1, False))
    flaky.drop()
    time.sleep(0.5)
    clients("delay-flaky", clean=False, expiry=60).close()  # back in time; clean DISCONNECT
    assert watcher.nothing_more(2.5)
    slow = clients("delay-slow", clean=False, expiry=60, will_delay=1,
                   will=("status/slow", b"down", 1, False))
    started = time.monotonic()
    slow.drop()
    (will,) = watcher.receive(timeout=5)
    assert will.topic == "status/slow"
    assert time.monotonic() - started >= 0.9


# -- sessions -------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_persistent_session_keeps_subscriptions_and_queues_while_offline(
        clients: Make, version: int) -> None:
    """3.1.1 [MQTT-3.1.2-4] a session with CleanSession 0 is resumed, [MQTT-3.2.2-2]
    session present, [MQTT-3.1.2-5] QoS 1/2 messages stored while disconnected; 5.0
    [MQTT-3.1.2-5], [MQTT-3.2.2-3], 3.1.2.11.2 session expiry."""
    extra = {"expiry": 300} if version == 5 else {}
    sub = clients(f"persist-{version}", version, clean=False, **extra)
    sub.subscribe("orders/#", 1)
    sub.close()
    pub = clients(f"persist-pub-{version}", version)
    for i in range(5):
        pub.publish(f"orders/{i}", b"%d" % i, qos=1)
    pub.publish("orders/zero", b"qos0 is not queued", qos=0)
    back = clients(f"persist-{version}", version, clean=False, **extra)
    assert back.session_present
    assert [m.payload for m in back.receive(5)] == [b"0", b"1", b"2", b"3", b"4"]
    assert back.nothing_more()


def test_clean_start_discards_the_session(clients: Make) -> None:
    """5.0 [MQTT-3.1.2-4] clean start discards an existing session, [MQTT-3.2.2-2] session
    present is then 0; 3.1.1 [MQTT-3.1.2-6]."""
    first = clients("clean-me", clean=False, expiry=300)
    first.subscribe("jobs/#", 1)
    first.close()
    again = clients("clean-me", clean=True)
    assert again.session_present is False
    clients("clean-pub").publish("jobs/1", b"x", qos=1)
    assert again.nothing_more()


def test_unacknowledged_messages_are_resent_with_dup_on_reconnect(clients: Make) -> None:
    """5.0 and 3.1.1 [MQTT-4.4.0-1]: on a resumed session the server resends unacknowledged
    PUBLISH packets with their original packet identifiers, [MQTT-3.3.1-1] DUP set."""
    sub = clients("dup-sub", clean=False, expiry=300, manual_ack=True)
    sub.subscribe("dup/#", 1)
    clients("dup-pub").publish("dup/1", b"once", qos=1)
    (first,) = sub.receive()
    assert not first.dup
    sub.close()  # never acknowledged
    back = clients("dup-sub", clean=False, expiry=300)
    (again,) = back.receive()
    assert (again.payload, again.dup, again.mid) == (b"once", True, first.mid)


def test_a_second_connection_takes_the_session_over(clients: Make) -> None:
    """5.0 [MQTT-3.1.4-3]: the existing connection is closed with 0x8E (session taken
    over); 3.1.1 [MQTT-3.1.4-2]."""
    first = clients("twin", clean=False, expiry=300)
    first.subscribe("twin/#", 1)
    second = clients("twin", clean=False, expiry=300)
    assert first.disconnected.wait(WAIT_S)
    assert first.disconnect_reason == 0x8E
    assert second.session_present
    clients("twin-pub").publish("twin/x", b"to the new one", qos=1)
    assert second.receive()[0].payload == b"to the new one"


def test_qos2_exactly_once_in_both_directions(clients: Make) -> None:
    """5.0 and 3.1.1 4.3.3: QoS 2 delivered exactly once, inbound and outbound."""
    sub = clients("exact-sub")
    sub.subscribe("exact/#", 2)
    pub = clients("exact-pub", 4)
    for i in range(20):
        pub.publish(f"exact/{i}", b"%d" % i, qos=2)
    got = sub.receive(20)
    assert sorted(int(m.payload) for m in got) == list(range(20))
    assert all(m.qos == 2 for m in got)
    assert sub.nothing_more()


def test_receive_maximum_bounds_deliveries_in_flight(clients: Make) -> None:
    """5.0 [MQTT-3.3.4-9]: no more unacknowledged QoS 1/2 PUBLISH packets than the client's
    receive maximum; the rest wait in the session and follow as acks come."""
    sub = clients("recvmax", manual_ack=True, receive_maximum=2)
    sub.subscribe("rm/#", 1)
    pub = clients("recvmax-pub")
    for i in range(5):
        pub.publish(f"rm/{i}", b"%d" % i, qos=1)
    first = sub.receive(2)
    assert sub.nothing_more()
    for message in first:
        sub.paho.ack(message.mid, message.qos)
    rest = sub.receive(2)
    assert [m.payload for m in first + rest] == [b"0", b"1", b"2", b"3"]


def test_session_queue_is_bounded_and_overflow_counted(gateway_factory: Any) -> None:
    """A bounded queue per offline session; what overflows is counted, never silent."""
    gw = gateway_factory("[broker]\nmax_queued = 3\n")
    sub = Client(gw.mqtt_port, "bounded", clean=False, expiry=300)
    sub.subscribe("b/#", 1)
    sub.close()
    pub = Client(gw.mqtt_port, "bounded-pub")
    for i in range(7):
        pub.publish(f"b/{i}", b"%d" % i, qos=1)
    back = Client(gw.mqtt_port, "bounded", clean=False, expiry=300)
    assert [m.payload for m in back.receive(3)] == [b"0", b"1", b"2"]
    assert back.nothing_more()
    gw.wait_for(lambda: 'iotgw_mqtt_dropped_total{reason="queue_full"} 4.0' in gw.metrics())
    for c in (pub, back):
        c.close()


# -- MQTT 5 message properties ---------------------------------------------------------------

def test_no_local(clients: Make) -> None:
    """5.0 [MQTT-3.8.3-3]: with No Local, a client's own messages are not sent back."""
    chat = clients("no-local")
    chat.subscribe("chat/#", 0, noLocal=True)
    chat.publish("chat/1", b"mine", qos=1)
    clients("no-local-other").publish("chat/2", b"theirs", qos=1)
    assert [m.payload for m in chat.receive()] == [b"theirs"]
    assert chat.nothing_more()


def test_shared_subscription_delivers_each_message_to_one_member(clients: Make) -> None:
    """5.0 4.8.2: a message matching a shared subscription goes to one session of the
    group; plain subscribers still get every message."""
    a = clients("worker-a")
    b = clients("worker-b")
    a.subscribe("$share/workers/jobs/#", 1)
    b.subscribe("$share/workers/jobs/#", 1)
    plain = clients("auditor")
    plain.subscribe("jobs/#", 1)
    pub = clients("jobs-pub")
    for i in range(20):
        pub.publish(f"jobs/{i}", b"%d" % i, qos=1)
    assert len(plain.receive(20)) == 20
    time.sleep(0.3)
    got_a = [int(m.payload) for m in list(a.messages.queue)]
    got_b = [int(m.payload) for m in list(b.messages.queue)]
    assert sorted(got_a + got_b) == list(range(20))
    assert got_a and got_b


def test_message_expiry(clients: Make) -> None:
    """5.0 [MQTT-3.3.2-5] an expired message is not delivered; [MQTT-3.3.2-6] the interval
    sent is what is left of it."""
    sub = clients("expiry-sub", clean=False, expiry=300)
    sub.subscribe("exp/#", 1)
    sub.close()
    pub = clients("expiry-pub")
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 1
    long = Properties(PacketTypes.PUBLISH)
    long.MessageExpiryInterval = 60
    pub.publish("exp/short", b"stale", qos=1, properties=short)
    pub.publish("exp/long", b"fresh", qos=1, properties=long)
    time.sleep(2.1)
    back = clients("expiry-sub", clean=False, expiry=300)
    (message,) = back.receive()
    assert message.payload == b"fresh"
    assert 50 <= message.properties.MessageExpiryInterval <= 59
    assert back.nothing_more()


def test_user_properties_and_request_response_pass_unaltered(clients: Make) -> None:
    """5.0 [MQTT-3.3.2-17] user properties unaltered, [MQTT-3.3.2-18] in order,
    [MQTT-3.3.2-15] response topic, [MQTT-3.3.2-16] correlation data, [MQTT-3.3.2-20]
    content type, [MQTT-3.3.2-4] payload format indicator."""
    responder = clients("responder")
    responder.subscribe("rpc/request", 1)
    requester = clients("requester")
    requester.subscribe("rpc/reply/requester", 1)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("b", "2"), ("a", "1"), ("a", "0")]
    props.ResponseTopic = "rpc/reply/requester"
    props.CorrelationData = b"\x01\x02"
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    requester.publish("rpc/request", b'{"op": "ping"}', qos=1, properties=props)
    (request,) = responder.receive()
    got = request.properties
    assert got.UserProperty == [("b", "2"), ("a", "1"), ("a", "0")]
    assert (got.ResponseTopic, got.CorrelationData) == ("rpc/reply/requester", b"\x01\x02")
    assert (got.ContentType, got.PayloadFormatIndicator) == ("application/json", 1)
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = got.CorrelationData
    responder.publish(got.ResponseTopic, b'{"ok": true}', qos=1, properties=reply)
    (answer,) = requester.receive()
    assert answer.properties.CorrelationData == b"\x01\x02"


# -- other clients ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients missing")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_sub_receives_from_mosquitto_pub(gateway: RunningGateway,
                                                   version: str) -> None:
    """3.1.1 / 5.0 4.7 and [MQTT-3.3.1-6]: a retained message and a live one reach a
    mosquitto_sub subscriber at the QoS it asked for."""
    port = str(gateway.mqtt_port)
    subprocess.run(["mosquitto_pub", "-p", port, "-V", version, "-q", "1", "-r",
                    "-t", "fleet/config", "-m", "retained"], check=True, timeout=10)
    sub = subprocess.Popen(["mosquitto_sub", "-p", port, "-V", version, "-q", "1",
                            "-t", "fleet/#", "-C", "2", "-v", "-W", "10"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["mosquitto_pub", "-p", port, "-V", version, "-q", "1",
                    "-t", "fleet/cmd", "-m", "live"], check=True, timeout=10)
    out, _ = sub.communicate(timeout=15)
    assert out.splitlines() == ["fleet/config retained", "fleet/cmd live"]


def test_amqtt_client_subscribes_and_receives(gateway: RunningGateway) -> None:
    """3.1.1 3.8 / 3.9: SUBACK with the granted QoS; 4.3: delivery at QoS 0, 1 and 2."""
    from amqtt.client import MQTTClient

    async def run() -> list[tuple[str, bytes, int]]:
        sub = MQTTClient(client_id="amqtt-sub", config={"auto_reconnect": False})
        await sub.connect(f"mqtt://127.0.0.1:{gateway.mqtt_port}/")
        granted = await sub.subscribe([("amqtt/#", 2)])
        assert granted == [2]
        pub = MQTTClient(client_id="amqtt-pub", config={"auto_reconnect": False})
        await pub.connect(f"mqtt://127.0.0.1:{gateway.mqtt_port}/")
        for qos in (0, 1, 2):
            await pub.publish(f"amqtt/{qos}", b"q%d" % qos, qos=qos)
        got = []
        for _ in range(3):
            message = await sub.deliver_message(timeout_duration=WAIT_S)
            assert message is not None
            got.append((message.topic, bytes(message.data), message.qos))
        await pub.disconnect()
        await sub.disconnect()
        return got

    got = asyncio.run(run())
    assert sorted(got) == [("amqtt/0", b"q0", 0), ("amqtt/1", b"q1", 1), ("amqtt/2", b"q2", 2)]


# -- sessions survive a restart ---------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_sessions_and_retained_messages_survive_a_restart(gateway_factory: Any,
                                                          version: int) -> None:
    """3.1.1 [MQTT-3.1.2-4], 5.0 [MQTT-3.1.2-5] and 4.1: the session state (subscriptions,
    QoS 1/2 messages queued for it) and retained messages outlive a restart of the
    server; [MQTT-3.2.2-3] the reconnecting client is told its session is present."""
    extra = {"expiry": 300} if version == 5 else {}
    first = gateway_factory()
    sub = Client(first.mqtt_port, f"durable-{version}", version, clean=False, **extra)
    sub.subscribe("alarms/#", 1)
    sub.close()
    pub = Client(first.mqtt_port, "durable-pub", version)
    for i in range(3):
        pub.publish(f"alarms/{i}", b"%d" % i, qos=1)
    pub.publish("config/rate", b"10", qos=1, retain=True)
    pub.close()
    first.stop()
    second = gateway_factory()
    back = Client(second.mqtt_port, f"durable-{version}", version, clean=False, **extra)
    assert back.session_present
    assert [m.payload for m in back.receive(3)] == [b"0", b"1", b"2"]
    reader = Client(second.mqtt_port, "durable-reader", version)
    reader.subscribe("config/#", 1)
    assert reader.receive()[0].payload == b"10"
    for c in (back, reader):
        c.close()


def test_sessions_survive_a_crash_within_the_snapshot_interval(tmp_path: Path) -> None:
    """After SIGKILL, what was saved (every ``snapshot_interval_s``) comes back."""
    text = config_text(tmp_path, "[broker]\nsnapshot_interval_s = 0.2\n")
    (tmp_path / "gw.toml").write_text(text)
    gw = start_serve(tmp_path, "--config", "gw.toml")
    sub = Client(gw.mqtt_port, "crash-sub", clean=False, expiry=300)
    sub.subscribe("crash/#", 1)
    sub.close()
    pub = Client(gw.mqtt_port, "crash-pub")
    pub.publish("crash/1", b"kept", qos=1)
    pub.publish("crash/cfg", b"retained", qos=1, retain=True)
    pub.close()
    time.sleep(1.5)  # a few snapshot intervals
    gw.send_signal(signal.SIGKILL)
    gw.wait(10)
    again = start_serve(tmp_path, "--config", "gw.toml")
    back = Client(again.mqtt_port, "crash-sub", clean=False, expiry=300)
    assert back.session_present
    got = {m.topic: m.payload for m in back.receive(2)}
    assert got == {"crash/1": b"kept", "crash/cfg": b"retained"}
    back.close()
    again.terminate()
    again.wait(30)


def test_topic_aliases_from_the_client(clients: Make) -> None:
    """5.0 [MQTT-3.3.2-12]: a PUBLISH with a topic name and an alias sets the alias; one
    with an empty name uses it. The CONNACK announces the maximum (3.2.2.3.8)."""
    sub = clients("alias-sub")
    sub.subscribe("long/topic/name/for/a/sensor", 1)
    pub = clients("alias-pub")
    first = Properties(PacketTypes.PUBLISH)
    first.TopicAlias = 1
    pub.publish("long/topic/name/for/a/sensor", b"1", qos=1, properties=first)
    again = Properties(PacketTypes.PUBLISH)
    again.TopicAlias = 1
    pub.publish("", b"2", qos=1, properties=again)
    got = sub.receive(2)
    assert [(m.topic, m.payload) for m in got] == [("long/topic/name/for/a/sensor", b"1"),
                                                   ("long/topic/name/for/a/sensor", b"2")]
    assert not hasattr(got[1].properties, "TopicAlias")  # one hop only [MQTT-3.3.2-7]


def test_processed_results_can_be_subscribed_to(gateway_factory: Any) -> None:
    """What the gateway produces goes out through the same broker: an ``mqtt`` sink
    publishes each processed message, enriched and classified, to a topic template."""
    from tests.conftest import DEFAULT_TOML

    base = DEFAULT_TOML.replace('{ type = "route", sinks = ["lake"] }',
                                '{ type = "route", sinks = ["lake", "results"] }')
    assert base != DEFAULT_TOML
    gw = gateway_factory('[sinks.results]\ntype = "mqtt"\n'
                         'options = { topic = "processed/{tier}/{device}", qos = 1 }\n', base)
    operator = Client(gw.mqtt_port, "operator")
    operator.subscribe("processed/#", 1)
    device = Client(gw.mqtt_port, "pump-9", 4)
    device.publish("medical/pump-9/vitals", b'{"heart_rate": 70}', qos=1)
    (result,) = operator.receive()
    assert result.topic == "processed/critical/pump-9" and result.qos == 1
    record = json.loads(result.payload)
    assert record["data"] == {"heart_rate": 70} and record["tier"] == "critical"
    for c in (operator, device):
        c.close()


def test_inbound_qos2_is_not_delivered_twice_across_a_reconnect(clients: Make,
                                                                gateway: RunningGateway) -> None:
    """3.1.1 [MQTT-4.3.3-2], 5.0 4.3.3: until the PUBREL, a PUBLISH resent with the same
    packet identifier is answered with PUBREC and not delivered again, here after the client
    reconnected to its session ([MQTT-4.4.0-1]); the PUBREL then completes it."""
    sub = clients("exactly-sub")
    sub.subscribe("once/#", 2)
    frame = publish_frame("once/x", b"only once", qos=2, packet_id=7)
    with socket.create_connection(("127.0.0.1", gateway.mqtt_port), timeout=5) as s:
        s.sendall(connect_frame("exactly-pub", clean=False))
        assert s.recv(4)[:1] == b"\x20"
        s.sendall(frame)
        assert s.recv(4) == b"\x50\x02\x00\x07"  # PUBREC 7; no PUBREL: the link drops
    assert sub.receive()[0].payload == b"only once"
    with socket.create_connection(("127.0.0.1", gateway.mqtt_port), timeout=5) as s:
        s.sendall(connect_frame("exactly-pub", clean=False))
        assert s.recv(4) == b"\x20\x02\x01\x00"  # session present
        s.sendall(bytes([frame[0] | 0x08]) + frame[1:])  # the same PUBLISH, DUP set
        assert s.recv(4) == b"\x50\x02\x00\x07"
        s.sendall(b"\x62\x02\x00\x07")  # PUBREL
        assert s.recv(4) == b"\x70\x02\x00\x07"  # PUBCOMP
    assert sub.nothing_more()


def test_session_expiry_ends_an_offline_session(clients: Make) -> None:
    """5.0 [MQTT-3.1.2-23]: the session ends when the expiry interval has passed since the
    connection closed; its subscriptions and queued messages go with it."""
    short = clients("short-lived", clean=False, expiry=1)
    short.subscribe("brief/#", 1)
    short.close()
    time.sleep(1.6)
    clients("brief-pub").publish("brief/1", b"too late", qos=1)
    back = clients("short-lived", clean=False, expiry=1)
    assert back.session_present is False
    assert back.nothing_more()


def test_server_keepalive_and_assigned_client_identifier(gateway_factory: Any) -> None:
    """5.0 [MQTT-3.2.2-21] the client uses the Server Keep Alive it is told; 3.2.2.3.7 a
    client that sent an empty client id is told the one assigned to it."""
    from tests.conftest import DEFAULT_TOML

    base = DEFAULT_TOML.replace("max_keepalive = 0 ", "max_keepalive = 20 ")
    assert base != DEFAULT_TOML
    gw = gateway_factory("", base)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv5)
    got: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        got["props"] = props
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", gw.mqtt_port, keepalive=0)
    client.loop_start()
    assert done.wait(WAIT_S)
    assigned = got["props"].AssignedClientIdentifier
    assert assigned and isinstance(assigned, str)
    assert got["props"].ServerKeepAlive == 20  # asked for 0 (none): told to use 20
    client.loop_stop()
    client.disconnect()
