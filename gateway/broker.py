"""The MQTT broker: sessions, subscriptions, retained messages and wills.

Theory of operation
-------------------
Every PUBLISH the gateway takes in is also routed to the clients subscribed to it, as a
conforming MQTT 3.1.1 / 5.0 broker does; so is what the gateway publishes itself (alerts,
processed results). Ingest calls ``publish()`` once a message may be delivered: at once for
QoS 0, after the group commit that made it durable for QoS 1 and 2.

A ``Session`` outlives its connections: its subscriptions, the QoS 1/2 messages queued for it
while it is offline or while its client's receive maximum is used up (bounded by
``max_queued``; what overflows is counted, never silently), the deliveries in flight (resent
with DUP on the next connection), and the inbound QoS 2 packet ids awaiting PUBREL (so that a
resent PUBLISH is never delivered twice). A clean start, or the end of the session expiry
interval, discards it. A client id connecting again takes the session over and the earlier
connection is closed (0x8E).

Routing is one walk of the subscription trie (``protocols.mqtt.trie``): cost follows the
topic's depth and the filters that match, not the number of subscriptions. Overlapping
subscriptions of one client give one delivery at the highest QoS they grant, carrying every
subscription identifier [MQTT-3.3.4-2, MQTT-3.3.4-3]. A shared subscription
(``$share/<group>/<filter>``) delivers each message to one member of the group, round robin,
preferring members that are connected.

Output is written once per loop turn per client: ``publish()`` only queues into the codec and
marks the client; a ``call_soon`` flushes every marked client.

Will messages are published when a connection ends without a DISCONNECT (or with reason
0x04), after the MQTT 5 will delay unless the session is resumed first [MQTT-3.1.3-9];
retained messages are kept in a topic tree and sent on subscribe according to retain handling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.config import BrokerSection
from gateway.statedir import write_atomically
from protocols.mqtt.errors import LocalProtocolError
from protocols.mqtt.packets import MQTT_5, Publish, SubscriptionOptions, Will
from protocols.mqtt.trie import RetainedTree, SubscriptionTrie

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from protocols.mqtt.adapter import MQTTServerProtocol

log = logging.getLogger("iotgw.broker")

SESSION_TAKEN_OVER = 0x8E
NO_SUBSCRIPTION_EXISTED = 0x11
SHARED_NOT_SUPPORTED = 0x9E
SUBSCRIPTION_IDS_NOT_SUPPORTED = 0xA1
TOPIC_FILTER_INVALID = 0x8F
QUOTA_EXCEEDED = 0x97
LIMIT_LOG_INTERVAL_S = 10.0
"""A client that keeps hitting a limit is logged at most this often (it is always counted)."""
NORMAL_DISCONNECT = 0x00
DISCONNECT_WITH_WILL = 0x04
NEVER_EXPIRES = 0xFFFFFFFF

# Properties that belong to one hop and are never forwarded [MQTT-3.3.2-7 topic alias,
# MQTT-3.3.4-6 subscription identifiers are the server's to set].
_HOP_PROPERTIES = frozenset({"topic_alias", "subscription_identifier"})


class Message(msgspec.Struct, gc=False):
    """A message as the broker routes, queues and retains it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = {}
    expires_at: float | None = None
    """Wall-clock time its MQTT 5 message expiry interval ends, if it has one."""

    @classmethod
    def of(cls, publish: Publish, now: float) -> Message:
        properties = publish.properties
        expires_at = None
        if properties:
            if _HOP_PROPERTIES.intersection(properties):
                properties = {k: v for k, v in properties.items() if k not in _HOP_PROPERTIES}
            expiry = properties.get("message_expiry_interval")
            if expiry is not None:
                expires_at = now + expiry
        return cls(publish.topic, publish.payload, publish.qos, publish.retain, properties,
                   expires_at)


class Subscription(msgspec.Struct, frozen=True, gc=False):
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    identifier: int | None = None


