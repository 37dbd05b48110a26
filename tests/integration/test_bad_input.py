"""Hostile clients over real sockets: every malformed frame closes only that connection,
with the reason code the spec asks for, a WARNING naming the peer and a counted reason;
the daemon and every other connection keep working."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import DEFAULT_TOML, RunningGateway

pytestmark = pytest.mark.integration


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(version: int = 4, client_id: str = "bad", name: bytes = b"MQTT") -> bytes:
    props = b"\x00" if version == 5 else b""
    return packet(0x10, utf8(name) + bytes([version, 0x02]) + b"\x00\x3c" + props
                  + utf8(client_id))


def publish_packet(topic: bytes, payload: bytes = b"{}", version: int = 4,
                   first: int = 0x30) -> bytes:
    props = b"\x00" if version == 5 else b""
    return packet(first, utf8(topic) + props + payload)


def DISCONNECT(reason: int) -> tuple[str, int]:
    return ("DISCONNECT", reason)


def CONNACK_311(code: int) -> tuple[str, int]:
    return ("CONNACK", code)


def reply_of(data: bytes) -> tuple[str, int] | bytes:
    """What the server said before closing: a packet kind and its reason code, or raw bytes."""
    if data[:1] == b"\xe0":  # DISCONNECT; the reason code may be omitted when it is 0
        return ("DISCONNECT", data[2] if len(data) > 2 else 0)
    if data[:1] == b"\x20" and len(data) == 4:
        return ("CONNACK", data[3])
    return data


_open: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        _open.append(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, version: int = 4, client_id: str = "bad") -> bytes:
        self.send(connect_packet(version, client_id))
        connack = self.sock.recv(64)
        assert connack[:1] == b"\x20" and connack[3] == 0, connack
        return connack

    def read_until_closed(self) -> bytes:
        """Everything the server sent before closing; fails if it does not close."""
        data = b""
        while True:
            chunk = self.sock.recv(4096)
            if not chunk:
                return data
            data += chunk


def assert_still_serving(gw: RunningGateway) -> None:
    good = Raw(gw.mqtt_port)
    good.connect(5, "good-client")
    before = gw.stats()["processed"]
    good.send(publish_packet(b"still/working", b'{"ok": 1}', version=5))
    gw.wait_processed(before + 1)


def counted(gw: RunningGateway, reason: str) -> bool:
    return f'iotgw_protocol_errors_total{{protocol="mqtt",reason="{reason}"}} 1.0' in gw.metrics()


# (name, version, bytes after a successful CONNECT, reason slug, expected reply or None)
AFTER_CONNECT: list[tuple[str, int, bytes, str, tuple[str, int] | bytes]] = [
    ("remaining length over 4 bytes", 5, b"\x30\xff\xff\xff\xff\x01",
     "malformed_remaining_length", DISCONNECT(0x81)),
    ("reserved flag bits", 5, b"\xc1\x00", "reserved_flags", DISCONNECT(0x81)),
    ("unknown packet type 0", 4, b"\x00\x00", "unknown_packet_type", b""),
    ("second CONNECT", 5, connect_packet(5, "again"), "second_connect", DISCONNECT(0x82)),
    ("wildcard in PUBLISH topic", 5, publish_packet(b"a/+/b", version=5), "wildcard_in_topic",
     DISCONNECT(0x90)),
    ("multi-level wildcard in topic", 4, publish_packet(b"a/#"), "wildcard_in_topic", b""),
    ("invalid UTF-8 in topic", 5, publish_packet(b"a/\xff\xfe", version=5), "invalid_utf8",
     DISCONNECT(0x81)),
    ("QoS 3", 4, publish_packet(b"a/b", first=0x36), "invalid_qos", b""),
    ("length past the end of the packet", 4, packet(0x30, b"\x00\x10ab"), "malformed_packet",
     b""),
]


@pytest.mark.parametrize(("name", "version", "data", "reason", "reply"), AFTER_CONNECT,
                         ids=[c[0] for c in AFTER_CONNECT])
def test_malformed_frame_after_connect_closes_only_that_connection(
        gateway: RunningGateway, caplog: pytest.LogCaptureFixture, name: str, version: int,
        data: bytes, reason: str, reply: tuple[str, int] | bytes) -> None:
    bystander = Raw(gateway.mqtt_port)
    bystander.connect(4, "bystander")
    bad = Raw(gateway.mqtt_port)
    bad.connect(version)
    peer = f"127.0.0.1:{bad.sock.getsockname()[1]}"
    with caplog.at_level(logging.WARNING, logger="iotgw"):
        bad.send(data)
        sent_back = bad.read_until_closed()
        gateway.wait_for(lambda: counted(gateway, reason), 5)
    assert reply_of(sent_back) == reply
    assert any(peer in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    bystander.send(b"\xc0\x00")  # PINGREQ: the other connection is untouched
    assert bystander.sock.recv(2) == b"\xd0\x00"
    assert_still_serving(gateway)


BEFORE_CONNECT: list[tuple[str, bytes, str, tuple[str, int] | bytes]] = [
    ("PUBLISH before CONNECT", publish_packet(b"a/b"), "publish_before_connect", b""),
    ("wrong protocol name", connect_packet(4, name=b"MQTX"), "bad_protocol_name", b""),
    ("unsupported protocol level 3", connect_packet(3), "bad_protocol_level",
     CONNACK_311(0x01)),
]


@pytest.mark.parametrize(("name", "data", "reason", "reply"), BEFORE_CONNECT,
                         ids=[c[0] for c in BEFORE_CONNECT])
def test_malformed_frame_before_connect_is_refused(
        gateway: RunningGateway, name: str, data: bytes, reason: str,
        reply: tuple[str, int] | bytes) -> None:
    bad = Raw(gateway.mqtt_port)
    bad.send(data)
    assert reply_of(bad.read_until_closed()) == reply
    gateway.wait_for(lambda: counted(gateway, reason), 5)
    assert_still_serving(gateway)


@pytest.fixture
def small_packets(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory(base=DEFAULT_TOML.replace("max_packet_size = 1048576",
                                                     "max_packet_size = 1024"))


def test_packet_over_the_maximum_size_is_refused_before_it_is_read(
        small_packets: RunningGateway) -> None:
    bad = Raw(small_packets.mqtt_port)
    bad.connect(5)
    # Announce a 100 kB PUBLISH but send only its header: the server must not wait for it.
    bad.send(b"\x30" + varint(100_000) + utf8(b"big/topic"))
    assert reply_of(bad.read_until_closed()) == DISCONNECT(0x95)
    small_packets.wait_for(lambda: counted(small_packets, "packet_too_large"), 5)
    assert_still_serving(small_packets)


def test_malformed_payload_is_not_a_protocol_error(gateway: RunningGateway) -> None:
    client = Raw(gateway.mqtt_port)
    client.connect(4, "sloppy")
    client.send(publish_packet(b"sensors/t", b"{not json"))
    gateway.wait_processed(1)
    client.send(b"\xc0\x00")
    assert client.sock.recv(2) == b"\xd0\x00"  # still connected
    assert 'iotgw_payload_decode_errors_total{tier="standard"} 1.0' in gateway.metrics()
    assert "iotgw_protocol_errors_total{" not in gateway.metrics()


def test_publish_in_the_same_write_as_connect_is_processed(gateway: RunningGateway) -> None:
    client = Raw(gateway.mqtt_port)
    client.send(connect_packet(4, "eager") + publish_packet(b"eager/t", b'{"n": 1}'))
    assert client.sock.recv(4)[:1] == b"\x20"
    gateway.wait_processed(1)
