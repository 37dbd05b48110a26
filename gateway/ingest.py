"""MQTT ingest: PUBLISH packets → classified envelopes in the dispatcher's lanes.

This is the hot path. Per read, the adapter hands over every PUBLISH it decoded; per
message we do one dict lookup (the connection's topic → classification cache) and build one
``Envelope``. Counters are bumped once per read, never per message.

Delivery: QoS 0 messages go to their lane at once, unless the gateway is overloaded and
their tier may be shed (lowest tier first, more tiers as the backlog grows; counted and
summarised in the audit log). QoS 1/2 messages are appended to the write-ahead log and
acknowledged only once the group commit holding them is on disk; until then the read's
messages (QoS 0 ones too, to keep each connection's order) wait together. When the WAL
refuses (too much unretired work, or a failing disk) MQTT 5 clients get PUBACK/PUBREC 0x97
(quota exceeded); MQTT 3.1.1 clients, who cannot be told no, stop being read until the log
takes work again, and are disconnected if a commit fails (they resend what was not acked).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Collection
from itertools import count
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec

from gateway.auth import AuthResult, IdentityAcl, Security
from gateway.broker import NEVER_EXPIRES, Broker, Message
from gateway.classify import Classification, Classifier, PayloadRules
from gateway.config import ANOMALY_LANES, DispatchSection, MQTTListener, Tier
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from policies.alerts import Alerter
from policies.anomaly import Anomaly, AnomalyDetector
from protocols.mqtt.connection import (
    ClientDisconnect,
    ConnectRequest,
    PublishAcknowledged,
    SubscribeRequest,
    UnsubscribeRequest,
)
from protocols.mqtt.packets import Connect, Publish
from protocols.mqtt.topics import compile_topic_filter

if TYPE_CHECKING:
    from protocols.mqtt.adapter import MQTTServerProtocol

log = logging.getLogger("iotgw.ingest")

SUCCESS = 0x00
NO_SUBSCRIPTION_EXISTED = 0x11
QUOTA_EXCEEDED = 0x97
NOT_AUTHORIZED = 0x87
UNSPECIFIED_ERROR = 0x80
MQTT5 = 5
MAX_PROTOCOL_PLANS = 100_000
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2, "emergency": 3}


def _device_of(plan: Classification | PayloadRules) -> str:
    return plan.device if isinstance(plan, Classification) else plan.base.device


@functools.lru_cache(maxsize=4096)
def _filter(topic_filter: str) -> re.Pattern[str]:
    return compile_topic_filter(topic_filter)


def base36(n: int) -> str:
    """``n`` in base 36: short, sortable-enough ids (message ids, process epochs)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, d = divmod(n, 36)
        out = digits[d] + out
    return out or "0"


class Inbound(NamedTuple):
    """One message from a protocol other than MQTT (CoAP, AMQP), for ``MQTTIngest.submit``."""

    device: str
    topic: str
    """The topic it is classified and routed by (MQTT subscribers see it under this name)."""
    payload: bytes
    qos: int = 0
    """0: taken as it comes; 1 or more: made durable before ``done(True)`` (the caller then
    acknowledges: CoAP 2.04, AMQP ack)."""
    username: str | None = None
    tier: str | None = None
    """A tier the protocol asks for (AMQP: the ``tier`` header or ``amqp.priority_tiers``);
    it replaces the classification's tier. None, or a tier this config lacks: ignored."""


class Durability(Protocol):
    """What ingest needs from the write-ahead log (``gateway.wal.WriteAheadLog``)."""

    @property
    def refusing(self) -> bool: ...

    def append(self, batch: list[Envelope], done: Callable[[OSError | None], None]) -> None: ...


