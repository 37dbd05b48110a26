"""MQTT 3.1.1 (protocol level 4) and 5.0 (level 5) packets, and their wire codec.

Every packet is a frozen `msgspec.Struct`; `encode(packet, version)` turns any of them into
bytes and `decode(buffer, version)` parses the first complete packet of a buffer. Both
directions are covered, so the same module serves the server, tests and load generators.

Decoding is strict: anything the specification calls malformed or a protocol error raises
`ProtocolViolation` naming a slug from `errors.VIOLATIONS`. Encoding refuses (with
`LocalProtocolError`) anything that `decode` would reject, so `decode(encode(p, v), v)` gives
`p` back for every packet `encode` accepts.

MQTT 5 properties are plain dicts keyed by snake_case names (see `PROPERTIES`); the two that
may repeat, `user_property` and `subscription_identifier`, are always lists.

Maximum packet size, as in MQTT 5, counts the whole packet: fixed header included.
"""

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any, Final, TypeAlias

import msgspec

from .errors import LocalProtocolError, ProtocolViolation, ReasonCode

MQTT_3_1_1: Final = 4
MQTT_5: Final = 5
SUPPORTED_VERSIONS: Final = (MQTT_3_1_1, MQTT_5)
MAX_REMAINING_LENGTH: Final = 268_435_455
MAX_PACKET_SIZE: Final = MAX_REMAINING_LENGTH + 5
"""The largest packet the wire format can carry: 4-byte remaining length plus its header."""


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


# --------------------------------------------------------------------------- packets


class Will(msgspec.Struct, frozen=True, gc=False):
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = {}


class Connect(msgspec.Struct, frozen=True, gc=False):
    protocol_level: int
    client_id: str
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: dict[str, Any] = {}


class Connack(msgspec.Struct, frozen=True, gc=False):
    session_present: bool = False
    reason_code: int = 0
    properties: dict[str, Any] = {}


