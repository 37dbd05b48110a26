"""The fleet as one broker: MQTT messages cross replicas through a RabbitMQ topic exchange.

Theory of operation
-------------------
Each replica has its own queue (``node_queue``, named after its node id), bound to the
fleet exchange with one binding key per topic filter its clients subscribe to (and its CoAP
observers watch), plus ``LONG_KEY`` and ``RETAINED_KEY``; the broker tells the bridge when a
filter gains its first or loses its last local subscriber (``Broker.on_filter``) and a task
binds or unbinds it (``reconcile``: on every connect everything wanted is bound again, and
what was unsubscribed meanwhile unbound).

Out: ``Broker.forward`` hands over every message published on this replica (by its clients,
wills, alerts, sinks; never one that came from the fleet). It is published to the exchange,
routing key made from its topic (``codec.topic_key``), when another replica subscribes to a
matching filter: the replicas announce their filters to each other (``Interest`` under
``INTEREST_KEY``: ``hello`` on connect, answered by ``full``; ``add``/``del`` on change,
``full`` every ``announce_interval_s``; a replica not heard of for 3.5 intervals is
forgotten), so that a replica whose devices nobody elsewhere listens to publishes nothing.
Retained messages always go (under ``RETAINED_KEY``): every replica keeps them, for the
subscriptions to come.

In: a message from another replica is routed by the local broker as if published here, and
not forwarded again; one whose ``origin`` is this replica is dropped (RabbitMQ routes a copy
back when this replica's bindings match too). A queue receives one copy of a message however
many of its bindings match, and the local broker matches by topic, so a binding that matches
more than the filter (a long topic, a stale binding) only costs bandwidth. Deliveries are
acknowledged per read, once routed.

What crosses: topic, payload, QoS, retain, message expiry (as an absolute time), and the MQTT 5
properties in ``codec.TRAVELLING_PROPERTIES`` (content type, payload format, response topic,
correlation data, user properties). Not: ``$`` topics (each server's own); shared
subscriptions are shared per replica (each replica with members of a group delivers one copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pamqp import commands

from gateway.broker import Broker, Message, split_shared
from gateway.fleet.codec import (
    INTEREST,
    INTEREST_KEY,
    MQTT,
    FleetDecodeError,
    Interest,
    decode_interest,
    decode_message,
    encode_interest,
    encode_message,
    filter_key,
    shared_by_fleet,
    topic_key,
)
from gateway.fleet.config import FleetSection
from gateway.fleet.link import Link
from gateway.metrics import Metrics
from protocols.amqp.errors import AmqpError
from protocols.amqp.publisher import ConfirmedPublisher, Outgoing
from protocols.amqp.wire import encode_properties
from protocols.mqtt.trie import SubscriptionTrie, topic_filter_levels

log = logging.getLogger("iotgw.fleet.broker")

FORGET_AFTER_INTERVALS = 3.5
_PERSISTENT = encode_properties(content_type=MQTT, delivery_mode=2)
_TRANSIENT = encode_properties(content_type=MQTT, delivery_mode=1)
_INTEREST = encode_properties(content_type=INTEREST, delivery_mode=1)


class FleetBroker:
    """See the module doc. ``attach()`` hooks it into the broker; the owner routes the node
    queue's deliveries of content type ``MQTT`` to ``receive`` and ``INTEREST`` to
    ``on_interest``, and calls ``on_up``/``on_down`` with the node link."""

    def __init__(self, section: FleetSection, node: str, queue: str, broker: Broker,
                 metrics: Metrics, publisher: ConfirmedPublisher,
                 link: Callable[[], Link | None]) -> None:
        self.section = section
        self.node = node
        self.queue = queue
        self.broker = broker
        self.publisher = publisher
        self._link = link
        self.refs: dict[str, int] = {}
        """Filter → local subscriptions and watches on it."""
        self.bound: set[str] = set()
        """Filters bound (and announced) on the node queue."""
        self.peers: dict[str, tuple[set[str], float]] = {}
        """Other replica → (its filters, monotonic time last heard of)."""
        self.remote: SubscriptionTrie[str, None] = SubscriptionTrie()
        self.forwarded = 0
        self.received = 0
        self._metrics = metrics.fleet
        self._out = metrics.fleet.messages.labels("out")
        self._in = metrics.fleet.messages.labels("in")
        self._outgoing: list[Outgoing] = []
        self._flush_scheduled = False
        self._changed = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._rebind = False
        self._closed = False

    # -- hooks into the broker -------------------------------------------------------------
    def attach(self) -> None:
        broker = self.broker
        for session in broker.sessions.values():  # restored before the fleet started
            for topic_filter in session.subscriptions:
                self.filter_changed(split_shared(topic_filter)[1], 1)
        broker.on_filter = self.filter_changed
        broker.forward = self.forward
        loop = asyncio.get_running_loop()
        self._reconciler = loop.create_task(self._reconcile(), name="fleet-bindings")
        self._announcer = loop.create_task(self._announce(), name="fleet-announce")

    def detach(self) -> None:
        broker = self.broker
        broker.on_filter = None
        broker.forward = None
        broker.remote_interest = False

    def filter_changed(self, topic_filter: str, delta: int) -> None:
        """A local subscription (or watch) on ``topic_filter`` came (+1) or went (-1)."""
        if not shared_by_fleet(topic_filter):
            return
        count = self.refs.get(topic_filter, 0) + delta
        if count > 0:
            self.refs[topic_filter] = count
        else:
            self.refs.pop(topic_filter, None)
        if (count > 0) != (topic_filter in self.bound):
            self._changed.set()

    # -- out ----------------------------------------------------------------------------------
    def forward(self, message: Message) -> None:
        """A message published here: to the replicas that subscribe to it (see the doc)."""
        topic = message.topic
        if topic[:1] == "$" or self._closed:
            return
        if message.retain:
            key = "%R"
        elif not self.remote.match(topic):
            return
        else:
            key = topic_key(topic)
        body = encode_message(self.node, topic, message.payload, message.qos, message.retain,
                              message.properties, message.expires_at)
        self._outgoing.append(Outgoing(key, body, _PERSISTENT if message.qos else _TRANSIENT,
                                       keep=False))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, []
        if not outgoing or self._closed:
            return
        try:
            self.publisher.put(outgoing)
        except AmqpError:
            return
        self.forwarded += len(outgoing)
        self._out.inc(len(outgoing))

    # -- in -------------------------------------------------------------------------------------
    def receive(self, body: bytes) -> None:
        """A message from the fleet exchange: to the local subscribers (and retained here)."""
        try:
            m = decode_message(body)
        except FleetDecodeError as err:
            self._bad("message", err)
            return
        if m.origin == self.node:
            return  # our own, routed back by our bindings: delivered already
        self.received += 1
        self._in.inc()
        self.broker.publish(Message(m.topic, m.payload, min(max(m.qos, 0), 2), m.retain,
                                    m.properties, m.expires_at), None, forward=False)

    def on_interest(self, body: bytes) -> None:
        try:
            interest = decode_interest(body)
        except FleetDecodeError as err:
            self._bad("interest", err)
            return
        if interest.node == self.node:
            return
        self._learn(interest, time.monotonic())

    def _learn(self, interest: Interest, now: float) -> None:
        node, kind = interest.node, interest.kind
        if kind == "bye":
            self._forget(node)
            return
        filters, _ = self.peers.get(node, (set(), now))
        if kind == "hello":
            self._publish_interest("full", sorted(self.bound))
            self.peers[node] = (filters, now)
            self._metrics.peers.set(len(self.peers))
            return
        if kind == "full":
            new = {f for f in interest.filters if _valid(f)}
            for gone in filters - new:
                self.remote.remove(gone, node)
            for came in new - filters:
                self.remote.add(came, node, None)
            filters = new
        elif kind == "add":
            for came in interest.filters:
                if came not in filters and _valid(came):
                    filters.add(came)
                    self.remote.add(came, node, None)
        elif kind == "del":
            for gone in interest.filters:
                if gone in filters:
                    filters.discard(gone)
                    self.remote.remove(gone, node)
        self.peers[node] = (filters, now)
        self._interest_changed()

    def _forget(self, node: str) -> None:
        filters, _ = self.peers.pop(node, (set(), 0.0))
        for gone in filters:
            self.remote.remove(gone, node)
        self._interest_changed()

    def _interest_changed(self) -> None:
        self.broker.remote_interest = len(self.remote) > 0
        self._metrics.peers.set(len(self.peers))

    def _bad(self, what: str, err: Exception) -> None:
        log.warning("fleet: a %s that cannot be read was dropped: %s", what, err)

    # -- the node link's life ----------------------------------------------------------------------
    def on_up(self) -> None:
        """The node link is (again) up: bind everything wanted again (the queue may be new),
        then say hello (the others answer with their filters) and announce ours."""
        self._rebind = True
        self._changed.set()

    def on_down(self) -> None:
        pass

    async def _reconcile(self) -> None:
        """Bind what local subscribers want and unbind what they no longer do, one method at
        a time, whenever something changed or the link came (back) up; then announce it."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            link = self._link()
            if link is None or not link.up:
                continue
            rebind = self._rebind
            try:
                await self._apply(link)
            except (AmqpError, ConnectionError, OSError, TimeoutError) as err:
                self._rebind = self._rebind or rebind
                log.debug("fleet: bindings not updated (%s); again once the link is back", err)
            except Exception:  # ours: logged; the next change tries again
                log.exception("fleet: bindings not updated")

    async def _apply(self, link: Link) -> None:
        wanted = set(self.refs)
        exchange = self.section.exchange
        rebind, self._rebind = self._rebind, False
        added: list[str] = []
        for topic_filter in sorted(wanted if rebind else wanted - self.bound):
            key = filter_key(topic_filter)
            if key is not None:  # too long: its topics come under LONG_KEY
                await link.call(commands.Queue.Bind(queue=self.queue, exchange=exchange,
                                                    routing_key=key), commands.Queue.BindOk)
            self.bound.add(topic_filter)
            added.append(topic_filter)
        removed: list[str] = []
        for topic_filter in sorted(self.bound - wanted):
            key = filter_key(topic_filter)
            if key is not None:
                await link.call(commands.Queue.Unbind(queue=self.queue, exchange=exchange,
                                                      routing_key=key),
                                commands.Queue.UnbindOk)
            self.bound.discard(topic_filter)
            removed.append(topic_filter)
        if rebind:
            self._publish_interest("hello", [])
            self._publish_interest("full", sorted(self.bound))
        else:
            if added:
                self._publish_interest("add", added)
            if removed:
                self._publish_interest("del", removed)
        self._metrics.bindings.set(len(self.bound))
        if set(self.refs) != self.bound:
            self._changed.set()  # changed meanwhile

    async def _announce(self) -> None:
        interval = self.section.announce_interval_s
        while True:
            await asyncio.sleep(interval)
            link = self._link()
            if link is not None and link.up:
                self._publish_interest("full", sorted(self.bound))
            horizon = time.monotonic() - FORGET_AFTER_INTERVALS * interval
            for node in [n for n, (_, seen) in self.peers.items() if seen < horizon]:
                log.info("fleet: nothing heard of %s for %.0f s: its subscriptions are "
                         "forgotten", node, FORGET_AFTER_INTERVALS * interval)
                self._forget(node)

    def _publish_interest(self, kind: str, filters: list[str]) -> None:
        if self._closed:
            return
        with contextlib.suppress(AmqpError):  # closed
            self.publisher.put([Outgoing(INTEREST_KEY, encode_interest(kind, self.node, filters),
                                         _INTEREST, keep=False)])

    async def close(self) -> None:
        """Say goodbye (the others stop publishing for us) and stop."""
        self._publish_interest("bye", [])
        self._flush()
        self._closed = True
        self.detach()
        for task in (self._reconciler, self._announcer):
            if task is not None:
                task.cancel()
        for task in (self._reconciler, self._announcer):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def stats(self) -> dict[str, Any]:
        return {"bindings": len(self.bound), "peers": len(self.peers),
                "forwarded": self.forwarded, "received": self.received}


def _valid(topic_filter: str) -> bool:
    try:
        topic_filter_levels(topic_filter)
    except ValueError:
        return False
    return True
