"""The daemon's own duties on real sockets: admin API, keepalive and connect timeouts,
back-pressure under a flood, graceful shutdown."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import DEFAULT_TOML, RunningGateway
from tests.raw_mqtt import connect_frame, publish_frame

pytestmark = pytest.mark.integration


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def open_socket(port: int, opened: list[socket.socket]) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    opened.append(s)
    return s


def closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    s.settimeout(seconds)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return False, data
    return True, data


def test_admin_endpoints(gateway: RunningGateway) -> None:
    status, body = gateway.get("/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["listeners"]["mqtt"]["port"] == gateway.mqtt_port
    assert gateway.get("/readyz")[0] == 200
    metrics = gateway.metrics()
    for name in ("iotgw_messages_received_total", "iotgw_messages_processed_total",
                 "iotgw_messages_shed_total", "iotgw_protocol_errors_total",
                 "iotgw_connections", "iotgw_queue_depth", "iotgw_processing_latency_seconds"):
        assert f"# TYPE {name.removesuffix('_total')}" in metrics, name
    assert 'iotgw_queue_depth{lane="critical"} 0.0' in metrics
    assert gateway.get("/nope")[0] == 404


def test_latency_histogram_resolves_a_millisecond(gateway: RunningGateway,
                                                  sockets: list[socket.socket]) -> None:
    s = open_socket(gateway.mqtt_port, sockets)
    s.sendall(connect_frame("lat", 30) + publish_frame("medical/x", b"{}"))
    gateway.wait_processed(1)
    pattern = r'latency_seconds_bucket\{le="([0-9.e-]+)",tier="critical"'
    buckets = [float(le) for le in re.findall(pattern, gateway.metrics())]
    assert sum(1 for b in buckets if b <= 0.002) >= 5  # several buckets at or below 2 ms


def test_silent_client_is_closed_after_one_and_a_half_keepalives(
        gateway: RunningGateway, sockets: list[socket.socket]) -> None:
    s = open_socket(gateway.mqtt_port, sockets)
    s.sendall(connect_frame("sleepy", keepalive=1, version=5))
    assert s.recv(64)[:1] == b"\x20"
    started = time.monotonic()
    closed, data = closed_within(s, 5)
    elapsed = time.monotonic() - started
    assert closed and 1.5 <= elapsed < 3.0, elapsed
    assert data == b"\xe0\x01\x8d" or data.startswith(b"\xe0\x02\x8d")  # keepalive timeout
    assert 'reason="keepalive_timeout"} 1.0' in gateway.metrics()


def test_a_client_that_pings_stays_connected(gateway: RunningGateway,
                                             sockets: list[socket.socket]) -> None:
    s = open_socket(gateway.mqtt_port, sockets)
    s.sendall(connect_frame("lively", keepalive=1))
    assert s.recv(4)[:1] == b"\x20"
    for _ in range(6):
        time.sleep(0.5)
        s.sendall(b"\xc0\x00")
        assert s.recv(2) == b"\xd0\x00"


@pytest.fixture
def quick_timeouts(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory(base=DEFAULT_TOML.replace("connect_timeout_s = 10.0",
                                                     "connect_timeout_s = 0.5"))


def test_connection_without_connect_is_closed(quick_timeouts: RunningGateway,
                                              sockets: list[socket.socket]) -> None:
    s = open_socket(quick_timeouts.mqtt_port, sockets)
    closed, _ = closed_within(s, 5)
    assert closed
    assert 'reason="connect_timeout"} 1.0' in quick_timeouts.metrics()


@pytest.fixture
def tiny_queue(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    base = DEFAULT_TOML.replace("max_queued = 200000", "max_queued = 2000")
    base = base.replace("shed_above = 150000", "shed_above = 2000")
    base = base.replace("resume_queued = 100000", "resume_queued = 1000")
    base = base.replace("batch_size = 512", "batch_size = 64").replace("slots = 4", "slots = 1")
    return gateway_factory(base=base)


def test_a_flood_pauses_reading_instead_of_queueing_without_bound(
        tiny_queue: RunningGateway, sockets: list[socket.socket]) -> None:
    total = 100_000
    frames = b"".join(publish_frame(f"flood/{i % 50}", b'{"v": %6d}' % i) for i in range(total))
    frame_len = len(frames) // total
    peak = 0
    s = open_socket(tiny_queue.mqtt_port, sockets)
    s.sendall(connect_frame("flooder", 60))
    assert s.recv(4)[:1] == b"\x20"
    s.sendall(frames)
    while tiny_queue.stats()["processed"] < total:
        peak = max(peak, tiny_queue.stats()["queued"])
        time.sleep(0.005)
    # The limit, plus at most what one read (uvloop reads up to 256 KiB) carried past it.
    assert peak <= 2000 + 256 * 1024 // frame_len, peak
    metrics = tiny_queue.metrics()
    assert "iotgw_ingest_pauses_total" in metrics
    assert "iotgw_ingest_pauses_total 0.0" not in metrics
    assert "iotgw_ingest_paused 0.0" in metrics  # and resumed once the backlog drained
