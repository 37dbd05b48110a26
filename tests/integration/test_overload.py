"""Overload without loss, in-process on real sockets: the write-ahead log refuses explicitly
(MQTT 5: 0x97; MQTT 3.1.1: paused reads), QoS 0 is shed lowest tier first and counted."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import DEFAULT_TOML, RunningGateway
from tests.raw_mqtt import publish_frame

pytestmark = pytest.mark.integration


@pytest.fixture
def small_wal(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory(base=DEFAULT_TOML.replace("max_unretired = 1000000",
                                                     "max_unretired = 50"))


def publish_all(version: int, port: int, count: int, client_id: str) -> tuple[set[int], set[int]]:
    """Publish QoS 1 messages 0..count-1; return (acknowledged, refused) message numbers."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
    client.max_inflight_messages_set(1000)
    answers: list[tuple[int, bool]] = []
    client.on_publish = lambda c, u, mid, rc, props: answers.append((mid, rc.is_failure))
    client.connect("127.0.0.1", port)
    client.loop_start()
    seq_of_mid = {}
    for seq in range(count):  # in bursts, so that the server reads them in several reads
        seq_of_mid[client.publish("telemetry/x", json.dumps({"seq": seq}), qos=1).mid] = seq
        if seq % 50 == 49:
            time.sleep(0.02)
    deadline = time.monotonic() + 30
    while len(answers) < count:
        assert time.monotonic() < deadline, len(answers)
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    acked = {seq_of_mid[mid] for mid, failed in answers if not failed}
    refused = {seq_of_mid[mid] for mid, failed in answers if failed}
    return acked, refused


def test_mqtt5_clients_get_quota_exceeded_and_nothing_acked_is_lost(
        small_wal: RunningGateway) -> None:
    acked, refused = publish_all(paho.MQTTv5, small_wal.mqtt_port, 400, "v5-burst")
    assert refused, "a burst past max_unretired must be refused, not acked and dropped"
    assert acked and acked.isdisjoint(refused)
    small_wal.wait_for(lambda: small_wal.stats()["processed"] >= len(acked))
    assert 'iotgw_messages_refused_total{protocol="mqtt",reason="quota_exceeded"}' in (
        small_wal.metrics())
    # Once the sinks flushed and the log retired its records, new work is taken again.
    small_wal.wait_for(lambda: small_wal.stats()["wal_unretired"] == 0)
    again, refused_again = publish_all(paho.MQTTv5, small_wal.mqtt_port, 20, "v5-later")
    assert len(again) == 20 and not refused_again


def test_mqtt311_clients_are_paused_not_refused(small_wal: RunningGateway) -> None:
    acked, refused = publish_all(paho.MQTTv311, small_wal.mqtt_port, 400, "v311-burst")
    assert not refused and len(acked) == 400  # held back, then all taken
    small_wal.wait_for(lambda: small_wal.stats()["processed"] >= 400)


@pytest.fixture
def shedding(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    base = DEFAULT_TOML.replace("shed_above = 150000", "shed_above = 200")
    base = base.replace("max_queued = 200000", "max_queued = 20000")
    base = base.replace("resume_queued = 100000", "resume_queued = 100")
    base = base.replace("batch_size = 512", "batch_size = 16").replace("slots = 4", "slots = 1")
    return gateway_factory(base=base)


def test_qos0_is_shed_lowest_tier_first_and_counted(shedding: RunningGateway) -> None:
    per_tier = 20_000
    triple = (publish_frame("bulk/x", b"{}") + publish_frame("medical/x", b"{}")
              + publish_frame("std/x", b"{}"))
    frames = triple * per_tier
    with socket.create_connection(("127.0.0.1", shedding.mqtt_port)) as s:
        cid = b"shed"
        connect = (b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid)
        s.sendall(bytes([0x10, len(connect)]) + connect)
        assert s.recv(4)[:1] == b"\x20"
        sender = threading.Thread(target=s.sendall, args=(frames,))
        sender.start()
        sender.join(60)
        s.sendall(b"\xc0\x00")
        assert s.recv(2) == b"\xd0\x00"  # everything before it was read
    shedding.wait_for(lambda: not shedding.stats()["queued"])
    metrics = shedding.metrics()

    def shed(tier: str) -> float:
        key = f'iotgw_messages_shed_total{{reason="overload",tier="{tier}"}} '
        return float(metrics.split(key)[1].split()[0]) if key in metrics else 0.0

    def processed(tier: str) -> float:
        key = f'iotgw_messages_processed_total{{tier="{tier}"}} '
        return float(metrics.split(key)[1].split()[0]) if key in metrics else 0.0

    assert shed("bulk") > 0, metrics
    assert shed("critical") == 0 and processed("critical") == per_tier  # never shed
    # The least urgent go first: whenever standard is shed, so is bulk (give or take the
    # one message a read boundary can split off of the interleaved triples).
    assert shed("bulk") >= shed("standard") - 1
    for tier in ("bulk", "standard"):
        assert processed(tier) + shed(tier) == per_tier  # every message accounted for


def test_a_pure_low_tier_flood_is_pushed_back_not_read_and_shed(
        shedding: RunningGateway) -> None:
    # One client floods bulk QoS 0 only; another sends critical messages meanwhile. Past
    # shed_above the flooder is no longer read (TCP pushes back on it) instead of being read
    # and shed at wire speed; the critical client keeps being read and served.
    per_client = 20_000
    flood = b"".join(publish_frame("bulk/x", b"{}") for _ in range(per_client))
    vitals = b"".join(publish_frame("medical/x", b"{}") for _ in range(2_000))

    def open_client(cid: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", shedding.mqtt_port))
        connect = (b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid)
        s.sendall(bytes([0x10, len(connect)]) + connect)
        assert s.recv(4)[:1] == b"\x20"
        return s

    with open_client(b"flooder") as flooder, open_client(b"monitor") as monitor:
        sender = threading.Thread(target=flooder.sendall, args=(flood,))
        sender.start()
        monitor.sendall(vitals + b"\xc0\x00")
        assert monitor.recv(2) == b"\xd0\x00"  # all of it read while the flood went on
        sender.join(60)
        flooder.sendall(b"\xc0\x00")
        assert flooder.recv(2) == b"\xd0\x00"
    shedding.wait_for(lambda: not shedding.stats()["queued"])
    metrics = shedding.metrics()

    def sample(key: str) -> float:
        line = next((x for x in metrics.splitlines() if x.startswith(key + " ")), None)
        return float(line.split()[-1]) if line is not None else 0.0

    assert sample('iotgw_messages_processed_total{tier="critical"}') == 2_000
    assert sample("iotgw_ingest_pauses_total") > 0  # the flooder was pushed back...
    # ...and what it sent was taken as the backlog allowed: processed, not read and shed.
    assert sample('iotgw_messages_processed_total{tier="bulk"}') == per_client
    assert sample('iotgw_messages_shed_total{reason="overload",tier="bulk"}') == 0
