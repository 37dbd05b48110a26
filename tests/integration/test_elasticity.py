"""In-node elasticity on a live gateway, over real sockets: a load step raises the processing
capacity within seconds, a quiet spell lowers it after the cool-down, nothing acknowledged
is lost and each device's messages are processed in order while it changes; the scaling
signal for external autoscalers (gauges, ``GET /v1/scaling`` for KEDA, the command hook)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import ConfigError, parse_config
from gateway.envelope import Envelope
from gateway.pipeline import STAGES
from tests.conftest import DEFAULT_TOML, RunningGateway
from tests.integration.test_maintenance_windows import audit_records

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"


class BurnOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    us_per_message: float = 100.0


class BurnStage:
    """Costly processing: the loop is held for a fixed time per message. It sleeps rather
    than spins so that the load generator's threads (in this process) keep their pace."""

    Options: ClassVar[type[msgspec.Struct]] = BurnOptions

    def __init__(self, options: BurnOptions, context: Any) -> None:
        self.seconds = options.us_per_message / 1e6

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        time.sleep(self.seconds * len(batch))
        return batch


@pytest.fixture
def burn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGES, "burn", BurnStage)  # type: ignore[arg-type]


def elastic_config(extra: str = "") -> str:
    base = DEFAULT_TOML.replace("slots = 4 ", "slots = 1 ").replace("batch_size = 512",
                                                                    "batch_size = 64")
    base = base.replace('  { type = "enrich" },\n',
                        '  { type = "enrich" },\n  { type = "burn", us_per_message = 300 },\n')
    return base + """
[scaling]
policy = "reactive"
interval_s = 0.25
min_slots = 1
max_slots = 8
scale_up_after_s = 0.5
cool_down_s = 2.0
""" + extra


def lake(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((tmp_path / "lake").rglob("*.jsonl"))
            for line in p.read_text().splitlines() if line]


def scaling(gw: RunningGateway) -> dict[str, Any]:
    status, body = gw.get("/v1/scaling")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


class Publishers:
    """Devices publishing QoS 1 readings with a sequence number, as fast as they are acked."""

    def __init__(self, port: int, devices: int) -> None:
        self.acked: dict[str, list[int]] = {}
        self.refused = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(port, f"dev-{i}"), daemon=True)
                         for i in range(devices)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, port: int, device: str) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device,
                             protocol=paho.MQTTv5)
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(400)
        seq_of: dict[int, int] = {}
        acked = self.acked.setdefault(device, [])
        lock = threading.Lock()

        def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
            with lock:
                if rc.is_failure:
                    self.refused += 1
                else:
                    acked.append(seq_of[mid])

        client.on_publish = on_publish
        client.connect("127.0.0.1", port)
        client.loop_start()
        seq = 0
        while not self._stop.is_set():
            info = client.publish("telemetry/reading", json.dumps({"seq": seq}), qos=1)
            if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
                time.sleep(0.002)
                continue
            with lock:
                seq_of[info.mid] = seq
            seq += 1
        deadline = time.monotonic() + 30
        while len(acked) + self.refused < seq and time.monotonic() < deadline:
            time.sleep(0.02)
        client.loop_stop()
        client.disconnect()


@pytest.fixture
def elastic(burn: None, gateway_factory: Callable[..., RunningGateway]) -> Iterator[RunningGateway]:
    yield gateway_factory(base=elastic_config())


def test_a_load_step_raises_capacity_then_the_cool_down_lowers_it_nothing_lost_order_kept(
        elastic: RunningGateway, tmp_path: Path) -> None:
    gw = elastic
    assert scaling(gw)["capacitySlots"] == 1
    load = Publishers(gw.mqtt_port, devices=6)
    started = time.monotonic()
    load.start()
    try:
        gw.wait_for(lambda: scaling(gw)["capacitySlots"] > 1, timeout=10)
        reacted = time.monotonic() - started
        time.sleep(2.0)  # the load goes on while capacity changes
    finally:
        load.stop()
    peak = scaling(gw)
    acked = sum(len(seqs) for seqs in load.acked.values())
    assert acked > 500 and load.refused == 0
    gw.wait_processed(acked, timeout=60)
    # The quiet spell after the load: capacity goes back down once the cool-down passed.
    gw.wait_for(lambda: scaling(gw)["capacitySlots"] == 1, timeout=20)

    # Nothing acknowledged lost, nothing run twice, each device's readings in order.
    gw.wait_for(lambda: len(lake(tmp_path)) >= acked, timeout=20)
    by_device: dict[str, list[int]] = {}
    for record in lake(tmp_path):
        by_device.setdefault(record["device"], []).append(record["payload"]["seq"])
    for device, seqs in load.acked.items():
        assert sorted(by_device[device]) == sorted(seqs), device
        assert by_device[device] == sorted(by_device[device]), f"{device} out of order"

    # Every change of capacity is audited with the figures that produced it.
    decisions = [r for r in audit_records(tmp_path / "audit") if r["event"] == "scaling.decision"]
    actions = [d["action"] for d in decisions]
    assert "scale-up" in actions and "scale-down" in actions
    up = next(d for d in decisions if d["action"] == "scale-up")
    assert up["slots"] > 1 and up["policy"] == "reactive" and up["inputs"] and up["reason"]
    metrics = gw.metrics()
    assert 'iotgw_scaling_decisions_total{action="scale-up"}' in metrics
    assert "iotgw_scaling_capacity_slots 1.0" in metrics
    print(f"\nscale-up {reacted:.2f} s after the load started; peak {peak['capacitySlots']} "
          f"slots, {acked} messages acked and processed in order")


