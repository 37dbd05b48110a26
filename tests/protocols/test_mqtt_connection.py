"""ServerConnection driven from bytes alone: connect, QoS flows, flow control, liveness."""

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_helpers import connected, connecting, send, violation_of
from strategies import VERSIONS, client_packets_after_connect, client_publishes, connects

from protocols.mqtt import (
    ClientDisconnect,
    ConnectRequest,
    Event,
    LocalProtocolError,
    PublishAcknowledged,
    ReasonCode,
    ServerConnection,
    State,
    SubscribeRequest,
    UnsubscribeRequest,
)
from protocols.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
    decode,
    encode,
)

both_versions = pytest.mark.parametrize("version", VERSIONS)


def current_state(connection: ServerConnection) -> State:
    return connection.state  # (a call, so that type checkers do not narrow it between steps)


def connack_of(connection: ServerConnection) -> Connack:
    assert connection.version is not None
    data = connection.data_to_send()
    packet, size = decode(data, connection.version)
    assert isinstance(packet, Connack) and size == len(data)
    return packet


# ----------------------------------------------------------------------------- connect


@both_versions
def test_connect_then_accept(version: int) -> None:
    connection = connecting(version, Connect(version, "dev-1", True, 30, "alice", b"pw"))
    assert connection.state is State.CONNECTING
    assert (connection.version, connection.client_id, connection.username) == (
        version,
        "dev-1",
        "alice",
    )
    assert connection.keepalive == 30
    connection.accept()
    assert current_state(connection) is State.CONNECTED and not connection.closed


def test_accept_v311_sends_plain_connack() -> None:
    connection = connecting(MQTT_3_1_1, Connect(4, "c", clean_start=False))
    connection.accept(session_present=True)
    assert connection.data_to_send() == b"\x20\x02\x01\x00"


def test_accept_v5_advertises_the_server_limits() -> None:
    connection = connecting(MQTT_5)
    connection.accept()
    # topic alias maximum 0, receive maximum 1024, maximum packet size 1 MiB
    assert connection.data_to_send() == (
        b"\x20\x0e\x00\x00\x0b\x22\x00\x00\x21\x04\x00\x27\x00\x10\x00\x00"
    )


def test_accept_v5_with_options_and_extra_properties() -> None:
    connection = connecting(
        MQTT_5,
        receive_maximum=65535,
        max_packet_size=268_435_460,
        retain_available=False,
    )
    connection.accept(properties={"maximum_qos": 1, "reason_string": "welcome"})
    assert connack_of(connection).properties == {
        "topic_alias_maximum": 0,
        "retain_available": 0,
        "maximum_qos": 1,
        "reason_string": "welcome",
    }


def test_accept_refuses_to_override_enforced_properties() -> None:
    connection = connecting(MQTT_5)
    with pytest.raises(LocalProtocolError):
        connection.accept(properties={"receive_maximum": 10})
    with pytest.raises(LocalProtocolError):
        connecting(MQTT_3_1_1).accept(properties={"reason_string": "x"})


@both_versions
def test_session_present_requires_a_non_clean_start(version: int) -> None:
    with pytest.raises(LocalProtocolError):
        connecting(version).accept(session_present=True)


def test_empty_client_id_v5_gets_an_assigned_identifier() -> None:
    connection = connecting(MQTT_5, Connect(5, ""))
    assert connection.client_id is not None and connection.client_id.startswith("auto-")
    connection.accept()
    properties = connack_of(connection).properties
    assert properties["assigned_client_identifier"] == connection.client_id


def test_empty_client_id_v311_with_clean_session_is_accepted() -> None:
    connection = connecting(MQTT_3_1_1, Connect(4, "", clean_start=True))
    assert connection.client_id and connection.client_id.startswith("auto-")
    connection.accept()
    assert connection.data_to_send() == b"\x20\x02\x00\x00"


def test_server_keep_alive_caps_the_client_v5() -> None:
    connection = connecting(MQTT_5, Connect(5, "c", keepalive=600), max_keepalive=60)
    assert connection.keepalive == 60
    connection.accept()
    assert connack_of(connection).properties["server_keep_alive"] == 60


