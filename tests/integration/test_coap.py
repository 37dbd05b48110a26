"""CoAP against a real gateway, over loopback, with real peers: aiocoap's client and
libcoap's ``coap-client-notls``. The CoAP endpoint is started on the gateway's loop by the
tests (``start_coap``), as the gateway does when ``[coap]`` is enabled."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import paho.mqtt.client as paho
import pytest
from aiocoap.numbers.codes import Code
from paho.mqtt.enums import CallbackAPIVersion

from gateway.ingest import Inbound
from protocols.coap.config import CoapSection
from protocols.coap.payload import CBOR, JSON, SENML_CBOR, SENML_JSON
from protocols.coap.server import CoapListenError, CoapServer, start_coap
from tests.conftest import RunningGateway, admin_get, start_serve, stop

pytestmark = pytest.mark.integration

KEYS = {"locked-1": "secret-key-1"}
LIBCOAP = shutil.which("coap-client-notls") or shutil.which("coap-client")
def on_loop(gw: RunningGateway, call: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return call()

    return asyncio.run_coroutine_threadsafe(run(), gw.loop).result(5)


class Endpoint:
    """A CoAP endpoint serving on a running gateway's loop."""

    def __init__(self, gw: RunningGateway, ingest: Any = None, **settings: Any) -> None:
        self.gw = gw
        section = CoapSection(**{"psk": KEYS, "max_payload": 8192, **settings})
        gateway = gw.gateway
        self.server: CoapServer = asyncio.run_coroutine_threadsafe(
            start_coap(section, ingest or gateway.ingest, gateway.ingest.broker,
                       gateway.metrics, "127.0.0.1:0"), gw.loop).result(10)
        self.port = self.server.address[1]

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.gw.loop).result(10)


@pytest.fixture
def endpoint(gateway: RunningGateway) -> Iterator[Endpoint]:
    ep = Endpoint(gateway)
    yield ep
    ep.close()


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield context
    await context.shutdown()


async def request(client: Any, code: Code, uri: str, payload: bytes = b"",
                  confirmable: bool = True, **options: Any) -> Any:
    tuning = aiocoap.Reliable if confirmable else aiocoap.Unreliable
    message = aiocoap.Message(code=code, uri=uri, payload=payload, transport_tuning=tuning,
                              **options)
    return await asyncio.wait_for(client.request(message).response, 15)


def lake(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((tmp_path / "lake").rglob("*.jsonl"))
            for line in p.read_text().splitlines()]


async def wait_lake(gw: RunningGateway, tmp_path: Path, count: int) -> list[dict[str, Any]]:
    await asyncio.to_thread(gw.wait_for, lambda: len(lake(tmp_path)) >= count)
    return lake(tmp_path)


def errors(gw: RunningGateway) -> dict[str, float]:
    found = re.findall(r'iotgw_protocol_errors_total\{protocol="coap",reason="(\w+)"\} (\S+)',
                       gw.metrics())
    return {reason: float(n) for reason, n in found}


# -- readings ---------------------------------------------------------------------------------
async def test_confirmable_json_cbor_and_senml_are_stored_as_json(
        gateway: RunningGateway, endpoint: Endpoint, client: Any, tmp_path: Path) -> None:
    senml = [{"bn": "urn:dev:th-1:", "bt": 1.7e9, "n": "temp", "u": "Cel", "v": 21.5},
             {"n": "hum", "u": "%RH", "v": 40}]
    sent = [
        ("/t/pump-1", b'{"heart_rate": 71}', JSON),
        ("/t/meter-2", cbor2.dumps({"kwh": 2.5, "raw": b"\x01\x02"}), CBOR),
        ("/t/th-1", json.dumps(senml).encode(), SENML_JSON),
        ("/t/th-2", cbor2.dumps([{-2: "urn:dev:th-2:", 0: "temp", 2: 19}]), SENML_CBOR),
    ]
    for path, payload, content_format in sent:
        response = await request(client, Code.POST, endpoint.uri(path), payload,
                                 content_format=content_format)
        assert response.code == Code.CHANGED, response.payload
    records = {r["device"]: r for r in await wait_lake(gateway, tmp_path, 4)}
    assert {r["protocol"] for r in records.values()} == {"coap"}
    assert {r["topic"] for r in records.values()} == {
        "coap/pump-1", "coap/meter-2", "coap/th-1", "coap/th-2"}
    assert {r["qos"] for r in records.values()} == {1}
    assert records["pump-1"]["payload"] == {"heart_rate": 71}
    assert records["meter-2"]["payload"] == {"kwh": 2.5, "raw": "AQI="}
    th1 = records["th-1"]["payload"]
    assert (th1["temp"], th1["hum"]) == (21.5, 40)
    assert th1["senml"][1] == {"n": "urn:dev:th-1:hum", "u": "%RH", "t": 1.7e9, "v": 40}
    assert records["th-2"]["payload"]["temp"] == 19
    assert 'iotgw_messages_received_total{protocol="coap"} 4.0' in gateway.metrics()


