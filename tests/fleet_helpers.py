"""Shared by the fleet tests: gateways of one region on one machine against the real RabbitMQ,
each with its own state, lake and names, and everything they declared deleted afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.pipeline import STAGES
from tests import fleet_stages
from tests.conftest import RunningGateway, start_gateway

T = TypeVar("T")
HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"
PARTITIONS = 4


def run_async(factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
    """Run a coroutine on a fresh loop in its own thread (the test's thread stays sync)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(factory())
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "timed out"
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def on_loop(gw: RunningGateway, fn: Callable[[], T], timeout: float = 15) -> T:
    async def run() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(run(), gw.loop).result(timeout)


def eventually(predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def metric(gw: RunningGateway, name: str) -> float:
    """The sum of every sample whose line starts with ``name`` (labels included)."""
    total = 0.0
    for line in gw.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Region:
    """One test's region: unique names, its gateways, and cleanup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex[:8]
        self.region = f"r{self.tag}"
        self.exchange = f"test.{self.tag}.fleet"
        self.gateways: list[RunningGateway] = []
        self.nodes: list[str] = []

    def node_queue(self, node: str) -> str:
        return f"test.{self.tag}.node.{node}"

    def work_queues(self) -> list[str]:
        return [f"test.{self.tag}.work.{self.region}.{p}" for p in range(PARTITIONS)]

    def config(self, node: str, *, url: str = URL, slow_s: float = 0.0,
               fleet: dict[str, Any] | None = None, batch_size: int = 20,
               slots: int = 1) -> str:
        base = self.root / node
        settings: dict[str, Any] = {
            "url": url, "exchange": self.exchange,
            "node_queue": f"test.{self.tag}.node.{{node}}",
            "work_queue": f"test.{self.tag}.work.{{region}}.{{partition}}",
            "partitions": PARTITIONS, "overflow_backlog": 60, "take_below": 100,
            "check_interval_s": 0.01, "report_interval_s": 0.05, "announce_interval_s": 1.0,
            "heartbeat_s": 1, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5,
            "connect_timeout_s": 2.0, "confirm_timeout_s": 2.0, "close_timeout_s": 2.0,
            **(fleet or {})}
        fleet_toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()
                               if v is not None)  # None: the default
        return f"""
[gateway]
node_id = "{node}"
region = "{self.region}"
state_dir = {json.dumps(str(base / "state"))}
[mqtt]
listen = "127.0.0.1:0"
[coap]
enabled = false
[auth]
allow_anonymous = true
[admin]
listen = "127.0.0.1:0"
[dispatch]
batch_size = {batch_size}
slots = {slots}
shed_above = 100000
max_queued = 200000
resume_queued = 100000
[audit]
dir = {json.dumps(str(base / "audit"))}
[retry]
dead_letter_dir = {json.dumps(str(base / "dead-letter"))}
[[tiers]]
name = "critical"
max_latency_ms = 100
guaranteed_share = 0.4
shed_qos0 = false
[[tiers]]
name = "standard"
max_latency_ms = 30000
guaranteed_share = 0.2
[[tiers]]
name = "bulk"
max_latency_ms = 60000
guaranteed_share = 0.05
[classify]
default_tier = "standard"
[[classify.rules]]
match = {{ topic = "bulk/#" }}
tier = "bulk"
[[pipelines]]
name = "default"
stages = [{{ type = "decode" }},
          {{ type = "fleet_stamp", node = "{node}", seconds_per_batch = {slow_s} }},
          {{ type = "route", sinks = ["lake"] }}]
[sinks.lake]
type = "jsonl"
options = {{ dir = {json.dumps(str(base / "lake"))} }}
[fleet]
{fleet_toml}
"""

    def start(self, node: str, **options: Any) -> RunningGateway:
        gw = start_gateway(self.config(node, **options))
        self.gateways.append(gw)
        if node not in self.nodes:
            self.nodes.append(node)
        return gw

    def lake(self, node: str) -> list[dict[str, Any]]:
        return [json.loads(line) for p in sorted((self.root / node / "lake").rglob("*.jsonl"))
                for line in p.read_text().split("\n")[:-1] if line]  # whole lines only

    def lakes(self) -> list[dict[str, Any]]:
        return [record for node in self.nodes for record in self.lake(node)]

    def work_depth(self) -> int:
        """Messages ready in the region's work queues (unacknowledged ones not counted)."""
        async def go() -> int:
            connection = await aio_pika.connect(URL)
            total = 0
            async with connection:
                for name in self.work_queues():
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                        declared = await channel.declare_queue(name, passive=True)
                        total += int(declared.declaration_result.message_count or 0)
            return total

        return run_async(go)

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop()

        async def go() -> None:
            connection = await aio_pika.connect(URL)
            async with connection:
                for name in [*self.work_queues(), *map(self.node_queue, self.nodes)]:
                    channel = await connection.channel()
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.queue_delete(name)
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.exchange_delete(self.exchange)

        run_async(go)


@pytest.fixture
def region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Region]:
    monkeypatch.setitem(STAGES, "fleet_stamp", fleet_stages.StampStage)  # type: ignore[arg-type]
    r = Region(tmp_path)
    yield r
    r.close()


class Device:
    """A paho MQTT 3.1.1 client named after its device, on its own network thread."""

    def __init__(self, port: int, device: str) -> None:
        self.device = device
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device,
                                  protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def send(self, topic: str, seqs: range, pause_every: int = 0, pause_s: float = 0.0,
             ) -> list[paho.MQTTMessageInfo]:
        infos = []
        for seq in seqs:
            payload = json.dumps({"seq": seq, "device": self.device}).encode()
            infos.append(self.client.publish(topic, payload, qos=1))
            if pause_every and seq % pause_every == pause_every - 1:
                time.sleep(pause_s)
        return infos

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def flood(port: int, devices: int, per_device: int, topic: str = "t/{device}",
          pause_every: int = 0, pause_s: float = 0.0, timeout: float = 60) -> list[str]:
    """Each device publishes ``per_device`` QoS 1 messages (seq 0..n-1) at once, from its own
    thread; returns the device names once every message was acknowledged (PUBACK)."""
    names = [f"dev-{i}" for i in range(devices)]
    clients = [Device(port, name) for name in names]
    infos: list[paho.MQTTMessageInfo] = []

    def send(client: Device) -> None:
        infos.extend(client.send(topic.format(device=client.device), range(per_device),
                                 pause_every, pause_s))

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "a message was not acknowledged"
    for c in clients:
        c.close()
    return names