def test_server_keep_alive_replaces_a_zero_keep_alive_v5() -> None:
    connection = connecting(MQTT_5, Connect(5, "c", keepalive=0), max_keepalive=60)
    assert connection.keepalive == 60


def test_keep_alive_within_the_cap_is_left_alone() -> None:
    connection = connecting(MQTT_5, Connect(5, "c", keepalive=30), max_keepalive=60)
    connection.accept()
    assert connection.keepalive == 30
    assert "server_keep_alive" not in connack_of(connection).properties


def test_v311_keep_alive_cannot_be_overridden() -> None:
    connection = connecting(MQTT_3_1_1, Connect(4, "c", keepalive=600), max_keepalive=60)
    assert connection.keepalive == 600


@pytest.mark.parametrize(
    ("version", "reason_code", "answer"),
    [
        (MQTT_5, ReasonCode.NOT_AUTHORIZED, b"\x20\x03\x00\x87\x00"),
        (MQTT_3_1_1, ReasonCode.NOT_AUTHORIZED, b"\x20\x02\x00\x05"),
        (MQTT_3_1_1, ReasonCode.BAD_USER_NAME_OR_PASSWORD, b"\x20\x02\x00\x04"),
        (MQTT_3_1_1, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, b"\x20\x02\x00\x02"),
        (MQTT_3_1_1, ReasonCode.SERVER_BUSY, b"\x20\x02\x00\x03"),
    ],
)
def test_refuse(version: int, reason_code: int, answer: bytes) -> None:
    connection = connecting(version)
    connection.refuse(reason_code)
    assert connection.data_to_send() == answer
    assert connection.closed
    connection.refuse(reason_code)  # already closed: nothing more
    assert connection.data_to_send() == b""


def test_refuse_with_reason_string_v5() -> None:
    connection = connecting(MQTT_5)
    connection.refuse(ReasonCode.BANNED, reason_string="go away")
    assert connack_of(connection) == Connack(False, 0x8A, {"reason_string": "go away"})


@pytest.mark.parametrize("reason_code", [0x00, 0x10, 0x8D])
def test_refuse_needs_a_connack_failure_code(reason_code: int) -> None:
    with pytest.raises(LocalProtocolError):
        connecting(MQTT_5).refuse(reason_code)


def test_answers_are_only_allowed_in_the_right_state() -> None:
    fresh = ServerConnection()
    with pytest.raises(LocalProtocolError):
        fresh.accept()
    with pytest.raises(LocalProtocolError):
        fresh.refuse(0x87)
    with pytest.raises(LocalProtocolError):
        fresh.suback(1, [0])
    with pytest.raises(LocalProtocolError):
        connecting(MQTT_5).unsuback(1, [0])
    with pytest.raises(LocalProtocolError):
        connected(MQTT_5).accept()
    with pytest.raises(LocalProtocolError):
        fresh.send_publish("t", b"")


@both_versions
def test_packets_pipelined_behind_connect_wait_for_accept(version: int) -> None:
    connection = ServerConnection()
    connect = Connect(version, "c")
    publish = Publish("t", b"early")
    data = encode(connect, version) + encode(publish, version)
    assert connection.receive_data(data, 0.0) == [ConnectRequest(connect)]
    assert connection.receive_data(encode(Pingreq(), version), 0.5) == []  # still unanswered
    connection.accept()
    assert connection.receive_data(b"", 1.0) == [publish]
    assert connection.data_to_send().endswith(b"\xd0\x00")


@both_versions
def test_packets_pipelined_behind_a_refused_connect_are_never_processed(version: int) -> None:
    connection = ServerConnection()
    data = encode(Connect(version, "c"), version) + encode(Publish("t", b"x"), version)
    connection.receive_data(data, 0.0)
    connection.refuse(ReasonCode.NOT_AUTHORIZED)
    connection.data_to_send()
    assert connection.receive_data(b"", 1.0) == []
    assert connection.data_to_send() == b""


