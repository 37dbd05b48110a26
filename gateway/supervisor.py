"""``serve --workers N``: a supervisor process and N gateway worker processes.

Theory of operation
-------------------
One event loop is one core, so a host with several cores runs several gateways: the
supervisor (the process ``serve`` started, systemd's main process) starts N workers, each a
full gateway (``serve`` again, with a hidden ``--worker`` role) bound to the same MQTT, MQTT
over TLS and CoAP addresses with ``SO_REUSEPORT``: the kernel spreads new connections (and
CoAP clients, by source address) over the workers' sockets. Nothing on the data path passes
through the supervisor.

What each worker has of its own (``WorkerRole.apply``, the one place where a worker's config
differs from its siblings'): node id ``<node_id>-w<i>`` (the MQTT and AMQP identity, audit
records, and the fleet identity, which follows the node id), audit log ``<audit.dir>/worker-<i>``
(a hash chain per writer: a second writer on one directory would wait for the first to exit),
dead letters ``<dead_letter_dir>/worker-<i>``, broker snapshot and maintenance reservations in
``<state_dir>/worker-<i>/`` (``WorkerRole.private_dir``), and an admin HTTP listener. The WAL
stays in the shared ``<state_dir>/wal/``: each worker writes its own log there, and the log of
a worker that died is adopted by a sibling (or by the restarted worker), so nothing
acknowledged is lost.

Ports. A configured port is passed down as is. Port 0 (any free port) cannot be shared as
such (each worker would get another port), so the supervisor binds the listener's address
with ``SO_REUSEPORT`` first and passes the port it got down: for TCP the socket stays bound
(never listening, so it takes no connections) and keeps the port for restarted workers; for
UDP it is closed once every worker is ready (a bound UDP socket would take its share of the
datagrams). Admin: the supervisor serves the configured admin address (``/metrics`` merges the
workers' metrics with a ``worker`` label plus its own, ``/healthz``, ``/readyz``, ``/v1/stats``
summed, ``/v1/drain``; other requests are forwarded: a GET to one ready worker, anything else
to every worker, answered by the first success), and worker i listens on admin port + 1 + i
(any free port when the admin port is 0), for scraping or debugging one worker.

Workers talk to the supervisor with the systemd notification protocol: each gets its own
``$NOTIFY_SOCKET`` (an abstract unix datagram socket; the sender's pid is checked), so the
gateway's own ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``WATCHDOG=1`` and ``STATUS=`` drive
the supervisor, which tells systemd ``READY=1`` once every worker is ready (only the main
process notifies: ``NotifyAccess=main`` suffices). Under a systemd watchdog the workers get the
same ``WATCHDOG_USEC``; a worker whose pings stop is aborted (SIGABRT, then SIGKILL) and
restarted, and the supervisor pings systemd from its own loop. Each worker also holds the
read end of a pipe whose write end only the supervisor has: if the supervisor dies, even by
SIGKILL, the workers see EOF and drain.

Signals only set flags or start tasks: SIGTERM and a first SIGINT drain every worker (they are
forwarded; workers run in their own session, so a terminal's Ctrl-C reaches the supervisor
only) and a second SIGINT is forwarded too (workers exit at once); SIGHUP is forwarded to
every ready worker and the supervisor reports ``READY=1`` when all have answered. A worker
that exits unasked is restarted after a backoff (0.5 s, doubling to 30 s; back to 0.5 s after
a minute of service), logged, audited and counted. A worker that cannot start at start-up
stops the whole: exit 2 if it failed on its configuration, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import click
import msgspec
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from gateway import __version__, systemd
from gateway.audit import AuditBusyError, AuditError, AuditLog
from gateway.config import Config, split_host_port
from gateway.errors import ConfigError, GatewayError
from policies.scaling import ScalingHook

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["WorkerCount", "WorkerRole", "merge_metrics", "serve_worker", "supervise"]

log = logging.getLogger("iotgw.supervisor")

MAX_WORKERS = 1024
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""A worker that served this long before it died is restarted after the initial backoff."""
START_TIMEOUT_S = 300.0
"""Longest a worker may take to become ready (a long WAL replay included)."""
RELOAD_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 30.0
"""Beyond ``--shutdown-timeout``: time for the workers' last flush before they are killed."""
ABORT_GRACE_S = 5.0
"""After a SIGABRT for a missed watchdog, how long before SIGKILL."""
TICK_S = 0.5
ADMIN_TIMEOUT_S = 5.0
AUDIT_BACKLOG_MAX = 10_000
"""Records kept in memory while another supervisor holds the audit log (a handover)."""
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


