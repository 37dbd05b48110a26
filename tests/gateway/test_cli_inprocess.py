"""The CLI's argument handling and exit codes, in-process (click's runner)."""

from __future__ import annotations

import socket
from pathlib import Path

from click.testing import CliRunner

from gateway.cli import main


def test_version_and_help() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.startswith("iot-gateway, version")
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "check-config", "bench"):
        assert command in result.output


def test_check_config_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    good = Path(__file__).parents[2] / "config" / "gateway.toml"
    result = runner.invoke(main, ["check-config", str(good)])
    assert result.exit_code == 0 and "4 tiers" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tiers]]\nname = "standard"\nmax_latency_ms = 1\n[sinks.s]\ntype = "nope"\n')
    result = runner.invoke(main, ["check-config", str(bad)])
    assert result.exit_code == 2
    assert "sinks.s" in result.output or "nope" in result.output


def test_serve_reports_a_taken_port_and_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--mqtt-listen", f"127.0.0.1:{port}",
                                           "--admin-listen", "127.0.0.1:0",
                                           "--coap-listen", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert "address already in use" in result.output


def test_serve_reports_a_taken_admin_port_and_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--mqtt-listen", "127.0.0.1:0",
                                           "--admin-listen", f"127.0.0.1:{port}",
                                           "--coap-listen", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert "admin HTTP" in result.output


def test_bench_rejects_unknown_qos() -> None:
    result = CliRunner().invoke(main, ["bench", "--qos", "0,3"])
    assert result.exit_code == 2
    assert "--qos" in result.output
