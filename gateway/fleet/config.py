"""``[fleet]``: replicas of one region joined through RabbitMQ (see ``gateway.fleet``).

Plain msgspec Structs; this module imports nothing of the gateway's (``gateway.config`` embeds
``FleetSection``), and the cross-checks against the config's tiers are in ``check_tiers``.

Example::

    [fleet]
    url = "amqp://gateway:secret@rabbit.example:5672/iot"   # absent: the fleet is off
    overflow_tiers = ["standard", "bulk"]   # absent: every tier but the first (most urgent)
    overflow_backlog = 20000       # a tier with more queued than this overflows...
    overflow_latency_share = 0.5   # ...or whose oldest message used half its max latency
    partitions = 8
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Annotated

from msgspec import Meta, Struct

from protocols.amqp.config import check_template, check_url

AmqpName = Annotated[str, Meta(min_length=1, max_length=255)]
TierName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]
PositiveFloat = Annotated[float, Meta(gt=0)]

NODE_FIELDS = ("node", "region")
WORK_FIELDS = ("region", "partition")


class FleetSection(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    url: str | None = None
    """``amqp://user:password@host:port/vhost`` of the region's RabbitMQ; None: the fleet is
    off (``serve --fleet-url``). Every replica of a region gives the same section."""
    exchange: AmqpName = "iotgw.fleet"
    """The topic exchange MQTT messages cross between replicas on (declared durable)."""
    node_queue: AmqpName = "iotgw.node.{node}"
    """Each replica's own queue ({node}: ``gateway.node_id``, {region}): bound to ``exchange``
    for its subscribers' filters; also takes the reports of work it gave away."""
    node_queue_expires_s: PositiveFloat = 3600.0
    """A replica's queue is deleted by RabbitMQ once unused this long (``x-expires``)."""
    node_queue_max_length: Annotated[int, Meta(ge=1)] = 100_000
    """Messages a replica's queue holds while it is away; the oldest go first beyond it."""
    work_queue: AmqpName = "iotgw.work.{region}.{partition}"
    """The region's shared work queues, one per partition ({region}, {partition})."""
    partitions: Annotated[int, Meta(ge=1, le=1024)] = 8
    """Work queues of the region; a device always maps to the same one. Each is consumed by
    one replica at a time (``x-single-active-consumer``)."""
    max_priority: Annotated[int, Meta(ge=1, le=255)] = 9
    """``x-max-priority`` of the work queues: the most urgent tier gets it, the next one
    less, and so on."""
    overflow_tiers: list[TierName] | None = None
    """Tiers whose work may leave this replica; None: every tier but the first (the most
    urgent one never leaves). Anomalous messages never do."""
    overflow_backlog: Annotated[int, Meta(ge=1)] = 20_000
    """A tier with more messages queued than this is saturated: whole devices of it move to
    the work queue until its backlog is half this."""
    overflow_latency_share: Annotated[float, Meta(gt=0, le=1)] = 0.5
    """A tier whose oldest queued message has waited this share of its ``max_latency_ms`` is
    saturated too."""
    take_below: Annotated[int, Meta(ge=0)] | None = None
    """Take work from the region's queue while fewer messages than this wait here in all;
    None: 4 × ``dispatch.batch_size`` × ``dispatch.slots``; 0: never (a replica that only
    gives work away). Never more than half ``overflow_backlog``, so that taking work does
    not saturate the taker."""
    handoff_after_s: PositiveFloat = 1.0
    """A replica holding work it cannot take this long hands its partitions to another."""
    prefetch: Annotated[int, Meta(ge=1, le=65535)] = 1024
    """Work deliveries unacknowledged at once."""
    check_interval_s: PositiveFloat = 0.02
    """How often saturation, confirms and the work taken in are looked at."""
    report_interval_s: PositiveFloat = 0.2
    """How often a replica reports the work it finished to the replicas it came from."""
    report_timeout_s: PositiveFloat = 60.0
    """A device whose work went away returns to local processing once all of it was reported
    finished, or after this long without any report (its taker died)."""
    announce_interval_s: PositiveFloat = 10.0
    """How often a replica announces its subscriptions to the others (and on every change);
    a replica not heard of for 3.5 × this is forgotten."""
    heartbeat_s: Annotated[int, Meta(ge=0, le=65535)] = 15
    connect_timeout_s: PositiveFloat = 10.0
    reconnect_initial_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    confirm_timeout_s: PositiveFloat = 5.0
    """At shutdown: longest to wait for RabbitMQ's confirms of work given away."""
    close_timeout_s: Annotated[float, Meta(ge=0)] = 5.0
    max_buffered: Annotated[int, Meta(ge=1)] = 100_000
    """MQTT messages held for the fleet exchange while RabbitMQ is away; more are dropped
    and counted (work given away is kept: the write-ahead log bounds it)."""

    def __post_init__(self) -> None:
        if self.url is not None:
            check_url(self.url)
        check_template(self.node_queue, NODE_FIELDS, "node_queue")
        if "{node}" not in self.node_queue:
            raise ValueError("node_queue: must contain {node} (one queue per replica)")
        check_template(self.work_queue, WORK_FIELDS, "work_queue")
        if "{partition}" not in self.work_queue:
            raise ValueError("work_queue: must contain {partition}")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must not be below reconnect_initial_s")
        if self.overflow_tiers is not None and len(set(self.overflow_tiers)) != len(
                self.overflow_tiers):
            raise ValueError("overflow_tiers: a tier is listed twice")


def check_tiers(section: FleetSection, tiers: Collection[str]) -> None:
    """Raises ValueError when ``overflow_tiers`` names a tier the config lacks."""
    for i, tier in enumerate(section.overflow_tiers or ()):
        if tier not in tiers:
            raise ValueError(f"fleet.overflow_tiers[{i}]: unknown tier {tier!r}")


def overflow_tiers(section: FleetSection, tiers: Sequence[str]) -> frozenset[str]:
    """The tiers whose work may leave a replica: as configured, or all but the first."""
    if section.overflow_tiers is not None:
        return frozenset(section.overflow_tiers)
    return frozenset(tiers[1:])