class MQTTIngest:
    """The gateway's side of every MQTT connection (implements ``MQTTHooks``)."""

    def __init__(self, node_id: str, settings: MQTTListener, tiers: list[Tier],
                 dispatch: DispatchSection, classifier: Classifier, dispatcher: Dispatcher,
                 metrics: Metrics, wal: Durability | None = None,
                 summarise: Callable[..., None] | None = None,
                 max_uncommitted: int = 50_000,
                 audit: Callable[..., None] | None = None,
                 broker: Broker | None = None) -> None:
        # Classification of other protocols' messages, by (device, username, topic).
        self._plans: dict[tuple[str, str | None, str],
                          tuple[Classification | PayloadRules, bool]] = {}
        self.dispatcher = dispatcher
        self.broker = broker or Broker(metrics=metrics)
        self.metrics = metrics
        self.wal = wal
        self.clients: set[MQTTServerProtocol] = set()
        self.accepting = True
        self.received = 0
        self.refused = 0
        self.shed = 0
        self.alerter: Alerter | None = None
        # Ids stay unique across restarts and side-by-side upgrades: node, start time, sequence.
        self._prefix = f"{node_id}-{base36(time.time_ns() // 1000)}-"
        self._sequence = count(1)
        self._received = metrics.messages_received.labels("mqtt")
        self._connections = metrics.connections.labels("mqtt")
        self._summarise = summarise
        self._wal_paused: set[MQTTServerProtocol] = set()
        self._shed_paused: set[MQTTServerProtocol] = set()
        self.uncommitted = 0  # messages waiting for their group commit
        self._max_uncommitted = max_uncommitted
        self._commit_pressure = False
        self._audit = audit
        self.detector: AnomalyDetector | None = None
        self.security: Security | None = None
        """Authentication, ACLs and limits (``[auth]``); None: anyone may do anything."""
        self._checks: set[asyncio.Task[None]] = set()  # password checks in flight
        self._decode = msgspec.json.Decoder().decode
        self.divert: Callable[[list[Envelope]], list[Envelope]] | None = None
        """Takes the envelopes that leave this node (fleet overflow) before they reach the
        lanes; returns the others, in order."""
        self.configure(settings, tiers, dispatch, classifier)

    def configure(self, settings: MQTTListener, tiers: list[Tier], dispatch: DispatchSection,
                  classifier: Classifier, detector: AnomalyDetector | None = None,
                  forget: Collection[str] | None = None) -> None:
        """Take a (re)loaded config: new rules apply to every connection's next message.
        ``forget``: only the cached classifications of these devices are stale (a rebuilt
        registry that changed only them); otherwise every cache is cleared."""
        self.settings = settings
        self.classifier = classifier
        self.detector = detector
        self._lanes = {lane.name: lane.items for lane in self.dispatcher.lanes}
        self._deadline_ns = {t.name: int(t.max_latency_ms * 1_000_000) for t in tiers}
        self._rank = {t.name: i for i, t in enumerate(tiers)}
        self._sheddable = frozenset(t.name for t in tiers if t.shed_qos0)
        self._shed_above = dispatch.shed_above
        self._plans.clear()  # other protocols' classifications: rebuilt as messages come
        for client in self.clients:
            cache = client.topic_cache
            if forget is None:
                cache.clear()
            elif forget:  # reclassifying every topic at once would stall the loop
                for topic in [t for t, (plan, _) in cache.items() if _device_of(plan) in forget]:
                    del cache[topic]

    # -- connection lifecycle -----------------------------------------------------------
    def on_open(self, client: MQTTServerProtocol) -> None:
        self.clients.add(client)
        self._connections.inc()
        security = self.security
        if security is not None:
            guard = security.flood_guard
            if guard is not None and not guard.allow(client.peer.rpartition(":")[0],
                                                     time.monotonic()):
                self._refused_connection(client, "connection_flood")
                log.warning("mqtt client %s: too many connections from its address; closed",
                            client.peer)
                client.close()
                return
            client.limiter = security.client_rate_limiter(time.monotonic())
        if self.dispatcher.pressure:  # until it shows it sends protected work
            client.pause_for_backpressure(True)
        if self._commit_pressure:
            client.pause_for_backpressure(True, reason="commit")

    def on_close(self, client: MQTTServerProtocol) -> None:
        if client.session is not None:  # gone without DISCONNECT: its will is due
            self.broker.disconnected(client, None)
        self.clients.discard(client)
        self._wal_paused.discard(client)
        self._shed_paused.discard(client)
        self._connections.dec()

    def on_connect(self, client: MQTTServerProtocol, request: ConnectRequest) -> None:
        security = self.security
        if security is None:
            self._connect(client, request.packet)
            return
        packet = request.packet
        tls = security.tls
        identity = tls.identity_of(client.peercert) if tls is not None else None
        client_id = client.conn.client_id or ""
        method = packet.properties.get("authentication_method")
        auth = security.authenticator
        result = auth.decide_now(packet.username, packet.password, client_id=client_id,
                                 peer_cert_identity=identity, authentication_method=method)
        if result is not None:
            self._decide(client, packet, result)
            return
        # A password to hash (in a thread): read nothing more until it is decided.
        client.pause_for_backpressure(True, reason="auth")

        async def check() -> None:
            decided = await auth.authenticate(
                packet.username, packet.password, client_id=client_id,
                peer_cert_identity=identity, authentication_method=method)
            client.pause_for_backpressure(False, reason="auth")
            if client.transport is None:
                return  # gone meanwhile
            self._decide(client, packet, decided)
            client.connected()

        task = asyncio.get_running_loop().create_task(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _decide(self, client: MQTTServerProtocol, packet: Connect, result: AuthResult) -> None:
        if result.ok:
            assert self.security is not None and result.identity is not None
            client.acl = self.security.acl.bind(result.identity)
            will = packet.will
            if will is None or client.acl.can_publish(will.topic):
                self._connect(client, packet)
                return
            result = AuthResult(ok=False, reason_code=NOT_AUTHORIZED,
                                reason=f"will topic {will.topic!r} not allowed")
        self._refused_connection(client, "not_authorized" if result.reason_code == NOT_AUTHORIZED
                                 else "bad_credentials" if result.reason_code in (0x86, 0x8C)
                                 else "server_busy")
        log.warning("mqtt client %s (%r, user %r) refused: %s", client.peer,
                    client.conn.client_id, packet.username, result.reason)
        client.conn.refuse(result.reason_code, reason_string=result.reason or None)
        client.close()

    def _refused_connection(self, client: MQTTServerProtocol, reason: str) -> None:
        self.metrics.mqtt_connections_refused.labels(reason).inc()

    def reconfigure_security(self, security: Security) -> None:
        """A reload: connected clients keep their identity under the new rules."""
        self.security = security
        for client in self.clients:
            acl = client.acl
            if acl is not None:
                client.acl = security.acl.bind(acl.identity)
            if client.limiter is not None or security.limits is not None:
                client.limiter = security.client_rate_limiter(time.monotonic())

    def _connect(self, client: MQTTServerProtocol, packet: Connect) -> None:
        if packet.protocol_level == MQTT5:
            expiry = packet.properties.get("session_expiry_interval", 0)
        else:  # MQTT 3.1.1: a persistent session lasts until the broker's limit
            expiry = 0 if packet.clean_start else NEVER_EXPIRES
        present = self.broker.connect(client, packet.clean_start, expiry, packet.will)
        client.conn.accept(session_present=present)
        self.broker.resume(client)
        log.debug("%s connected as %r (MQTT level %d)", client.peer,
                  client.conn.client_id, packet.protocol_level)

    def on_disconnect(self, client: MQTTServerProtocol, event: ClientDisconnect) -> None:
        self.broker.disconnected(client, event.reason_code,
                                 event.properties.get("session_expiry_interval"))

    def on_acknowledged(self, client: MQTTServerProtocol, event: PublishAcknowledged) -> None:
        self.broker.acknowledged(client, event.packet_id)

    def on_violation(self, client: MQTTServerProtocol, reason: str, message: str) -> None:
        self.metrics.protocol_errors.labels("mqtt", reason).inc()
        log.warning("mqtt client %s (%r) closed: %s", client.peer, client.conn.client_id, message)

    # -- subscriptions ------------------------------------------------------------------
    def on_subscribe(self, client: MQTTServerProtocol, request: SubscribeRequest) -> None:
        packet = request.packet
        ids = packet.properties.get("subscription_identifier")
        acl = client.acl
        codes = self.broker.subscribe(client, packet.subscriptions, ids[0] if ids else None,
                                      acl.can_subscribe if acl is not None else None)
        client.conn.suback(packet.packet_id, codes)

    def on_unsubscribe(self, client: MQTTServerProtocol, request: UnsubscribeRequest) -> None:
        packet = request.packet
        client.conn.unsuback(packet.packet_id,
                             self.broker.unsubscribe(client, packet.topic_filters))

    # -- the hot path ----------------------------------------------------------------------
    def on_publish(self, client: MQTTServerProtocol, batch: list[Publish],
                   received_ns: int, received_at: float) -> None:
        acl = client.acl
        if acl is not None and acl.restricted:
            batch = self._authorized(client, batch, acl)
            if not batch:
                return
        if client.limiter is not None:
            self._limit_rate(client, batch)
        cache = client.topic_cache
        deadlines = self._deadline_ns
        prefix = self._prefix
        sequence = self._sequence
        shed = self._shed_tiers()
        waiting: list[Envelope] = []  # this read's messages, in order
        durable: list[Envelope] = []  # the QoS >= 1 ones among them
        acks: list[Publish] = []
        sheddable = 0  # messages of this read that may be shed (QoS 0 of a shed tier)
        routing = self.broker.subscribed
        routed: list[Publish] | None = None  # for the broker, once the read may be delivered
        for publish in batch:
            if routing or publish.retain:
                if routed is None:
                    routed = [publish]
                else:
                    routed.append(publish)
            topic = publish.topic
            entry: tuple[Classification | PayloadRules, bool] | None = cache.get(topic)
            if entry is None:
                entry = self._classify(client, topic)
            plan, triage = entry
            data: dict[str, Any] | None = None
            if type(plan) is Classification:
                c = plan
            else:  # rules on payload fields apply to this topic: decide per message
                data = self._decode_object(publish.payload)
                c = plan.resolve(data)  # type: ignore[union-attr]
            tier = c.tier
            qos = publish.qos
            if not qos and tier in shed:
                sheddable += 1
            envelope = Envelope(
                prefix + str(next(sequence)), c.device, c.tenant, tier, c.region, topic,
                publish.payload, received_ns, received_at, "mqtt", qos,
                c.device_class, received_ns + deadlines[tier],
            )
            if data is not None:
                envelope.data = data
            if triage:
                self._triage(envelope)
            waiting.append(envelope)
            if qos:
                durable.append(envelope)
                acks.append(publish)
        if not client.sends_protected:  # once known, never looked for again
            client.sends_protected = any(e.tier not in self._sheddable for e in waiting)
        n = len(batch)
        self.received += n
        self._received.inc(n)
        if sheddable:
            if sheddable == n:  # only sheddable work: take it, read no more from this client
                self._pause_shedder(client)
            else:  # mixed with work that must not be shed: shed what may be
                waiting = self._shed(waiting, shed)
        if self.wal is None:
            for publish in acks:
                client.conn.ack(publish)
            self.enqueue(waiting)
            if routed:
                self._route(client, routed, received_at)
        elif durable or client.commits_pending:
            self._append_durably(client, waiting, durable, acks, routed, received_at)
        else:
            self.enqueue(waiting)
            if routed:
                self._route(client, routed, received_at)

    def _route(self, client: MQTTServerProtocol, publishes: list[Publish],
               received_at: float) -> None:
        """Hand a read's messages to the broker (in order: [MQTT-4.6.0-6])."""
        publish = self.broker.publish
        origin = client.conn.client_id
        of = Message.of
        for packet in publishes:
            publish(of(packet, received_at), origin)

    def _authorized(self, client: MQTTServerProtocol, batch: list[Publish],
                    acl: IdentityAcl) -> list[Publish]:
        """The messages the client may publish. The others are refused: MQTT 5 with PUBACK or
        PUBREC 0x87 (3.4.2.1); MQTT 3.1.1 cannot say no, so they are acknowledged and dropped
        [MQTT-3.3.5-2]. Counted in ``iotgw_messages_refused_total{reason="not_authorized"}``."""
        allowed = acl.can_publish
        kept: list[Publish] = []
        denied: list[Publish] = []
        for publish in batch:
            (kept if allowed(publish.topic) else denied).append(publish)
        if not denied:
            return batch
        conn = client.conn
        code = NOT_AUTHORIZED if conn.version == MQTT5 else SUCCESS
        for publish in denied:
            if publish.qos:
                conn.ack(publish, code)
        client.flush()
        self.refused += len(denied)
        self.metrics.messages_refused.labels("mqtt", "not_authorized").inc(len(denied))
        log.warning("mqtt client %s (%r): %d messages to topics it may not publish to, "
                    "e.g. %r, refused", client.peer, conn.client_id, len(denied),
                    denied[0].topic)
        return kept

    def _limit_rate(self, client: MQTTServerProtocol, batch: list[Publish]) -> None:
        """Past its messages/s or bytes/s: stop reading the client until it is back within
        them (the TCP window pushes back; nothing is dropped)."""
        limiter = client.limiter
        wait = limiter.consume(len(batch), sum(len(p.payload) for p in batch), time.monotonic())
        if wait > 0:
            client.pause_for_backpressure(True, reason="rate")
            if limiter.timer is not None:  # one resume, when all the debt is paid
                limiter.timer.cancel()
            limiter.timer = asyncio.get_running_loop().call_later(
                wait, client.pause_for_backpressure, False, "rate")

    # -- other protocols ------------------------------------------------------------------
    def submit(self, protocol: str, items: list[Inbound],
               done: Callable[[bool], None] | None = None) -> bool:
        """Take messages from a protocol other than MQTT: classified, triaged, made durable
        (QoS >= 1), queued and routed to MQTT subscribers like any PUBLISH.

        Returns False, taking nothing, when the gateway refuses work now (draining, the
        write-ahead log refusing, or the backlog past ``dispatch.max_queued``): the caller
        says "later" (CoAP 5.03 with Max-Age, AMQP nack with requeue). Otherwise ``done``
        is called once: True when the durable ones are on disk (at once if there are none),
        False if the commit failed, in which case nothing of ``items`` was taken."""
        if not self.accepting or self.dispatcher.pressure:
            return False
        wal = self.wal
        durable_wanted = any(item.qos for item in items)
        if durable_wanted and wal is not None and wal.refusing:
            return False
        plans = self._plans
        deadlines = self._deadline_ns
        prefix, sequence = self._prefix, self._sequence
        received_ns, received_at = time.monotonic_ns(), time.time()
        envelopes: list[Envelope] = []
        for item in items:
            key = (item.device, item.username, item.topic)
            entry = plans.get(key)
            if entry is None:
                if len(plans) >= MAX_PROTOCOL_PLANS:
                    plans.clear()
                entry = plans[key] = self._plan(item.device, item.username, item.topic)
            plan, triage = entry
            data: dict[str, Any] | None = None
            if type(plan) is Classification:
                c = plan
            else:
                data = self._decode_object(item.payload)
                c = plan.resolve(data)  # type: ignore[union-attr]
            tier = item.tier
            if tier is not None and tier != c.tier and tier in deadlines:
                c = c._replace(tier=tier)
            envelope = Envelope(
                prefix + str(next(sequence)), c.device, c.tenant, c.tier, c.region, item.topic,
                item.payload, received_ns, received_at, protocol, item.qos, c.device_class,
                received_ns + deadlines[c.tier])
            if data is not None:
                envelope.data = data
            if triage:
                self._triage(envelope)
            envelopes.append(envelope)
        self.received += len(envelopes)
        self.metrics.messages_received.labels(protocol).inc(len(envelopes))
        durable = [e for e in envelopes if e.qos]

        def deliver() -> None:
            self.enqueue(envelopes)
            if self.broker.subscribed:
                publish = self.broker.publish
                for item in items:
                    publish(Message(item.topic, item.payload, min(item.qos, 2)))

        if wal is None or not durable:
            deliver()
            if done is not None:
                done(True)
            return True

        def committed(error: OSError | None) -> None:
            self.uncommitted -= len(envelopes)
            if error is not None:
                log.error("write-ahead log commit failed (%s): %d %s messages not taken",
                          error, len(durable), protocol)
                if done is not None:
                    done(False)
                return
            deliver()
            if done is not None:
                done(True)

        self.uncommitted += len(envelopes)
        wal.append(durable, committed)
        return True

    def _plan(self, device: str, username: str | None, topic: str
              ) -> tuple[Classification | PayloadRules, bool]:
        plan = self.classifier.plan(device, username, topic)
        classes = ([plan.device_class] if isinstance(plan, Classification)
                   else [plan.base.device_class, *(c.device_class for _, c in plan.candidates)])
        detector = self.detector
        return plan, detector is not None and any(detector.applies(dc, topic) for dc in classes)

    def enqueue(self, envelopes: list[Envelope]) -> None:
        """Hand classified envelopes to their lanes, in order."""
        if not envelopes:
            return
        if self.divert is not None:
            envelopes = self.divert(envelopes)
            if not envelopes:
                return
        lanes = self._lanes
        for envelope in envelopes:
            severity = envelope.anomaly
            lanes[ANOMALY_LANES[severity] if severity else envelope.tier].append(envelope)
        self.dispatcher.accepted(len(envelopes))
        self.dispatcher.express()  # urgent work waiting goes now, not a loop turn later

    def _append_durably(self, client: MQTTServerProtocol, waiting: list[Envelope],
                        durable: list[Envelope], acks: list[Publish],
                        routed: list[Publish] | None = None, received_at: float = 0.0,
                        ) -> None:
        assert self.wal is not None
        if durable and self.wal.refusing:
            if client.conn.version == MQTT5:  # say no: the client keeps the message
                self._refuse(client, acks)
                waiting = [e for e in waiting if not e.qos]
                durable, acks = [], []
                if routed:
                    routed = [p for p in routed if not p.qos]
                if not client.commits_pending:
                    self.enqueue(waiting)
                    if routed:
                        self._route(client, routed, received_at)
                    return
            else:
                # MQTT 3.1.1 cannot be told no: take what this read carried (the limit is
                # soft) and read nothing more from this client until the log takes work again.
                self._wal_paused.add(client)
                client.pause_for_backpressure(True, reason="wal")

        def done(error: OSError | None) -> None:
            client.commits_pending -= 1
            self.uncommitted -= len(waiting)
            if self._commit_pressure and self.uncommitted <= self._max_uncommitted // 2:
                self._commit_pressure = False
                self._pause_all(False, "commit")
            if error is not None and durable:
                log.error("write-ahead log commit failed (%s): refusing %d messages from %s",
                          error, len(durable), client.peer)
                self._refuse(client, acks)
                self.enqueue([e for e in waiting if not e.qos])
                if routed:
                    self._route(client, [p for p in routed if not p.qos], received_at)
                return
            self.enqueue(waiting)
            conn = client.conn
            for publish in acks:
                conn.ack(publish)
            client.flush()
            if routed:
                self._route(client, routed, received_at)

        client.commits_pending += 1
        self.uncommitted += len(waiting)
        if self.uncommitted > self._max_uncommitted and not self._commit_pressure:
            self._commit_pressure = True  # the disk is behind: push back into TCP
            self._pause_all(True, "commit")
        self.wal.append(durable, done)

    def _refuse(self, client: MQTTServerProtocol, acks: list[Publish]) -> None:
        """Say no without losing anything: the client still holds what we did not ack."""
        if not acks:
            return
        self.refused += len(acks)
        self.metrics.messages_refused.labels("mqtt", "quota_exceeded").inc(len(acks))
        conn = client.conn
        if conn.version == MQTT5:
            for publish in acks:
                conn.ack(publish, QUOTA_EXCEEDED)
            client.flush()
        else:
            # MQTT 3.1.1 has no negative ack: close, so that the client sends again what we
            # did not acknowledge once it reconnects.
            log.warning("closing MQTT 3.1.1 client %s: %d messages could not be made durable",
                        client.peer, len(acks))
            client.close()

    def resume_refused(self) -> None:
        """Called periodically: let paused MQTT 3.1.1 clients go on once the WAL takes work."""
        if self._wal_paused and self.wal is not None and not self.wal.refusing:
            for client in self._wal_paused:
                client.pause_for_backpressure(False, reason="wal")
            self._wal_paused.clear()

    def _shed_tiers(self) -> frozenset[str] | tuple[()]:
        """The tiers whose QoS 0 messages are shed now: those with more than ``shed_above``
        messages queued at or ahead of them (a message waits only for those). Lower tiers
        therefore go first, and a burst of bulk work never costs premium messages."""
        if self.dispatcher.queued <= self._shed_above or not self._sheddable:
            return ()
        shed = []
        ahead = 0
        for lane in self.dispatcher.lanes:  # most urgent first
            ahead += len(lane.items)
            if ahead > self._shed_above and lane.name in self._sheddable:
                shed.append(lane.name)
        return frozenset(shed)

    def _shed(self, waiting: list[Envelope], shed: frozenset[str] | tuple[()],
              ) -> list[Envelope]:
        """Drop the QoS 0 messages of the tiers being shed; count them."""
        kept: list[Envelope] = []
        counts: dict[str, int] = {}
        for envelope in waiting:
            if not envelope.qos and envelope.tier in shed:
                counts[envelope.tier] = counts.get(envelope.tier, 0) + 1
            else:
                kept.append(envelope)
        self._count_shed(counts)
        return kept

    def _pause_shedder(self, client: MQTTServerProtocol) -> None:
        """A client whose read carried only work of the tiers being shed: that read is
        taken, but nothing more is read from it until the backlog is well below
        ``shed_above``. What it sends meanwhile waits in TCP, so the excess costs the sender,
        not the gateway (reading and shedding a flood at wire speed would starve processing).
        Clients whose reads mix in work that may not be shed keep being read, and the
        sheddable part of such reads is shed."""
        if client in self._shed_paused:
            return
        self._shed_paused.add(client)
        self.metrics.ingest_pauses.inc()
        client.pause_for_backpressure(True, reason="shed")
        if len(self._shed_paused) == 1:
            self.dispatcher.when_below(self._shed_above * 3 // 4, self._resume_shedders)

    def _resume_shedders(self) -> None:
        paused, self._shed_paused = self._shed_paused, set()
        for client in paused:
            client.pause_for_backpressure(False, reason="shed")

    def _count_shed(self, counts: dict[str, int]) -> None:
        for tier, n in counts.items():
            self.shed += n
            self.metrics.messages_shed.labels(tier, "overload").inc(n)
            if self._summarise is not None:
                self._summarise("shed", tier, n, reason="overload")

    def _classify(self, client: MQTTServerProtocol, topic: str
                  ) -> tuple[Classification | PayloadRules, bool]:
        cache = client.topic_cache
        if len(cache) >= self.settings.max_topic_cache:
            cache.clear()
        acl = client.acl
        if acl is not None:  # authenticated: a client certificate may name the device
            identity = acl.identity
            entry = self._plan(identity.device, identity.username, topic)
        else:
            entry = self._plan(client.conn.client_id or "", client.conn.username, topic)
        cache[topic] = entry
        return entry

    def _decode_object(self, payload: bytes) -> dict[str, Any] | None:
        try:
            data = self._decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    # -- anomaly triage, before queueing -----------------------------------------------------
    def _triage(self, envelope: Envelope) -> None:
        assert self.detector is not None
        if envelope.data is None:
            envelope.data = self._decode_object(envelope.payload)
        anomalies = self.detector.check_envelope(envelope, envelope.received_ns / 1e9)
        if anomalies:
            envelope.anomaly = max((a.severity for a in anomalies), key=SEVERITY_RANK.__getitem__)
            self.raised(anomalies, envelope)

    def publish_local(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish a message of the gateway's own (alerts, results) through the broker."""
        self.broker.publish(Message(topic, payload, qos))

    def raised(self, anomalies: list[Anomaly], envelope: Envelope | None = None) -> None:
        """Count, time, record and alert anomalies (from triage, silence checks or
        escalation)."""
        metrics = self.metrics
        if envelope is not None:
            metrics.anomaly_detect_latency.observe_many(
                "all", [time.monotonic_ns() - envelope.received_ns])
        for anomaly in anomalies:
            metrics.anomalies.labels(anomaly.severity).inc()
            log.info("anomaly %s on %s: %s (%s)", anomaly.severity, anomaly.device,
                     anomaly.reason, anomaly.detector)
            if self._audit is not None:
                self._audit("anomaly", detector=anomaly.detector, device=anomaly.device,
                            severity=anomaly.severity, value=anomaly.value,
                            reason=anomaly.reason, escalated=anomaly.escalated,
                            message=envelope.id if envelope is not None else None)
            if self.alerter is not None:
                if envelope is not None:
                    self.alerter.alert(anomaly, tenant=envelope.tenant, tier=envelope.tier)
                else:
                    self.alerter.alert(anomaly)

    def set_backpressure(self, paused: bool) -> None:
        """The backlog passed ``max_queued`` (or fell below ``resume_queued``): stop (resume)
        reading, except from clients that send work of the tiers never shed (critical
        devices): their work is what the backlog must not delay."""
        self.metrics.reading_paused.set(1 if paused else 0)
        if paused:
            self.metrics.ingest_pauses.inc()
        for client in self.clients:
            if not (paused and client.sends_protected):
                client.pause_for_backpressure(paused, reason="backlog")

    def _pause_all(self, paused: bool, reason: str) -> None:
        for client in self.clients:
            client.pause_for_backpressure(paused, reason=reason)

