"""Behaviour of the anomaly triage policy (pure logic, clock passed in)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.envelope import Envelope
from policies import anomaly as mod
from policies.anomaly import Anomaly, AnomalyDetector, AnomalySection, Detector


def make(*detectors: Detector, **kw: Any) -> AnomalyDetector:
    return AnomalyDetector(AnomalySection(detectors=list(detectors)), **kw)


def test_threshold_above_and_below() -> None:
    det = make(Detector(name="temp", kind="threshold", field="t", above=80, below=-10,
                        suppress_s=0))
    assert det.check("d1", {"t": 20.0}, now=1.0) is None
    hot = det.check("d1", {"t": 81}, now=2.0)
    assert hot is not None and hot[0].value == 81 and "above" in hot[0].reason
    assert hot[0].severity == "warning" and hot[0].detector == "temp"
    cold = det.check("d1", {"t": -11.5}, now=3.0)
    assert cold is not None and "below" in cold[0].reason


def test_non_numeric_or_missing_field_ignored() -> None:
    det = make(Detector(name="temp", kind="threshold", field="t", above=1),
               Detector(name="z", kind="zscore", field="t", min_samples=1),
               Detector(name="r", kind="rate", field="t", max_rate_per_s=1))
    for data in ({"t": "hot"}, {"t": True}, {"x": 5}, None, {"t": None}):
        assert det.check("d1", data, now=1.0) is None


def test_rate_of_change_across_two_readings() -> None:
    det = make(Detector(name="r", kind="rate", field="p", max_rate_per_s=2.0))
    assert det.check("d1", {"p": 10}, now=0.0) is None
    assert det.check("d1", {"p": 11}, now=1.0) is None  # 1/s
    fast = det.check("d1", {"p": 21}, now=2.0)  # 10/s
    assert fast is not None and fast[0].value == 21
    assert det.check("d2", {"p": 1000}, now=2.0) is None  # per device


def test_zscore_flags_outlier_only_after_min_samples() -> None:
    det = make(Detector(name="z", kind="zscore", field="v", alpha=0.2, z=3, min_samples=5,
                        suppress_s=0))
    assert det.check("d1", {"v": 10.0}, now=0) is None
    assert det.check("d1", {"v": 50.0}, now=1) is None  # not enough samples yet
    det = make(Detector(name="z", kind="zscore", field="v", alpha=0.2, z=3, min_samples=5,
                        suppress_s=0))
    for i in range(20):
        assert det.check("d1", {"v": 10.0 + (0.1 if i % 2 else -0.1)}, now=i) is None
    out = det.check("d1", {"v": 15.0}, now=21)
    assert out is not None and out[0].detector == "z" and "σ" in out[0].reason
    assert det.check("d1", {"v": 10.05}, now=22) is None


def test_zscore_min_std_floor() -> None:
    det = make(Detector(name="z", kind="zscore", field="v", min_samples=3, min_std=1.0))
    for i in range(5):
        det.check("d1", {"v": 10}, now=i)
    assert det.check("d1", {"v": 11}, now=6) is None
    assert det.check("d1", {"v": 20}, now=7) is not None


def test_silence_raised_once_and_cleared_when_device_speaks() -> None:
    det = make(Detector(name="quiet", kind="silence", silent_s=30, suppress_s=0))
    det.check("d1", {}, now=0.0)
    det.check("d2", {}, now=20.0)
    assert det.check_silence(10.0) == []
    out = det.check_silence(31.0)
    assert [(a.device, a.detector) for a in out] == [("d1", "quiet")]
    assert det.check_silence(32.0) == []  # once
    assert [a.device for a in det.check_silence(51.0)] == ["d2"]
    det.check("d1", {}, now=60.0)  # speaks again: cleared
    assert det.check_silence(80.0) == []
    assert [a.device for a in det.check_silence(91.0)] == ["d1"]


def test_silence_respects_device_class_filter() -> None:
    det = make(Detector(name="quiet", kind="silence", silent_s=5, device_class="meter"),
               Detector(name="z", kind="zscore", field="v"))
    det.check("s1", {"v": 1}, device_class="sensor", now=0)
    det.check("m1", {"v": 1}, device_class="meter", now=0)
    assert [a.device for a in det.check_silence(10)] == ["m1"]


def test_topic_filter() -> None:
    det = make(Detector(name="t", kind="threshold", field="v", above=1,
                        topic="plant/+/boiler/#"))
    assert det.check("d", {"v": 5}, topic="plant/a/pump", now=0) is None
    assert det.check("d", {"v": 5}, topic="plant/a/boiler/x", now=0) is not None


def test_duplicates_suppressed_inside_window_raised_after() -> None:
    det = make(Detector(name="t", kind="threshold", field="v", above=1, suppress_s=10))
    assert det.check("d", {"v": 5}, now=0) is not None
    assert det.check("d", {"v": 6}, now=5) is None
    assert det.check("d", {"v": 6}, now=9.9) is None
    assert det.suppressed == 2
    assert det.check("other", {"v": 6}, now=9.9) is not None  # per device
    assert det.check("d", {"v": 7}, now=10.5) is not None


def _escalating() -> AnomalyDetector:
    return make(Detector(name="t", kind="threshold", field="v", above=1, suppress_s=5,
                         escalate_after_s=60))


def test_escalation_when_unacknowledged_and_persisting() -> None:
    det = _escalating()
    first = det.check("d", {"v": 5}, now=0)
    assert first is not None and first[0].severity == "warning"
    det.check("d", {"v": 5}, now=30)  # still holding
    assert det.escalations(59) == []
    up = det.escalations(61)
    assert [(a.severity, a.escalated) for a in up] == [("critical", True)]
    assert [a.severity for a in det.escalations(122)] == ["emergency"]
    assert det.escalations(500) == []  # emergency is the top
    assert det.active("d") == {"t": "emergency"}


def test_no_escalation_when_acknowledged() -> None:
    det = _escalating()
    det.check("d", {"v": 5}, now=0)
    assert det.acknowledge("d", "t")
    assert not det.acknowledge("d", "nope") and not det.acknowledge("x", "t")
    assert det.escalations(100) == []


def test_no_escalation_when_condition_cleared() -> None:
    det = _escalating()
    det.check("d", {"v": 5}, now=0)
    det.check("d", {"v": 0}, now=1)  # back to normal
    assert det.escalations(100) == []
    assert det.active("d") == {}  # forgotten after the suppression window


def test_silence_escalates_until_device_speaks() -> None:
    det = make(Detector(name="q", kind="silence", silent_s=10, severity="critical",
                        escalate_after_s=5))
    det.check("d", None, now=0)
    assert [a.severity for a in det.check_silence(11)] == ["critical"]
    assert [a.severity for a in det.escalations(17)] == ["emergency"]
    det.check("d", None, now=18)
    assert det.escalations(100) == []


class Spike:
    def check(self, device: str, data: dict[str, Any] | None, now: float) -> Anomaly | None:
        if data and data.get("spike"):
            return Anomaly(detector="?", device=device, severity="critical", value=1.0,
                           reason="spike flag", raised_at=now)
        return None


def test_plugin_detector() -> None:
    det = make(Detector(name="spiky", kind="plugin", plugin="spike"),
               plugins={"spike": Spike()})
    assert det.check("d", {"spike": False}, now=0) is None
    out = det.check("d", {"spike": True}, now=1)
    assert out is not None
    assert (out[0].detector, out[0].severity, out[0].reason) == ("spiky", "critical",
                                                                 "spike flag")


def test_plugin_from_registry_and_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mod, "DETECTORS", {})

    class EP:
        name = "ep-spike"

        def load(self) -> type[Spike]:
            return Spike

    mod.load_entry_points(lambda group: [EP()] if group == mod.ENTRY_POINT_GROUP else [])
    assert isinstance(mod.DETECTORS["ep-spike"], Spike)
    det = make(Detector(name="s", kind="plugin", plugin="ep-spike"))
    assert det.check("d", {"spike": 1}, now=0) is not None
    with pytest.raises(ValueError, match=r"detectors\[0\]\.plugin"):
        make(Detector(name="s", kind="plugin", plugin="missing"))


def test_check_envelope() -> None:
    env = Envelope(id="gw-1", device="d", tenant="t", tier="std", region="r", topic="a/b",
                   payload=b'{"v": 9}', received_ns=0, received_at=0.0, data={"v": 9})
    det = make(Detector(name="t", kind="threshold", field="v", above=1))
    out = det.check_envelope(env, now=0)
    assert out is not None and out[0].device == "d"


def test_no_detectors_is_none() -> None:
    assert make().check("d", {"v": 1}, now=0) is None
    det = make(Detector(name="t", kind="threshold", field="v", above=1, device_class="x"))
    assert det.check("d", {"v": 9}, device_class="y", now=0) is None
    assert det.devices == 0


def decode(toml: str) -> AnomalySection:
    return msgspec.toml.decode(toml, type=AnomalySection)


def test_toml_config_loads() -> None:
    section = decode("""
