"""The envelope: one message on its way through the gateway.

Every protocol adapter turns what it received into an ``Envelope``; everything after
ingest (classification, dispatch, pipeline stages, sinks) reads and writes envelopes only.
It is a mutable ``msgspec.Struct`` with ``gc=False``: cheap to create on the hot path (no
dict, no GC tracking) and encodable as is.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Envelope(msgspec.Struct, gc=False):
    id: str
    """Gateway-unique message id (``<node>-<sequence>``)."""
    device: str
    tenant: str
    tier: str
    region: str
    topic: str
    payload: bytes
    received_ns: int
    """``time.monotonic_ns()`` when the first byte of the read that carried it arrived."""
    received_at: float
    """Wall clock (``time.time()``) at the same instant, for records and partitioning."""
    protocol: str = "mqtt"
    qos: int = 0
    device_class: str = ""
    deadline_ns: int = 0
    """``received_ns`` + the tier's max latency: the lane's earliest-deadline-first key."""
    data: Any = None
    """The decoded payload once a stage has decoded it (a dict for JSON objects)."""
    meta: dict[str, Any] | None = None
    """Attributes added by enrichment (from the device registry)."""
    errors: list[str] | None = None
    """Validation findings; the message is still processed and kept."""
    anomaly: str = ""
    """The highest severity triage raised for this message ("" when none): it goes to the
    anomaly lane, ahead of every tier."""
    sinks: tuple[str, ...] = ()
    """Where the route stage sends it."""
    ack: Any = None
    """Protocol-specific handle to acknowledge the message once it is safe to do so."""
    stage: int = 0
    """Index of the next pipeline stage to run (progress survives preemption)."""
    wal_seq: int = 0
    """Sequence number of its write-ahead log record (0: not in the log); retire it by this."""


class SinkRecord(msgspec.Struct, omit_defaults=True, gc=False):
    """One processed message as the sinks write it: a line of the data lake, an AMQP
    message body."""

    id: str
    device: str
    tenant: str
    tier: str
    topic: str
    received_at: str
    qos: int
    protocol: str
    region: str
    device_class: str
    payload_encoding: str
    payload: Any
    meta: dict[str, Any] | None = None
    errors: list[str] | None = None
