"""The time-compressed scaling simulation: the fluid queue itself, then step, ramp, burst,
noise and seasonal loads against the policies, and the bench-scaling command."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.scaling_sim import (
    BenchArgs,
    Burst,
    Constant,
    Ramp,
    Scenario,
    Seasonal,
    SimResult,
    SimTier,
    Step,
    Sum,
    WithBursts,
    fleet_week,
    run_bench,
    simulate,
)
from policies.scaling import ScalingSection

SLOT_RATE = 500.0


def section(policy: str, **fields: object) -> ScalingSection:
    return msgspec.convert({"policy": policy, "max_slots": 64, **fields}, ScalingSection)


def slots_at(result: SimResult, at: float) -> float:
    """Slots in effect at the decision made at ``at``."""
    index = min(range(len(result.trace.at)), key=lambda i: abs(result.trace.at[i] - at))
    return result.trace.slots_in_effect[index]


# --------------------------------------------------------------------------- the model


def test_a_fifo_fluid_queue_waits_exactly() -> None:
    """1000 msg/s into 800 msg/s of capacity: after 10 s, 2000 messages wait and the oldest
    arrived at 8 s (the first 8000 were served), i.e. it has waited 2 s."""
    scenario = Scenario(load=Constant(1000.0), duration_s=10.0, slot_rate=800.0,
                        tiers=(SimTier("only", 1.0, 1.5),), initial_slots=1)
    result = simulate(section("static", max_slots=1), scenario)
    assert result.max_wait_s["only"] == pytest.approx(2.0, abs=1e-6)
    # Past the 1.5 s bound once waits pass it: from 7.5 s on.
    assert result.breach_s == pytest.approx(2.5, abs=0.11)
    assert result.slot_seconds == pytest.approx(10.0)


def test_the_most_urgent_tier_is_served_first() -> None:
    scenario = Scenario(load=Constant(1000.0), duration_s=60.0, slot_rate=800.0,
                        tiers=(SimTier("urgent", 0.5, 0.1), SimTier("rest", 0.5, 5.0)),
                        initial_slots=1)
    result = simulate(section("static", max_slots=1), scenario)
    assert result.max_wait_s["urgent"] == 0.0
    assert result.tier_breach_s["urgent"] == 0.0
    assert result.max_wait_s["rest"] > 5.0
    assert result.tier_breach_s["rest"] > 0.0


def test_load_shapes() -> None:
    seasonal = Seasonal(1000.0, day_s=100.0, daily_swing=0.5, peak_at=0.5, weekend_factor=0.5)
    assert seasonal.rate(50.0) == pytest.approx(1500.0)  # the day's peak
    assert seasonal.rate(0.0) == pytest.approx(500.0)  # the trough
    assert seasonal.rate(5 * 100.0 + 50.0) == pytest.approx(750.0)  # Saturday's peak
    bursts = WithBursts(Constant(100.0), (Burst(10.0, 5.0, 4.0), Burst(12.0, 1.0, 2.0)))
    assert [bursts.rate(t) for t in (9.9, 10.0, 12.5, 14.9, 15.0)] == [100, 400, 400, 400, 100]
    assert Sum((Step(1.0, 2.0, 5.0), Ramp(0.0, 10.0, 0.0, 10.0))).rate(5.0) == 7.0


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("policy", ["reactive", "predictive"])
def test_a_2x_step_starts_within_2_s_and_completes_within_10_s(policy: str) -> None:
    scenario = Scenario(load=Step(2000.0, 4000.0, 120.0), duration_s=300.0,
                        slot_rate=SLOT_RATE, noise=0.05, seed=3)
    result = simulate(section(policy), scenario)
    ups = [e for e in result.events if e.at >= 120.0]
    assert ups and ups[0].action == "scale-up"
    assert ups[0].at - 120.0 <= 2.0
    needed = math.ceil(4000 / 0.7 / SLOT_RATE)
    assert slots_at(result, 130.0) >= needed  # in effect within 10 s
    assert all(e.at <= 130.0 for e in ups)  # and nothing more to do after
    assert result.breach_s == 0.0


def test_a_ramp_is_tracked_without_breaking_a_bound() -> None:
    scenario = Scenario(load=Ramp(1000.0, 6000.0, 60.0, 600.0), duration_s=900.0,
                        slot_rate=SLOT_RATE, noise=0.05, seed=5)
    result = simulate(section("reactive"), scenario)
    assert result.breach_s == 0.0
    assert all(e.action == "scale-up" for e in result.events)
    trace = result.trace
    for i in range(len(trace.at)):
        if trace.at[i] > 10.0:  # past the start from min_slots
            capacity = trace.slots_in_effect[i] * SLOT_RATE
            assert trace.arrivals[i] <= capacity  # never behind
            assert capacity <= max(trace.arrivals[i] / 0.4 * 1.1, 2 * SLOT_RATE)  # nor idle
    assert slots_at(result, 900.0) in range(math.ceil(6000 / 0.7 / SLOT_RATE),
                                            math.ceil(6000 * 1.15 / 0.7 / SLOT_RATE) + 1)


@pytest.mark.parametrize("policy", ["reactive", "predictive"])
def test_a_burst_raises_capacity_which_falls_back_only_after_the_cool_down(policy: str) -> None:
    load = WithBursts(Constant(2000.0), (Burst(300.0, 60.0, 4.0),))
    scenario = Scenario(load=load, duration_s=900.0, slot_rate=SLOT_RATE, noise=0.05, seed=7)
    result = simulate(section(policy, cool_down_s=30.0), scenario)
    in_burst = [e for e in result.events if 300.0 <= e.at < 360.0]
    assert in_burst and all(e.action == "scale-up" for e in in_burst)
    assert in_burst[0].at - 300.0 <= 2.0
    assert max(e.to_slots for e in in_burst) >= math.ceil(8000 / 0.7 / SLOT_RATE)
    downs = [e for e in result.events if e.action == "scale-down"]
    assert len(downs) == 1
    assert downs[0].at >= 360.0 + 30.0
    assert downs[0].to_slots <= math.ceil(2000 * 1.2 / 0.7 / SLOT_RATE)
    assert result.flaps == 0
    assert result.breach_s == 0.0


@pytest.mark.parametrize("policy", ["reactive", "predictive"])
def test_noisy_steady_load_does_not_flap(policy: str) -> None:
    """An hour at 5000 msg/s with 15 % noise per step."""
    scenario = Scenario(load=Constant(5000.0), duration_s=3600.0, slot_rate=SLOT_RATE,
                        noise=0.15, seed=11)
    result = simulate(section(policy, day_s=600.0), scenario)
    assert result.direction_changes <= 2
    assert result.flaps == 0
    assert len(result.events) <= 6
    assert result.breach_share_between(30.0, 3600.0) == 0.0  # past the start from 1 slot


def test_static_holds_max_slots_throughout() -> None:
    scenario = Scenario(load=fleet_week(1, 1, 3600.0), duration_s=3600.0, slot_rate=SLOT_RATE,
                        noise=0.05, initial_slots=3)
    result = simulate(section("static", max_slots=40), scenario)
    assert set(result.trace.slots_asked) == {40}
    assert result.slot_seconds == pytest.approx(40 * 3600.0, rel=1e-3)  # after 0.5 s at 3


def test_desired_replicas_follow_the_load_within_bounds() -> None:
    scenario = Scenario(load=Ramp(1000.0, 30000.0, 0.0, 600.0), duration_s=600.0,
                        slot_rate=SLOT_RATE)
    result = simulate(section("predictive", replica_capacity_per_s=2000.0, min_replicas=2,
                              max_replicas=12), scenario)
    wanted = list(result.trace.desired_replicas)
    assert wanted == sorted(wanted)
    assert wanted[0] == 2 and wanted[-1] == 12
    assert min(wanted) >= 2 and max(wanted) <= 12


@pytest.mark.slow
def test_two_weeks_of_seasonal_load_the_predictive_policy_learns() -> None:
    """Daily and weekly cycles, a daily reconnect at 03:00 and random bursts; capacity that
    takes 30 s to provision. In the second week the predictive policy breaks bounds less
    than the reactive one, and is in place before the daily reconnect."""
    day_s = 1800.0
    load = fleet_week(14, seed=2, day_s=day_s)
    scenario = Scenario(load=load, duration_s=14 * day_s, slot_rate=SLOT_RATE, noise=0.05,
                        seed=2, provision_delay_s=30.0, step_s=0.25, initial_slots=20)
    sections = {name: section(name, day_s=day_s, forecast_horizon_s=60.0)
                for name in ("reactive", "predictive")}
    results = {name: simulate(s, scenario) for name, s in sections.items()}
    week = 7 * day_s
    reactive = results["reactive"].breach_share_between(week, 2 * week)
    predictive = results["predictive"].breach_share_between(week, 2 * week)
    assert reactive > 0.0
    assert predictive < reactive
    # Before each reconnect of the second week, the predictive policy already has it.
    reconnects = [b for b in load.bursts
                  if b.start >= week and abs((b.start / day_s) % 1 - 3 / 24) * day_s < 10]
    assert len(reconnects) == 7

    def ready(policy: str) -> int:
        return sum(slots_at(results[policy], b.start - 1.0) * SLOT_RATE >= load.rate(b.start + 1)
                   for b in reconnects)

    assert ready("predictive") == 7
    assert ready("reactive") < 7


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_the_bench_meets_its_targets_on_a_short_run() -> None:
    report = run_bench(BenchArgs(days=3, seed=4, day_s=1800.0))
    slow = next(m for m in report["models"] if m["provision_delay_s"] == 30.0)
    in_node = next(m for m in report["models"] if m["provision_delay_s"] == 0.5)
    for model in (slow, in_node):
        policies = model["policies"]
        assert policies["static"]["breach_s"] == 0.0
        assert policies["predictive"]["capacity_vs_static"] <= 0.7
        assert model["targets"]["predictive_capacity_at_most_70pct_of_static"] is True
    assert slow["targets"]["predictive_breaks_less_than_reactive"] is True
    assert (slow["policies"]["predictive"]["breach_s"]
            < slow["policies"]["reactive"]["breach_s"])


def test_bench_scaling_command() -> None:
    result = CliRunner().invoke(main, ["bench-scaling", "--days", "2", "--day-seconds", "600",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["days"] == 2 and report["day_s"] == 600.0
    assert [m["capacity"] for m in report["models"]] == ["in-node slots",
                                                          "new processes or replicas"]
    text = CliRunner().invoke(main, ["bench-scaling", "--days", "2", "--day-seconds", "600"])
    assert text.exit_code == 0, text.output
    assert "predictive" in text.output and "target:" in text.output
    bad = CliRunner().invoke(main, ["bench-scaling", "--days", "1"])
    assert bad.exit_code == 2
