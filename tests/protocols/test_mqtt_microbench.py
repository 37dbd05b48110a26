"""The microbenchmark stays runnable (it is not a performance test: no timing asserted)."""

import sys

import pytest

from protocols.mqtt import _microbench


def test_microbenchmark_runs_and_reports_every_case(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["microbench", "--seconds", "0.01", "--repeats", "1"])
    _microbench.main()
    lines = capsys.readouterr().out.splitlines()
    cases = [line.split()[:4] for line in lines[2:]]
    assert cases == [
        ["MQTT", "3.1.1", "QoS", "0"],
        ["MQTT", "3.1.1", "QoS", "1"],
        ["MQTT", "5.0", "QoS", "0"],
        ["MQTT", "5.0", "QoS", "1"],
    ]
