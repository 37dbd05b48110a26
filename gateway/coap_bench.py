"""``iot-gateway bench-coap``: CoAP confirmable ingest, the gateway against a bare aiocoap
server that answers 2.04 and does nothing, same load, same run.

Theory of operation
-------------------
Each server runs as its own process on a free loopback UDP port, one after the other:

* the peer: ``python -m gateway.coap_bench bare``, aiocoap on uvloop, one resource whose
  POST returns 2.04 Changed;
* the gateway with its full work: the write-ahead log with fsync (2.04 only after the
  group commit), classification, dispatch and the built-in pipeline (decode, validate,
  enrich, JSON-lines lake). It is ``iot-gateway serve --coap-listen`` when ``serve`` has
  that option, else ``python -m gateway.coap_bench gateway``, which runs the same
  ``Gateway`` with ``start_coap`` in-process (for as long as ``serve`` is not wired).

The load comes from this process: a raw UDP CoAP client (``_RawLoad``) with many sockets,
each keeping a window of CON POSTs to ``/t/<device>`` in flight, handling piggybacked and
separate responses (it ACKs a CON response) and resending what gets no answer (same message
id, so the server's deduplication answers). Message ids are per socket, and a socket
sends fewer than 65536 requests, so no id is reused within the exchange lifetime.
``--client aiocoap`` drives the same load through aiocoap client contexts instead: its
client costs more CPU per request than the servers do, so it measures itself.

A run sends ``--warmup`` requests, waits for them (and, for the gateway, until they are
processed), then sends ``--requests`` and times them: from the first send until the last
2.04 and, for the gateway, until its processed count has caught up, so that work queued
behind the acks is paid for. The servers' CPU time (/proc) and the load generator's are
reported: on shared cores, a load generator at ~100 % CPU means it set the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import click
import uvloop

from gateway.bench import BENCH_CONFIG, PIPELINES, _free_port, _get, _wait_port
from gateway.errors import GatewayError

HOST = "127.0.0.1"
TARGET_RATIO = 0.8
RESEND_AFTER_S = 2.0
"""A request unanswered this long is sent again (same message id)."""
GIVE_UP_S = 30.0
"""A run whose answers stop for this long is reported as stalled."""
MAX_PER_SOCKET = 60_000
"""Requests per socket per run: below 65536, so message ids are never reused."""

CON, NON, ACK, RST = 0, 1, 2, 3
POST = 0x02
CHANGED = 0x44  # 2.04
SERVICE_UNAVAILABLE = 0xA3  # 5.03
URI_PATH, CONTENT_FORMAT = 11, 12
JSON_FORMAT = 50


@dataclass
class Run:
    server: str
    client: str
    requests: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    """All of the server's threads (the gateway's: also the WAL commit thread)."""
    loop_cpu_s: float
    """The server's main thread, which runs the event loop: what saturates first."""
    client_cpu_s: float
    resent: int = 0
    separate: int = 0
    """Answers that came as separate responses (after an empty ACK: slow, 3 datagrams)."""
    refused: int = 0
    failed: int = 0
    processed: int | None = None
    notes: list[str] = field(default_factory=list)