def test_the_scaling_signal_reads_as_keda_expects(gateway: RunningGateway) -> None:
    gateway.wait_for(lambda: scaling(gateway)["decision"] is not None)
    report = scaling(gateway)
    assert isinstance(report["desiredReplicas"], int) and report["desiredReplicas"] >= 1
    assert report["capacitySlots"] >= 1 and report["policy"] == "predictive"
    assert {t["name"] for t in report["tiers"]} == {"critical", "premium", "standard", "bulk"}
    metrics = gateway.metrics()
    for name in ("iotgw_scaling_desired_replicas", "iotgw_scaling_capacity_slots",
                 "iotgw_scaling_forecast_messages_per_second"):
        assert f"\n{name} " in metrics, name


def test_scaling_disabled_answers_404(gateway_factory: Callable[..., RunningGateway]) -> None:
    gw = gateway_factory(extra="[scaling]\nenabled = false\n")
    status, body = gw.get("/v1/scaling")
    assert status == 404 and b"disabled" in body


HOOK = """
import json, sys, time
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\\n")
if sys.argv[2] == "hang":
    time.sleep(60)
"""


def test_the_command_hook_runs_templated_rate_limited_and_timed_out(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    argv = [sys.executable, str(script), str(calls), "set", "--desired={desired_replicas}",
            "--region={region}", "--slots={capacity_slots}"]
    gw = gateway_factory(extra=f"""
[scaling]
interval_s = 0.1
[scaling.hook]
command = {json.dumps(argv)}
min_interval_s = 1.0
timeout_s = 5.0
on_change_only = false
""")
    gw.wait_for(lambda: calls.exists() and len(calls.read_text().splitlines()) >= 2, timeout=10)
    time.sleep(0.5)
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert runs[0][:3] == ["set", "--desired=1", "--region=local"]
    assert runs[0][3].startswith("--slots=") and int(runs[0][3].split("=")[1]) >= 1
    # Rate limited: about one run per second, not one per 0.1 s decision.
    assert len(runs) <= 4
    hooks = [r for r in audit_records(tmp_path / "audit") if r["event"] == "scaling.hook"]
    assert hooks and all(h["outcome"] == "ok" for h in hooks)
    assert 'iotgw_scaling_hook_runs_total{outcome="ok"}' in gw.metrics()


def test_a_hook_that_hangs_is_killed_and_counted(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    argv = [sys.executable, str(script), str(tmp_path / "calls.jsonl"), "hang"]
    gw = gateway_factory(extra=f"""
[scaling.hook]
command = {json.dumps(argv)}
timeout_s = 0.5
""")
    gw.wait_for(lambda: 'iotgw_scaling_hook_runs_total{outcome="timeout"}' in gw.metrics(),
                timeout=10)
    hooks = [r for r in audit_records(tmp_path / "audit") if r["event"] == "scaling.hook"]
    assert hooks[0]["outcome"] == "timeout" and "timeout" in hooks[0]["output"]


def test_a_missing_hook_command_is_an_error_not_a_crash(
        gateway_factory: Callable[..., RunningGateway], tmp_path: Path) -> None:
    gw = gateway_factory(extra="""
[scaling.hook]
command = ["/nonexistent/aws", "autoscaling", "{desired_replicas}"]
""")
    gw.wait_for(lambda: 'iotgw_scaling_hook_runs_total{outcome="error"}' in gw.metrics(),
                timeout=10)
    assert gw.stats()["connections"] == 0  # still serving


@pytest.mark.parametrize("fragment, error", [
    ('[scaling.hook]\ncommand = ["x", "{replicas}"]\n', "replicas"),
    ("[scaling]\nmin_slots = 8\nmax_slots = 4\n", "min_slots"),
    ('[scaling]\npolicy = "clairvoyant"\n', "clairvoyant"),
])
def test_bad_scaling_config_is_refused_with_its_place(fragment: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(DEFAULT_TOML + "\n" + fragment)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("scaling-*.toml")))
def test_the_autoscaler_examples_are_valid_config(example: str) -> None:
    config = parse_config(DEFAULT_TOML + "\n" + (EXAMPLES / example).read_text())
    assert config.scaling.hook.command and "{desired_replicas}" in " ".join(
        config.scaling.hook.command)


def test_workers_of_one_host_ask_for_the_hosts_replicas_and_one_runs_the_hook() -> None:
    """Under ``serve --workers N`` each worker sees about 1/N of the load: against 1/N of the
    host's capacity its desired replicas are the host's, and only one of them runs the hook."""
    from gateway.supervisor import WorkerRole

    config = parse_config(DEFAULT_TOML + "\n" + (EXAMPLES / "scaling-aws-asg.toml").read_text())
    first, second = (WorkerRole(index=i, count=2).apply(config) for i in (0, 1))
    assert first.scaling.replica_capacity_per_s == config.scaling.replica_capacity_per_s / 2
    assert second.scaling.replica_capacity_per_s == first.scaling.replica_capacity_per_s
    assert first.scaling.hook == config.scaling.hook and not second.scaling.hook.command