def test_accept_with_nothing_pipelined_then_empty_read() -> None:
    connection = connected(MQTT_5)
    assert connection.receive_data(b"", 1.0) == []


def test_constructor_rejects_impossible_limits() -> None:
    for options in (
        {"max_packet_size": 1},
        {"receive_maximum": 0},
        {"receive_maximum": 65536},
        {"max_keepalive": -1},
    ):
        with pytest.raises(ValueError):
            ServerConnection(**options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- QoS flows


@both_versions
def test_qos0_publish_is_delivered_and_needs_no_ack(version: int) -> None:
    connection = connected(version)
    publish = Publish("devices/1/t", b'{"t": 1}', retain=True)
    assert send(connection, publish) == [publish]
    connection.ack(publish)  # a no-op for QoS 0
    assert connection.data_to_send() == b""


@both_versions
def test_qos1_flow(version: int) -> None:
    connection = connected(version)
    publish = Publish("a", b"1", 1, packet_id=7)
    assert send(connection, publish) == [publish]
    assert connection.data_to_send() == b""  # nothing until the application acks
    # A retransmission while the first is unacknowledged is not delivered again.
    assert send(connection, Publish("a", b"1", 1, dup=True, packet_id=7)) == []
    connection.ack(publish)
    assert connection.data_to_send() == b"\x40\x02\x00\x07"
    # Once acknowledged, the packet id may carry a new message.
    again = Publish("a", b"2", 1, packet_id=7)
    assert send(connection, again) == [again]


@both_versions
def test_qos2_flow_is_exactly_once(version: int) -> None:
    connection = connected(version)
    publish = Publish("a", b"1", 2, packet_id=8)
    assert send(connection, publish) == [publish]
    assert send(connection, Publish("a", b"1", 2, dup=True, packet_id=8)) == []  # before ack
    assert connection.data_to_send() == b""
    connection.ack(publish)
    assert connection.data_to_send() == b"\x50\x02\x00\x08"  # PUBREC
    # The client did not see the PUBREC and retransmits: PUBREC again, no second delivery.
    assert send(connection, Publish("a", b"1", 2, dup=True, packet_id=8)) == []
    assert connection.data_to_send() == b"\x50\x02\x00\x08"
    assert send(connection, Pubrel(8)) == []
    assert connection.data_to_send() == b"\x70\x02\x00\x08"  # PUBCOMP
    # The flow is over: the same id is a new message.
    again = Publish("a", b"2", 2, packet_id=8)
    assert send(connection, again) == [again]


@pytest.mark.parametrize(
    ("version", "answer"),
    [(MQTT_5, b"\x70\x03\x00\x09\x92"), (MQTT_3_1_1, b"\x70\x02\x00\x09")],
)
def test_pubrel_for_an_unknown_packet_id(version: int, answer: bytes) -> None:
    connection = connected(version)
    assert send(connection, Pubrel(9)) == []
    assert connection.data_to_send() == answer


def test_ack_with_a_failure_code_v5() -> None:
    connection = connected(MQTT_5)
    qos1, qos2 = Publish("a", b"", 1, packet_id=1), Publish("a", b"", 2, packet_id=2)
    send(connection, qos1, qos2)
    connection.ack(qos1, ReasonCode.NOT_AUTHORIZED)
    connection.ack(qos2, ReasonCode.QUOTA_EXCEEDED)
    assert connection.data_to_send() == b"\x40\x03\x00\x01\x87\x50\x03\x00\x02\x97"
    send(connection, Pubrel(2))  # the refused QoS 2 flow ended with the PUBREC
    assert connection.data_to_send() == b"\x70\x03\x00\x02\x92"


def test_ack_with_a_success_code_v5() -> None:
    connection = connected(MQTT_5)
    qos1, qos2 = Publish("a", b"", 1, packet_id=1), Publish("a", b"", 2, packet_id=2)
    send(connection, qos1, qos2)
    connection.ack(qos1, ReasonCode.NO_MATCHING_SUBSCRIBERS)
    connection.ack(qos2, ReasonCode.NO_MATCHING_SUBSCRIBERS)
    assert connection.data_to_send() == b"\x40\x03\x00\x01\x10\x50\x03\x00\x02\x10"
    send(connection, Pubrel(2))
    assert connection.data_to_send() == b"\x70\x02\x00\x02"


def test_ack_with_a_failure_code_v311_sends_nothing_and_frees_the_slot() -> None:
    connection = connected(MQTT_3_1_1)
    publish = Publish("a", b"", 1, packet_id=1)
    send(connection, publish)
    connection.ack(publish, ReasonCode.NOT_AUTHORIZED)
    assert connection.data_to_send() == b""
    assert send(connection, publish) == [publish]  # the id is free again


def test_ack_with_a_success_code_v311_is_a_plain_ack() -> None:
    connection = connected(MQTT_3_1_1)
    publish = Publish("a", b"", 2, packet_id=3)
    send(connection, publish)
    connection.ack(publish, ReasonCode.NO_MATCHING_SUBSCRIBERS)
    assert connection.data_to_send() == b"\x50\x02\x00\x03"


def test_ack_of_something_not_awaiting_an_ack_is_our_bug() -> None:
    connection = connected(MQTT_5)
    publish = Publish("a", b"", 1, packet_id=1)
    send(connection, publish)
    connection.ack(publish)
    with pytest.raises(LocalProtocolError):
        connection.ack(publish)
    with pytest.raises(LocalProtocolError):
        connection.ack(Publish("a", b"", 1, packet_id=2))


def test_ack_after_close_is_quietly_dropped() -> None:
    connection = connected(MQTT_5)
    publish = Publish("a", b"", 1, packet_id=1)
    send(connection, publish)
    connection.disconnect()
    connection.data_to_send()
    connection.ack(publish)
    assert connection.data_to_send() == b""


# ----------------------------------------------------------------------------- flow control


@pytest.mark.parametrize("qos", [1, 2])
def test_receive_maximum_exceeded_v5(qos: int) -> None:
    connection = connected(MQTT_5, receive_maximum=2)
    events = send(connection, *(Publish("a", b"", qos, packet_id=i) for i in (1, 2, 3)))
    violation = violation_of(events, connection)
    assert (violation.reason, violation.reason_code) == ("receive_maximum_exceeded", 0x93)
    assert len(events) == 3  # two deliveries, then the violation
    assert connection.data_to_send() == b"\xe0\x01\x93"


def test_receive_maximum_counts_qos2_until_pubcomp() -> None:
    connection = connected(MQTT_5, receive_maximum=1)
    first = Publish("a", b"", 2, packet_id=1)
    send(connection, first)
    connection.ack(first)  # PUBREC sent; the message is still in flight until PUBREL
    send(connection, Pubrel(1))
    assert connection.data_to_send() == b"\x50\x02\x00\x01\x70\x02\x00\x01"
    second = Publish("a", b"", 2, packet_id=2)
    assert send(connection, second) == [second]
    connection.ack(second)
    violation = violation_of(send(connection, Publish("a", b"", 1, packet_id=3)), connection)
    assert violation.reason == "receive_maximum_exceeded"


def test_acks_free_receive_maximum_slots() -> None:
    connection = connected(MQTT_5, receive_maximum=2)
    for packet_id in range(1, 200):
        publish = Publish("a", b"", 1 + packet_id % 2, packet_id=packet_id)
        assert send(connection, publish) == [publish]
        connection.ack(publish)
        send(connection, Pubrel(packet_id))
    assert not connection.closed


def test_v311_has_no_receive_maximum() -> None:
    connection = connected(MQTT_3_1_1, receive_maximum=2)
    events = send(connection, *(Publish("a", b"", 1, packet_id=i) for i in range(1, 50)))
    assert len(events) == 49 and not connection.closed


# ----------------------------------------------------------------------------- liveness


@both_versions
def test_pingreq_is_answered_without_an_event(version: int) -> None:
    connection = connected(version)
    assert send(connection, Pingreq(), Pingreq()) == []
    assert connection.data_to_send() == b"\xd0\x00\xd0\x00"


def test_keepalive_expires_after_one_and_a_half_times() -> None:
    connection = connected(MQTT_5, Connect(5, "c", keepalive=10))
    send(connection, Pingreq(), now=100.0)
    assert not connection.keepalive_expired(114.9)
    assert not connection.keepalive_expired(115.0)
    assert connection.keepalive_expired(115.001)
    send(connection, Pingreq(), now=115.0)  # any packet counts as activity
    assert not connection.keepalive_expired(130.0)


def test_keepalive_zero_never_expires() -> None:
    connection = connected(MQTT_3_1_1, Connect(4, "c", keepalive=0))
    assert not connection.keepalive_expired(10**9)


def test_keepalive_uses_the_server_override() -> None:
    connection = connected(MQTT_5, Connect(5, "c", keepalive=600), max_keepalive=20)
    send(connection, Pingreq(), now=0.0)
    assert connection.keepalive_expired(30.5)


def test_keepalive_of_a_closed_connection_never_expires() -> None:
    connection = connected(MQTT_5, Connect(5, "c", keepalive=1))
    connection.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)
    assert connection.data_to_send() == b"\xe0\x01\x8d"
    assert not connection.keepalive_expired(10**9)