# -- the worker's side ------------------------------------------------------------------------
class WorkerRole(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What makes worker ``index`` of ``count`` differ from its siblings; passed from the
    supervisor to ``serve --worker`` as JSON."""

    index: int
    count: int
    parent_fd: int | None = None
    """Read end of a pipe only the supervisor writes to: EOF means it is gone."""
    tls_listen: str | None = None
    """The concrete MQTT-over-TLS address when the config says port 0."""

    @property
    def tag(self) -> str:
        return f"w{self.index}"

    def apply(self, config: Config) -> Config:
        """The worker's config: the one place where it differs from its siblings'. Applied at
        start and to every reloaded config, so a reload compares like with like.

        The node id names the worker everywhere: MQTT and AMQP client names, audit records,
        and the fleet (``[fleet]``), which joins with ``gateway.node_id``."""
        worker = f"worker-{self.index}"
        gateway = msgspec.structs.replace(config.gateway,
                                          node_id=f"{config.gateway.node_id}-{self.tag}")
        audit = msgspec.structs.replace(config.audit, dir=str(Path(config.audit.dir) / worker))
        retry = msgspec.structs.replace(
            config.retry, dead_letter_dir=str(Path(config.retry.dead_letter_dir) / worker))
        auth = config.auth
        if self.tls_listen is not None and auth.tls is not None:
            auth = msgspec.structs.replace(
                auth, tls=msgspec.structs.replace(auth.tls, listen=self.tls_listen))
        # Each worker sees about 1/count of the host's load: its share of the host's capacity
        # makes its desired replicas the host's figure; only worker 0 runs the command hook.
        scaling = msgspec.structs.replace(
            config.scaling,
            replica_capacity_per_s=config.scaling.replica_capacity_per_s / self.count,
            hook=config.scaling.hook if self.index == 0 else ScalingHook())
        return msgspec.structs.replace(config, gateway=gateway, audit=audit, retry=retry,
                                       auth=auth, scaling=scaling)

    def private_dir(self, state_dir: str | Path) -> Path:
        """This worker's own files under the shared state dir (broker snapshot, maintenance
        reservations); the WAL stays shared so that siblings adopt a dead worker's log."""
        return Path(state_dir) / f"worker-{self.index}"

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> WorkerRole:
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.MsgspecError as err:
            raise click.BadParameter(f"{text!r}: {err}", param_hint="--worker") from None


async def serve_worker(gateway: Gateway, role: WorkerRole) -> None:
    """Run a worker's gateway; drain it if the supervisor goes away."""
    loop = asyncio.get_running_loop()
    fd = role.parent_fd
    if fd is not None:
        os.set_inheritable(fd, False)  # the gateway's own children need not hold it

        def orphaned() -> None:
            loop.remove_reader(fd)
            log.error("the supervisor is gone: draining")
            gateway.request_stop("supervisor exited")

        loop.add_reader(fd, orphaned)
    try:
        await gateway.run()
    finally:
        if fd is not None:
            loop.remove_reader(fd)


# -- the command line ---------------------------------------------------------------------------
class WorkerCount(click.ParamType[int, Any]):
    """``--workers``: a number of processes ≥ 1, or 0 / ``auto`` for one per CPU."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            count = value
        else:
            text = str(value).strip().lower()
            if text == "auto":
                return 0
            try:
                count = int(text)
            except ValueError:
                self.fail(f"{value!r} is not a number of worker processes (1: one process, "
                          "the default; 0 or auto: one per CPU)", param, ctx)
        if not 0 <= count <= MAX_WORKERS:
            self.fail(f"{count} worker processes: expected 1 to {MAX_WORKERS}, or 0 or auto "
                      "for one per CPU", param, ctx)
        return count


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which cgroup cpusets narrow)."""
    return len(os.sched_getaffinity(0)) or 1


