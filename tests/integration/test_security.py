"""Authentication, ACLs, TLS and limits of the MQTT broker, over loopback with independent
clients (paho-mqtt 3.1.1 and 5, mosquitto_pub / mosquitto_sub). Each test names the normative
statements of OASIS MQTT 3.1.1 (``3.1.1:``) or 5.0 (``5.0:``) it checks."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import RunningGateway, config_text, start_gateway
from tests.pki import Pki, make_pki
from tests.raw_mqtt import connect_frame

pytestmark = pytest.mark.integration

WAIT_S = 5.0
CLI = [sys.executable, "-m", "gateway.cli"]


def passwd(path: Path, user: str, password: str) -> None:
    """Through the real command, as an operator would."""
    subprocess.run([*CLI, "passwd", str(path), user, "--password-stdin"], input=password + "\n",
                   text=True, check=True, capture_output=True, timeout=30)


SECURED = """
[auth]
allow_anonymous = false
credentials_file = "{creds}"
default_tenant = "public"
[[auth.users]]
username = "acme-dev"
tenant = "acme"
[[auth.users]]
username = "globex-dev"
tenant = "globex"
[[auth.users]]
username = "globex-ops"
tenant = "globex"
[[auth.acl]]
topic = "tenants/%t/devices/%c/#"
action = "both"
[[auth.acl]]
topic = "tenants/%t/#"
action = "subscribe"
"""


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[RunningGateway]:
    creds = tmp_path / "credentials"
    for user in ("acme-dev", "globex-dev", "globex-ops"):
        passwd(creds, user, f"{user}-secret")
    text = config_text(tmp_path).replace("[auth]\nallow_anonymous = true\n", "")
    gw = start_gateway(text + SECURED.format(creds=creds))
    yield gw
    gw.stop()


class Client:
    def __init__(self, port: int, client_id: str, version: int = 5, *,
                 user: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=protocol)
        if user is not None:
            self.paho.username_pw_set(user, password)
        if tls is not None:
            self.paho.tls_set_context(tls)
        self.messages: list[paho.MQTTMessage] = []
        self.answered = threading.Event()
        self.reason: Any = None
        self.acks: dict[int, Any] = {}
        self.paho.on_message = lambda c, u, m: self.messages.append(m)
        self.paho.on_connect = self._on_connect
        self.paho.on_publish = lambda c, u, mid, rc, props: self.acks.__setitem__(mid, rc)
        self.paho.reconnect_delay_set(60, 60)
        self.paho.connect("127.0.0.1", port, keepalive=30)
        self.paho.loop_start()
        assert self.answered.wait(WAIT_S), "no CONNACK"

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.reason = reason
        self.answered.set()

    @property
    def ok(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        done = threading.Event()
        codes: list[Any] = []

        def on_subscribe(c: Any, u: Any, mid: int, granted: list[Any], props: Any) -> None:
            codes.extend(granted)
            done.set()

        self.paho.on_subscribe = on_subscribe
        self.paho.subscribe(topic_filter, qos)
        assert done.wait(WAIT_S), "no SUBACK"
        return int(codes[0].value)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Any:
        info = self.paho.publish(topic, payload, qos=qos)
        info.wait_for_publish(WAIT_S)
        return self.acks.get(info.mid)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


# -- authentication --------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_credentials_are_checked(secured: RunningGateway, version: int) -> None:
    """5.0 3.2.2.2: CONNACK 0x86 (bad user name or password), 0x87 (not authorized);
    3.1.1 3.2.2.3: return codes 4 and 5; [MQTT-3.2.2-5] (3.1.1) / [MQTT-3.2.2-7] (5.0):
    a refusing CONNACK, then the connection is closed."""
    port = secured.mqtt_port
    good = Client(port, f"good-{version}", version, user="acme-dev", password="acme-dev-secret")
    assert good.ok
    good.close()
    # paho reports a 3.1.1 return code as its MQTT 5 equivalent: 4 as 0x86, 5 as 0x87.
    wrong = Client(port, f"wrong-{version}", version, user="acme-dev", password="guess")
    assert wrong.reason.is_failure and wrong.reason.value == 0x86
    unknown = Client(port, f"who-{version}", version, user="nobody", password="x")
    assert unknown.reason.value == 0x86
    anonymous = Client(port, f"anon-{version}", version)
    assert anonymous.reason.value == 0x87
    metrics = secured.metrics()
    assert 'iotgw_mqtt_connections_refused_total{reason="bad_credentials"} 2.0' in metrics
    assert 'iotgw_mqtt_connections_refused_total{reason="not_authorized"} 1.0' in metrics
    for c in (wrong, unknown, anonymous):
        c.paho.loop_stop()


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients missing")
def test_mosquitto_pub_with_a_password_made_by_iot_gateway_passwd(
        secured: RunningGateway) -> None:
    """3.1.1 3.1.3.4 / 3.1.3.5: user name and password in CONNECT."""
    base = ["mosquitto_pub", "-p", str(secured.mqtt_port), "-q", "1", "-i", "device-1",
            "-t", "tenants/acme/devices/device-1/t", "-m", "{}"]
    ok = subprocess.run([*base, "-u", "acme-dev", "-P", "acme-dev-secret"],
                        capture_output=True, text=True, timeout=10)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*base, "-u", "acme-dev", "-P", "nope"],
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode != 0
    assert "not authorised" in bad.stderr.lower() or "bad user" in bad.stderr.lower()


def test_a_reconnect_storm_of_known_devices_does_not_hash_again(
        secured: RunningGateway) -> None:
    """A verified password is remembered: 50 reconnects cost one slow hash, not 50."""
    started = time.monotonic()
    first = Client(secured.mqtt_port, "storm-0", user="acme-dev", password="acme-dev-secret")
    one_hash = time.monotonic() - started
    first.close()
    started = time.monotonic()
    for i in range(50):
        again = Client(secured.mqtt_port, f"storm-{i}", user="acme-dev",
                       password="acme-dev-secret")
        assert again.ok
        again.close()
    assert time.monotonic() - started < 50 * max(one_hash, 0.02)


# -- ACLs: tenant isolation ------------------------------------------------------------------

def test_a_device_of_one_tenant_can_neither_read_nor_write_anothers_topics(
        secured: RunningGateway) -> None:
    """5.0 [MQTT-3.8.4-?] SUBACK 0x87 per refused filter (3.9.3), PUBACK 0x87 (3.4.2.1);
    3.1.1 SUBACK 0x80 (3.9.3) and [MQTT-3.3.5-2] a PUBLISH it may not make is acknowledged
    and dropped. Every way in: the exact topic, '+' and '#' at each level, a shared
    subscription, and client ids that look like wildcards or path tricks."""
    port = secured.mqtt_port
    ops = Client(port, "globex-ops", user="globex-ops", password="globex-ops-secret")
    assert ops.subscribe("tenants/globex/#") == 1  # its own tenant: granted
    victim = "tenants/globex/devices/pump-1/cmd"
    for version in (5, 4):
        for client_id in ("device-a", "+", "#", "a/b", "..", "%c"):
            attacker = Client(port, f"{client_id}", version, user="acme-dev",
                              password="acme-dev-secret")
            if not attacker.ok:  # a client id the broker refuses outright is fine too
                attacker.paho.loop_stop()
                continue
            refused = 0x87 if version == 5 else 0x80
            for topic_filter in ("tenants/globex/devices/pump-1/cmd", "tenants/globex/#",
                                 "tenants/+/devices/+/cmd", "tenants/#", "#", "+/globex/#",
                                 "tenants/globex/devices/+/+", "$share/g/tenants/globex/#",
                                 "$share/g/#", "+/+/+/+/+"):
                assert attacker.subscribe(topic_filter) == refused, topic_filter
            for topic in (victim, "tenants/globex/x", "tenants/acme/../globex/devices/pump-1"):
                ack = attacker.publish(topic, b'{"open": true}')
                if version == 5:
                    assert ack is not None and ack.value == 0x87, topic
            attacker.close()
    time.sleep(0.5)
    leaked = [m.topic for m in ops.messages]
    assert not leaked, f"tenant acme reached globex: {leaked}"
    # Its own device subtree works.
    own = Client(port, "device-a", user="acme-dev", password="acme-dev-secret")
    assert own.subscribe("tenants/acme/devices/device-a/#") == 1
    own.publish("tenants/acme/devices/device-a/up", b"{}")
    deadline = time.monotonic() + WAIT_S
    while not own.messages and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [m.topic for m in own.messages] == ["tenants/acme/devices/device-a/up"]
    assert "not_authorized" in secured.metrics()
    for c in (ops, own):
        c.close()


# -- TLS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_with_client_certificates_maps_the_certificate_to_the_device(
        tmp_path: Path, pki: Pki) -> None:
    """MQTT over TLS (5.0 section 5.4.9, 3.1.1 section 5.4.9): with require_client_cert, a
    client without a certificate of the CA cannot connect; the certificate's CN is the
    device id."""
    tls = f"""
