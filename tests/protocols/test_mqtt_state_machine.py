"""The connection's state table, walked exhaustively and then at random.

First every (state, packet type) pair in both versions, against what the specification
says a client may send when; then a Hypothesis state machine mixing valid packets, packets
in the wrong place, server-only packets, corrupted and random bytes, split anywhere, with
the application answering in between. Whatever happens: `receive_data` never raises, a
closing event is always the last of its batch, and a closed connection ignores input.
"""

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from mqtt_helpers import connected, connecting, violation_of
from strategies import VERSIONS, client_packets_after_connect, connects, packets

from protocols.mqtt import (
    ClientDisconnect,
    ConnectionClosed,
    ConnectRequest,
    Event,
    LocalProtocolError,
    PublishAcknowledged,
    ServerConnection,
    State,
    SubscribeRequest,
    UnsubscribeRequest,
)
from protocols.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    encode,
)

EVENT_TYPES = (
    ConnectRequest,
    Publish,
    SubscribeRequest,
    UnsubscribeRequest,
    ClientDisconnect,
    PublishAcknowledged,
    ConnectionClosed,
)

# What a client may send once connected (spec chapter 3, "sent from Client to Server").
CLIENT_PACKETS_WHEN_CONNECTED = {
    PacketType.PUBLISH,
    PacketType.PUBACK,
    PacketType.PUBREC,
    PacketType.PUBREL,
    PacketType.PUBCOMP,
    PacketType.SUBSCRIBE,
    PacketType.UNSUBSCRIBE,
    PacketType.PINGREQ,
    PacketType.DISCONNECT,
}


def example(packet_type: PacketType, version: int) -> bytes:
    """A well-formed packet of each type."""
    if packet_type == PacketType.AUTH and version == MQTT_3_1_1:
        return b"\xf0\x00"  # AUTH does not exist in 3.1.1; these are its bytes in 5.0
    examples: dict[PacketType, Packet] = {
        PacketType.CONNECT: Connect(version, "c"),
        PacketType.CONNACK: Connack(),
        PacketType.PUBLISH: Publish("t", b"x"),
        PacketType.PUBACK: Puback(1),
        PacketType.PUBREC: Pubrec(1),
        PacketType.PUBREL: Pubrel(1),
        PacketType.PUBCOMP: Pubcomp(1),
        PacketType.SUBSCRIBE: Subscribe(1, [("t", SubscriptionOptions())]),
        PacketType.SUBACK: Suback(1, [0]),
        PacketType.UNSUBSCRIBE: Unsubscribe(1, ["t"]),
        PacketType.UNSUBACK: Unsuback(1, [0] if version == MQTT_5 else []),
        PacketType.PINGREQ: Pingreq(),
        PacketType.PINGRESP: Pingresp(),
        PacketType.DISCONNECT: Disconnect(),
        PacketType.AUTH: Auth(),
    }
    return encode(examples[packet_type], version)


def connection_in(state: State, version: int) -> ServerConnection:
    if state is State.AWAIT_CONNECT:
        return ServerConnection()
    if state is State.CONNECTING:
        return connecting(version)
    connection = connected(version)
    if state is State.CLOSED:
        connection.disconnect()
        connection.data_to_send()
    return connection


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("state", list(State), ids=lambda state: state.name)
@pytest.mark.parametrize("packet_type", list(PacketType), ids=lambda packet_type: packet_type.name)
def test_every_state_and_packet_type(state: State, packet_type: PacketType, version: int) -> None:
    connection = connection_in(state, version)
    events = connection.receive_data(example(packet_type, version), 5.0)
    if state in (State.CONNECTING, State.CLOSED):
        # CONNECTING buffers until accept() / refuse(); CLOSED ignores everything.
        assert events == [] and connection.state is state
        return
    if state is State.AWAIT_CONNECT:
        if packet_type == PacketType.CONNECT:
            assert events == [ConnectRequest(Connect(version, "c"))]
            assert connection.state is State.CONNECTING
            return
        expected = (
            "publish_before_connect" if packet_type == PacketType.PUBLISH else "protocol_error"
        )
        assert violation_of(events, connection).reason == expected
        return
    if packet_type in CLIENT_PACKETS_WHEN_CONNECTED:
        assert not any(isinstance(event, ConnectionClosed) for event in events)
        expected_state = State.CLOSED if packet_type == PacketType.DISCONNECT else State.CONNECTED
        assert connection.state is expected_state
        return
    if packet_type == PacketType.CONNECT:
        expected = "second_connect"
    elif packet_type == PacketType.AUTH and version == MQTT_3_1_1:
        expected = "unknown_packet_type"
    else:
        expected = "protocol_error"
    assert violation_of(events, connection).reason == expected