class Delivery(msgspec.Struct, gc=False):
    """One message on its way to one session: queued, or in flight under ``packet_id``."""

    message: Message
    qos: int
    retain: bool
    identifiers: list[int] | None = None
    packet_id: int | None = None
    released: bool = False
    """QoS 2: the client's PUBREC came; the PUBREL is what remains to (re)send."""


class Session:
    """What the broker keeps for one client id (see the module docstring)."""

    __slots__ = ("client", "client_id", "dropped", "expires_at", "expiry_s", "expiry_timer",
                 "inflight", "queue", "releases", "subscriptions", "version", "will", "will_due",
                 "will_timer")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.client: MQTTServerProtocol | None = None
        self.version = MQTT_5
        self.subscriptions: dict[str, Subscription] = {}
        self.queue: deque[Delivery] | None = None  # made when the first message waits
        self.inflight: dict[int, Delivery] = {}
        self.releases: list[int] = []
        self.expiry_s = 0
        self.will: Will | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self.will_due: float | None = None  # wall-clock time a delayed will goes out
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.expires_at: float | None = None  # wall-clock time the offline session ends
        self.dropped = 0


class _SavedSession(msgspec.Struct, array_like=True):
    client_id: str
    version: int
    expiry_s: int
    expires_at: float
    subscriptions: dict[str, Subscription]
    queue: list[Delivery]
    inflight: list[Delivery]
    releases: list[int]
    will: Will | None
    will_due: float | None


class _Saved(msgspec.Struct):
    """The broker's durable state: persistent sessions and retained messages."""

    format: int
    sessions: list[_SavedSession]
    retained: list[Message]


