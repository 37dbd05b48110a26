"""The server side of one MQTT connection, sans I/O.

Theory of operation
-------------------
`ServerConnection` never touches a socket or a clock. The caller feeds it the bytes it read
(`receive_data(data, now)`) and gets back a list of events, in order; whatever the
connection wants to say back (CONNACK, PUBACK, PINGRESP, a DISCONNECT with a reason code…)
accumulates until the caller collects it with `data_to_send()` and writes it out.

A connection moves through four states:

    AWAIT_CONNECT --CONNECT--> CONNECTING --accept()--> CONNECTED --DISCONNECT--> CLOSED
                               CONNECTING --refuse()--> CLOSED
    any state --protocol violation / disconnect()--> CLOSED

What each inbound packet does in each state is one table, `_TRANSITIONS`:
(state, packet type) → (handler, next state). A pair missing from the table is a protocol
violation, and so is anything a handler or the decoder rejects. A violation is never raised
to the caller: the connection queues the answer the specification asks for (MQTT 5: a
DISCONNECT, or a CONNACK while the CONNECT is still unanswered, carrying the reason code;
MQTT 3.1.1: a CONNACK return code where one exists, else nothing), moves to CLOSED and
returns a `ConnectionClosed` event naming the violation. A closed connection ignores input.

CONNECTING exists because a client may pipeline packets behind its CONNECT, and the
specification forbids processing them unless the connection is accepted. So decoding
pauses right after the CONNECT: `receive_data` only buffers until `accept()` or
`refuse()`. After `accept()`, call `receive_data(b"", now)` to get the pipelined packets.

Inbound QoS 1 and 2: a PUBLISH is handed to the application once; `ack(publish)` answers
it (PUBACK, or PUBREC then PUBCOMP on the client's PUBREL, both automatic). A retransmitted
PUBLISH whose packet identifier is still in flight is not delivered again, which makes
QoS 2 exactly-once. In-flight messages count against the receive maximum we advertised
(MQTT 5 only): a client exceeding it is disconnected with 0x93.

The hot path: a PUBLISH of QoS 0 or 1 without DUP, RETAIN or properties, and under 16 KiB,
is parsed inline in `_parse` with no per-packet function call beyond building the `Publish`;
topic names are validated once per connection and then looked up by their raw bytes. The
buffer is only joined once per read, and parsed by offset, never copied per packet.
Everything else goes through the generic decoder and the transition table; the inline path
is a copy of the (CONNECTED, PUBLISH) transition for those packets, and falls back to it
whenever anything is unusual.
"""

import secrets
import struct
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any, Final, TypeAlias

import msgspec

from .errors import (
    V311_CONNACK_CODE_FOR,
    ConnackReturnCode,
    LocalProtocolError,
    ProtocolViolation,
    ReasonCode,
)
from .packets import (
    MAX_PACKET_SIZE,
    MQTT_3_1_1,
    MQTT_5,
    REASON_CODES,
    Connack,
    Connect,
    Disconnect,
    PacketType,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    check_first_byte,
    decode_packet_body,
    decode_topic_name,
    encode,
    read_fixed_header,
)


class State(Enum):
    AWAIT_CONNECT = "await_connect"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


# --------------------------------------------------------------------------- events


class ConnectRequest(msgspec.Struct, frozen=True, gc=False):
    """A client asks to connect: answer with `accept()` or `refuse()`."""

    packet: Connect


class SubscribeRequest(msgspec.Struct, frozen=True, gc=False):
    """Answer with `suback(packet.packet_id, reason_codes)`, one code per subscription."""

    packet: Subscribe


class UnsubscribeRequest(msgspec.Struct, frozen=True, gc=False):
    """Answer with `unsuback(packet.packet_id, reason_codes)`."""

    packet: Unsubscribe


class ClientDisconnect(msgspec.Struct, frozen=True, gc=False):
    """The client sent DISCONNECT; the connection is now closed. Reason code 0x04 (MQTT 5)
    asks for the Will to be published all the same."""

    reason_code: int
    properties: dict[str, Any]


