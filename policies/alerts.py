"""Alerts for raised anomalies: MQTT, webhook and audit channels, chosen per severity.

Theory of operation
-------------------
``Alerter.alert`` runs on the event loop, possibly on the ingest path, so it only does
cheap synchronous work and never awaits or raises. It looks up the ``EscalationPolicy`` of
the anomaly's severity (``[anomaly.escalation.<severity>]``; a severity without a table gets
MQTT + audit), encodes the alert once as a JSON object (``Alert``), then:

* ``mqtt``: hands (``alerts/<severity>/<device>``, payload) to the local ``publish`` callable
  (skipped when there is no broker, ``publish=None``);
* ``webhook``: appends a job to a bounded queue (at most ``max_pending_webhooks`` waiting;
  beyond that the OLDEST job is dropped, logged and counted as a failure);
* ``audit``: writes one ``anomaly.alert`` record naming the channels used.

A failing ``publish`` or ``audit`` is logged and counted in ``failures``, never propagated.

Webhooks are POSTed by a few sender tasks (``webhook_senders``) sharing one aiohttp
``ClientSession``; the queue, the tasks and the session are created on the running loop at
the first webhook alert, so an Alerter without webhooks costs nothing. A delivery is tried
up to ``webhook_attempts`` times, ``webhook_timeout_s`` each, sleeping ``webhook_backoff_s``,
then twice as long (capped at ``MAX_BACKOFF_S``) between attempts. Connection errors,
timeouts, 5xx, 408 and 429 are retried; any other status outside 2xx (other 4xx, and 3xx:
redirects are not followed, a POST must not turn into a GET) fails at once. Each delivered
alert counts in ``alerts`` (channel ``webhook``), each final failure in ``failures`` with a
WARNING naming the URL (without credentials or query string, which often hold secrets) and
the reason. A sender holds its slot while it backs off, so a dead endpoint slows the others;
the bounded queue keeps that from growing memory.

``close(timeout)`` stops accepting webhook jobs, lets the senders drain the queue until the
deadline, then cancels them: every job still queued or in flight counts as a failure.

Topics: ``<device>`` is one topic level, so the characters that would split it (``/``), turn
the topic into a filter (``+``, ``#``) or are forbidden or discouraged in MQTT strings
(U+0000, C0/C1 controls, DEL) are percent-encoded (their UTF-8 bytes, as in URLs), as is
``%`` itself: ``a/b+#%`` becomes ``a%2Fb%2B%23%25``. The mapping is injective and
``urllib.parse.unquote`` reverses it; the payload carries the device id unescaped.

Times: the gateway stamps ``Anomaly.raised_at`` with ``time.monotonic()``; the payload's
``raised_at`` is wall-clock UTC (ISO 8601), converted by ``to_unix`` (by default assuming a
monotonic stamp; pass ``to_unix=lambda t: t`` when ``raised_at`` is already UNIX time).

This module imports ``policies.anomaly`` for typing only, so ``AnomalySection`` may embed an
``EscalationSection`` without an import cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import aiohttp
import msgspec
from msgspec import Meta, Struct
from prometheus_client import Counter

from gateway.urls import display_url

if TYPE_CHECKING:
    from policies.anomaly import Anomaly

log = logging.getLogger("iotgw.alerts")

MAX_BACKOFF_S = 30.0
"""Longest sleep between two webhook attempts."""
_RETRY_STATUSES = frozenset({408, 429})
_JSON_HEADERS = {"Content-Type": "application/json"}

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]


# --------------------------------------------------------------------------- config


class EscalationPolicy(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """What happens when an anomaly of one severity is raised
    (``[anomaly.escalation.<severity>]``)."""

    mqtt: bool = True
    """Publish the alert on the local broker, topic ``alerts/<severity>/<device>``."""
    webhook: str | None = None
    """POST the alert as JSON to this ``http://`` or ``https://`` URL."""
    webhook_timeout_s: PositiveFloat = 5.0
    """Limit of one attempt (connect, send, response status)."""
    webhook_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    webhook_backoff_s: NonNegFloat = 0.5
    """Sleep before the second attempt; doubled before each further one."""
    audit: bool = True
    """Write an ``anomaly.alert`` audit record."""

    def __post_init__(self) -> None:
        if self.webhook is not None:
            _check_url(self.webhook)


