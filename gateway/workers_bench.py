"""``iot-gateway bench-workers``: the same ingest load against ``serve --workers 1`` and
``serve --workers 2``, msg/s for each and the 2/1 ratio.

Theory of operation
-------------------
The gateway runs as ``iot-gateway serve`` (``bench``'s config: four tiers, classification,
null sink; the WAL on, with fsync, so QoS 1 is durable before its PUBACK) with 1 and then 2
workers. The load comes from ``--generators`` processes (spawned, so that the generator is
not one event loop that 2 workers could outrun), each holding its share of the connections:
it pre-encodes its PUBLISH frames (``bench``'s ``_frames``: a tier mix over many devices),
reports ready, waits for the common start, and writes as fast as the gateway reads (QoS 1:
until every PUBACK is back). A run lasts from the start to the moment the gateway has
processed everything sent (its ``/v1/stats``; with workers, the supervisor's sum), so a
gateway that buffers does not look faster than it is. Each run is repeated ``--rounds``
times and the median is reported.

CPU time is read around each run: the gateway's processes (``/proc/<pid>/stat``) and the
generators' own. On a host with fewer cores than workers plus generators, the figures show
where the cores went: a second worker can only be faster when a core is left for it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import click
import uvloop

from gateway.bench import BENCH_CONFIG, PIPELINES, _Client, _frames, _free_port, _get
from gateway.errors import GatewayError

START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    workers: int
    qos: int
    messages: int
    seconds: float
    rate: float
    gateway_cpu_s: float
    generator_cpu_s: float
    worker_share: list[float] = field(default_factory=list)
    """Fraction of the messages each worker received."""

    @property
    def cores_busy(self) -> float:
        return (self.gateway_cpu_s + self.generator_cpu_s) / self.seconds


@dataclass
class Report:
    messages: int
    connections: int
    generators: int
    payload_size: int
    rounds: int
    cpus: int
    runs: list[Run]
    median: dict[str, Run]
    ratios: dict[str, float]


# -- load generation (in the generator processes) ------------------------------------------
def _generate(port: int, first: int, connections: int, per_connection: int, qos: int,
              payload_size: int, ready: Queue[int], start: Event,
              results: Queue[tuple[float, float] | str]) -> None:
    try:
        frames = [_frames(first + i, per_connection, qos, payload_size)
                  for i in range(connections)]
        ready.put(os.getpid())
        if not start.wait(START_TIMEOUT_S):
            results.put("no start signal")
            return
        cpu = time.process_time()

        async def drive() -> float:
            clients = [_Client(first + i, f, len(f) if qos else 0)
                       for i, f in enumerate(frames)]
            began = time.perf_counter()
            await asyncio.gather(*(c.run(port, None) for c in clients))
            return time.perf_counter() - began

        seconds = uvloop.run(drive())
        results.put((seconds, time.process_time() - cpu))
    except Exception as err:
        results.put(f"{type(err).__name__}: {err}")


# -- the gateway under test ---------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _admin_port(workers: int) -> int:
    """A free port with the next ``workers`` ports free too (the workers' admin ports)."""
    for _ in range(100):
        port = _free_port()
        if port + workers > 65535:
            continue
        try:
            for offset in range(1, workers + 1):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise GatewayError("no free run of admin ports found")


class _Gateway:
    def __init__(self, workdir: Path, workers: int) -> None:
        self.workers = workers
        rundir = workdir / f"workers-{workers}"
        rundir.mkdir()
        config = rundir / "bench.toml"
        config.write_text(BENCH_CONFIG + PIPELINES["null"])
        self.mqtt_port, admin_port = _free_port(), _admin_port(workers)
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log = rundir / "serve.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                 "--workers", str(workers), "--mqtt-listen", f"127.0.0.1:{self.mqtt_port}",
                 "--admin-listen", f"127.0.0.1:{admin_port}", "--coap-listen", "127.0.0.1:0"],
                cwd=rundir, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayError(f"serve --workers {self.workers} exited with "
                                   f"{self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                ready = json.loads(_get(f"{self.admin}/readyz")).get("ready")
                if ready and (self.workers == 1
                              or all(w["ready"] for w in self.health()["workers"])):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise GatewayError(f"serve --workers {self.workers} not ready in {START_TIMEOUT_S} s")

    def health(self) -> dict[str, Any]:
        return dict(json.loads(_get(f"{self.admin}/healthz")))

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(_get(f"{self.admin}/v1/stats")))

    def pids(self) -> list[int]:
        health = self.health()
        return [health["pid"], *(w["pid"] for w in health.get("workers", ()) if w["pid"])]

    def cpu_s(self) -> float:
        return sum(_cpu_s(pid) for pid in self.pids())

    def received_by_worker(self) -> list[int]:
        stats = self.stats()
        if "workers" not in stats:
            return [stats["received"]]
        return [part["received"] for _, part in sorted(stats["workers"].items())]

    def wait_processed(self, received_before: int, total: int) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            s = self.stats()
            done = s["processed"] + s["failed"] + s["refused"] + s["shed"]
            if s["received"] - received_before >= total and done >= s["received"] \
                    and not s["queued"]:
                return
            time.sleep(0.01)
        raise GatewayError(f"the gateway did not process {total} messages in "
                           f"{RUN_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _run(gateway: _Gateway, qos: int, messages: int, connections: int, generators: int,
         payload_size: int) -> Run:
    per_connection = max(1, messages // connections)
    total = per_connection * connections
    ctx = multiprocessing.get_context("spawn")
    ready: Queue[int] = ctx.Queue()
    results: Queue[tuple[float, float] | str] = ctx.Queue()
    start = ctx.Event()
    shares = [connections // generators + (g < connections % generators)
              for g in range(generators)]
    procs, first = [], 0
    for share in shares:
        procs.append(ctx.Process(target=_generate, args=(
            gateway.mqtt_port, first, share, per_connection, qos, payload_size, ready, start,
            results), daemon=True))
        first += share
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=START_TIMEOUT_S)
        received_before = gateway.received_by_worker()
        cpu_before = gateway.cpu_s()
        began = time.perf_counter()
        start.set()
        outcomes = [results.get(timeout=RUN_TIMEOUT_S) for _ in procs]
        failed = [o for o in outcomes if isinstance(o, str)]
        if failed:
            raise GatewayError(f"load generator failed: {failed[0]}")
        gateway.wait_processed(sum(received_before), total)
        seconds = time.perf_counter() - began
        gateway_cpu = gateway.cpu_s() - cpu_before
        received = [after - before for after, before in
                    zip(gateway.received_by_worker(), received_before, strict=False)]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    generator_cpu = sum(o[1] for o in outcomes if not isinstance(o, str))
    return Run(gateway.workers, qos, total, seconds, total / seconds, gateway_cpu,
               generator_cpu, [r / max(1, sum(received)) for r in received])