async def test_put_and_non_confirmable_requests(gateway: RunningGateway, endpoint: Endpoint,
                                                client: Any, tmp_path: Path) -> None:
    response = await request(client, Code.PUT, endpoint.uri("/t/put-1"), b'{"n": 1}',
                             content_format=JSON)
    assert response.code == Code.CHANGED
    response = await request(client, Code.POST, endpoint.uri("/t/non-1"), b'{"n": 2}',
                             confirmable=False)  # no content format: taken as it is JSON
    assert response.code == Code.CHANGED
    records = {r["device"]: r for r in await wait_lake(gateway, tmp_path, 2)}
    assert records["put-1"]["qos"] == 1
    assert records["non-1"]["qos"] == 0
    assert records["non-1"]["payload"] == {"n": 2}


class HeldIngest:
    """Ingest whose ``done`` callbacks wait until the test releases them."""

    def __init__(self, real: Any, outcome: bool | None = None) -> None:
        self.real = real
        self.outcome = outcome
        self.held: list[Callable[[], None]] = []
        self.durable = threading.Event()

    def submit(self, protocol: str, items: list[Inbound],
               done: Callable[[bool], None] | None = None) -> bool:
        assert done is not None

        def hold(ok: bool) -> None:
            self.held.append(lambda: done(ok if self.outcome is None else self.outcome))
            self.durable.set()

        return bool(self.real.submit(protocol, items, hold))

    def release(self) -> None:
        held, self.held = self.held, []
        for call in held:
            call()


async def test_confirmable_is_answered_only_once_durable(gateway: RunningGateway,
                                                         client: Any) -> None:
    ingest = HeldIngest(gateway.gateway.ingest)
    ep = Endpoint(gateway, ingest)
    try:
        pending = asyncio.ensure_future(request(client, Code.POST, ep.uri("/t/slow-1"),
                                                b'{"v": 1}', content_format=JSON))
        assert await asyncio.to_thread(ingest.durable.wait, 5)  # the WAL commit is done...
        await asyncio.sleep(0.5)
        assert not pending.done()  # ...but ``done`` was not called yet: no 2.04
        assert gateway.gateway.wal is not None and gateway.gateway.wal.unretired >= 1
        on_loop(gateway, ingest.release)
        assert (await pending).code == Code.CHANGED
    finally:
        ep.close()


async def test_a_failed_commit_is_500_and_counted(gateway: RunningGateway,
                                                  client: Any) -> None:
    ingest = HeldIngest(gateway.gateway.ingest, outcome=False)
    ep = Endpoint(gateway, ingest)
    try:
        pending = asyncio.ensure_future(request(client, Code.POST, ep.uri("/t/fail-1"),
                                                b'{"v": 1}', content_format=JSON))
        assert await asyncio.to_thread(ingest.durable.wait, 5)
        on_loop(gateway, ingest.release)
        assert (await pending).code == Code.INTERNAL_SERVER_ERROR
        assert errors(gateway)["commit_failed"] == 1
    finally:
        ep.close()


