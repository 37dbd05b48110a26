"""Malformed input and protocol errors, one test per case, from bytes alone.

Each case asserts the violation's slug (the metrics label), its MQTT 5 reason code, and the
exact bytes the connection queued before closing: a DISCONNECT with the reason code for an
MQTT 5 client that is connected, a CONNACK while its CONNECT is unanswered, an MQTT 3.1.1
CONNACK return code where 3.1.1 has one, and otherwise nothing at all.
"""

from typing import Any

import pytest
from mqtt_helpers import connected, violation_of

from protocols.mqtt import VIOLATIONS, ServerConnection
from protocols.mqtt.packets import MQTT_3_1_1, MQTT_5


def disconnect_v5(reason_code: int) -> bytes:
    return bytes((0xE0, 0x01, reason_code))


def connack_v5(reason_code: int) -> bytes:
    return bytes((0x20, 0x03, 0x00, reason_code, 0x00))


def connack_v311(return_code: int) -> bytes:
    return bytes((0x20, 0x02, 0x00, return_code))


def frame(first_byte: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first_byte, len(body))) + body


def raw_connect(
    level: int = 5,
    flags: int = 0x02,
    *,
    name: bytes = b"MQTT",
    payload: bytes | None = None,
) -> bytes:
    """A CONNECT built by hand, so that any field can be wrong."""
    if payload is None:
        payload = (b"\x00" if level == 5 else b"") + b"\x00\x01c"  # properties, client id "c"
    header = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
    return frame(0x10, header + payload)


