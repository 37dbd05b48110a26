"""What every AMQP link shares: its errors, how it is named in logs, the backoff between
connection attempts, and the metrics."""

from __future__ import annotations

import random
import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.metrics import Metrics
from protocols.amqp.wire import ProtocolError

LINK_ERRORS = (ConnectionError, OSError, TimeoutError, ProtocolError)
"""What a lost, refused or misbehaving link raises (``client.LinkLost`` is a
ConnectionError)."""


class Backoff:
    """Exponential backoff with full jitter between ``initial`` and ``maximum`` seconds."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, delay * 2)
        return random.uniform(delay / 2, delay)


class AmqpMetrics:
    """The AMQP side's metrics, on the gateway's registry (``iotgw_amqp_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.connected = Gauge(
            "iotgw_amqp_connected", "1 while the AMQP link is up (link: ingest, alerts, "
            "sink:<name>)", ["link"], registry=r)
        self.connects = Counter(
            "iotgw_amqp_connects", "AMQP connections opened (the first one and every "
            "reconnect)", ["link"], registry=r)
        self.link_errors = Counter(
            "iotgw_amqp_link_errors", "AMQP links lost, or connects that failed",
            ["link"], registry=r)
        self.acked = Counter(
            "iotgw_amqp_acked_messages", "Deliveries acknowledged after their durable append",
            registry=r)
        self.requeued = Counter(
            "iotgw_amqp_requeued_messages", "Deliveries nacked with requeue (reason: overload, "
            "commit_failed)", ["reason"], registry=r)
        self.settle_frames = Counter(
            "iotgw_amqp_settle_frames", "basic.ack and basic.nack frames sent (each may settle "
            "many deliveries)", registry=r)
        self.duplicates = Counter(
            "iotgw_amqp_duplicates_dropped_messages", "Redeliveries of messages already made "
            "durable (their ack was lost with the link): acked, not taken again", registry=r)
        self.published = Counter(
            "iotgw_amqp_published_messages", "Messages published and confirmed by RabbitMQ",
            ["link"], registry=r)
        self.unconfirmed = Gauge(
            "iotgw_amqp_unconfirmed_messages", "Messages held for publishing or awaiting "
            "their confirm", ["link"], registry=r)
        self.dropped = Counter(
            "iotgw_amqp_dropped_messages", "Messages not published because too many were "
            "held while RabbitMQ was away (QoS 0 results, the oldest alerts)", ["link"],
            registry=r)


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, AmqpMetrics] = (
    weakref.WeakKeyDictionary())


def amqp_metrics(metrics: Metrics) -> AmqpMetrics:
    """The AMQP metrics of this gateway's registry (registered once per registry)."""
    found = _METRICS.get(metrics.registry)
    if found is None:
        found = _METRICS[metrics.registry] = AmqpMetrics(metrics.registry)
    return found