async def test_overload_is_503_with_max_age(gateway: RunningGateway, endpoint: Endpoint,
                                            client: Any, tmp_path: Path) -> None:
    ingest = gateway.gateway.ingest
    on_loop(gateway, lambda: setattr(ingest, "accepting", False))
    try:
        for confirmable in (True, False):
            response = await request(client, Code.POST, endpoint.uri("/t/busy-1"),
                                     b'{"v": 1}', confirmable, content_format=JSON)
            assert response.code == Code.SERVICE_UNAVAILABLE
            assert response.opt.max_age == 5
    finally:
        on_loop(gateway, lambda: setattr(ingest, "accepting", True))
    assert errors(gateway)["overload"] == 2
    # The confirmable one is a reading the gateway would have acknowledged: refused, counted.
    assert ('iotgw_messages_refused_total{protocol="coap",reason="overload"} 1.0'
            in gateway.metrics())
    assert gateway.stats()["received"] == 0
    response = await request(client, Code.POST, endpoint.uri("/t/busy-1"), b'{"v": 2}',
                             content_format=JSON)
    assert response.code == Code.CHANGED
    assert [r["payload"] for r in await wait_lake(gateway, tmp_path, 1)] == [{"v": 2}]


class CountingIngest:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.batches: list[int] = []

    def submit(self, protocol: str, items: list[Inbound],
               done: Callable[[bool], None] | None = None) -> bool:
        self.batches.append(len(items))
        return bool(self.real.submit(protocol, items, done))


async def test_concurrent_readings_are_submitted_in_batches(
        gateway: RunningGateway, client: Any, tmp_path: Path) -> None:
    ingest = CountingIngest(gateway.gateway.ingest)
    ep = Endpoint(gateway, ingest)
    try:
        responses = await asyncio.gather(*(
            request(client, Code.POST, ep.uri(f"/t/many-{i}"), b'{"v": %d}' % i,
                    confirmable=i % 2 == 0, content_format=JSON) for i in range(40)))
        assert {r.code for r in responses} == {Code.CHANGED}
        assert sum(ingest.batches) == 40
        assert len(ingest.batches) < 40  # one submit (and one WAL append) per batch
        records = await wait_lake(gateway, tmp_path, 40)
        assert sorted(r["payload"]["v"] for r in records) == list(range(40))
    finally:
        ep.close()


async def test_block_wise_upload(gateway: RunningGateway, endpoint: Endpoint, client: Any,
                                 tmp_path: Path) -> None:
    payload = json.dumps({"samples": list(range(1000))}).encode()
    assert len(payload) > 4096
    response = await request(client, Code.POST, endpoint.uri("/t/big-1"), payload,
                             content_format=JSON)
    assert response.code == Code.CHANGED
    [record] = await wait_lake(gateway, tmp_path, 1)
    assert record["payload"]["samples"] == list(range(1000))


# -- refusals ---------------------------------------------------------------------------------
async def test_bad_input_codes_are_answered_and_counted(
        gateway: RunningGateway, endpoint: Endpoint, client: Any) -> None:
    cases = [
        (Code.POST, "/t/d-1", b'{"a": ', {"content_format": JSON}, Code.BAD_REQUEST),
        (Code.POST, "/t/d-1", b"\xff\x00binary", {}, Code.BAD_REQUEST),
        (Code.POST, "/t/d-1", b"plain text", {"content_format": 0}, Code.BAD_REQUEST),
        (Code.POST, "/t/d-1", b"\x9f\x01", {"content_format": CBOR}, Code.BAD_REQUEST),
        (Code.POST, "/t/d-1", b'[{"n": "x"}]', {"content_format": SENML_JSON},
         Code.BAD_REQUEST),
        (Code.POST, "/t/d-1", b"", {"content_format": JSON}, Code.BAD_REQUEST),
        (Code.POST, "/t/bad+dev", b"{}", {"content_format": JSON}, Code.BAD_REQUEST),
        (Code.POST, "/x/d-1", b"{}", {}, Code.NOT_FOUND),
        (Code.POST, "/t", b"{}", {}, Code.NOT_FOUND),
        (Code.POST, "/t/d-1/more", b"{}", {}, Code.NOT_FOUND),
        (Code.GET, "/t/d-1", b"", {}, Code.METHOD_NOT_ALLOWED),
        (Code.DELETE, "/c/d-1", b"", {}, Code.METHOD_NOT_ALLOWED),
    ]
    for code, path, payload, options, expected in cases:
        response = await request(client, code, endpoint.uri(path), payload, **options)
        assert response.code == expected, (path, payload, response.payload)
    assert errors(gateway) == {"bad_payload": 6, "bad_device": 1, "unknown_resource": 3,
                               "method_not_allowed": 2}
    assert gateway.stats()["received"] == 0


