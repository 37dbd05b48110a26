"""The fleet side of a running gateway: ``Fleet(...)`` → ``start()`` → ``stop_taking()`` (a
drain) → ``close()``; ``with_fleet`` is what ``serve --fleet-url URL`` runs with.

Connections to RabbitMQ (each reconnects by itself, so a gateway starts and serves while
RabbitMQ is away): the node link (``fleet:node``: declares the fleet exchange, this
replica's queue and its special bindings, and the region's work queues; consumes this
replica's queue: MQTT messages of the others, reports of work it gave away, subscription
announcements), two confirmed publishers (``fleet:work-out`` to the default exchange: work
and reports; ``fleet:broker`` to the fleet exchange: MQTT messages and announcements), and,
while this replica takes work, the work consumer (``fleet:work``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
from pamqp import commands

from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.fleet.bridge import FleetBroker
from gateway.fleet.codec import (
    DONE,
    INTEREST,
    MQTT,
    SPECIAL_KEYS,
    FleetDecodeError,
    decode_done,
)
from gateway.fleet.config import FleetSection
from gateway.fleet.link import Link, LinkSettings
from gateway.fleet.overflow import Durability, Overflow, work_queue_arguments
from gateway.ingest import MQTTIngest, base36
from gateway.metrics import Metrics
from protocols.amqp.config import check_url
from protocols.amqp.errors import AmqpError
from protocols.amqp.publisher import ConfirmedPublisher
from protocols.amqp.wire import Delivery

log = logging.getLogger("iotgw.fleet")


def with_fleet(config: Config, url: str | None) -> Config:
    """The config a gateway runs with ``--fleet-url url`` (None: as it is)."""
    if url is None:
        return config
    try:
        check_url(url)
    except ValueError as err:
        raise ConfigError(f"--fleet-url: {err}") from None
    return msgspec.structs.replace(config, fleet=msgspec.structs.replace(config.fleet, url=url))


class Fleet:
    """This replica in its region's fleet (see ``gateway.fleet``)."""

    def __init__(self, config: Config, *, ingest: MQTTIngest, dispatcher: Dispatcher,
                 wal: Durability | None, metrics: Metrics,
                 audit: Callable[..., None] | None = None,
                 summarise: Callable[..., None] | None = None) -> None:
        section: FleetSection = config.fleet
        if section.url is None:
            raise ConfigError("fleet.url: not set (the fleet is off)")
        self.section = section
        self.ingest = ingest
        node = self.node = config.gateway.node_id
        region = config.gateway.region
        self.origin = f"{node}/{base36(time.time_ns() // 1000)}"
        """This process in the fleet: a later run of the node is another origin."""
        self.queue = section.node_queue.format(node=node, region=region)
        settings = LinkSettings(section.heartbeat_s, section.connect_timeout_s,
                                section.reconnect_initial_s, section.reconnect_max_s)
        client = f"iot-gateway {node}"
        self.work_publisher = ConfirmedPublisher(
            "fleet:work-out", section.url, "", metrics.amqp, declare=False, settings=settings,
            max_buffered=section.max_buffered, name=client)
        self.broker_publisher = ConfirmedPublisher(
            "fleet:broker", section.url, section.exchange, metrics.amqp, exchange_type="topic",
            declare=True, settings=settings, max_buffered=section.max_buffered, name=client)
        self.declared = False
        """The node link is up and has declared the work queues: work may be given away
        (a publish to a queue that does not exist would be confirmed, and lost)."""
        self.node_link = Link("fleet:node", section.url, settings, metrics.amqp,
                              setup=self._setup, on_deliveries=self._deliveries,
                              on_up=self._up, on_down=self._down, client_name=client)
        self.overflow = Overflow(section, config, origin=self.origin, reply=self.queue,
                                 ingest=ingest, dispatcher=dispatcher, wal=wal, metrics=metrics,
                                 publisher=self.work_publisher, ready=lambda: self.declared,
                                 audit=audit, summarise=summarise)
        self.bridge = FleetBroker(section, node, self.queue, ingest.broker, metrics,
                                  self.broker_publisher, lambda: self.node_link)
        self._unknown = 0
        self._closed = False

    def start(self) -> None:
        """Hook into the broker and ingest; connect in the background."""
        self.bridge.attach()
        self.ingest.divert = self.overflow.divert
        self.node_link.start()
        self.overflow.start()
        log.info("fleet: node %s joins region queues %s... through %s", self.node,
                 self.overflow.queues[0], self.node_link.where)

    def reconfigure(self, config: Config) -> None:
        """A reload: the tiers (the fleet section itself needs a restart)."""
        self.overflow.reconfigure(config)

    def finished(self, envelopes: list[Envelope]) -> None:
        """Processing finished (or shed) these: report work taken from the region's queue."""
        self.overflow.finished(envelopes)

    def stop_taking(self) -> None:
        """A drain: take no more work from the region's queue."""
        self.overflow.stop_taking()

    async def close(self, timeout: float) -> None:
        """Hand back the partitions, wait (up to ``timeout``) for the confirms of work given
        away (retiring it), say goodbye, close every link. Once; later calls return."""
        if self._closed:
            return
        self._closed = True
        await self.overflow.close(timeout)
        if self.ingest.divert == self.overflow.divert:
            self.ingest.divert = None
        await self.bridge.close()
        try:
            await self.broker_publisher.close(min(timeout, 2.0))
        except AmqpError as err:
            log.debug("fleet: %s", err)
        await self.node_link.close(self.section.close_timeout_s)

    # -- the node link -----------------------------------------------------------------------------
    async def _setup(self, link: Link) -> None:
        section = self.section
        await link.call(commands.Basic.Qos(prefetch_count=section.prefetch),
                        commands.Basic.QosOk)
        await link.call(commands.Exchange.Declare(exchange=section.exchange,
                                                  exchange_type="topic", durable=True),
                        commands.Exchange.DeclareOk)
        await link.call(commands.Queue.Declare(queue=self.queue, durable=True, arguments={
            "x-expires": int(section.node_queue_expires_s * 1000),
            "x-max-length": section.node_queue_max_length}), commands.Queue.DeclareOk)
        for key in SPECIAL_KEYS:
            await link.call(commands.Queue.Bind(queue=self.queue, exchange=section.exchange,
                                                routing_key=key), commands.Queue.BindOk)
        for name in self.overflow.queues:
            await link.call(commands.Queue.Declare(queue=name, durable=True,
                                                   arguments=work_queue_arguments(section)),
                            commands.Queue.DeclareOk)
        await link.call(commands.Basic.Consume(queue=self.queue, consumer_tag=self.queue),
                        commands.Basic.ConsumeOk)

    def _up(self) -> None:
        self.declared = True
        self.bridge.on_up()

    def _down(self) -> None:
        self.declared = False
        self.bridge.on_down()

    def _deliveries(self, deliveries: list[Delivery]) -> None:
        bridge = self.bridge
        for d in deliveries:
            kind = d.properties.content_type
            if kind == MQTT:
                bridge.receive(d.body)
            elif kind == INTEREST:
                bridge.on_interest(d.body)
            elif kind == DONE:
                try:
                    self.overflow.on_report(decode_done(d.body))
                except FleetDecodeError as err:
                    log.warning("fleet: a report that cannot be read was dropped: %s", err)
            else:
                self._unknown += 1
                if self._unknown == 1 or self._unknown % 1000 == 0:
                    log.warning("fleet: %d messages of unknown content type (%r, key %r) on "
                                "%s dropped", self._unknown, kind, d.routing_key, self.queue)
        self.node_link.ack(deliveries[-1].delivery_tag)