# -- the load -------------------------------------------------------------------------------
def _option(delta: int, value: bytes) -> bytes:
    """One CoAP option (RFC 7252, 3.1: extended deltas and lengths)."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, struct.pack("!H", n - 269)

    d, dx = nibble(delta)
    n, nx = nibble(len(value))
    return bytes([d << 4 | n]) + dx + nx + value


def encode_post(mid: int, token: bytes, path: tuple[str, ...], payload: bytes,
                content_format: int = JSON_FORMAT, kind: int = CON) -> bytes:
    """A POST (CON, or NON) with Uri-Path options, Content-Format and a payload."""
    options = b""
    number = 0
    for segment in path:
        options += _option(URI_PATH - number, segment.encode())
        number = URI_PATH
    options += _option(CONTENT_FORMAT - number, bytes([content_format]))
    header = struct.pack("!BBH", 0x40 | (kind << 4) | len(token), POST, mid)
    return header + token + options + b"\xff" + payload


class _RawSocket(asyncio.DatagramProtocol):
    """One client socket: ``window`` requests in flight, matched by token."""

    def __init__(self, load: _RawLoad, index: int) -> None:
        self.load = load
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = random.randrange(0x10000)
        self.sequence = 0
        # token → (first send, last send, datagram, separate response awaited)
        self.outstanding: dict[bytes, list[Any]] = {}
        self.devices = [("t", f"dev-{index}-{k}") for k in range(10)]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is not one

    def send_next(self) -> None:
        load = self.load
        if load.to_send <= 0:
            return
        load.to_send -= 1
        self.sequence += 1
        self.mid = (self.mid + 1) & 0xFFFF
        token = struct.pack("!I", self.sequence)
        payload = load.payload_prefix + str(self.sequence).encode() + b"}"
        datagram = encode_post(self.mid, token, self.devices[self.sequence % 10], payload)
        now = time.perf_counter()
        self.outstanding[token] = [now, now, datagram, False]
        assert self.transport is not None
        self.transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4:
            return
        first, code, mid = struct.unpack_from("!BBH", data)
        kind, token = (first >> 4) & 3, data[4:4 + (first & 0x0F)]
        assert self.transport is not None
        if kind == CON:  # a separate response: acknowledge it
            self.transport.sendto(struct.pack("!BBH", 0x40 | (ACK << 4), 0, mid))
        entry = self.outstanding.get(token)
        if entry is None:
            return  # a duplicate answer
        if kind == ACK and code == 0:  # empty ACK: the answer comes separately
            if not entry[3]:
                entry[3] = True
                self.load.separate += 1
            return
        del self.outstanding[token]
        self.load.finished(time.perf_counter() - entry[0], code)
        self.send_next()

    def resend_overdue(self, now: float) -> None:
        assert self.transport is not None
        for entry in self.outstanding.values():
            if not entry[3] and now - entry[1] > RESEND_AFTER_S:
                entry[1] = now
                self.load.resent += 1
                self.transport.sendto(entry[2])


class _Load:
    """What a load generator counts."""

    def __init__(self, payload_size: int) -> None:
        pad = "x" * max(0, payload_size - 30)
        self.payload_prefix = f'{{"t":21.5,"pad":"{pad}","seq":'.encode()
        self.latencies: list[float] = []
        self.to_send = 0
        self.done = 0
        self.expected = 0
        self.resent = 0
        self.separate = 0
        self.refused = 0
        self.failed = 0
        self.last_answer = time.perf_counter()
        self.all_done = asyncio.Event()

    def finished(self, latency: float, code: int) -> None:
        self.last_answer = time.perf_counter()
        self.latencies.append(latency)
        if code == SERVICE_UNAVAILABLE:
            self.refused += 1
        elif code != CHANGED:
            self.failed += 1
        self.done += 1
        if self.done >= self.expected:
            self.all_done.set()

    def reset(self, count: int) -> None:
        self.latencies, self.done, self.expected = [], 0, count
        self.to_send = count
        self.resent = self.separate = self.refused = self.failed = 0
        self.last_answer = time.perf_counter()
        self.all_done = asyncio.Event()

    async def wait(self) -> None:
        while not self.all_done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_done.wait(), 0.5)
            self.tick()
            if time.perf_counter() - self.last_answer > GIVE_UP_S:
                raise GatewayError(f"no answer for {GIVE_UP_S:.0f} s: {self.done} of "
                                   f"{self.expected} requests answered")

    def tick(self) -> None:
        pass


class _RawLoad(_Load):
    def __init__(self, port: int, sockets: int, window: int, payload_size: int) -> None:
        super().__init__(payload_size)
        self.port = port
        self.window = window
        self.sockets: list[_RawSocket] = []
        self.count = sockets

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.count):
            transport, proto = await loop.create_datagram_endpoint(
                functools.partial(_RawSocket, self, i), remote_addr=(HOST, self.port))
            proto.transport = transport  # uvloop calls connection_made a turn later
            self.sockets.append(proto)

    async def run(self, count: int) -> float:
        self.reset(count)
        start = time.perf_counter()
        for _ in range(self.window):
            for sock in self.sockets:
                sock.send_next()
        await self.wait()
        return time.perf_counter() - start

    def tick(self) -> None:
        now = time.perf_counter()
        for sock in self.sockets:
            sock.resend_overdue(now)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.transport is not None:
                sock.transport.close()


class _AiocoapLoad(_Load):
    """The same load through aiocoap's client: ``sockets`` contexts × ``window`` tasks."""

    def __init__(self, port: int, sockets: int, window: int, payload_size: int) -> None:
        super().__init__(payload_size)
        self.port = port
        self.window = window
        self.count = sockets
        self.contexts: list[Any] = []

    async def open(self) -> None:
        import aiocoap  # type: ignore[import-untyped]

        for _ in range(self.count):
            self.contexts.append(
                await aiocoap.Context.create_client_context(transports=["udp6"]))

    async def _worker(self, context: Any, device: str) -> None:
        import aiocoap

        uri = f"coap://{HOST}:{self.port}/t/{device}"
        sequence = 0
        while self.to_send > 0:
            self.to_send -= 1
            sequence += 1
            started = time.perf_counter()
            message = aiocoap.Message(code=aiocoap.POST, uri=uri, content_format=JSON_FORMAT,
                                      payload=self.payload_prefix + str(sequence).encode()
                                      + b"}")
            response = await context.request(message).response
            self.finished(time.perf_counter() - started, int(response.code))

    async def run(self, count: int) -> float:
        self.reset(count)
        start = time.perf_counter()
        workers = [asyncio.ensure_future(self._worker(context, f"dev-{i}-{k}"))
                   for i, context in enumerate(self.contexts) for k in range(self.window)]
        try:
            await self.wait()
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return time.perf_counter() - start

    def close(self) -> None:
        pass

    async def shutdown(self) -> None:
        for context in self.contexts:
            await context.shutdown()


