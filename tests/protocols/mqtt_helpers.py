"""Small helpers shared by the MQTT codec tests: connections driven from bytes alone."""

from typing import Any

from protocols.mqtt import (
    ConnectionClosed,
    ConnectRequest,
    Event,
    ProtocolViolation,
    ServerConnection,
)
from protocols.mqtt.packets import Connect, Packet, encode


def connecting(version: int, connect: Connect | None = None, **options: Any) -> ServerConnection:
    """A connection that has received a CONNECT and awaits accept()/refuse()."""
    connection = ServerConnection(**options)
    packet = connect or Connect(version, "client-1", keepalive=60)
    events = connection.receive_data(encode(packet, version), 0.0)
    assert events == [ConnectRequest(packet)]
    return connection


def connected(version: int, connect: Connect | None = None, **options: Any) -> ServerConnection:
    """An accepted connection with its CONNACK already collected."""
    connection = connecting(version, connect, **options)
    connection.accept()
    connection.data_to_send()
    return connection


def send(connection: ServerConnection, *packets: Packet, now: float = 1.0) -> list[Event]:
    """Feed `packets`, encoded in the connection's version, as one read."""
    version = connection.version
    assert version is not None
    return connection.receive_data(b"".join(encode(p, version) for p in packets), now)


def violation_of(events: list[Event], connection: ServerConnection) -> ProtocolViolation:
    """The violation that closed `connection`: the last event, and the connection closed."""
    assert events, "expected a ConnectionClosed event"
    last = events[-1]
    assert isinstance(last, ConnectionClosed), events
    assert connection.closed
    assert connection.receive_data(b"\xc0\x00", 99.0) == []  # a closed connection ignores input
    return last.violation
