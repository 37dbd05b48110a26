"""``bench-broker``: its frame counting, its "no deliveries" verdict, and the command end to
end at a tiny scale (figures are not asserted: the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.bench import _free_port, _wait_port
from gateway.broker_bench import (
    Broker,
    Client,
    FlowLimits,
    Tally,
    _mosquitto_path,
    publish_head,
    run_flow,
)

CLI = [sys.executable, "-m", "gateway.broker_bench"]

# A broker that answers CONNECT, SUBSCRIBE and QoS 1 PUBLISH, and routes nothing.
NON_ROUTING_BROKER = """
import asyncio, sys

class Peer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, b""
    def data_received(self, data):
        buf = self.buf + data
        while len(buf) >= 2 and len(buf) >= 2 + buf[1]:  # short packets only
            first, body, buf = buf[0], buf[2:2 + buf[1]], buf[2 + buf[1]:]
            if first == 0x10:
                self.transport.write(b"\\x20\\x02\\x00\\x00")
            elif first == 0x82:
                self.transport.write(b"\\x90\\x03" + body[:2] + bytes((body[-1],)))
            elif first == 0x32:
                end = 2 + (body[0] << 8 | body[1])
                self.transport.write(b"\\x40\\x02" + body[end:end + 2])
        self.buf = buf

async def main():
    server = await asyncio.get_running_loop().create_server(Peer, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

asyncio.run(main())
"""


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


async def test_subscriber_counts_publishes_split_across_reads_and_acks_qos1() -> None:
    tally = Tally()
    client = Client(b"", tally, subscribes=True)
    transport = _Transport()
    client.connection_made(transport)  # type: ignore[arg-type]
    qos0 = publish_head("bench/x", 200, 0) + b"p" * 200  # a 2-byte remaining length
    qos1 = publish_head("bench/y", 3, 1) + b"\x12\x34" + b"abc"
    stream = b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x01" + qos0 + qos1 + qos0 + b"\xd0\x00"
    for cut in range(0, len(stream), 7):  # 7-byte reads: every header is split somewhere
        client.data_received(stream[cut:cut + 7])
    assert client.ready.done() and client.ready.exception() is None
    assert tally.received == 3
    assert b"".join(transport.written[1:]) == b"\x40\x02\x12\x34"


async def test_a_refused_subscription_fails_the_handshake() -> None:
    client = Client(b"", Tally(), subscribes=True)
    client.connection_made(_Transport())  # type: ignore[arg-type]
    client.data_received(b"\x20\x02\x00\x00\x90\x03\x00\x01\x80")
    with pytest.raises(Exception, match="SUBACK refused: 0x80"):
        client.ready.result()


async def test_a_broker_that_routes_nothing_is_reported_as_no_deliveries(
        tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", NON_ROUTING_BROKER, str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    broker = Broker("non-routing", proc, port, log)
    try:
        await _wait_port(port, proc, "the stand-in broker")
        limits = FlowLimits(seconds=10, delivery_timeout=0.5, payload_size=16)
        for flow, pubs, subs in (("fanout", 1, 3), ("fanin", 4, 1)):
            for qos in (0, 1):
                result = await run_flow(broker, flow, qos, pubs, subs, 120, limits)
                assert result.outcome == "no deliveries", result
                assert result.delivered == 0 and result.expected == 120
                assert result.seconds < 5
    finally:
        broker.stop()


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.skipif(_mosquitto_path() is None, reason="mosquitto missing")
def test_bench_broker_runs_end_to_end_at_a_tiny_scale(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "--connections", "50", "--amqtt-connections", "0", "--fanout-subscribers", "5",
         "--fanin-publishers", "20", "--messages", "2000", "--delivery-timeout", "3",
         "--servers", "mosquitto,iot-gateway", "--json"],
        capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert not report["failures"], report["failures"]
    idle = {r["server"]: r for r in report["idle"]}
    for server in ("mosquitto", "iot-gateway"):
        assert idle[server]["connections"] == 50 and not idle[server]["failed"]
        assert idle[server]["connect_rate"] > 0
        assert idle[server]["rss_before_kb"] > 0 and idle[server]["million_gb"] > 0
    flows = {(f["server"], f["flow"], f["qos"]): f for f in report["flows"]}
    for flow, subscribers in (("fanout", 5), ("fanin", 1)):
        for qos in (0, 1):
            mosquitto = flows[("mosquitto", flow, qos)]
            assert mosquitto["outcome"] == "complete", mosquitto
            assert mosquitto["delivered"] == mosquitto["expected"] == 2000
            assert mosquitto["rate"] > 0 and mosquitto["broker_cpu_us_per_delivery"] >= 0
            assert mosquitto["subscribers"] == subscribers
            gateway = flows[("iot-gateway", flow, qos)]  # routes, or says it does not
            assert gateway["outcome"] in ("complete", "no deliveries", "stalled"), gateway
    assert "fanout QoS 0, iot-gateway / mosquitto" in report["ratios"]
    assert "idle memory per connection, iot-gateway / mosquitto" in report["ratios"]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.skipif(_mosquitto_path() is None, reason="mosquitto missing")
def test_bench_broker_prints_a_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "--only", "idle", "--connections", "20", "--servers", "mosquitto"],
        capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KB/conn" in result.stdout and "mosquitto" in result.stdout