# -- the servers ------------------------------------------------------------------------------
def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time of a process (or of one of its threads) from /proc."""
    where = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(where).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_has_coap_listen() -> bool:
    from gateway.cli import serve

    return any(param.name == "coap_listen" for param in serve.params)


class _Server:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log: Path,
                 admin: str | None) -> None:
        self.name, self.proc, self.port, self.log, self.admin = name, proc, port, log, admin

    def stats(self) -> dict[str, Any]:
        assert self.admin is not None
        answer: dict[str, Any] = json.loads(_get(f"{self.admin}/v1/stats"))
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-15:])
        except OSError:
            return ""


async def _coap_ping(port: int, proc: subprocess.Popen[bytes], what: str,
                     seconds: float = 30.0) -> None:
    """Wait until the server answers a CoAP ping (an empty CON; the answer is a RST)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((HOST, port))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GatewayError(f"{what} exited with {proc.returncode} before serving CoAP")
            sock.send(struct.pack("!BBH", 0x40, 0, 0x1234))
            try:
                await asyncio.wait_for(loop.sock_recv(sock, 64), 0.2)
                return
            except (TimeoutError, ConnectionRefusedError):
                await asyncio.sleep(0.05)
    raise GatewayError(f"{what} does not answer CoAP on port {port}")