class PublishAcknowledged(msgspec.Struct, frozen=True, gc=False):
    """The client finished a QoS 1/2 delivery started by `send_publish` (PUBACK, PUBCOMP,
    or a PUBREC refusing it with a reason code >= 0x80)."""

    packet_id: int
    reason_code: int


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The client broke the protocol. The answer is already queued: send it, then close."""

    violation: ProtocolViolation


Event: TypeAlias = (
    ConnectRequest
    | Publish
    | SubscribeRequest
    | UnsubscribeRequest
    | ClientDisconnect
    | PublishAcknowledged
    | ConnectionClosed
)

# --------------------------------------------------------------------------- constants

_PINGRESP: Final = b"\xd0\x00"
_pack_ack: Final = struct.Struct(">BBH").pack
_PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 0x40, 0x50, 0x62, 0x70
_NOT_FOUND: Final = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
_CONNACK_REASON_CODES: Final = REASON_CODES["CONNACK"]
_TOPIC_CACHE_SIZE: Final = 1024
_SERVER_CONTROLLED_CONNACK_PROPERTIES: Final = frozenset(
    {
        "receive_maximum",
        "maximum_packet_size",
        "topic_alias_maximum",
        "retain_available",
        "server_keep_alive",
        "assigned_client_identifier",
    }
)
_MISSING: Final[Any] = object()


def _connack_refusal_code(reason_code: int) -> int:
    """`reason_code` if a CONNACK may refuse with it, else "unspecified error"."""
    if reason_code >= 0x80 and reason_code in _CONNACK_REASON_CODES:
        return reason_code
    return ReasonCode.UNSPECIFIED_ERROR


def _connack_format(buf: bytes, pos: int) -> int | None:
    """Which CONNACK layout the (possibly broken) CONNECT at `pos` would understand:
    MQTT_5, MQTT_3_1_1 (also right for 3.1's "MQIsdp"), or None when it is not MQTT."""
    index = pos + 1
    for _ in range(4):  # skip the remaining length
        if index >= len(buf):
            return None
        index += 1
        if buf[index - 1] < 0x80:
            break
    else:
        return None
    if index + 2 > len(buf):
        return None
    name_end = index + 2 + ((buf[index] << 8) | buf[index + 1])
    if name_end >= len(buf):
        return None
    name = buf[index + 2 : name_end]
    if name == b"MQTT":
        return MQTT_5 if buf[name_end] >= MQTT_5 else MQTT_3_1_1
    if name == b"MQIsdp":
        return MQTT_3_1_1
    return None


class ServerConnection:
    """One client connection, server side. See the module docstring."""

    # A million of these may be alive: slots keep each at a few hundred bytes (an instance
    # dict of 30 attributes or more no longer shares its keys, and costs 1.6 KB).
    __slots__ = (
        "_aliases", "_buffered", "_chunks", "_client_id_assigned", "_client_max_packet_size",
        "_client_receive_maximum", "_connack_format", "_connect", "_inbound", "_inbound_limit",
        "_inline_length_limit", "_last_activity", "_max_keepalive", "_max_packet_size",
        "_needed", "_next_packet_id", "_outbound", "_outgoing", "_pending_subscribes",
        "_pending_unsubscribes", "_receive_maximum", "_retain_available", "_server_keep_alive",
        "_topic_alias_maximum", "_topics", "client_id", "keepalive", "state", "username",
        "version",
    )

    def __init__(
        self,
        *,
        max_packet_size: int = 1_048_576,
        receive_maximum: int = 1024,
        max_keepalive: int = 0,
        retain_available: bool = True,
        topic_alias_maximum: int = 0,
    ) -> None:
        """`max_packet_size`: largest inbound packet, whole (advertised in MQTT 5).
        `receive_maximum`: inbound QoS 1/2 messages in flight (MQTT 5 only).
        `max_keepalive`: cap on the client's keep alive, 0 for none (MQTT 5 can tell the
        client; an MQTT 3.1.1 client's keep alive is kept as it is).
        `retain_available`: False refuses retained PUBLISH and Will (MQTT 5 only).
        `topic_alias_maximum`: inbound topic aliases a client may set (MQTT 5 only)."""
        if not 2 <= max_packet_size <= MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size must be 2..{MAX_PACKET_SIZE}")
        if not 1 <= receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535")
        if not 0 <= max_keepalive <= 65535:
            raise ValueError("max_keepalive must be 0..65535")
        self.state = State.AWAIT_CONNECT
        self.version: int | None = None
        self.client_id: str | None = None
        self.username: str | None = None
        self.keepalive = 0
        """Effective keep alive in seconds (the server's when it overrode the client's)."""

        self._max_packet_size = max_packet_size
        self._receive_maximum = receive_maximum
        self._max_keepalive = max_keepalive
        self._retain_available = retain_available
        if not 0 <= topic_alias_maximum <= 65535:
            raise ValueError("topic_alias_maximum must be 0..65535")
        self._topic_alias_maximum = topic_alias_maximum
        self._aliases: dict[int, str] | None = None  # made on first use: most clients never
        # The inline PUBLISH path takes remaining lengths up to this (2 bytes, and one byte
        # short of the limit so that it never has to tell 2- from 3-byte headers apart).
        self._inline_length_limit = min(0x3FFF, max_packet_size - 4)

        self._outgoing: list[bytes] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._needed = 0
        self._last_activity = 0.0
        self._topics: dict[bytes, str] = {}

        self._connect: Connect | None = None
        self._connack_format: int | None = None
        self._client_id_assigned = False
        self._server_keep_alive: int | None = None
        self._inbound_limit = sys.maxsize
        # Inbound QoS 1/2 in flight: packet id → the Publish awaiting ack(), or None once a
        # QoS 2 PUBREC went out and the PUBREL is awaited.
        self._inbound: dict[int, Publish | None] = {}
        self._pending_subscribes: dict[int, int] = {}
        self._pending_unsubscribes: dict[int, int] = {}
        # Outbound QoS 1/2 in flight: packet id → the packet type awaited from the client.
        self._outbound: dict[int, int] = {}
        self._next_packet_id = 1
        self._client_receive_maximum = 65535
        self._client_max_packet_size = MAX_PACKET_SIZE

    # ----------------------------------------------------------------------- queries

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def keepalive_expired(self, now: float) -> bool:
        """True when nothing arrived for 1.5 times the keep alive (spec 3.1.2.10). The caller
        then calls `disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)` and closes."""
        if self.keepalive <= 0 or self.state is State.CLOSED:
            return False
        return now - self._last_activity > 1.5 * self.keepalive

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    # ----------------------------------------------------------------------- input

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the client; returns the events they complete, in order."""
        if self.state is State.CLOSED:
            return []
        self._last_activity = now
        if type(data) is not bytes:
            data = bytes(data)
        if self._buffered:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered < self._needed or self.state is State.CONNECTING:
                return []
            buf = b"".join(self._chunks)
        elif not data:
            return []
        elif self.state is State.CONNECTING:
            self._chunks = [data]
            self._buffered = len(data)
            return []
        else:
            buf = data
        events: list[Event] = []
        try:
            pos = self._parse(buf, events)
        except ProtocolViolation as violation:
            events.append(self._fail(violation))
            return events
        if pos >= len(buf) or self.closed:
            self._chunks = []
            self._buffered = 0
        else:
            self._chunks = [buf[pos:] if pos else buf]
            self._buffered = len(buf) - pos
        return events

    def _parse(self, buf: bytes, events: list[Event]) -> int:
        """Decode packets from `buf`; returns the offset of the first byte not consumed."""
        size = len(buf)
        pos = 0
        append = events.append
        connected = self.state is State.CONNECTED
        topics = self._topics
        inbound = self._inbound
        inbound_limit = self._inbound_limit
        inline_limit = self._inline_length_limit
        v311 = self.version != MQTT_5
        property_length_size = 0 if v311 else 1  # MQTT 5: no properties is one 0 byte
        while pos < size:
            first = buf[pos]
            # Inline (CONNECTED, PUBLISH) for QoS 0/1 without DUP, RETAIN or properties and
            # with a 1- or 2-byte remaining length. Whatever it does not recognise falls
            # through, untouched, to the generic path below, which also names any error.
            if connected and (first == 0x30 or first == 0x32) and pos + 2 < size:
                length = buf[pos + 1]
                start = pos + 2
                if length > 0x7F:
                    if 0 < buf[start] < 0x80:
                        length = (length & 0x7F) | (buf[start] << 7)
                        start += 1
                    else:
                        length = 0  # a longer (or non-minimal) length: not for this path
                end = start + length
                if (
                    2 <= length <= inline_limit
                    and end <= size
                    and (topic_end := start + 2 + ((buf[start] << 8) | buf[start + 1])) <= end
                ):
                    raw_topic = buf[start + 2 : topic_end]
                    topic = topics.get(raw_topic) or self._learn_topic(raw_topic)
                    if topic is None:
                        pass
                    elif first == 0x30:
                        payload_start = topic_end + property_length_size
                        if payload_start <= end and (v311 or buf[topic_end] == 0):
                            append(
                                Publish(topic, buf[payload_start:end], 0, False, False, None, {})
                            )
                            pos = end
                            continue
                    elif (payload_start := topic_end + 2 + property_length_size) <= end and (
                        v311 or buf[topic_end + 2] == 0
                    ):
                        packet_id = (buf[topic_end] << 8) | buf[topic_end + 1]
                        if packet_id and packet_id not in inbound:
                            publish = Publish(
                                topic, buf[payload_start:end], 1, False, False, packet_id, {}
                            )
                            inbound[packet_id] = publish
                            if len(inbound) > inbound_limit:
                                raise ProtocolViolation(
                                    "receive_maximum_exceeded",
                                    f"more than {inbound_limit} QoS 1/2 messages in flight",
                                )
                            append(publish)
                            pos = end
                            continue
            end = self._parse_packet(buf, pos, events)
            if end < 0:
                return pos
            pos = end
            if self.state is not State.CONNECTED:
                if self.state is State.CLOSED:
                    return size
                self._needed = 0  # CONNECTING: pause until accept()
                return pos
            connected = True
            inbound_limit = self._inbound_limit
            v311 = self.version != MQTT_5
            property_length_size = 0 if v311 else 1
        return pos

    def _learn_topic(self, raw_topic: bytes) -> str | None:
        """The topic name for raw bytes seen for the first time, or None when they are not
        a valid non-empty topic name (the generic path will say why)."""
        try:
            topic = decode_topic_name(raw_topic)
        except ProtocolViolation:
            return None
        if not topic:
            return None
        if len(self._topics) >= _TOPIC_CACHE_SIZE:
            self._topics.clear()
        self._topics[raw_topic] = topic
        return topic

    def _parse_packet(self, buf: bytes, pos: int, events: list[Event]) -> int:
        """Decode and dispatch the packet at `pos` through the transition table. Returns
        its end offset, or -1 when it is incomplete (and records how much is needed)."""
        first = buf[pos]
        packet_type = first >> 4
        state = self.state
        transition = _TRANSITIONS.get((state, packet_type))
        if transition is None:
            raise self._unexpected(packet_type)
        if packet_type == PacketType.CONNECT:  # for the answer, should the CONNECT be broken
            self._connack_format = _connack_format(buf, pos)
        version = self.version or MQTT_5
        check_first_byte(first, version)
        length, start = read_fixed_header(buf, pos, self._max_packet_size)
        if start < 0:
            self._needed = len(buf) - pos + 1
            return -1
        end = start + length
        if end > len(buf):
            self._needed = end - pos
            return -1
        packet = decode_packet_body(buf, first, start, end, version)
        handler, next_state = transition
        event = handler(self, packet)
        self.state = next_state
        if next_state is State.CLOSED:
            self._release()
        if event is not None:
            events.append(event)
        return end

    def _unexpected(self, packet_type: int) -> ProtocolViolation:
        if packet_type == 0 or (packet_type == PacketType.AUTH and self.version == MQTT_3_1_1):
            return ProtocolViolation(
                "unknown_packet_type", f"packet type {packet_type} is reserved"
            )
        name = PacketType(packet_type).name
        if self.state is State.AWAIT_CONNECT:
            if packet_type == PacketType.PUBLISH:
                return ProtocolViolation("publish_before_connect", "PUBLISH before CONNECT")
            return ProtocolViolation("protocol_error", f"{name} before CONNECT")
        if packet_type == PacketType.CONNECT:
            return ProtocolViolation("second_connect", "a second CONNECT")
        return ProtocolViolation("protocol_error", f"{name} is not expected from a client here")

    def _fail(self, violation: ProtocolViolation) -> ConnectionClosed:
        """Queue the answer the specification asks for, then close."""
        if self.state is State.CONNECTED:
            if self.version == MQTT_5:
                self._outgoing.append(encode(Disconnect(violation.reason_code), MQTT_5))
        elif self._connack_format == MQTT_5:
            code = _connack_refusal_code(violation.reason_code)
            self._outgoing.append(encode(Connack(False, code), MQTT_5))
        elif self._connack_format is not None and violation.v311_connack_code is not None:
            self._outgoing.append(bytes((0x20, 0x02, 0x00, violation.v311_connack_code)))
        self._close()
        return ConnectionClosed(violation)

    def _close(self) -> None:
        self.state = State.CLOSED
        self._release()

    def _release(self) -> None:
        self._chunks = []
        self._buffered = 0
        self._inbound.clear()
        self._outbound.clear()
        self._pending_subscribes.clear()
        self._pending_unsubscribes.clear()
        self._topics.clear()

    # ----------------------------------------------------------------------- handlers

    def _on_connect(self, packet: Connect) -> Event:
        level = packet.protocol_level
        if level == MQTT_3_1_1 and not packet.client_id and not packet.clean_start:
            raise ProtocolViolation(
                "client_id_rejected", "empty client identifier without a clean session"
            )
        if level == MQTT_5 and packet.will and packet.will.retain and not self._retain_available:
            raise ProtocolViolation("retain_not_supported", "retained Will, retain unavailable")
        self.version = level
        self._connect = packet
        self.client_id = packet.client_id or "auto-" + secrets.token_hex(8)
        self._client_id_assigned = not packet.client_id
        self.username = packet.username
        self.keepalive = packet.keepalive
        cap = self._max_keepalive
        if level == MQTT_5:
            if cap and (packet.keepalive == 0 or packet.keepalive > cap):
                self.keepalive = self._server_keep_alive = cap
            self._inbound_limit = self._receive_maximum
            properties = packet.properties
            self._client_receive_maximum = properties.get("receive_maximum", 65535)
            self._client_max_packet_size = properties.get("maximum_packet_size", MAX_PACKET_SIZE)
        return ConnectRequest(packet)

    def _on_publish(self, packet: Publish) -> Event | None:
        properties = packet.properties
        if properties:
            alias = properties.get("topic_alias")
            if alias is not None:
                packet = self._resolve_alias(packet, alias)
            if "subscription_identifier" in properties:
                raise ProtocolViolation("protocol_error", "subscription identifier from a client")
        if packet.retain and self.version == MQTT_5 and not self._retain_available:
            raise ProtocolViolation("retain_not_supported", "retained PUBLISH, retain unavailable")
        packet_id = packet.packet_id
        if packet_id is None:
            return packet
        inbound = self._inbound
        if packet_id in inbound:  # a retransmission: never deliver twice
            if packet.qos == 2 and inbound[packet_id] is None:
                self._outgoing.append(_pack_ack(_PUBREC, 2, packet_id))
            return None
        inbound[packet_id] = packet
        if len(inbound) > self._inbound_limit:
            raise ProtocolViolation(
                "receive_maximum_exceeded",
                f"more than {self._inbound_limit} QoS 1/2 messages in flight",
            )
        return packet

    def _resolve_alias(self, packet: Publish, alias: int) -> Publish:
        """MQTT 5 topic alias: a PUBLISH with a topic name sets the alias, one without uses
        it [MQTT-3.3.2-12]; 0 or above our maximum is a protocol error [MQTT-3.3.2-9]."""
        if not 0 < alias <= self._topic_alias_maximum:
            raise ProtocolViolation("topic_alias_invalid",
                                    f"topic alias {alias} outside 1..{self._topic_alias_maximum}")
        if self._aliases is None:
            self._aliases = {}
        if packet.topic:
            self._aliases[alias] = packet.topic
            return packet
        topic = self._aliases.get(alias)
        if topic is None:
            raise ProtocolViolation("protocol_error", f"topic alias {alias} was never set")
        return msgspec.structs.replace(packet, topic=topic)

    def _on_pubrel(self, packet: Pubrel) -> None:
        packet_id = packet.packet_id
        if self._inbound.get(packet_id, _MISSING) is None:
            del self._inbound[packet_id]
            self._outgoing.append(_pack_ack(_PUBCOMP, 2, packet_id))
        elif self.version == MQTT_5:
            self._outgoing.append(encode(Pubcomp(packet_id, _NOT_FOUND), MQTT_5))
        else:
            self._outgoing.append(_pack_ack(_PUBCOMP, 2, packet_id))

    def _on_puback(self, packet: Puback) -> Event | None:
        if self._outbound.get(packet.packet_id) != _PUBACK:
            return None
        del self._outbound[packet.packet_id]
        return PublishAcknowledged(packet.packet_id, packet.reason_code)

    def _on_pubrec(self, packet: Pubrec) -> Event | None:
        packet_id = packet.packet_id
        awaited = self._outbound.get(packet_id)
        if awaited == _PUBREC and packet.reason_code >= 0x80:
            del self._outbound[packet_id]
            return PublishAcknowledged(packet_id, packet.reason_code)
        if awaited in (_PUBREC, _PUBCOMP):
            self._outbound[packet_id] = _PUBCOMP
            self._outgoing.append(_pack_ack(_PUBREL, 2, packet_id))
        elif self.version == MQTT_5:
            self._outgoing.append(encode(Pubrel(packet_id, _NOT_FOUND), MQTT_5))
        else:
            self._outgoing.append(_pack_ack(_PUBREL, 2, packet_id))
        return None

    def _on_pubcomp(self, packet: Pubcomp) -> Event | None:
        if self._outbound.get(packet.packet_id) != _PUBCOMP:
            return None
        del self._outbound[packet.packet_id]
        return PublishAcknowledged(packet.packet_id, packet.reason_code)

    def _on_subscribe(self, packet: Subscribe) -> Event:
        self._pending_subscribes[packet.packet_id] = len(packet.subscriptions)
        return SubscribeRequest(packet)

    def _on_unsubscribe(self, packet: Unsubscribe) -> Event:
        self._pending_unsubscribes[packet.packet_id] = len(packet.topic_filters)
        return UnsubscribeRequest(packet)

    def _on_pingreq(self, packet: object) -> None:
        self._outgoing.append(_PINGRESP)

    def _on_disconnect(self, packet: Disconnect) -> Event:
        assert self._connect is not None
        if packet.properties.get("session_expiry_interval", 0) and not self._connect.properties.get(
            "session_expiry_interval", 0
        ):
            raise ProtocolViolation(
                "protocol_error", "DISCONNECT sets a session expiry the CONNECT had at 0"
            )
        return ClientDisconnect(packet.reason_code, packet.properties)

    # ----------------------------------------------------------------------- answers

    def accept(
        self, *, session_present: bool = False, properties: dict[str, Any] | None = None
    ) -> None:
        """Accept the pending CONNECT: queue CONNACK 0. MQTT 5 `properties` are added to the
        ones the connection sets itself (receive/packet/alias maxima, server keep alive,
        assigned client identifier), which they may not override. Then call
        `receive_data(b"", now)` for packets the client sent behind its CONNECT."""
        connect = self._require_connecting("accept")
        if session_present and connect.clean_start:
            raise LocalProtocolError("a clean start cannot have a session present")
        if self.version == MQTT_5:
            connack_properties: dict[str, Any] = {
                "topic_alias_maximum": self._topic_alias_maximum}
            if self._receive_maximum != 65535:
                connack_properties["receive_maximum"] = self._receive_maximum
            if self._max_packet_size < MAX_PACKET_SIZE:
                connack_properties["maximum_packet_size"] = self._max_packet_size
            if not self._retain_available:
                connack_properties["retain_available"] = 0
            if self._server_keep_alive is not None:
                connack_properties["server_keep_alive"] = self._server_keep_alive
            if self._client_id_assigned:
                connack_properties["assigned_client_identifier"] = self.client_id
            if properties:
                overridden = _SERVER_CONTROLLED_CONNACK_PROPERTIES.intersection(properties)
                if overridden:
                    raise LocalProtocolError(f"{sorted(overridden)} are set by the connection")
                connack_properties.update(properties)
            self._outgoing.append(encode(Connack(session_present, 0, connack_properties), MQTT_5))
        else:
            if properties:
                raise LocalProtocolError("MQTT 3.1.1 CONNACK cannot carry properties")
            self._outgoing.append(bytes((0x20, 0x02, 1 if session_present else 0, 0)))
        self.state = State.CONNECTED

    def refuse(self, reason_code: int, *, reason_string: str | None = None) -> None:
        """Refuse the pending CONNECT with an MQTT 5 CONNACK reason code (>= 0x80; for an
        MQTT 3.1.1 client it is mapped to the nearest return code), then close."""
        if self.state is State.CLOSED:
            return
        self._require_connecting("refuse")
        if reason_code < 0x80 or reason_code not in _CONNACK_REASON_CODES:
            raise LocalProtocolError(f"0x{reason_code:02x} is not a CONNACK refusal code")
        self._queue_refusal(reason_code, reason_string)
        self._close()

    def _queue_refusal(self, reason_code: int, reason_string: str | None) -> None:
        if self.version == MQTT_5:
            properties = {"reason_string": reason_string} if reason_string else {}
            self._outgoing.append(encode(Connack(False, reason_code, properties), MQTT_5))
        else:
            code = V311_CONNACK_CODE_FOR.get(reason_code, ConnackReturnCode.SERVER_UNAVAILABLE)
            self._outgoing.append(bytes((0x20, 0x02, 0x00, code)))

    def _require_connecting(self, action: str) -> Connect:
        if self.state is not State.CONNECTING or self._connect is None:
            raise LocalProtocolError(f"{action}() needs an unanswered CONNECT ({self.state.name})")
        return self._connect

    def _require_connected(self, action: str) -> bool:
        """False when closed (answers to a closed connection are dropped quietly)."""
        if self.state is State.CONNECTED:
            return True
        if self.state is State.CLOSED:
            return False
        raise LocalProtocolError(f"{action}() needs an accepted connection ({self.state.name})")

    def ack(self, packet: Publish, reason_code: int = 0) -> None:
        """Acknowledge an inbound PUBLISH this connection delivered: PUBACK for QoS 1, PUBREC
        for QoS 2 (the PUBREL/PUBCOMP that follow are automatic); frees its receive-maximum
        slot. A no-op for QoS 0 and on a closed connection.

        MQTT 3.1.1 cannot carry a failure (>= 0x80): nothing is sent, the slot is freed, and
        the caller is expected to `disconnect()` so that the client redelivers the message
        on its next connection."""
        packet_id = packet.packet_id
        if packet_id is None:
            return
        pending = self._inbound.get(packet_id)
        if pending is not packet and (pending is None or pending != packet):
            if self.state is State.CLOSED:
                return
            raise LocalProtocolError(f"PUBLISH {packet_id} is not awaiting an ack")
        cls = Puback if packet.qos == 1 else Pubrec
        if reason_code >= 0x80:  # refused: the delivery ends here
            del self._inbound[packet_id]
            if self.version == MQTT_5:
                self._outgoing.append(encode(cls(packet_id, reason_code), MQTT_5))
            return
        if packet.qos == 1:
            del self._inbound[packet_id]
        else:
            self._inbound[packet_id] = None  # now awaiting the client's PUBREL
        if reason_code and self.version == MQTT_5:
            self._outgoing.append(encode(cls(packet_id, reason_code), MQTT_5))
        else:
            self._outgoing.append(_pack_ack(_PUBACK if packet.qos == 1 else _PUBREC, 2, packet_id))

    def suback(self, packet_id: int, reason_codes: list[int]) -> None:
        """Answer SUBSCRIBE `packet_id`, one MQTT 5 reason code per subscription (MQTT 3.1.1
        keeps 0/1/2 and turns every failure into 0x80)."""
        if not self._require_connected("suback"):
            return
        expected = self._pending_subscribes.get(packet_id)
        if expected is None or expected != len(reason_codes):
            raise LocalProtocolError(
                f"SUBSCRIBE {packet_id} awaits {expected} reason codes, not {len(reason_codes)}"
            )
        del self._pending_subscribes[packet_id]
        if self.version == MQTT_3_1_1:
            reason_codes = [code if code < 0x80 else 0x80 for code in reason_codes]
        self._outgoing.append(encode(Suback(packet_id, reason_codes), self.version or MQTT_5))

    def unsuback(self, packet_id: int, reason_codes: list[int]) -> None:
        """Answer UNSUBSCRIBE `packet_id`, one reason code per filter (MQTT 3.1.1 sends
        none: its UNSUBACK has no payload)."""
        if not self._require_connected("unsuback"):
            return
        expected = self._pending_unsubscribes.get(packet_id)
        if expected is None or expected != len(reason_codes):
            raise LocalProtocolError(
                f"UNSUBSCRIBE {packet_id} awaits {expected} reason codes, not {len(reason_codes)}"
            )
        del self._pending_unsubscribes[packet_id]
        codes = reason_codes if self.version == MQTT_5 else []
        self._outgoing.append(encode(Unsuback(packet_id, codes), self.version or MQTT_5))

    def disconnect(self, reason_code: int = 0, reason_string: str | None = None) -> None:
        """Close from our side. MQTT 5 queues a DISCONNECT (or, while the CONNECT is still
        unanswered, a refusing CONNACK); MQTT 3.1.1 has nothing to say and just closes."""
        if self.state is State.CLOSED:
            return
        if self.state is State.CONNECTING:
            self._queue_refusal(_connack_refusal_code(reason_code), reason_string)
        elif self.state is State.CONNECTED and self.version == MQTT_5:
            properties = {"reason_string": reason_string} if reason_string else {}
            self._outgoing.append(encode(Disconnect(reason_code, properties), MQTT_5))
        self._close()

    def send_publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        packet_id: int | None = None,
    ) -> int | None:
        """Queue a PUBLISH to the client; returns its packet id (None for QoS 0). A QoS 1/2
        delivery ends with a `PublishAcknowledged` event. Raises `LocalProtocolError` when
        the client's receive maximum is used up or the packet exceeds its maximum size.
        With `packet_id`, a QoS 1/2 PUBLISH of an earlier connection of the same session
        is sent again, with DUP set [MQTT-4.4.0-1]."""
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(
                f"send_publish() needs an accepted connection ({self.state.name})"
            )
        dup = packet_id is not None
        if qos:
            if len(self._outbound) >= self._client_receive_maximum:
                raise LocalProtocolError("the client's receive maximum is reached")
            if packet_id is None:
                packet_id = self._free_packet_id()
        else:
            packet_id, dup = None, False
        assert self.version is not None
        data = encode(
            Publish(topic, payload, qos, retain, dup, packet_id, properties or {}), self.version
        )
        if len(data) > self._client_max_packet_size:
            raise LocalProtocolError(
                f"PUBLISH of {len(data)} bytes exceeds the client's maximum packet size"
            )
        if packet_id is not None:
            self._outbound[packet_id] = _PUBACK if qos == 1 else _PUBREC
            self._next_packet_id = packet_id % 65535 + 1
        self._outgoing.append(data)
        return packet_id

    def send_encoded_publish(self, data: bytes) -> None:
        """Queue a QoS 0 PUBLISH already encoded for this connection's protocol version (a
        message fanned out to many subscribers is encoded once). Dropped, as QoS 0 may be,
        when it exceeds the client's maximum packet size [MQTT-3.1.2-25]."""
        if self.state is State.CONNECTED and len(data) <= self._client_max_packet_size:
            self._outgoing.append(data)

    def send_pubrel(self, packet_id: int) -> None:
        """Resume a QoS 2 delivery of an earlier connection that had its PUBREC: send the
        PUBREL again and await the PUBCOMP [MQTT-4.4.0-1]."""
        if self._require_connected("send_pubrel"):
            self._outbound[packet_id] = _PUBCOMP
            self._outgoing.append(_pack_ack(_PUBREL, 2, packet_id))

    @property
    def outbound_room(self) -> int:
        """QoS 1/2 PUBLISH packets the client's receive maximum still admits."""
        return self._client_receive_maximum - len(self._outbound)

    @property
    def client_max_packet_size(self) -> int:
        return self._client_max_packet_size

    def awaiting_release(self) -> list[int]:
        """Inbound QoS 2 packet ids whose PUBREL is awaited: session state that outlives the
        connection, so that a resent PUBLISH is not delivered twice [MQTT-4.3.3-13]."""
        return [packet_id for packet_id, publish in self._inbound.items() if publish is None]

    def awaiting_completion(self) -> list[int]:
        """Outbound QoS 2 packet ids whose PUBREC came (the PUBCOMP is awaited): on the
        session's next connection the PUBREL is sent again, not the PUBLISH."""
        return [packet_id for packet_id, awaited in self._outbound.items()
                if awaited == _PUBCOMP]

    def restore_releases(self, packet_ids: list[int]) -> None:
        """Take the inbound QoS 2 state of the session's earlier connection."""
        for packet_id in packet_ids:
            self._inbound.setdefault(packet_id, None)

    def _free_packet_id(self) -> int:
        packet_id = self._next_packet_id
        while packet_id in self._outbound:
            packet_id = packet_id % 65535 + 1
        return packet_id


