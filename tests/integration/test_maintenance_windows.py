"""Maintenance windows end to end, as an operator relies on them: reservations from the config,
the admin API and the CLI, granted by the running gateway, their real tasks run, every decision
audited and counted, and critical work never the one that pays for them.

Real sockets throughout: an in-process gateway (``gateway_factory``) where a test registers a
task of its own (``TASKS``) or a slow pipeline stage, a real ``iot-gateway serve`` process
(``start_serve``) otherwise."""

from __future__ import annotations

import gzip
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

import gateway.pipeline
import policies.maintenance
from gateway.audit import audit_files
from policies.maintenance import MaintenanceError
from tests.conftest import (
    CLI,
    DEFAULT_TOML,
    RunningGateway,
    Serve,
    config_text,
    start_serve,
    stop,
)
from tests.gateway.failing_stages import SleepyStage
from tests.raw_mqtt import connect_frame, publish_frame

pytestmark = pytest.mark.integration

BUILTIN_TASKS = "audit-rotation, registry-rebuild, wal-compaction"


# -- helpers ------------------------------------------------------------------------------------
def iso_in(seconds: float) -> str:
    """An ISO 8601 UTC time ``seconds`` from now."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def http(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    """(status, decoded JSON answer) of one admin API call."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def reservations(admin_url: str) -> dict[str, dict[str, Any]]:
    status, answer = http(admin_url + "/v1/maintenance")
    assert status == 200, answer
    return {r["name"]: r for r in answer["reservations"]}


def phase(admin_url: str, name: str) -> str | None:
    listed = reservations(admin_url).get(name)
    return None if listed is None else str(listed["phase"])


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when it is not there)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m[3])
    return 0.0