# ----------------------------------------------------------------------------- subscriptions


@pytest.mark.parametrize(
    ("version", "answer"),
    [(MQTT_5, b"\x90\x06\x00\x05\x00\x01\x87\x02"), (MQTT_3_1_1, b"\x90\x05\x00\x05\x01\x80\x02")],
)
def test_subscribe_and_suback(version: int, answer: bytes) -> None:
    connection = connected(version)
    subscribe = Subscribe(
        5, [(f, SubscriptionOptions(q)) for f, q in [("a", 1), ("b", 1), ("c/#", 2)]]
    )
    assert send(connection, subscribe) == [SubscribeRequest(subscribe)]
    with pytest.raises(LocalProtocolError):
        connection.suback(5, [0])  # one code per subscription
    with pytest.raises(LocalProtocolError):
        connection.suback(6, [0])  # no such SUBSCRIBE
    connection.suback(5, [1, ReasonCode.NOT_AUTHORIZED, 2])
    assert connection.data_to_send() == answer


@pytest.mark.parametrize(
    ("version", "answer"),
    [(MQTT_5, b"\xb0\x05\x00\x04\x00\x00\x11"), (MQTT_3_1_1, b"\xb0\x02\x00\x04")],
)
def test_unsubscribe_and_unsuback(version: int, answer: bytes) -> None:
    connection = connected(version)
    unsubscribe = Unsubscribe(4, ["a", "b/+"])
    assert send(connection, unsubscribe) == [UnsubscribeRequest(unsubscribe)]
    with pytest.raises(LocalProtocolError):
        connection.unsuback(4, [0])
    connection.unsuback(4, [0, ReasonCode.NO_SUBSCRIPTION_EXISTED])
    assert connection.data_to_send() == answer


