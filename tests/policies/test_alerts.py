"""Alert channels per severity: MQTT and audit callables, webhooks against a real HTTP server
on loopback (aiohttp), counters in a fresh registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import unquote

import msgspec
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from policies.alerts import (
    Alerter,
    EscalationPolicy,
    EscalationSection,
    alert_topic,
    monotonic_to_unix,
)
from policies.anomaly import Anomaly

FAST = {"webhook_timeout_s": 2.0, "webhook_backoff_s": 0.01}


def anomaly(device: str = "dev-1", severity: Any = "critical", **kw: Any) -> Anomaly:
    fields: dict[str, Any] = {"detector": "temp", "value": 91.5, "reason": "t 91.5 above 80",
                              "raised_at": 1_700_000_000.25, **kw}
    return Anomaly(device=device, severity=severity, **fields)


# --------------------------------------------------------------------------- rig


class Hook:
    """A webhook endpoint on 127.0.0.1: records every POST, answers from ``script``
    (then 200), optionally after ``delay`` seconds or once ``gate`` is set."""

    def __init__(self) -> None:
        self.url = ""
        self.bodies: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.script: list[int] = []
        self.delay = 0.0
        self.gate: asyncio.Event | None = None
        self.release = asyncio.Event()  # set at teardown: nothing keeps the server waiting

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        self.bodies.append(json.loads(await request.read()))
        with contextlib.suppress(TimeoutError):
            if self.gate is not None:
                await asyncio.wait_for(self.gate.wait(), 10)
            if self.delay:
                await asyncio.wait_for(self.release.wait(), self.delay)
        return web.Response(status=self.script.pop(0) if self.script else 200)

    @property
    def devices(self) -> list[str]:
        return [b["device"] for b in self.bodies]


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    recorder = Hook()
    app = web.Application()
    app.router.add_post("/alerts", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}/alerts"
    yield recorder
    recorder.release.set()
    if recorder.gate is not None:
        recorder.gate.set()
    await runner.cleanup()


class Rig:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.alerts = Counter("iotgw_alerts", "Alerts sent", ["channel", "severity"],
                              registry=self.registry)
        self.failures = Counter("iotgw_alert_failures", "Alerts not delivered", ["channel"],
                                registry=self.registry)
        self.published: list[tuple[str, bytes]] = []
        self.audited: list[tuple[str, dict[str, Any]]] = []
        self.made: list[Alerter] = []

    def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def audit(self, event: str, **fields: Any) -> None:
        self.audited.append((event, fields))

    def make(self, policies: dict[str, EscalationPolicy] | None = None, **kw: Any) -> Alerter:
        kw.setdefault("publish", self.publish)
        kw.setdefault("audit", self.audit)
        alerter = Alerter(policies or {}, alerts=self.alerts, failures=self.failures,
                          to_unix=lambda t: t, **kw)
        self.made.append(alerter)
        return alerter

    def sent(self, channel: str, severity: str) -> float:
        value = self.registry.get_sample_value(
            "iotgw_alerts_total", {"channel": channel, "severity": severity})
        return value or 0.0

    def failed(self, channel: str) -> float:
        value = self.registry.get_sample_value("iotgw_alert_failures_total",
                                               {"channel": channel})
        return value or 0.0


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    made = Rig()
    yield made
    for alerter in made.made:
        await alerter.close(1.0)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def webhook(url: str, **kw: Any) -> EscalationPolicy:
    return EscalationPolicy(webhook=url, **{**FAST, **kw})


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    yield port


# --------------------------------------------------------------------------- config


def test_policy_defaults_and_section_from_toml() -> None:
    section = msgspec.toml.decode(b"""
