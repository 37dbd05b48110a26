"""A time-compressed, in-process simulation of a scaling policy (no sockets), and the
``bench-scaling`` benchmark built on it.

Theory of operation
-------------------
A discrete-time fluid queue. Each step of ``step_s`` seconds:

1. capacity changes the policy asked ``provision_delay_s`` ago take effect;
2. the offered rate is the load shape at the step's middle, times ``1 + noise × N(0, 1)``
   (a seeded generator, so the same scenario is the same load for every policy), split
   between the tiers by their shares;
3. the step's service, ``slots × slot_rate × step_s`` messages, goes to the tiers most
   urgent first, and inside a tier first come, first served. A tier's queue is a list of
   *cohorts*, each spread evenly over the arrival interval it came in; serving part of a
   cohort moves its start, so the queue's head is exactly the arrival time of its oldest
   waiting message, and ``now - head`` its waiting time (exact for a fluid FIFO queue
   with rates constant over a step);
4. a tier whose oldest message has waited longer than its bound breaks it for the step.

Every ``interval_s`` of simulated time the policy gets a :class:`LoadSample` measured as the
gateway measures it (arrivals and service over the interval, backlog and oldest wait now)
and its decision is queued to take effect after the provisioning delay.

Results: the time any tier was past its bound, the slot-seconds used, the scale events, how
often the direction changed and how many of those were flaps (a reversal within
``flap_window_s`` of the change before). A week at a compressed day runs in seconds.

Compression: only the seasonal cycle is compressed (``day_s``); bursts, latency bounds,
reaction and provisioning times are real seconds.

The benchmark (:func:`run_bench`): one load (:func:`fleet_week`: daily and weekly cycles,
noise, the fleet's daily reconnect at 03:00 and bursts at random times) against static
(``max_slots``, sized for the week's peak at the target utilisation), reactive and
predictive, all with the same bounds. It runs twice: with capacity in effect 0.5 s after
the decision (in-node slots) and 30 s after (new processes or replicas). In-node, a burst
goes unserved for at most ``scale_up_after_s`` + an interval + 0.5 s ≈ 2 s, behind the
urgent tiers, so neither adaptive policy tends to break a bound there; with slow capacity
the reactive policy is late for every burst, the predictive one only for the random ones.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import msgspec

from policies.scaling import (
    LoadSample,
    ScalingPolicy,
    ScalingSection,
    TierLoad,
    build_policy,
)

__all__ = [
    "BenchArgs",
    "Burst",
    "Constant",
    "LoadShape",
    "Ramp",
    "ScaleEvent",
    "Scenario",
    "Seasonal",
    "SimResult",
    "SimTier",
    "Step",
    "Sum",
    "Trace",
    "WithBursts",
    "fleet_week",
    "print_bench",
    "run_bench",
    "simulate",
]

WEEKEND = (5, 6)
"""Day indexes (from the start of the simulation, 0 = Monday) of the weekend."""


# --------------------------------------------------------------------------- load shapes


class LoadShape(Protocol):
    def rate(self, t: float) -> float:
        """Offered messages/s at ``t`` (before noise)."""
        ...


@dataclass(frozen=True, slots=True)
class Constant:
    rate_per_s: float

    def rate(self, t: float) -> float:
        return self.rate_per_s


@dataclass(frozen=True, slots=True)
class Step:
    before: float
    after: float
    at: float

    def rate(self, t: float) -> float:
        return self.after if t >= self.at else self.before


@dataclass(frozen=True, slots=True)
class Ramp:
    start_rate: float
    end_rate: float
    start: float
    duration: float

    def rate(self, t: float) -> float:
        if t <= self.start:
            return self.start_rate
        if t >= self.start + self.duration:
            return self.end_rate
        done = (t - self.start) / self.duration
        return self.start_rate + (self.end_rate - self.start_rate) * done


@dataclass(frozen=True, slots=True)
class Seasonal:
    """A daily cycle (peak at ``peak_at`` of the day, trough half a day later, the mean
    times ``1 ± daily_swing``) and a weekly one (weekend days at ``weekend_factor``)."""

    mean: float
    day_s: float
    daily_swing: float = 0.6
    peak_at: float = 0.6
    weekend_factor: float = 0.6

    def rate(self, t: float) -> float:
        day, into = divmod(t, self.day_s)
        daily = 1.0 + self.daily_swing * math.cos(2 * math.pi * (into / self.day_s - self.peak_at))
        weekly = self.weekend_factor if int(day) % 7 in WEEKEND else 1.0
        return self.mean * daily * weekly


@dataclass(frozen=True, slots=True)
class Burst:
    """A fleet reconnecting: the rate times ``factor`` for ``duration`` seconds."""

    start: float
    duration: float
    factor: float


@dataclass(frozen=True, slots=True)
class WithBursts:
    base: LoadShape
    bursts: tuple[Burst, ...]
    _starts: tuple[float, ...] = field(init=False)
    _longest: float = field(init=False)

    def __post_init__(self) -> None:
        bursts = tuple(sorted(self.bursts, key=lambda b: b.start))
        object.__setattr__(self, "bursts", bursts)
        object.__setattr__(self, "_starts", tuple(b.start for b in bursts))
        object.__setattr__(self, "_longest", max((b.duration for b in bursts), default=0.0))

    def rate(self, t: float) -> float:
        factor = 1.0
        i = bisect.bisect_right(self._starts, t) - 1
        while i >= 0 and self._starts[i] >= t - self._longest:
            burst = self.bursts[i]
            if t < burst.start + burst.duration:
                factor = max(factor, burst.factor)
            i -= 1
        return self.base.rate(t) * factor


@dataclass(frozen=True, slots=True)
class Sum:
    parts: tuple[LoadShape, ...]

    def rate(self, t: float) -> float:
        return sum(part.rate(t) for part in self.parts)


# --------------------------------------------------------------------------- scenario


@dataclass(frozen=True, slots=True)
class SimTier:
    name: str
    share: float
    """Of the offered load."""
    max_latency_s: float


DEFAULT_TIERS = (SimTier("critical", 0.05, 0.1), SimTier("premium", 0.15, 0.5),
                 SimTier("standard", 0.5, 2.0), SimTier("bulk", 0.3, 60.0))
"""The tiers and bounds of ``config/gateway.toml``, with a plausible share of the load each."""


@dataclass(frozen=True, slots=True)
class Scenario:
    load: LoadShape
    duration_s: float
    slot_rate: float
    """Messages/s one slot processes."""
    tiers: tuple[SimTier, ...] = DEFAULT_TIERS
    noise: float = 0.0
    """Relative standard deviation of the offered rate, per step."""
    seed: int = 0
    provision_delay_s: float = 0.5
    """From a decision to its capacity in effect (in-node slots: about half a second)."""
    step_s: float = 0.1
    initial_slots: int | None = None
    """Slots at the start; None: the policy's ``min_slots``."""
    flap_window_s: float = 30.0
    """A reversal sooner than this after the change before is a flap (capacity given back
    and wanted again, or the reverse, within a cool-down)."""


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    at: float
    action: str
    from_slots: int
    to_slots: int
    reason: str