class Publish(msgspec.Struct, frozen=True, gc=False):
    """An application message. Positional order is part of the API (the hot path uses it)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: dict[str, Any] = {}


class Puback(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = {}


class Pubrec(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = {}


class Pubrel(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = {}


class Pubcomp(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = {}


class SubscriptionOptions(msgspec.Struct, frozen=True, gc=False):
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


class Subscribe(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    subscriptions: list[tuple[str, SubscriptionOptions]]
    properties: dict[str, Any] = {}


class Suback(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_codes: list[int]
    properties: dict[str, Any] = {}


class Unsubscribe(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    topic_filters: list[str]
    properties: dict[str, Any] = {}


class Unsuback(msgspec.Struct, frozen=True, gc=False):
    """In MQTT 3.1.1 an UNSUBACK carries no reason codes: `reason_codes` is then empty."""

    packet_id: int
    reason_codes: list[int] = []
    properties: dict[str, Any] = {}


class Pingreq(msgspec.Struct, frozen=True, gc=False):
    pass


class Pingresp(msgspec.Struct, frozen=True, gc=False):
    pass


class Disconnect(msgspec.Struct, frozen=True, gc=False):
    reason_code: int = 0
    properties: dict[str, Any] = {}


class Auth(msgspec.Struct, frozen=True, gc=False):
    """MQTT 5 only."""

    reason_code: int = 0
    properties: dict[str, Any] = {}


Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)

# --------------------------------------------------------------------------- tables

_BYTE, _TWO_BYTE_INT, _FOUR_BYTE_INT, _VARINT, _STRING, _BINARY, _STRING_PAIR = range(7)

PROPERTIES: Final[dict[int, tuple[str, int]]] = {
    0x01: ("payload_format_indicator", _BYTE),
    0x02: ("message_expiry_interval", _FOUR_BYTE_INT),
    0x03: ("content_type", _STRING),
    0x08: ("response_topic", _STRING),
    0x09: ("correlation_data", _BINARY),
    0x0B: ("subscription_identifier", _VARINT),
    0x11: ("session_expiry_interval", _FOUR_BYTE_INT),
    0x12: ("assigned_client_identifier", _STRING),
    0x13: ("server_keep_alive", _TWO_BYTE_INT),
    0x15: ("authentication_method", _STRING),
    0x16: ("authentication_data", _BINARY),
    0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval", _FOUR_BYTE_INT),
    0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _STRING),
    0x1C: ("server_reference", _STRING),
    0x1F: ("reason_string", _STRING),
    0x21: ("receive_maximum", _TWO_BYTE_INT),
    0x22: ("topic_alias_maximum", _TWO_BYTE_INT),
    0x23: ("topic_alias", _TWO_BYTE_INT),
    0x24: ("maximum_qos", _BYTE),
    0x25: ("retain_available", _BYTE),
    0x26: ("user_property", _STRING_PAIR),
    0x27: ("maximum_packet_size", _FOUR_BYTE_INT),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}
"""MQTT 5 property identifier → (name, wire type). Spec section 2.2.2.2."""

PROPERTY_IDS: Final[dict[str, int]] = {name: ident for ident, (name, _) in PROPERTIES.items()}
REPEATABLE_PROPERTIES: Final = frozenset({"user_property", "subscription_identifier"})
"""May appear more than once on the wire; always a list in the dict."""

_ZERO_OR_ONE_PROPERTIES: Final = frozenset(
    {
        "payload_format_indicator",
        "request_problem_information",
        "request_response_information",
        "maximum_qos",
        "retain_available",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
    }
)
_NONZERO_PROPERTIES: Final = frozenset(
    {"receive_maximum", "maximum_packet_size", "topic_alias", "subscription_identifier"}
)


def _ids(*names: str) -> frozenset[int]:
    return frozenset(PROPERTY_IDS[name] for name in names)


_ACK_PROPERTIES = _ids("reason_string", "user_property")
ALLOWED_PROPERTIES: Final[dict[str, frozenset[int]]] = {
    "CONNECT": _ids(
        "session_expiry_interval",
        "receive_maximum",
        "maximum_packet_size",
        "topic_alias_maximum",
        "request_response_information",
        "request_problem_information",
        "user_property",
        "authentication_method",
        "authentication_data",
    ),
    "WILL": _ids(
        "will_delay_interval",
        "payload_format_indicator",
        "message_expiry_interval",
        "content_type",
        "response_topic",
        "correlation_data",
        "user_property",
    ),
    "CONNACK": _ids(
        "session_expiry_interval",
        "receive_maximum",
        "maximum_qos",
        "retain_available",
        "maximum_packet_size",
        "assigned_client_identifier",
        "topic_alias_maximum",
        "reason_string",
        "user_property",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
        "server_keep_alive",
        "response_information",
        "server_reference",
        "authentication_method",
        "authentication_data",
    ),
    "PUBLISH": _ids(
        "payload_format_indicator",
        "message_expiry_interval",
        "topic_alias",
        "response_topic",
        "correlation_data",
        "user_property",
        "subscription_identifier",
        "content_type",
    ),
    "PUBACK": _ACK_PROPERTIES,
    "PUBREC": _ACK_PROPERTIES,
    "PUBREL": _ACK_PROPERTIES,
    "PUBCOMP": _ACK_PROPERTIES,
    "SUBSCRIBE": _ids("subscription_identifier", "user_property"),
    "SUBACK": _ACK_PROPERTIES,
    "UNSUBSCRIBE": _ids("user_property"),
    "UNSUBACK": _ACK_PROPERTIES,
    "DISCONNECT": _ids(
        "session_expiry_interval", "reason_string", "user_property", "server_reference"
    ),
    "AUTH": _ids("authentication_method", "authentication_data", "reason_string", "user_property"),
}
"""Which properties each packet (and the Will) may carry. Anything else is malformed."""

_R = ReasonCode
_PUBACK_CODES = frozenset(
    {
        _R.SUCCESS,
        _R.NO_MATCHING_SUBSCRIBERS,
        _R.UNSPECIFIED_ERROR,
        _R.IMPLEMENTATION_SPECIFIC_ERROR,
        _R.NOT_AUTHORIZED,
        _R.TOPIC_NAME_INVALID,
        _R.PACKET_IDENTIFIER_IN_USE,
        _R.QUOTA_EXCEEDED,
        _R.PAYLOAD_FORMAT_INVALID,
    }
)
_PUBREL_CODES = frozenset({_R.SUCCESS, _R.PACKET_IDENTIFIER_NOT_FOUND})
REASON_CODES: Final[dict[str, frozenset[int]]] = {
    "CONNACK": frozenset(
        {
            _R.SUCCESS,
            _R.UNSPECIFIED_ERROR,
            _R.MALFORMED_PACKET,
            _R.PROTOCOL_ERROR,
            _R.IMPLEMENTATION_SPECIFIC_ERROR,
            _R.UNSUPPORTED_PROTOCOL_VERSION,
            _R.CLIENT_IDENTIFIER_NOT_VALID,
            _R.BAD_USER_NAME_OR_PASSWORD,
            _R.NOT_AUTHORIZED,
            _R.SERVER_UNAVAILABLE,
            _R.SERVER_BUSY,
            _R.BANNED,
            _R.BAD_AUTHENTICATION_METHOD,
            _R.TOPIC_NAME_INVALID,
            _R.PACKET_TOO_LARGE,
            _R.QUOTA_EXCEEDED,
            _R.PAYLOAD_FORMAT_INVALID,
            _R.RETAIN_NOT_SUPPORTED,
            _R.QOS_NOT_SUPPORTED,
            _R.USE_ANOTHER_SERVER,
            _R.SERVER_MOVED,
            _R.CONNECTION_RATE_EXCEEDED,
        }
    ),
    "PUBACK": _PUBACK_CODES,
    "PUBREC": _PUBACK_CODES,
    "PUBREL": _PUBREL_CODES,
    "PUBCOMP": _PUBREL_CODES,
    "SUBACK": frozenset(
        {
            _R.GRANTED_QOS_0,
            _R.GRANTED_QOS_1,
            _R.GRANTED_QOS_2,
            _R.UNSPECIFIED_ERROR,
            _R.IMPLEMENTATION_SPECIFIC_ERROR,
            _R.NOT_AUTHORIZED,
            _R.TOPIC_FILTER_INVALID,
            _R.PACKET_IDENTIFIER_IN_USE,
            _R.QUOTA_EXCEEDED,
            _R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
            _R.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
            _R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
        }
    ),
    "UNSUBACK": frozenset(
        {
            _R.SUCCESS,
            _R.NO_SUBSCRIPTION_EXISTED,
            _R.UNSPECIFIED_ERROR,
            _R.IMPLEMENTATION_SPECIFIC_ERROR,
            _R.NOT_AUTHORIZED,
            _R.TOPIC_FILTER_INVALID,
            _R.PACKET_IDENTIFIER_IN_USE,
        }
    ),
    "DISCONNECT": frozenset(
        {
            _R.NORMAL_DISCONNECTION,
            _R.DISCONNECT_WITH_WILL_MESSAGE,
            *range(0x80, 0x84),
            _R.NOT_AUTHORIZED,
            _R.SERVER_BUSY,
            _R.SERVER_SHUTTING_DOWN,
            *range(0x8D, 0x92),
            *range(0x93, 0xA3),
        }
    ),
    "AUTH": frozenset({_R.SUCCESS, _R.CONTINUE_AUTHENTICATION, _R.RE_AUTHENTICATE}),
}
"""MQTT 5 reason codes each packet may carry (spec section 2.4)."""

V311_CONNACK_CODES: Final = frozenset(range(6))
V311_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})

_REQUIRED_FLAGS: Final = (0, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)
"""Fixed-header flag nibble per packet type (-1: PUBLISH, whose flags carry meaning)."""

# --------------------------------------------------------------------------- helpers


def _violation(reason: str, message: str) -> ProtocolViolation:
    return ProtocolViolation(reason, message)


def decode_utf8(raw: bytes | bytearray | memoryview, what: str) -> str:
    """Strict MQTT UTF-8: well-formed (no surrogates, no overlongs) and no U+0000."""
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise _violation("invalid_utf8", f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise _violation("invalid_utf8", f"{what} contains U+0000")
    return text


def decode_topic_name(raw: bytes | bytearray | memoryview, what: str = "topic name") -> str:
    """A topic name as PUBLISH carries it: strict UTF-8 and no wildcard. Empty is allowed
    here (MQTT 5 topic aliases); the caller decides whether it may be."""
    text = decode_utf8(raw, what)
    if "+" in text or "#" in text:
        raise _violation("wildcard_in_topic", f"{what} {text!r} contains a wildcard")
    return text


def validate_topic_filter(topic_filter: str, version: int) -> bool:
    """Raise unless `topic_filter` is a well-formed filter; return whether it is shared."""
    shared = False
    body = topic_filter
    if version == MQTT_5 and topic_filter.startswith("$share/"):
        share_name, slash, body = topic_filter[7:].partition("/")
        if not share_name or not slash or "+" in share_name or "#" in share_name:
            raise _violation("invalid_topic_filter", f"bad shared subscription {topic_filter!r}")
        shared = True
    if not body:
        raise _violation("invalid_topic_filter", f"empty topic filter in {topic_filter!r}")
    levels = body.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if ("#" in level and (level != "#" or index != last)) or ("+" in level and level != "+"):
            raise _violation(
                "invalid_topic_filter", f"wildcard misplaced in topic filter {topic_filter!r}"
            )
    return shared


def _property_problem(name: str, value: Any) -> tuple[str, str] | None:
    """Value rules of the spec beyond the wire type: (violation slug, message) or None."""
    if name in _ZERO_OR_ONE_PROPERTIES and value not in (0, 1):
        return "protocol_error", f"{name} must be 0 or 1, not {value}"
    if name in _NONZERO_PROPERTIES and value == 0:
        return "protocol_error", f"{name} must not be 0"
    if name == "response_topic" and ("+" in value or "#" in value):
        return "wildcard_in_topic", f"response_topic {value!r} contains a wildcard"
    return None


class _Reader:
    """Bounds-checked reads of one packet body: anything past `end` is malformed."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, count: int, what: str) -> int:
        start = self.pos
        if start + count > self.end:
            raise _violation("malformed_packet", f"{what} runs past the end of the packet")
        self.pos = start + count
        return start

    def u8(self, what: str) -> int:
        return self.buf[self.take(1, what)]

    def u16(self, what: str) -> int:
        start = self.take(2, what)
        return (self.buf[start] << 8) | self.buf[start + 1]

    def u32(self, what: str) -> int:
        start = self.take(4, what)
        value: int = struct.unpack_from(">I", self.buf, start)[0]
        return value

    def varint(self, what: str) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and shift:
                    raise _violation("malformed_packet", f"{what} is not minimally encoded")
                return value
        raise _violation("malformed_packet", f"{what} is longer than 4 bytes")

    def raw_string(self, what: str) -> bytes | bytearray | memoryview:
        length = self.u16(what)
        start = self.take(length, what)
        return self.buf[start : start + length]

    def string(self, what: str) -> str:
        return decode_utf8(self.raw_string(what), what)

    def binary(self, what: str) -> bytes:
        return bytes(self.raw_string(what))

    def rest(self) -> bytes:
        start, self.pos = self.pos, self.end
        return bytes(self.buf[start : self.end])

    def expect_end(self, where: str) -> None:
        if self.pos != self.end:
            raise _violation(
                "malformed_packet", f"{self.end - self.pos} unexpected bytes in {where}"
            )

    def properties(self, where: str) -> dict[str, Any]:
        allowed = ALLOWED_PROPERTIES[where]
        length = self.varint(f"{where} property length")
        start = self.take(length, f"{where} properties")
        inner = _Reader(self.buf, start, start + length)
        result: dict[str, Any] = {}
        while inner.pos < inner.end:
            ident = inner.varint(f"{where} property identifier")
            if ident not in allowed:
                raise _violation(
                    "invalid_property", f"property 0x{ident:02x} is not allowed in {where}"
                )
            name, kind = PROPERTIES[ident]
            value = inner.value(kind, name)
            problem = _property_problem(name, value)
            if problem is not None:
                raise _violation(*problem)
            if name in REPEATABLE_PROPERTIES:
                result.setdefault(name, []).append(value)
            elif name in result:
                raise _violation("duplicate_property", f"{name} appears twice in {where}")
            else:
                result[name] = value
        return result

    def value(self, kind: int, name: str) -> Any:
        if kind == _BYTE:
            return self.u8(name)
        if kind == _TWO_BYTE_INT:
            return self.u16(name)
        if kind == _FOUR_BYTE_INT:
            return self.u32(name)
        if kind == _VARINT:
            return self.varint(name)
        if kind == _STRING:
            return self.string(name)
        if kind == _BINARY:
            return self.binary(name)
        return (self.string(f"{name} key"), self.string(f"{name} value"))


