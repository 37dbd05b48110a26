"""Errors of the MQTT codec, and the one table mapping them to what goes on the wire.

Two kinds, as in h11: `ProtocolViolation` means the peer did wrong (the connection answers
with a reason code, then closes); `LocalProtocolError` means our own caller did wrong (asked
to encode or send something MQTT does not allow) and is a bug to fix, never sent to a peer.
"""

from enum import IntEnum
from typing import Final, NamedTuple


class ReasonCode(IntEnum):
    """MQTT 5.0 reason codes (spec section 2.4) used by this package, by name."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnackReturnCode(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (spec section 3.2.2.3)."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USER_NAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


class ViolationCodes(NamedTuple):
    """What a violation turns into on the wire."""

    reason_code: int
    """MQTT 5 reason code, sent in a DISCONNECT (or in a CONNACK while connecting)."""
    v311_connack_code: int | None
    """MQTT 3.1.1 CONNACK return code when the violation is in the CONNECT; None: send nothing."""


_R = ReasonCode

VIOLATIONS: Final[dict[str, ViolationCodes]] = {
    # Framing: the byte stream cannot be trusted past this point.
    "malformed_remaining_length": ViolationCodes(_R.MALFORMED_PACKET, None),
    "reserved_flags": ViolationCodes(_R.MALFORMED_PACKET, None),
    "unknown_packet_type": ViolationCodes(_R.MALFORMED_PACKET, None),
    "packet_too_large": ViolationCodes(_R.PACKET_TOO_LARGE, None),
    "malformed_packet": ViolationCodes(_R.MALFORMED_PACKET, None),
    "invalid_utf8": ViolationCodes(_R.MALFORMED_PACKET, None),
    "invalid_qos": ViolationCodes(_R.MALFORMED_PACKET, None),
    "invalid_property": ViolationCodes(_R.MALFORMED_PACKET, None),
    "invalid_topic_filter": ViolationCodes(_R.MALFORMED_PACKET, None),
    # CONNECT.
    "bad_protocol_name": ViolationCodes(
        _R.UNSUPPORTED_PROTOCOL_VERSION, ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION
    ),
    "bad_protocol_level": ViolationCodes(
        _R.UNSUPPORTED_PROTOCOL_VERSION, ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION
    ),
    "client_id_rejected": ViolationCodes(
        _R.CLIENT_IDENTIFIER_NOT_VALID, ConnackReturnCode.IDENTIFIER_REJECTED
    ),
    # Packets that are well formed but not allowed here.
    "publish_before_connect": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "second_connect": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "protocol_error": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "zero_packet_id": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "empty_subscribe": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "empty_unsubscribe": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "duplicate_property": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "empty_topic": ViolationCodes(_R.PROTOCOL_ERROR, None),
    "wildcard_in_topic": ViolationCodes(_R.TOPIC_NAME_INVALID, None),
    "topic_alias_invalid": ViolationCodes(_R.TOPIC_ALIAS_INVALID, None),
    "retain_not_supported": ViolationCodes(_R.RETAIN_NOT_SUPPORTED, None),
    # Flow control and liveness.
    "receive_maximum_exceeded": ViolationCodes(_R.RECEIVE_MAXIMUM_EXCEEDED, None),
    "keepalive_timeout": ViolationCodes(_R.KEEP_ALIVE_TIMEOUT, None),
}
"""Every violation slug (a stable metrics label) → what is sent for it. One table, on purpose:
the decoder and the connection only ever name a slug."""


V311_CONNACK_CODE_FOR: Final[dict[int, int]] = {
    _R.SUCCESS: ConnackReturnCode.ACCEPTED,
    _R.UNSUPPORTED_PROTOCOL_VERSION: ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    _R.CLIENT_IDENTIFIER_NOT_VALID: ConnackReturnCode.IDENTIFIER_REJECTED,
    _R.BAD_USER_NAME_OR_PASSWORD: ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD,
    _R.BAD_AUTHENTICATION_METHOD: ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD,
    _R.NOT_AUTHORIZED: ConnackReturnCode.NOT_AUTHORIZED,
    _R.BANNED: ConnackReturnCode.NOT_AUTHORIZED,
}
"""MQTT 5 CONNACK reason code → the MQTT 3.1.1 return code that means the same; any other
refusal (server busy, quota, unspecified…) becomes SERVER_UNAVAILABLE."""


class MQTTError(Exception):
    """Root of every error this package raises on purpose."""


class ProtocolViolation(MQTTError):
    """The peer broke the protocol: answer with `reason_code`, then close the connection."""

    def __init__(self, reason: str, message: str = "") -> None:
        codes = VIOLATIONS[reason]  # an unknown slug is our bug: let the KeyError say so
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason
        self.reason_code: int = codes.reason_code
        self.v311_connack_code: int | None = codes.v311_connack_code

    def __repr__(self) -> str:
        return f"ProtocolViolation({self.reason!r}, {self.message!r})"


class LocalProtocolError(MQTTError):
    """Our own caller asked for something MQTT forbids (a bug here, never the peer's fault)."""


__all__ = [
    "V311_CONNACK_CODE_FOR",
    "VIOLATIONS",
    "ConnackReturnCode",
    "LocalProtocolError",
    "MQTTError",
    "ProtocolViolation",
    "ReasonCode",
    "ViolationCodes",
]