def scrape(admin_url: str) -> str:
    with urllib.request.urlopen(admin_url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def audit_records(directory: Path) -> list[dict[str, Any]]:
    """Every record of the audit log, compressed files included, in chain order."""
    records: list[dict[str, Any]] = []
    for _, path in audit_files(directory):
        if path.name.endswith(".gz"):
            text = gzip.decompress(path.read_bytes()).decode()
        else:
            text = path.read_text()
        records.extend(json.loads(line) for line in text.splitlines() if line)
    return records


def decisions(directory: Path, name: str) -> list[str]:
    """The maintenance actions audited for reservation ``name``, in order."""
    return [r["action"] for r in audit_records(directory)
            if r["event"] == "maintenance" and r.get("name") == name]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# MQTT, as raw bytes on a real socket (QoS 0: nothing to wait for but the CONNACK).
@pytest.fixture
def mqtt_clients() -> Iterator[Callable[[int, str], socket.socket]]:
    opened: list[socket.socket] = []

    def open_client(port: int, client_id: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        opened.append(s)
        s.sendall(connect_frame(client_id))
        assert s.recv(4)[:1] == b"\x20"  # CONNACK
        return s

    yield open_client
    for s in opened:
        s.close()


# -- a task of the tests' own: it holds its window until the test releases it -----------------
class HoldTask:
    """Holds its window until ``release`` is set. Options: ``work_s`` (seconds of blocking work
    per slice) and ``wait_s`` (what a slice yields: 0 means "ready again at once")."""

    name = "test-hold"
    release: ClassVar[threading.Event] = threading.Event()
    instances: ClassVar[list[HoldTask]] = []

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.work_s = float(options.pop("work_s", 0.0))
        self.wait_s = float(options.pop("wait_s", 0.05))
        if options:
            raise MaintenanceError(f"task 'test-hold': unknown option {sorted(options)[0]!r}")
        self.slices = 0
        self.closed = False
        self.instances.append(self)

    def steps(self, context: Any) -> Iterator[float | None]:
        try:
            while not self.release.is_set():
                self.slices += 1
                if self.work_s:
                    time.sleep(self.work_s)
                yield self.wait_s or None
        finally:
            self.closed = True


@pytest.fixture
def hold(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HoldTask]]:
    """Registers ``test-hold`` (a fresh class per test); request it before ``gateway_factory``
    so that the gateway stops before the registration is undone."""

    class Hold(HoldTask):
        release = threading.Event()
        instances: ClassVar[list[HoldTask]] = []

    monkeypatch.setitem(policies.maintenance.TASKS, "test-hold", Hold)
    yield Hold
    Hold.release.set()


def reservation_toml(name: str, task: str, *, start: str, duration_s: float = 60,
                     min_slots: int = 1, max_slots: int = 2, max_defer_s: float | None = None,
                     options: str = "") -> str:
    lines = ["[[maintenance.reservations]]", f'name = "{name}"', f'task = "{task}"',
             f'start = "{start}"', f"duration_s = {duration_s}", f"min_slots = {min_slots}",
             f"max_slots = {max_slots}"]
    if max_defer_s is not None:
        lines.append(f"max_defer_s = {max_defer_s}")
    if options:
        lines.append(f"options = {options}")
    return "\n".join(lines) + "\n"


# -- 1. a reservation of the config, on a real daemon, with a real task ------------------------
def test_a_config_reservation_is_granted_runs_audit_rotation_and_completes(
        tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, reservation_toml(
        "nightly-audit", "audit-rotation", start=iso_in(2), duration_s=300,
        options="{ retain_days = 30 }")))
    audit_dir = tmp_path / "audit"
    proc = start_serve(tmp_path, "--config", str(config))
    admin = f"http://127.0.0.1:{proc.admin_port}"
    try:
        listed = reservations(admin)["nightly-audit"]
        assert listed["source"] == "config" and listed["task"] == "audit-rotation"
        assert listed["options"] == {"retain_days": 30}
        wait_until(lambda: phase(admin, "nightly-audit") == "done", 20,
                   "the audit-rotation window to complete")
        listed = reservations(admin)["nightly-audit"]
        assert listed["slots"] == 0 and not listed["task_running"]
        metrics = scrape(admin)
        assert metric(metrics, "iotgw_maintenance_decisions_total", action="grant") == 1
        assert metric(metrics, "iotgw_maintenance_decisions_total", action="complete") == 1
        assert metric(metrics, "iotgw_maintenance_tasks_total", task="audit-rotation",
                      outcome="done") == 1
        assert metric(metrics, "iotgw_maintenance_steps_total", task="audit-rotation") >= 1
        assert metric(metrics, "iotgw_maintenance_reserved_slots") == 0
    finally:
        assert stop(proc) == 0, proc.log_text()[-3000:]

    # The task did its work: the file closed by the rotation is compressed, the chain is whole.
    assert list(audit_dir.glob("audit-000001.jsonl.gz")), sorted(audit_dir.iterdir())
    assert not (audit_dir / "audit-000001.jsonl").exists()
    verified = cli("audit", "verify", str(audit_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact" in verified.stdout

    records = audit_records(audit_dir)
    assert decisions(audit_dir, "nightly-audit") == ["grant", "complete"]
    grant = next(r for r in records if r["event"] == "maintenance" and r["action"] == "grant")
    assert grant["slots"] >= 1
    complete = next(r for r in records
                    if r["event"] == "maintenance" and r["action"] == "complete")
    assert complete["reason"] == "task done" and complete["slots"] == 0
    assert [r["outcome"] for r in records if r["event"] == "maintenance.task"] == ["done"]
    archived = [r for r in records if r["event"] == "audit.archived"]
    assert len(archived) == 1 and archived[0]["compressed"] == ["audit-000001.jsonl.gz"]
    assert any(r["event"] == "audit.rotated" for r in records)


# -- the slots a window holds, seen while it runs ----------------------------------------------
def test_reserved_slots_show_while_a_window_runs_and_are_freed_when_its_task_ends(
        hold: type[HoldTask], gateway_factory: Callable[..., RunningGateway],
        tmp_path: Path) -> None:
    # Default dispatch: 4 slots, critical_headroom 0.3 → 2 slots kept for critical work,
    # 2 may be reserved.
    gw = gateway_factory(reservation_toml("hold", "test-hold", start=iso_in(0), max_slots=3))
    wait_until(lambda: phase(gw.admin_url, "hold") == "running", 10, "the window's grant")
    status, answer = http(gw.admin_url + "/v1/maintenance")
    assert status == 200 and answer["reserved_slots"] == 2
    listed = answer["reservations"][0]
    assert listed["slots"] == 2 and listed["task_running"] and listed["window_end"]
    assert metric(gw.metrics(), "iotgw_maintenance_reserved_slots") == 2
    wait_until(lambda: metric(gw.metrics(), "iotgw_maintenance_steps_total",
                              task="test-hold") >= 3, 10, "the task's slices to run")

    hold.release.set()
    wait_until(lambda: phase(gw.admin_url, "hold") == "done", 10, "the task to end its window")
    assert http(gw.admin_url + "/v1/maintenance")[1]["reserved_slots"] == 0
    metrics = gw.metrics()
    assert metric(metrics, "iotgw_maintenance_reserved_slots") == 0
    assert metric(metrics, "iotgw_maintenance_decisions_total", action="grant") == 1
    assert metric(metrics, "iotgw_maintenance_decisions_total", action="complete") == 1
    assert metric(metrics, "iotgw_maintenance_tasks_total", task="test-hold",
                  outcome="done") == 1
    assert decisions(tmp_path / "audit", "hold") == ["grant", "complete"]
    (task,) = [t for t in hold.instances if t.slices]  # others were built to check options
    assert task.closed and task.slices >= 3


# -- 2. the admin API ---------------------------------------------------------------------------
def test_admin_api_schedules_lists_and_cancels_a_window_freeing_its_slots_at_once(
        hold: type[HoldTask], gateway_factory: Callable[..., RunningGateway],
        tmp_path: Path) -> None:
    gw = gateway_factory()
    url = gw.admin_url + "/v1/maintenance"
    body = {"name": "api-hold", "task": "test-hold", "start": iso_in(0), "duration_s": 60,
            "min_slots": 1, "max_slots": 2, "options": {"wait_s": 0.02}}
    status, created = http(url, "POST", json.dumps(body).encode())
    assert status == 201, created
    assert created["name"] == "api-hold" and created["task"] == "test-hold"
    assert created["source"] == "api" and created["phase"] in ("waiting", "running")
    assert (created["min_slots"], created["max_slots"], created["duration_s"]) == (1, 2, 60)
    assert created["options"] == {"wait_s": 0.02}
    assert created["scheduled_start"].endswith("Z")
    state_file = tmp_path / "state" / "maintenance.json"

    def saved() -> list[str] | None:  # written in a thread, off the loop: soon, not at once
        try:
            return [r["name"] for r in json.loads(state_file.read_text())]
        except (OSError, ValueError):
            return None

    wait_until(lambda: saved() == ["api-hold"], 5, "the reservation to be saved")

    wait_until(lambda: phase(gw.admin_url, "api-hold") == "running", 10, "the window's grant")
    status, listed = http(url)
    assert status == 200 and listed["reserved_slots"] == 2
    assert [r["name"] for r in listed["reservations"]] == ["api-hold"]
    assert metric(gw.metrics(), "iotgw_maintenance_reserved_slots") == 2

    status, answer = http(url + "/api-hold", "DELETE")
    assert status == 200 and answer == {"cancelled": "api-hold"}
    # At once: no tick in between.
    status, listed = http(url)
    assert listed == {"reserved_slots": 0, "reservations": []}
    metrics = gw.metrics()
    assert metric(metrics, "iotgw_maintenance_reserved_slots") == 0
    assert metric(metrics, "iotgw_maintenance_decisions_total", action="cancel") == 1
    assert metric(metrics, "iotgw_maintenance_tasks_total", task="test-hold",
                  outcome="cancelled") == 1
    (task,) = [t for t in hold.instances if t.slices]  # others were built to check options
    assert task.closed  # its work was stopped, not left running
    wait_until(lambda: saved() == [], 5, "the cancellation to be saved")

    records = audit_records(tmp_path / "audit")
    scheduled = [r for r in records if r["event"] == "maintenance.scheduled"]
    assert len(scheduled) == 1 and scheduled[0]["name"] == "api-hold"
    assert decisions(tmp_path / "audit", "api-hold") == ["grant", "cancel"]
    cancel = next(r for r in records if r["event"] == "maintenance" and r["action"] == "cancel")
    assert cancel["slots"] == 0 and cancel["reason"] == "cancelled"
    assert [r["outcome"] for r in records if r["event"] == "maintenance.task"] == ["cancelled"]


VALID = {"name": "compact", "task": "wal-compaction", "start": "2099-01-01T02:00:00Z",
         "duration_s": 600, "min_slots": 1, "max_slots": 2}


@pytest.mark.parametrize(("body", "status", "needles"), [
    (b"{not json", 400, ["not JSON"]),
    ({k: v for k, v in VALID.items() if k != "duration_s"}, 400,
     ["missing required field `duration_s`"]),
    ({**VALID, "min_slots": "two"}, 400, ["Expected `int`, got `str`", "min_slots"]),
    ({**VALID, "min_slots": -1}, 400, ["min_slots"]),
    ({**VALID, "duration_s": 0}, 400, ["duration_s"]),
    ({**VALID, "slots": 3}, 400, ["unknown field `slots`"]),
    ({**VALID, "min_slots": 3}, 400, ["`max_slots` (2) must be >= `min_slots` (3)"]),
    ({**VALID, "cron": "0 2 * * *"}, 400, ["exactly one of `start` or `cron`"]),
    ({**VALID, "start": "tomorrow"}, 400, ["`start`: not an ISO 8601 timestamp"]),
    ({**{k: v for k, v in VALID.items() if k != "start"}, "cron": "every night"}, 400,
     ["`cron`: invalid cron expression"]),
    ({**VALID, "task": "defrag"}, 400, [f"unknown task 'defrag' (known: {BUILTIN_TASKS}"]),
    ({**VALID, "options": {"max_live": 0.5}}, 400,
     ["reservation 'compact'", "unknown option 'max_live' (known: max_live_fraction)"]),
    ({**VALID, "task": "audit-rotation", "options": {"retain_days": -1}}, 400,
     ["options.retain_days: expected a number > 0"]),
], ids=["not-json", "missing-field", "wrong-type", "negative", "zero-duration",
        "unknown-field", "max-below-min", "start-and-cron", "bad-start", "bad-cron",
        "unknown-task", "unknown-option", "bad-option-value"])
def test_admin_api_refuses_a_bad_reservation_naming_what_is_wrong(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path,
        body: bytes | dict[str, Any], status: int, needles: list[str]) -> None:
    gw = gateway_factory()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = http(gw.admin_url + "/v1/maintenance", "POST", data)
    assert got == status, answer
    for needle in needles:
        assert needle in answer["error"], answer
    assert reservations(gw.admin_url) == {}  # nothing half-added
    assert not (tmp_path / "state" / "maintenance.json").exists()


def test_admin_api_duplicate_is_409_and_cancelling_an_unknown_name_is_404(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    gw = gateway_factory(reservation_toml("from-config", "wal-compaction",
                                          start="2099-01-01T02:00:00Z"))
    url = gw.admin_url + "/v1/maintenance"
    assert http(url, "POST", json.dumps(VALID).encode())[0] == 201
    status, answer = http(url, "POST", json.dumps({**VALID, "max_slots": 1}).encode())
    assert status == 409 and "'compact' already exists" in answer["error"]
    status, answer = http(url, "POST", json.dumps({**VALID, "name": "from-config"}).encode())
    assert status == 409 and "'from-config' already exists" in answer["error"]
    status, answer = http(url + "/nope", "DELETE")
    assert status == 404 and answer["error"] == "no maintenance reservation named 'nope'"
    listed = reservations(gw.admin_url)
    assert sorted(listed) == ["compact", "from-config"]
    assert listed["compact"]["max_slots"] == 2  # the first one, untouched
    assert listed["from-config"]["source"] == "config"


# -- 3. the CLI against a real daemon -----------------------------------------------------------
def test_cli_schedules_lists_and_cancels_and_a_scheduled_window_survives_a_restart(
        tmp_path: Path) -> None:
    start = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    proc = start_serve(tmp_path)
    admin = f"http://127.0.0.1:{proc.admin_port}"
    try:
        scheduled = cli("maintenance", "schedule", "compact", "--task", "wal-compaction",
                        "--start", start, "--duration", "10m", "--min-slots", "1",
                        "--max-slots", "2", "--option", "max_live_fraction=0.3",
                        "--admin", admin)
        assert scheduled.returncode == 0, scheduled.stderr
        assert scheduled.stdout.strip() == (
            f"scheduled compact: wal-compaction, next window {start}, 1..2 slots")
        listed = cli("maintenance", "list", "--admin", admin)
        assert listed.returncode == 0, listed.stderr
        assert "reserved now: 0 slots" in listed.stdout
        line = next(x for x in listed.stdout.splitlines() if x.startswith("compact"))
        for part in ("wal-compaction", "waiting", "0 slots (1..2)", start, "[api]"):
            assert part in line, line
    finally:
        assert stop(proc) == 0, proc.log_text()[-3000:]

    state = json.loads((tmp_path / "data" / "state" / "maintenance.json").read_text())
    assert [(r["name"], r["duration_s"], r["options"]) for r in state] == [
        ("compact", 600.0, {"max_live_fraction": 0.3})]

    proc = start_serve(tmp_path)  # same working directory: same state_dir
    admin = f"http://127.0.0.1:{proc.admin_port}"
    try:
        as_json = cli("maintenance", "list", "--json", "--admin", admin)
        assert as_json.returncode == 0, as_json.stderr
        (kept,) = json.loads(as_json.stdout)["reservations"]
        assert (kept["name"], kept["task"], kept["phase"], kept["source"]) == (
            "compact", "wal-compaction", "waiting", "api")
        assert (kept["scheduled_start"], kept["duration_s"], kept["min_slots"],
                kept["max_slots"], kept["options"]) == (start, 600, 1, 2,
                                                        {"max_live_fraction": 0.3})

        cancelled = cli("maintenance", "cancel", "compact", "--admin", admin)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == "cancelled compact"
        assert reservations(admin) == {}
        again = cli("maintenance", "cancel", "compact", "--admin", admin)
        assert again.returncode == 1
        assert "no maintenance reservation named 'compact'" in again.stderr
    finally:
        assert stop(proc) == 0, proc.log_text()[-3000:]
    assert json.loads((tmp_path / "data" / "state" / "maintenance.json").read_text()) == []


def test_cli_refuses_a_bad_option_clearly_and_schedules_nothing(tmp_path: Path) -> None:
    proc: Serve = start_serve(tmp_path)
    admin = f"http://127.0.0.1:{proc.admin_port}"
    schedule = ["maintenance", "schedule", "x", "--start", iso_in(3600), "--admin", admin]
    try:
        bad_option = cli(*schedule, "--task", "audit-rotation", "--duration", "10m",
                         "--option", "keep=3")
        assert bad_option.returncode == 1
        assert ("reservation 'x': task 'audit-rotation': unknown option 'keep' "
                "(known: retain_days)") in bad_option.stderr
        unknown_task = cli(*schedule, "--task", "defrag", "--duration", "10m")
        assert unknown_task.returncode == 1
        assert f"unknown task 'defrag' (known: {BUILTIN_TASKS})" in unknown_task.stderr
        bad_duration = cli(*schedule, "--task", "wal-compaction", "--duration", "10 minutes")
        assert bad_duration.returncode == 2  # a usage error, caught before any request
        assert "'10 minutes': expected seconds, or a number with s, m or h" in (
            bad_duration.stderr)
        for result in (bad_option, unknown_task, bad_duration):
            assert "Traceback" not in result.stderr, result.stderr
        assert reservations(admin) == {}  # none of them was scheduled
    finally:
        assert stop(proc) == 0, proc.log_text()[-3000:]


def test_cli_says_clearly_when_the_admin_api_is_unreachable() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    for args in (["list"], ["schedule", "x", "--task", "wal-compaction", "--start",
                            iso_in(60), "--duration", "1m"]):
        unreachable = cli("maintenance", *args, "--admin", nobody)
        assert unreachable.returncode == 1, args
        assert f"cannot reach the admin API at {nobody}" in unreachable.stderr, args
        assert "Traceback" not in unreachable.stderr




def test_cli_cancels_a_reservation_whose_name_has_a_slash(
        gateway_factory: Callable[..., RunningGateway]) -> None:
    gw = gateway_factory()
    scheduled = cli("maintenance", "schedule", "db/nightly", "--task", "wal-compaction",
                    "--start", "2099-01-01T02:00:00Z", "--duration", "1h",
                    "--admin", gw.admin_url)
    assert scheduled.returncode == 0, scheduled.stderr  # accepted by the CLI and the API
    assert "db/nightly" in reservations(gw.admin_url)
    cancelled = cli("maintenance", "cancel", "db/nightly", "--admin", gw.admin_url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert reservations(gw.admin_url) == {}


# -- 4. critical work is never the one that pays ------------------------------------------------
def slow_pipeline_base() -> str:
    """The default config with batches of 8 messages and a pipeline whose ``sleepy`` stage
    sleeps ``data["slow"]`` seconds on a batch holding such a message: a backlog that lasts
    as long as the test needs, however fast the machine."""
    base = DEFAULT_TOML.replace("batch_size = 512", "batch_size = 8")
    assert "slots = 4 " in base
    return base.replace('{ type = "validate" },', '{ type = "sleepy", seconds = 0.0 },')


def latency_mean(metrics: str, tier: str) -> float:
    count = metric(metrics, "iotgw_processing_latency_seconds_count", tier=tier)
    assert count > 0, tier
    return metric(metrics, "iotgw_processing_latency_seconds_sum", tier=tier) / count


def test_critical_work_stays_prompt_under_a_window_and_pauses_it_when_it_needs_the_room(
        hold: type[HoldTask], gateway_factory: Callable[..., RunningGateway],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        mqtt_clients: Callable[[int, str], socket.socket]) -> None:
    monkeypatch.setitem(gateway.pipeline.STAGES, "sleepy", SleepyStage)
    # 4 slots, headroom ceil(4 × 0.25) = 1: a window of exactly 2 slots fits while critical
    # load stays under 2 slots, and is paused once it needs 3 or more. Its task is always
    # ready (a slice of 1 ms of blocking work), so it takes its 2 slots at every drain.
    gw = gateway_factory("[maintenance]\ncritical_headroom = 0.25\n\n" + reservation_toml(
        "busy", "test-hold", start=iso_in(0), duration_s=120, min_slots=2, max_slots=2,
        options="{ work_s = 0.001, wait_s = 0 }"), base=slow_pipeline_base())
    wait_until(lambda: phase(gw.admin_url, "busy") == "running", 10, "the window's grant")
    assert reservations(gw.admin_url)["busy"]["slots"] == 2
    routine = mqtt_clients(gw.mqtt_port, "meter-1")
    critical = mqtt_clients(gw.mqtt_port, "monitor-1")

    # Routine backlog: 4000 standard messages, 500 batches of at least 5 ms each.
    standard = 4000
    routine.sendall(b"".join(publish_frame("telemetry/x", b'{"slow": 0.005, "i": %d}' % i)
                             for i in range(standard)))
    wait_until(lambda: metric(gw.metrics(), "iotgw_queue_depth", lane="standard") > 0, 10,
               "the routine backlog")
    # A trickle of critical readings while the backlog waits and the window holds its slots.
    trickle = 25
    for i in range(trickle):
        critical.sendall(publish_frame("medical/x", b'{"i": %d}' % i))
        time.sleep(0.03)
    metrics = gw.metrics()
    assert metric(metrics, "iotgw_queue_depth", lane="standard") > 0, "backlog gone too soon"
    assert metric(metrics, "iotgw_maintenance_reserved_slots") == 2
    assert reservations(gw.admin_url)["busy"]["phase"] == "running"
    gw.wait_processed(standard + trickle, timeout=30)
    metrics = gw.metrics()
    assert metric(metrics, "iotgw_processing_latency_seconds_count", tier="critical") == trickle
    critical_mean = latency_mean(metrics, "critical")
    standard_mean = latency_mean(metrics, "standard")
    assert critical_mean * 5 < standard_mean, (critical_mean, standard_mean)
    assert "pause" not in decisions(tmp_path / "audit", "busy")

    # A critical flood: 3000 readings, 375 batches of at least 5 ms, more than the 4 slots
    # can serve within a tick: the window must give its slots back.
    critical.sendall(b"".join(publish_frame("medical/x", b'{"slow": 0.005, "i": %d}' % i)
                              for i in range(3000)))
    wait_until(lambda: "pause" in decisions(tmp_path / "audit", "busy"), 15,
               "the window to be paused")
    wait_until(lambda: "resume" in decisions(tmp_path / "audit", "busy"), 20,
               "the window to resume once the flood is served")
    gw.wait_processed(standard + trickle + 3000, timeout=30)
    hold.release.set()
    wait_until(lambda: phase(gw.admin_url, "busy") == "done", 10, "the window to complete")

    actions = decisions(tmp_path / "audit", "busy")
    assert actions[0] == "grant" and actions[-1] == "complete", actions
    assert actions.index("pause") < actions.index("resume"), actions
    records = audit_records(tmp_path / "audit")
    pause = next(r for r in records if r["event"] == "maintenance" and r["action"] == "pause")
    assert pause["slots"] == 0 and "critical load" in pause["reason"], pause
    metrics = gw.metrics()
    for action in ("grant", "pause", "resume", "complete"):
        assert metric(metrics, "iotgw_maintenance_decisions_total", action=action) == (
            actions.count(action)), action
    assert metric(metrics, "iotgw_maintenance_reserved_slots") == 0


def test_a_window_shrinks_toward_min_under_routine_backlog_and_grows_back_after(
        hold: type[HoldTask], gateway_factory: Callable[..., RunningGateway],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        mqtt_clients: Callable[[int, str], socket.socket]) -> None:
    monkeypatch.setitem(gateway.pipeline.STAGES, "sleepy", SleepyStage)
    # 4 slots, 2 kept for critical work (headroom 0.3): the window gets 2 while idle, and
    # only its min_slots (1) while routine work needs every slot.
    gw = gateway_factory(reservation_toml("flex", "test-hold", start=iso_in(0), min_slots=1,
                                          max_slots=2), base=slow_pipeline_base())
    wait_until(lambda: phase(gw.admin_url, "flex") == "running", 10, "the window's grant")
    assert reservations(gw.admin_url)["flex"]["slots"] == 2
    routine = mqtt_clients(gw.mqtt_port, "meter-2")
    standard = 4000  # 500 batches of at least 5 ms: a backlog that outlasts a few ticks
    routine.sendall(b"".join(publish_frame("telemetry/x", b'{"slow": 0.005, "i": %d}' % i)
                             for i in range(standard)))
    wait_until(lambda: "shrink" in decisions(tmp_path / "audit", "flex"), 10,
               "the window to shrink")
    gw.wait_processed(standard, timeout=30)  # routine work is slowed, never starved
    wait_until(lambda: "grow" in decisions(tmp_path / "audit", "flex"), 10,
               "the window to grow back")
    assert reservations(gw.admin_url)["flex"]["slots"] == 2
    assert metric(gw.metrics(), "iotgw_maintenance_reserved_slots") == 2

    records = [r for r in audit_records(tmp_path / "audit")
               if r["event"] == "maintenance" and r["name"] == "flex"]
    assert [r["action"] for r in records] == ["grant", "shrink", "grow"], records
    assert [r["slots"] for r in records] == [2, 1, 2]
    assert "routine load rose" in records[1]["reason"]
    assert "routine load fell" in records[2]["reason"]
    metrics = gw.metrics()
    for action in ("grant", "shrink", "grow"):
        assert metric(metrics, "iotgw_maintenance_decisions_total", action=action) == 1


def test_a_window_that_would_eat_the_critical_headroom_is_deferred_then_skipped(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    # critical_headroom = 1.0: every slot is kept for critical work, nothing can be reserved.
    gw = gateway_factory("[maintenance]\ncritical_headroom = 1.0\n\n" + reservation_toml(
        "rotate", "audit-rotation", start=iso_in(0), min_slots=1, max_slots=1,
        max_defer_s=2))
    wait_until(lambda: phase(gw.admin_url, "rotate") == "done", 15, "the skip")
    assert decisions(tmp_path / "audit", "rotate") == ["defer", "skip"]
    records = [r for r in audit_records(tmp_path / "audit") if r["event"] == "maintenance"]
    assert all(r["slots"] == 0 for r in records), records
    assert "max_defer_s=2" in records[1]["reason"], records[1]
    metrics = gw.metrics()
    assert metric(metrics, "iotgw_maintenance_decisions_total", action="defer") == 1
    assert metric(metrics, "iotgw_maintenance_decisions_total", action="skip") == 1
    assert metric(metrics, "iotgw_maintenance_decisions_total", action="grant") == 0
    assert metric(metrics, "iotgw_maintenance_steps_total", task="audit-rotation") == 0
    assert not list((tmp_path / "audit").glob("*.gz"))  # the task never ran




def test_a_one_off_window_that_already_ran_does_not_run_again_after_a_restart(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    first = gateway_factory()
    body = {"name": "once", "task": "audit-rotation", "start": iso_in(0), "duration_s": 60,
            "min_slots": 1, "max_slots": 1}
    assert http(first.admin_url + "/v1/maintenance", "POST", json.dumps(body).encode())[0] == 201
    wait_until(lambda: phase(first.admin_url, "once") == "done", 10, "the window to complete")
    first.stop()
    assert decisions(tmp_path / "audit", "once") == ["grant", "complete"]

    second = gateway_factory()  # the same state_dir and audit dir: a restart
    time.sleep(3)  # three ticks of the planner
    assert phase(second.admin_url, "once") is None  # over: not kept for the next start
    assert decisions(tmp_path / "audit", "once") == ["grant", "complete"]
    rotations = [r for r in audit_records(tmp_path / "audit")
                 if r["event"] == "audit.rotated" and r.get("reason") == "maintenance"]
    assert len(rotations) == 1


# -- 5. a bad reservation in the config is a configuration error --------------------------------


@pytest.mark.parametrize("command", [
    "check-config",
    "serve",
])
@pytest.mark.parametrize(("task", "options", "needle"), [
    ("defrag", "", f"unknown task 'defrag' (known: {BUILTIN_TASKS})"),
    ("audit-rotation", "{ keep = 3 }", "unknown option 'keep' (known: retain_days)"),
    ("wal-compaction", "{ max_live_fraction = 2 }",
     "options.max_live_fraction: expected a number in (0, 1], got 2"),
], ids=["unknown-task", "unknown-option", "bad-option-value"])
def test_a_bad_reservation_in_the_config_exits_2_naming_it(
        tmp_path: Path, command: str, task: str, options: str, needle: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, reservation_toml(
        "nightly", task, start="2099-01-01T02:00:00Z", options=options)))
    args = ([command, str(config)] if command == "check-config" else
            [command, "--config", str(config), "--mqtt-listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0"])
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "reservation 'nightly'" in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr
    assert str(config) in result.stderr
