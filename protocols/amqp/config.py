"""``[amqp]``: RabbitMQ in (ingest queues) and out (processed results, alerts).

Plain msgspec Structs, validated where they are decoded; this module imports nothing from the
gateway (``gateway.config`` embeds ``AmqpSection``). Cross-checks against the tiers of the whole
config are in ``check_tiers``.

Example::

    [amqp]
    url = "amqp://gateway:secret@rabbit.example:5672/iot"   # absent: AMQP is off
    prefetch = 2048               # absent: dispatch.batch_size × dispatch.slots

    [[amqp.queues]]
    name = "iotgw.ingest"
    type = "classic"              # or "quorum" (no x-max-priority)
    max_priority = 9
    bindings = [{ exchange = "iotgw.ingress", routing_key = "#" }]

    [[amqp.priority_tiers]]       # AMQP priority >= 8 → critical, >= 5 → premium
    priority = 8
    tier = "critical"

    [[amqp.priority_tiers]]
    priority = 5
    tier = "premium"

    [amqp.processed]              # the "amqp" sink that `--amqp-url` routes results to
    exchange = "iotgw.processed"
    routing_key = "{tenant}.{tier}.{device}"

    [amqp.alerts]
    exchange = "iotgw.alerts"
    routing_key = "{tenant}.{severity}.{device}"
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct

AmqpName = Annotated[str, Meta(min_length=1, max_length=255)]
"""A queue or exchange name (AMQP short string)."""
TierName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]
Priority = Annotated[int, Meta(ge=0, le=255)]
PositiveFloat = Annotated[float, Meta(gt=0)]
ArgumentValue = str | int | float | bool

PROCESSED_FIELDS = ("tenant", "tier", "device", "region", "device_class", "topic")
"""Fields a processed-result routing key template may use."""
ALERT_FIELDS = ("tenant", "tier", "device", "severity", "detector")
"""Fields an alert routing key template may use."""


class _Base(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


def check_url(url: str) -> None:
    """``amqp://`` or ``amqps://`` with a host; raises ValueError naming what is wrong."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number below 65536 raises ValueError
    except ValueError as err:
        raise ValueError(f"url: expected amqp://HOST[:PORT][/VHOST], got a bad URL ({err})"
                         ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError("url: the scheme must be amqp or amqps")
    if not parts.hostname:
        raise ValueError("url: no host")


def check_template(template: str, fields: Collection[str], where: str) -> None:
    try:
        template.format(**dict.fromkeys(fields, "x"))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where} {template!r}: unknown or bad field {err} "
                         f"(known: {', '.join(fields)})") from None


class QueueBinding(_Base, frozen=True):
    exchange: AmqpName
    """A topic exchange (declared durable when ``declare`` is on)."""
    routing_key: Annotated[str, Meta(max_length=255)] = "#"


class IngestQueue(_Base, frozen=True):
    """A queue the gateway consumes."""

    name: AmqpName = "iotgw.ingest"
    type: Literal["classic", "quorum"] = "classic"
    max_priority: Annotated[int, Meta(ge=1, le=255)] | None = 9
    """``x-max-priority`` of a classic queue (RabbitMQ advises at most 10 levels); leave it
    out for a classic queue without priorities. Quorum queues take none."""
    arguments: dict[str, ArgumentValue] = {}
    """Further ``x-`` arguments at declaration, e.g. ``x-max-length``. A quorum queue's
    ``x-delivery-limit`` counts nacks under overload too: keep it high or unset."""
    bindings: list[QueueBinding] = []

    def __post_init__(self) -> None:
        if self.type == "quorum" and self.max_priority is not None:
            raise ValueError("max_priority: quorum queues have no x-max-priority "
                             "(set max_priority to nothing, or use a classic queue)")

    def declare_arguments(self) -> dict[str, ArgumentValue]:
        arguments: dict[str, ArgumentValue] = {}
        if self.type == "quorum":
            arguments["x-queue-type"] = "quorum"
        elif self.max_priority is not None:
            arguments["x-max-priority"] = self.max_priority
        arguments.update(self.arguments)
        return arguments


class PriorityTier(_Base, frozen=True):
    priority: Priority
    """The lowest AMQP priority that maps to ``tier``."""
    tier: TierName


class OutputExchange(_Base, frozen=True):
    exchange: AmqpName | None
    """None: nothing is published."""
    routing_key: Annotated[str, Meta(max_length=1024)]
    """A template; each field is filled in as one word (escaped: ``. * # %``)."""
    type: Literal["topic", "direct", "fanout", "headers"] = "topic"