@dataclass(slots=True)
class Trace:
    """One row per decision: parallel arrays, compact enough for weeks."""

    at: array[float] = field(default_factory=lambda: array("d"))
    arrivals: array[float] = field(default_factory=lambda: array("d"))
    slots_in_effect: array[float] = field(default_factory=lambda: array("d"))
    slots_asked: array[float] = field(default_factory=lambda: array("d"))
    desired_replicas: array[float] = field(default_factory=lambda: array("d"))
    forecast: array[float] = field(default_factory=lambda: array("d"))
    breach_s: array[float] = field(default_factory=lambda: array("d"))
    """Seconds of the interval ending at ``at`` in which some tier was past its bound."""


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    duration_s: float
    breach_s: float
    """Seconds in which some tier was past its latency bound."""
    tier_breach_s: dict[str, float]
    max_wait_s: dict[str, float]
    slot_seconds: float
    events: tuple[ScaleEvent, ...]
    direction_changes: int
    flaps: int
    trace: Trace
    wall_s: float

    @property
    def breach_share(self) -> float:
        return self.breach_s / self.duration_s

    @property
    def mean_slots(self) -> float:
        return self.slot_seconds / self.duration_s

    def breach_share_between(self, start: float, end: float) -> float:
        lo = bisect.bisect_right(self.trace.at, start)
        hi = bisect.bisect_right(self.trace.at, end)
        return sum(self.trace.breach_s[lo:hi]) / (end - start)