async def test_too_large_is_413_plain_and_block_wise(gateway: RunningGateway,
                                                     client: Any) -> None:
    ep = Endpoint(gateway, max_payload=512)
    try:
        small = json.dumps({"pad": "x" * 600}).encode()  # one datagram, past the limit
        response = await request(client, Code.POST, ep.uri("/t/d-1"), small,
                                 content_format=JSON)
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert response.opt.size1 == 512
        big = json.dumps({"pad": "x" * 5000}).encode()  # block-wise: refused at a block
        response = await request(client, Code.POST, ep.uri("/t/d-1"), big,
                                 content_format=JSON)
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert errors(gateway)["too_large"] == 2
        assert gateway.stats()["received"] == 0
    finally:
        ep.close()


async def test_pre_shared_keys(gateway: RunningGateway, endpoint: Endpoint, client: Any,
                               tmp_path: Path) -> None:
    uri = endpoint.uri("/t/locked-1")
    response = await request(client, Code.POST, uri, b'{"v": 1}', content_format=JSON)
    assert response.code == Code.UNAUTHORIZED
    response = await request(client, Code.POST, uri + "?k=wrong-key", b'{"v": 1}',
                             content_format=JSON)
    assert response.code == Code.UNAUTHORIZED
    response = await request(client, Code.GET, endpoint.uri("/c/locked-1"))
    assert response.code == Code.UNAUTHORIZED
    response = await request(client, Code.POST, uri + "?k=secret-key-1", b'{"v": 2}',
                             content_format=JSON)
    assert response.code == Code.CHANGED
    # A reload that requires a key of every device: unknown ones are forbidden.
    endpoint.server.reconfigure(CoapSection(psk=KEYS, require_psk=True))
    response = await request(client, Code.POST, endpoint.uri("/t/stranger"), b"{}",
                             content_format=JSON)
    assert response.code == Code.FORBIDDEN
    assert errors(gateway) == {"missing_key": 2, "bad_key": 1, "unknown_device": 1}
    [record] = await wait_lake(gateway, tmp_path, 1)
    assert record["payload"] == {"v": 2}
    assert "secret-key" not in record["topic"]


async def test_a_taken_port_is_a_clear_error(gateway: RunningGateway) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        gw = gateway.gateway
        with pytest.raises(CoapListenError, match=r"address already in use.*--coap-listen"):
            asyncio.run_coroutine_threadsafe(
                start_coap(CoapSection(), gw.ingest, gw.ingest.broker, gw.metrics, where),
                gateway.loop).result(10)


# -- commands ---------------------------------------------------------------------------------
@pytest.fixture
def operator(gateway: RunningGateway) -> Iterator[paho.Client]:
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="operator", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", gateway.mqtt_port)
    pub.loop_start()
    yield pub
    pub.loop_stop()
    pub.disconnect()