class AmqpSection(_Base, frozen=True):
    url: str | None = None
    """``amqp://user:password@host:port/vhost``; None: AMQP is off (``serve --amqp-url``)."""
    queues: list[IngestQueue] = msgspec.field(default_factory=lambda: [IngestQueue()])
    declare: bool = True
    """Declare the queues, their bindings and the output exchanges (idempotent) on every
    connect; off: they must exist (a missing one is retried like a lost link)."""
    prefetch: Annotated[int, Meta(ge=1, le=65535)] | None = None
    """Unacknowledged deliveries at once; None: ``dispatch.batch_size × dispatch.slots``."""
    max_batch: Annotated[int, Meta(ge=1, le=65536)] = 1024
    """Most deliveries handed to ingest in one ``submit``."""
    device_header: str | None = "device"
    """Header naming the device; then ``app_id``, then routing key level
    ``device_key_level`` (of a message routed by a named exchange), then the queue name."""
    device_key_level: Annotated[int, Meta(ge=0)] = 1
    topic_header: str | None = "topic"
    """Header giving the topic the message is classified and routed by (an MQTT topic name);
    else the routing key with ``.`` as ``/``; else ``amqp/<queue>/<device>``."""
    tier_header: str | None = "tier"
    """Header naming the tier (an unknown name is ignored); it wins over ``priority_tiers``."""
    priority_tiers: list[PriorityTier] = []
    """AMQP priority → tier: the entry with the highest ``priority`` not above the message's
    wins; a message below every entry (or without priority) keeps its classification."""
    refused_delay_s: PositiveFloat = 0.25
    """When the gateway refuses work, deliveries wait this long, then are nacked with requeue
    (so that a busy gateway does not spin on its own redeliveries, and other consumers of the
    queue may take them); doubled while refusals go on, up to ``refused_max_delay_s``."""
    refused_max_delay_s: PositiveFloat = 5.0
    dedupe_window: Annotated[int, Meta(ge=0)] = 65536
    """Message ids remembered after their durable append: a redelivery of one of them (its
    ack was lost with the link) is acked without being taken again. 0: off."""
    heartbeat_s: Annotated[int, Meta(ge=0, le=65535)] = 15
    """AMQP heartbeat; a silent (half-open) link is given up after about 3 × (this + 1) s."""
    connect_timeout_s: PositiveFloat = 10.0
    reconnect_initial_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    close_timeout_s: Annotated[float, Meta(ge=0)] = 5.0
    """At shutdown: how long to wait for in-flight appends so that they are acked (not
    redelivered) and for unconfirmed alerts."""
    processed: OutputExchange = OutputExchange(exchange="iotgw.processed",
                                               routing_key="{tenant}.{tier}.{device}")
    """Where ``with_amqp`` routes processed results (an ``amqp`` sink named ``amqp``)."""
    alerts: OutputExchange = OutputExchange(exchange="iotgw.alerts",
                                            routing_key="{tenant}.{severity}.{device}")
    confirm_timeout_s: PositiveFloat = 5.0
    """Longest a flush waits for RabbitMQ's publisher confirms before it reports failure."""
    max_buffered: Annotated[int, Meta(ge=1)] = 100_000
    """Messages held for an output while RabbitMQ is away; beyond it QoS 0 results and the
    oldest alerts are dropped and counted (QoS >= 1 results are kept: the WAL bounds them)."""

    def __post_init__(self) -> None:
        if self.url is not None:
            check_url(self.url)
        if not self.queues:
            raise ValueError("queues: give at least one queue")
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise ValueError("queues: a queue is listed twice")
        priorities = [p.priority for p in self.priority_tiers]
        if len(set(priorities)) != len(priorities):
            raise ValueError("priority_tiers: a priority is listed twice")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must not be below reconnect_initial_s")
        if self.refused_max_delay_s < self.refused_delay_s:
            raise ValueError("refused_max_delay_s must not be below refused_delay_s")
        check_template(self.processed.routing_key, PROCESSED_FIELDS, "processed.routing_key")
        check_template(self.alerts.routing_key, ALERT_FIELDS, "alerts.routing_key")


def check_tiers(section: AmqpSection, tiers: Collection[str]) -> None:
    """Raises ValueError when ``priority_tiers`` names a tier the config lacks."""
    for i, entry in enumerate(section.priority_tiers):
        if entry.tier not in tiers:
            raise ValueError(f"amqp.priority_tiers[{i}].tier: unknown tier {entry.tier!r}")