class _Cohort:
    """Messages that arrived evenly over [start, end] and still wait."""

    __slots__ = ("amount", "end", "start")

    def __init__(self, start: float, end: float, amount: float) -> None:
        self.start, self.end, self.amount = start, end, amount


def simulate(section: ScalingSection, scenario: Scenario,
             policy: ScalingPolicy | None = None) -> SimResult:
    """Run ``scenario`` against ``policy`` (default: the one ``section`` names)."""
    started = time.perf_counter()
    policy = policy if policy is not None else build_policy(section)
    dt = scenario.step_s
    steps_per_decision = max(1, round(section.interval_s / dt))
    interval = steps_per_decision * dt
    total_steps = math.ceil(scenario.duration_s / dt)
    rng = random.Random(scenario.seed)
    tiers = scenario.tiers
    shares = [t.share for t in tiers]
    bounds = [t.max_latency_s for t in tiers]
    queues: list[deque[_Cohort]] = [deque() for _ in tiers]
    backlog = [0.0] * len(tiers)
    slot_rate = scenario.slot_rate
    load = scenario.load
    noise = scenario.noise

    slots = scenario.initial_slots if scenario.initial_slots is not None else section.min_slots
    pending: deque[tuple[float, int]] = deque()  # (effective at, slots), in time order
    asked = slots

    tier_breach = [0.0] * len(tiers)
    max_wait = [0.0] * len(tiers)
    breach_s = slot_seconds = 0.0
    interval_arrivals = [0.0] * len(tiers)
    interval_served = interval_breach = 0.0
    events: list[ScaleEvent] = []
    trace = Trace()
    last_direction = 0
    last_change_at = -math.inf
    direction_changes = flaps = 0

    for step in range(1, total_steps + 1):
        now = step * dt
        begin = now - dt
        while pending and pending[0][0] <= begin + 1e-9:
            slots = pending.popleft()[1]
        rate = load.rate(begin + dt / 2)
        if noise:
            rate *= max(0.0, 1.0 + noise * rng.gauss(0.0, 1.0))
        budget = slots * slot_rate * dt
        slot_seconds += slots * dt
        served_now = 0.0
        breached = False
        for k in range(len(tiers)):
            arrived = rate * shares[k] * dt
            interval_arrivals[k] += arrived
            queue = queues[k]
            before = budget
            while queue and budget > 0:
                head = queue[0]
                if head.amount <= budget:
                    budget -= head.amount
                    queue.popleft()
                else:
                    head.start += (head.end - head.start) * budget / head.amount
                    head.amount -= budget
                    budget = 0.0
            if arrived > 0:
                if budget >= arrived:
                    budget -= arrived
                else:  # the earliest part of the step's arrivals is served, the rest waits
                    queue.append(_Cohort(begin + dt * budget / arrived, now, arrived - budget))
                    budget = 0.0
            served_now += before - budget
            backlog[k] += arrived - (before - budget)
            if not queue:
                backlog[k] = 0.0
            wait = now - queue[0].start if queue else 0.0
            if wait > max_wait[k]:
                max_wait[k] = wait
            if wait > bounds[k]:
                tier_breach[k] += dt
                breached = True
        interval_served += served_now
        if breached:
            breach_s += dt
            interval_breach += dt

        if step % steps_per_decision:
            continue
        sample = LoadSample(
            at=now,
            tiers=tuple(
                TierLoad(t.name, interval_arrivals[k] / interval, math.ceil(backlog[k] - 1e-6),
                         now - queues[k][0].start if queues[k] else 0.0, t.max_latency_s)
                for k, t in enumerate(tiers)),
            served=interval_served / interval, slots=slots, slot_rate=slot_rate)
        decision = policy.decide(sample)
        trace.at.append(now)
        trace.arrivals.append(sum(interval_arrivals) / interval)
        trace.slots_in_effect.append(slots)
        trace.slots_asked.append(decision.slots)
        trace.desired_replicas.append(decision.desired_replicas)
        trace.forecast.append(decision.forecast)
        trace.breach_s.append(interval_breach)
        interval_arrivals = [0.0] * len(tiers)
        interval_served = interval_breach = 0.0
        if decision.slots != asked:
            direction = 1 if decision.slots > asked else -1
            events.append(ScaleEvent(now, "scale-up" if direction > 0 else "scale-down", asked,
                                     decision.slots, decision.reason))
            if last_direction and direction != last_direction:
                direction_changes += 1
                if now - last_change_at < scenario.flap_window_s:
                    flaps += 1
            last_direction, last_change_at = direction, now
            asked = decision.slots
            pending.append((now + scenario.provision_delay_s, decision.slots))

    return SimResult(
        policy=policy.name, duration_s=total_steps * dt, breach_s=breach_s,
        tier_breach_s={t.name: tier_breach[k] for k, t in enumerate(tiers)},
        max_wait_s={t.name: max_wait[k] for k, t in enumerate(tiers)},
        slot_seconds=slot_seconds, events=tuple(events), direction_changes=direction_changes,
        flaps=flaps, trace=trace, wall_s=time.perf_counter() - started)