def run_workers_bench(*, messages: int, connections: int, generators: int, payload_size: int,
                      qos_levels: list[int], rounds: int, worker_counts: list[int]) -> Report:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="iotgw-bench-workers-") as tmp:
        for workers in worker_counts:
            gateway = _Gateway(Path(tmp), workers)
            try:
                gateway.wait_ready()
                for qos in qos_levels:
                    for _ in range(rounds):
                        runs.append(_run(gateway, qos, messages, connections, generators,
                                         payload_size))
                        print(f"  {workers} worker(s), QoS {qos}: {runs[-1].rate:,.0f} msg/s",
                              file=sys.stderr, flush=True)
            finally:
                gateway.stop()
            shutil.rmtree(Path(tmp) / f"workers-{workers}", ignore_errors=True)
    median: dict[str, Run] = {}
    for workers in worker_counts:
        for qos in qos_levels:
            same = sorted((r for r in runs if r.workers == workers and r.qos == qos),
                          key=lambda r: r.rate)
            median[f"{workers}/{qos}"] = same[len(same) // 2]
    ratios = {}
    base = worker_counts[0]
    for workers in worker_counts[1:]:
        for qos in qos_levels:
            ratios[f"{workers}/{base} workers, QoS {qos}"] = (
                median[f"{workers}/{qos}"].rate / median[f"{base}/{qos}"].rate)
    return Report(messages, connections, generators, payload_size, rounds,
                  len(os.sched_getaffinity(0)), runs, median, ratios)


def _print(report: Report) -> None:
    print(f"iot-gateway bench-workers: {report.messages:,} messages per run, "
          f"{report.connections} connections from {report.generators} generator processes, "
          f"{report.payload_size}-byte payloads, median of {report.rounds} rounds, "
          f"{report.cpus} CPUs")
    print("gateway: bench's config (4 tiers, null sink), WAL with fsync; a run ends when the "
          "gateway has processed every message")
    print(f"{'workers':>7}{'qos':>4}{'msg/s':>11}{'seconds':>9}{'gateway CPU s':>15}"
          f"{'generator CPU s':>17}{'cores busy':>12}  messages per worker")
    for r in report.median.values():
        shares = " / ".join(f"{s:.0%}" for s in r.worker_share)
        spread = [x.rate for x in report.runs if x.workers == r.workers and x.qos == r.qos]
        print(f"{r.workers:>7}{r.qos:>4}{r.rate:>11,.0f}{r.seconds:>9.2f}{r.gateway_cpu_s:>15.2f}"
              f"{r.generator_cpu_s:>17.2f}{r.cores_busy:>12.2f}  {shares}"
              f"   (runs: {', '.join(f'{x:,.0f}' for x in spread)})")
    for name, ratio in report.ratios.items():
        workers, qos = name.split("/")[0], name.rpartition(" ")[2]
        busiest = max(report.median[f"{workers}/{qos}"].worker_share)
        print(f"ratio {name}: {ratio:.2f} (the busiest worker took {busiest:.0%} of the "
              f"messages: {1 / busiest:.2f} at most, given a core per worker)")
    if report.cpus < max(r.workers for r in report.runs) + report.generators:
        print(f"note: {report.cpus} CPUs shared by the gateway's workers and "
              f"{report.generators} generator processes: a second worker only helps as far as "
              "a core is idle (see cores busy)")


@click.command("bench-workers")
@click.option("--messages", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Messages per run (split over the connections).")
@click.option("--connections", type=click.IntRange(1), default=64, show_default=True,
              help="MQTT connections; the kernel spreads them over the workers.")
@click.option("--generators", type=click.IntRange(1), default=2, show_default=True,
              help="Load-generator processes (the connections are split over them).")
@click.option("--payload-size", type=click.IntRange(0), default=64, show_default=True)
@click.option("--qos", "qos_levels", default="0,1", show_default=True,
              help="Comma-separated QoS levels to run (0, 1).")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Runs per worker count and QoS level; the median is reported.")
@click.option("--workers", "worker_counts", default="1,2", show_default=True,
              help="Comma-separated worker counts; ratios are against the first.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_workers_command(messages: int, connections: int, generators: int,
                          payload_size: int, qos_levels: str, rounds: int,
                          worker_counts: str, as_json: bool) -> None:
    """serve --workers 1 against --workers 2: the same ingest load, msg/s and the ratio."""
    try:
        levels = [int(q) for q in qos_levels.split(",") if q.strip()]
        counts = [int(w) for w in worker_counts.split(",") if w.strip()]
    except ValueError:
        raise click.UsageError("--qos and --workers take comma-separated numbers") from None
    if not levels or any(q not in (0, 1) for q in levels):
        raise click.UsageError("--qos takes levels 0 and 1")
    if len(counts) < 2 or any(w < 1 for w in counts):
        raise click.UsageError("--workers takes at least two counts of 1 or more, e.g. 1,2")
    if connections < generators:
        raise click.UsageError("--connections must be at least --generators")
    try:
        report = run_workers_bench(messages=messages, connections=connections,
                                   generators=generators, payload_size=payload_size,
                                   qos_levels=levels, rounds=rounds, worker_counts=counts)
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        data = asdict(report)
        click.echo(json.dumps(data, indent=2))
    else:
        _print(report)