def _check_url(url: str) -> None:
    problem = None
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number below 65536 raises ValueError
    except ValueError as err:
        problem = str(err)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "the scheme must be http or https"
        elif not parts.hostname:
            problem = "no host"
    if problem is not None:
        raise ValueError(f"webhook: expected an http(s) URL, got {url!r} ({problem})")


_DEFAULT_POLICY = EscalationPolicy()


class EscalationSection(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[anomaly.escalation]``: one optional table per severity (absent: MQTT + audit)."""

    info: EscalationPolicy = _DEFAULT_POLICY
    warning: EscalationPolicy = _DEFAULT_POLICY
    critical: EscalationPolicy = _DEFAULT_POLICY
    emergency: EscalationPolicy = _DEFAULT_POLICY

    def by_severity(self) -> dict[str, EscalationPolicy]:
        """The policies keyed by severity name, as ``Alerter`` takes them."""
        return {"info": self.info, "warning": self.warning, "critical": self.critical,
                "emergency": self.emergency}


# --------------------------------------------------------------------------- wire format


class Alert(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The JSON object published over MQTT and POSTed to webhooks."""

    detector: str
    device: str
    severity: str
    value: float | None
    reason: str
    raised_at: datetime
    """UTC, encoded as ISO 8601 (``2024-05-01T12:00:00.250000Z``)."""
    escalated: bool
    tenant: str | None
    tier: str | None
    node: str | None = None
    """Left out unless the Alerter was given a node id."""


_encode = msgspec.json.Encoder().encode

_TOPIC_ESCAPES = str.maketrans({
    c: "".join(f"%{byte:02X}" for byte in c.encode())  # percent-encoded UTF-8, as in URLs
    for c in ["%", "/", "+", "#", "\x7f",
              *map(chr, range(0x20)), *map(chr, range(0x80, 0xA0))]
})


def alert_topic(severity: str, device: str) -> str:
    """``alerts/<severity>/<device>`` with the device id escaped into one plain level."""
    return f"alerts/{severity}/{device.translate(_TOPIC_ESCAPES)}"


def monotonic_to_unix(stamp: float) -> float:
    """A ``time.monotonic()`` stamp as UNIX time (the clocks' offset as of now)."""
    return stamp + (time.time() - time.monotonic())


# --------------------------------------------------------------------------- runtime


class _Job:
    __slots__ = ("payload", "policy", "severity", "url")

    def __init__(self, url: str, severity: str, policy: EscalationPolicy,
                 payload: bytes) -> None:
        self.url = url
        self.severity = severity
        self.policy = policy
        self.payload = payload


class Alerter:
    """Sends an alert for each raised anomaly through the channels of its severity's policy.

    ``alerts`` is a Counter labelled (channel, severity) and ``failures`` one labelled
    (channel,), channels being ``mqtt``, ``webhook`` and ``audit``.
    """

    def __init__(self, policies: Mapping[str, EscalationPolicy], *,
                 publish: Callable[[str, bytes], None] | None,
                 audit: Callable[..., None] | None,
                 alerts: Counter,
                 failures: Counter,
                 max_pending_webhooks: int = 1000,
                 webhook_senders: int = 4,
                 node: str | None = None,
                 to_unix: Callable[[float], float] = monotonic_to_unix) -> None:
        if max_pending_webhooks < 1 or webhook_senders < 1:
            raise ValueError("max_pending_webhooks and webhook_senders must be >= 1")
        self._policies = dict(policies)
        self._publish = publish
        self._audit = audit
        self._alerts = alerts
        self._failures = failures
        self._max_pending = max_pending_webhooks
        self._sender_count = webhook_senders
        self._node = node
        self._to_unix = to_unix
        self._display = {p.webhook: display_url(p.webhook)
                         for p in self._policies.values() if p.webhook is not None}
        self._queue: asyncio.Queue[_Job] | None = None
        self._senders: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # ---- the loop's side: cheap, never blocks, never raises

    def alert(self, anomaly: Anomaly, *, tenant: str | None = None,
              tier: str | None = None) -> None:
        severity = anomaly.severity
        policy = self._policies.get(severity, _DEFAULT_POLICY)
        payload = _encode(Alert(
            detector=anomaly.detector, device=anomaly.device, severity=severity,
            value=anomaly.value, reason=anomaly.reason,
            raised_at=datetime.fromtimestamp(self._to_unix(anomaly.raised_at), UTC),
            escalated=anomaly.escalated, tenant=tenant, tier=tier, node=self._node))
        topic = None
        if policy.mqtt and self._publish is not None:
            topic = alert_topic(severity, anomaly.device)
            try:
                self._publish(topic, payload)
            except Exception as err:
                topic = None
                self._failures.labels("mqtt").inc()
                log.error("alert for %s on %s not published: %r", severity, anomaly.device, err,
                          exc_info=True)
            else:
                self._alerts.labels("mqtt", severity).inc()
        webhook = policy.webhook
        if webhook is not None:
            self._enqueue(_Job(webhook, severity, policy, payload))
        if policy.audit and self._audit is not None:
            try:
                self._audit("anomaly.alert", detector=anomaly.detector, device=anomaly.device,
                            severity=severity, value=anomaly.value, reason=anomaly.reason,
                            escalated=anomaly.escalated, tenant=tenant, tier=tier,
                            mqtt=topic, webhook=self._display[webhook] if webhook else None)
            except Exception as err:
                self._failures.labels("audit").inc()
                log.error("alert for %s on %s not audited: %r", severity, anomaly.device, err,
                          exc_info=True)
            else:
                self._alerts.labels("audit", severity).inc()

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            self._webhook_failed(job, "the alerter is closed")
            return
        queue = self._queue
        if queue is None:
            try:
                queue = self._start()
            except RuntimeError:
                self._webhook_failed(job, "no running event loop")
                return
        if queue.full():
            oldest = queue.get_nowait()
            queue.task_done()
            self._webhook_failed(oldest, f"dropped: more than {self._max_pending} webhook "
                                         "alerts pending")
        queue.put_nowait(job)

    def _start(self) -> asyncio.Queue[_Job]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Job] = asyncio.Queue(self._max_pending)
        self._queue = queue
        self._senders = [loop.create_task(self._send_loop(queue), name=f"alert-webhook-{i}")
                         for i in range(self._sender_count)]
        return queue

    def _webhook_failed(self, job: _Job, reason: str) -> None:
        self._failures.labels("webhook").inc()
        log.warning("webhook alert (%s) to %s failed: %s", job.severity,
                    self._display[job.url], reason)

    # ---- the senders

    async def _send_loop(self, queue: asyncio.Queue[_Job]) -> None:
        while True:
            job = await queue.get()
            try:
                await self._deliver(job)
            except asyncio.CancelledError:
                self._webhook_failed(job, "not delivered before shutdown")
                raise
            except Exception:  # a bug of ours: count it and keep the sender alive
                self._failures.labels("webhook").inc()
                log.exception("webhook alert to %s failed", self._display[job.url])
            finally:
                queue.task_done()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _deliver(self, job: _Job) -> None:
        policy = job.policy
        session = self._client()
        timeout = aiohttp.ClientTimeout(total=policy.webhook_timeout_s)
        reason = ""
        attempts = 0
        while attempts < policy.webhook_attempts:
            if attempts:
                await asyncio.sleep(min(policy.webhook_backoff_s * 2 ** (attempts - 1),
                                        MAX_BACKOFF_S))
            attempts += 1
            try:
                async with session.post(job.url, data=job.payload, headers=_JSON_HEADERS,
                                        timeout=timeout, allow_redirects=False) as response:
                    status = response.status
            except TimeoutError:
                reason = f"no response within {policy.webhook_timeout_s:g} s"
                continue
            except aiohttp.ClientError as err:
                reason = str(err) or type(err).__name__
                continue
            if 200 <= status < 300:
                self._alerts.labels("webhook", job.severity).inc()
                return
            reason = f"HTTP {status}"
            if status < 500 and status not in _RETRY_STATUSES:
                break
        self._webhook_failed(job, f"{reason} (attempt {attempts} of {policy.webhook_attempts})")

    # ---- shutdown

    @property
    def pending_webhooks(self) -> int:
        """Webhook alerts queued and not yet taken by a sender."""
        return 0 if self._queue is None else self._queue.qsize()

    async def close(self, timeout: float) -> None:
        """Deliver the queued webhook alerts within ``timeout`` seconds, then stop; what is
        left counts as failed. Idempotent."""
        self._closed = True
        queue, senders = self._queue, self._senders
        self._senders = []
        if queue is not None and senders:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.join(), timeout)
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            while not queue.empty():
                job = queue.get_nowait()
                queue.task_done()
                self._webhook_failed(job, "not delivered before shutdown")
        session, self._session = self._session, None
        if session is not None:
            await session.close()
