"""What replicas send each other through RabbitMQ, as bytes; and the names things go by.
Sans-I/O: pure functions and msgspec Structs, no asyncio, no sockets.

Bodies are msgpack arrays, recognised by their AMQP content type:

* ``WORK`` (``WorkItem``): a classified message given away to the region's work queue. It
  carries the classification (tenant, tier, device, device class, region), the topic, payload,
  receipt time, QoS, anomaly severity and id, so the taker neither classifies it again nor
  restarts its latency clock; plus where it came from (``origin``: node id and process epoch),
  its sequence number there and the queue that takes reports (``reply``).
* ``DONE`` (``DoneReport``): "of the work you gave away, these (device, tier) keys are
  finished up to this sequence number".
* ``MQTT`` (``FleetMessage``): an MQTT message published on one replica, for the subscribers
  on the others (topic, payload, QoS, retain, the MQTT 5 properties that travel, expiry).
* ``INTEREST`` (``Interest``): a replica's subscription filters (``hello``, ``full``, ``add``,
  ``del``, ``bye``), so that others publish only what someone subscribes to.

Routing keys of the fleet exchange (a topic exchange): an MQTT topic's levels become words
joined by ``.``, each escaped (``%`` ``.`` ``*`` ``#`` percent-encoded, an empty level is the
word ``%``), and a filter's ``+`` becomes ``*`` and ``#`` stays ``#``, so a topic matches a
filter exactly when its key matches the filter's binding key. A key longer than AMQP's 255
bytes cannot be made: such topics go under ``LONG_KEY``, which every replica binds, and the
receiving broker matches them by topic (so does it for every message; a binding only decides
which replicas receive it). A filter whose binding key would be too long needs no binding of
its own: every topic it matches is as long, so it comes under ``LONG_KEY``. Retained messages
go under ``RETAINED_KEY`` (every replica keeps them, subscribed or not) and subscription
announcements under ``INTEREST_KEY``. None of the three can be produced by escaping.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.envelope import Envelope

WORK = "application/vnd.iotgw.work+msgpack"
DONE = "application/vnd.iotgw.done+msgpack"
MQTT = "application/vnd.iotgw.mqtt+msgpack"
INTEREST = "application/vnd.iotgw.interest+msgpack"

FORMAT = 1
MAX_KEY_BYTES = 255
LONG_KEY = "%L"
RETAINED_KEY = "%R"
INTEREST_KEY = "%C"
SPECIAL_KEYS = (LONG_KEY, RETAINED_KEY, INTEREST_KEY)
EMPTY_LEVEL = "%"

_WORD_ESCAPES = str.maketrans({c: f"%{ord(c):02X}" for c in "%.*#"})
TRAVELLING_PROPERTIES = frozenset({
    "payload_format_indicator", "content_type", "response_topic", "correlation_data",
    "user_property"})
"""MQTT 5 PUBLISH properties a message keeps across the fleet (message expiry travels as
``expires_at``; topic alias and subscription identifiers belong to one hop)."""


class FleetDecodeError(ValueError):
    """A body that is not what its content type says."""


# -- work ---------------------------------------------------------------------------------

class WorkItem(msgspec.Struct, array_like=True, frozen=True, gc=False):
    format: int
    origin: str
    """The node id and process epoch of the replica that gave it away."""
    reply: str
    """Its queue: where reports of finished work go."""
    seq: int
    """Its sequence number among the work ``origin`` gave away (increasing)."""
    id: str
    device: str
    tenant: str
    tier: str
    region: str
    topic: str
    payload: bytes
    received_at: float
    """Wall clock of the first byte read on the origin: the latency clock keeps running."""
    protocol: str
    qos: int
    device_class: str
    anomaly: str


_work_decoder = msgspec.msgpack.Decoder(WorkItem)
_encoder = msgspec.msgpack.Encoder()


def encode_work(env: Envelope, origin: str, reply: str, seq: int) -> bytes:
    return _encoder.encode(WorkItem(
        FORMAT, origin, reply, seq, env.id, env.device, env.tenant, env.tier, env.region,
        env.topic, bytes(env.payload), env.received_at, env.protocol, env.qos,
        env.device_class, env.anomaly))


def decode_work(body: bytes) -> WorkItem:
    try:
        item = _work_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise FleetDecodeError(f"work item: {err}") from None
    if item.format != FORMAT:
        raise FleetDecodeError(f"work item: unknown format {item.format}")
    return item


def envelope_of(item: WorkItem, deadlines_ns: Mapping[str, int], default_tier: str,
                anomaly_lanes: bool, now_ns: int | None = None,
                now: float | None = None) -> Envelope:
    """The envelope a taker queues: the classification as given, the tier replaced by
    ``default_tier`` if this config lacks it, and ``received_ns`` placed on this process's
    monotonic clock as long ago as ``received_at`` is (so latency counts from the first
    receipt; across hosts as exact as their clocks agree)."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    now = time.time() if now is None else now
    tier = item.tier if item.tier in deadlines_ns else default_tier
    age_ns = max(0, int((now - item.received_at) * 1e9))
    received_ns = now_ns - age_ns
    return Envelope(item.id, item.device, item.tenant, tier, item.region, item.topic,
                    item.payload, received_ns, item.received_at, item.protocol, item.qos,
                    item.device_class, received_ns + deadlines_ns[tier],
                    anomaly=item.anomaly if anomaly_lanes else "")


