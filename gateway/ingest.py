"""MQTT ingest: PUBLISH packets → classified envelopes in the dispatcher's lanes.

This is the hot path. Per read, the adapter hands over every PUBLISH it decoded; per
message we do one dict lookup (the connection's topic → classification cache), build one
``Envelope`` and append it to its lane. Counters are bumped once per read, never per message.
"""

from __future__ import annotations

import logging
from itertools import count
from typing import TYPE_CHECKING

from gateway.classify import Classification, Classifier
from gateway.config import MQTTListener, Tier
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from protocols.mqtt.connection import ConnectRequest, SubscribeRequest, UnsubscribeRequest
from protocols.mqtt.packets import Publish

if TYPE_CHECKING:
    from protocols.mqtt.adapter import MQTTServerProtocol

log = logging.getLogger("iotgw.ingest")

SUCCESS = 0x00
NO_SUBSCRIPTION_EXISTED = 0x11


class MQTTIngest:
    """The gateway's side of every MQTT connection (implements ``MQTTHooks``)."""

    def __init__(self, node_id: str, settings: MQTTListener, tiers: list[Tier],
                 classifier: Classifier, dispatcher: Dispatcher, metrics: Metrics) -> None:
        self.settings = settings
        self.classifier = classifier
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.clients: set[MQTTServerProtocol] = set()
        self.accepting = True
        self.received = 0
        self._prefix = node_id + "-"
        self._sequence = count(1)
        self._lanes = {lane.name: lane.items for lane in dispatcher.lanes}
        self._deadline_ns = {t.name: int(t.max_latency_ms * 1_000_000) for t in tiers}
        self._received = metrics.messages_received.labels("mqtt")
        self._connections = metrics.connections.labels("mqtt")

    # -- connection lifecycle -----------------------------------------------------------
    def on_open(self, client: MQTTServerProtocol) -> None:
        self.clients.add(client)
        self._connections.inc()
        if self.dispatcher.pressure:
            client.pause_for_backpressure(True)

    def on_close(self, client: MQTTServerProtocol) -> None:
        self.clients.discard(client)
        self._connections.dec()

    def on_connect(self, client: MQTTServerProtocol, request: ConnectRequest) -> None:
        client.conn.accept()
        log.debug("%s connected as %r (MQTT level %d)", client.peer,
                  request.packet.client_id, request.packet.protocol_level)

    def on_violation(self, client: MQTTServerProtocol, reason: str, message: str) -> None:
        self.metrics.protocol_errors.labels("mqtt", reason).inc()
        log.warning("mqtt client %s (%r) closed: %s", client.peer, client.conn.client_id, message)

    # -- subscriptions: answered correctly; routing to subscribers comes with the broker ---
    def on_subscribe(self, client: MQTTServerProtocol, request: SubscribeRequest) -> None:
        packet = request.packet
        granted = client.subscriptions
        codes = []
        for topic_filter, options in packet.subscriptions:
            granted.add(topic_filter)
            codes.append(options.qos)
        client.conn.suback(packet.packet_id, codes)

    def on_unsubscribe(self, client: MQTTServerProtocol, request: UnsubscribeRequest) -> None:
        packet = request.packet
        granted = client.subscriptions
        codes = []
        for topic_filter in packet.topic_filters:
            codes.append(SUCCESS if topic_filter in granted else NO_SUBSCRIPTION_EXISTED)
            granted.discard(topic_filter)
        client.conn.unsuback(packet.packet_id, codes)

    # -- the hot path ----------------------------------------------------------------------
    def on_publish(self, client: MQTTServerProtocol, batch: list[Publish],
                   received_ns: int, received_at: float) -> None:
        cache = client.topic_cache
        conn = client.conn
        lanes = self._lanes
        deadlines = self._deadline_ns
        prefix = self._prefix
        sequence = self._sequence
        for publish in batch:
            topic = publish.topic
            c: Classification | None = cache.get(topic)
            if c is None:
                c = self._classify(client, topic)
            tier = c.tier
            lanes[tier].append(Envelope(
                prefix + str(next(sequence)), c.device, c.tenant, tier, c.region, topic,
                publish.payload, received_ns, received_at, "mqtt", publish.qos,
                c.device_class, received_ns + deadlines[tier],
            ))
            if publish.qos:
                conn.ack(publish)
        n = len(batch)
        self.received += n
        self._received.inc(n)
        self.dispatcher.accepted(n)

    def _classify(self, client: MQTTServerProtocol, topic: str) -> Classification:
        cache = client.topic_cache
        if len(cache) >= self.settings.max_topic_cache:
            cache.clear()
        c = cache[topic] = self.classifier.classify(
            client.conn.client_id or "", client.conn.username, topic)
        return c

    def set_backpressure(self, paused: bool) -> None:
        self.metrics.reading_paused.set(1 if paused else 0)
        if paused:
            self.metrics.ingest_pauses.inc()
        for client in self.clients:
            client.pause_for_backpressure(paused)