[info]
mqtt = false
[emergency]
webhook = "https://ops.example.com/hooks/iot?token=abc"
webhook_attempts = 5
""", type=EscalationSection)
    policies = section.by_severity()
    assert policies["info"] == EscalationPolicy(mqtt=False)
    assert policies["warning"] == policies["critical"] == EscalationPolicy()
    assert EscalationPolicy() == EscalationPolicy(mqtt=True, webhook=None, audit=True,
                                                  webhook_timeout_s=5.0, webhook_attempts=3,
                                                  webhook_backoff_s=0.5)
    emergency = policies["emergency"]
    assert emergency.webhook == "https://ops.example.com/hooks/iot?token=abc"
    assert emergency.webhook_attempts == 5 and emergency.mqtt and emergency.audit


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/x", "scheme must be http or https"),
    ("example.com/hook", "scheme must be http or https"),
    ("http:///path", "no host"),
    ("http://example.com:99999/", "out of range"),
    ("https://[::1/", "Invalid IPv6 URL"),
])
def test_webhook_url_validated_at_decode(url: str, why: str) -> None:
    toml = f'[critical]\nwebhook = "{url}"\n'.encode()
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.toml.decode(toml, type=EscalationSection)
    message = str(err.value)
    assert message.startswith(f"webhook: expected an http(s) URL, got {url!r}")
    assert why in message and message.endswith("at `$.critical`")


@pytest.mark.parametrize("toml", [
    b"[critical]\nsms = true\n",                       # unknown field
    b"[fatal]\nmqtt = true\n",                         # unknown severity
    b"[critical]\nwebhook_attempts = 0\n",
    b"[critical]\nwebhook_timeout_s = 0\n",
])
def test_policy_rejects_unknown_and_out_of_range(toml: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.toml.decode(toml, type=EscalationSection)


# --------------------------------------------------------------------------- topic, payload


def test_topic_escapes_wildcards_separators_and_controls() -> None:
    assert alert_topic("warning", "pump-7") == "alerts/warning/pump-7"
    assert alert_topic("critical", "a/b+#%") == "alerts/critical/a%2Fb%2B%23%25"
    assert alert_topic("info", "nul\x00tab\t") == "alerts/info/nul%00tab%09"
    assert alert_topic("info", "c1\x85") == "alerts/info/c1%C2%85"  # UTF-8 bytes, as in URLs
    assert alert_topic("info", "$SYS café ☃") == "alerts/info/$SYS café ☃"  # valid as is
    # escaping is injective: "%2F" (literal) and "/" stay distinct
    assert alert_topic("info", "%2F") != alert_topic("info", "/")


@given(st.text())
def test_topic_is_one_plain_level_and_reversible(device: str) -> None:
    prefix, severity, level = alert_topic("emergency", device).split("/")
    assert (prefix, severity) == ("alerts", "emergency")
    assert "+" not in level and "#" not in level and "\x00" not in level
    assert unquote(level, errors="strict") == device


async def test_payload_topic_and_audit_with_default_policy(rig: Rig) -> None:
    alerter = rig.make()
    alerter.alert(anomaly("tank/3", "critical"), tenant="acme", tier="gold")
    [(topic, payload)] = rig.published
    assert topic == "alerts/critical/tank%2F3"
    assert json.loads(payload) == {
        "detector": "temp", "device": "tank/3", "severity": "critical", "value": 91.5,
        "reason": "t 91.5 above 80", "raised_at": "2023-11-14T22:13:20.250000Z",
        "escalated": False, "tenant": "acme", "tier": "gold"}  # no node unless given
    assert rig.audited == [("anomaly.alert", {
        "detector": "temp", "device": "tank/3", "severity": "critical", "value": 91.5,
        "reason": "t 91.5 above 80", "escalated": False, "tenant": "acme", "tier": "gold",
        "mqtt": "alerts/critical/tank%2F3", "webhook": None})]
    assert rig.sent("mqtt", "critical") == 1 and rig.sent("audit", "critical") == 1
    assert rig.failed("mqtt") == rig.failed("audit") == rig.failed("webhook") == 0


async def test_node_tenant_tier_nulls_and_escalated(rig: Rig) -> None:
    alerter = rig.make(node="gw-eu-1")
    alerter.alert(anomaly(value=None, escalated=True))
    body = json.loads(rig.published[0][1])
    assert body["node"] == "gw-eu-1" and body["escalated"] is True
    assert body["tenant"] is None and body["tier"] is None and body["value"] is None


def test_monotonic_raised_at_becomes_wall_clock() -> None:
    assert abs(monotonic_to_unix(time.monotonic()) - time.time()) < 1.0


async def test_no_broker_and_no_audit_log(rig: Rig) -> None:
    alerter = rig.make(publish=None, audit=None)
    alerter.alert(anomaly())
    assert rig.published == [] and rig.audited == []
    assert rig.sent("mqtt", "critical") == rig.failed("mqtt") == 0


async def test_failing_publish_and_audit_are_logged_and_counted(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kw: Any) -> None:
        raise OSError("disk full")

    alerter = rig.make(publish=broken, audit=broken)
    with caplog.at_level(logging.ERROR, "iotgw.alerts"):
        alerter.alert(anomaly(severity="emergency"))
    assert rig.failed("mqtt") == 1 and rig.failed("audit") == 1
    assert rig.sent("mqtt", "emergency") == rig.sent("audit", "emergency") == 0
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]
    assert "disk full" in caplog.text


# --------------------------------------------------------------------------- severities


async def test_per_severity_policies(rig: Rig, hook: Hook) -> None:
    alerter = rig.make({"info": EscalationPolicy(mqtt=False),
                        "emergency": webhook(hook.url)})
    alerter.alert(anomaly("d-info", "info"))
    alerter.alert(anomaly("d-warn", "warning"))      # no table: mqtt + audit
    alerter.alert(anomaly("d-emerg", "emergency"))
    assert [t for t, _ in rig.published] == ["alerts/warning/d-warn", "alerts/emergency/d-emerg"]
    assert [f["device"] for _, f in rig.audited] == ["d-info", "d-warn", "d-emerg"]
    assert rig.audited[2][1]["webhook"] == hook.url
    await until(lambda: rig.sent("webhook", "emergency") == 1)
    assert hook.devices == ["d-emerg"]
    assert rig.sent("audit", "info") == 1 and rig.sent("mqtt", "info") == 0


async def test_webhook_only_policy(rig: Rig, hook: Hook) -> None:
    alerter = rig.make({"critical": webhook(hook.url, mqtt=False, audit=False)})
    alerter.alert(anomaly())
    await until(lambda: len(hook.bodies) == 1)
    assert rig.published == [] and rig.audited == []


# --------------------------------------------------------------------------- webhooks


async def test_webhook_posts_the_alert_as_json(rig: Rig, hook: Hook) -> None:
    alerter = rig.make({"critical": webhook(hook.url)})
    alerter.alert(anomaly("tank/3"), tenant="acme", tier="gold")
    await until(lambda: rig.sent("webhook", "critical") == 1)
    assert hook.bodies == [json.loads(rig.published[0][1])]
    assert hook.content_types == ["application/json"]
    assert rig.failed("webhook") == 0


async def test_retry_on_5xx_then_success(rig: Rig, hook: Hook) -> None:
    hook.script = [500, 503]
    alerter = rig.make({"critical": webhook(hook.url, webhook_attempts=3)})
    alerter.alert(anomaly())
    await until(lambda: rig.sent("webhook", "critical") == 1)
    assert len(hook.bodies) == 3 and rig.failed("webhook") == 0


async def test_retry_on_429(rig: Rig, hook: Hook) -> None:
    hook.script = [429]
    alerter = rig.make({"critical": webhook(hook.url)})
    alerter.alert(anomaly())
    await until(lambda: rig.sent("webhook", "critical") == 1)
    assert len(hook.bodies) == 2


@pytest.mark.parametrize("status", [400, 404, 302])
async def test_no_retry_on_4xx_or_redirect(rig: Rig, hook: Hook, status: int,
                                           caplog: pytest.LogCaptureFixture) -> None:
    hook.script = [status]
    alerter = rig.make({"critical": webhook(hook.url, webhook_attempts=3)})
    with caplog.at_level(logging.WARNING, "iotgw.alerts"):
        alerter.alert(anomaly())
        await until(lambda: rig.failed("webhook") == 1)
        await alerter.close(1.0)
    assert len(hook.bodies) == 1 and rig.sent("webhook", "critical") == 0
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert hook.url in record.getMessage() and f"HTTP {status} (attempt 1 of 3)" in caplog.text


async def test_final_failure_after_5xx_attempts(rig: Rig, hook: Hook,
                                                caplog: pytest.LogCaptureFixture) -> None:
    hook.script = [500, 500]
    alerter = rig.make({"critical": webhook(hook.url, webhook_attempts=2)})
    with caplog.at_level(logging.WARNING, "iotgw.alerts"):
        alerter.alert(anomaly())
        await until(lambda: rig.failed("webhook") == 1)
    assert len(hook.bodies) == 2 and "HTTP 500 (attempt 2 of 2)" in caplog.text


async def test_timeout_is_retried_then_counted(rig: Rig, hook: Hook,
                                               caplog: pytest.LogCaptureFixture) -> None:
    hook.delay = 5.0
    alerter = rig.make({"critical": webhook(hook.url, webhook_timeout_s=0.05,
                                            webhook_attempts=2)})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "iotgw.alerts"):
        alerter.alert(anomaly())
        await until(lambda: rig.failed("webhook") == 1)
    assert time.monotonic() - started < 2.0
    assert len(hook.bodies) == 2 and rig.sent("webhook", "critical") == 0
    assert "no response within 0.05 s (attempt 2 of 2)" in caplog.text


async def test_connection_refused_is_retried_then_counted(
        rig: Rig, closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{closed_port}/alerts"
    alerter = rig.make({"critical": webhook(url, webhook_attempts=3)})
    with caplog.at_level(logging.WARNING, "iotgw.alerts"):
        alerter.alert(anomaly())
        await until(lambda: rig.failed("webhook") == 1)
    assert url in caplog.text and "(attempt 3 of 3)" in caplog.text
    assert "Cannot connect" in caplog.text


async def test_logs_leave_credentials_and_query_out(rig: Rig, hook: Hook,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    hook.script = [403]
    secret_url = hook.url.replace("http://", "http://bot:s3cret@") + "?token=t0ken"
    alerter = rig.make({"critical": webhook(secret_url)})
    with caplog.at_level(logging.WARNING, "iotgw.alerts"):
        alerter.alert(anomaly())
        await until(lambda: rig.failed("webhook") == 1)
    assert hook.url in caplog.text
    assert "s3cret" not in caplog.text and "t0ken" not in caplog.text
    assert "s3cret" not in str(rig.audited) and "t0ken" not in str(rig.audited)


async def test_overflow_drops_the_oldest_queued_alert(rig: Rig, hook: Hook,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    hook.gate = asyncio.Event()
    alerter = rig.make({"critical": webhook(hook.url)}, max_pending_webhooks=2,
                       webhook_senders=1)
    alerter.alert(anomaly("d0"))
    await until(lambda: hook.devices == ["d0"])  # in flight, held by the server
    with caplog.at_level(logging.WARNING, "iotgw.alerts"):
        for device in ("d1", "d2", "d3"):
            alerter.alert(anomaly(device))
    assert alerter.pending_webhooks == 2
    assert rig.failed("webhook") == 1
    [record] = caplog.records
    assert record.levelno == logging.WARNING and hook.url in record.getMessage()
    assert "dropped: more than 2 webhook alerts pending" in record.getMessage()
    hook.gate.set()
    await alerter.close(5.0)
    assert hook.devices == ["d0", "d2", "d3"]
    assert rig.sent("webhook", "critical") == 3 and rig.failed("webhook") == 1


async def test_close_delivers_what_is_queued(rig: Rig, hook: Hook) -> None:
    alerter = rig.make({"critical": webhook(hook.url)})
    for i in range(25):
        alerter.alert(anomaly(f"d{i}"))
    await alerter.close(5.0)
    assert sorted(hook.devices) == sorted(f"d{i}" for i in range(25))
    assert rig.sent("webhook", "critical") == 25 and rig.failed("webhook") == 0
    alerter.alert(anomaly("late"))  # closed: mqtt and audit still work, the webhook is counted
    assert rig.failed("webhook") == 1 and rig.published[-1][0] == "alerts/critical/late"
    await alerter.close(1.0)  # idempotent


async def test_close_gives_up_at_its_deadline(rig: Rig, hook: Hook) -> None:
    hook.gate = asyncio.Event()  # the server never answers
    alerter = rig.make({"critical": webhook(hook.url, webhook_timeout_s=30)},
                       webhook_senders=2)
    for i in range(5):
        alerter.alert(anomaly(f"d{i}"))
    await until(lambda: len(hook.bodies) == 2)
    started = time.monotonic()
    await alerter.close(0.1)
    assert time.monotonic() - started < 1.0
    assert rig.failed("webhook") == 5 and rig.sent("webhook", "critical") == 0
    assert alerter.pending_webhooks == 0


async def test_no_webhook_no_background_work(rig: Rig) -> None:
    alerter = rig.make({"critical": EscalationPolicy()})
    alerter.alert(anomaly())
    assert alerter.pending_webhooks == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("alert-webhook")]


def test_webhook_alert_without_a_running_loop_is_counted() -> None:
    rig = Rig()
    alerter = rig.make({"critical": webhook("http://127.0.0.1:9/alerts")})
    alerter.alert(anomaly())
    assert rig.failed("webhook") == 1 and rig.sent("mqtt", "critical") == 1