def partition_of(device: str, partitions: int) -> int:
    """The work queue partition of a device: the same on every replica and every run."""
    return zlib.crc32(device.encode()) % partitions


def tier_priorities(tiers: list[str], max_priority: int) -> dict[str, int]:
    """AMQP priority per tier: the most urgent (first) gets ``max_priority``, then one less
    each, never below 0."""
    return {tier: max(0, max_priority - i) for i, tier in enumerate(tiers)}


# -- reports of finished work ------------------------------------------------------------------

class DoneReport(msgspec.Struct, array_like=True, frozen=True):
    format: int
    origin: str
    """The replica the work came from (node id and epoch): a report for an earlier run of
    it is ignored."""
    finished: list[tuple[str, str, int]]
    """(device, tier, highest sequence number finished)."""


_done_decoder = msgspec.msgpack.Decoder(DoneReport)


def encode_done(origin: str, finished: list[tuple[str, str, int]]) -> bytes:
    return _encoder.encode(DoneReport(FORMAT, origin, finished))


def decode_done(body: bytes) -> DoneReport:
    try:
        return _done_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise FleetDecodeError(f"done report: {err}") from None


# -- MQTT messages between brokers ------------------------------------------------------------

class FleetMessage(msgspec.Struct, array_like=True, frozen=True, gc=False):
    format: int
    origin: str
    """The node id of the replica it was published on: that one never takes it back."""
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any]
    expires_at: float | None
    """Wall-clock end of its MQTT 5 message expiry interval, if it has one."""


_message_decoder = msgspec.msgpack.Decoder(FleetMessage)


def encode_message(origin: str, topic: str, payload: bytes, qos: int, retain: bool,
                   properties: Mapping[str, Any], expires_at: float | None) -> bytes:
    kept = ({k: v for k, v in properties.items() if k in TRAVELLING_PROPERTIES}
            if properties else {})
    return _encoder.encode(FleetMessage(FORMAT, origin, topic, bytes(payload), qos, retain,
                                        kept, expires_at))


def decode_message(body: bytes) -> FleetMessage:
    try:
        message = _message_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise FleetDecodeError(f"fleet message: {err}") from None
    properties = message.properties
    if properties:
        properties = {k: v for k, v in properties.items() if k in TRAVELLING_PROPERTIES}
        pairs = properties.get("user_property")
        if pairs is not None:  # msgpack has no tuples: pairs come back as lists
            properties["user_property"] = [(str(k), str(v)) for k, v in pairs]
        message = msgspec.structs.replace(message, properties=properties)
    return message


# -- subscription announcements -----------------------------------------------------------------

class Interest(msgspec.Struct, array_like=True, frozen=True):
    format: int
    kind: str
    """``hello`` (I am new: tell me yours), ``full`` (all my filters), ``add``, ``del``,
    ``bye`` (I am leaving)."""
    node: str
    filters: list[str]


INTEREST_KINDS = frozenset({"hello", "full", "add", "del", "bye"})
_interest_decoder = msgspec.msgpack.Decoder(Interest)


def encode_interest(kind: str, node: str, filters: list[str]) -> bytes:
    return _encoder.encode(Interest(FORMAT, kind, node, filters))


def decode_interest(body: bytes) -> Interest:
    try:
        interest = _interest_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise FleetDecodeError(f"interest: {err}") from None
    if interest.kind not in INTEREST_KINDS:
        raise FleetDecodeError(f"interest: unknown kind {interest.kind!r}")
    return interest


# -- routing keys ---------------------------------------------------------------------------------

def key_word(level: str) -> str:
    """One topic level as one routing-key word (see the module doc)."""
    return level.translate(_WORD_ESCAPES) if level else EMPTY_LEVEL


def topic_key(topic: str) -> str:
    """The routing key of a message on ``topic``; ``LONG_KEY`` if it would pass 255 bytes."""
    key = ".".join([key_word(level) for level in topic.split("/")])
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        return LONG_KEY
    return key


def filter_key(topic_filter: str) -> str | None:
    """The binding key of an MQTT topic filter (``+`` → ``*``, ``#`` → ``#``); None when it
    would pass 255 bytes (the topics it matches come under ``LONG_KEY``)."""
    words = []
    for level in topic_filter.split("/"):
        if level == "+":
            words.append("*")
        elif level == "#":
            words.append("#")
        else:
            words.append(key_word(level))
    key = ".".join(words)
    if len(key.encode()) > MAX_KEY_BYTES:
        return None
    return key


def shared_by_fleet(topic_filter: str) -> bool:
    """Whether a (non-shared) filter takes part in the fleet: not ``$`` topics, which are
    each server's own."""
    return not topic_filter.startswith("$")
