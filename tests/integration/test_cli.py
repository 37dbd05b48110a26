"""The ``iot-gateway`` command as operators run it: a real process, real signals, real peers."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLI, start_serve, stop

pytestmark = pytest.mark.integration

@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients missing")
def test_serve_answers_mosquitto_pub_and_drains_on_sigterm(tmp_path: Path) -> None:
    proc = start_serve(tmp_path)
    mqtt_port = proc.mqtt_port
    try:
        for qos in (0, 1, 2):
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt_port),
                            "-i", "valve-9", "-q", str(qos), "-t", "safety/valve-9",
                            "-m", json.dumps({"qos": qos})], check=True, timeout=10)
    finally:
        assert stop(proc) == 0
    lines = [json.loads(line) for p in (tmp_path / "data" / "lake").rglob("*.jsonl")
             for line in p.read_text().splitlines()]
    assert sorted(r["payload"]["qos"] for r in lines) == [0, 1, 2]
    assert {r["tier"] for r in lines} == {"critical"}


def test_serve_refuses_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*CLI, "serve", "--mqtt-listen", f"127.0.0.1:{port}",
                                 "--admin-listen", "127.0.0.1:0", "--coap-listen", "127.0.0.1:0"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert f"cannot listen for MQTT on 127.0.0.1:{port}: address already in use" in result.stderr
    assert "--mqtt-listen" in result.stderr


def test_check_config_accepts_the_default_config() -> None:
    default = Path(__file__).parents[2] / "config" / "gateway.toml"
    result = subprocess.run([*CLI, "check-config", str(default)], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(("toml", "message"), [
    ('[[tiers]]\nname = "a"\nmax_latency_ms = 0\n', "tiers[0].max_latency_ms: expected"),
    ('[[tiers]]\nname = "standard"\nmax_latency_ms = 5\n[mqtt]\nlisten = 1883\n',
     "mqtt.listen: expected `str`"),
    ('[[tiers]]\nname = "standard"\nmax_latency_ms = 5\n[[pipelines]]\nname = "p"\n'
     'stages = [{ type = "nope" }]\n', "pipelines[0].stages[0].type: unknown stage 'nope'"),
    ('[[tiers]]\nname = "standard"\nmax_latency_ms = 5\nsurprise = 1\n',
     "unknown field `surprise`"),
    ("this is not toml", "line 1"),
])
def test_check_config_names_the_place_of_each_error(tmp_path: Path, toml: str,
                                                    message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = subprocess.run([*CLI, "check-config", str(path)], capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 2
    assert message in result.stderr
    assert str(path) in result.stderr


def test_serve_with_an_invalid_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[tiers]]\nname = "a"\nmax_latency_ms = -1\n')
    result = subprocess.run([*CLI, "serve", "--config", str(path)], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 2
    assert "tiers[0].max_latency_ms" in result.stderr
    missing = subprocess.run([*CLI, "serve", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, timeout=20)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_bench_prints_rates_ratios_and_latency(tmp_path: Path) -> None:
    """The benchmark command runs end to end (figures are not asserted: the machine is shared)."""
    result = subprocess.run([*CLI, "bench", "--messages", "4000", "--connections", "2",
                             "--paced-rate", "2000", "--json"],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = {(r["server"], r["qos"]): r for r in json.loads(result.stdout)}
    for key in [("iot-gateway", 0), ("iot-gateway", 1), ("iot-gateway, paced", 1),
                ("iot-gateway, no WAL", 1)]:
        assert runs[key]["messages"] > 0 and runs[key]["rate"] > 0, key
    assert set(runs[("iot-gateway, paced", 0)]["latency_ms"]) == {
        "critical", "premium", "standard", "bulk"}
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        assert runs[("mosquitto", 1)]["rate"] > 0