# --------------------------------------------------------------------------- decoding


def check_first_byte(first: int, version: int) -> None:
    """Validate the fixed header's first byte alone, before any more of the packet arrives."""
    packet_type = first >> 4
    flags = first & 0x0F
    if packet_type == 0 or (packet_type == PacketType.AUTH and version != MQTT_5):
        raise _violation("unknown_packet_type", f"packet type {packet_type} is reserved")
    if packet_type == PacketType.PUBLISH:
        if flags & 0x06 == 0x06:
            raise _violation("invalid_qos", "PUBLISH with QoS 3")
        if flags & 0x08 and not flags & 0x06:
            raise _violation("malformed_packet", "PUBLISH with DUP set on QoS 0")
    elif flags != _REQUIRED_FLAGS[packet_type]:
        raise _violation(
            "reserved_flags",
            f"{PacketType(packet_type).name} fixed-header flags are 0x{flags:x}, "
            f"not 0x{_REQUIRED_FLAGS[packet_type]:x}",
        )


def read_fixed_header(
    buf: bytes | bytearray | memoryview, pos: int, max_packet_size: int
) -> tuple[int, int]:
    """Read the remaining length after the first byte at `pos`.

    Returns (remaining_length, body_start), or (-1, -1) when the length is still incomplete.
    Raises as soon as the length is known to be malformed or larger than `max_packet_size`.
    """
    value = 0
    shift = 0
    index = pos + 1
    size = len(buf)
    while True:
        if index >= size:
            return -1, -1
        byte = buf[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift == 28:
            raise _violation("malformed_remaining_length", "remaining length exceeds 4 bytes")
    if byte == 0 and index - pos > 2:
        raise _violation("malformed_remaining_length", "remaining length is not minimal")
    if index - pos + value > max_packet_size:
        raise _violation(
            "packet_too_large",
            f"packet of {index - pos + value} bytes exceeds maximum of {max_packet_size}",
        )
    return value, index


def _packet_id(reader: _Reader, where: str) -> int:
    packet_id = reader.u16(f"{where} packet identifier")
    if packet_id == 0:
        raise _violation("zero_packet_id", f"{where} with packet identifier 0")
    return packet_id


def _reason_code(reader: _Reader, where: str) -> int:
    code = reader.u8(f"{where} reason code")
    if code not in REASON_CODES[where]:
        raise _violation("protocol_error", f"reason code 0x{code:02x} is not valid in {where}")
    return code


def _decode_connect(reader: _Reader, flags: int, version: int) -> Connect:
    name = reader.string("protocol name")
    if name != "MQTT":
        raise _violation("bad_protocol_name", f"protocol name {name!r} is not 'MQTT'")
    level = reader.u8("protocol level")
    if level not in SUPPORTED_VERSIONS:
        raise _violation("bad_protocol_level", f"protocol level {level} is not 4 or 5")
    connect_flags = reader.u8("connect flags")
    if connect_flags & 0x01:
        raise _violation("malformed_packet", "CONNECT reserved flag is set")
    has_will = bool(connect_flags & 0x04)
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = bool(connect_flags & 0x20)
    has_password = bool(connect_flags & 0x40)
    has_username = bool(connect_flags & 0x80)
    if will_qos == 3:
        raise _violation("invalid_qos", "Will QoS 3")
    if not has_will and (will_qos or will_retain):
        raise _violation("malformed_packet", "Will QoS or Will Retain set without a Will")
    if level == MQTT_3_1_1 and has_password and not has_username:
        raise _violation("protocol_error", "password without user name in MQTT 3.1.1")
    keepalive = reader.u16("keep alive")
    properties = reader.properties("CONNECT") if level == MQTT_5 else {}
    client_id = reader.string("client identifier")
    will = None
    if has_will:
        will_properties = reader.properties("WILL") if level == MQTT_5 else {}
        will_topic = decode_topic_name(reader.raw_string("Will topic"), "Will topic")
        if not will_topic:
            raise _violation("empty_topic", "Will topic is empty")
        will_payload = reader.binary("Will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = reader.string("user name") if has_username else None
    password = reader.binary("password") if has_password else None
    reader.expect_end("CONNECT")
    return Connect(
        level,
        client_id,
        bool(connect_flags & 0x02),
        keepalive,
        username,
        password,
        will,
        properties,
    )


def _decode_connack(reader: _Reader, flags: int, version: int) -> Connack:
    acknowledge_flags = reader.u8("CONNACK flags")
    if acknowledge_flags & 0xFE:
        raise _violation("malformed_packet", "CONNACK reserved flags are set")
    if version == MQTT_5:
        code = _reason_code(reader, "CONNACK")
        properties = reader.properties("CONNACK")
    else:
        code = reader.u8("CONNACK return code")
        if code not in V311_CONNACK_CODES:
            raise _violation("protocol_error", f"CONNACK return code {code} is reserved")
        properties = {}
    session_present = bool(acknowledge_flags)
    if session_present and code:
        raise _violation("protocol_error", "CONNACK refuses but says the session is present")
    reader.expect_end("CONNACK")
    return Connack(session_present, code, properties)


def _decode_publish(reader: _Reader, flags: int, version: int) -> Publish:
    qos = (flags >> 1) & 0x03
    topic = decode_topic_name(reader.raw_string("topic name"))
    packet_id = _packet_id(reader, "PUBLISH") if qos else None
    properties = reader.properties("PUBLISH") if version == MQTT_5 else {}
    if not topic and "topic_alias" not in properties:
        raise _violation("empty_topic", "PUBLISH topic name is empty")
    payload = reader.rest()
    return Publish(
        topic, payload, qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, properties
    )


_AckType: TypeAlias = type[Puback] | type[Pubrec] | type[Pubrel] | type[Pubcomp]


def _ack_decoder(cls: _AckType) -> Callable[[_Reader, int, int], Packet]:
    where = cls.__name__.upper()

    def decode_ack(reader: _Reader, flags: int, version: int) -> Packet:
        packet_id = _packet_id(reader, where)
        code = 0
        properties: dict[str, Any] = {}
        if version == MQTT_5 and reader.remaining:
            code = _reason_code(reader, where)
            if reader.remaining:
                properties = reader.properties(where)
        reader.expect_end(where)
        return cls(packet_id, code, properties)

    return decode_ack


def _decode_subscribe(reader: _Reader, flags: int, version: int) -> Subscribe:
    packet_id = _packet_id(reader, "SUBSCRIBE")
    properties = reader.properties("SUBSCRIBE") if version == MQTT_5 else {}
    if len(properties.get("subscription_identifier", ())) > 1:
        raise _violation("protocol_error", "SUBSCRIBE with more than one subscription identifier")
    subscriptions: list[tuple[str, SubscriptionOptions]] = []
    while reader.remaining:
        topic_filter = reader.string("topic filter")
        shared = validate_topic_filter(topic_filter, version)
        options = reader.u8("subscription options")
        if options & (0xC0 if version == MQTT_5 else 0xFC):
            raise _violation("malformed_packet", "subscription options reserved bits are set")
        qos = options & 0x03
        if qos == 3:
            raise _violation("invalid_qos", f"subscription to {topic_filter!r} with QoS 3")
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise _violation("protocol_error", "retain handling 3 is reserved")
        no_local = bool(options & 0x04)
        if shared and no_local:
            raise _violation("protocol_error", "No Local on a shared subscription")
        subscriptions.append(
            (
                topic_filter,
                SubscriptionOptions(qos, no_local, bool(options & 0x08), retain_handling),
            )
        )
    if not subscriptions:
        raise _violation("empty_subscribe", "SUBSCRIBE without any topic filter")
    return Subscribe(packet_id, subscriptions, properties)


def _decode_suback(reader: _Reader, flags: int, version: int) -> Suback:
    packet_id = _packet_id(reader, "SUBACK")
    properties = reader.properties("SUBACK") if version == MQTT_5 else {}
    allowed = REASON_CODES["SUBACK"] if version == MQTT_5 else V311_SUBACK_CODES
    codes = list(reader.rest())
    if not codes:
        raise _violation("protocol_error", "SUBACK without any reason code")
    for code in codes:
        if code not in allowed:
            raise _violation("protocol_error", f"reason code 0x{code:02x} is not valid in SUBACK")
    return Suback(packet_id, codes, properties)


def _decode_unsubscribe(reader: _Reader, flags: int, version: int) -> Unsubscribe:
    packet_id = _packet_id(reader, "UNSUBSCRIBE")
    properties = reader.properties("UNSUBSCRIBE") if version == MQTT_5 else {}
    topic_filters: list[str] = []
    while reader.remaining:
        topic_filter = reader.string("topic filter")
        validate_topic_filter(topic_filter, version)
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise _violation("empty_unsubscribe", "UNSUBSCRIBE without any topic filter")
    return Unsubscribe(packet_id, topic_filters, properties)


def _decode_unsuback(reader: _Reader, flags: int, version: int) -> Unsuback:
    packet_id = _packet_id(reader, "UNSUBACK")
    if version != MQTT_5:
        reader.expect_end("UNSUBACK")
        return Unsuback(packet_id)
    properties = reader.properties("UNSUBACK")
    codes: list[int] = []
    while reader.remaining:
        codes.append(_reason_code(reader, "UNSUBACK"))
    if not codes:
        raise _violation("protocol_error", "UNSUBACK without any reason code")
    return Unsuback(packet_id, codes, properties)


def _decode_pingreq(reader: _Reader, flags: int, version: int) -> Pingreq:
    reader.expect_end("PINGREQ")
    return Pingreq()


def _decode_pingresp(reader: _Reader, flags: int, version: int) -> Pingresp:
    reader.expect_end("PINGRESP")
    return Pingresp()


def _decode_disconnect(reader: _Reader, flags: int, version: int) -> Disconnect:
    code = 0
    properties: dict[str, Any] = {}
    if version == MQTT_5 and reader.remaining:
        code = _reason_code(reader, "DISCONNECT")
        if reader.remaining:
            properties = reader.properties("DISCONNECT")
    reader.expect_end("DISCONNECT")
    return Disconnect(code, properties)


def _decode_auth(reader: _Reader, flags: int, version: int) -> Auth:
    code = 0
    properties: dict[str, Any] = {}
    if reader.remaining:
        code = _reason_code(reader, "AUTH")
        if reader.remaining:
            properties = reader.properties("AUTH")
    reader.expect_end("AUTH")
    return Auth(code, properties)


_DECODERS: Final[dict[int, Callable[[_Reader, int, int], Packet]]] = {
    PacketType.CONNECT: _decode_connect,
    PacketType.CONNACK: _decode_connack,
    PacketType.PUBLISH: _decode_publish,
    PacketType.PUBACK: _ack_decoder(Puback),
    PacketType.PUBREC: _ack_decoder(Pubrec),
    PacketType.PUBREL: _ack_decoder(Pubrel),
    PacketType.PUBCOMP: _ack_decoder(Pubcomp),
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.SUBACK: _decode_suback,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.UNSUBACK: _decode_unsuback,
    PacketType.PINGREQ: _decode_pingreq,
    PacketType.PINGRESP: _decode_pingresp,
    PacketType.DISCONNECT: _decode_disconnect,
    PacketType.AUTH: _decode_auth,
}


def decode_packet_body(
    buf: bytes | bytearray | memoryview, first: int, start: int, end: int, version: int
) -> Packet:
    """Decode the body `buf[start:end]` of a packet whose first byte passed
    `check_first_byte`. A CONNECT is read at its own protocol level, whatever `version`."""
    return _DECODERS[first >> 4](_Reader(buf, start, end), first & 0x0F, version)


def _check_version(version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise LocalProtocolError(f"MQTT version must be 4 (3.1.1) or 5, not {version!r}")


def decode(
    buffer: bytes | bytearray | memoryview,
    version: int,
    max_packet_size: int = MAX_PACKET_SIZE,
) -> tuple[Packet | None, int]:
    """Decode the first packet of `buffer`: (packet, bytes consumed), or (None, 0) while it is
    incomplete. Raises `ProtocolViolation` for malformed input as early as the bytes allow
    (a too-large remaining length is refused before its body arrives)."""
    _check_version(version)
    if not buffer:
        return None, 0
    first = buffer[0]
    check_first_byte(first, version)
    length, start = read_fixed_header(buffer, 0, max_packet_size)
    if start < 0 or start + length > len(buffer):
        return None, 0
    return decode_packet_body(buffer, first, start, start + length, version), start + length


# --------------------------------------------------------------------------- encoding


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise OverflowError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _string(text: str) -> bytes:
    if "\x00" in text:
        raise ValueError("strings must not contain U+0000")
    data = text.encode("utf-8")
    return _u16(len(data)) + data


def _binary(data: bytes) -> bytes:
    if not isinstance(data, bytes):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    return _u16(len(data)) + data


def _encode_value(kind: int, value: Any) -> bytes:
    if kind == _BYTE:
        return bytes(value.to_bytes(1, "big"))
    if kind == _TWO_BYTE_INT:
        return _u16(value)
    if kind == _FOUR_BYTE_INT:
        return bytes(value.to_bytes(4, "big"))
    if kind == _VARINT:
        return encode_varint(value)
    if kind == _STRING:
        return _string(value)
    if kind == _BINARY:
        return _binary(value)
    key, text = value
    return _string(key) + _string(text)


def encode_properties(properties: dict[str, Any], where: str) -> bytes:
    allowed = ALLOWED_PROPERTIES[where]
    out = bytearray()
    for name, value in properties.items():
        ident = PROPERTY_IDS.get(name)
        if ident is None or ident not in allowed:
            raise LocalProtocolError(f"property {name!r} is not allowed in {where}")
        if name in REPEATABLE_PROPERTIES:
            if not isinstance(value, list) or not value:
                raise LocalProtocolError(f"{name} must be a non-empty list")
            values = value
        else:
            values = [value]
        kind = PROPERTIES[ident][1]
        for item in values:
            problem = _property_problem(name, item)
            if problem is not None:
                raise LocalProtocolError(problem[1])
            out += encode_varint(ident)
            out += _encode_value(kind, item)
    return encode_varint(len(out)) + out


def _no_properties(properties: dict[str, Any], where: str) -> None:
    if properties:
        raise LocalProtocolError(f"MQTT 3.1.1 {where} cannot carry properties")


def _checked_reason_code(code: int, where: str) -> bytes:
    if code not in REASON_CODES[where]:
        raise LocalProtocolError(f"reason code 0x{code:02x} is not valid in {where}")
    return bytes((code,))


def _nonzero_packet_id(packet_id: int, where: str) -> bytes:
    if packet_id == 0:
        raise LocalProtocolError(f"{where} needs a non-zero packet identifier")
    return _u16(packet_id)


def _encode_connect(packet: Connect, version: int) -> tuple[int, bytes]:
    if packet.protocol_level != version:
        raise LocalProtocolError(
            f"CONNECT protocol_level {packet.protocol_level} does not match version {version}"
        )
    will = packet.will
    flags = 0x02 if packet.clean_start else 0
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise LocalProtocolError(f"Will QoS {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.password is not None:
        if packet.username is None and version == MQTT_3_1_1:
            raise LocalProtocolError("MQTT 3.1.1 allows a password only with a user name")
        flags |= 0x40
    if packet.username is not None:
        flags |= 0x80
    out = bytearray(_string("MQTT"))
    out.append(version)
    out.append(flags)
    out += _u16(packet.keepalive)
    if version == MQTT_5:
        out += encode_properties(packet.properties, "CONNECT")
    else:
        _no_properties(packet.properties, "CONNECT")
    out += _string(packet.client_id)
    if will is not None:
        if version == MQTT_5:
            out += encode_properties(will.properties, "WILL")
        else:
            _no_properties(will.properties, "Will")
        if not will.topic:
            raise LocalProtocolError("Will topic is empty")
        will_topic = _string(will.topic)
        decode_topic_name(will_topic[2:], "Will topic")
        out += will_topic
        out += _binary(will.payload)
    if packet.username is not None:
        out += _string(packet.username)
    if packet.password is not None:
        out += _binary(packet.password)
    return 0x10, bytes(out)


def _encode_connack(packet: Connack, version: int) -> tuple[int, bytes]:
    if packet.session_present and packet.reason_code:
        raise LocalProtocolError("a refusing CONNACK cannot say the session is present")
    flags = b"\x01" if packet.session_present else b"\x00"
    if version == MQTT_5:
        code = _checked_reason_code(packet.reason_code, "CONNACK")
        return 0x20, flags + code + encode_properties(packet.properties, "CONNACK")
    _no_properties(packet.properties, "CONNACK")
    if packet.reason_code not in V311_CONNACK_CODES:
        raise LocalProtocolError(f"CONNACK return code {packet.reason_code} is reserved")
    return 0x20, flags + bytes((packet.reason_code,))


def _encode_publish(packet: Publish, version: int) -> tuple[int, bytes]:
    qos = packet.qos
    if qos not in (0, 1, 2):
        raise LocalProtocolError(f"PUBLISH QoS {qos}")
    flags = (qos << 1) | (0x01 if packet.retain else 0)
    topic = _string(packet.topic)
    decode_topic_name(topic[2:])
    out = bytearray(topic)
    if qos:
        if packet.packet_id is None:
            raise LocalProtocolError(f"QoS {qos} PUBLISH needs a packet identifier")
        out += _nonzero_packet_id(packet.packet_id, "PUBLISH")
        flags |= 0x08 if packet.dup else 0
    elif packet.dup or packet.packet_id is not None:
        raise LocalProtocolError("QoS 0 PUBLISH has neither DUP nor a packet identifier")
    if version == MQTT_5:
        out += encode_properties(packet.properties, "PUBLISH")
    else:
        _no_properties(packet.properties, "PUBLISH")
    if not packet.topic and "topic_alias" not in packet.properties:
        raise LocalProtocolError("PUBLISH topic is empty and there is no topic alias")
    out += _binary_payload(packet.payload)
    return 0x30 | flags, bytes(out)


def _binary_payload(payload: bytes) -> bytes:
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    return payload


def _encode_ack(
    packet: Puback | Pubrec | Pubrel | Pubcomp, version: int, first: int
) -> tuple[int, bytes]:
    where = type(packet).__name__.upper()
    packet_id = _nonzero_packet_id(packet.packet_id, where)
    if version == MQTT_3_1_1:
        _no_properties(packet.properties, where)
        if packet.reason_code:
            raise LocalProtocolError(f"MQTT 3.1.1 {where} cannot carry a reason code")
        return first, packet_id
    code = _checked_reason_code(packet.reason_code, where)
    if packet.properties:
        return first, packet_id + code + encode_properties(packet.properties, where)
    if packet.reason_code:
        return first, packet_id + code
    return first, packet_id


def _encode_subscribe(packet: Subscribe, version: int) -> tuple[int, bytes]:
    if not packet.subscriptions:
        raise LocalProtocolError("SUBSCRIBE needs at least one topic filter")
    out = bytearray(_nonzero_packet_id(packet.packet_id, "SUBSCRIBE"))
    if version == MQTT_5:
        if len(packet.properties.get("subscription_identifier", ())) > 1:
            raise LocalProtocolError("SUBSCRIBE carries at most one subscription identifier")
        out += encode_properties(packet.properties, "SUBSCRIBE")
    else:
        _no_properties(packet.properties, "SUBSCRIBE")
    for topic_filter, options in packet.subscriptions:
        shared = validate_topic_filter(topic_filter, version)
        if options.qos not in (0, 1, 2) or options.retain_handling not in (0, 1, 2):
            raise LocalProtocolError(f"bad subscription options {options!r}")
        if version == MQTT_3_1_1 and (
            options.no_local or options.retain_as_published or options.retain_handling
        ):
            raise LocalProtocolError("MQTT 3.1.1 subscriptions only carry a QoS")
        if shared and options.no_local:
            raise LocalProtocolError("No Local is not allowed on a shared subscription")
        out += _string(topic_filter)
        out.append(
            options.qos
            | (0x04 if options.no_local else 0)
            | (0x08 if options.retain_as_published else 0)
            | (options.retain_handling << 4)
        )
    return 0x82, bytes(out)


def _encode_suback(packet: Suback, version: int) -> tuple[int, bytes]:
    if not packet.reason_codes:
        raise LocalProtocolError("SUBACK needs at least one reason code")
    out = bytearray(_nonzero_packet_id(packet.packet_id, "SUBACK"))
    if version == MQTT_5:
        allowed = REASON_CODES["SUBACK"]
        out += encode_properties(packet.properties, "SUBACK")
    else:
        allowed = V311_SUBACK_CODES
        _no_properties(packet.properties, "SUBACK")
    for code in packet.reason_codes:
        if code not in allowed:
            raise LocalProtocolError(f"reason code 0x{code:02x} is not valid in SUBACK")
        out.append(code)
    return 0x90, bytes(out)


def _encode_unsubscribe(packet: Unsubscribe, version: int) -> tuple[int, bytes]:
    if not packet.topic_filters:
        raise LocalProtocolError("UNSUBSCRIBE needs at least one topic filter")
    out = bytearray(_nonzero_packet_id(packet.packet_id, "UNSUBSCRIBE"))
    if version == MQTT_5:
        out += encode_properties(packet.properties, "UNSUBSCRIBE")
    else:
        _no_properties(packet.properties, "UNSUBSCRIBE")
    for topic_filter in packet.topic_filters:
        validate_topic_filter(topic_filter, version)
        out += _string(topic_filter)
    return 0xA2, bytes(out)


def _encode_unsuback(packet: Unsuback, version: int) -> tuple[int, bytes]:
    out = bytearray(_nonzero_packet_id(packet.packet_id, "UNSUBACK"))
    if version == MQTT_3_1_1:
        _no_properties(packet.properties, "UNSUBACK")
        if packet.reason_codes:
            raise LocalProtocolError("MQTT 3.1.1 UNSUBACK cannot carry reason codes")
        return 0xB0, bytes(out)
    if not packet.reason_codes:
        raise LocalProtocolError("UNSUBACK needs at least one reason code")
    out += encode_properties(packet.properties, "UNSUBACK")
    for code in packet.reason_codes:
        out += _checked_reason_code(code, "UNSUBACK")
    return 0xB0, bytes(out)


def _encode_reason_and_properties(
    reason_code: int, properties: dict[str, Any], where: str
) -> bytes:
    """DISCONNECT and AUTH: both omitted when success without properties."""
    code = _checked_reason_code(reason_code, where)
    if properties:
        return code + encode_properties(properties, where)
    return code if reason_code else b""


def _encode_disconnect(packet: Disconnect, version: int) -> tuple[int, bytes]:
    if version == MQTT_3_1_1:
        _no_properties(packet.properties, "DISCONNECT")
        if packet.reason_code:
            raise LocalProtocolError("MQTT 3.1.1 DISCONNECT cannot carry a reason code")
        return 0xE0, b""
    return 0xE0, _encode_reason_and_properties(packet.reason_code, packet.properties, "DISCONNECT")


def _encode_auth(packet: Auth, version: int) -> tuple[int, bytes]:
    if version != MQTT_5:
        raise LocalProtocolError("AUTH exists only in MQTT 5")
    return 0xF0, _encode_reason_and_properties(packet.reason_code, packet.properties, "AUTH")


def _encode_empty(first: int) -> Callable[[Any, int], tuple[int, bytes]]:
    def encode_empty(packet: Any, version: int) -> tuple[int, bytes]:
        return first, b""

    return encode_empty


def _encode_ack_as(first: int) -> Callable[[Any, int], tuple[int, bytes]]:
    def encode_ack(packet: Any, version: int) -> tuple[int, bytes]:
        return _encode_ack(packet, version, first)

    return encode_ack


_ENCODERS: Final[dict[type, Callable[[Any, int], tuple[int, bytes]]]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _encode_ack_as(0x40),
    Pubrec: _encode_ack_as(0x50),
    Pubrel: _encode_ack_as(0x62),
    Pubcomp: _encode_ack_as(0x70),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: _encode_empty(0xC0),
    Pingresp: _encode_empty(0xD0),
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, version: int) -> bytes:
    """The wire bytes of `packet` in MQTT `version` (4 or 5). Raises `LocalProtocolError`
    for anything the peer would have to reject."""
    _check_version(version)
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise LocalProtocolError(f"cannot encode {type(packet).__name__}")
    try:
        first, body = encoder(packet, version)
        return bytes((first,)) + encode_varint(len(body)) + body
    except ProtocolViolation as exc:
        raise LocalProtocolError(f"{type(packet).__name__}: {exc.message}") from exc
    except (OverflowError, ValueError, TypeError, AttributeError) as exc:
        raise LocalProtocolError(f"{type(packet).__name__}: {exc}") from exc


__all__ = [
    "ALLOWED_PROPERTIES",
    "MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "MQTT_3_1_1",
    "MQTT_5",
    "PROPERTIES",
    "REASON_CODES",
    "Auth",
    "Connack",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "Suback",
    "Subscribe",
    "SubscriptionOptions",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "decode",
    "encode",
]
