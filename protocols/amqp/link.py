"""What every AMQP link shares: its errors and the backoff between connection attempts (its
metrics are ``gateway.metrics.AmqpMetrics``)."""

from __future__ import annotations

import random

from gateway.metrics import AmqpMetrics
from protocols.amqp.wire import ProtocolError

LINK_ERRORS = (ConnectionError, OSError, TimeoutError, ProtocolError)
"""What a lost, refused or misbehaving link raises (``client.LinkLost`` is a
ConnectionError)."""


class Backoff:
    """Exponential backoff with full jitter between ``initial`` and ``maximum`` seconds."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, delay * 2)
        return random.uniform(delay / 2, delay)

__all__ = ["LINK_ERRORS", "AmqpMetrics", "Backoff"]
