"""``iot-gateway simulate``: a synthetic fleet against a real gateway process, over real MQTT
and CoAP sockets, judged by its JSON summary and by the gateway's own figures."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.simulate_scenario import Fleet, load_scenario, parse_scenario, shape, shrunk
from tests.conftest import CLI, admin_get, config_text, start_serve, stop

pytestmark = pytest.mark.integration

SCENARIOS = sorted((Path(__file__).parents[2] / "config" / "scenarios").glob("*.toml"))
TIERS = ("critical", "premium", "standard", "bulk")

# 20,000 devices over 200 connections (5 % over CoAP); 80 % of the fleet drops at 3 s and
# flushes two buffered readings per device at QoS 1 on reconnect; five heart rates of 210
# from five medical devices; a little churn.
BURST = """
name = "test-sync-burst"

[time]
duration_s = 9
day_s = 60
start = "mon 07:00"

[fleet]
devices = 20_000
connections = 200
tenants = 20
coap_share = 0.05
coap_sockets = 8

[[fleet.groups]]
tier = "critical"
share = 0.1
topic = "medical/{device}/vitals"
device_class = "medical"
fields = { heart_rate = [55.0, 100.0], spo2 = [94.0, 100.0] }

[[fleet.groups]]
tier = "premium"
share = 0.2
topic = "fleet/{device}/telemetry"
username = "premium-gw-{n}"

[[fleet.groups]]
tier = "standard"
share = 0.6
topic = "fleet/{device}/telemetry"

[[fleet.groups]]
tier = "bulk"
share = 0.1
topic = "bulk/{device}/logs"

[[fleet.regions]]
name = "eu-west"
share = 0.6

[[fleet.regions]]
name = "us-east"
share = 0.4

[load]
rate = 1_500
qos1_share = 0.9

[[bursts]]
at_s = 3
share = 0.8
offline_s = 0.5
buffered = 2

[[spikes]]
region = "us-east"
at_s = 6
duration_s = 2
factor = 3

[[anomalies]]
group = "critical"
field = "heart_rate"
value = 210.0
at_s = [1, 2, 4, 5, 7]

