"""sd_notify over real unix datagram sockets, the watchdog variables, and the unit file."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import systemd

UNIT = Path(__file__).parents[2] / "systemd" / "iot-gateway.service"


@pytest.fixture(autouse=True)
def fresh_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    systemd.close()
    yield
    systemd.close()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket bound to a path (short: sun_path holds 108 bytes), as systemd's."""
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    shutil.rmtree(directory)


def test_notify_sends_one_datagram_to_a_path(receiver: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=serving MQTT on 0.0.0.0:1883")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving MQTT on 0.0.0.0:1883"
    assert systemd.notify("WATCHDOG=1")
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_notify_reaches_the_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"iotgw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1", "STATUS=draining")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_the_socket_is_created_once_and_kept(receiver: socket.socket) -> None:
    assert systemd._socket is None  # lazily: nothing before the first notify
    systemd.notify("STATUS=a")
    first = systemd._socket
    systemd.notify("STATUS=b")
    assert first is not None and systemd._socket is first
    assert [receiver.recv(64), receiver.recv(64)] == [b"STATUS=a", b"STATUS=b"]
    systemd.close()
    assert systemd._socket is None
    systemd.notify("STATUS=c")  # a new one after close
    assert receiver.recv(64) == b"STATUS=c"


def test_reloading_carries_a_monotonic_timestamp(receiver: socket.socket) -> None:
    before = time.monotonic_ns() // 1000
    assert systemd.reloading()
    reloading, stamp = receiver.recv(4096).decode().split("\n")
    after = time.monotonic_ns() // 1000
    assert reloading == "RELOADING=1"
    assert stamp.startswith("MONOTONIC_USEC=")
    assert before <= int(stamp.removeprefix("MONOTONIC_USEC=")) <= after


def test_a_newline_cannot_inject_another_assignment(receiver: socket.socket) -> None:
    assert systemd.notify("STATUS=bad\nREADY=1")
    assert receiver.recv(4096) == b"STATUS=bad READY=1"


def test_without_notify_socket_it_is_a_no_op() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd._socket is None


def test_nothing_to_send(receiver: socket.socket) -> None:
    assert systemd.notify() is False


def test_failures_are_logged_at_debug_and_never_raise(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="iotgw.systemd")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]
    assert "failed" in caplog.records[0].getMessage()
    assert "unsupported" in caplog.records[1].getMessage()


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),  # inherited by a child: not ours to ping
    ("1000", "", 0.0005),
    ("0", None, None),
    ("-5", None, None),
    ("", None, None),
    ("soon", None, None),
    ("30000000", "not-a-pid", None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert systemd.watchdog_interval() == expected


# -- the unit file ---------------------------------------------------------------------
def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines → key → values (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_settings() -> None:
    settings = unit_settings(UNIT.read_text())
    one = {key: values[-1] for key, values in settings.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == ("/usr/local/bin/iot-gateway serve "
                                "--config /etc/iot-gateway/gateway.toml")
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["WatchdogSec"] == "30s"
    assert (one["Restart"], one["RestartSec"]) == ("on-failure", "2s")
    assert one["RestartPreventExitStatus"] == "2"  # a config error is not retried
    assert one["TimeoutStopSec"] == "60s" and one["KillSignal"] == "SIGTERM"
    assert one["StateDirectory"] == one["User"] == one["Group"] == "iot-gateway"
    assert one["WorkingDirectory"] == "/var/lib/iot-gateway"
    assert one["LimitNOFILE"] == "1048576"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert "@system-service" in settings["SystemCallFilter"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert "MemoryDenyWriteExecute" not in settings  # deliberately off: see the comment


def systemd_analyze_verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=unit.parent)


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


@needs_systemd_analyze
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "iot-gateway.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/iot-gateway", sys.executable))
    result = systemd_analyze_verify(unit)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@needs_systemd_analyze
def test_shipped_unit_only_lacks_the_installed_binary(tmp_path: Path) -> None:
    unit = tmp_path / "iot-gateway.service"
    shutil.copy(UNIT, unit)
    result = systemd_analyze_verify(unit)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if Path("/usr/local/bin/iot-gateway").exists():
        assert complaints == []
    else:
        assert complaints, "expected systemd-analyze to miss /usr/local/bin/iot-gateway"
        for line in complaints:
            assert "/usr/local/bin/iot-gateway" in line, line
