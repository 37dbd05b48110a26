"""``serve --workers N``: a supervisor and N gateway processes on the same listeners.

Real processes, real sockets, real signals: connections spread over the workers, every QoS 1
message processed, drain, reload, a worker killed and restarted with nothing acknowledged
lost, the systemd notification protocol and watchdog, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLI, DEFAULT_TOML
from tests.integration.test_durability import Publisher, lake_payloads
from tests.raw_mqtt import connect_frame, publish_frame

pytestmark = pytest.mark.integration

READY = re.compile(r"(\d+) workers ready: MQTT on [\d.]+:(\d+), admin on http://[\d.]+:(\d+)")


class Supervised(subprocess.Popen[str]):
    log_lines: list[str]
    mqtt_port: int
    admin_port: int

    def log_text(self) -> str:
        return "".join(self.log_lines)

    def get(self, path: str, port: int | None = None) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port or self.admin_port}{path}",
                                    timeout=10) as r:
            body = r.read()
        return body.decode() if path == "/metrics" else json.loads(body)

    def workers(self) -> list[dict[str, Any]]:
        return list(self.get("/healthz")["workers"])

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.workers() if w["pid"]]

    def wait_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log_text()}"
            time.sleep(0.05)


@pytest.fixture
def supervise() -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(cwd: Path, *args: str, workers: str = "2", env: dict[str, str] | None = None,
              expect_ready: bool = True) -> Supervised:
        proc = Supervised([*CLI, "serve", "--workers", workers, "--mqtt-listen", "127.0.0.1:0",
                           "--admin-listen", "127.0.0.1:0", "--coap-listen", "127.0.0.1:0",
                           *args], cwd=cwd, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})
        proc.log_lines = []
        started.append(proc)
        ready = threading.Event()

        def collect() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                proc.log_lines.append(line)
                if m := READY.search(line):
                    proc.mqtt_port, proc.admin_port = int(m[2]), int(m[3])
                    ready.set()
            proc.stderr.close()
            ready.set()

        threading.Thread(target=collect, daemon=True).start()
        if expect_ready:
            ready.wait(60)
            if not hasattr(proc, "mqtt_port"):
                proc.kill()
                raise AssertionError(f"no ready workers (exit {proc.wait()}):\n"
                                     f"{proc.log_text()}")
        return proc

    yield start
    for proc in started:  # the workers drain by themselves once their supervisor is gone
        if proc.poll() is None:
            pids: list[int] = []
            with contextlib.suppress(OSError):
                pids = proc.worker_pids()
            proc.kill()
            proc.wait(10)
            for pid in pids:
                _wait_gone(pid, 30, kill=True)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float, kill: bool = False) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.05)
    return True


def _gauge(metrics: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in the metrics")


def _wait_idle(gw: Supervised, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = gw.get("/v1/stats")
        if (len(stats["workers"]) == 2 and not stats["queued"] and not stats["pending"]
                and not stats["wal_unretired"]):
            return dict(stats)
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def test_connections_spread_over_both_workers_and_every_qos1_message_is_processed(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    gw = supervise(tmp_path)
    workers = gw.workers()
    assert [w["node_id"] for w in workers] == ["gw-1-w0", "gw-1-w1"]
    assert len({w["pid"] for w in workers}) == 2 and all(w["ready"] for w in workers)
    health = [gw.get("/healthz", w["admin"]["port"]) for w in workers]
    assert {h["listeners"]["mqtt"]["port"] for h in health} == {gw.mqtt_port}
    assert len({h["listeners"]["coap"]["port"] for h in health}) == 1  # one CoAP port too

    connections, per_connection = 40, 25
    sockets = [socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=10)
               for _ in range(connections)]
    try:
        for i, s in enumerate(sockets):
            s.sendall(connect_frame(f"spread-{i}"))
            assert _recv_exactly(s, 4)[:1] == b"\x20"
        counts = [_gauge(gw.get("/metrics", w["admin"]["port"]), "iotgw_connections")
                  for w in workers]
        assert sum(counts) == connections and min(counts) > 0, counts
        merged = gw.get("/metrics")  # one scrape target: the workers' series, labelled
        assert [_gauge(merged, "iotgw_connections", worker=str(i)) for i in (0, 1)] == counts
        assert _gauge(merged, "iotgw_supervisor_workers_ready") == 2

        for i, s in enumerate(sockets):
            s.sendall(b"".join(
                publish_frame("telemetry/spread", json.dumps({"seq": i * per_connection + k})
                              .encode(), qos=1, packet_id=k + 1)
                for k in range(per_connection)))
        for s in sockets:
            acks = _recv_exactly(s, 4 * per_connection)
            assert acks == b"".join(b"\x40\x02" + (k + 1).to_bytes(2, "big")
                                    for k in range(per_connection))
    finally:
        for s in sockets:
            s.close()
    stats = _wait_idle(gw)
    assert stats["processed"] == connections * per_connection
    assert all(part["processed"] > 0 for part in stats["workers"].values())
    assert gw.get("/readyz")["ready"] is True

    gw.send_signal(signal.SIGTERM)
    assert gw.wait(60) == 0, gw.log_text()
    seqs = sorted(p["seq"] for p in lake_payloads(tmp_path))
    assert seqs == list(range(connections * per_connection))
    # Each worker its own audit chain and private state; the WAL directory is shared.
    audit = tmp_path / "data" / "audit"
    assert {p.name for p in audit.iterdir()} >= {"worker-0", "worker-1", "supervisor"}
    verify = subprocess.run([*CLI, "audit", "verify", str(audit / "worker-1")],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    state = tmp_path / "data" / "state"
    assert (state / "worker-0" / "broker" / "state.msgpack").exists()
    assert (state / "worker-1" / "broker" / "state.msgpack").exists()
    assert "drained" in gw.log_text()


def test_sighup_reloads_every_worker_and_drain_stops_them_all(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(DEFAULT_TOML)
    gw = supervise(tmp_path, "--config", str(config))
    ports = [w["admin"]["port"] for w in gw.workers()]
    assert all('lane="extra"' not in gw.get("/metrics", p) for p in ports)

    config.write_text(DEFAULT_TOML + '\n[[tiers]]\nname = "extra"\nmax_latency_ms = 5000\n')
    gw.send_signal(signal.SIGHUP)
    gw.wait_log("reload: 2 of 2 workers reloaded")
    assert all('iotgw_queue_depth{lane="extra"}' in gw.get("/metrics", p) for p in ports)
    for i in (0, 1):
        records = [json.loads(line) for path in
                   sorted((tmp_path / "data" / "audit" / f"worker-{i}").glob("audit-*.jsonl"))
                   for line in path.read_text().splitlines()]
        reloads = [r for r in records if r["event"] == "reload"]
        assert [r["accepted"] for r in reloads] == [True]
        assert {r["node"] for r in records} == {f"gw-1-w{i}"}

    # A reload the workers refuse: restart-only settings are reported, the old config kept.
    config.write_text(DEFAULT_TOML.replace('node_id = "gw-1"', 'node_id = "gw-2"'))
    gw.send_signal(signal.SIGHUP)
    gw.wait_log("reload: 0 of 2 workers reloaded")
    assert "gateway.node_id changed" in gw.log_text()

    result = subprocess.run([*CLI, "drain", "--admin", f"http://127.0.0.1:{gw.admin_port}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert gw.wait(60) == 0, gw.log_text()


def test_a_killed_worker_is_restarted_and_nothing_it_acknowledged_is_lost(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    gw = supervise(tmp_path)
    publisher = Publisher(gw.mqtt_port)
    sender = threading.Thread(target=publisher.publish, args=(20_000,), daemon=True)
    sender.start()
    publisher.wait_acked(3_000)
    workers = gw.workers()
    victim = next(w for w in workers
                  if gw.get("/v1/stats", w["admin"]["port"])["connections"] == 1)
    deadline = time.monotonic() + 10
    while not gw.get("/v1/stats", victim["admin"]["port"])["wal_unretired"]:
        assert time.monotonic() < deadline, "nothing unretired to kill during"
        time.sleep(0.002)
    os.kill(victim["pid"], signal.SIGKILL)
    sender.join(60)
    publisher.close()
    acked = set(publisher.acked)
    assert len(acked) >= 3_000

    gw.wait_log(f"worker {victim['index']} (pid {victim['pid']}) exited with signal SIGKILL: "
                "restarting it")
    deadline = time.monotonic() + 30
    while True:
        now = gw.workers()[victim["index"]]
        if now["ready"] and now["pid"] != victim["pid"]:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert now["restarts"] == 1
    metrics = gw.get("/metrics")
    assert _gauge(metrics, "iotgw_supervisor_worker_restarts_total",
                  worker=str(victim["index"])) == 1
    _wait_idle(gw)
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(60) == 0, gw.log_text()

    seqs = [p["seq"] for p in lake_payloads(tmp_path)]
    missing = acked - set(seqs)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert "replaying" in gw.log_text()  # the dead worker's log, adopted by a live one


def test_systemd_sees_one_service_and_a_stuck_worker_is_replaced(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    systemd.bind(str(notify_path))
    systemd.settimeout(0.2)
    received: list[tuple[int, str]] = []

    def drain_notifications() -> list[str]:
        while True:
            try:
                data, anc, _, _ = systemd.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                return [text for _, text in received]
            pid = next(int.from_bytes(c[:4], "little") for level, kind, c in anc
                       if kind == socket.SCM_CREDENTIALS)
            received.append((pid, data.decode()))

    try:
        gw = supervise(tmp_path, env={"NOTIFY_SOCKET": str(notify_path),
                                      "WATCHDOG_USEC": "2000000"})
        texts = drain_notifications()
        assert any("READY=1" in t for t in texts), texts
        assert {pid for pid, _ in received} == {gw.pid}  # only the main process notifies
        assert "2 of 2 workers ready" in next(t for t in texts if "READY=1" in t)

        stuck = gw.workers()[1]
        os.kill(stuck["pid"], signal.SIGSTOP)  # its loop stops, and its watchdog pings
        gw.wait_log(f"worker 1 (pid {stuck['pid']}) sent no watchdog ping", timeout=15)
        deadline = time.monotonic() + 30
        while not (gw.workers()[1]["ready"] and gw.workers()[1]["pid"] != stuck["pid"]):
            assert time.monotonic() < deadline, gw.log_text()
            time.sleep(0.1)
        received.clear()
        time.sleep(1.5)
        assert any("WATCHDOG=1" in t for t in drain_notifications())

        received.clear()
        gw.send_signal(signal.SIGHUP)
        gw.wait_log("reload: 2 of 2 workers reloaded")
        texts = drain_notifications()
        assert any("RELOADING=1" in t for t in texts) and "READY=1" in texts[-1], texts

        gw.send_signal(signal.SIGTERM)
        assert gw.wait(60) == 0, gw.log_text()
        assert any("STOPPING=1" in t for t in drain_notifications())
    finally:
        systemd.close()


def test_workers_drain_when_their_supervisor_is_killed(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    gw = supervise(tmp_path, workers="auto")  # one per CPU
    pids = gw.worker_pids()
    assert len(pids) == len(os.sched_getaffinity(0))
    gw.kill()
    gw.wait(10)
    assert all(_wait_gone(pid, 30) for pid in pids)


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "-1 worker processes: expected 1 to 1024, or 0 or auto"),
    ("many", "'many' is not a number of worker processes"),
    ("5000", "5000 worker processes: expected 1 to 1024"),
])
def test_a_bad_worker_count_is_a_usage_error(tmp_path: Path, value: str, message: str) -> None:
    result = subprocess.run([*CLI, "serve", "--workers", value], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Invalid value for '--workers'" in result.stderr and message in result.stderr


def test_workers_that_cannot_listen_stop_the_supervisor_with_exit_1(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = supervise(tmp_path, "--mqtt-listen", f"127.0.0.1:{port}", expect_ready=False)
        assert gw.wait(60) == 1
    text = gw.log_text()
    assert f"cannot listen for MQTT on 127.0.0.1:{port}: address already in use" in text
    assert "before it was ready" in text


def test_a_config_only_the_workers_can_check_is_exit_2(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(DEFAULT_TOML.replace('{ type = "enrich" },', '{ type = "nope" },'))
    gw = supervise(tmp_path, "--config", str(config), expect_ready=False)
    assert gw.wait(60) == 2
    assert "unknown stage 'nope'" in gw.log_text()


def _rabbitmq_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5672), 1):
        return True
    return False


@pytest.mark.skipif(not _rabbitmq_up(), reason="RabbitMQ is not running on 127.0.0.1:5672")
def test_with_a_fleet_a_message_published_on_one_worker_reaches_subscribers_on_another(
        tmp_path: Path, supervise: Callable[..., Supervised]) -> None:
    unique = f"wt{os.getpid()}x{time.monotonic_ns() % 10**6}"
    config = tmp_path / "gateway.toml"
    config.write_text(DEFAULT_TOML.replace('region = "local"', f'region = "{unique}"')
                      + f'\n[fleet]\nexchange = "iotgw.fleet.{unique}"\n'
                      'announce_interval_s = 0.5\n')
    gw = supervise(tmp_path, "--config", str(config),
                   "--fleet-url", "amqp://guest:guest@127.0.0.1:5672/")
    ports = [w["admin"]["port"] for w in gw.workers()]

    def connections() -> list[int]:
        return [gw.get("/v1/stats", p)["connections"] for p in ports]

    subscriber = socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=10)
    subscriber.sendall(connect_frame("fleet-sub") + bytes([0x82, 13, 0, 1, 0, 8])
                       + b"cmd/dev1" + b"\x01")
    assert _recv_exactly(subscriber, 4)[:1] == b"\x20"
    assert _recv_exactly(subscriber, 5)[:1] == b"\x90"  # SUBACK
    home = connections().index(1)
    publishers = []
    try:
        while True:  # until a publisher lands on the other worker
            s = socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=10)
            publishers.append(s)
            s.sendall(connect_frame(f"fleet-pub-{len(publishers)}"))
            assert _recv_exactly(s, 4)[:1] == b"\x20"
            if connections()[1 - home] == 1:
                break
            assert len(publishers) < 50
        deadline = time.monotonic() + 20
        got = b""
        subscriber.settimeout(0.5)
        while b'{"go": 1}' not in got:  # the other worker learns the filter within a moment
            assert time.monotonic() < deadline, "not delivered across workers"
            publishers[-1].sendall(publish_frame("cmd/dev1", b'{"go": 1}'))
            with contextlib.suppress(TimeoutError):
                got += subscriber.recv(4096)
    finally:
        subscriber.close()
        for s in publishers:
            s.close()
    nodes = {gw.get("/healthz", p)["node_id"] for p in ports}
    assert nodes == {"gw-1-w0", "gw-1-w1"}
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(60) == 0, gw.log_text()