# --------------------------------------------------------------------------- the benchmark

BENCH_SLOT_RATE = 500.0
BENCH_MEAN_RATE = 3000.0
MAINTENANCE_AT = 3 / 24
"""The fleet's daily reconnect (firmware/maintenance hour): 03:00 of every day."""


def fleet_week(days: int, seed: int, day_s: float, mean_rate: float = BENCH_MEAN_RATE,
               random_bursts_per_day: float = 2.0) -> WithBursts:
    """Daily and weekly cycles, the daily reconnect at the maintenance hour (a few seconds
    of jitter, 3-5 × for one to two minutes) and bursts at random times (3-5 ×, 20 s to
    3 minutes: a region's network coming back, a broker fail-over)."""
    rng = random.Random(seed)
    bursts: list[Burst] = []
    for day in range(days):
        start = (day + MAINTENANCE_AT) * day_s + rng.uniform(-5.0, 5.0)
        bursts.append(Burst(start, rng.uniform(60.0, 120.0), rng.uniform(3.0, 5.0)))
    for _ in range(round(random_bursts_per_day * days)):
        bursts.append(Burst(rng.uniform(0.0, days * day_s), rng.uniform(20.0, 180.0),
                            rng.uniform(3.0, 5.0)))
    return WithBursts(Seasonal(mean_rate, day_s), tuple(bursts))


@dataclass(frozen=True, slots=True)
class BenchArgs:
    days: int = 7
    seed: int = 1
    day_s: float = 3600.0
    noise: float = 0.05
    in_node_delay_s: float = 0.5
    """New slots take effect this long after the decision."""
    slow_delay_s: float = 30.0
    """New processes or replicas take effect this long after the decision."""
    step_s: float = 0.25


def _peak(load: LoadShape, duration_s: float, step_s: float) -> float:
    return max(load.rate((i + 0.5) * step_s) for i in range(math.ceil(duration_s / step_s)))


def _figures(run: SimResult, static: SimResult, reactive: SimResult) -> dict[str, Any]:
    return {
        "breach_share": run.breach_share,
        "breach_s": run.breach_s,
        "tier_breach_s": run.tier_breach_s,
        "max_wait_s": run.max_wait_s,
        "capacity_slot_s": run.slot_seconds,
        "mean_slots": run.mean_slots,
        "capacity_vs_static": run.slot_seconds / static.slot_seconds,
        "breaches_vs_reactive": run.breach_s / reactive.breach_s if reactive.breach_s else None,
        "scale_events": len(run.events),
        "direction_changes": run.direction_changes,
        "flaps": run.flaps,
        "wall_s": run.wall_s,
    }