class ServerConnectionModel(RuleBasedStateMachine):
    """A client doing anything at all, and an application answering what it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.connection = ServerConnection(receive_maximum=4, max_packet_size=4096)
        self.version = MQTT_5
        self.now = 0.0
        self.unacknowledged: list[Publish] = []
        self.subscribes: dict[int, int] = {}
        self.unsubscribes: dict[int, int] = {}

    def feed(self, data: bytes, cuts: list[int] | None = None) -> None:
        pieces = [data]
        if cuts:
            bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
            pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        for piece in pieces:
            self.now += 0.5
            was_closed = self.connection.closed
            events = self.connection.receive_data(piece, self.now)  # must never raise
            if was_closed:
                assert events == []
            self.check(events)
            self.connection.data_to_send()

    def check(self, events: list[Event]) -> None:
        for index, event in enumerate(events):
            assert isinstance(event, EVENT_TYPES)
            if isinstance(event, ConnectionClosed | ClientDisconnect):
                assert index == len(events) - 1, events
                assert self.connection.closed
            elif isinstance(event, ConnectRequest):
                assert index == len(events) - 1  # decoding pauses until the answer
                assert self.connection.state is State.CONNECTING
                self.version = event.packet.protocol_level
            elif isinstance(event, Publish) and event.qos:
                self.unacknowledged.append(event)
            elif isinstance(event, SubscribeRequest):
                self.subscribes[event.packet.packet_id] = len(event.packet.subscriptions)
            elif isinstance(event, UnsubscribeRequest):
                self.unsubscribes[event.packet.packet_id] = len(event.packet.topic_filters)
        if self.connection.closed:
            self.unacknowledged.clear()

    # -- the client ---------------------------------------------------------------------
    @rule(version=st.sampled_from(VERSIONS), data=st.data(), cuts=st.lists(st.integers(0, 80)))
    def client_sends_connect(self, version: int, data: st.DataObject, cuts: list[int]) -> None:
        self.feed(encode(data.draw(connects(version)), version), cuts)

    @rule(data=st.data(), cuts=st.lists(st.integers(0, 80), max_size=3))
    def client_sends_a_valid_packet(self, data: st.DataObject, cuts: list[int]) -> None:
        packet = data.draw(client_packets_after_connect(self.version))
        self.feed(encode(packet, self.version), cuts)

    @rule(data=st.data(), version=st.sampled_from(VERSIONS))
    def client_sends_any_packet(self, data: st.DataObject, version: int) -> None:
        self.feed(encode(data.draw(packets(version)), version))

    @rule(data=st.data(), position=st.integers(0, 200), value=st.integers(0, 255))
    def client_sends_a_corrupted_packet(
        self, data: st.DataObject, position: int, value: int
    ) -> None:
        wire = bytearray(
            encode(data.draw(client_packets_after_connect(self.version)), self.version)
        )
        wire[position % len(wire)] = value
        self.feed(bytes(wire))

    @rule(garbage=st.binary(max_size=24))
    def client_sends_garbage(self, garbage: bytes) -> None:
        self.feed(garbage)

    # -- the application ----------------------------------------------------------------
    @precondition(lambda self: self.connection.state is State.CONNECTING)
    @rule()
    def application_accepts(self) -> None:
        self.connection.accept()
        self.feed(b"")

    @precondition(lambda self: self.connection.state is State.CONNECTING)
    @rule(reason_code=st.sampled_from([0x80, 0x86, 0x87, 0x88, 0x97]))
    def application_refuses(self, reason_code: int) -> None:
        self.connection.refuse(reason_code)
        assert self.connection.closed
        assert self.connection.data_to_send()[:1] == b"\x20"  # a CONNACK, and only that

    @precondition(lambda self: bool(self.unacknowledged))
    @rule(data=st.data(), reason_code=st.sampled_from([0, 0, 0x10, 0x80, 0x87]))
    def application_acks(self, data: st.DataObject, reason_code: int) -> None:
        index = data.draw(st.integers(0, len(self.unacknowledged) - 1))
        self.connection.ack(self.unacknowledged.pop(index), reason_code)

    @precondition(lambda self: bool(self.subscribes))
    @rule()
    def application_answers_a_subscribe(self) -> None:
        packet_id, count = self.subscribes.popitem()
        self.answer(self.connection.suback, packet_id, [0] * count)

    @precondition(lambda self: bool(self.unsubscribes))
    @rule()
    def application_answers_an_unsubscribe(self) -> None:
        packet_id, count = self.unsubscribes.popitem()
        self.answer(self.connection.unsuback, packet_id, [0] * count)

    def answer(self, method: Any, packet_id: int, codes: list[int]) -> None:
        try:
            method(packet_id, codes)
        except LocalProtocolError:
            # Only when the client reused a packet id still in flight (then the count changed).
            assert not self.connection.closed

    @precondition(lambda self: self.connection.state is State.CONNECTED)
    @rule(qos=st.integers(0, 2))
    def application_publishes(self, qos: int) -> None:
        try:
            self.connection.send_publish("out/t", b"payload", qos=qos)
        except LocalProtocolError as error:
            assert "receive maximum" in str(error) or "maximum packet size" in str(error)

    @rule(reason_code=st.sampled_from([0x00, 0x80, 0x8B, 0x8D]))
    def application_disconnects(self, reason_code: int) -> None:
        self.connection.disconnect(reason_code)
        assert self.connection.closed
        self.connection.data_to_send()
        self.unacknowledged.clear()

    @rule(later=st.floats(0, 10_000))
    def time_passes(self, later: float) -> None:
        self.connection.keepalive_expired(self.now + later)

    # -- always ---------------------------------------------------------------------------
    @invariant()
    def state_is_consistent(self) -> None:
        connection = self.connection
        assert connection.closed == (connection.state is State.CLOSED)
        if connection.state is not State.AWAIT_CONNECT:
            assert connection.version in VERSIONS or connection.closed
        if connection.closed:
            assert connection.receive_data(b"\xc0\x00", self.now) == []
            assert connection.data_to_send() == b""


ServerConnectionModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_server_connection_model = ServerConnectionModel.TestCase


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from(VERSIONS), chunks=st.lists(st.binary(max_size=40), max_size=8))
def test_random_bytes_after_connect_never_raise(version: int, chunks: list[bytes]) -> None:
    connection = connected(version)
    for chunk in chunks:
        was_closed = connection.closed
        events = connection.receive_data(chunk, 1.0)
        if was_closed:
            assert events == []
        for index, event in enumerate(events):
            if isinstance(event, ConnectionClosed | ClientDisconnect):
                assert index == len(events) - 1 and connection.closed
        connection.data_to_send()