STATE_FORMAT = 1


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` → (group, filter); any other filter → (None, filter)."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    _, group, *rest = topic_filter.split("/", 2)
    if not group or "+" in group or "#" in group or not rest or not rest[0]:
        raise ValueError(f"invalid shared subscription {topic_filter!r}: expected "
                         "$share/<group>/<filter>")
    return group, rest[0]


class Broker:
    """Sessions, routing and retained messages (see the module docstring)."""

    def __init__(self, settings: BrokerSection | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings or BrokerSection()
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.retained: RetainedTree[Message] = RetainedTree()
        self._trie: SubscriptionTrie[str | tuple[str, str], Subscription] = SubscriptionTrie()
        self._turn: itertools.count[int] = itertools.count()
        self._watchers: SubscriptionTrie[int, Callable[[Message], None]] = SubscriptionTrie()
        self._watch_ids: itertools.count[int] = itertools.count()
        self._dirty: set[MQTTServerProtocol] = set()
        self._flush_scheduled = False
        self.changed = False
        """Durable state changed since the last ``save()``."""
        self.delivered = 0
        self._delivered_counted = 0
        self._limit_logged = -LIMIT_LOG_INTERVAL_S
        self.dropped = 0
        self.on_will: Callable[[Message], None] | None = None
        """Where a will goes when published (the gateway routes it like any PUBLISH)."""
        self.on_filter: Callable[[str, int], None] | None = None
        """Told (filter, +1 or -1) when a subscription or a watch comes or goes (the fleet
        binds its queue for the filters subscribed here)."""
        self.forward: Callable[[Message], None] | None = None
        """Given every message published here, except those that came from the fleet."""
        self.remote_interest = False
        """Replicas elsewhere subscribe to something: every message is routed (to
        ``forward``), subscribed here or not."""

    @property
    def subscribed(self) -> bool:
        """Whether anyone subscribes to anything (else routing is skipped)."""
        return len(self._trie) > 0 or len(self._watchers) > 0 or self.remote_interest

    def watch(self, topic_filter: str, callback: Callable[[Message], None]
              ) -> Callable[[], None]:
        """Call ``callback`` with every message published to a topic ``topic_filter``
        matches (inside the gateway: CoAP observers of a device's commands, say); returns
        the function that stops it. ValueError for an invalid filter."""
        key = next(self._watch_ids)
        self._watchers.add(topic_filter, key, callback)
        if self.on_filter is not None:
            self.on_filter(topic_filter, 1)

        def stop() -> None:
            if self._watchers.remove(topic_filter, key) and self.on_filter is not None:
                self.on_filter(topic_filter, -1)

        return stop

    # -- connections -------------------------------------------------------------------
    def connect(self, client: MQTTServerProtocol, clean_start: bool, expiry_s: int,
                will: Will | None) -> bool:
        """Attach an accepted-to-be connection to its session; True if one was resumed
        (the CONNACK's session present). Call ``resume(client)`` after the CONNACK."""
        client_id = client.conn.client_id
        assert client_id is not None
        session = self.sessions.get(client_id)
        if session is not None and session.client is not None:
            old = session.client
            self._detach(session, old, will_allowed=True)  # its will: no DISCONNECT came
            old.close(SESSION_TAKEN_OVER)
        if session is not None and clean_start:
            self._end(session, publish_will=False)
            session = None
        present = session is not None
        if session is None:
            session = self.sessions[client_id] = Session(client_id)
        if session.will_timer is not None:  # resumed in time: the will is not sent
            session.will_timer.cancel()
            session.will_timer = session.will_due = None
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
        session.expiry_timer = session.expires_at = None
        self.changed = True
        session.client = client
        session.version = client.conn.version or MQTT_5
        session.expiry_s = min(expiry_s, self.settings.max_session_expiry_s)
        session.will = will
        client.session = session
        return present

    def resume(self, client: MQTTServerProtocol) -> None:
        """After the CONNACK: resend what was in flight (DUP), then what was queued."""
        session: Session | None = client.session
        if session is None:
            return
        conn = client.conn
        if session.releases:
            conn.restore_releases(session.releases)
            session.releases = []
        for delivery in list(session.inflight.values()):
            assert delivery.packet_id is not None
            if delivery.released:
                conn.send_pubrel(delivery.packet_id)
            else:
                self._send(session, client, delivery, resend=True)
        self._pump(session)
        self._mark(client)

    def disconnected(self, client: MQTTServerProtocol, reason_code: int | None,
                     expiry_s: int | None = None) -> None:
        """The connection ended: ``reason_code`` of the client's DISCONNECT, or None when
        it just went away (the will is then published)."""
        session: Session | None = client.session
        if session is None or session.client is not client:
            return  # never connected, or taken over already
        if expiry_s is not None:
            session.expiry_s = min(expiry_s, self.settings.max_session_expiry_s)
        self._detach(session, client,
                     will_allowed=reason_code is None or reason_code == DISCONNECT_WITH_WILL)

    def _detach(self, session: Session, client: MQTTServerProtocol, will_allowed: bool) -> None:
        session.client = None
        client.session = None
        self._dirty.discard(client)
        session.releases = client.conn.awaiting_release()
        for packet_id in client.conn.awaiting_completion():
            delivery = session.inflight.get(packet_id)
            if delivery is not None:
                delivery.released = True
        if not will_allowed:
            session.will = None
        if session.expiry_s == 0:
            self._end(session, publish_will=True)
            return
        now = time.time()
        will = session.will
        if will is not None:
            delay = min(will.properties.get("will_delay_interval", 0), session.expiry_s)
            if delay:
                self._will_at(session, now + delay)
            else:
                self._publish_will(session)
        self._expire_at(session, now + session.expiry_s)
        self.changed = True

    def _will_at(self, session: Session, due: float) -> None:
        session.will_due = due
        session.will_timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.time()), self._publish_will, session)

    def _expire_at(self, session: Session, when: float) -> None:
        session.expires_at = when
        if session.expiry_s != NEVER_EXPIRES:
            session.expiry_timer = asyncio.get_running_loop().call_later(
                max(0.0, when - time.time()), self._expire, session)

    def _expire(self, session: Session) -> None:
        session.expiry_timer = None
        if session.client is None:
            self._end(session, publish_will=True)

    def _end(self, session: Session, publish_will: bool) -> None:
        """The session is over: its subscriptions go, and its will if still pending."""
        self.changed = True
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        for topic_filter in session.subscriptions:
            self._unroute(session.client_id, topic_filter)
        session.subscriptions.clear()
        for timer in (session.will_timer, session.expiry_timer):
            if timer is not None:
                timer.cancel()
        session.expiry_timer = None
        if publish_will and session.will is not None:
            self._publish_will(session)
        session.will = None
        lost = len(session.queue or ()) + len(session.inflight)
        if lost:
            self._count_dropped(session, lost, "session_ended")
        session.queue = None
        session.inflight.clear()

    def _publish_will(self, session: Session) -> None:
        session.will_timer = session.will_due = None
        will, session.will = session.will, None
        if will is None:
            return
        properties = {k: v for k, v in will.properties.items() if k != "will_delay_interval"}
        message = Message.of(Publish(will.topic, will.payload, will.qos, will.retain,
                                     properties=properties), time.time())
        if self.on_will is not None:
            self.on_will(message)
        else:
            self.publish(message)

    # -- subscriptions -----------------------------------------------------------------
    def subscribe(self, client: MQTTServerProtocol,
                  subscriptions: list[tuple[str, SubscriptionOptions]],
                  identifier: int | None = None,
                  allowed: Callable[[str], bool] | None = None) -> list[int]:
        """Add or replace the client's subscriptions; one reason code each (the granted QoS,
        or a refusal). Retained messages are sent as retain handling asks."""
        session: Session | None = client.session
        assert session is not None
        codes: list[int] = []
        for topic_filter, options in subscriptions:
            try:
                group, inner = split_shared(topic_filter)  # the codec refused No Local on it
                key: str | tuple[str, str] = (session.client_id if group is None
                                              else (group, session.client_id))
                subscription = Subscription(options.qos, options.no_local,
                                            options.retain_as_published, identifier)
                existed = self._trie.get(inner, key) is not None
                if allowed is not None and not allowed(topic_filter):
                    codes.append(0x87)  # not authorized
                    continue
                limit = self.settings.max_subscriptions_per_client
                if topic_filter not in session.subscriptions and len(
                        session.subscriptions) >= limit:
                    if self.metrics is not None:
                        self.metrics.mqtt_refused_subscriptions.inc()
                    self._log_limit("mqtt client %s (%r): subscription %r refused: it holds "
                                    "max_subscriptions_per_client (%d) already", client.peer,
                                    session.client_id, topic_filter, limit)
                    codes.append(QUOTA_EXCEEDED)
                    continue
                self._trie.add(inner, key, subscription)
                if not existed and self.on_filter is not None:
                    self.on_filter(inner, 1)
            except ValueError as err:
                log.info("mqtt client %s (%r): subscription %r refused: %s", client.peer,
                         session.client_id, topic_filter, err)
                codes.append(TOPIC_FILTER_INVALID)
                continue
            session.subscriptions[topic_filter] = subscription
            self.changed = True
            codes.append(options.qos)
            # Retained messages: 0 always, 1 only for a new subscription, 2 never; never for
            # shared subscriptions [MQTT-3.3.1-9..11, MQTT-3.8.4-4].
            handling = options.retain_handling
            if group is None and (handling == 0 or (handling == 1 and not existed)):
                for _, message in self.retained.matching(inner):
                    self._deliver(session, message, min(message.qos, options.qos), True,
                                  [identifier] if identifier else None)
        self._mark(client)
        return codes

    def unsubscribe(self, client: MQTTServerProtocol, topic_filters: list[str]) -> list[int]:
        session: Session | None = client.session
        assert session is not None
        codes = []
        for topic_filter in topic_filters:
            if session.subscriptions.pop(topic_filter, None) is None:
                codes.append(NO_SUBSCRIPTION_EXISTED)
            else:
                self._unroute(session.client_id, topic_filter)
                self.changed = True
                codes.append(0)
        return codes

    def _log_limit(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._limit_logged >= LIMIT_LOG_INTERVAL_S:
            self._limit_logged = now
            log.warning(text, *args)

    def _unroute(self, client_id: str, topic_filter: str) -> None:
        group, inner = split_shared(topic_filter)
        if (self._trie.remove(inner, client_id if group is None else (group, client_id))
                and self.on_filter is not None):
            self.on_filter(inner, -1)

    # -- routing -----------------------------------------------------------------------
    def publish(self, message: Message, origin: str | None = None, *,
                forward: bool = True) -> int:
        """Route ``message`` (from client id ``origin``, if any) to every matching
        subscription; keep it if retained. Returns the number of sessions it went to.
        ``forward``: also hand it to ``self.forward`` (False: it came from the fleet)."""
        if message.retain:
            self.changed = True
            if not message.payload:  # an empty retained message clears the topic
                self.retained.delete(message.topic)  # [MQTT-3.3.1-10, -11]
            elif (len(self.retained) < self.settings.max_retained
                  or self.retained.get(message.topic) is not None):
                self.retained.set(message.topic, message)
            else:  # delivered below, not kept
                self.dropped += 1
                if self.metrics is not None:
                    self.metrics.mqtt_dropped.labels("retained_full").inc()
                self._log_limit("retained message on %r from %r not kept: max_retained (%d) "
                                "reached", message.topic, origin, self.settings.max_retained)
        if forward and self.forward is not None:
            self.forward(message)
        if self._watchers:
            for _, callback, _ in self._watchers.match(message.topic):
                callback(message)
        matches = self._trie.match(message.topic)
        if not matches:
            return 0
        targets: dict[str, tuple[int, bool, list[int] | None]] = {}
        groups: dict[tuple[str, str], list[tuple[str, Subscription]]] | None = None
        for key, sub, topic_filter in matches:
            if type(key) is tuple:
                if groups is None:
                    groups = {}
                groups.setdefault((key[0], topic_filter), []).append((key[1], sub))
                continue
            assert isinstance(key, str)
            if sub.no_local and key == origin:  # [MQTT-3.8.3-3]
                continue
            self._merge(targets, key, sub)
        if groups:
            for members in groups.values():
                client_id, sub = self._pick(members)
                self._merge(targets, client_id, sub)
        sessions = self.sessions
        for client_id, (qos, retain_as_published, identifiers) in targets.items():
            session = sessions.get(client_id)
            if session is not None:
                self._deliver(session, message, min(qos, message.qos),
                              message.retain and retain_as_published, identifiers)
        return len(targets)

    @staticmethod
    def _merge(targets: dict[str, tuple[int, bool, list[int] | None]], client_id: str,
               sub: Subscription) -> None:
        """Overlapping subscriptions: one delivery at the highest QoS, every identifier."""
        known = targets.get(client_id)
        ids = [sub.identifier] if sub.identifier else None
        if known is None:
            targets[client_id] = (sub.qos, sub.retain_as_published, ids)
            return
        qos, rap, known_ids = known
        if ids and known_ids:
            ids = known_ids + ids
        targets[client_id] = (max(qos, sub.qos), rap or sub.retain_as_published,
                              ids or known_ids)

    def _pick(self, members: list[tuple[str, Subscription]]) -> tuple[str, Subscription]:
        """One member of a shared subscription group: round robin over the connected ones
        (or over all, when none is connected: the message waits in a session)."""
        sessions = self.sessions
        connected = [m for m in members
                     if (s := sessions.get(m[0])) is not None and s.client is not None]
        pool = connected or members
        return pool[next(self._turn) % len(pool)]

    def _deliver(self, session: Session, message: Message, qos: int, retain: bool,
                 identifiers: list[int] | None) -> None:
        client = session.client
        if qos == 0:
            if client is None:
                if self.settings.queue_qos0 and session.expiry_s:
                    self._enqueue(session, Delivery(message, 0, retain, identifiers))
                return
            self._send(session, client, Delivery(message, 0, retain, identifiers))
            self._mark(client)
            return
        delivery = Delivery(message, qos, retain, identifiers)
        if client is not None and not session.queue and client.conn.outbound_room > 0:
            self._send(session, client, delivery)
            self._mark(client)
        else:
            self._enqueue(session, delivery)

    def _enqueue(self, session: Session, delivery: Delivery) -> None:
        queue = session.queue
        if queue is None:
            queue = session.queue = deque()
        elif len(queue) >= self.settings.max_queued:
            self._count_dropped(session, 1, "queue_full")
            return
        queue.append(delivery)
        self.changed = True

    def _count_dropped(self, session: Session, n: int, reason: str) -> None:
        session.dropped += n
        self.dropped += n
        if self.metrics is not None:
            self.metrics.mqtt_dropped.labels(reason).inc(n)

    def _send(self, session: Session, client: MQTTServerProtocol, delivery: Delivery,
              resend: bool = False) -> bool:
        """Hand one delivery to the codec; False if it expired or cannot be sent."""
        message = delivery.message
        properties = message.properties
        if message.expires_at is not None:
            left = message.expires_at - time.time()
            if left <= 0:  # expired on the way: not sent [MQTT-3.3.2-5]
                if delivery.packet_id is not None:
                    session.inflight.pop(delivery.packet_id, None)
                return False
            properties = {**properties, "message_expiry_interval": max(1, int(left))}
        if delivery.identifiers and session.version == MQTT_5:
            properties = {**properties, "subscription_identifier": delivery.identifiers}
        if session.version != MQTT_5:
            properties = {}
        try:
            packet_id = client.conn.send_publish(
                message.topic, message.payload, qos=delivery.qos, retain=delivery.retain,
                properties=properties, packet_id=delivery.packet_id if resend else None)
        except LocalProtocolError as err:  # larger than the client takes
            log.warning("mqtt client %s (%r): %s not delivered: %s", client.peer,
                        session.client_id, message.topic, err)
            if delivery.packet_id is not None:
                session.inflight.pop(delivery.packet_id, None)
            self._count_dropped(session, 1, "too_large")
            return False
        if packet_id is not None:
            delivery.packet_id = packet_id
            session.inflight[packet_id] = delivery
            self.changed = True
        self.delivered += 1
        return True

    def acknowledged(self, client: MQTTServerProtocol, packet_id: int) -> None:
        """The client finished (PUBACK/PUBCOMP) a delivery: send what waits."""
        session: Session | None = client.session
        if session is None:
            return
        if session.inflight.pop(packet_id, None) is not None:
            self.changed = True
        self._pump(session)
        self._mark(client)

    def _pump(self, session: Session) -> None:
        client = session.client
        if client is None:
            return
        conn = client.conn
        queue = session.queue
        while queue and (queue[0].qos == 0 or conn.outbound_room > 0):
            self._send(session, client, queue.popleft())

    # -- durable state --------------------------------------------------------------------
    def save(self) -> bytes:
        """The persistent sessions (expiry > 0) and retained messages, encoded. Connected
        sessions are saved as if they went away now: after a crash their clients reconnect
        and resume them."""
        now = time.time()
        sessions = []
        for session in self.sessions.values():
            if not session.expiry_s:
                continue
            sessions.append(_SavedSession(
                session.client_id, session.version, session.expiry_s,
                session.expires_at if session.expires_at is not None
                else now + session.expiry_s,
                session.subscriptions, list(session.queue or ()),
                list(session.inflight.values()),
                session.releases if session.client is None
                else session.client.conn.awaiting_release(),
                session.will, session.will_due))
        retained = [message for _, message in self.retained.items()]
        self.changed = False
        return msgspec.msgpack.encode(_Saved(STATE_FORMAT, sessions, retained))

    def restore(self, data: bytes) -> tuple[int, int]:
        """Take the state ``save()`` wrote (on the loop, before any client connects);
        returns (sessions, retained messages) restored. Sessions whose expiry passed while
        the gateway was down end now, publishing their wills."""
        saved = msgspec.msgpack.decode(data, type=_Saved)
        if saved.format != STATE_FORMAT:
            raise ValueError(f"unknown broker state format {saved.format}")
        for message in saved.retained:
            self.retained.set(message.topic, message)
        now = time.time()
        for entry in saved.sessions:
            session = self.sessions[entry.client_id] = Session(entry.client_id)
            session.version, session.expiry_s = entry.version, entry.expiry_s
            session.subscriptions = entry.subscriptions
            for topic_filter, subscription in entry.subscriptions.items():
                group, inner = split_shared(topic_filter)
                self._trie.add(inner, entry.client_id if group is None
                               else (group, entry.client_id), subscription)
            if entry.queue:
                session.queue = deque(entry.queue)
            session.inflight = {d.packet_id: d for d in entry.inflight
                                if d.packet_id is not None}
            session.releases = entry.releases
            session.will = entry.will
            if entry.expiry_s != NEVER_EXPIRES and entry.expires_at <= now:
                self._end(session, publish_will=True)
                continue
            if entry.will is not None and entry.will_due is not None:
                self._will_at(session, entry.will_due)
            self._expire_at(session, entry.expires_at)
        self.changed = False
        return len(self.sessions), len(self.retained)

    def publish_metrics(self) -> None:
        """Bring the gauges and the delivered counter up to date (housekeeping: counting
        per message would cost the hot path)."""
        metrics = self.metrics
        if metrics is None:
            return
        metrics.mqtt_delivered.inc(self.delivered - self._delivered_counted)
        self._delivered_counted = self.delivered
        metrics.mqtt_sessions.set(len(self.sessions))
        metrics.mqtt_subscriptions.set(len(self._trie))
        metrics.mqtt_retained.set(len(self.retained))

    # -- output: one write per client per loop turn --------------------------------------
    def _mark(self, client: MQTTServerProtocol) -> None:
        self._dirty.add(client)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for client in dirty:
            client.flush()



class BrokerStore:
    """The broker's durable state in ``<state_dir>/broker/state.msgpack``: loaded at start,
    saved every ``snapshot_interval_s`` when something changed (encoded on the loop, written
    and fsynced in a thread), and at shutdown once every connection is closed. A crash
    loses at most the last interval's session changes (Mosquitto's default autosave is
    every 30 minutes); messages acknowledged to publishers stay in the write-ahead log."""

    def __init__(self, broker: Broker, state_dir: Path) -> None:
        self.broker = broker
        self.path = state_dir / "broker" / "state.msgpack"
        self._writing: asyncio.Future[None] | None = None

    def load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            sessions, retained = self.broker.restore(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as err:
            kept = self.path.with_name(f"state.corrupt-{int(time.time())}.msgpack")
            os.replace(self.path, kept)
            log.error("broker state %s cannot be read (%s): kept as %s; starting without "
                      "persistent sessions and retained messages", self.path, err, kept.name)
            return
        log.info("broker state: %d sessions and %d retained messages restored from %s",
                 sessions, retained, self.path)

    async def save_if_changed(self) -> None:
        if not self.broker.changed or (self._writing is not None and not self._writing.done()):
            return
        data = self.broker.save()
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(None, self._write, data)
        await self._writing

    def save_now(self) -> None:
        self._write(self.broker.save())

    def _write(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, data)
        except OSError as err:
            self.broker.changed = True  # try again next time
            log.error("broker state not saved to %s: %s", self.path, err)
