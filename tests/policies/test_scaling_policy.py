"""Scaling policies, driven by hand-made load samples: config errors, static, reactive
hysteresis and latency-budget burn, the predictive policy's profile and burst hold, desired
replicas, plugins."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import policies.scaling as scaling
from policies.scaling import (
    ENTRY_POINT_GROUP,
    Decision,
    Forecaster,
    LoadSample,
    ScalingPolicy,
    ScalingSection,
    TierLoad,
    build_policy,
    register_policy,
)

ROOT = Path(__file__).parents[2]
SLOT_RATE = 500.0
INTERVAL = 0.5
BOUNDS = (("critical", 0.1, 0.1), ("standard", 0.9, 2.0))  # name, share of arrivals, bound


class _Config(msgspec.Struct, forbid_unknown_fields=True):
    scaling: ScalingSection = ScalingSection()


def load_toml(text: str) -> ScalingSection:
    return msgspec.toml.decode(text, type=_Config).scaling


def sample(at: float, rate: float, slots: int, *, backlog: int = 0, wait: float = 0.0,
           slot_rate: float = SLOT_RATE) -> LoadSample:
    """``rate`` split between the tiers; ``backlog`` and ``wait`` are the standard tier's."""
    tiers = tuple(
        TierLoad(name, rate * share, backlog if name == "standard" else 0,
                 wait if name == "standard" else 0.0, bound)
        for name, share, bound in BOUNDS)
    served = min(rate, slots * slot_rate)
    return LoadSample(at=at, tiers=tiers, served=served, slots=slots, slot_rate=slot_rate)


def run(policy: ScalingPolicy, rates: Iterator[float] | list[float], *, start: float = 0.0,
        slots: int = 1) -> list[Decision]:
    """Feed one rate per interval; the slots each decision asks are in effect at once."""
    decisions = []
    at = start
    for rate in rates:
        at += INTERVAL
        decision = policy.decide(sample(at, rate, slots))
        slots = decision.slots
        decisions.append(decision)
    return decisions


def steady(rate: float, seconds: float) -> list[float]:
    return [rate] * round(seconds / INTERVAL)


def section(**fields: Any) -> ScalingSection:
    return ScalingSection(**{"max_slots": 64, **fields})


def slots_for(rate: float, target: float = 0.7) -> int:
    return math.ceil(rate / target / SLOT_RATE)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("toml", "message"), [
    ("[scaling]\nmin_slots = 8\nmax_slots = 4",
     "`min_slots` (8) must not exceed `max_slots` (4) - at `$.scaling`"),
    ("[scaling]\nmin_replicas = 5\nmax_replicas = 2",
     "`min_replicas` (5) must not exceed `max_replicas` (2)"),
    ("[scaling]\nscale_down_utilisation = 0.8",
     "`scale_down_utilisation` (0.8) must be below `target_utilisation` (0.7)"),
    ("[scaling]\nday_s = 60\nprofile_bins = 960",
     "a profile bin (`day_s` / `profile_bins` = 0.0625 s) must be at least `interval_s`"),
    ("[scaling]\nburst_window_s = 600", "`burst_window_s` (600.0) must be shorter than `ewma_s`"),
    ("[scaling]\ntarget_utilisation = 1.5", "Expected `float` <= 1.0 - at"
                                            " `$.scaling.target_utilisation`"),
    ("[scaling]\nmax_slots = 0", "Expected `int` >= 1 - at `$.scaling.max_slots`"),
    ("[scaling]\nburst_factor = 1", "Expected `float` > 1.0 - at `$.scaling.burst_factor`"),
    ("[scaling]\npolicy = 'not a name'", "at `$.scaling.policy`"),
    ("[scaling]\ncooldown_s = 3", "Object contains unknown field `cooldown_s` - at `$.scaling`"),
    ("[scaling.hook]\ntimeout_s = 0", "Expected `float` > 0.0 - at `$.scaling.hook.timeout_s`"),
    ("[scaling.hook]\ncommand = 'aws'", "Expected `array`, got `str` - at"
                                        " `$.scaling.hook.command`"),
])
def test_config_errors_name_the_place(toml: str, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        load_toml(toml)
    assert message in str(err.value)


def test_the_defaults_and_the_example_load() -> None:
    assert load_toml("") == ScalingSection()
    example = load_toml((ROOT / "config" / "examples" / "scaling.toml").read_text())
    assert example.policy == "predictive"
    assert example.hook.command  # the example shows a hook
    assert isinstance(build_policy(example), scaling.PredictivePolicy)


def test_an_unknown_policy_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'predictve' \(known: .*predictive"
                                         r".*reactive.*static"):
        build_policy(section(policy="predictve"))


def test_a_plugin_policy_from_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fixed:
        name = "fixed"

        def __init__(self, config: ScalingSection) -> None:
            self.config = config

        def decide(self, sample: LoadSample) -> Decision:
            return Decision(at=sample.at, slots=3, desired_replicas=1, forecast=0.0,
                            action="hold", reason="fixed", inputs={})

    class EntryPoint:
        name = "fixed"

        def load(self) -> type[Fixed]:
            return Fixed

    def entry_points(group: str) -> list[EntryPoint]:
        return [EntryPoint()] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(scaling, "entry_points", entry_points)
    monkeypatch.setattr(scaling, "POLICIES", dict(scaling.POLICIES))
    policy = build_policy(section(policy="fixed"))
    assert policy.decide(sample(1.0, 100.0, 1)).slots == 3

    register_policy("made", lambda config: Fixed(config))
    assert build_policy(section(policy="made")).name == "fixed"


def test_a_plugin_that_is_not_a_policy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scaling, "POLICIES", dict(scaling.POLICIES))
    register_policy("broken", lambda config: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="has no `name` and `decide"):
        build_policy(section(policy="broken"))