def test_answers_to_a_closed_connection_are_dropped() -> None:
    connection = connected(MQTT_5)
    send(connection, Subscribe(1, [("a", SubscriptionOptions())]), Unsubscribe(2, ["a"]))
    connection.disconnect()
    connection.data_to_send()
    connection.suback(1, [0])
    connection.unsuback(2, [0])
    assert connection.data_to_send() == b""


# ----------------------------------------------------------------------------- closing


@both_versions
def test_client_disconnect(version: int) -> None:
    connection = connected(version)
    events = send(connection, Disconnect(), Publish("ignored", b""))
    assert events == [ClientDisconnect(0, {})]
    assert connection.closed and connection.state is State.CLOSED
    assert send(connection, Pingreq()) == []
    assert connection.data_to_send() == b""


def test_client_disconnect_with_will_v5() -> None:
    connection = connected(MQTT_5, Connect(5, "c", properties={"session_expiry_interval": 60}))
    disconnect = Disconnect(0x04, {"session_expiry_interval": 30, "reason_string": "bye"})
    assert send(connection, disconnect) == [ClientDisconnect(0x04, disconnect.properties)]


@pytest.mark.parametrize(
    ("version", "answer"), [(MQTT_5, b"\xe0\x06\x8b\x04\x1f\x00\x01x"), (MQTT_3_1_1, b"")]
)
def test_server_disconnect(version: int, answer: bytes) -> None:
    connection = connected(version)
    connection.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, reason_string="x")
    assert connection.data_to_send() == answer
    assert connection.closed
    connection.disconnect()  # idempotent
    assert connection.data_to_send() == b""


