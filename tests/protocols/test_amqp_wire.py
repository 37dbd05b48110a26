"""The sans-I/O AMQP client from bytes alone: the handshake, deliveries however the bytes
are split, properties as pamqp reads them, the frames it writes as pamqp reads them, and the
server's mistakes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header
from pamqp.body import ContentBody
from pamqp.heartbeat import Heartbeat

from protocols.amqp.wire import (
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    ChannelClosed,
    ClientConnection,
    ConnectionClosed,
    Delivery,
    MethodReceived,
    Opened,
    ProtocolError,
    encode_properties,
    short_str,
)


def frames_of(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        n, channel, f = frame.unmarshal(data)
        out.append((channel, f))
        data = data[n:]
    return out


def server(*frames: tuple[int, Any]) -> bytes:
    return b"".join(frame.marshal(f, ch) for ch, f in frames)


def opened(heartbeat: int = 15, frame_max: int = 131072) -> ClientConnection:
    c = ClientConnection(username="u", password="p", vhost="v", heartbeat=heartbeat,
                         frame_max=frame_max)
    c.initiate()
    c.receive(server((0, commands.Connection.Start(mechanisms="PLAIN AMQPLAIN")),
                     (0, commands.Connection.Tune(channel_max=2047, frame_max=131072,
                                                  heartbeat=60)),
                     (0, commands.Connection.OpenOk())))
    c.data_to_send()
    assert c.state == "opened"
    return c


def delivery_frames(tag: int, body: bytes, properties: commands.Basic.Properties | None = None,
                    channel: int = 1, frame_max: int = 131072, redelivered: bool = False,
                    exchange: str = "ex", key: str = "a.b") -> bytes:
    out = server((channel, commands.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=tag, redelivered=redelivered, exchange=exchange,
        routing_key=key)), (channel, header.ContentHeader(
            0, len(body), properties or commands.Basic.Properties())))
    room = frame_max - 8
    for start in range(0, len(body), room):
        out += frame.marshal(ContentBody(body[start:start + room]), channel)
    return out


# -- the handshake ---------------------------------------------------------------------------

def test_the_handshake_logs_in_with_plain_and_negotiates() -> None:
    c = ClientConnection(username="user", password="pw", vhost="/iot", heartbeat=15,
                         client_properties={"connection_name": "gw ingest"})
    c.initiate()
    assert c.data_to_send() == PROTOCOL_HEADER
    events, deliveries = c.receive(server(
        (0, commands.Connection.Start(mechanisms="AMQPLAIN PLAIN",
                                      server_properties={"product": "RabbitMQ"}))))
    assert (events, deliveries) == ([], [])
    [(_, start_ok)] = frames_of(c.data_to_send())
    assert isinstance(start_ok, commands.Connection.StartOk)
    assert start_ok.mechanism == "PLAIN" and start_ok.response == "\0user\0pw"
    assert start_ok.client_properties["connection_name"] == "gw ingest"
    assert start_ok.client_properties["capabilities"]["consumer_cancel_notify"] is True
    c.receive(server((0, commands.Connection.Tune(channel_max=2047, frame_max=65536,
                                                  heartbeat=60))))
    [(_, tune_ok), (_, open_)] = frames_of(c.data_to_send())
    assert (tune_ok.frame_max, tune_ok.heartbeat, tune_ok.channel_max) == (65536, 15, 2047)
    assert isinstance(open_, commands.Connection.Open) and open_.virtual_host == "/iot"
    events, _ = c.receive(server((0, commands.Connection.OpenOk())))
    assert events == [Opened(15, 65536, {"product": "RabbitMQ"})]


@pytest.mark.parametrize(("ours", "theirs", "agreed"), [(15, 60, 15), (60, 5, 5), (15, 0, 15),
                                                         (0, 60, 0)])
def test_heartbeat_negotiation(ours: int, theirs: int, agreed: int) -> None:
    c = ClientConnection(username="u", password="p", heartbeat=ours)
    c.receive(server((0, commands.Connection.Start(mechanisms="PLAIN")),
                     (0, commands.Connection.Tune(heartbeat=theirs))))
    assert c.heartbeat == agreed


def test_a_server_without_plain_or_of_another_version_is_refused() -> None:
    c = ClientConnection(username="u", password="p")
    with pytest.raises(ProtocolError, match="no PLAIN"):
        c.receive(server((0, commands.Connection.Start(mechanisms="EXTERNAL"))))
    with pytest.raises(ProtocolError, match="another protocol version"):
        ClientConnection(username="u", password="p").receive(b"AMQP\x00\x00\x09\x00")


# -- deliveries --------------------------------------------------------------------------------

FULL = commands.Basic.Properties(
    content_type="application/json", content_encoding="gzip",
    headers={"device": "pump-7", "n": 3, "flag": True}, delivery_mode=2,
    priority=7, correlation_id="c", reply_to="r", expiration="60000", message_id="m-1",
    timestamp=datetime(2026, 1, 1, tzinfo=UTC), message_type="t", user_id="alice",
    app_id="sensor-9")


def test_a_delivery_with_every_property() -> None:
    c = opened()
    events, [d] = c.receive(delivery_frames(42, b'{"x": 1}', FULL, redelivered=True))
    assert events == []
    assert d == Delivery(1, "ctag", 42, True, "ex", "a.b", d.properties, b'{"x": 1}')
    p = d.properties
    assert (p.content_type, p.delivery_mode, p.priority, p.message_id, p.user_id, p.app_id) == (
        "application/json", 2, 7, "m-1", "alice", "sensor-9")
    assert p.headers == {"device": "pump-7", "n": 3, "flag": True}


def test_deliveries_survive_any_split_of_the_bytes() -> None:
    stream = b"".join(delivery_frames(t, b"body-%d" % t, FULL if t % 2 else None)
                      for t in range(1, 4)) + HEARTBEAT_FRAME
    whole = opened().receive(stream)[1]
    assert [d.delivery_tag for d in whole] == [1, 2, 3]
    for cut in range(1, len(stream)):
        c = opened()
        got = c.receive(stream[:cut])[1] + c.receive(stream[cut:])[1]
        assert got == whole, cut
    c = opened()
    assert [d for i in range(len(stream)) for d in c.receive(stream[i:i + 1])[1]] == whole


def test_large_bodies_come_in_several_frames_and_empty_ones_in_none() -> None:
    body = bytes(range(256)) * 40
    c = opened(frame_max=4096)
    [d] = c.receive(delivery_frames(1, body, frame_max=4096))[1]
    assert d.body == body
    [e] = c.receive(delivery_frames(2, b""))[1]
    assert e.body == b"" and e.delivery_tag == 2


short_strings = st.text(max_size=20).filter(lambda s: len(s.encode()) <= 255)


@settings(max_examples=150, deadline=None)
@given(content_type=st.none() | short_strings, message_id=st.none() | short_strings,
       user_id=st.none() | short_strings, app_id=st.none() | short_strings,
       priority=st.none() | st.integers(0, 255), delivery_mode=st.none() | st.integers(1, 2),
       headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=8),
                                           st.text(max_size=8) | st.integers(-2**31, 2**31 - 1),
                                           max_size=3),
       correlation_id=st.none() | short_strings, body=st.binary(max_size=300),
       split=st.integers(0, 400))
def test_properties_read_as_pamqp_reads_them(
        content_type: str | None, message_id: str | None, user_id: str | None,
        app_id: str | None, priority: int | None, delivery_mode: int | None,
        headers: dict[str, Any] | None, correlation_id: str | None, body: bytes,
        split: int) -> None:
    properties = commands.Basic.Properties(
        content_type=content_type, message_id=message_id, user_id=user_id, app_id=app_id,
        priority=priority, delivery_mode=delivery_mode, headers=headers,
        correlation_id=correlation_id)
    data = delivery_frames(9, body, properties)
    c = opened()
    cut = min(split, len(data))
    [d] = c.receive(data[:cut])[1] + c.receive(data[cut:])[1]
    expected = next(f for _, f in frames_of(data)
                    if isinstance(f, header.ContentHeader)).properties
    p = d.properties
    assert (p.content_type, p.message_id, p.user_id, p.app_id, p.priority, p.delivery_mode,
            p.headers) == (expected.content_type, expected.message_id, expected.user_id,
                           expected.app_id, expected.priority, expected.delivery_mode,
                           expected.headers)
    assert d.body == body


# -- what it writes -------------------------------------------------------------------------

def test_acks_and_nacks_are_the_frames_pamqp_would_write() -> None:
    c = opened()
    c.ack(1, 77, multiple=True)
    c.nack(1, 78, multiple=True, requeue=True)
    c.nack(2, 5, multiple=False, requeue=False)
    c.send_heartbeat()
    assert c.data_to_send() == server(
        (1, commands.Basic.Ack(delivery_tag=77, multiple=True)),
        (1, commands.Basic.Nack(delivery_tag=78, multiple=True, requeue=True)),
        (2, commands.Basic.Nack(delivery_tag=5, multiple=False, requeue=False)),
    ) + frame.marshal(Heartbeat(), 0)


def test_publishes_read_back_with_pamqp_and_split_bodies_by_frame_max() -> None:
    c = opened(frame_max=4096)
    body = b"x" * 10_000
    c.publish(1, short_str("iotgw.processed"), "acme.critical.d1", body, encode_properties(
        content_type="application/json", delivery_mode=2, message_id="gw-1",
        headers={"tier": "critical"}))
    got = frames_of(c.data_to_send())
    publish, content = got[0][1], got[1][1]
    assert (publish.exchange, publish.routing_key, publish.mandatory) == (
        "iotgw.processed", "acme.critical.d1", False)
    assert content.body_size == 10_000
    assert (content.properties.content_type, content.properties.delivery_mode,
            content.properties.message_id, content.properties.headers) == (
        "application/json", 2, "gw-1", {"tier": "critical"})
    chunks = [f.value for _, f in got[2:]]
    assert b"".join(chunks) == body and max(map(len, chunks)) == 4096 - 8
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        short_str("x" * 256)


# -- closing and replies -----------------------------------------------------------------------

def test_the_server_closing_is_answered_and_reported() -> None:
    c = opened()
    events, _ = c.receive(server((1, commands.Channel.Close(
        reply_code=406, reply_text="PRECONDITION_FAILED", class_id=50, method_id=10))))
    assert events == [ChannelClosed(1, 406, "PRECONDITION_FAILED")]
    assert frames_of(c.data_to_send())[0][1].__class__ is commands.Channel.CloseOk
    events, _ = c.receive(server((0, commands.Connection.Close(
        reply_code=320, reply_text="CONNECTION_FORCED", class_id=0, method_id=0))))
    assert events == [ConnectionClosed(320, "CONNECTION_FORCED")]
    assert isinstance(frames_of(c.data_to_send())[0][1], commands.Connection.CloseOk)


def test_closing_ourselves_ends_with_the_server_s_close_ok() -> None:
    c = opened()
    c.close()
    assert isinstance(frames_of(c.data_to_send())[0][1], commands.Connection.Close)
    c.close()  # once
    assert c.data_to_send() == b""
    events, _ = c.receive(server((0, commands.Connection.CloseOk())))
    assert events == [ConnectionClosed(200, "closed")] and c.state == "closed"


def test_replies_come_up_as_methods() -> None:
    c = opened()
    events, _ = c.receive(server((1, commands.Basic.ConsumeOk(consumer_tag="t")),
                                 (1, commands.Basic.Ack(delivery_tag=3, multiple=True))))
    assert [type(e.method) for e in events if isinstance(e, MethodReceived)] == [
        commands.Basic.ConsumeOk, commands.Basic.Ack]


@pytest.mark.parametrize(("data", "message"), [
    (frame.marshal(commands.Basic.QosOk(), 1)[:-1] + b"\x00", "does not end with 0xCE"),
    (frame.marshal(header.ContentHeader(0, 3, commands.Basic.Properties()), 1),
     "content header without its Basic.Deliver"),
    (frame.marshal(ContentBody(b"abc"), 1), "content body without its header"),
    (b"\x05\x00\x00\x00\x00\x00\x00\xce", "unknown frame type 5"),
    (server((1, commands.Basic.Deliver(consumer_tag="t", delivery_tag=1, exchange="",
                                       routing_key="q")),
            (1, header.ContentHeader(0, 3, commands.Basic.Properties())),
            (1, ContentBody(b"abcdef"))), "longer than its header"),
    (server((1, commands.Basic.Deliver(consumer_tag="t", delivery_tag=1, exchange="",
                                       routing_key="q")),
            (1, commands.Basic.Deliver(consumer_tag="t", delivery_tag=2, exchange="",
                                       routing_key="q"))), "before the previous delivery"),
])
def test_what_the_server_may_not_send(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        opened().receive(data)
