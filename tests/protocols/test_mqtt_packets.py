"""The packet codec on its own: round trips, wire bytes from the spec, framing, refusals."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import PACKET_STRATEGIES, V5_ONLY, VERSIONS

from protocols.mqtt import LocalProtocolError, ProtocolViolation
from protocols.mqtt.packets import (
    MAX_PACKET_SIZE,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
    decode,
    encode,
)

TYPES_AND_VERSIONS = [
    pytest.param(cls, version, id=f"{cls.__name__}-v{version}")
    for cls in PACKET_STRATEGIES
    for version in VERSIONS
    if version == MQTT_5 or cls not in V5_ONLY
]


@pytest.mark.parametrize(("cls", "version"), TYPES_AND_VERSIONS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_packet_round_trips(cls: type, version: int, data: st.DataObject) -> None:
    packet = data.draw(PACKET_STRATEGIES[cls](version))
    wire = encode(packet, version)
    assert decode(wire, version) == (packet, len(wire))
    # Only the first packet of a buffer is decoded, from a memoryview as well.
    assert decode(memoryview(wire + b"\xc0\x00"), version) == (packet, len(wire))


@pytest.mark.parametrize(("cls", "version"), TYPES_AND_VERSIONS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_strict_prefix_is_incomplete(cls: type, version: int, data: st.DataObject) -> None:
    packet = data.draw(PACKET_STRATEGIES[cls](version))
    wire = encode(packet, version)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert decode(wire[:cut], version) == (None, 0)


# Wire bytes worked out by hand from the specification, not from the encoder.
SPEC_EXAMPLES: list[tuple[Packet, int, bytes]] = [
    (Pingreq(), MQTT_3_1_1, b"\xc0\x00"),
    (Pingresp(), MQTT_5, b"\xd0\x00"),
    (Disconnect(), MQTT_3_1_1, b"\xe0\x00"),
    (Disconnect(), MQTT_5, b"\xe0\x00"),
    (Disconnect(0x8D), MQTT_5, b"\xe0\x01\x8d"),
    (Connack(False, 0), MQTT_3_1_1, b"\x20\x02\x00\x00"),
    (Connack(True, 0), MQTT_3_1_1, b"\x20\x02\x01\x00"),
    (Connack(False, 0x84), MQTT_5, b"\x20\x03\x00\x84\x00"),
    (Puback(7), MQTT_3_1_1, b"\x40\x02\x00\x07"),
    (Puback(7), MQTT_5, b"\x40\x02\x00\x07"),
    (Puback(7, 0x80), MQTT_5, b"\x40\x03\x00\x07\x80"),
    (Pubrel(0x1234), MQTT_3_1_1, b"\x62\x02\x12\x34"),
    (Pubcomp(9, 0x92), MQTT_5, b"\x70\x03\x00\x09\x92"),
    (Publish("a/b", b"hi"), MQTT_3_1_1, b"\x30\x07\x00\x03a/bhi"),
    (Publish("a/b", b"hi"), MQTT_5, b"\x30\x08\x00\x03a/b\x00hi"),
    (Publish("a", b"", 1, True, True, 5), MQTT_3_1_1, b"\x3b\x05\x00\x01a\x00\x05"),
    (
        Publish("a", b"", 2, packet_id=1, properties={"message_expiry_interval": 60}),
        MQTT_5,
        b"\x34\x0b\x00\x01a\x00\x01\x05\x02\x00\x00\x00\x3c",
    ),
    (
        Subscribe(10, [("a/+", SubscriptionOptions(1))]),
        MQTT_3_1_1,
        b"\x82\x08\x00\x0a\x00\x03a/+\x01",
    ),
    (
        Subscribe(10, [("a/#", SubscriptionOptions(2, True, True, 2))]),
        MQTT_5,
        b"\x82\x09\x00\x0a\x00\x00\x03a/#\x2e",
    ),
    (Suback(10, [0, 0x80]), MQTT_3_1_1, b"\x90\x04\x00\x0a\x00\x80"),
    (Unsubscribe(3, ["x"]), MQTT_3_1_1, b"\xa2\x05\x00\x03\x00\x01x"),
    (Unsuback(3), MQTT_3_1_1, b"\xb0\x02\x00\x03"),
    (Unsuback(3, [0x11]), MQTT_5, b"\xb0\x04\x00\x03\x00\x11"),
    (Auth(0x18, {"authentication_method": "m"}), MQTT_5, b"\xf0\x06\x18\x04\x15\x00\x01m"),
    (
        Connect(4, "c", True, 60),
        MQTT_3_1_1,
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01c",
    ),
    (
        Connect(5, "c", False, 10, "u", b"p", Will("w", b"!", 1, True)),
        MQTT_5,
        b"\x10\x1b\x00\x04MQTT\x05\xec\x00\x0a\x00\x00\x01c\x00\x00\x01w\x00\x01!"
        b"\x00\x01u\x00\x01p",
    ),
    (
        Connack(False, 0, {"user_property": [("k", "v"), ("k", "w")]}),
        MQTT_5,
        b"\x20\x11\x00\x00\x0e\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w",
    ),
]


@pytest.mark.parametrize(("packet", "version", "wire"), SPEC_EXAMPLES)
def test_wire_bytes_match_the_specification(packet: Packet, version: int, wire: bytes) -> None:
    assert encode(packet, version) == wire
    assert decode(wire, version) == (packet, len(wire))


def test_user_properties_keep_their_order_and_repeats() -> None:
    pairs = [("b", "2"), ("a", "1"), ("b", "3")]
    packet = Publish("t", b"", properties={"user_property": pairs})
    decoded, _ = decode(encode(packet, MQTT_5), MQTT_5)
    assert isinstance(decoded, Publish)
    assert decoded.properties["user_property"] == pairs


@pytest.mark.parametrize("size", [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
def test_remaining_length_boundaries(size: int) -> None:
    # 0x30, 2-byte topic length, topic "t", then payload: remaining length = size + 3.
    packet = Publish("t", b"\x00" * max(0, size - 3))
    wire = encode(packet, MQTT_3_1_1)
    assert decode(wire, MQTT_3_1_1) == (packet, len(wire))


def test_largest_remaining_length_is_read_without_the_body() -> None:
    header = b"\x30\xff\xff\xff\x7f"  # 268,435,455: the largest the wire format allows
    assert decode(header, MQTT_5) == (None, 0)
    assert MAX_PACKET_SIZE == 268_435_455 + 5


def test_too_large_is_refused_from_the_fixed_header_alone() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        decode(b"\x30\xe8\x07", MQTT_5, max_packet_size=1000)  # 1000 + 3 bytes, no body yet
    assert caught.value.reason == "packet_too_large"
    assert caught.value.reason_code == 0x95


def test_maximum_packet_size_counts_the_whole_packet() -> None:
    wire = encode(Publish("t", b"x" * 95), MQTT_3_1_1)  # 2 + 98 = 100 bytes
    assert len(wire) == 100
    assert decode(wire, MQTT_3_1_1, max_packet_size=100)[1] == 100
    with pytest.raises(ProtocolViolation, match="exceeds maximum of 99"):
        decode(wire, MQTT_3_1_1, max_packet_size=99)


def test_empty_buffer_is_incomplete() -> None:
    assert decode(b"", MQTT_5) == (None, 0)


@pytest.mark.parametrize("version", [3, 6, 0])
def test_unsupported_version_is_a_local_error(version: int) -> None:
    with pytest.raises(LocalProtocolError):
        decode(b"\xc0\x00", version)
    with pytest.raises(LocalProtocolError):
        encode(Pingreq(), version)


def test_connect_is_read_at_its_own_level_whatever_the_version_argument() -> None:
    packet = Connect(5, "c", properties={"session_expiry_interval": 30})
    assert decode(encode(packet, MQTT_5), MQTT_3_1_1)[0] == packet


# Everything the decoder rejects, the encoder refuses to produce in the first place.
UNENCODABLE: list[tuple[Any, int]] = [
    (Publish("a/+", b""), MQTT_5),
    (Publish("a/#", b""), MQTT_3_1_1),
    (Publish("a\x00", b""), MQTT_3_1_1),
    (Publish("\ud800", b""), MQTT_3_1_1),
    (Publish("", b""), MQTT_3_1_1),
    (Publish("", b""), MQTT_5),
    (Publish("a", b"", 3, packet_id=1), MQTT_5),
    (Publish("a", b"", 0, dup=True), MQTT_5),
    (Publish("a", b"", 0, packet_id=1), MQTT_5),
    (Publish("a", b"", 1), MQTT_5),
    (Publish("a", b"", 1, packet_id=0), MQTT_5),
    (Publish("a", b"", 1, packet_id=65536), MQTT_5),
    (Publish("a", "text", 0), MQTT_5),  # type: ignore[arg-type]
    (Publish("a", b"", properties={"content_type": "x"}), MQTT_3_1_1),
    (Publish("a", b"", properties={"no_such_property": 1}), MQTT_5),
    (Publish("a", b"", properties={"session_expiry_interval": 1}), MQTT_5),
    (Publish("a", b"", properties={"payload_format_indicator": 2}), MQTT_5),
    (Publish("a", b"", properties={"topic_alias": 0}), MQTT_5),
    (Publish("a", b"", properties={"response_topic": "r/#"}), MQTT_5),
    (Publish("a", b"", properties={"user_property": []}), MQTT_5),
    (Publish("a", b"", properties={"user_property": ("k", "v")}), MQTT_5),
    (Publish("a", b"", properties={"message_expiry_interval": 2**32}), MQTT_5),
    (Publish("a", b"", properties={"subscription_identifier": [268_435_456]}), MQTT_5),
    (Connect(4, "c"), MQTT_5),
    (Connect(4, "c", password=b"p"), MQTT_3_1_1),
    (Connect(4, "c", properties={"receive_maximum": 5}), MQTT_3_1_1),
    (Connect(5, "c", will=Will("w/+", b"")), MQTT_5),
    (Connect(5, "c", will=Will("", b"")), MQTT_5),
    (Connect(5, "c", will=Will("w", b"", 3)), MQTT_5),
    (Connect(4, "c", will=Will("w", b"", properties={"content_type": "x"})), MQTT_3_1_1),
    (Connect(5, "c" * 70_000), MQTT_5),
    (Connect(5, "c", keepalive=65_536), MQTT_5),
    (Connack(True, 0x80), MQTT_5),
    (Connack(False, 0x10), MQTT_5),
    (Connack(False, 6), MQTT_3_1_1),
    (Connack(False, 0, {"reason_string": "x"}), MQTT_3_1_1),
    (Puback(1, 0x80), MQTT_3_1_1),
    (Puback(1, properties={"reason_string": "x"}), MQTT_3_1_1),
    (Puback(1, 0x92), MQTT_5),
    (Puback(0), MQTT_5),
    (Pubrel(1, 0x80), MQTT_5),
    (Subscribe(1, []), MQTT_5),
    (Subscribe(1, [("a/#/b", SubscriptionOptions())]), MQTT_5),
    (Subscribe(1, [("a+", SubscriptionOptions())]), MQTT_5),
    (Subscribe(1, [("", SubscriptionOptions())]), MQTT_5),
    (Subscribe(1, [("$share//a", SubscriptionOptions())]), MQTT_5),
    (Subscribe(1, [("$share/g", SubscriptionOptions())]), MQTT_5),
    (Subscribe(1, [("$share/g/a", SubscriptionOptions(no_local=True))]), MQTT_5),
    (Subscribe(1, [("a", SubscriptionOptions(3))]), MQTT_5),
    (Subscribe(1, [("a", SubscriptionOptions(retain_handling=3))]), MQTT_5),
    (Subscribe(1, [("a", SubscriptionOptions(no_local=True))]), MQTT_3_1_1),
    (Subscribe(1, [("a", SubscriptionOptions())], {"user_property": [("k", "v")]}), MQTT_3_1_1),
    (
        Subscribe(1, [("a", SubscriptionOptions())], {"subscription_identifier": [1, 2]}),
        MQTT_5,
    ),
    (Suback(1, []), MQTT_5),
    (Suback(1, [0x05]), MQTT_5),
    (Suback(1, [0x87]), MQTT_3_1_1),
    (Suback(1, [0], {"reason_string": "x"}), MQTT_3_1_1),
    (Unsubscribe(1, []), MQTT_5),
    (Unsubscribe(1, ["a/#/"]), MQTT_5),
    (Unsubscribe(1, ["a"], {"user_property": [("k", "v")]}), MQTT_3_1_1),
    (Unsuback(1), MQTT_5),
    (Unsuback(1, [0]), MQTT_3_1_1),
    (Unsuback(1, [0x92]), MQTT_5),
    (Unsuback(1, [], {"reason_string": "x"}), MQTT_3_1_1),
    (Disconnect(0x80), MQTT_3_1_1),
    (Disconnect(0, {"reason_string": "x"}), MQTT_3_1_1),
    (Disconnect(0x92), MQTT_5),
    (Auth(), MQTT_3_1_1),
    (Auth(0x80), MQTT_5),
    ("not a packet", MQTT_5),
]


@pytest.mark.parametrize(("packet", "version"), UNENCODABLE)
def test_encode_refuses_what_a_peer_would_reject(packet: Any, version: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode(packet, version)


# Packets only a server sends, and codec-level checks the connection never reaches.
DECODE_VIOLATIONS: list[tuple[str, int, bytes, str, int]] = [
    ("packet type 0", MQTT_5, b"\x00\x00", "unknown_packet_type", 0x81),
    ("AUTH in 3.1.1", MQTT_3_1_1, b"\xf0\x00", "unknown_packet_type", 0x81),
    ("CONNACK reserved flags", MQTT_3_1_1, b"\x20\x02\x02\x00", "malformed_packet", 0x81),
    ("CONNACK return code 6", MQTT_3_1_1, b"\x20\x02\x00\x06", "protocol_error", 0x82),
    ("CONNACK reason code 0x10", MQTT_5, b"\x20\x03\x00\x10\x00", "protocol_error", 0x82),
    ("CONNACK refusal with session", MQTT_3_1_1, b"\x20\x02\x01\x05", "protocol_error", 0x82),
    ("CONNACK trailing byte", MQTT_3_1_1, b"\x20\x03\x00\x00\x00", "malformed_packet", 0x81),
    ("SUBACK without codes", MQTT_3_1_1, b"\x90\x02\x00\x01", "protocol_error", 0x82),
    ("SUBACK code 0x87 in 3.1.1", MQTT_3_1_1, b"\x90\x03\x00\x01\x87", "protocol_error", 0x82),
    ("SUBACK code 0x03", MQTT_5, b"\x90\x04\x00\x01\x00\x03", "protocol_error", 0x82),
    ("UNSUBACK without codes", MQTT_5, b"\xb0\x03\x00\x01\x00", "protocol_error", 0x82),
    ("UNSUBACK 3.1.1 with codes", MQTT_3_1_1, b"\xb0\x03\x00\x01\x00", "malformed_packet", 0x81),
    ("PINGRESP with a body", MQTT_5, b"\xd0\x01\x00", "malformed_packet", 0x81),
    ("AUTH bad reason code", MQTT_5, b"\xf0\x01\x80", "protocol_error", 0x82),
    ("AUTH property not allowed", MQTT_5, b"\xf0\x04\x18\x02\x01\x00", "invalid_property", 0x81),
]


@pytest.mark.parametrize(
    ("version", "wire", "slug", "reason_code"),
    [pytest.param(v, w, s, c, id=case) for case, v, w, s, c in DECODE_VIOLATIONS],
)
def test_decode_rejects(version: int, wire: bytes, slug: str, reason_code: int) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        decode(wire, version)
    assert (caught.value.reason, caught.value.reason_code) == (slug, reason_code)
    assert slug in repr(caught.value) and str(caught.value)


def test_binary_fields_must_be_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="expected bytes"):
        encode(Connect(5, "c", password="secret"), MQTT_5)  # type: ignore[arg-type]