@pytest.mark.parametrize(
    ("version", "reason_code", "answer"),
    [
        (MQTT_5, ReasonCode.SERVER_SHUTTING_DOWN, b"\x20\x03\x00\x80\x00"),
        (MQTT_5, ReasonCode.SERVER_BUSY, b"\x20\x03\x00\x89\x00"),
        (MQTT_3_1_1, ReasonCode.SERVER_SHUTTING_DOWN, b"\x20\x02\x00\x03"),
    ],
)
def test_disconnect_before_connack_refuses(version: int, reason_code: int, answer: bytes) -> None:
    # A DISCONNECT may not precede a successful CONNACK [MQTT-3.14.0-1]: refuse instead.
    connection = connecting(version)
    connection.disconnect(reason_code)
    assert connection.data_to_send() == answer


def test_disconnect_before_connect_says_nothing() -> None:
    connection = ServerConnection()
    connection.disconnect(ReasonCode.SERVER_SHUTTING_DOWN)
    assert connection.closed and connection.data_to_send() == b""


# ----------------------------------------------------------------------------- outbound


@both_versions
def test_send_publish_qos0(version: int) -> None:
    connection = connected(version)
    assert connection.send_publish("a", b"x") is None
    assert connection.data_to_send() == encode(Publish("a", b"x"), version)


@both_versions
def test_send_publish_qos1_and_2_complete_with_events(version: int) -> None:
    connection = connected(version)
    first = connection.send_publish("a", b"1", qos=1)
    second = connection.send_publish("a", b"2", qos=2, retain=True)
    assert (first, second) == (1, 2)
    assert connection.data_to_send() == encode(Publish("a", b"1", 1, packet_id=1), version) + (
        encode(Publish("a", b"2", 2, True, packet_id=2), version)
    )
    assert send(connection, Puback(1)) == [PublishAcknowledged(1, 0)]
    assert send(connection, Pubrec(2)) == []
    assert connection.data_to_send() == b"\x62\x02\x00\x02"  # PUBREL, automatically
    assert send(connection, Pubrec(2)) == []  # a repeated PUBREC gets the PUBREL again
    assert connection.data_to_send() == b"\x62\x02\x00\x02"
    assert send(connection, Pubcomp(2)) == [PublishAcknowledged(2, 0)]
    # Acks for nothing in flight are ignored (or, for PUBREC, answered "not found").
    assert send(connection, Puback(1), Pubcomp(2)) == []
    assert send(connection, Pubrec(3)) == []
    expected = b"\x62\x03\x00\x03\x92" if version == MQTT_5 else b"\x62\x02\x00\x03"
    assert connection.data_to_send() == expected


def test_send_publish_refused_by_pubrec_v5() -> None:
    connection = connected(MQTT_5)
    packet_id = connection.send_publish("a", b"", qos=2)
    assert packet_id is not None
    assert send(connection, Pubrec(packet_id, 0x87)) == [PublishAcknowledged(packet_id, 0x87)]


def test_send_publish_respects_the_client_limits_v5() -> None:
    properties = {"receive_maximum": 2, "maximum_packet_size": 64}
    connection = connected(MQTT_5, Connect(5, "c", properties=properties))
    assert connection.send_publish("a", b"", qos=1) == 1
    assert connection.send_publish("a", b"", qos=1) == 2
    with pytest.raises(LocalProtocolError, match="receive maximum"):
        connection.send_publish("a", b"", qos=1)
    send(connection, Puback(1))
    assert connection.send_publish("a", b"", qos=1) == 3
    with pytest.raises(LocalProtocolError, match="maximum packet size"):
        connection.send_publish("a", b"x" * 64)


