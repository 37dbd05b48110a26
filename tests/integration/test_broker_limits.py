"""Hostile subscribers and publishers cannot grow the broker without bound: a session holds
at most ``broker.max_subscriptions_per_client`` subscriptions (more are refused with the
spec's reason code: MQTT 5 0x97 quota exceeded [MQTT-3.9.3-1], MQTT 3.1.1 0x80
[MQTT-3.9.3-2]) and at most ``broker.max_retained`` retained messages are kept (a retained
message for a new topic past it is still delivered, not kept); each refusal is counted."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import RunningGateway
from tests.integration.test_broker import Client

pytestmark = pytest.mark.integration

LIMITS = """
[broker]
max_subscriptions_per_client = 3
max_retained = 2
"""


@pytest.fixture
def limited(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory(extra=LIMITS)


def codes(granted: list[object]) -> list[int]:
    return [int(getattr(code, "value", code)) for code in granted]


@pytest.mark.parametrize("version, refused", [(5, 0x97), (4, 0x80)])
def test_subscriptions_past_the_cap_are_refused_with_the_specs_code(
        limited: RunningGateway, version: int, refused: int,
        caplog: pytest.LogCaptureFixture) -> None:
    client = Client(limited.mqtt_port, f"many-subs-{version}", version)
    granted = [codes(client.subscribe(f"t/{i}", 1)) for i in range(5)]
    assert granted == [[1], [1], [1], [refused], [refused]]
    assert codes(client.subscribe("t/0", 0)) == [0]  # replacing one it holds is no new one
    # The refused ones are not routed; the held ones are.
    sender = Client(limited.mqtt_port, f"sender-{version}", version)
    sender.publish("t/4", b"not subscribed")
    sender.publish("t/1", b"subscribed", qos=1)
    assert [m.payload for m in client.receive()] == [b"subscribed"]
    assert client.nothing_more()
    client.close()
    sender.close()
    assert "iotgw_mqtt_refused_subscriptions_total 2.0" in limited.metrics()
    assert f"many-subs-{version}" in caplog.text and "max_subscriptions_per_client" in caplog.text


def test_retained_messages_past_the_cap_are_delivered_not_kept(limited: RunningGateway) -> None:
    live = Client(limited.mqtt_port, "live")
    live.subscribe("r/#", 1)
    sender = Client(limited.mqtt_port, "sender")
    for topic in ("r/1", "r/2", "r/3"):
        sender.publish(topic, topic.encode(), qos=1, retain=True)
    assert sorted(m.payload for m in live.receive(3)) == [b"r/1", b"r/2", b"r/3"]
    sender.publish("r/1", b"r/1 again", qos=1, retain=True)  # replacing one kept: allowed
    live.receive(1)

    later = Client(limited.mqtt_port, "later")
    later.subscribe("r/#", 1)
    assert sorted(m.payload for m in later.receive(2)) == [b"r/1 again", b"r/2"]
    assert later.nothing_more()
    later.close()

    sender.publish("r/2", b"", qos=1, retain=True)  # cleared: room for a new topic
    sender.publish("r/3", b"r/3 kept", qos=1, retain=True)
    last = Client(limited.mqtt_port, "last")
    last.subscribe("r/#", 1)
    assert sorted(m.payload for m in last.receive(2)) == [b"r/1 again", b"r/3 kept"]
    for client in (live, sender, last):
        client.close()
    assert 'iotgw_mqtt_dropped_total{reason="retained_full"} 1.0' in limited.metrics()