[churn]
per_minute = 1.0
"""


def simulate(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "simulate", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def gateway_config(tmp_path: Path, registry: Path) -> Path:
    """The built-in config, reading the device from the topic and tiers from the fleet's
    registry."""
    text, n = re.subn(r'^device_id = "client_id".*$',
                      f'device_id = "topic"\ndevice_topic_level = 1\n'
                      f'registry = {json.dumps(str(registry))}',
                      config_text(tmp_path), count=1, flags=re.MULTILINE)
    assert n == 1, "config/gateway.toml no longer has [classify] device_id = \"client_id\""
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_every_example_scenario_parses_and_lays_out_its_fleet(path: Path) -> None:
    scenario = load_scenario(path)
    fleet = Fleet(scenario)
    assert fleet.devices == scenario.fleet.devices
    assert fleet.connections >= len(scenario.fleet.groups)


def test_the_fleet_layout_gives_every_mqtt_device_one_connection() -> None:
    fleet = Fleet(parse_scenario(BURST))
    assert fleet.devices == 20_000 and fleet.connections == 200
    assert fleet.coap_devices == 1_000
    seen: list[int] = []
    for g, count in enumerate(fleet.group_connections):
        for c in range(count):
            devices = list(fleet.mqtt_devices_of(g, c))
            assert all(fleet.connection_of(g, d) == c for d in devices)
            seen += devices
    assert sorted(seen) == sorted(set(range(20_000)) - set(fleet.coap_devices_of()))
    assert {fleet.regions[b.region] for b in fleet.blocks} == {"eu-west", "us-east"}


def test_shrinking_keeps_the_story_and_the_shape() -> None:
    daily = ", ".join(str(h / 23) for h in range(24))
    scenario = parse_scenario(BURST.replace("qos1_share = 0.9", f"qos1_share = 0.9\n"
                                            f"daily = [{daily}]\nweekly = [1, 1, 1, 1, 1, "
                                            f"0.5, 0.5]"))
    small = shrunk(scenario, duration_s=4.5, scale=0.5)
    assert small.time.duration_s == 4.5 and small.time.day_s == 30
    assert small.bursts[0].at_s == 1.5 and small.spikes[0].duration_s == 1
    assert small.anomalies[0].at_s == [0.5, 1, 2, 2.5, 3.5]
    assert small.churn.per_minute == 2.0
    assert small.fleet.devices == 10_000 and small.fleet.connections == 100
    assert small.load.rate == 750
    # mon 07:00 → 11:00 over the first 10 s of a 60 s day: the daily factor rises
    assert shape(scenario, 0) == pytest.approx(7 / 23)
    assert shape(scenario, 2.5) == pytest.approx(8 / 23)
    assert shape(small, 1.25) == pytest.approx(8 / 23)
    assert shape(scenario, 5 * 60) == pytest.approx(0.5 * 7 / 23)  # saturday 07:00


def test_examples_include_each_kind_of_load() -> None:
    kinds = {path.stem for path in SCENARIOS}
    assert {"steady-daily", "sync-burst", "regional-spike", "anomalies-and-churn"} <= kinds


@pytest.mark.slow
def test_a_synchronisation_burst_is_acknowledged_processed_and_summarised(
        tmp_path: Path) -> None:
    scenario = tmp_path / "burst.toml"
    scenario.write_text(BURST)
    registry = tmp_path / "fleet.csv"
    written = simulate(tmp_path, str(scenario), "--write-registry", str(registry))
    assert written.returncode == 0, written.stderr
    assert registry.read_text().count("\n") == 20_001

    gw = start_serve(tmp_path, "--config", str(gateway_config(tmp_path, registry)))
    try:
        coap_port = admin_get(gw.admin_port, "/healthz")["listeners"]["coap"]["port"]
        run = simulate(tmp_path, str(scenario), "--json",
                       "--mqtt", f"127.0.0.1:{gw.mqtt_port}", "--coap", f"127.0.0.1:{coap_port}",
                       "--admin", f"http://127.0.0.1:{gw.admin_port}")
        assert run.returncode == 0, run.stderr + run.stdout
        s: dict[str, Any] = json.loads(run.stdout)
        stats = admin_get(gw.admin_port, "/v1/stats")
    finally:
        assert stop(gw) == 0

    # Everything sent at QoS 1 (or confirmable) was acknowledged or explicitly refused.
    assert s["ok"] is True
    assert s["sent_qos1"] > 30_000
    assert s["sent_qos1"] == s["acked"] + s["refused"]
    assert s["failed"] == s["unanswered"] == 0
    assert s["by_protocol"]["mqtt"] > 0 and s["by_protocol"]["coap"] > 0
    # The burst: 160 of 200 connections dropped, came back, flushed 2 readings per device.
    conn = s["connections"]
    assert conn["bursts"] == 1 and conn["dropped"] == 160
    assert conn["reconnections"] >= 160 and conn["churned"] > 0
    assert s["flushed"] >= 2 * 15_000
    # Processed (the gateway's own counters, after its backlog drained) reaches what was
    # acknowledged, tier by tier; the gateway saw nothing but the fleet.
    gateway = s["gateway"]
    assert gateway["drained"] is True
    assert gateway["processed"] == stats["processed"] >= s["acked"]
    tiers = s["tiers"]
    for tier in TIERS:
        row = tiers[tier]
        assert row["acked"] > 0, (tier, row)
        assert row["processed"] >= row["acked"], (tier, row)
        assert row["ack_ms"]["p50"] > 0 and row["latency_ms"]["count"] > 0, (tier, row)
    # Critical work overtakes the backlog the burst made.
    assert tiers["critical"]["latency_ms"]["mean_ms"] < tiers["standard"]["latency_ms"]["mean_ms"]
    # Five anomalies, from five devices, each acknowledged and counted by the gateway.
    anomalies = s["anomalies"]
    assert anomalies["injected"] == anomalies["acked"] == 5
    assert anomalies["counted"] == 5 == gateway["anomalies"]["critical"]
    assert tiers["anomaly-critical"]["processed"] == 5


def test_the_text_summary_and_a_gateway_without_coap_or_admin(tmp_path: Path) -> None:
    """The human summary, from an MQTT-only scenario with no admin API to read."""
    gw = start_serve(tmp_path)
    try:
        scenario = tmp_path / "small.toml"
        scenario.write_text(
            '[target]\nadmin = ""\ncoap = ""\n[time]\nduration_s = 1\n'
            '[fleet]\ndevices = 100\nconnections = 4\n'
            '[[fleet.groups]]\ntier = "standard"\nshare = 1.0\n[load]\nrate = 200\n')
        run = simulate(tmp_path, str(scenario), "--mqtt", f"127.0.0.1:{gw.mqtt_port}",
                       "--progress")
    finally:
        assert stop(gw) == 0
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith("scenario small: 100 devices (100 MQTT over 4 connections")
    assert re.search(r"^acknowledged\s+\d+\s+refused 0", out, re.MULTILINE), out
    assert re.search(r"^standard\s+\d+", out, re.MULTILINE), out
    assert not re.search(r"^processed", out, re.MULTILINE)  # no admin API: no gateway figures
    assert re.search(r"\[[#-]{20}\] .* sent [\d,]+ +acked", run.stderr)  # the status line


@pytest.mark.parametrize(("toml", "message"), [
    (BURST.replace("share = 0.6\ntopic", "share = 0.7\ntopic"),
     "fleet.groups: the shares add up to 1.1, expected 1"),
    (BURST.replace('region = "us-east"\nat_s', 'region = "mars"\nat_s'),
     "spikes[0].region: unknown region 'mars'"),
    (BURST.replace("rate = 1_500", "rate = 0"), "load.rate: expected `float` > 0.0"),
    (BURST.replace("buffered = 2", "buffered = 2\nsurprise = 1"),
     "bursts[0]: object contains unknown field `surprise`"),
    (BURST.replace("at_s = 3\n", "at_s = 30\n"),
     "bursts[0].at_s: 30 is not before the end of the run"),
    (BURST.replace('topic = "bulk/{device}/logs"', 'topic = "bulk/logs/{device}"'),
     "fleet.groups[3].topic: {device} is at level 2"),
    (BURST.replace('start = "mon 07:00"', 'start = "7am"'), "time.start: expected a weekday"),
    (BURST.replace("devices = 20_000", "devices = 2_000_000"), "fleet.devices: expected `int`"),
    ("[time\n", "invalid scenario"),
])
def test_a_bad_scenario_exits_2_naming_the_field(tmp_path: Path, toml: str, message: str
                                                 ) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = simulate(tmp_path, str(path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert str(path) in result.stderr


def test_bad_overrides_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "burst.toml"
    path.write_text(BURST)
    result = simulate(tmp_path, str(path), "--mqtt", "nowhere")
    assert result.returncode == 2
    assert "target.mqtt: expected HOST:PORT, got 'nowhere'" in result.stderr


@pytest.mark.parametrize(("target", "message"), [
    ('admin = "http://127.0.0.1:{port}"', "cannot reach the gateway's admin API at "
                                          "http://127.0.0.1:{port}: Connection refused"),
    ('admin = ""\nmqtt = "127.0.0.1:{port}"', "cannot connect to the gateway's MQTT listener "
                                              "at 127.0.0.1:{port}: Connection refused"),
])
def test_an_unreachable_gateway_exits_1_with_a_clear_message(tmp_path: Path, target: str,
                                                             message: str) -> None:
    port = free_port()
    path = tmp_path / "burst.toml"
    path.write_text(f"{BURST}\n[target]\n{target.format(port=port)}\n")
    result = simulate(tmp_path, str(path), timeout=30)
    assert result.returncode == 1, result.stderr
    assert message.format(port=port) in result.stderr
    assert "Traceback" not in result.stderr