# --------------------------------------------------------------------------- static


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=50))
def test_static_always_asks_max_slots(rates: list[float]) -> None:
    policy = build_policy(section(policy="static", max_slots=12))
    assert {d.slots for d in run(policy, rates)} == {12}


# --------------------------------------------------------------------------- reactive


@pytest.mark.parametrize("name", ["reactive", "predictive"])
def test_a_2x_step_scales_up_within_2_s_straight_to_what_it_needs(name: str) -> None:
    policy = build_policy(section(policy=name))
    before = run(policy, steady(2000, 120))
    slots = before[-1].slots
    assert slots == slots_for(2000)
    after = run(policy, steady(4000, 30), start=120.0, slots=slots)
    ups = [d for d in after if d.action == "scale-up"]
    assert ups, "no scale-up"
    assert ups[0].at - 120.0 <= 2.0
    assert ups[0].slots >= slots_for(4000)  # one step, not +1 per tick
    assert len(ups) == 1
    assert "4000" in ups[0].reason or "needs" in ups[0].reason


def test_a_burning_latency_budget_scales_up_at_once() -> None:
    policy = build_policy(section(policy="reactive", scale_up_after_s=5.0))
    run(policy, steady(2000, 60))
    slots = policy.decide(sample(60.5, 2000, slots_for(2000))).slots
    # The standard tier's oldest message has waited 1.2 s of its 2 s: no waiting 5 s.
    decision = policy.decide(sample(61.0, 3000, slots, backlog=6000, wait=1.2))
    assert decision.action == "scale-up"
    assert "burned 60%" in decision.reason
    # Sized to drain the backlog within what is left of the bound (0.8 s), plus arrivals.
    assert decision.slots >= math.ceil((3000 / 0.7 + 6000 / 0.8) / SLOT_RATE)
    assert decision.inputs["max_burn"] == pytest.approx(0.6)


def test_noise_below_the_scale_up_delay_does_not_scale_up() -> None:
    policy = build_policy(section(policy="reactive"))
    slots = run(policy, steady(2000, 60))[-1].slots
    # Single intervals above target (up to 1.3 ×), never two in a row.
    wobble = [2000 * 1.3 if i % 2 else 2000 * 0.9 for i in range(240)]
    assert all(d.action == "hold" for d in run(policy, wobble, start=60.0, slots=slots))


def test_scale_down_waits_for_the_cool_down_and_sustained_low_load() -> None:
    policy = build_policy(section(policy="reactive", cool_down_s=30.0))
    slots = run(policy, steady(8000, 120))[-1].slots
    drop = run(policy, steady(1000, 120), start=120.0, slots=slots)
    downs = [d for d in drop if d.action == "scale-down"]
    assert len(downs) == 1
    assert downs[0].at - 120.0 >= 30.0
    assert downs[0].slots == math.ceil(1000 * 1.1 / 0.7 / SLOT_RATE)
    # A low stretch shorter than the cool-down, then load back in the band: no change.
    policy = build_policy(section(policy="reactive", cool_down_s=30.0))
    slots = run(policy, steady(8000, 120))[-1].slots
    dip = run(policy, steady(1000, 20) + steady(8000, 60), start=120.0, slots=slots)
    assert all(d.action == "hold" for d in dip)