# (case id, violation slug, MQTT 5 reason code, bytes sent once connected with MQTT 5)
CONNECTED_V5_CASES: list[tuple[str, str, int, bytes]] = [
    (
        "remaining length of 5 bytes",
        "malformed_remaining_length",
        0x81,
        b"\x30\xff\xff\xff\xff\x01",
    ),
    ("remaining length not minimal", "malformed_remaining_length", 0x81, b"\x30\x80\x00"),
    ("PUBREL flags 0", "reserved_flags", 0x81, b"\x60\x02\x00\x01"),
    ("SUBSCRIBE flags 0", "reserved_flags", 0x81, frame(0x80, b"\x00\x01\x00\x00\x01a\x00")),
    ("UNSUBSCRIBE flags 0", "reserved_flags", 0x81, frame(0xA0, b"\x00\x01\x00\x00\x01a")),
    ("PINGREQ flags 1", "reserved_flags", 0x81, b"\xc1\x00"),
    ("PUBACK flags 8", "reserved_flags", 0x81, b"\x48\x02\x00\x01"),
    ("DISCONNECT flags 2", "reserved_flags", 0x81, b"\xe2\x00"),
    ("packet type 0", "unknown_packet_type", 0x81, b"\x00\x00"),
    ("PUBLISH QoS 3", "invalid_qos", 0x81, frame(0x36, b"\x00\x01a\x00\x01\x00")),
    ("PUBLISH DUP on QoS 0", "malformed_packet", 0x81, frame(0x38, b"\x00\x01a\x00")),
    ("topic with +", "wildcard_in_topic", 0x90, frame(0x30, b"\x00\x03a/+\x00")),
    ("topic with #", "wildcard_in_topic", 0x90, frame(0x30, b"\x00\x03a/#\x00")),
    ("topic with U+0000", "invalid_utf8", 0x81, frame(0x30, b"\x00\x03a\x00b\x00")),
    ("topic not UTF-8", "invalid_utf8", 0x81, frame(0x30, b"\x00\x02a\xff\x00")),
    ("topic with a surrogate", "invalid_utf8", 0x81, frame(0x30, b"\x00\x03\xed\xa0\x80\x00")),
    ("topic with an overlong", "invalid_utf8", 0x81, frame(0x30, b"\x00\x02\xc0\xaf\x00")),
    ("topic longer than packet", "malformed_packet", 0x81, frame(0x30, b"\x00\x09ab")),
    ("no room for property length", "malformed_packet", 0x81, frame(0x30, b"\x00\x01a")),
    ("properties past the end", "malformed_packet", 0x81, frame(0x30, b"\x00\x01a\x05\x01")),
    ("QoS 1 without packet id", "malformed_packet", 0x81, frame(0x32, b"\x00\x01a")),
    ("QoS 1 packet id 0", "zero_packet_id", 0x82, frame(0x32, b"\x00\x01a\x00\x00\x00")),
    ("QoS 2 packet id 0", "zero_packet_id", 0x82, frame(0x34, b"\x00\x01a\x00\x00\x00")),
    ("PUBREL packet id 0", "zero_packet_id", 0x82, b"\x62\x02\x00\x00"),
    ("SUBSCRIBE packet id 0", "zero_packet_id", 0x82, frame(0x82, b"\x00\x00\x00\x00\x01a\x00")),
    ("SUBSCRIBE without filter", "empty_subscribe", 0x82, frame(0x82, b"\x00\x01\x00")),
    ("UNSUBSCRIBE without filter", "empty_unsubscribe", 0x82, frame(0xA2, b"\x00\x01\x00")),
    ("subscription QoS 3", "invalid_qos", 0x81, frame(0x82, b"\x00\x01\x00\x00\x01a\x03")),
    (
        "subscription reserved bits",
        "malformed_packet",
        0x81,
        frame(0x82, b"\x00\x01\x00\x00\x01a\x40"),
    ),
    ("retain handling 3", "protocol_error", 0x82, frame(0x82, b"\x00\x01\x00\x00\x01a\x30")),
    ("filter a/#/b", "invalid_topic_filter", 0x81, frame(0x82, b"\x00\x01\x00\x00\x05a/#/b\x00")),
    ("filter a+", "invalid_topic_filter", 0x81, frame(0xA2, b"\x00\x01\x00\x00\x02a+")),
    (
        "shared without name",
        "invalid_topic_filter",
        0x81,
        frame(0xA2, b"\x00\x01\x00\x00\x09$share//a"),
    ),
    (
        "shared with No Local",
        "protocol_error",
        0x82,
        frame(0x82, b"\x00\x01\x00\x00\x0a$share/g/a\x04"),
    ),
    (
        "two subscription identifiers",
        "protocol_error",
        0x82,
        frame(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00"),
    ),
    ("filter truncated", "malformed_packet", 0x81, frame(0x82, b"\x00\x01\x00\x00\x05a")),
    ("property not allowed", "invalid_property", 0x81, frame(0x30, b"\x00\x01a\x02\x17\x01")),
    ("unknown property", "invalid_property", 0x81, frame(0x30, b"\x00\x01a\x02\x7f\x01")),
    (
        "property twice",
        "duplicate_property",
        0x82,
        frame(0x30, b"\x00\x01a\x04\x01\x00\x01\x01"),
    ),
    ("payload format 2", "protocol_error", 0x82, frame(0x30, b"\x00\x01a\x02\x01\x02")),
    ("topic alias 0", "protocol_error", 0x82, frame(0x30, b"\x00\x01a\x03\x23\x00\x00")),
    (
        "property varint too long",
        "malformed_packet",
        0x81,
        frame(0x30, b"\x00\x01a\x06\x0b\xff\xff\xff\xff\x01"),
    ),
    (
        "property varint not minimal",
        "malformed_packet",
        0x81,
        frame(0x30, b"\x00\x01a\x03\x0b\x81\x00"),
    ),
    (
        "response topic wildcard",
        "wildcard_in_topic",
        0x90,
        frame(0x30, b"\x00\x01a\x05\x08\x00\x02r#"),
    ),
    (
        "user property not UTF-8",
        "invalid_utf8",
        0x81,
        frame(0x30, b"\x00\x01a\x07\x26\x00\x01\xff\x00\x01v"),
    ),
    ("topic alias used", "topic_alias_invalid", 0x94, frame(0x30, b"\x00\x01a\x03\x23\x00\x01")),
    ("empty topic", "empty_topic", 0x82, frame(0x30, b"\x00\x00\x00")),
    (
        "subscription id from client",
        "protocol_error",
        0x82,
        frame(0x30, b"\x00\x01a\x02\x0b\x01"),
    ),
    ("PINGREQ with a body", "malformed_packet", 0x81, b"\xc0\x01\x00"),
    ("PUBACK with trailing bytes", "malformed_packet", 0x81, frame(0x40, b"\x00\x01\x00\x00\x00")),
    ("PUBACK bad reason code", "protocol_error", 0x82, frame(0x40, b"\x00\x01\x92")),
    ("DISCONNECT bad reason code", "protocol_error", 0x82, frame(0xE0, b"\x05")),
    ("second CONNECT", "second_connect", 0x82, raw_connect()),
    ("CONNACK from a client", "protocol_error", 0x82, frame(0x20, b"\x00\x00\x00")),
    ("SUBACK from a client", "protocol_error", 0x82, frame(0x90, b"\x00\x01\x00\x00")),
    ("PINGRESP from a client", "protocol_error", 0x82, b"\xd0\x00"),
    ("AUTH unrequested", "protocol_error", 0x82, b"\xf0\x00"),
]


@pytest.mark.parametrize(
    ("slug", "reason_code", "data"),
    [pytest.param(slug, code, data, id=case) for case, slug, code, data in CONNECTED_V5_CASES],
)
def test_violation_once_connected_v5(slug: str, reason_code: int, data: bytes) -> None:
    connection = connected(MQTT_5)
    violation = violation_of(connection.receive_data(data, 1.0), connection)
    assert (violation.reason, violation.reason_code) == (slug, reason_code)
    assert VIOLATIONS[slug].reason_code == reason_code
    assert connection.data_to_send() == disconnect_v5(reason_code)


# MQTT 3.1.1 has no reason codes after CONNACK: the server just closes.
CONNECTED_V311_CASES: list[tuple[str, str, bytes]] = [
    ("remaining length of 5 bytes", "malformed_remaining_length", b"\x30\xff\xff\xff\xff\x01"),
    ("PUBREL flags 0", "reserved_flags", b"\x60\x02\x00\x01"),
    ("packet type 0", "unknown_packet_type", b"\x00\x00"),
    ("AUTH does not exist in 3.1.1", "unknown_packet_type", b"\xf0\x00"),
    ("PUBLISH QoS 3", "invalid_qos", frame(0x36, b"\x00\x01a\x00\x01")),
    ("PUBLISH DUP on QoS 0", "malformed_packet", frame(0x38, b"\x00\x01a")),
    ("topic with +", "wildcard_in_topic", frame(0x30, b"\x00\x03a/+")),
    ("topic not UTF-8", "invalid_utf8", frame(0x30, b"\x00\x02a\xff")),
    ("empty topic", "empty_topic", frame(0x30, b"\x00\x00x")),
    ("QoS 1 packet id 0", "zero_packet_id", frame(0x32, b"\x00\x01a\x00\x00")),
    ("SUBSCRIBE without filter", "empty_subscribe", frame(0x82, b"\x00\x01")),
    ("subscription reserved bits", "malformed_packet", frame(0x82, b"\x00\x01\x00\x01a\x04")),
    ("PUBACK with reason code", "malformed_packet", frame(0x40, b"\x00\x01\x00")),
    ("DISCONNECT with reason code", "malformed_packet", frame(0xE0, b"\x00")),
    ("filter a/#x", "invalid_topic_filter", frame(0xA2, b"\x00\x01\x00\x04a/#x")),
    ("second CONNECT", "second_connect", raw_connect(4)),
]


@pytest.mark.parametrize(
    ("slug", "data"),
    [pytest.param(slug, data, id=case) for case, slug, data in CONNECTED_V311_CASES],
)
def test_violation_once_connected_v311_sends_nothing(slug: str, data: bytes) -> None:
    connection = connected(MQTT_3_1_1)
    violation = violation_of(connection.receive_data(data, 1.0), connection)
    assert violation.reason == slug
    assert violation.reason_code == VIOLATIONS[slug].reason_code
    assert connection.data_to_send() == b""


# (case id, slug, reason code, first bytes from the client, exact bytes answered)
BEFORE_CONNACK_CASES: list[tuple[str, str, int, bytes, bytes]] = [
    (
        "3.1 client (MQIsdp)",
        "bad_protocol_name",
        0x84,
        raw_connect(3, name=b"MQIsdp"),
        connack_v311(0x01),
    ),
    ("not MQTT at all", "bad_protocol_name", 0x84, raw_connect(4, name=b"HTTP"), b""),
    ("protocol name not UTF-8", "invalid_utf8", 0x81, raw_connect(4, name=b"\xffQTT"), b""),
    ("level 3 under the name MQTT", "bad_protocol_level", 0x84, raw_connect(3), connack_v311(0x01)),
    (
        "level 6",
        "bad_protocol_level",
        0x84,
        raw_connect(6, payload=b"\x00\x00\x01c"),
        connack_v5(0x84),
    ),
    ("v5 reserved connect flag", "malformed_packet", 0x81, raw_connect(5, 0x03), connack_v5(0x81)),
    ("v3.1.1 reserved connect flag", "malformed_packet", 0x81, raw_connect(4, 0x03), b""),
    ("v5 Will QoS 3", "invalid_qos", 0x81, raw_connect(5, 0x1E), connack_v5(0x81)),
    ("v5 Will QoS without Will", "malformed_packet", 0x81, raw_connect(5, 0x0A), connack_v5(0x81)),
    (
        "v5 Will retain without Will",
        "malformed_packet",
        0x81,
        raw_connect(5, 0x22),
        connack_v5(0x81),
    ),
    (
        "v3.1.1 password without user",
        "protocol_error",
        0x82,
        raw_connect(4, 0x42, payload=b"\x00\x01c\x00\x01p"),
        b"",
    ),
    (
        "v5 client id not UTF-8",
        "invalid_utf8",
        0x81,
        raw_connect(5, payload=b"\x00\x00\x01\xff"),
        connack_v5(0x81),
    ),
    (
        "v3.1.1 client id not UTF-8",
        "invalid_utf8",
        0x81,
        raw_connect(4, payload=b"\x00\x01\xff"),
        b"",
    ),
    (
        "v3.1.1 empty id, no clean session",
        "client_id_rejected",
        0x85,
        raw_connect(4, 0x00, payload=b"\x00\x00"),
        connack_v311(0x02),
    ),
    (
        "v5 Will topic wildcard",
        "wildcard_in_topic",
        0x90,
        raw_connect(5, 0x06, payload=b"\x00\x00\x01c\x00\x00\x01#\x00\x00"),
        connack_v5(0x90),
    ),
    (
        "v5 Will topic empty",
        "empty_topic",
        0x82,
        raw_connect(5, 0x06, payload=b"\x00\x00\x01c\x00\x00\x00\x00\x00"),
        connack_v5(0x82),
    ),
    (
        "v5 property not for CONNECT",
        "invalid_property",
        0x81,
        raw_connect(5, payload=b"\x03\x23\x00\x01\x00\x01c"),
        connack_v5(0x81),
    ),
    (
        "v5 receive maximum 0",
        "protocol_error",
        0x82,
        raw_connect(5, payload=b"\x03\x21\x00\x00\x00\x01c"),
        connack_v5(0x82),
    ),
    (
        "v5 CONNECT truncated",
        "malformed_packet",
        0x81,
        raw_connect(5, payload=b"\x00\x00\x05c"),
        connack_v5(0x81),
    ),
    (
        "v5 trailing bytes",
        "malformed_packet",
        0x81,
        raw_connect(5, payload=b"\x00\x00\x01cX"),
        connack_v5(0x81),
    ),
    ("CONNECT flags 1", "reserved_flags", 0x81, b"\x11" + raw_connect(5)[1:], connack_v5(0x81)),
    (
        "CONNECT length of 5 bytes",
        "malformed_remaining_length",
        0x81,
        b"\x10\xff\xff\xff\xff\x01",
        b"",
    ),
    ("PUBLISH first", "publish_before_connect", 0x82, frame(0x30, b"\x00\x01a"), b""),
    ("PINGREQ first", "protocol_error", 0x82, b"\xc0\x00", b""),
    ("AUTH first", "protocol_error", 0x82, b"\xf0\x00", b""),
    ("packet type 0 first", "unknown_packet_type", 0x81, b"\x00\x00", b""),
    ("HTTP request", "protocol_error", 0x82, b"GET / HTTP/1.1\r\n", b""),
]


@pytest.mark.parametrize(
    ("slug", "reason_code", "data", "answer"),
    [
        pytest.param(slug, code, data, answer, id=case)
        for case, slug, code, data, answer in BEFORE_CONNACK_CASES
    ],
)
def test_violation_in_or_before_connect(
    slug: str, reason_code: int, data: bytes, answer: bytes
) -> None:
    connection = ServerConnection()
    violation = violation_of(connection.receive_data(data, 0.0), connection)
    assert (violation.reason, violation.reason_code) == (slug, reason_code)
    assert connection.data_to_send() == answer


@pytest.mark.parametrize(("version", "answer"), [(MQTT_5, disconnect_v5(0x95)), (MQTT_3_1_1, b"")])
def test_packet_too_large_is_refused_from_its_fixed_header(version: int, answer: bytes) -> None:
    connection = connected(version, max_packet_size=100)
    # Remaining length 1000: no body sent, refused all the same.
    violation = violation_of(connection.receive_data(b"\x32\xe8\x07", 1.0), connection)
    assert (violation.reason, violation.reason_code) == ("packet_too_large", 0x95)
    assert connection.data_to_send() == answer


@pytest.mark.parametrize("first_byte", [0x30, 0x32, 0x34, 0x82])
def test_maximum_packet_size_is_the_whole_packet(first_byte: int) -> None:
    limit = 100
    connection = connected(MQTT_5, max_packet_size=limit)
    body_size = limit - 2  # a 1-byte remaining length
    if first_byte == 0x82:  # packet id, no properties, one filter with its options byte
        filter_size = body_size - 6
        body_at_limit = b"\x00\x01\x00" + filter_size.to_bytes(2, "big") + b"a" * filter_size
        body_at_limit += b"\x00"
    else:  # topic "t", a packet id for QoS > 0, no properties, then the payload
        head = b"\x00\x01t" + (b"\x00\x01" if first_byte != 0x30 else b"") + b"\x00"
        body_at_limit = head + b"x" * (body_size - len(head))
    assert len(body_at_limit) == limit - 2
    events = connection.receive_data(frame(first_byte, body_at_limit), 1.0)
    assert events and not connection.closed
    violation = violation_of(
        connection.receive_data(frame(first_byte, body_at_limit + b"x"), 1.0), connection
    )
    assert violation.reason == "packet_too_large"
    assert connection.data_to_send().endswith(disconnect_v5(0x95))


def test_connect_too_large_is_answered_with_connack_0x95() -> None:
    connection = ServerConnection(max_packet_size=20)
    data = raw_connect(5, payload=b"\x00\x00\x10" + b"c" * 16)
    violation = violation_of(connection.receive_data(data, 0.0), connection)
    assert violation.reason == "packet_too_large"
    assert connection.data_to_send() == connack_v5(0x95)


def test_retain_refused_when_unavailable_v5() -> None:
    connection = connected(MQTT_5, retain_available=False)
    violation = violation_of(
        connection.receive_data(frame(0x31, b"\x00\x01a\x00"), 1.0), connection
    )
    assert (violation.reason, violation.reason_code) == ("retain_not_supported", 0x9A)
    assert connection.data_to_send() == disconnect_v5(0x9A)


def test_retained_will_refused_when_unavailable_v5() -> None:
    connection = ServerConnection(retain_available=False)
    data = raw_connect(5, 0x26, payload=b"\x00\x00\x01c\x00\x00\x01w\x00\x00")
    violation = violation_of(connection.receive_data(data, 0.0), connection)
    assert violation.reason == "retain_not_supported"
    assert connection.data_to_send() == connack_v5(0x9A)


def test_retain_is_always_available_in_v311() -> None:
    connection = connected(MQTT_3_1_1, retain_available=False)
    assert len(connection.receive_data(frame(0x31, b"\x00\x01ax"), 1.0)) == 1


def test_disconnect_with_session_expiry_after_connect_without_one() -> None:
    connection = connected(MQTT_5)
    data = frame(0xE0, b"\x00\x05\x11\x00\x00\x00\x0a")
    violation = violation_of(connection.receive_data(data, 1.0), connection)
    assert (violation.reason, violation.reason_code) == ("protocol_error", 0x82)
    assert connection.data_to_send() == disconnect_v5(0x82)


def test_violation_table_is_complete_and_consistent() -> None:
    for slug, codes in VIOLATIONS.items():
        assert slug == slug.lower() and " " not in slug
        assert 0x80 <= codes.reason_code <= 0xA2
        assert codes.v311_connack_code in (None, 1, 2, 3, 4, 5)


def test_violation_mid_buffer_keeps_earlier_events() -> None:
    connection = connected(MQTT_5)
    good = frame(0x30, b"\x00\x01a\x00ok")
    events = connection.receive_data(good + b"\x60\x02\x00\x01" + good, 1.0)
    assert len(events) == 2
    assert events[0].topic == "a"  # type: ignore[union-attr]
    violation: Any = violation_of(events, connection)
    assert violation.reason == "reserved_flags"