[[detectors]]
name = "temp-high"
kind = "threshold"
field = "temperature"
above = 85
severity = "critical"
escalate_after_s = 300

[[detectors]]
name = "gone"
kind = "silence"
silent_s = 120
""")
    assert [d.kind for d in section.detectors] == ["threshold", "silence"]


@pytest.mark.parametrize(("toml", "message"), [
    ('kind = "threshold"\nfield = "t"', "`above` or `below`"),
    ('kind = "threshold"\nfield = "t"\nabove = 1\nbelow = 2', "`below` must be less"),
    ('kind = "threshold"\nabove = 1', "`field` is required"),
    ('kind = "rate"\nfield = "t"', "`max_rate_per_s` is required"),
    ('kind = "silence"', "`silent_s` is required"),
    ('kind = "silence"\nsilent_s = 1\nalpha = 0.5', "`alpha` does not apply"),
    ('kind = "plugin"', "`plugin` is required"),
    ('kind = "zscore"\nfield = "t"\nalpha = 1.5', "detectors[0].alpha"),
    ('kind = "silence"\nsilent_s = 1\ntopic = "a/#/b"', "`topic`"),
    ('kind = "silence"\nsilent_s = 1\nseverity = "bad"', "detectors[0].severity"),
    ('kind = "silence"\nsilent_s = 1\nbogus = 1', "bogus"),
])
def test_config_errors_name_their_field(toml: str, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        decode(f'[[detectors]]\nname = "x"\n{toml}\n')
    assert message in str(err.value)
    assert "detectors[0]" in str(err.value)


def test_duplicate_names_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match="duplicate detector name"):
        decode('[[detectors]]\nname = "x"\nkind = "silence"\nsilent_s = 1\n'
               '[[detectors]]\nname = "x"\nkind = "silence"\nsilent_s = 2\n')