def test_load_within_the_band_holds() -> None:
    policy = build_policy(section(policy="reactive"))
    slots = run(policy, steady(7000, 60))[-1].slots  # sized at 70 %
    # 45 %..70 % of that capacity: above the scale-down threshold, below the target.
    band = [slots * SLOT_RATE * u for u in (0.45, 0.6, 0.69, 0.5) * 300]
    assert all(d.action == "hold" for d in run(policy, band, start=60.0, slots=slots))


def test_unknown_slot_rate_holds_unless_a_budget_burns() -> None:
    def standard(at: float, backlog: int, wait: float, served: float) -> LoadSample:
        return LoadSample(at=at, tiers=(TierLoad("standard", 5000, backlog, wait, 2.0),),
                          served=served, slots=2, slot_rate=0.0)

    policy = build_policy(section(policy="reactive"))
    quiet = policy.decide(standard(0.5, 0, 0.0, 5000))
    assert (quiet.action, quiet.slots) == ("hold", 2)
    stalled = policy.decide(standard(1.0, 4000, 1.5, 0.0))  # nothing served: double
    assert (stalled.action, stalled.slots) == ("scale-up", 4)
    assert "doubling" in stalled.reason
    # Saturated with a backlog: what the slots served is what a slot does.
    policy = build_policy(section(policy="reactive"))
    saturated = policy.decide(standard(0.5, 4000, 1.5, 1000.0))
    assert saturated.inputs["slot_rate"] == 500.0
    assert saturated.slots >= math.ceil((5000 / 0.7 + 4000 / 0.5) / 500)


# --------------------------------------------------------------------------- predictive


def test_predictive_holds_capacity_through_a_detected_burst() -> None:
    """A reconnect storm: a spike, then a long tail at 3 × the level. The reactive policy
    gives capacity back in the tail (utilisation is low against the spike's capacity); the
    predictive one holds it while the burst lasts."""
    storm = steady(1000, 300) + steady(6000, 10) + steady(3000, 60) + steady(1000, 120)
    reactive = run(build_policy(section(policy="reactive")), storm)
    predictive_policy = build_policy(section(policy="predictive"))
    predictive = run(predictive_policy, storm)
    in_tail = slice(round(310 / INTERVAL), round(370 / INTERVAL))
    assert any(d.action == "scale-down" for d in reactive[in_tail])
    assert not any(d.action == "scale-down" for d in predictive[in_tail])
    assert any(d.inputs["burst"] for d in predictive[in_tail])
    # After the burst, capacity is given back.
    assert predictive[-1].slots < max(d.slots for d in predictive)


def daily(day_s: float, days: int, spike_at: float, spike: float = 4.0,
          one_off: tuple[int, float] | None = None) -> list[float]:
    """A rate per interval: 1000 msg/s, ×``spike`` for 30 s at ``spike_at`` of every day,
    and (day, time) of a one-off burst of the same size."""
    rates = []
    for i in range(round(days * day_s / INTERVAL)):
        t = i * INTERVAL
        day, into = divmod(t, day_s)
        rate = 1000.0
        if spike_at <= into < spike_at + 30:
            rate *= spike
        if one_off and day == one_off[0] and one_off[1] <= into < one_off[1] + 30:
            rate *= spike
        rates.append(rate)
    return rates


def test_the_forecaster_learns_a_recurring_burst_but_not_a_one_off() -> None:
    day_s = 1200.0
    config = section(day_s=day_s, profile_bins=48, forecast_horizon_s=60.0)
    forecaster = Forecaster(config)
    rates = daily(day_s, 3, spike_at=600.0, one_off=(1, 300.0))
    seen: dict[float, float | None] = {}
    for i, rate in enumerate(rates):
        at = (i + 1) * INTERVAL
        forecaster.observe(at, rate, INTERVAL)
        if at in (560.0, day_s + 560.0, 2 * day_s + 560.0, 2 * day_s + 260.0):
            seen[at] = forecaster.seasonal(at, 60.0)
    assert seen[560.0] is None  # nothing seen a day before
    assert seen[day_s + 560.0] == pytest.approx(4000, rel=0.15)  # yesterday's spike ahead
    assert seen[2 * day_s + 560.0] == pytest.approx(4000, rel=0.15)
    # Day 1's one-off burst at 300 s did not recur on day 0: not expected on day 2.
    assert seen[2 * day_s + 260.0] == pytest.approx(1000, rel=0.15)


