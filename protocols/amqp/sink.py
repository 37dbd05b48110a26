"""The ``amqp`` sink: processed results to a RabbitMQ exchange, with publisher confirms.

``write(batch)`` encodes each envelope (the data lake's JSON record, or the raw payload) with
its routing key (a template over the envelope's fields, each filled in as one escaped word)
and hands them to a ``ConfirmedPublisher``; nothing waits. ``flush()`` waits until RabbitMQ
confirmed everything written before it, and raises ``AmqpUnavailable`` while RabbitMQ is
unreachable or slower than ``confirm_timeout_s``: the gateway then retires nothing of what
finished since the last good flush, so the write-ahead log holds it (spooling) until the link
is back and the held messages are published, in order. ``close()`` waits for the confirms as
long and raises the same way, so that what RabbitMQ never took stays in the WAL for the next
start.

Each message carries ``message_id`` = the envelope id: after a reconnect or a restart a
message may be published again (at least once), and receivers drop what they have seen.
"""

from __future__ import annotations

import operator
import time
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from gateway.envelope import Envelope, SinkRecord
from gateway.metrics import Metrics
from protocols.amqp.config import PROCESSED_FIELDS, check_template, check_url
from protocols.amqp.errors import AmqpUnavailable
from protocols.amqp.mapping import render_key, template_fields
from protocols.amqp.publisher import ConfirmedPublisher, LinkSettings, Outgoing
from protocols.amqp.wire import encode_properties

MAX_KEY_CACHE = 100_000


class AmqpSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str | None = None
    """``amqp://user:password@host:port/vhost``; ``with_amqp`` fills it in from ``[amqp]``."""
    exchange: Annotated[str, Meta(min_length=1, max_length=255)] = "iotgw.processed"
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    declare: bool = True
    """Declare the exchange (durable) on every connect; off: it must exist."""
    routing_key: str = "{tenant}.{tier}.{device}"
    """Fields: {tenant}, {tier}, {device}, {region}, {device_class}, {topic} (its levels
    become words)."""
    payload: Literal["record", "raw"] = "record"
    """``record``: the data lake's JSON line; ``raw``: the payload as it came in."""
    persistent: bool = True
    """delivery_mode 2: durable queues keep the messages across a RabbitMQ restart."""
    window: Annotated[int, Meta(ge=1, le=65535)] = 1000
    """Publishes awaiting their confirms at once."""
    confirm_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    max_buffered: Annotated[int, Meta(ge=1)] = 100_000
    heartbeat_s: Annotated[int, Meta(ge=0, le=65535)] = 15
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    reconnect_initial_s: Annotated[float, Meta(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Meta(gt=0)] = 30.0




def _utc(at: float) -> str:
    us = int(at * 1e6 + 0.5)
    sec = us // 1_000_000
    return "%s.%06dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)),  # noqa: UP031
                         us - sec * 1_000_000)


class AmqpSink:
    """Publishes processed results to ``options.exchange``; see the module doc."""

    Options: ClassVar[type[msgspec.Struct]] = AmqpSinkOptions

    def __init__(self, name: str, options: AmqpSinkOptions, metrics: Metrics) -> None:
        if options.url is None:
            raise ValueError("options.url: required (or run with [amqp] url / --amqp-url, "
                             "which fills it in)")
        try:
            check_url(options.url)
        except ValueError as err:
            raise ValueError(f"options.{err}") from None
        check_template(options.routing_key, PROCESSED_FIELDS, "options.routing_key")
        if options.reconnect_max_s < options.reconnect_initial_s:
            raise ValueError("options.reconnect_max_s must not be below reconnect_initial_s")
        self.name = name
        self.options = options
        self.publisher = ConfirmedPublisher(
            f"sink:{name}", options.url, options.exchange, metrics.amqp,
            exchange_type=options.exchange_type, declare=options.declare,
            settings=LinkSettings(options.heartbeat_s, options.connect_timeout_s,
                                  options.reconnect_initial_s, options.reconnect_max_s),
            window=options.window, max_buffered=options.max_buffered)
        self._template = options.routing_key
        fields = template_fields(options.routing_key)
        self._key_names = fields
        self._key_of = operator.attrgetter(*fields) if fields else None
        self._keys: dict[Any, str] = {}
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder().decode
        self._raw = options.payload == "raw"
        self._delivery_mode = 2 if options.persistent else 1
        self._records = metrics.sink_records.labels(name)
        self._errors = metrics.sink_errors.labels(name)
        self._buffered = metrics.sink_buffered.labels(name)
        self._counted = 0
        self._last_at = -1.0
        self._last_stamp = ""

    def _routing_key(self, env: Envelope) -> str:
        key_of = self._key_of
        if key_of is None:
            return self._template
        values = key_of(env)
        key = self._keys.get(values)
        if key is None:
            if len(self._keys) >= MAX_KEY_CACHE:
                self._keys.clear()
            names = self._key_names
            key = self._keys[values] = render_key(
                self._template,
                dict(zip(names, values if len(names) > 1 else (values,), strict=True)))
        return key

    def write(self, batch: list[Envelope]) -> None:
        messages: list[Outgoing] = []
        encode, decode = self._encode, self._decode
        mode = self._delivery_mode
        for env in batch:
            if self._raw:
                body = bytes(env.payload)
                properties = encode_properties(delivery_mode=mode, message_id=env.id)
            else:
                at = env.received_at
                if at != self._last_at:  # messages of one read share their timestamp
                    self._last_at, self._last_stamp = at, _utc(at)
                data, encoding = env.data, "json"
                if data is None:
                    try:
                        data = decode(env.payload)
                    except (msgspec.DecodeError, UnicodeDecodeError):  # "\xff" is not UTF-8
                        data, encoding = bytes(env.payload), "base64"
                record = SinkRecord(
                    env.id, env.device, env.tenant, env.tier, env.topic, self._last_stamp,
                    env.qos, env.protocol, env.region, env.device_class, encoding, data,
                    env.meta, env.errors)
                try:
                    body = encode(record)
                except (TypeError, ValueError, OverflowError) as err:
                    body = encode(msgspec.structs.replace(
                        record, payload_encoding="base64", payload=bytes(env.payload),
                        meta=None, errors=[*(env.errors or ()),
                                           f"payload: not JSON-encodable: {err}"]))
                properties = encode_properties(content_type="application/json",
                                               delivery_mode=mode, message_id=env.id)
            messages.append(Outgoing(self._routing_key(env), body, properties, env.qos > 0))
        self.publisher.put(messages)

    async def flush(self) -> None:
        publisher = self.publisher
        try:
            await publisher.wait_confirmed(self.options.confirm_timeout_s)
        except AmqpUnavailable:
            self._errors.inc()
            raise
        finally:
            self._count()

    async def close(self) -> None:
        try:
            await self.publisher.close(self.options.confirm_timeout_s)
        finally:
            self._count()

    def _count(self) -> None:
        publisher = self.publisher
        confirmed = publisher.confirmed
        if confirmed > self._counted:
            self._records.inc(confirmed - self._counted)
            self._counted = confirmed
        self._buffered.set(publisher.buffered_bytes)
