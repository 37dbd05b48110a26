"""Prometheus metrics, all registered on one injected ``CollectorRegistry``.

Names follow ``iotgw_<subsystem>_<name>_<unit>``; they are part of the product's interface.
The hot path never touches a prometheus_client object per message: callers count a batch
and add the total once. Latency goes into ``LatencyHistogram``, a collector whose
``observe_many`` costs one bisect per message and no lock (one event loop owns it).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# Fine below 10 ms so that a 1 ms p99 can be read; coarse up to a minute for late work.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip


class LatencyHistogram(Collector):
    """A labelled histogram fed in batches of nanosecond durations."""

    def __init__(self, name: str, documentation: str, label: str,
                 buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.buckets_s = buckets_s
        self._bounds_ns = [int(b * 1e9) for b in buckets_s]
        self._series: dict[str, tuple[list[int], list[int]]] = {}  # value → (counts, [sum_ns])

    def _get(self, value: str) -> tuple[list[int], list[int]]:
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = ([0] * (len(self._bounds_ns) + 1), [0])
        return series

    def observe_many(self, value: str, durations_ns: Iterable[int]) -> None:
        counts, total = self._get(value)
        bounds = self._bounds_ns
        acc = 0
        for d in durations_ns:
            counts[bisect_left(bounds, d)] += 1
            acc += d
        total[0] += acc

    def quantile(self, value: str, q: float) -> float:
        """Upper bucket bound (seconds) below which a fraction ``q`` of observations fall."""
        counts, _ = self._get(value)
        n = sum(counts)
        if n == 0:
            return 0.0
        rank, seen = q * n, 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= rank:
                return self.buckets_s[i] if i < len(self.buckets_s) else float("inf")
        return float("inf")

    def count(self, value: str) -> int:
        return sum(self._get(value)[0])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, (counts, total) in sorted(self._series.items()):
            cumulative, buckets = 0, []
            for bound, c in zip((*self.buckets_s, float("inf")), counts, strict=True):
                cumulative += c
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            family.add_metric([value], buckets, total[0] / 1e9)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])


class Metrics:
    """Every metric the gateway exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "iotgw_messages_received", "Messages taken in", ["protocol"], registry=r)
        self.messages_processed = Counter(
            "iotgw_messages_processed", "Messages through the whole pipeline", ["tier"],
            registry=r)
        self.messages_shed = Counter(
            "iotgw_messages_shed", "QoS 0 messages dropped, never silently (reason: overload, "
            "or late: past the deadline of a tier with late = \"shed\")",
            ["tier", "reason"], registry=r)
        self.messages_refused = Counter(
            "iotgw_messages_refused", "QoS >= 1 messages refused (not acknowledged) under overload",
            ["protocol", "reason"], registry=r)
        self.protocol_errors = Counter(
            "iotgw_protocol_errors", "Connections closed for a protocol violation",
            ["protocol", "reason"], registry=r)
        self.payload_errors = Counter(
            "iotgw_payload_decode_errors", "Payloads that are not valid JSON (kept as base64)",
            ["tier"], registry=r)
        self.validation_failures = Counter(
            "iotgw_validation_failures", "Messages that failed their device-class schema",
            ["device_class"], registry=r)
        self.pipeline_failures = Counter(
            "iotgw_pipeline_failures", "Messages whose pipeline raised", ["tier"], registry=r)
        self.stage_failures = Counter(
            "iotgw_stage_failures", "Times a stage failed on a batch or a message: it raised "
            "(error), ran past its timeout (timeout) or its worker process died (crash)",
            ["stage", "reason"], registry=r)
        self.stage_retries = Counter(
            "iotgw_stage_retries", "Messages run again through a stage that failed on them",
            ["stage"], registry=r)
        self.dead_letters = Counter(
            "iotgw_dead_letters", "Messages moved to the dead-letter sink after their last attempt",
            ["stage"], registry=r)
        self.workers_pending = Gauge(
            "iotgw_workers_pending_messages", "Messages waiting for a retry or in isolated stages",
            registry=r)
        self.isolated_pool_restarts = Counter(
            "iotgw_isolated_pool_restarts", "Times the isolated stages' process pool was torn "
            "down (reason: timeout, crash)", ["reason"], registry=r)
        self.audit_errors = Counter(
            "iotgw_audit_errors", "Audit records that could not be written", registry=r)
        self.sink_records = Counter(
            "iotgw_sink_records", "Records written by each sink", ["sink"], registry=r)
        self.sink_errors = Counter(
            "iotgw_sink_errors", "Sink write failures (the records stay buffered for retry)",
            ["sink"], registry=r)
        self.sink_buffered = Gauge(
            "iotgw_sink_buffered_bytes", "Bytes a sink holds that have not reached the OS",
            ["sink"], registry=r)
        self.pipeline_unrouted = Counter(
            "iotgw_pipeline_unrouted", "Messages that ended a pipeline with no sink to go to",
            ["pipeline"], registry=r)
        self.connections = Gauge(
            "iotgw_connections", "Open client connections", ["protocol"], registry=r)
        # The MQTT broker (gateway/broker.py).
        self.mqtt_delivered = Counter(
            "iotgw_mqtt_delivered", "PUBLISH packets sent to subscribers", registry=r)
        self.mqtt_refused_subscriptions = Counter(
            "iotgw_mqtt_refused_subscriptions", "Subscriptions refused because the session "
            "held broker.max_subscriptions_per_client already", registry=r)
        self.mqtt_dropped = Counter(
            "iotgw_mqtt_dropped",
            "Messages for subscribers not delivered: queue_full (a session's bound), "
            "too_large (over the client's maximum packet size), session_ended, retained_full "
            "(a retained message delivered but not kept: broker.max_retained)",
            ["reason"], registry=r)
        self.mqtt_connections_refused = Counter(
            "iotgw_mqtt_connections_refused",
            "Connections refused: bad_credentials, not_authorized, server_busy (password "
            "checks queued), connection_flood (too many from one address)",
            ["reason"], registry=r)
        self.mqtt_sessions = Gauge(
            "iotgw_mqtt_sessions", "MQTT sessions kept (connected or not)", registry=r)
        self.mqtt_subscriptions = Gauge(
            "iotgw_mqtt_subscriptions", "MQTT subscriptions", registry=r)
        self.mqtt_retained = Gauge(
            "iotgw_mqtt_retained_messages", "Retained messages kept", registry=r)
        self.amqp = AmqpMetrics(r)
        self.fleet = FleetMetrics(r)
        self.regions = RegionMetrics(r)
        self.queue_depth = Gauge(
            "iotgw_queue_depth", "Messages waiting in each dispatcher lane", ["lane"], registry=r)
        self.ingest_pauses = Counter(
            "iotgw_ingest_pauses", "Times reading from clients paused for back-pressure",
            registry=r)
        self.reading_paused = Gauge(
            "iotgw_ingest_paused", "1 while reading is paused for back-pressure", registry=r)
        self.anomalies = Counter(
            "iotgw_anomalies", "Anomalies raised by triage, silence checks and escalation",
            ["severity"], registry=r)
        self.preemptions = Counter(
            "iotgw_preemptions", "Routine batches that yielded their slot to anomalous work at "
            "a stage boundary (requeued with their progress kept)", ["tier"], registry=r)
        self.alerts = Counter(
            "iotgw_alerts", "Alerts sent for raised anomalies", ["channel", "severity"],
            registry=r)
        self.alert_failures = Counter(
            "iotgw_alert_failures", "Alerts that could not be delivered (after their retries)",
            ["channel"], registry=r)
        self.maintenance_reserved_slots = Gauge(
            "iotgw_maintenance_reserved_slots", "Dispatcher slots reserved for maintenance now",
            registry=r)
        self.maintenance_decisions = Counter(
            "iotgw_maintenance_decisions", "Maintenance admission decisions (grant, shrink, "
            "grow, pause, resume, defer, skip, complete, cancel)", ["action"], registry=r)
        self.maintenance_steps = Counter(
            "iotgw_maintenance_steps", "Slices of maintenance work run", ["task"], registry=r)
        self.maintenance_tasks = Counter(
            "iotgw_maintenance_tasks", "Maintenance tasks ended (outcome: done, failed)",
            ["task", "outcome"], registry=r)
        self.scaling_desired_replicas = Gauge(
            "iotgw_scaling_desired_replicas", "Replicas the fleet needs for the forecast load "
            "(for external autoscalers)", registry=r)
        self.scaling_capacity_slots = Gauge(
            "iotgw_scaling_capacity_slots", "Processing slots in effect in this node",
            registry=r)
        self.scaling_forecast = Gauge(
            "iotgw_scaling_forecast_messages_per_second", "Arrival rate the scaling policy "
            "provisions for", registry=r)
        self.scaling_arrivals = Gauge(
            "iotgw_scaling_arrival_messages_per_second", "Arrival rate measured over the last "
            "scaling interval", registry=r)
        self.scaling_decisions = Counter(
            "iotgw_scaling_decisions", "Scaling decisions that changed capacity or the desired "
            "replicas (action: scale-up, scale-down, replicas)", ["action"], registry=r)
        self.scaling_hook_runs = Counter(
            "iotgw_scaling_hook_runs", "Runs of the scaling command hook (outcome: ok, failed, "
            "timeout, error)", ["outcome"], registry=r)
        self.loop_lag = Histogram(
            "iotgw_loop_lag_seconds", "How late a 10 ms timer fires on the event loop: the "
            "longest anything waits for the loop's next turn", buckets=LATENCY_BUCKETS_S,
            registry=r)
        self.anomaly_detect_latency = LatencyHistogram(
            "iotgw_anomaly_detect_latency_seconds",
            "From the first byte read to the anomaly raised", "path")
        r.register(self.anomaly_detect_latency)
        self.processing_latency = LatencyHistogram(
            "iotgw_processing_latency_seconds",
            "From the first byte read to the end of the pipeline", "tier")
        r.register(self.processing_latency)

        # The write-ahead log (gateway/wal.py): counted per group commit, never per message.
        self.wal_appended = Counter(
            "iotgw_wal_appended_records", "Records made durable in the write-ahead log",
            registry=r)
        self.wal_retired = Counter(
            "iotgw_wal_retired_records", "WAL records retired (processed; never replayed)",
            registry=r)
        self.wal_commits = Counter(
            "iotgw_wal_commits", "WAL group commits that succeeded (normally one durable write)",
            registry=r)
        self.wal_commit_errors = Counter(
            "iotgw_wal_commit_errors", "WAL group commits that failed (their appends refused)",
            ["errno"], registry=r)
        self.wal_written_bytes = Counter(
            "iotgw_wal_written_bytes", "Bytes written to WAL segments", registry=r)
        self.wal_fsync_seconds = Histogram(
            "iotgw_wal_fsync_seconds",
            "Duration of each WAL sync: a segment's durable write, or a directory fsync",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.wal_commit_latency = Histogram(
            "iotgw_wal_commit_latency_seconds",
            "From the first record of a group commit being appended to all of it being durable",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.wal_unretired = Gauge(
            "iotgw_wal_unretired_records", "WAL records not yet retired", registry=r)
        self.wal_segments = Gauge(
            "iotgw_wal_segments", "WAL segment files on disk", registry=r)
        self.wal_refusing = Gauge(
            "iotgw_wal_refusing", "1 while the WAL refuses new work (full, or disk failing)",
            registry=r)
        self.wal_segments_deleted = Counter(
            "iotgw_wal_segments_deleted", "WAL segments deleted once all their records retired",
            registry=r)
        self.wal_recovered = Counter(
            "iotgw_wal_recovered_records", "Unretired WAL records read back at start",
            registry=r)
        self.wal_corrupt_records = Counter(
            "iotgw_wal_corrupt_records",
            "Torn or corrupt WAL records found at start (each cut its segment there)", registry=r)
        self.wal_truncated_bytes = Counter(
            "iotgw_wal_truncated_bytes", "Bytes cut from WAL segments at start", registry=r)


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


class FleetMetrics:
    """The fleet's metrics (``gateway.fleet``): overflow to the region's work queue, and MQTT
    messages between replicas. Its AMQP links count in ``iotgw_amqp_*{link="fleet:..."}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.overflow_messages = Counter(
            "iotgw_overflow_messages", "Messages given away to the region's work queue "
            "(direction: out) or taken in from it (in)", ["tier", "direction"], registry=r)
        self.overflow_devices = Gauge(
            "iotgw_overflow_devices", "(device, tier)s whose work goes to the region's work "
            "queue now", registry=r)
        self.taking = Gauge(
            "iotgw_overflow_taking", "1 while this replica consumes the region's work queue",
            registry=r)
        self.messages = Counter(
            "iotgw_fleet_messages", "MQTT messages published to the fleet exchange for "
            "subscribers on other replicas (direction: out) or received from it (in)",
            ["direction"], registry=r)
        self.bindings = Gauge(
            "iotgw_fleet_bindings", "Topic filters bound to this replica's fleet queue",
            registry=r)
        self.peers = Gauge(
            "iotgw_fleet_peers", "Other replicas whose subscriptions this one knows",
            registry=r)


class RegionMetrics:
    """Regional processing (``gateway.regions``): placements, bytes crossing regions, health,
    the spool. Its AMQP links count in ``iotgw_amqp_*{link="regions:..."}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.transfer_bytes = Counter(
            "iotgw_region_transfer_bytes", "Bytes of work bodies forwarded from region src to "
            "region dst", ["src", "dst"], registry=r)
        self.local_bytes = Counter(
            "iotgw_region_local_bytes", "Payload bytes placed for processing in the region "
            "they arrived in", registry=r)
        self.placements = Counter(
            "iotgw_region_placements", "Placement decisions (local, forward, spool)",
            ["action"], registry=r)
        self.up = Gauge(
            "iotgw_region_up", "1 while a region counts as up for placement (heartbeats "
            "arriving, link working)", ["region"], registry=r)
        self.spooled = Gauge(
            "iotgw_region_spooled_messages", "Messages spooled for a region that is down",
            registry=r)
        self.spool_dropped = Counter(
            "iotgw_region_spool_dropped", "QoS 0 messages dropped because the spool held "
            "max_spooled of them", registry=r)
        self.residency_refused = Counter(
            "iotgw_region_residency_refused", "Forwarded work refused (dead-lettered) because "
            "this region may not hold it", registry=r)
        self.taken = Counter(
            "iotgw_region_taken_messages", "Forwarded work taken in from this region's queue",
            registry=r)
