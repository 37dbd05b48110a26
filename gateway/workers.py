"""Processing: run a dispatched batch through its tier's pipeline and account for it."""

from __future__ import annotations

import logging
import time
from itertools import islice

from gateway.dispatch import Lane
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline

log = logging.getLogger("iotgw.workers")


class Workers:
    def __init__(self, pipelines: dict[str, Pipeline], metrics: Metrics) -> None:
        self.pipelines = pipelines
        self.metrics = metrics
        self.processed = 0
        self.failed = 0
        self._processed = {t: metrics.messages_processed.labels(t) for t in pipelines}
        self._latency = metrics.processing_latency

    def process(self, lane: Lane, batch: list[Envelope]) -> None:
        tier = lane.name
        n = len(batch)  # stages may append derived records (aggregates) to the batch
        try:
            self.pipelines[tier].run(batch)
        except Exception:
            # Retries and the dead-letter sink come with the durability work; until then a
            # failing stage is loud, counted, and does not take the loop down.
            self.failed += n
            self.metrics.pipeline_failures.labels(tier).inc(n)
            log.exception("pipeline for tier %s failed on a batch of %d", tier, n)
            return
        now = time.monotonic_ns()
        self._latency.observe_many(tier, [now - e.received_ns for e in islice(batch, n)])
        self.processed += n
        self._processed[tier].inc(n)