def forwarded_options(ctx: click.Context, skip: Iterable[str]) -> list[str]:
    """The options given on the command line, as arguments again (every ``serve`` option
    reaches the workers, including ones added later)."""
    skipped = set(skip)
    out: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or name is None or name in skipped:
            continue
        source = ctx.get_parameter_source(name)
        value = ctx.params.get(name)
        if value is None or source in (click.core.ParameterSource.DEFAULT,
                                       click.core.ParameterSource.DEFAULT_MAP):
            continue
        if param.is_flag:
            if value:
                out.append(param.opts[0])
            elif param.secondary_opts:
                out.append(param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                out += [param.opts[0], str(item)]
        else:
            out += [param.opts[0], str(value)]
    return out


# -- listeners -----------------------------------------------------------------------------------
def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _local(host: str) -> str:
    """Where the supervisor reaches a worker listening on ``host``."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _reserve(what: str, option: str, listen: str, kind: socket.SocketKind
             ) -> tuple[str, socket.socket | None]:
    """``listen`` with a concrete port, and the socket holding a port 0 choice (None when
    the port was given)."""
    try:
        host, port = split_host_port(listen)
    except ValueError as err:
        raise ConfigError(f"{option}: {err}") from None
    if port:
        return listen, None
    try:
        family = socket.getaddrinfo(host, 0, type=kind)[0][0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
    except OSError as err:
        raise GatewayError(f"cannot listen for {what} on {listen}: {err.strerror or err}; "
                           f"choose another address with {option} HOST:PORT") from None
    return _hostport(host, sock.getsockname()[1]), sock


def _free_port(host: str) -> int:
    with socket.socket(socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Listeners(msgspec.Struct, kw_only=True):
    mqtt: str
    coap: str | None
    tls: str | None
    admin: str
    worker_admin: list[str]


def resolve_listeners(config: Config, count: int, *, mqtt_listen: str | None,
                      admin_listen: str | None, coap_listen: str | None
                      ) -> tuple[Listeners, list[socket.socket], list[socket.socket]]:
    """Concrete addresses for every worker, and the reservations that hold port 0 choices
    (TCP ones, kept while the supervisor runs; UDP ones, closed once the workers are bound)."""
    tcp: list[socket.socket] = []
    udp: list[socket.socket] = []
    try:
        mqtt, held = _reserve("MQTT", "--mqtt-listen", mqtt_listen or config.mqtt.listen,
                              socket.SOCK_STREAM)
        tcp += [held] if held else []
        tls = None
        if config.auth.tls is not None:
            tls, held = _reserve("MQTT over TLS", "auth.tls.listen", config.auth.tls.listen,
                                 socket.SOCK_STREAM)
            tcp += [held] if held else []
        coap = None
        if config.coap.enabled:
            coap, held = _reserve("CoAP", "--coap-listen", coap_listen or config.coap.listen,
                                  socket.SOCK_DGRAM)
            udp += [held] if held else []
        admin = admin_listen or config.admin.listen
        try:
            host, port = split_host_port(admin, "127.0.0.1")
        except ValueError as err:
            raise ConfigError(f"--admin-listen: {err}") from None
        if port and port + count > 65535:
            raise ConfigError(f"admin.listen {admin}: workers listen on the ports after it "
                              f"({port + 1}..{port + count}), past 65535")
        worker_admin = [_hostport(host, port + 1 + i if port else _free_port(host))
                        for i in range(count)]
    except BaseException:
        for sock in tcp + udp:
            sock.close()
        raise
    return Listeners(mqtt=mqtt, coap=coap, tls=tls, admin=admin,
                     worker_admin=worker_admin), tcp, udp


# -- metrics -------------------------------------------------------------------------------------
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def merge_metrics(texts: Mapping[str, str], label: str = "worker") -> str:
    """Prometheus text expositions of several workers as one: every sample gets
    ``label="<key>"``, and each family is written once (its HELP and TYPE, then the samples of
    every worker), as the text format requires."""
    headers: dict[str, dict[str, str]] = {}
    samples: dict[str, list[str]] = {}
    for value, text in texts.items():
        tag = f'{label}="{value}"'
        family: str | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    headers.setdefault(family, {}).setdefault(parts[1], line)
                    samples.setdefault(family, [])
                continue
            m = _METRIC_NAME.match(line)
            if m is None:
                continue
            name, rest = m.group(), line[m.end():]
            if rest.startswith("{}"):
                rest = rest[2:]
            labels = f"{{{tag},{rest[1:]}" if rest.startswith("{") else f"{{{tag}}}{rest}"
            line = name + labels
            samples.setdefault(family or name, []).append(line)
    out: list[str] = []
    for family, lines in samples.items():
        header = headers.get(family, {})
        out += [header[k] for k in ("HELP", "TYPE") if k in header]
        out += lines
    return "\n".join(out) + "\n" if out else ""


def _sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers added up, dicts merged key by key, anything else from the first worker."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in total:
                total[key] = _sum_stats([value]) if isinstance(value, dict) else value
            elif isinstance(value, dict) and isinstance(total[key], dict):
                total[key] = _sum_stats([total[key], value])
            elif (isinstance(value, int | float) and not isinstance(value, bool)
                  and isinstance(total[key], int | float)):
                total[key] += value
    return total


# -- the supervisor ------------------------------------------------------------------------------
class _Worker:
    def __init__(self, index: int, admin: str) -> None:
        self.index = index
        self.admin = admin
        self.proc: asyncio.subprocess.Process | None = None
        self.notify: socket.socket | None = None
        self.ready = False
        self.ever_ready = False
        self.status = ""
        self.restarts = 0
        self.failures = 0
        self.started = 0.0
        self.ready_at = 0.0
        self.last_ping = 0.0
        self.exit_code: int | None = None
        self.reload_answer: asyncio.Future[str] | None = None
        self.restarting: asyncio.Task[None] | None = None
        self.aborted = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def admin_url(self) -> str:
        host, port = split_host_port(self.admin, "127.0.0.1")
        return f"http://{_hostport(_local(host), port)}"

    def describe(self, node_id: str) -> dict[str, Any]:
        host, port = split_host_port(self.admin, "127.0.0.1")
        return {"index": self.index, "node_id": f"{node_id}-w{self.index}",
                "pid": self.proc.pid if self.alive and self.proc else None,
                "ready": self.ready, "restarts": self.restarts, "status": self.status,
                "admin": {"host": host, "port": port}}


class _SupervisorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.workers = Gauge("iotgw_supervisor_workers", "Worker processes configured.",
                             registry=self.registry)
        self.ready = Gauge("iotgw_supervisor_workers_ready", "Worker processes ready now.",
                           registry=self.registry)
        self.up = Gauge("iotgw_supervisor_worker_up", "1 while the worker is ready.",
                        ["worker"], registry=self.registry)
        self.restarts = Counter("iotgw_supervisor_worker_restarts",
                                "Workers restarted after they exited unasked.",
                                ["worker"], registry=self.registry)


class Supervisor:
    """Starts, watches, signals and restarts the workers; see the module's docstring."""

    def __init__(self, config: Config, count: int, listeners: Listeners,
                 worker_argv: Callable[[WorkerRole, Listeners, str], list[str]], *,
                 shutdown_timeout: float, tcp_reserved: list[socket.socket],
                 udp_reserved: list[socket.socket]) -> None:
        self.config = config
        self.count = count
        self.listeners = listeners
        self.worker_argv = worker_argv
        self.shutdown_timeout = shutdown_timeout
        self.workers = [_Worker(i, listeners.worker_admin[i]) for i in range(count)]
        self.metrics = _SupervisorMetrics()
        self.metrics.workers.set(count)
        self.metrics.ready.set_function(lambda: sum(w.ready for w in self.workers))
        for w in self.workers:
            self.metrics.up.labels(str(w.index)).set_function(_ready_of(w))
            self.metrics.restarts.labels(str(w.index))
        self._tcp_reserved = tcp_reserved
        self._udp_reserved = udp_reserved
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_signal: int = signal.SIGTERM
        self._stop_reason = ""
        self._interrupts = 0
        self._serving = False
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._parent_r, self._parent_w = os.pipe()
        self._watchdog_usec = _watchdog_usec()
        self._http: aiohttp.ClientSession | None = None
        self.admin_address: tuple[str, int] | None = None
        self.started_at = time.time()
        self.audit = (AuditLog(Path(config.audit.dir) / "supervisor",
                               node_id=config.gateway.node_id,
                               max_file_bytes=config.audit.max_file_bytes)
                      if config.audit.enabled else None)
        self._audit_backlog: list[tuple[str, dict[str, Any]]] = []

    # -- audit --------------------------------------------------------------------------------
    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        if not self.audit.is_open:
            with contextlib.suppress(AuditBusyError):
                self.audit.open()  # another supervisor's during a handover: keep for later
        if not self.audit.is_open:
            if len(self._audit_backlog) < AUDIT_BACKLOG_MAX:
                self._audit_backlog.append((event, fields))
            return
        backlog, self._audit_backlog = self._audit_backlog, []
        try:
            for name, values in [*backlog, (event, fields)]:
                self.audit.record(name, **values)
        except AuditError as err:
            log.error("audit record %s not written: %s", event, err)

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        handled = {signal.SIGTERM: lambda: self.request_stop("SIGTERM"),
                   signal.SIGINT: self._on_sigint, signal.SIGHUP: self.request_reload}
        for sig, handler in handled.items():
            loop.add_signal_handler(sig, handler)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S))
        runner = web.AppRunner(self._admin_app(), access_log=None)
        try:
            await runner.setup()
            host, port = split_host_port(self.listeners.admin, "127.0.0.1")
            try:
                await web.TCPSite(runner, host, port, reuse_port=True).start()
            except OSError as err:
                raise GatewayError(f"cannot listen for admin HTTP on {self.listeners.admin}: "
                                   f"{err.strerror or err}; choose another address with "
                                   "--admin-listen HOST:PORT") from None
            self.admin_address = runner.addresses[0][:2]
            return await self._supervise()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            for task in list(self._tasks):
                task.cancel()
            await runner.cleanup()
            await self._http.close()
            for w in self.workers:
                self._close_notify(w)
            for sock in self._tcp_reserved + self._udp_reserved:
                sock.close()
            os.close(self._parent_r)
            os.close(self._parent_w)
            if self.audit is not None:
                with contextlib.suppress(AuditError):
                    self.audit.close()

    async def _supervise(self) -> int:
        log.info("iot-gateway %s supervisor (pid %d): starting %d workers", __version__,
                 os.getpid(), self.count)
        for w in self.workers:
            try:
                await self._spawn(w)
            except OSError as err:
                await self._stop_workers(signal.SIGTERM, self.shutdown_timeout + DRAIN_GRACE_S)
                raise GatewayError(f"cannot start worker {w.index}: {err}") from None
        failed = await self._wait_started()
        if failed is not None:
            return await self._abort_start(failed)
        if self._stop.is_set():  # stopped while starting: no READY=1
            return await self._drain()
        for sock in self._udp_reserved:  # the workers hold the UDP port now
            sock.close()
        self._udp_reserved = []
        self._serving = True
        mqtt, admin = self.listeners.mqtt, _hostport(*self.admin_address or ("-", 0))
        self._audit("supervisor.start", version=__version__, workers=self.count, mqtt=mqtt,
                    admin=admin, pid=os.getpid(),
                    worker_pids=[w.proc.pid for w in self.workers if w.proc])
        systemd.notify("READY=1", self._status())
        log.info("%d workers ready: MQTT on %s, admin on http://%s (workers' admin: "
                 "%s)", self.count, mqtt, admin, ", ".join(w.admin for w in self.workers))
        self._start_task(self._tick())
        await self._stop.wait()
        return await self._drain()

    async def _wait_started(self) -> _Worker | None:
        """Until every worker is ready (None), one exits first (it), or a stop is asked."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._stop.is_set():
            for w in self.workers:
                if w.exit_code is not None:
                    return w
            if all(w.ready for w in self.workers):
                return None
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = [w for w in self.workers if not w.ready]
                log.error("worker %d not ready within %.0f s", late[0].index, START_TIMEOUT_S)
                return late[0]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, TICK_S))
        return None

    async def _abort_start(self, failed: _Worker) -> int:
        code = failed.exit_code
        if code is None:
            why = "was not ready in time"
        else:
            why = f"exited with {_exit_text(code)} before it was ready (its log above says why)"
        log.error("worker %d %s: stopping the other workers", failed.index, why)
        self._stop_reason = "a worker could not start"
        await self._stop_workers(signal.SIGTERM, self.shutdown_timeout + DRAIN_GRACE_S)
        if code == 2:
            raise ConfigError(f"worker {failed.index} refused the configuration")
        raise GatewayError(f"worker {failed.index} {why}")

    async def _drain(self) -> int:
        reason = self._stop_reason or "stop"
        log.info("draining %d workers (%s)", sum(w.alive for w in self.workers), reason)
        systemd.notify("STOPPING=1", "STATUS=draining")
        self._audit("supervisor.drain", reason=reason)
        codes, ok = await self._stop_workers(self._stop_signal,
                                             self.shutdown_timeout + DRAIN_GRACE_S)
        self._audit("supervisor.stopped", exit_codes={str(k): v for k, v in codes.items()})
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed or not ok:
            log.error("stopped; workers that did not exit cleanly: %s",
                      ", ".join(f"{i} ({_exit_text(c)})" for i, c in failed.items())
                      or "killed at the drain deadline")
            return 1
        log.info("stopped, %d workers drained", self.count)
        return 0

    async def _stop_workers(self, sig: int, timeout: float
                            ) -> tuple[dict[int, int | None], bool]:
        """Signal every live worker and wait for all to exit, SIGKILL at the deadline: the
        exit code of each worker that was running, and whether all exited in time."""
        running: dict[int, asyncio.subprocess.Process] = {}
        for w in self.workers:
            if w.restarting is not None:
                w.restarting.cancel()
            if w.alive and w.proc is not None:
                running[w.index] = w.proc
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)
        if not running:
            return {}, True
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(p.wait()) for p in running.values()], timeout=timeout)
        for p in running.values():
            if p.returncode is None:
                log.error("worker pid %d still running at the drain deadline: killed", p.pid)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        if pending:
            await asyncio.wait(pending)
        return {i: p.returncode for i, p in running.items()}, not pending

    def request_stop(self, reason: str, sig: int = signal.SIGTERM) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop_signal = sig
            self._stop.set()
            self._changed.set()

    def _on_sigint(self) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            self.request_stop("SIGINT", signal.SIGINT)
            return
        log.warning("second SIGINT: the workers exit now; unprocessed acknowledged messages "
                    "stay in the write-ahead log")
        for w in self.workers:
            if w.alive and w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGINT)

    # -- workers ------------------------------------------------------------------------------
    async def _spawn(self, w: _Worker) -> None:
        role = WorkerRole(index=w.index, count=self.count, parent_fd=self._parent_r,
                          tls_listen=self.listeners.tls if self._tls_reserved() else None)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        name = f"iotgw-supervisor-{os.getpid()}-{w.index}-{secrets.token_hex(6)}"
        sock.bind("\0" + name)
        sock.setblocking(False)
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = "@" + name
        env.pop("WATCHDOG_PID", None)
        env.pop("WATCHDOG_USEC", None)
        if self._watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self._watchdog_usec)
        argv = self.worker_argv(role, self.listeners, self.listeners.worker_admin[w.index])
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, pass_fds=(self._parent_r,),
                start_new_session=True)
        except OSError:
            sock.close()
            raise
        w.proc, w.notify = proc, sock
        w.ready, w.exit_code, w.status, w.aborted = False, None, "starting", False
        w.started = w.last_ping = time.monotonic()
        asyncio.get_running_loop().add_reader(sock, self._on_notify, w, sock)
        log.debug("worker %d started: pid %d", w.index, proc.pid)
        self._start_task(self._watch(w, proc))

    def _tls_reserved(self) -> bool:
        tls = self.config.auth.tls
        return tls is not None and split_host_port(tls.listen)[1] == 0

    def _close_notify(self, w: _Worker) -> None:
        if w.notify is not None:
            asyncio.get_running_loop().remove_reader(w.notify)
            w.notify.close()
            w.notify = None

    def _on_notify(self, w: _Worker, sock: socket.socket) -> None:
        while True:
            try:
                data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.debug("worker %d notification: %s", w.index, err)
                return
            pid = None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack_from(cdata)[0]
            if w.proc is None or pid != w.proc.pid:
                log.debug("worker %d notification from pid %s ignored", w.index, pid)
                continue
            self._notified(w, dict(line.partition("=")[::2] for line in
                                   data.decode("utf-8", "replace").splitlines()))

    def _notified(self, w: _Worker, states: dict[str, str]) -> None:
        now = time.monotonic()
        w.last_ping = now
        if "STATUS" in states:
            w.status = states["STATUS"]
        if states.get("STOPPING") == "1":
            w.ready = False
        if states.get("READY") == "1":
            if not w.ready and w.ever_ready and self._serving and not self._stop.is_set():
                log.info("worker %d (pid %s) ready again", w.index,
                         w.proc.pid if w.proc else "-")
                self._audit("worker.ready", worker=w.index, pid=w.proc.pid if w.proc else None)
            if not w.ready:
                w.ready_at = now
            w.ready = w.ever_ready = True
            if w.reload_answer is not None and not w.reload_answer.done():
                w.reload_answer.set_result(w.status)
            self._update_status()
        self._changed.set()

    async def _watch(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if w.proc is not proc:
            return
        self._close_notify(w)
        was_ready, served = w.ready, time.monotonic() - w.ready_at if w.ready else 0.0
        w.ready, w.exit_code = False, code
        if w.reload_answer is not None and not w.reload_answer.done():
            w.reload_answer.set_result("exited")
        self._changed.set()
        if self._stop.is_set() or not self._serving:
            log.log(logging.INFO if code == 0 else logging.ERROR, "worker %d (pid %d) exited "
                    "with %s", w.index, proc.pid, _exit_text(code))
            return
        if was_ready and served >= STABLE_AFTER_S:
            w.failures = 0
        w.failures += 1
        delay = min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** (w.failures - 1))
        log.error("worker %d (pid %d) exited with %s%s: restarting it in %.1f s", w.index,
                  proc.pid, _exit_text(code), "" if was_ready else " before it was ready",
                  delay)
        self._audit("worker.exited", worker=w.index, pid=proc.pid, exit=_exit_text(code),
                    restart_in_s=delay)
        self._update_status()
        w.restarting = self._start_task(self._restart(w, delay))

    async def _restart(self, w: _Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stop.is_set():
            return
        w.restarts += 1
        self.metrics.restarts.labels(str(w.index)).inc()
        try:
            await self._spawn(w)
            if self._stop.is_set() and w.proc is not None:  # a drain began meanwhile
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(self._stop_signal)
        except OSError as err:
            log.error("worker %d cannot be started: %s", w.index, err)
            w.exit_code = 1
            w.failures += 1
            delay = min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** (w.failures - 1))
            w.restarting = self._start_task(self._restart(w, delay))
            return
        w.restarting = None

    def _start_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick(self) -> None:
        """Watchdog both ways: ping systemd, abort workers whose pings stopped."""
        interval = systemd.watchdog_interval()
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if interval is not None and now >= next_ping:
                systemd.notify("WATCHDOG=1")
                next_ping = now + interval
            if self._watchdog_usec is not None and not self._stop.is_set():
                limit = self._watchdog_usec / 1e6
                for w in self.workers:
                    if w.ready and w.alive and not w.aborted and now - w.last_ping > limit:
                        self._abort(w, now - w.last_ping)
            await asyncio.sleep(TICK_S)

    def _abort(self, w: _Worker, silent_s: float) -> None:
        assert w.proc is not None
        log.error("worker %d (pid %d) sent no watchdog ping for %.1f s: aborting it",
                  w.index, w.proc.pid, silent_s)
        self._audit("worker.watchdog", worker=w.index, pid=w.proc.pid,
                    silent_s=round(silent_s, 1))
        w.aborted = True
        proc = w.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGABRT)

        async def kill_later() -> None:
            await asyncio.sleep(ABORT_GRACE_S)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        self._start_task(kill_later())

    def _status(self) -> str:
        ready = sum(w.ready for w in self.workers)
        return f"STATUS=serving MQTT on {self.listeners.mqtt}: {ready} of {self.count} " \
               "workers ready"

    def _update_status(self) -> None:
        if self._serving and not self._stop.is_set():
            systemd.notify(self._status())

    # -- reload -------------------------------------------------------------------------------
    def request_reload(self) -> None:
        if not self._serving or self._stop.is_set():
            log.warning("SIGHUP ignored: the workers are not serving yet (or draining)")
            return
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = self._start_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            systemd.reloading()
            targets = [w for w in self.workers if w.ready and w.proc is not None]
            loop = asyncio.get_running_loop()
            for w in targets:
                w.reload_answer = loop.create_future()
                assert w.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGHUP)
            answers = [w.reload_answer for w in targets if w.reload_answer is not None]
            if answers:
                await asyncio.wait(answers, timeout=RELOAD_TIMEOUT_S)
            results = {w.index: (w.reload_answer.result() if w.reload_answer is not None
                                 and w.reload_answer.done() else "no answer")
                       for w in targets}
            reloaded = [i for i, status in results.items() if status == "reloaded"]
            if len(reloaded) == len(targets):
                log.info("reload: %d of %d workers reloaded", len(reloaded),
                         self.count)
            else:
                log.error("reload: %d of %d workers reloaded; %s", len(reloaded),
                          len(targets), "; ".join(f"worker {i}: {s}" for i, s in
                                                  results.items() if s != "reloaded"))
            self._audit("supervisor.reload", workers={str(k): v for k, v in results.items()})
            systemd.notify("READY=1", self._status())
            if not self._reload_again:
                return

    # -- admin HTTP ---------------------------------------------------------------------------
    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/v1/stats", self._stats)
        app.router.add_post("/v1/drain", self._drain_request)
        app.router.add_route("*", "/{path:.*}", self._forward)
        return app

    async def _fetch(self, w: _Worker, method: str, path: str, body: bytes = b"",
                     headers: Mapping[str, str] | None = None
                     ) -> tuple[int, bytes, str] | None:
        assert self._http is not None
        try:
            async with self._http.request(method, w.admin_url + path, data=body or None,
                                          headers=headers) as response:
                return response.status, await response.read(), response.content_type
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            log.debug("worker %d admin %s %s: %s", w.index, method, path, err)
            return None

    def _serving_workers(self) -> list[_Worker]:
        return [w for w in self.workers if w.ready]

    async def _metrics(self, request: web.Request) -> web.Response:
        workers = self._serving_workers()
        answers = await asyncio.gather(*(self._fetch(w, "GET", "/metrics") for w in workers))
        texts = {str(w.index): a[1].decode() for w, a in zip(workers, answers, strict=True)
                 if a is not None and a[0] == 200}
        body = merge_metrics(texts).encode() + generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def health(self) -> dict[str, Any]:
        ready = sum(w.ready for w in self.workers)
        status = ("draining" if self._stop.is_set() else
                  "ok" if ready == self.count else "degraded")
        return {"status": status, "version": __version__,
                "node_id": self.config.gateway.node_id, "region": self.config.gateway.region,
                "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 3),
                "listeners": {"mqtt": _address(self.listeners.mqtt),
                              "admin": (None if self.admin_address is None else
                                        {"host": self.admin_address[0],
                                         "port": self.admin_address[1]}),
                              "coap": _address(self.listeners.coap),
                              "mqtt_tls": _address(self.listeners.tls)},
                "workers": [w.describe(self.config.gateway.node_id) for w in self.workers]}

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response(self.health())

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = sum(w.ready for w in self.workers)
        serving = self._serving and not self._stop.is_set() and ready > 0
        return web.json_response({"ready": serving, "workers_ready": ready,
                                  "workers": self.count}, status=200 if serving else 503)

    async def _stats(self, request: web.Request) -> web.Response:
        workers = [w for w in self.workers if w.alive]
        answers = await asyncio.gather(*(self._fetch(w, "GET", "/v1/stats") for w in workers))
        parts = {w.index: msgspec.json.decode(a[1]) for w, a in zip(workers, answers,
                                                                   strict=True)
                 if a is not None and a[0] == 200}
        total = _sum_stats(list(parts.values()))
        total["workers"] = {str(i): part for i, part in parts.items()}
        return web.json_response(total)

    async def _drain_request(self, request: web.Request) -> web.Response:
        self.request_stop("admin drain")
        workers = [w for w in self.workers if w.alive]
        answers = await asyncio.gather(*(self._fetch(w, "GET", "/v1/stats") for w in workers))
        queued = sum(msgspec.json.decode(a[1]).get("queued", 0) for a in answers
                     if a is not None and a[0] == 200)
        return web.json_response({"draining": True, "queued": queued}, status=202)

    async def _forward(self, request: web.Request) -> web.Response:
        """Another admin request: a GET to the first ready worker; anything else to every
        ready worker, answered by the first success (e.g. an anomaly is raised on the worker
        the device is connected to; a maintenance reservation is made on each)."""
        workers = self._serving_workers()
        if request.method in ("GET", "HEAD"):
            workers = workers[:1]
        if not workers:
            return web.json_response({"error": "no worker is ready"}, status=503)
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        answers = [a for a in await asyncio.gather(
            *(self._fetch(w, request.method, request.path_qs, body, headers)
              for w in workers)) if a is not None]
        if not answers:
            return web.json_response({"error": "no worker answered"}, status=502)
        chosen = next((a for a in answers if 200 <= a[0] < 300), answers[0])
        return web.Response(status=chosen[0], body=chosen[1], content_type=chosen[2])


def _ready_of(w: _Worker) -> Callable[[], float]:
    return lambda: float(w.ready)


def _address(listen: str | None) -> dict[str, Any] | None:
    if listen is None:
        return None
    host, port = split_host_port(listen)
    return {"host": host, "port": port}


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit yet"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


def _watchdog_usec() -> int | None:
    interval = systemd.watchdog_interval()
    return None if interval is None else int(interval * 2_000_000)


def supervise(config: Config, workers: int, ctx: click.Context, *, mqtt_listen: str | None,
              admin_listen: str | None, coap_listen: str | None,
              shutdown_timeout: float) -> int:
    """``serve --workers N``: run the supervisor until it drains; its exit code. Raises
    ConfigError (exit 2) or GatewayError (exit 1) when the workers cannot start."""
    import uvloop

    count = workers or cpu_count()
    listeners, tcp, udp = resolve_listeners(config, count, mqtt_listen=mqtt_listen,
                                            admin_listen=admin_listen, coap_listen=coap_listen)
    options = forwarded_options(ctx, skip=("workers", "worker_spec", "mqtt_listen",
                                           "admin_listen", "coap_listen"))
    if config.fleet.url is None and ctx.params.get("fleet_url") is None:
        log.info("no [fleet]: each worker is a broker of its own (an MQTT message reaches the "
                 "subscribers connected to the worker it was published on); --fleet-url "
                 "joins them")

    def worker_argv(role: WorkerRole, listen: Listeners, admin: str) -> list[str]:
        argv = [sys.executable, "-m", "gateway.cli", "serve", *options,
                "--mqtt-listen", listen.mqtt, "--admin-listen", admin]
        if listen.coap is not None:
            argv += ["--coap-listen", listen.coap]
        return [*argv, "--worker", role.encode()]

    async def main() -> int:
        supervisor = Supervisor(config, count, listeners, worker_argv,
                                shutdown_timeout=shutdown_timeout, tcp_reserved=tcp,
                                udp_reserved=udp)
        return await supervisor.run()

    try:
        return uvloop.run(main())
    finally:
        for sock in tcp + udp:
            sock.close()
