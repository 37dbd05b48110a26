"""Regional processing (issue 8): each gateway knows its region (``[gateway] region``) and the
topology (``[regions]``, ``policies.regions``); every message is placed where it arrived when
that is allowed and possible, else forwarded to the cheapest allowed region with room, else
spooled; residency is never violated. The regions' RabbitMQ is the fleet's (``[fleet] url``
or ``serve --fleet-url``): regions need it, and are off while ``[regions]`` lists none.

Modules: ``codec`` (heartbeats; forwarded work is the fleet's ``WorkItem``), ``health``
(up/down from heartbeats and the link), ``spool`` (work that may go nowhere now), ``service``
(``Regions``: the whole, as the gateway runs it).

Theory of operation
-------------------
*Placement* runs in ingest's hook ahead of the lanes (``MQTTIngest.divert``), after
classification and the durable append, before the fleet's overflow (which only sees what
stays here): the placement policy (``policies.regions``, a plugin) answers ``local``,
``forward`` or ``spool`` from the tenant, the device class, whether this gateway is saturated
(backlog past ``dispatch.shed_above``) and the regions' states. Work already placed (taken
from a region queue or from the fleet's work queue) is never placed again.

*Forwarding*: a ``WorkItem`` (classification, id, receipt time, payload), persistent for
QoS >= 1, published with confirms to the direct exchange ``regions.exchange`` with the target
region as routing key; each region's queue (``regions.queue``, durable, single active
consumer, so a region processes forwarded work in order) is bound with its name. Every
gateway declares every region's queue before it forwards anything (a publish to a missing
queue would be confirmed and lost). The WAL record is retired only on RabbitMQ's confirm, so
at every moment an acknowledged message is in a log or in a durable queue.

*Taking*: the fleet's ``Taker`` (``gateway.fleet.overflow``) consumes this region's queue:
durable append, ack in tag order after the group commit, then the lanes. Residency is
checked again on this side (``Regions.admit``): work this region may not hold is rejected
without requeue and dead-lettered by RabbitMQ to ``<exchange>.refused`` (counted in
``iotgw_region_residency_refused_total``, summarised in the audit log), never processed.

*Health*: every gateway publishes a heartbeat (region, node, saturated, wall clock) every
``heartbeat_interval_s`` to the fanout exchange ``<exchange>.health``; each consumes them on
an exclusive queue. A remote region is down when none of its gateways was heard for
``down_after_missed`` intervals, or while this gateway's link is down (its consumer or
publisher lost, or a forward unconfirmed for as long): a gateway cut off from the others
counts them all down and keeps serving its own devices. Transitions are logged and audited
(``region.down``/``region.up``) with the time detection took.

*Spool*: work whose allowed regions are all down waits in arrival order (QoS >= 1 stays in
the WAL, unretired; QoS 0 bounded by ``max_spooled``, the excess dropped and counted), is
placed again every ``spool_retry_s`` and at once when a region comes back, and drains in
order: nothing of a (tenant, device class) passes its spooled predecessors. At shutdown what
is spooled stays in the WAL; the next start replays it through placement again.

Limits: forwarded work is processed by the target region in queue order, but a device whose
messages are partly processed locally and partly forwarded (its placement changed, e.g. this
gateway saturated) may be reordered across the two; a taker's crash may reorder, never lose.
Cross-region MQTT subscriptions are the fleet bridge's business, not this package's.
"""

from gateway.regions.service import Regions, RegionTaken

__all__ = ["RegionTaken", "Regions"]