async def publish(pub: paho.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    info = pub.publish(topic, payload, qos=1, retain=retain)
    await asyncio.to_thread(info.wait_for_publish, 5)


async def test_get_serves_the_retained_command(gateway: RunningGateway, endpoint: Endpoint,
                                               client: Any, operator: paho.Client) -> None:
    response = await request(client, Code.GET, endpoint.uri("/c/valve-1"))
    assert response.code == Code.NOT_FOUND
    await publish(operator, "commands/valve-1", b'{"open": true}', retain=True)
    await asyncio.to_thread(gateway.wait_for, lambda: on_loop(
        gateway, lambda: gateway.gateway.ingest.broker.retained.get("commands/valve-1")
        is not None))
    response = await request(client, Code.GET, endpoint.uri("/c/valve-1"))
    assert response.code == Code.CONTENT
    assert response.payload == b'{"open": true}'
    assert response.opt.content_format == JSON
    assert errors(gateway) == {}  # "no command yet" is an answer, not an error


async def test_observe_notifies_each_command(gateway: RunningGateway, endpoint: Endpoint,
                                             client: Any, operator: paho.Client) -> None:
    observed = client.request(aiocoap.Message(code=Code.GET, uri=endpoint.uri("/c/valve-2"),
                                              observe=0))
    first = await asyncio.wait_for(observed.response, 10)
    assert first.code == Code.CONTENT and first.payload == b""  # nothing retained yet
    assert endpoint.server.observations == 1
    notifications: list[bytes] = []

    async def collect() -> None:
        async for notification in observed.observation:
            notifications.append(notification.payload)
            if len(notifications) == 2:
                return

    collecting = asyncio.ensure_future(collect())
    await publish(operator, "commands/valve-2", b'{"open": 1}')
    await publish(operator, "commands/other", b'{"open": 9}')
    await publish(operator, "commands/valve-2", b"\x00raw")
    await asyncio.wait_for(collecting, 10)
    assert notifications == [b'{"open": 1}', b"\x00raw"]


async def test_close_ends_observations(gateway: RunningGateway, client: Any) -> None:
    ep = Endpoint(gateway)
    observed = client.request(aiocoap.Message(code=Code.GET, uri=ep.uri("/c/valve-3"),
                                              observe=0))
    assert (await asyncio.wait_for(observed.response, 10)).code == Code.CONTENT
    ep.close()
    last = [n async for n in observed.observation]  # ends with the 5.03 that ends it
    assert [n.code for n in last] == [Code.SERVICE_UNAVAILABLE]
    assert ep.server.observations == 0
    assert not on_loop(gateway, lambda: gateway.gateway.ingest.broker.subscribed)


# -- libcoap ----------------------------------------------------------------------------------
def libcoap(*args: str) -> subprocess.CompletedProcess[str]:
    assert LIBCOAP is not None
    return subprocess.run([LIBCOAP, "-B", "10", *args], capture_output=True, text=True,
                          timeout=30, check=True)


@pytest.mark.skipif(LIBCOAP is None, reason="libcoap's coap-client is not installed")
def test_libcoap_client(gateway: RunningGateway, endpoint: Endpoint, tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"pad": "y" * 4000}))
    cbor = tmp_path / "reading.cbor"
    cbor.write_bytes(cbor2.dumps({"kwh": 7}))
    assert libcoap("-m", "post", "-t", "json", "-e", '{"v": 1}',
                   endpoint.uri("/t/lib-1")).stderr == ""
    assert libcoap("-N", "-m", "put", "-t", "json", "-e", '{"v": 2}',
                   endpoint.uri("/t/lib-2")).stderr == ""
    assert libcoap("-m", "post", "-t", "cbor", "-f", str(cbor),
                   endpoint.uri("/t/lib-3")).stderr == ""
    assert libcoap("-m", "post", "-t", "json", "-b", "64", "-f", str(big),
                   endpoint.uri("/t/lib-4?k=none")).stderr == ""
    assert libcoap("-m", "post", "-t", "json", "-e", '{"v": 5}',
                   endpoint.uri("/t/locked-1?k=secret-key-1")).stderr == ""
    assert libcoap("-m", "post", "-t", "json", "-e", '{"v":',
                   endpoint.uri("/t/lib-1")).stderr.startswith("4.00")
    assert libcoap("-m", "post", "-e", "{}", endpoint.uri("/nowhere")).stderr.startswith(
        "4.04")
    assert libcoap("-m", "post", "-t", "json", "-e", "{}",
                   endpoint.uri("/t/locked-1")).stderr.startswith("4.01")
    gateway.wait_for(lambda: len(lake(tmp_path)) >= 5)
    records = {r["device"]: r for r in lake(tmp_path)}
    assert records["lib-1"]["payload"] == {"v": 1}
    assert records["lib-2"]["qos"] == 0
    assert records["lib-3"]["payload"] == {"kwh": 7}
    assert records["lib-4"]["payload"] == {"pad": "y" * 4000}
    assert records["locked-1"]["payload"] == {"v": 5}


