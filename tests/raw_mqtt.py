"""MQTT packets as raw bytes, written out by hand: the tests that talk to the gateway over a
socket this way check its decoder against an encoding that is not its own."""

from __future__ import annotations

import struct


def remaining_length(n: int) -> bytes:
    """The variable-length integer of a fixed header."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_frame(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    """A PUBLISH packet (MQTT 3.1.1 layout: no properties)."""
    name = topic.encode()
    body = (struct.pack("!H", len(name)) + name
            + (struct.pack("!H", packet_id) if qos else b"") + payload)
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


def connect_frame(client_id: str, keepalive: int = 60, version: int = 4,
                  username: str | None = None, clean: bool = True) -> bytes:
    """A CONNECT packet, by default with a clean session (MQTT 5: no properties)."""
    cid = client_id.encode()
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0)
    props = b"\x00" if version == 5 else b""
    body = (b"\x00\x04MQTT" + bytes([version, flags]) + struct.pack("!H", keepalive) + props
            + struct.pack("!H", len(cid)) + cid)
    if username is not None:
        user = username.encode()
        body += struct.pack("!H", len(user)) + user
    return bytes([0x10]) + remaining_length(len(body)) + body