def run_bench(args: BenchArgs) -> dict[str, Any]:
    """The same compressed week against static (at peak), reactive and predictive, once
    with capacity that comes in half a second (slots) and once with capacity that takes
    tens of seconds (new processes, replicas)."""
    load = fleet_week(args.days, args.seed, args.day_s)
    duration = args.days * args.day_s
    base = ScalingSection(day_s=args.day_s)
    # Static provisioning for the peak of the (noise-free) load at the same target
    # utilisation the others size for; the same bounds for all three, all start there.
    max_slots = math.ceil(_peak(load, duration, args.step_s)
                          / (BENCH_SLOT_RATE * base.target_utilisation))
    scenario = Scenario(load=load, duration_s=duration, slot_rate=BENCH_SLOT_RATE,
                        noise=args.noise, seed=args.seed, step_s=args.step_s,
                        initial_slots=max_slots)

    def run(policy: str, delay_s: float) -> SimResult:
        section = msgspec.structs.replace(base, policy=policy, max_slots=max_slots)
        return simulate(section, replace(scenario, provision_delay_s=delay_s))

    static = run("static", args.in_node_delay_s)  # never changes: the delay is moot
    models = []
    for label, delay_s in (("in-node slots", args.in_node_delay_s),
                           ("new processes or replicas", args.slow_delay_s)):
        reactive, predictive = run("reactive", delay_s), run("predictive", delay_s)
        less = (None if reactive.breach_s == predictive.breach_s == 0
                else predictive.breach_s < reactive.breach_s)
        models.append({
            "capacity": label, "provision_delay_s": delay_s,
            "policies": {name: _figures(result, static, reactive) for name, result in
                         (("static", static), ("reactive", reactive),
                          ("predictive", predictive))},
            "targets": {
                "predictive_breaks_less_than_reactive": less,
                "predictive_capacity_at_most_70pct_of_static":
                    predictive.slot_seconds <= 0.7 * static.slot_seconds,
            },
        })
    recurring = sum(1 for b in load.bursts
                    if abs((b.start / args.day_s) % 1 - MAINTENANCE_AT) * args.day_s < 10)
    return {
        "days": args.days, "day_s": args.day_s, "seed": args.seed, "noise": args.noise,
        "step_s": args.step_s, "slot_rate": BENCH_SLOT_RATE, "max_slots": max_slots,
        "recurring_bursts": recurring, "random_bursts": len(load.bursts) - recurring,
        "tiers": [{"name": t.name, "share": t.share, "max_latency_s": t.max_latency_s}
                  for t in scenario.tiers],
        "models": models,
    }


def _verdict(value: bool | None) -> str:
    return "n/a (neither broke a bound)" if value is None else "met" if value else "NOT met"


def print_bench(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    tiers = ", ".join(f"{t['name']} {t['share']:.0%} ≤ {t['max_latency_s']:g} s"
                      for t in report["tiers"])
    print(f"scaling benchmark: {report['days']} days of {report['day_s']:g} s (only the"
          f" seasons are compressed: bursts, bounds and delays are real seconds), seed"
          f" {report['seed']}")
    print(f"load: mean {BENCH_MEAN_RATE:g} msg/s, daily ±60%, weekend 60%, noise"
          f" {report['noise']:.0%}; {report['recurring_bursts']} daily reconnects at 03:00 and"
          f" {report['random_bursts']} random bursts, 3-5 ×, 20 s-3 min")
    print(f"tiers: {tiers}; a slot = {report['slot_rate']:g} msg/s; static = peak ="
          f" {report['max_slots']} slots")
    for model in report["models"]:
        print()
        print(f"{model['capacity']}: new capacity in effect {model['provision_delay_s']:g} s"
              " after the decision")
        print(f"  {'policy':<11} {'bound broken':>12} {'breach s':>9} {'slot-seconds':>13}"
              f" {'mean slots':>10} {'vs static':>9} {'breaches vs reactive':>20}"
              f" {'events':>7} {'flaps':>5}")
        for name, row in model["policies"].items():
            vs_reactive = row["breaches_vs_reactive"]
            print(f"  {name:<11} {row['breach_share']:>12.4%} {row['breach_s']:>9.1f}"
                  f" {row['capacity_slot_s']:>13.0f} {row['mean_slots']:>10.2f}"
                  f" {row['capacity_vs_static']:>9.2f}"
                  f" {'-' if vs_reactive is None else f'{vs_reactive:.2f}':>20}"
                  f" {row['scale_events']:>7} {row['flaps']:>5}")
        targets = model["targets"]
        print("  target: predictive breaks bounds less than reactive:"
              f" {_verdict(targets['predictive_breaks_less_than_reactive'])};"
              " >= 30% less capacity than static:"
              f" {_verdict(targets['predictive_capacity_at_most_70pct_of_static'])}")