@pytest.mark.skipif(LIBCOAP is None, reason="libcoap's coap-client is not installed")
def test_libcoap_observes_commands(gateway: RunningGateway, endpoint: Endpoint,
                                   operator: paho.Client) -> None:
    operator.publish("commands/lamp-1", b'{"on": true}', qos=1, retain=True).wait_for_publish(5)
    assert libcoap("-m", "get", endpoint.uri("/c/lamp-1")).stdout.strip() == '{"on": true}'
    assert LIBCOAP is not None
    observer = subprocess.Popen([LIBCOAP, "-s", "4", "-m", "get", endpoint.uri("/c/lamp-1")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        gateway.wait_for(lambda: endpoint.server.observations == 1)
        operator.publish("commands/lamp-1", b'{"on": false}', qos=1).wait_for_publish(5)
        out, err = observer.communicate(timeout=30)
    finally:
        if observer.poll() is None:
            observer.kill()
            observer.wait()
    assert out.strip() == '{"on": true}{"on": false}', err
    # The observer is gone: the next notification finds no one and ends the observation.
    operator.publish("commands/lamp-1", b'{"on": true}', qos=1).wait_for_publish(5)
    gateway.wait_for(lambda: endpoint.server.observations == 0)


def test_bench_coap_runs() -> None:
    """A tiny run of ``iot-gateway bench-coap``: both servers answer, the gateway
    processes everything it acknowledged."""
    from click.testing import CliRunner

    from gateway.coap_bench import bench_coap_command

    result = CliRunner().invoke(bench_coap_command, [
        "--requests", "300", "--warmup", "30", "--sockets", "8", "--rounds", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    runs = {r["server"]: r for r in report["runs"]}
    assert runs["gateway"]["processed"] == 300
    assert runs["bare"]["failed"] == runs["gateway"]["failed"] == 0
    assert report["ratio"] > 0


# -- the gateway's own endpoint (``[coap]``, ``serve --coap-listen``) -----------------------
async def test_the_gateway_serves_coap_from_its_config(
        gateway_factory: Callable[..., RunningGateway], client: Any, tmp_path: Path) -> None:
    from tests.conftest import DEFAULT_TOML

    base = DEFAULT_TOML.replace("[coap]\n", "[coap]\nrequire_psk = true\n", 1)
    assert base != DEFAULT_TOML
    gw = gateway_factory('[coap.psk]\n"pump-5" = "key-of-pump-5"\n', base)
    address = gw.gateway.coap_address
    assert address is not None
    uri = f"coap://127.0.0.1:{address[1]}/t/pump-5"
    response = await request(client, Code.POST, uri, b'{"v": 5}', content_format=JSON)
    assert response.code == Code.UNAUTHORIZED
    response = await request(client, Code.POST, uri + "?k=key-of-pump-5", b'{"v": 5}',
                             content_format=JSON)
    assert response.code == Code.CHANGED
    [record] = await wait_lake(gw, tmp_path, 1)
    assert (record["device"], record["payload"]) == ("pump-5", {"v": 5})


@pytest.mark.skipif(LIBCOAP is None, reason="libcoap's coap-client is not installed")
def test_serve_coap_listen(tmp_path: Path) -> None:
    proc = start_serve(tmp_path, "--coap-listen", "127.0.0.1:0")
    port = admin_get(proc.admin_port, "/healthz")["listeners"]["coap"]["port"]
    assert libcoap("-m", "post", "-t", "json", "-e", '{"v": 1}',
                   f"coap://127.0.0.1:{port}/t/serve-1").stderr == ""
    assert stop(proc) == 0
    records = [json.loads(line) for p in tmp_path.rglob("part-*.jsonl")
               for line in p.read_text().splitlines()]
    assert [(r["device"], r["protocol"]) for r in records] == [("serve-1", "coap")]