def test_send_publish_skips_packet_ids_in_use() -> None:
    connection = connected(MQTT_3_1_1)
    ids = [connection.send_publish("a", b"", qos=1) for _ in range(3)]
    send(connection, Puback(2))
    connection._next_packet_id = 65535  # wrap around: 65535, then 1 and 3 are in use
    assert connection.send_publish("a", b"", qos=1) == 65535
    assert connection.send_publish("a", b"", qos=1) == 2
    assert ids == [1, 2, 3]


# ----------------------------------------------------------------------------- split feeding


def _feed_all(version: int, stream: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    """Feed `stream` cut at `cuts`, accepting the CONNECT as soon as it is seen."""
    connection = ServerConnection()
    events: list[Event] = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for now, piece in enumerate(pieces):
        new = connection.receive_data(piece, float(now))
        events += new
        if any(isinstance(event, ConnectRequest) for event in new):
            connection.accept()
            events += connection.receive_data(b"", float(now))
    return events, connection.data_to_send()


@settings(max_examples=200, deadline=None)
@given(data=st.data(), version=st.sampled_from(VERSIONS))
def test_split_feeding_gives_the_same_events(data: st.DataObject, version: int) -> None:
    connect = data.draw(connects(version))
    packets: list[Packet] = data.draw(st.lists(client_packets_after_connect(version), max_size=12))
    if not connect.client_id:  # an assigned identifier is random: keep the runs comparable
        connect = msgspec.structs.replace(connect, client_id="c")
    stream = encode(connect, version) + b"".join(encode(p, version) for p in packets)
    whole = _feed_all(version, stream, [])
    assert whole[0][0] == ConnectRequest(connect)
    byte_by_byte = _feed_all(version, stream, list(range(1, len(stream))))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=20)))
    random_cuts = _feed_all(version, stream, [c for c in cuts if c < len(stream)])
    assert byte_by_byte == whole
    assert random_cuts == whole


@settings(max_examples=200, deadline=None)
@given(
    version=st.sampled_from(VERSIONS),
    packets=st.lists(client_publishes(MQTT_5, qos=st.integers(0, 1)), max_size=20),
    payload_sizes=st.lists(st.sampled_from([0, 1, 90, 127, 128, 300, 16_370, 16_390, 20_000])),
)
def test_the_inline_path_agrees_with_the_decoder(
    version: int, packets: list[Publish], payload_sizes: list[int]
) -> None:
    """QoS 0/1 PUBLISH take the inline path when they can: whatever path each takes, the
    events must be what the generic decoder says the bytes are."""
    connection = connected(version, receive_maximum=65535)
    seen_ids: set[int] = set()
    wire = []
    for index, packet in enumerate(packets):
        if version == MQTT_3_1_1:
            packet = Publish(
                packet.topic or "t",
                packet.payload,
                packet.qos,
                packet.retain,
                packet.dup,
                packet.packet_id,
            )
        if payload_sizes:
            packet = Publish(
                packet.topic,
                b"p" * payload_sizes[index % len(payload_sizes)],
                packet.qos,
                packet.retain,
                packet.dup,
                packet.packet_id,
                packet.properties,
            )
        if packet.packet_id in seen_ids:
            continue
        if packet.packet_id is not None:
            seen_ids.add(packet.packet_id)
        wire.append(encode(packet, version))
    expected = [decode(frame, version)[0] for frame in wire]
    assert connection.receive_data(b"".join(wire), 1.0) == expected


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_receive_data_takes_any_bytes_like(kind: type) -> None:
    connection = connected(MQTT_5)
    publish = Publish("a", b"x")
    events = connection.receive_data(kind(encode(publish, MQTT_5)), 1.0)
    assert events == [publish]
    assert type(events[0].payload) is bytes  # type: ignore[union-attr]


def test_many_distinct_topics_on_one_connection() -> None:
    connection = connected(MQTT_3_1_1)
    publishes = [Publish(f"devices/{n}/t", b"x") for n in range(3000)]
    assert send(connection, *publishes) == publishes
    assert send(connection, *publishes[:10]) == publishes[:10]