def test_predictive_provisions_ahead_of_a_learned_burst() -> None:
    day_s = 1200.0
    config = section(day_s=day_s, profile_bins=48, forecast_horizon_s=60.0)
    rates = daily(day_s, 3, spike_at=600.0)
    reactive = run(build_policy(msgspec.structs.replace(config, policy="reactive")), rates)
    predictive = run(build_policy(msgspec.structs.replace(config, policy="predictive")), rates)
    before_spike = round((2 * day_s + 599.0) / INTERVAL) - 1  # the decision at day 2, 599 s
    # In place before the spike: enough to carry it without a backlog; reactive is not.
    assert predictive[before_spike].slots * SLOT_RATE >= 4000
    assert reactive[before_spike].slots * SLOT_RATE < 4000
    assert "profile expects" in " ".join(
        d.reason for d in predictive[before_spike - 200:before_spike])
    # ...and on the first day it could not know.
    assert predictive[round(599.0 / INTERVAL) - 1].slots * SLOT_RATE < 4000


def test_the_profile_scales_with_the_level() -> None:
    """A quieter day (the weekend) expects the learned shape at its own level."""
    day_s = 1200.0
    forecaster = Forecaster(section(day_s=day_s, profile_bins=48))
    rates = daily(day_s, 1, spike_at=600.0) + [r * 0.5 for r in daily(day_s, 1, spike_at=600.0)]
    for i, rate in enumerate(rates):
        at = (i + 1) * INTERVAL
        forecaster.observe(at, rate, INTERVAL)
        if at == day_s + 560.0:
            assert forecaster.seasonal(at, 60.0) == pytest.approx(2000, rel=0.15)


# --------------------------------------------------------------------------- replicas


def test_desired_replicas_track_the_load_within_bounds() -> None:
    config = section(policy="reactive", replica_capacity_per_s=1000.0, min_replicas=2,
                     max_replicas=10, cool_down_s=30.0)
    policy = build_policy(config)
    ramp = [500.0 + 50.0 * i for i in range(600)]  # to 30,450 msg/s
    decisions = run(policy, ramp + steady(700, 120))
    wanted = [d.desired_replicas for d in decisions]
    assert min(wanted) >= 2 and max(wanted) <= 10
    assert wanted[0] == 2 and max(wanted) == 10
    assert wanted == sorted(wanted[:600]) + wanted[600:]  # rises with the load
    # Falls only after wanting less for the cool-down.
    fall = next(i for i in range(600, len(wanted)) if wanted[i] < 10)
    assert (fall - 600) * INTERVAL >= 30.0
    assert wanted[-1] == 2


def test_desired_replicas_default_to_max_slots_times_the_slot_rate() -> None:
    policy = build_policy(section(policy="reactive", max_slots=10, max_replicas=100))
    decision = run(policy, steady(35_000, 30))[-1]  # one replica: 10 × 500 msg/s at 70 %
    assert decision.desired_replicas == math.ceil(35_000 / (10 * SLOT_RATE * 0.7))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50_000), st.integers(0, 10_000), st.floats(0, 5)),
                min_size=1, max_size=80),
       st.sampled_from(["static", "reactive", "predictive"]))
def test_decisions_stay_within_bounds_and_audit_finite_inputs(
        loads: list[tuple[float, int, float]], name: str) -> None:
    config = section(policy=name, min_slots=2, max_slots=20, min_replicas=1, max_replicas=7,
                     replica_capacity_per_s=2000.0, day_s=600.0, profile_bins=60)
    policy = build_policy(config)
    slots = 2
    for i, (rate, backlog, wait) in enumerate(loads):
        d = policy.decide(sample((i + 1) * INTERVAL, rate, slots, backlog=backlog, wait=wait))
        assert 2 <= d.slots <= 20
        assert 1 <= d.desired_replicas <= 7
        assert d.action == ("hold" if d.slots == slots else
                            "scale-up" if d.slots > slots else "scale-down")
        assert all(math.isfinite(v) for v in d.inputs.values())
        assert d.reason
        slots = d.slots