_Handler: TypeAlias = Callable[[ServerConnection, Any], Event | None]

_TRANSITIONS: Final[dict[tuple[State, int], tuple[_Handler, State]]] = {
    (State.AWAIT_CONNECT, PacketType.CONNECT): (ServerConnection._on_connect, State.CONNECTING),
    (State.CONNECTED, PacketType.PUBLISH): (ServerConnection._on_publish, State.CONNECTED),
    (State.CONNECTED, PacketType.PUBACK): (ServerConnection._on_puback, State.CONNECTED),
    (State.CONNECTED, PacketType.PUBREC): (ServerConnection._on_pubrec, State.CONNECTED),
    (State.CONNECTED, PacketType.PUBREL): (ServerConnection._on_pubrel, State.CONNECTED),
    (State.CONNECTED, PacketType.PUBCOMP): (ServerConnection._on_pubcomp, State.CONNECTED),
    (State.CONNECTED, PacketType.SUBSCRIBE): (ServerConnection._on_subscribe, State.CONNECTED),
    (State.CONNECTED, PacketType.UNSUBSCRIBE): (ServerConnection._on_unsubscribe, State.CONNECTED),
    (State.CONNECTED, PacketType.PINGREQ): (ServerConnection._on_pingreq, State.CONNECTED),
    (State.CONNECTED, PacketType.DISCONNECT): (ServerConnection._on_disconnect, State.CLOSED),
}
"""What each inbound packet does in each state: (state, packet type) → (handler, next
state). Nothing is decoded in CONNECTING or CLOSED; a pair missing here is a violation."""

__all__ = [
    "ClientDisconnect",
    "ConnectRequest",
    "ConnectionClosed",
    "Event",
    "PublishAcknowledged",
    "ServerConnection",
    "State",
    "SubscribeRequest",
    "UnsubscribeRequest",
]