async def _start(name: str, workdir: Path, pipeline: str) -> _Server:
    rundir = workdir / name
    rundir.mkdir()
    port = _free_port()
    log = rundir / "server.log"
    admin = None
    if name == "bare":
        argv = [sys.executable, "-m", "gateway.coap_bench", "bare", f"{HOST}:{port}"]
    else:
        (rundir / "gateway.toml").write_text(BENCH_CONFIG + PIPELINES[pipeline])
        admin_port = _free_port()
        admin = f"http://{HOST}:{admin_port}"
        common = ["--config", "gateway.toml", "--admin-listen", f"{HOST}:{admin_port}",
                  "--coap-listen", f"{HOST}:{port}"]
        if _serve_has_coap_listen():
            argv = [sys.executable, "-m", "gateway.cli", "serve", "--mqtt-listen",
                    f"{HOST}:0", *common]
        else:
            argv = [sys.executable, "-m", "gateway.coap_bench", "gateway", *common]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=rundir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = _Server(name, proc, port, log, admin)
    try:
        if admin is not None:
            await _wait_port(int(admin.rsplit(":", 1)[1]), proc, name, seconds=30)
        await _coap_ping(port, proc, name)
    except BaseException:
        server.stop()
        raise
    return server


async def _wait_processed(server: _Server, count: int, seconds: float = 60.0) -> int:
    deadline = time.monotonic() + seconds
    while True:
        processed = int(server.stats()["processed"])
        if processed >= count or time.monotonic() > deadline:
            return processed
        await asyncio.sleep(0.01)


@dataclass
class BenchArgs:
    requests: int = 20_000
    warmup: int = 2_000
    sockets: int = 128
    window: int = 1
    rounds: int = 2
    payload_size: int = 64
    client: str = "raw"
    pipeline: str = "full"
    peer: bool = True


