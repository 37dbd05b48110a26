"""The fleet: replicas of one region joined through RabbitMQ (``[fleet]``, ``serve
--fleet-url``): overflow of saturated work to the region's shared work queues, and the MQTT
broker spanning every replica.

Modules: ``config`` (the ``[fleet]`` section; imports nothing of the gateway's, so that
``gateway.config`` may embed it), ``codec`` (sans-I/O: message bodies, routing keys,
partitions), ``link`` (one consuming AMQP connection that comes back), ``overflow`` (giving
work away, taking it in), ``bridge`` (the fleet as one broker), ``service`` (``Fleet``: the
whole, as the gateway runs it; ``with_fleet``).

Theory of operation: why nothing acknowledged is lost
------------------------------------------------------
A message of QoS >= 1 is acknowledged once it is in the origin's write-ahead log. Given away,
its record is retired only after RabbitMQ confirmed the persistent publish to a durable
queue (declared before any work is given: a publish to a missing queue would be confirmed
and dropped). The taker acknowledges a delivery only after the group commit that made it
durable in its own log, in tag order. So at every moment the message is in a log or in a
durable queue, and a lost link or a crash on either side leaves it in one of them: the
origin publishes again what was not confirmed (possibly twice: the taker drops a copy whose
id it has seen), RabbitMQ requeues what was not acknowledged. While RabbitMQ is away nothing
new is given away: work stays in the lanes, with the back-pressure it always had; a device
already given away keeps its later messages in the publisher's buffer (and the log) until
the link returns, so that its order holds.

Theory of operation: why a device's messages are processed in order
--------------------------------------------------------------------
Order is per lane (device and tier), as on one replica. (1) On the origin, a (device, tier)
is given away whole: every message of it in the lane leaves, in lane order, and the later
ones follow while it is marked (``divert`` runs where ingest queues, ahead of the lanes); the
earlier ones were finished already, since a drain processes its batches synchronously. (2)
Through RabbitMQ: one channel publishes, in order; a device maps to one partition, a tier to
one priority, and a queue delivers one priority in FIFO order. (3) On the takers: each
partition is a single-active-consumer queue, so one replica at a time takes it, and queues
what it took FIFO in its lanes. A taker hands a partition over only after everything it took
is finished; RabbitMQ requeues what it held, in its original place, and only then activates
the next consumer. (4) Back on the origin: a (device, tier) is processed locally again only
once the takers reported every message given away finished (sequence numbers per origin;
FIFO makes "finished up to n" mean all before n too).

What breaks order (never loss): a crash (or a lost RabbitMQ link) of a taker holding
unfinished work, which it processes from its log when it is back while another replica has
taken over; an origin that restarts while its work is in the queue, or gives up waiting for
reports (``report_timeout_s``); work already held by an isolated stage or a retry when its
device is given away (locally, too, a retried message lets later ones pass); a device that
moves to another replica (it reconnects elsewhere) while its messages wait.
"""