[auth]
allow_anonymous = false
device_id = "certificate"
[auth.tls]
listen = "127.0.0.1:0"
certfile = "{pki.server_cert}"
keyfile = "{pki.server_key}"
cafile = "{pki.ca}"
require_client_cert = true
identity = "cn"
"""
    text = config_text(tmp_path).replace("[auth]\nallow_anonymous = true\n", "") + tls
    gw = start_gateway(text)
    try:
        port = gw.gateway.mqtt_tls_address[1]
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(pki.client_cert, pki.client_key)
        device = Client(port, "whatever-id", tls=context)
        assert device.ok
        device.publish("telemetry/t", b'{"v": 1}')
        gw.wait_processed(1)
        device.close()

        def records() -> list[dict[str, Any]]:
            return [json.loads(line) for path in (tmp_path / "lake").rglob("*.jsonl")
                    for line in path.read_text().splitlines()]

        gw.wait_for(lambda: bool(records()))  # the sink flushes on a ~1 s timer
        assert records()[0]["device"] == "device-7"
        bare = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, AssertionError)):
            Client(port, "no-cert", tls=bare)
        rogue = ssl.create_default_context(cafile=str(pki.ca))
        rogue.load_cert_chain(pki.rogue_cert, pki.rogue_key)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, AssertionError)):
            Client(port, "rogue", tls=rogue)
    finally:
        gw.stop()


# -- limits -----------------------------------------------------------------------------------

def limited(tmp_path: Path, limits: str) -> RunningGateway:
    return start_gateway(config_text(tmp_path) + f"[auth.limits]\n{limits}\n")


def test_a_client_over_its_byte_rate_is_slowed_not_dropped(tmp_path: Path) -> None:
    """Per-client bytes/s: enforced by pausing reads (TCP pushes back); every message still
    arrives. A read that passes the limit is taken whole and the pause comes after it, so
    the bound holds over time, not within one read."""
    gw = limited(tmp_path, "bytes_per_s = 1_000_000\nburst_s = 0.25")
    try:
        sub = Client(gw.mqtt_port, "rate-sub")
        sub.subscribe("rate/#", 0)
        pub = Client(gw.mqtt_port, "rate-pub")
        payload = b"x" * 1000
        started = time.monotonic()
        for _ in range(3000):  # 3 MB as fast as paho sends: a fraction of a second unlimited
            pub.paho.publish("rate/t", payload, qos=0)
        deadline = time.monotonic() + 30
        while len(sub.messages) < 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        assert len(sub.messages) == 3000
        # 3 MB at 1 MB/s after a 0.25 MB burst: about 2.75 s, less the last read (<= 256 KB).
        assert elapsed >= 2.0
        for c in (sub, pub):
            c.close()
    finally:
        gw.stop()


def test_a_connection_flood_from_one_address_is_cut(tmp_path: Path) -> None:
    """A connection-rate limit per source address: the excess is closed before CONNECT is
    read, and counted."""
    gw = limited(tmp_path, "connections_per_s_per_address = 2")
    try:
        answered = 0
        for i in range(10):
            with socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=5) as sock:
                sock.sendall(connect_frame(f"flood-{i}"))
                with contextlib.suppress(ConnectionResetError, TimeoutError):
                    answered += sock.recv(4)[:1] == b"\x20"
        assert 1 <= answered <= 3
        assert 'iotgw_mqtt_connections_refused_total{reason="connection_flood"}' in gw.metrics()
    finally:
        gw.stop()

