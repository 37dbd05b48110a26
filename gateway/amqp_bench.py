"""``iot-gateway bench-amqp``: the gateway's AMQP ingest against a bare aio-pika consumer.

Theory of operation
-------------------
One RabbitMQ, one queue (classic, durable, ``x-max-priority`` 9, as the gateway declares its
ingest queue), filled with N persistent messages (JSON payloads, a ``device`` header naming one
of 100 devices) through a confirm-mode publisher before each side runs, so both drain the same
queue holding the same messages, one after the other, in the same run:

* bare: an aio-pika consumer that awaits ``message.ack()`` for each message and does nothing
  else (the usual way to consume with aio-pika), at the same prefetch;
* gateway: a real ``Gateway`` (the built-in config: classification rules, anomaly triage,
  the decode/validate/enrich/route pipeline, the JSON-lines lake, the audit log, and the
  write-ahead log with one fsync per group commit) in a thread with its own uvloop, consuming
  with ``start_amqp``: each delivery is acknowledged only after its durable append, by batch
  (``basic.ack`` with ``multiple=True``).

Each side's time runs from its connect to its last ack; msg/s = N / that time. CPU is this
process's (all threads) over the same span, per message. The ratio is gateway / bare (target
≥ 1). The machine's other load and RabbitMQ share the cores: compare within one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.errors import GatewayError

if TYPE_CHECKING:  # imported when the bench runs: the CLI stays quick to start
    import aio_pika

    from gateway.app import Gateway

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEVICES = 100
MAX_PRIORITY = 9
GIL_SWITCH_INTERVAL_S = 0.0005  # what ``Gateway.run`` sets for the daemon


@dataclass
class SideResult:
    name: str
    messages: int
    seconds: float
    rate: float
    cpu_us_per_message: float
    settle_frames: int
    processed_seconds: float | None = None
    """Gateway: until the pipeline had processed all N (after the last ack)."""


@dataclass
class AmqpBenchReport:
    messages: int
    payload_size: int
    prefetch: int
    fsync: bool
    cpus: int
    bare: SideResult
    gateway: SideResult

    @property
    def ratio(self) -> float:
        return self.gateway.rate / self.bare.rate if self.bare.rate else float("inf")


def _payload(seq: int, size: int) -> bytes:
    head = json.dumps({"seq": seq, "temperature": 21.5, "pad": ""}).encode()
    return head[:-2] + b"x" * max(0, size - len(head)) + head[-2:]


async def _fill(url: str, queue: str, n: int, payload_size: int) -> None:
    """Declare ``queue`` as the gateway does, and put N persistent messages in it."""
    import aio_pika
    from prometheus_client import CollectorRegistry

    from protocols.amqp.link import AmqpMetrics
    from protocols.amqp.publisher import ConfirmedPublisher, Outgoing
    from protocols.amqp.wire import encode_properties

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True,
                                    arguments={"x-max-priority": MAX_PRIORITY})
    publisher = ConfirmedPublisher("bench-fill", url, "", AmqpMetrics(CollectorRegistry()),
                                   declare=False, window=2000, max_buffered=n + 1)
    publisher.put([Outgoing(queue, _payload(i, payload_size), encode_properties(
        delivery_mode=2, message_id=f"bench-{i}", content_type="application/json",
        headers={"device": f"bench-{i % DEVICES}"})) for i in range(n)])
    await publisher.close(timeout=600)


async def _ready_messages(url: str, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def _delete(url: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


async def _bare(url: str, queue: str, n: int, prefetch: int, timeout: float) -> SideResult:
    import aio_pika

    started, cpu = time.perf_counter(), time.process_time()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        declared = await channel.declare_queue(queue, passive=True)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count == n:
                done.set()

        await declared.consume(on_message)
        async with asyncio.timeout(timeout):
            await done.wait()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        await connection.close()
    return SideResult("bare aio-pika consumer", n, seconds, n / seconds, cpu / n * 1e6, n)


class _InProcessGateway:
    """A Gateway on the built-in config, serving in a thread with its own uvloop."""

    def __init__(self, workdir: Path, fsync: bool) -> None:
        from gateway.config import default_config_path, parse_config

        text = default_config_path().read_text()
        for key, sub in (("lake", "lake"), ("state", "state"), ("audit", "audit"),
                         ("dead-letter", "dead-letter")):
            text = text.replace(f'"./data/{key}"', json.dumps(str(workdir / sub)))
        text = text.replace('log_level = "INFO"', 'log_level = "WARNING"')
        if not fsync:
            text = text.replace("fsync = true ", "fsync = false")
        self.config = parse_config(text, "built-in config (bench)")
        self.gateway: Gateway | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise GatewayError("the gateway did not start within 30 s")
        if self._error is not None:
            raise GatewayError(f"the gateway did not start: {self._error}")

    def _run(self) -> None:
        import uvloop

        from gateway.app import Gateway

        async def main() -> None:
            gateway = Gateway(self.config, mqtt_listen="127.0.0.1:0",
                              admin_listen="127.0.0.1:0", shutdown_timeout=30)
            self.gateway, self.loop = gateway, asyncio.get_running_loop()
            try:
                await gateway.start()
            finally:
                self._ready.set()
            await gateway.stopped()
            await gateway.shutdown()

        try:
            uvloop.run(main())
        except BaseException as err:
            self._error = err
            self._ready.set()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self.gateway is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.gateway.request_stop, "bench done")
            self._thread.join(60)


def _gateway_side(url: str, queue: str, n: int, prefetch: int, fsync: bool, workdir: Path,
                  timeout: float) -> SideResult:
    from protocols.amqp.config import AmqpSection, IngestQueue
    from protocols.amqp.consumer import AmqpConsumer
    from protocols.amqp.service import AmqpHandle, start_amqp

    served = _InProcessGateway(workdir, fsync)
    served.start()
    gateway = served.gateway
    assert gateway is not None
    section = AmqpSection(url=url, queues=[IngestQueue(name=queue, max_priority=MAX_PRIORITY)],
                          prefetch=prefetch)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    handle: AmqpHandle | None = None
    try:
        started, cpu = time.perf_counter(), time.process_time()
        handle = served.call(start_amqp(section, gateway.ingest, gateway.metrics,
                                        name="iot-gateway bench"))
        consumer = handle.consumer
        assert isinstance(consumer, AmqpConsumer)
        deadline = started + timeout
        while consumer.acked < n:
            if time.perf_counter() > deadline:
                raise GatewayError(f"gateway: {consumer.acked:,} of {n:,} acked within "
                                   f"{timeout:g} s")
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        while gateway.workers.processed < n and time.perf_counter() < deadline:
            time.sleep(0.002)
        processed = time.perf_counter() - started
        frames = consumer.settle_frames
    finally:
        sys.setswitchinterval(previous)
        if handle is not None:
            with contextlib.suppress(Exception):
                served.call(handle.close())
        served.stop()
    return SideResult("gateway (full work, durable append)", n, seconds, n / seconds,
                      cpu / n * 1e6, frames, processed)


def run_amqp_bench(url: str, messages: int, payload_size: int, prefetch: int | None,
                   fsync: bool, timeout: float = 300.0) -> AmqpBenchReport:
    import aio_pika
    import uvloop

    from gateway.config import default_config_path, parse_config
    from protocols.amqp.config import AmqpSection
    from protocols.amqp.errors import AmqpError
    from protocols.amqp.link import LINK_ERRORS
    from protocols.amqp.service import prefetch_for

    workdir = Path(tempfile.mkdtemp(prefix="iotgw-amqp-bench-"))
    queue = f"iotgw.bench.{uuid.uuid4().hex[:10]}"
    defaults = parse_config(default_config_path().read_text()).dispatch
    window = prefetch or prefetch_for(AmqpSection(), defaults.batch_size, defaults.slots)
    try:
        uvloop.run(_fill(url, queue, messages, payload_size))
        bare = uvloop.run(_bare(url, queue, messages, window, timeout))
        if uvloop.run(_ready_messages(url, queue)):
            raise GatewayError("bare consumer: the queue is not empty after its run")
        uvloop.run(_fill(url, queue, messages, payload_size))
        gateway = _gateway_side(url, queue, messages, window, fsync, workdir, timeout)
        left = uvloop.run(_ready_messages(url, queue))
        if left:
            raise GatewayError(f"gateway: {left} messages left in the queue after its run")
    except (*LINK_ERRORS, AmqpError, aio_pika.exceptions.AMQPError) as err:
        raise GatewayError(f"RabbitMQ at {url}: {type(err).__name__}: {err}") from None
    finally:
        with contextlib.suppress(*LINK_ERRORS, aio_pika.exceptions.AMQPError):
            uvloop.run(_delete(url, queue))
        shutil.rmtree(workdir, ignore_errors=True)
    return AmqpBenchReport(messages, payload_size, window, fsync, os.cpu_count() or 1, bare,
                           gateway)


def _print(report: AmqpBenchReport) -> None:
    print(f"iot-gateway bench-amqp: {report.messages:,} persistent messages of "
          f"{report.payload_size} B from one classic queue (x-max-priority {MAX_PRIORITY}), "
          f"prefetch {report.prefetch:,}, {report.cpus} CPUs")
    print(f"gateway: built-in config (classification, triage, pipeline to the JSON-lines "
          f"lake, audit), WAL {'with' if report.fsync else 'WITHOUT'} fsync")
    print()
    print(f"{'consumer':<38}{'msg/s':>10}{'seconds':>9}{'CPU µs/msg':>12}{'ack frames':>12}"
          f"{'msgs/frame':>12}")
    for side in (report.bare, report.gateway):
        print(f"{side.name:<38}{side.rate:>10,.0f}{side.seconds:>9.2f}"
              f"{side.cpu_us_per_message:>12.1f}{side.settle_frames:>12,}"
              f"{side.messages / max(1, side.settle_frames):>12,.1f}")
    if report.gateway.processed_seconds is not None:
        print(f"(gateway: all {report.messages:,} through the pipeline after "
              f"{report.gateway.processed_seconds:.2f} s)")
    print()
    print(f"ratio gateway / bare: {report.ratio:.2f} (target ≥ 1)")


@click.command("bench-amqp")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="RabbitMQ to use.")
@click.option("--messages", type=click.IntRange(1), default=50_000, show_default=True)
@click.option("--payload-size", type=click.IntRange(0), default=64, show_default=True)
@click.option("--prefetch", type=click.IntRange(1, 65535), default=None,
              help="For both consumers (default: the gateway's, batch_size × slots).")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="The gateway's WAL fsyncs each group commit (its real setting).")
@click.option("--min-ratio", type=float, default=None,
              help="Exit with status 1 when gateway / bare is below this.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_amqp_command(url: str, messages: int, payload_size: int, prefetch: int | None,
                       fsync: bool, min_ratio: float | None, as_json: bool) -> None:
    """AMQP ingest: the gateway (full work, acked after the durable append) against a bare
    aio-pika consumer acking each message, the same pre-filled queue, same run."""
    try:
        report = run_amqp_bench(url, messages, payload_size, prefetch, fsync)
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps({**asdict(report), "ratio": report.ratio}, indent=2))
    else:
        _print(report)
    if min_ratio is not None and report.ratio < min_ratio:
        raise click.ClickException(f"ratio {report.ratio:.2f} is below {min_ratio:g}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        bench_amqp_command()