class _Target:
    """A server and the load generator aimed at it, kept across rounds."""

    def __init__(self, server: _Server, load: _RawLoad | _AiocoapLoad) -> None:
        self.server = server
        self.load = load
        self.sent = 0

    @classmethod
    async def start(cls, name: str, args: BenchArgs, workdir: Path) -> _Target:
        server = await _start(name, workdir, args.pipeline)
        kind = _RawLoad if args.client == "raw" else _AiocoapLoad
        target = cls(server, kind(server.port, args.sockets, args.window, args.payload_size))
        try:
            await target.load.open()
            await target.run(args.warmup)
        except BaseException:
            await target.stop()
            raise
        return target

    async def run(self, count: int) -> int | None:
        """Send ``count`` requests; for the gateway, wait until they are processed too."""
        await self.load.run(count)
        self.sent += count
        if self.server.admin is None:
            return None
        return await _wait_processed(self.server, self.sent) - (self.sent - count)

    async def measure(self, args: BenchArgs) -> Run:
        server, load = self.server, self.load
        cpu_before = _cpu_seconds(server.proc.pid)
        loop_before = _cpu_seconds(server.proc.pid, server.proc.pid)
        client_before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        try:
            processed = await self.run(args.requests)  # the work behind the acks counts
        except GatewayError as err:
            raise GatewayError(f"{server.name}: {err}\n{server.log_tail()}") from None
        seconds = time.perf_counter() - start
        client_after = resource.getrusage(resource.RUSAGE_SELF)
        latencies = sorted(load.latencies)
        run = Run(
            server=server.name, client=args.client, requests=args.requests, seconds=seconds,
            rate=args.requests / seconds,
            p50_ms=latencies[len(latencies) // 2] * 1000,
            p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
            server_cpu_s=_cpu_seconds(server.proc.pid) - cpu_before,
            loop_cpu_s=_cpu_seconds(server.proc.pid, server.proc.pid) - loop_before,
            client_cpu_s=(client_after.ru_utime + client_after.ru_stime)
            - (client_before.ru_utime + client_before.ru_stime),
            resent=load.resent, separate=load.separate, refused=load.refused,
            failed=load.failed, processed=processed)
        if processed is not None and processed < args.requests:
            run.notes.append(f"only {processed} of {args.requests} processed within 60 s")
        return run

    async def stop(self) -> None:
        self.load.close()
        if isinstance(self.load, _AiocoapLoad):
            await self.load.shutdown()
        self.server.stop()


async def run_coap_bench(args: BenchArgs) -> dict[str, Any]:
    """Both servers run side by side (the idle one costs nothing); the rounds alternate
    between them, so that a neighbour's burst on shared cores hits both alike. Each
    server's figure is its best round."""
    if (args.requests * args.rounds + args.warmup) > args.sockets * MAX_PER_SOCKET:
        raise GatewayError(f"at most {MAX_PER_SOCKET} requests per socket: use more "
                           "--sockets")
    runs: list[Run] = []
    targets: list[_Target] = []
    with tempfile.TemporaryDirectory(prefix="iotgw-bench-coap-") as tmp:
        try:
            for name in ("bare", "gateway") if args.peer else ("gateway",):
                targets.append(await _Target.start(name, args, Path(tmp)))
            for _ in range(args.rounds):
                for target in targets:
                    runs.append(await target.measure(args))
        finally:
            for target in targets:
                await target.stop()
    best = {name: max((r for r in runs if r.server == name), key=lambda r: r.rate)
            for name in {r.server for r in runs}}
    report: dict[str, Any] = {
        "args": asdict(args), "runs": [asdict(r) for r in runs],
        "best": {name: asdict(r) for name, r in best.items()},
        "gateway_mode": ("serve --coap-listen" if _serve_has_coap_listen()
                         else "in-process start_coap")}
    if args.peer:
        bare, gateway = best["bare"], best["gateway"]
        report["ratio"] = gateway.rate / bare.rate
        report["cpu_ratio"] = ((bare.loop_cpu_s / bare.requests)
                               / (gateway.loop_cpu_s / gateway.requests))
    return report


def _print(report: dict[str, Any]) -> None:
    a = report["args"]
    click.echo(f"CoAP confirmable ingest: {a['requests']} POSTs of {a['payload_size']} B "
               f"JSON, {a['sockets']} sockets × {a['window']} in flight, {a['client']} "
               f"client; gateway: WAL fsync + {a['pipeline']} pipeline "
               f"({report['gateway_mode']})")
    labels = {"bare": "bare aiocoap (2.04, nothing)",
              "gateway": f"gateway (durable, {a['pipeline']})"}
    for i, r in enumerate(report["runs"]):
        if i % len(report["best"]) == 0:
            click.echo(f" round {i // len(report['best']) + 1}")
        extra = ""
        if r["processed"] is not None:
            extra = f", processed {r['processed']}"
        if r["separate"]:
            extra += f", {r['separate']} separate responses"
        if r["resent"] or r["refused"] or r["failed"]:
            extra += f", resent {r['resent']}, 5.03 {r['refused']}, other {r['failed']}"
        cpu_us = r["server_cpu_s"] / r["requests"] * 1e6
        loop_us = r["loop_cpu_s"] / r["requests"] * 1e6
        load_cpu = r["client_cpu_s"] / r["seconds"] * 100
        click.echo(
            f"  {labels[r['server']]:<30} {r['rate']:>7,.0f} req/s  p50 {r['p50_ms']:5.1f} ms"
            f"  p99 {r['p99_ms']:5.1f} ms  server CPU {cpu_us:4.0f} µs/req (loop "
            f"{loop_us:4.0f})  load CPU {load_cpu:3.0f} %{extra}")
        for note in r["notes"]:
            click.echo(f"    note: {note}")
    if "ratio" in report:
        verdict = "meets" if report["ratio"] >= TARGET_RATIO else "BELOW"
        best = report["best"]
        click.echo(f" best rounds: bare {best['bare']['rate']:,.0f} req/s, gateway "
                   f"{best['gateway']['rate']:,.0f} req/s")
        click.echo(f" ratio gateway / bare: {report['ratio']:.2f} ({verdict} the "
                   f"{TARGET_RATIO} target); loop CPU per request, bare / gateway: "
                   f"{report['cpu_ratio']:.2f}")


@click.command("bench-coap")
@click.option("--requests", type=click.IntRange(1), default=20_000, show_default=True,
              help="Confirmable POSTs measured per server.")
@click.option("--warmup", type=click.IntRange(0), default=2_000, show_default=True,
              help="POSTs sent (and processed) before the measured ones.")
@click.option("--sockets", type=click.IntRange(1, 1024), default=128, show_default=True,
              help="Client UDP sockets (source ports): devices.")
@click.option("--window", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Requests in flight per socket (1: RFC 7252's NSTART).")
@click.option("--rounds", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Measurements per server, alternating; each server's best counts.")
@click.option("--payload-size", type=click.IntRange(0, 1000), default=64, show_default=True)
@click.option("--client", type=click.Choice(["raw", "aiocoap"]), default="raw",
              show_default=True,
              help="raw: a light UDP CoAP load generator; aiocoap: aiocoap client contexts.")
@click.option("--pipeline", type=click.Choice(["full", "null"]), default="full",
              show_default=True,
              help="full: decode, validate, enrich, JSON-lines lake; null: a null sink.")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Also measure the bare aiocoap server in the same run.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_coap_command(requests: int, warmup: int, sockets: int, window: int, rounds: int,
                       payload_size: int, client: str, pipeline: str, peer: bool,
                       as_json: bool) -> None:
    """CoAP confirmable ingest throughput: the gateway vs a bare aiocoap server."""
    args = BenchArgs(requests=requests, warmup=warmup, sockets=sockets, window=window,
                     rounds=rounds, payload_size=payload_size, client=client,
                     pipeline=pipeline, peer=peer)
    try:
        report = uvloop.run(run_coap_bench(args))
    except GatewayError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)


# -- the server processes (python -m gateway.coap_bench bare|gateway ...) -------------------
async def _serve_bare(listen: str) -> None:
    import aiocoap
    from aiocoap import resource as coap_resource

    from gateway.config import split_host_port

    class Nothing(coap_resource.Resource):  # type: ignore[misc]
        async def render_post(self, request: Any) -> Any:
            return aiocoap.Message(code=aiocoap.CHANGED)

        render_put = render_post

    host, port = split_host_port(listen)
    context = await aiocoap.Context.create_server_context(Nothing(), bind=(host, port),
                                                          transports=["udp6"])
    await _until_sigterm()
    await context.shutdown()


async def _serve_gateway(config_path: str, admin_listen: str, coap_listen: str) -> None:
    """``iot-gateway serve`` with the CoAP listener, for as long as serve has none."""
    from gateway.app import GIL_SWITCH_INTERVAL_S, Gateway
    from gateway.config import load_config
    from protocols.coap.config import CoapSection
    from protocols.coap.server import start_coap

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gateway = Gateway(load_config(config_path), config_path=config_path,
                      mqtt_listen=f"{HOST}:0", admin_listen=admin_listen)
    await gateway.start()
    server = await start_coap(CoapSection(listen=coap_listen), gateway.ingest,
                              gateway.ingest.broker, gateway.metrics)
    await _until_sigterm()
    await server.close()
    await gateway.shutdown()


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _main(argv: list[str]) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve: Callable[[], Any]
    if argv[:1] == ["bare"] and len(argv) == 2:
        def serve() -> Any:
            return _serve_bare(argv[1])
    elif argv[:1] == ["gateway"]:
        opts = dict(zip(argv[1::2], argv[2::2], strict=False))
        def serve() -> Any:
            return _serve_gateway(opts["--config"], opts["--admin-listen"],
                                  opts["--coap-listen"])
    else:
        raise SystemExit("usage: python -m gateway.coap_bench bare HOST:PORT | gateway "
                         "--config F --admin-listen A --coap-listen C")
    uvloop.run(serve())


if __name__ == "__main__":
    _main(sys.argv[1:])
