"""What gateways of different regions send each other, as bytes. Sans-I/O.

Forwarded work is the fleet's ``WorkItem`` (``gateway.fleet.codec``: classification, id,
receipt time, payload), content type ``WORK``, so that one ``Taker`` takes both. Heartbeats
are ``Heartbeat`` bodies, content type ``HEARTBEAT``, on the health exchange (fanout).
"""

from __future__ import annotations

import msgspec

HEARTBEAT = "application/vnd.iotgw.region-heartbeat+msgpack"
FORMAT = 1


class RegionDecodeError(ValueError):
    """A body that is not what its content type says."""


class Heartbeat(msgspec.Struct, array_like=True, frozen=True):
    format: int
    region: str
    node: str
    saturated: bool
    sent_at: float
    """Wall clock when sent: a heartbeat held in a publisher's buffer while its link was away
    arrives late, and one older than the down window says nothing about now."""


_decoder = msgspec.msgpack.Decoder(Heartbeat)
_encoder = msgspec.msgpack.Encoder()


def encode_heartbeat(region: str, node: str, saturated: bool, sent_at: float) -> bytes:
    return _encoder.encode(Heartbeat(FORMAT, region, node, saturated, sent_at))


def decode_heartbeat(body: bytes) -> Heartbeat:
    try:
        beat = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise RegionDecodeError(f"heartbeat: {err}") from None
    if beat.format != FORMAT:
        raise RegionDecodeError(f"heartbeat: unknown format {beat.format}")
    return beat
