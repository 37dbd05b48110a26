"""Shared fixtures: a real gateway on loopback, in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from gateway.app import Gateway
from gateway.config import default_config_path, parse_config

DEFAULT_TOML = default_config_path().read_text()
CLI = [sys.executable, "-m", "gateway.cli"]
LISTENING = re.compile(r"MQTT on [\d.]+:(\d+), admin on http://[\d.]+:(\d+)")


class Serve(subprocess.Popen[str]):
    """``iot-gateway serve`` as a real process, its log collected line by line."""

    log_lines: list[str]
    mqtt_port: int
    admin_port: int

    def log_text(self) -> str:
        return "".join(self.log_lines)


_serving: list[Serve] = []


@pytest.fixture(autouse=True)
def _no_daemon_left_behind() -> Iterator[None]:
    """A failing test must not leave a gateway process running into the next one."""
    yield
    while _serving:
        proc = _serving.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start_serve(cwd: Path, *args: str, mqtt: str = "127.0.0.1:0") -> Serve:
    proc = Serve([*CLI, "serve", "--mqtt-listen", mqtt, "--admin-listen", "127.0.0.1:0",
                  "--coap-listen", "127.0.0.1:0", *args],
                 cwd=cwd, stderr=subprocess.PIPE, text=True)
    proc.log_lines = []
    _serving.append(proc)
    ready = threading.Event()

    def collect() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # drained to the end: the process never blocks on the pipe
            proc.log_lines.append(line)
            if m := LISTENING.search(line):
                proc.mqtt_port, proc.admin_port = int(m[1]), int(m[2])
                ready.set()
        proc.stderr.close()
        ready.set()

    threading.Thread(target=collect, daemon=True).start()
    ready.wait(30)
    if not hasattr(proc, "mqtt_port"):
        proc.kill()
        raise AssertionError(f"serve did not start (exit {proc.wait()}):\n{proc.log_text()}")
    return proc


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=30)


def admin_get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


class RunningGateway:
    """A gateway serving in a background thread; tests talk to it over real sockets."""

    def __init__(self, gateway: Gateway, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.gateway = gateway
        self.loop = loop
        self.thread = thread

    @property
    def mqtt_port(self) -> int:
        assert self.gateway.mqtt_address is not None
        return self.gateway.mqtt_address[1]

    @property
    def admin_url(self) -> str:
        assert self.gateway.admin_address is not None
        return f"http://127.0.0.1:{self.gateway.admin_address[1]}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def stats(self) -> dict[str, Any]:
        return json.loads(self.get("/v1/stats")[1])

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; stats: {self.stats()}")
            time.sleep(0.02)

    def wait_processed(self, count: int, timeout: float = 10.0) -> None:
        self.wait_for(lambda: self.stats()["processed"] >= count, timeout)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.gateway.request_stop)
            self.thread.join(timeout=30)


def config_text(tmp_path: Path, extra: str = "", base: str = DEFAULT_TOML) -> str:
    """The built-in config, writing under ``tmp_path``, listening on free loopback ports."""
    text = base.replace('"./data/lake"', json.dumps(str(tmp_path / "lake")))
    text = text.replace('"./data/state"', json.dumps(str(tmp_path / "state")))
    text = text.replace('"./data/audit"', json.dumps(str(tmp_path / "audit")))
    text = text.replace('"./data/dead-letter"', json.dumps(str(tmp_path / "dead-letter")))
    return text + "\n" + extra


def start_gateway(text: str) -> RunningGateway:
    config = parse_config(text)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            gateway = Gateway(config, mqtt_listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
                              coap_listen="127.0.0.1:0",
                              shutdown_timeout=5)
            box["gateway"], box["loop"] = gateway, asyncio.get_running_loop()
            try:
                await gateway.start()
            except BaseException as err:
                box["error"] = err
                ready.set()
                raise
            ready.set()
            await gateway.stopped()
            await gateway.shutdown()

        try:
            uvloop.run(main())
        except BaseException as err:  # reported to the test through box
            box.setdefault("error", err)
            ready.set()

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    assert ready.wait(15), "gateway did not start"
    if "error" in box:
        raise box["error"]
    return RunningGateway(box["gateway"], box["loop"], thread)


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    running: list[RunningGateway] = []

    def factory(extra: str = "", base: str = DEFAULT_TOML) -> RunningGateway:
        gw = start_gateway(config_text(tmp_path, extra, base))
        running.append(gw)
        return gw

    yield factory
    for gw in running:
        gw.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    return gateway_factory()
