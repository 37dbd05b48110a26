"""Nothing acknowledged is ever lost: kill -9, corrupt logs, a full disk, drain, reload,
upgrade handover, a tampered audit log. Real processes, real clients, real files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import CLI, DEFAULT_TOML, Serve, admin_get, start_serve, stop

pytestmark = pytest.mark.integration


def lake_payloads(root: Path) -> list[Any]:
    out = []
    for path in sorted((root / "data" / "lake").rglob("*.jsonl")):
        out += [json.loads(line)["payload"] for line in path.read_text().splitlines() if line]
    return out


def wait_idle(proc: Serve, timeout: float = 30) -> dict[str, Any]:
    """Until everything received or replayed is processed and retired from the WAL."""
    deadline = time.monotonic() + timeout
    while True:
        stats = admin_get(proc.admin_port, "/v1/stats")
        if not stats["queued"] and not stats["pending"] and not stats["wal_unretired"]:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


class Publisher:
    """A paho client publishing QoS 1 messages numbered 0, 1, 2, … and noting every PUBACK."""

    def __init__(self, port: int, version: int = paho.MQTTv311, client_id: str = "seq") -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=version)
        self.client.max_inflight_messages_set(500)
        self.seq_of_mid: dict[int, int] = {}
        # Filled by paho's network thread; resolved to sequence numbers by the properties.
        self.answers: list[tuple[int, bool]] = []  # (mid, refused)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.next_seq = 0

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.answers.append((mid, rc.is_failure))

    def _answered(self, refused: bool) -> set[int]:
        # Fewer than 65,535 messages per test: a mid names one message.
        return {self.seq_of_mid[mid] for mid, failed in list(self.answers)
                if failed is refused and mid in self.seq_of_mid}

    @property
    def acked(self) -> set[int]:
        return self._answered(False)

    @property
    def refused(self) -> set[int]:
        return self._answered(True)

    def publish(self, count: int, topic: str = "telemetry/seq") -> None:
        for _ in range(count):
            info = self.client.publish(topic, json.dumps({"seq": self.next_seq}), qos=1)
            self.seq_of_mid[info.mid] = self.next_seq
            self.next_seq += 1

    def wait_acked(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for _, failed in list(self.answers) if not failed) < n:
            assert time.monotonic() < deadline, (len(self.acked), n)
            time.sleep(0.01)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_kill_9_during_a_qos1_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    gw = start_serve(tmp_path)
    publisher = Publisher(gw.mqtt_port)
    sender = threading.Thread(target=publisher.publish, args=(20_000,), daemon=True)
    sender.start()
    publisher.wait_acked(3_000)
    # Mid-stream, with records not yet retired (sinks flush and the log retires once a
    # second): on a loaded machine the stream may pause long enough for all to be retired.
    deadline = time.monotonic() + 10
    while not admin_get(gw.admin_port, "/v1/stats")["wal_unretired"]:
        assert time.monotonic() < deadline, "nothing unretired to kill during"
        time.sleep(0.002)
    os.kill(gw.pid, signal.SIGKILL)
    gw.wait(10)
    sender.join(30)
    publisher.close()
    acked = set(publisher.acked)
    assert len(acked) >= 3_000

    restarted = start_serve(tmp_path)
    wait_idle(restarted)
    assert stop(restarted) == 0
    seqs = [p["seq"] for p in lake_payloads(tmp_path)]
    missing = acked - set(seqs)
    duplicates = len(seqs) - len(set(seqs))
    print(f"acked {len(acked)}, in the lake {len(set(seqs))}, duplicates {duplicates}")
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert "replaying" in restarted.log_text()


def test_sigterm_drains_and_the_next_start_has_nothing_to_replay(tmp_path: Path) -> None:
    gw = start_serve(tmp_path)
    publisher = Publisher(gw.mqtt_port)
    publisher.publish(2_000)
    publisher.wait_acked(2_000)
    publisher.close()
    assert stop(gw) == 0
    assert sorted(p["seq"] for p in lake_payloads(tmp_path)) == list(range(2_000))
    again = start_serve(tmp_path)
    assert stop(again) == 0
    assert "replaying" not in again.log_text()


def test_drain_command_stops_a_running_gateway(tmp_path: Path) -> None:
    gw = start_serve(tmp_path)
    result = subprocess.run([*CLI, "drain", "--admin", f"http://127.0.0.1:{gw.admin_port}"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert gw.wait(30) == 0
    assert "draining (admin drain)" in gw.log_text()


def test_drain_command_says_when_no_gateway_answers(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "drain", "--admin", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "cannot reach the admin API" in result.stderr


def test_upgrade_handover_on_the_same_port(tmp_path: Path) -> None:
    old = start_serve(tmp_path)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="upgrader",
                         protocol=paho.MQTTv5)
    reasons: list[int] = []
    client.on_disconnect = lambda c, u, flags, rc, props: reasons.append(rc.value)
    client.reconnect_delay_set(0.1, 0.5)
    client.connect("127.0.0.1", old.mqtt_port)
    client.loop_start()
    infos = [client.publish("telemetry/up", json.dumps({"seq": i}), qos=1) for i in range(500)]
    for info in infos:
        info.wait_for_publish(10)
    # The new version starts beside the old one, on the same port (SO_REUSEPORT).
    new = start_serve(tmp_path, mqtt=f"127.0.0.1:{old.mqtt_port}")
    assert new.mqtt_port == old.mqtt_port
    assert stop(old) == 0  # the old one drains; MQTT 5 clients hear 0x8B and reconnect
    deadline = time.monotonic() + 10
    while not client.is_connected() or not reasons:
        assert time.monotonic() < deadline, reasons
        time.sleep(0.05)
    assert 0x8B in reasons
    for seq in range(500, 1000):  # at least once: republish what a reconnect interrupted
        for _attempt in range(50):
            try:
                client.publish("telemetry/up", json.dumps({"seq": seq}), qos=1
                               ).wait_for_publish(10)
                break
            except RuntimeError:
                time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    wait_idle(new)
    assert stop(new) == 0
    seqs = {p["seq"] for p in lake_payloads(tmp_path)}
    assert seqs >= set(range(1000)), sorted(set(range(1000)) - seqs)[:5]


def test_corrupt_wal_tail_is_cut_and_the_rest_replayed(tmp_path: Path) -> None:
    gw = start_serve(tmp_path)
    publisher = Publisher(gw.mqtt_port)
    publisher.publish(500)
    publisher.wait_acked(500)
    os.kill(gw.pid, signal.SIGKILL)
    gw.wait(10)
    publisher.close()
    segments = sorted((tmp_path / "data" / "state" / "wal").rglob("wal-*.log"))
    assert segments
    biggest = max(segments, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    cut = len(data) * 2 // 3
    data[cut] ^= 0xFF  # a bit flip, then a torn tail
    biggest.write_bytes(bytes(data[: len(data) - 7]))
    restarted = start_serve(tmp_path)
    wait_idle(restarted)
    assert stop(restarted) == 0
    log = restarted.log_text()
    assert "WARNING" in log and biggest.name in log
    seqs = {p["seq"] for p in lake_payloads(tmp_path)}
    assert seqs  # what came before the damage was replayed


def test_unusable_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "state").write_text("not a directory")
    result = subprocess.run([*CLI, "serve", "--mqtt-listen", "127.0.0.1:0",
                             "--admin-listen", "127.0.0.1:0", "--coap-listen", "127.0.0.1:0"],
                            cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "state directory" in result.stderr and "data/state" in result.stderr


def test_sighup_keeps_the_old_config_when_the_new_one_is_invalid(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(DEFAULT_TOML)
    gw = start_serve(tmp_path, "--config", str(config))
    config.write_text(DEFAULT_TOML.replace("max_latency_ms = 100", "max_latency_ms = -5"))
    gw.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in gw.log_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "tiers[0].max_latency_ms" in gw.log_text()
    # Still serving, on the old config: medical/# is still critical.
    subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt_port), "-q", "1", "-t", "medical/a",
                    "-m", "{}"], check=True, timeout=10)
    # A valid change is taken whole: a new rule sends medical/# to bulk.
    config.write_text(DEFAULT_TOML.replace('match = { topic = "medical/#" }\ntier = "critical"',
                                           'match = { topic = "medical/#" }\ntier = "bulk"'))
    gw.send_signal(signal.SIGHUP)
    while "reloaded" not in gw.log_text():
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    subprocess.run(["mosquitto_pub", "-p", str(gw.mqtt_port), "-q", "1", "-t", "medical/b",
                    "-m", "{}"], check=True, timeout=10)
    wait_idle(gw)
    assert stop(gw) == 0
    tiers = {}
    for path in (tmp_path / "data" / "lake").rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            tiers[record["topic"]] = record["tier"]
    assert tiers == {"medical/a": "critical", "medical/b": "bulk"}
    audit = "".join(p.read_text() for p in sorted((tmp_path / "data" / "audit").glob("*.jsonl")))
    events = [json.loads(line) for line in audit.splitlines()]
    reloads = [e for e in events if e["event"] == "reload"]
    assert [r["accepted"] for r in reloads] == [False, True]
    assert "tiers[0].max_latency_ms" in reloads[0]["reason"]


def test_the_audit_trail_verifies_and_tampering_is_detected(tmp_path: Path) -> None:
    gw = start_serve(tmp_path)
    gw.send_signal(signal.SIGHUP)  # a reload of the built-in config: one more record
    deadline = time.monotonic() + 10
    while "reloaded" not in gw.log_text():
        assert time.monotonic() < deadline, gw.log_text()
        time.sleep(0.05)
    assert stop(gw) == 0
    audit_dir = tmp_path / "data" / "audit"
    ok = subprocess.run([*CLI, "audit", "verify", str(audit_dir)], capture_output=True,
                        text=True, timeout=20)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    events = [json.loads(line)["event"] for p in sorted(audit_dir.glob("*.jsonl"))
              for line in p.read_text().splitlines()]
    assert events[0] == "start" and "drain" in events and "stopped" in events
    first = sorted(audit_dir.glob("*.jsonl"))[0]
    lines = first.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"reload"', '"reloa"', 1)
    first.write_text("".join(lines))
    bad = subprocess.run([*CLI, "audit", "verify", str(audit_dir)], capture_output=True,
                         text=True, timeout=20)
    assert bad.returncode == 1
    assert f"{first.name}:" in bad.stdout + bad.stderr


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_new_qos1_work_and_recovers(tmp_path: Path, tiny_disk: Path) -> None:
    filler = tiny_disk / "filler"
    config = tmp_path / "gw.toml"
    config.write_text(DEFAULT_TOML.replace('state_dir = "./data/state"',
                                           f'state_dir = "{tiny_disk}/state"'))
    gw = start_serve(tmp_path, "--config", str(config))
    publisher = Publisher(gw.mqtt_port, version=paho.MQTTv5)
    publisher.publish(100)
    publisher.wait_acked(100)
    # Fill the disk, then publish: the commits fail and MQTT 5 PUBACKs say 0x97.
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    publisher.publish(300)
    deadline = time.monotonic() + 20
    while not publisher.refused:
        assert time.monotonic() < deadline, "no refusal on a full disk"
        time.sleep(0.05)
    # Space returns: new work is taken again.
    filler.unlink()
    time.sleep(2.5)
    before = len(publisher.acked)
    publisher.publish(100)
    deadline = time.monotonic() + 20
    while len(publisher.acked) < before + 100:
        assert time.monotonic() < deadline, "no recovery after space returned"
        time.sleep(0.05)
    publisher.close()
    wait_idle(gw)
    refused = admin_get(gw.admin_port, "/v1/stats")["refused"]
    assert stop(gw) == 0
    assert refused >= len(publisher.refused) > 0
    seqs = {p["seq"] for p in lake_payloads(tmp_path)}
    assert publisher.acked <= seqs


def test_systemd_notifications_from_a_real_daemon(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(sock_path))
        notify.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        proc = subprocess.Popen([*CLI, "serve", "--mqtt-listen", "127.0.0.1:0",
                                 "--admin-listen", "127.0.0.1:0", "--coap-listen", "127.0.0.1:0"],
                                cwd=tmp_path, env=env,
                                stderr=subprocess.DEVNULL)
        try:
            messages: list[str] = []
            while not any("READY=1" in m for m in messages):
                messages.append(notify.recv(4096).decode())
            ready = next(m for m in messages if "READY=1" in m)
            assert "STATUS=serving MQTT on 127.0.0.1:" in ready
            while "WATCHDOG=1" not in messages[-1]:  # pinged from the event loop
                messages.append(notify.recv(4096).decode())
            proc.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages[-1]:
                messages.append(notify.recv(4096).decode())
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
