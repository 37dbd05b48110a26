"""Elastic scaling: pure policies that turn load samples into capacity decisions.

Theory of operation
-------------------
Every ``interval_s`` the gateway measures a :class:`LoadSample` (per tier, most urgent
first: arrivals, backlog, how long the oldest message has waited against the tier's bound;
plus the slots in effect and what one slot processes) and asks a :class:`ScalingPolicy`
for a :class:`Decision`: the slots to run with, the replicas the fleet should have, and
why. Nothing here reads a clock or does I/O: time is ``sample.at``, so a simulation can run
a week of samples in seconds (``gateway/scaling_sim.py``).

*Demand.* Capacity (messages/s) is sized so that arrivals use ``target_utilisation`` of it,
plus what drains each tier's backlog within what is left of its latency bound. Service is
by priority, so tier *k* waits for every tier ahead of it: for each *k*, with the
arrivals ``A`` and backlog ``B`` of tiers ``0..k``::

    need_k = A / target_utilisation + B / max(bound_k - oldest_wait_k, bound_k / 4)

and the demand is the largest ``need_k``; in slots, ``ceil(need / slot_rate)`` within
``[min_slots, max_slots]``.

*Reactive* (hysteresis with two thresholds, and a cool-down):

* up: the demand has been above the capacity (utilisation above target) for
  ``scale_up_after_s``, or at once when a tier has burned ``burn_scale_up`` of its latency
  budget. The step goes straight to the largest demand seen while it was above, not +1;
* down: utilisation below ``scale_down_utilisation`` for ``cool_down_s``, and no change for
  ``cool_down_s``; then to the largest demand of that low period plus a tenth. Between the
  two thresholds nothing moves, which is what keeps noise from flapping the capacity.

*Predictive* is reactive plus the :class:`Forecaster`: it also provisions, at once, for the
largest rate the learned seasonal profile expects within ``forecast_horizon_s``, gives
nothing back that the profile expects within the horizon plus a cool-down, and never
scales down while a burst is detected. *Static* always asks ``max_slots``.

*Forecaster.* A long EWMA (``ewma_s``) of the arrival rate is the level; a short one
(``burst_window_s``) the rate now; a burst is the rate now above ``burst_factor`` × the level
(burst samples are clipped to that before they enter the level, so a burst does not
become the baseline). The profile is multiplicative: per bin of ``day_s / profile_bins``
seconds it learns the bin's mean rate over its mean level, per bin of the day and per bin
of the week, and expects ``level now × factor``: a weekend at 60 % of the weekday scales
the weekday's shape, recurring bursts (the daily reconnect at a maintenance hour) are
factors of 3-5 in their bins. A factor is the smaller of the last two periods, so a burst
is expected again only once it has recurred (after one period, that period's figure is
used); the week's factor wins once two weeks agree on it. Bins are taken from ``at``
modulo the period: any steady clock works, the profile's phase is learned, not assumed;
it lives in memory and is learned afresh after a restart.

``forecast`` is the rate now, or (predictive) the largest the profile expects over the
horizon if more; ``desired_replicas = ceil(forecast / (replica_capacity ×
target_utilisation))`` within the bounds, raised at once, lowered only after it has wanted
less for ``cool_down_s`` (to the most it wanted meanwhile).

Policies are plugins (:class:`ScalingPolicy`), registered by name in :data:`POLICIES` or
through the ``iot_gateway.scaling_policies`` entry-point group; :func:`build_policy` makes
one from the section.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Annotated, Protocol, runtime_checkable

from msgspec import Meta, Struct

from policies.plugins import build_named

__all__ = [
    "ENTRY_POINT_GROUP",
    "POLICIES",
    "Decision",
    "Forecaster",
    "LoadSample",
    "PredictivePolicy",
    "ReactivePolicy",
    "ScalingHook",
    "ScalingPolicy",
    "ScalingSection",
    "StaticPolicy",
    "TierLoad",
    "build_policy",
    "register_policy",
]

ENTRY_POINT_GROUP = "iot_gateway.scaling_policies"

DOWN_HEADROOM = 1.1
"""A scale-down sizes for a tenth above the low period's peak: noise it did not show
should not bring the capacity straight back."""
MIN_BUDGET_FRACTION = 0.25
"""A tier past its bound still gets a quarter of it to drain in, not zero (no infinite ask)."""
DAYS_PER_WEEK = 7

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
SlotCount = Annotated[int, Meta(ge=1, le=4096)]
PolicyName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]


# --------------------------------------------------------------------------- config


class ScalingHook(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[scaling.hook]``: a command run when the desired replica count changes."""

    command: list[str] = []
    """Argv template, e.g. ``["aws", "autoscaling", "set-desired-capacity", ...,
    "--desired-capacity", "{desired_replicas}"]``; empty: no hook."""
    min_interval_s: NonNegFloat = 60.0
    """At most one run per this many seconds (a change meanwhile runs when it may)."""
    timeout_s: PositiveFloat = 30.0
    """A run still going after this long is killed."""
    on_change_only: bool = True
    """Run only when the desired replica count differs from the last run's."""


class ScalingSection(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[scaling]``: in-node capacity (slots) and the fleet's desired replicas."""

    enabled: bool = True
    """Sample the load and act on the decisions; off: capacity stays as configured."""
    policy: PolicyName = "predictive"
    """``predictive``, ``reactive``, ``static`` or the name of a plugin policy."""
    interval_s: Annotated[float, Meta(gt=0, le=60)] = 0.5
    """How often the load is sampled and a decision made."""
    min_slots: SlotCount = 1
    max_slots: SlotCount = 32
    target_utilisation: Annotated[float, Meta(gt=0, le=1)] = 0.7
    """Capacity is sized so that arrivals / capacity ≈ this (the rest is headroom)."""
    scale_down_utilisation: Annotated[float, Meta(ge=0, lt=1)] = 0.4
    """Below this utilisation, sustained for ``cool_down_s``, capacity shrinks."""
    scale_up_after_s: Annotated[float, Meta(ge=0, le=60)] = 1.0
    """Utilisation above target this long → scale up (to what the load needs, at once)."""
    cool_down_s: NonNegFloat = 30.0
    """No scale-down sooner than this after any change, nor before this long of low load."""
    burn_scale_up: PositiveFloat = 0.5
    """A tier whose oldest message has waited this fraction of its bound: scale up now."""
    replica_capacity_per_s: NonNegFloat = 0.0
    """Messages/s one replica sustains at target; 0: ``max_slots`` × the measured slot rate."""
    min_replicas: Annotated[int, Meta(ge=0)] = 1
    max_replicas: Annotated[int, Meta(ge=1)] = 100
    day_s: PositiveFloat = 86400.0
    """Length of a "day" of the seasonal profile (shorter in time-compressed simulations)."""
    profile_bins: Annotated[int, Meta(ge=1, le=100_000)] = 96
    """Bins per day of the learned profile (the weekly profile has 7 × as many)."""
    forecast_horizon_s: NonNegFloat = 60.0
    """How far ahead the predictive policy provisions (≥ the time new capacity takes)."""
    ewma_s: PositiveFloat = 300.0
    """Time constant of the arrival-rate level (EWMA) that bursts are judged against."""
    burst_window_s: PositiveFloat = 5.0
    """Time constant of the short-term arrival rate."""
    burst_factor: Annotated[float, Meta(gt=1)] = 2.0
    """Short-term rate above this × the level: a burst (capacity is held through it)."""
    hook: ScalingHook = ScalingHook()

    def __post_init__(self) -> None:
        if self.min_slots > self.max_slots:
            raise ValueError(
                f"`min_slots` ({self.min_slots}) must not exceed `max_slots` ({self.max_slots})")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"`min_replicas` ({self.min_replicas}) must not exceed"
                             f" `max_replicas` ({self.max_replicas})")
        if self.scale_down_utilisation >= self.target_utilisation:
            raise ValueError(
                f"`scale_down_utilisation` ({self.scale_down_utilisation}) must be below"
                f" `target_utilisation` ({self.target_utilisation})")
        if self.burst_window_s >= self.ewma_s:
            raise ValueError(f"`burst_window_s` ({self.burst_window_s}) must be shorter than"
                             f" `ewma_s` ({self.ewma_s})")
        bin_s = self.day_s / self.profile_bins
        if bin_s < self.interval_s:
            raise ValueError(f"a profile bin (`day_s` / `profile_bins` = {bin_s:g} s) must be at"
                             f" least `interval_s` ({self.interval_s:g} s)")


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True, slots=True)
class TierLoad:
    name: str
    arrivals: float
    """Messages/s that arrived over the last interval."""
    backlog: int
    oldest_wait_s: float
    max_latency_s: float


@dataclass(frozen=True, slots=True)
class LoadSample:
    at: float
    """Seconds: monotonic in the gateway, simulated in the simulation."""
    tiers: tuple[TierLoad, ...]
    """Most urgent first."""
    served: float
    """Messages/s processed over the last interval."""
    slots: int
    """Capacity in effect now."""
    slot_rate: float
    """Messages/s one slot processes (measured; 0 = not known yet)."""


@dataclass(frozen=True, slots=True)
class Decision:
    at: float
    slots: int
    desired_replicas: int
    forecast: float
    """Messages/s expected over the policy's horizon."""
    action: str
    """``hold``, ``scale-up`` or ``scale-down`` (of ``slots``)."""
    reason: str
    inputs: dict[str, float]
    """The figures that produced it (audited verbatim; always finite)."""


@runtime_checkable
class ScalingPolicy(Protocol):
    name: str

    def decide(self, sample: LoadSample) -> Decision: ...


# --------------------------------------------------------------------------- forecaster


def _smoothing(dt: float, tau: float) -> float:
    return 1.0 - math.exp(-dt / tau)


class _Profile:
    """Seasonal factors (rate / level) per bin of a period, from the last two periods."""

    def __init__(self, bins: int) -> None:
        self.last: list[float | None] = [None] * bins
        self.previous: list[float | None] = [None] * bins

    def learn(self, index: int, factor: float) -> None:
        slot = index % len(self.last)
        self.previous[slot], self.last[slot] = self.last[slot], factor

    def factor(self, index: int) -> float | None:
        """What the bin did the last two periods: the smaller, so that a one-off burst is
        not expected again; after one period, what it did then."""
        slot = index % len(self.last)
        last, previous = self.last[slot], self.previous[slot]
        if last is None or previous is None:
            return last
        return min(last, previous)

    def confirmed(self, index: int) -> bool:
        return self.previous[index % len(self.previous)] is not None


class Forecaster:
    """EWMA level + short-term rate + learned daily/weekly profile of the arrival rate."""

    def __init__(self, section: ScalingSection) -> None:
        self.section = section
        self.bin_s = section.day_s / section.profile_bins
        self.daily = _Profile(section.profile_bins)
        self.weekly = _Profile(section.profile_bins * DAYS_PER_WEEK)
        self.level = 0.0
        """Long EWMA of the arrival rate, bursts clipped."""
        self.rate_now = 0.0
        """Short EWMA of the arrival rate."""
        self.burst = False
        self._started = False
        self._bin = -1  # absolute bin index being accumulated
        self._rate_sum = self._level_sum = self._covered = 0.0

    def observe(self, at: float, rate: float, dt: float) -> None:
        """Fold in ``rate`` (messages/s) measured over the ``dt`` seconds ending at ``at``."""
        section = self.section
        if not self._started:
            self.level = self.rate_now = rate
            self._started = True
        else:
            self.rate_now += _smoothing(dt, section.burst_window_s) * (rate - self.rate_now)
            clipped = min(rate, section.burst_factor * self.level) if self.level > 0 else rate
            self.level += _smoothing(dt, section.ewma_s) * (clipped - self.level)
        self.burst = self.level > 0 and self.rate_now > section.burst_factor * self.level
        self._accumulate(at - dt / 2, rate, dt)

    def _accumulate(self, mid: float, rate: float, dt: float) -> None:
        index = math.floor(mid / self.bin_s)
        if index != self._bin:
            # A bin is learned only when it was mostly observed (not across a gap), and
            # relative to the level, so that a quiet weekend scales the weekday's shape.
            if self._bin >= 0 and self._covered >= self.bin_s / 2 and self._level_sum > 0:
                factor = self._rate_sum / self._level_sum
                self.daily.learn(self._bin, factor)
                self.weekly.learn(self._bin, factor)
            self._bin = index
            self._rate_sum = self._level_sum = self._covered = 0.0
        self._rate_sum += rate * dt
        self._level_sum += self.level * dt
        self._covered += dt

    def factor(self, index: int) -> float | None:
        """The seasonal factor of absolute bin ``index``: the week's once two weeks agree
        on it, else the day's; None until that time of day has been seen."""
        if self.weekly.confirmed(index):
            return self.weekly.factor(index)
        return self.daily.factor(index)

    def seasonal(self, at: float, horizon_s: float) -> float | None:
        """The largest rate the profile expects in ``[at, at + horizon_s]`` at today's level;
        None until a bin of that span has been seen a period before."""
        first = math.floor(at / self.bin_s)
        last = min(math.floor((at + horizon_s) / self.bin_s), first + self.section.profile_bins)
        best: float | None = None
        for index in range(first, last + 1):
            factor = self.factor(index)
            if factor is not None and (best is None or factor > best):
                best = factor
        return None if best is None else best * self.level

    def forecast(self, at: float) -> float:
        """Messages/s expected over the horizon: the rate now, or more if the profile says."""
        seasonal = self.seasonal(at, self.section.forecast_horizon_s)
        return self.rate_now if seasonal is None else max(self.rate_now, seasonal)


class _Replicas:
    """Desired replicas from the forecast: up at once, down only after wanting less for
    ``cool_down_s`` (so a dip does not give a replica back that the next minute needs)."""

    def __init__(self, section: ScalingSection) -> None:
        self.section = section
        self.current = section.min_replicas
        self._lower_since: float | None = None
        self._lower_peak = 0

    def raw(self, forecast: float, slot_rate: float) -> int | None:
        section = self.section
        capacity = section.replica_capacity_per_s or section.max_slots * slot_rate
        if capacity <= 0:
            return None
        wanted = math.ceil(forecast / (capacity * section.target_utilisation) - 1e-9)
        return max(section.min_replicas, min(section.max_replicas, wanted))

    def update(self, at: float, wanted: int | None) -> int:
        if wanted is None:
            return self.current
        if wanted > self.current:
            self.current, self._lower_since = wanted, None
        elif wanted < self.current:
            if self._lower_since is None:
                self._lower_since, self._lower_peak = at, wanted
            self._lower_peak = max(self._lower_peak, wanted)
            if at - self._lower_since >= self.section.cool_down_s:
                self.current, self._lower_since = self._lower_peak, None
        else:
            self._lower_since = None
        return self.current


# --------------------------------------------------------------------------- policies


@dataclass(slots=True)
class _Demand:
    arrivals: float
    backlog: int
    need: float
    """Messages/s of capacity the load needs now (arrivals at target + backlog drain)."""
    max_burn: float
    burn_tier: str


def _measure_demand(sample: LoadSample, target_utilisation: float) -> _Demand:
    arrivals = 0.0
    backlog = 0
    need = 0.0
    max_burn = 0.0
    burn_tier = ""
    for tier in sample.tiers:
        arrivals += tier.arrivals
        backlog += tier.backlog
        bound = tier.max_latency_s
        if not bound > 0 or math.isinf(bound):  # no bound: only its arrivals count
            need = max(need, arrivals / target_utilisation)
            continue
        burn = tier.oldest_wait_s / bound
        if burn > max_burn:
            max_burn, burn_tier = burn, tier.name
        budget = max(bound - tier.oldest_wait_s, bound * MIN_BUDGET_FRACTION)
        need = max(need, arrivals / target_utilisation + backlog / budget)
    return _Demand(arrivals, backlog, need, max_burn, burn_tier)


class _Base:
    """What every built-in policy shares: the forecaster, the replicas, the slots asked."""

    name = "base"
    uses_profile = False
    """Whether the forecast (and so the desired replicas) includes the seasonal profile."""

    def __init__(self, section: ScalingSection) -> None:
        self.section = section
        self.forecaster = Forecaster(section)
        self.replicas = _Replicas(section)
        self.slots: int | None = None  # what this policy last asked (None: not yet)
        self.last_change = -math.inf
        self._last_at: float | None = None

    def _clamp(self, slots: int) -> int:
        return max(self.section.min_slots, min(self.section.max_slots, slots))

    def _slots_for(self, rate: float, slot_rate: float) -> int:
        return self._clamp(math.ceil(rate / slot_rate - 1e-9))

    def decide(self, sample: LoadSample) -> Decision:
        section = self.section
        dt = section.interval_s if self._last_at is None else max(sample.at - self._last_at, 1e-6)
        self._last_at = sample.at
        current = self._clamp(sample.slots) if self.slots is None else self.slots
        demand = _measure_demand(sample, section.target_utilisation)
        self.forecaster.observe(sample.at, demand.arrivals, dt)
        slot_rate = sample.slot_rate
        if slot_rate <= 0 and sample.served > 0 and demand.backlog > 0 and sample.slots > 0:
            slot_rate = sample.served / sample.slots  # saturated: what a slot did is its rate
        forecast = (self.forecaster.forecast(sample.at) if self.uses_profile
                    else self.forecaster.rate_now)

        inputs = {
            "arrivals": demand.arrivals, "served": sample.served, "backlog": float(demand.backlog),
            "slots_in_effect": float(sample.slots), "slots_asked": float(current),
            "slot_rate": slot_rate, "need": demand.need, "max_burn": demand.max_burn,
            "level": self.forecaster.level, "rate_now": self.forecaster.rate_now,
            "burst": float(self.forecaster.burst), "forecast": forecast,
        }
        capacity = current * slot_rate
        if capacity > 0:
            inputs["utilisation"] = demand.arrivals / capacity
        target, reason = self._target(sample.at, current, demand, slot_rate, inputs)

        wanted_replicas = self.replicas.raw(forecast, slot_rate)
        if wanted_replicas is not None:
            inputs["replicas_wanted"] = float(wanted_replicas)
        desired_replicas = self.replicas.update(sample.at, wanted_replicas)

        action = "hold"
        if target != current:
            action = "scale-up" if target > current else "scale-down"
            self.last_change = sample.at
        self.slots = target
        return Decision(at=sample.at, slots=target, desired_replicas=desired_replicas,
                        forecast=forecast, action=action, reason=reason, inputs=inputs)

    def _target(self, at: float, current: int, demand: _Demand, slot_rate: float,
                inputs: dict[str, float]) -> tuple[int, str]:
        raise NotImplementedError


class StaticPolicy(_Base):
    """Always ``max_slots``: the peak-provisioning baseline."""

    name = "static"

    def _target(self, at: float, current: int, demand: _Demand, slot_rate: float,
                inputs: dict[str, float]) -> tuple[int, str]:
        return self.section.max_slots, f"static: always max_slots ({self.section.max_slots})"


class ReactivePolicy(_Base):
    """From observed arrivals, backlog and latency-budget burn, with hysteresis."""

    name = "reactive"

    def __init__(self, section: ScalingSection) -> None:
        super().__init__(section)
        self._above_since: float | None = None
        self._above_peak = 0  # largest slot demand while above
        self._low_since: float | None = None
        self._low_peak = 0.0  # largest demand (messages/s) while low

    def _target(self, at: float, current: int, demand: _Demand, slot_rate: float,
                inputs: dict[str, float]) -> tuple[int, str]:
        section = self.section
        urgent = demand.max_burn >= section.burn_scale_up and demand.backlog > 0
        if slot_rate <= 0:  # nothing measured yet: only a burning budget says "more"
            self._above_since = self._low_since = None
            if urgent:
                return (self._clamp(current * 2),
                        f"{demand.burn_tier} burned {demand.max_burn:.0%} of its latency bound"
                        f" (slot rate unknown): doubling")
            return current, "hold: slot rate not measured yet"
        needed = self._slots_for(demand.need, slot_rate)
        inputs["needed_slots"] = float(needed)

        if needed > current:
            self._low_since = None
            if self._above_since is None:
                # The arrivals were measured over the interval that ended now.
                self._above_since, self._above_peak = at - section.interval_s, needed
            self._above_peak = max(self._above_peak, needed)
            waited = at - self._above_since
            if urgent or waited >= section.scale_up_after_s:
                target = self._above_peak
                self._above_since = None
                why = (f"{demand.burn_tier} burned {demand.max_burn:.0%} of its latency bound"
                       if urgent else f"demand above capacity for {waited:.1f} s")
                return target, (f"{why}: {demand.need:.0f} msg/s needs {target} slots at"
                                f" {section.target_utilisation:.0%} (was {current})")
            return current, f"hold: demand above capacity for {waited:.1f} s"
        self._above_since = None

        low = (demand.arrivals < section.scale_down_utilisation * current * slot_rate
               and demand.max_burn < section.burn_scale_up / 2)
        if not low:
            self._low_since = None
            return current, "hold: utilisation within the band"
        if self._low_since is None:
            self._low_since, self._low_peak = at, demand.need
        self._low_peak = max(self._low_peak, demand.need)
        low_for = at - self._low_since
        if low_for < section.cool_down_s or at - self.last_change < section.cool_down_s:
            return current, f"hold: utilisation low for {low_for:.0f} s (cool-down)"
        target = max(self._slots_for(self._low_peak * DOWN_HEADROOM, slot_rate),
                     self._floor(at, current, slot_rate))
        if target >= current:
            # The low period's peak is that of the last cool-down: a new window starts, or
            # one busy moment at its start would hold capacity for as long as load stays low.
            self._low_since, self._low_peak = at, demand.need
            return current, f"hold: low for {low_for:.0f} s, but {self._why_not}"
        self._low_since = None
        return target, (f"utilisation below {section.scale_down_utilisation:.0%} for"
                        f" {low_for:.0f} s: {target} slots (was {current})")

    _why_not = "the load's peak still needs them"

    def _floor(self, at: float, current: int, slot_rate: float) -> int:
        """The fewest slots a scale-down may leave (the predictive policy's forecast)."""
        return self.section.min_slots


class PredictivePolicy(ReactivePolicy):
    """Reactive, plus the learned seasonal profile ahead, plus capacity held in bursts."""

    name = "predictive"
    uses_profile = True
    _why_not = "a burst is under way or the profile expects the load back"

    def _target(self, at: float, current: int, demand: _Demand, slot_rate: float,
                inputs: dict[str, float]) -> tuple[int, str]:
        target, reason = super()._target(at, current, demand, slot_rate, inputs)
        if slot_rate <= 0:
            return target, reason
        horizon = self.section.forecast_horizon_s
        seasonal = self.forecaster.seasonal(at, horizon)
        if seasonal is None:
            return target, reason
        inputs["seasonal"] = seasonal
        ahead = self._slots_for(seasonal / self.section.target_utilisation, slot_rate)
        inputs["seasonal_slots"] = float(ahead)
        if ahead > max(target, current):
            return ahead, (f"profile expects {seasonal:.0f} msg/s within {horizon:g} s:"
                           f" {ahead} slots (was {current})")
        return target, reason

    def _floor(self, at: float, current: int, slot_rate: float) -> int:
        if self.forecaster.burst:  # hold through it: its dips are not the end of it
            return current
        # What the profile expects before a scale-down could be made again: giving it back
        # now would only bring it back within the cool-down.
        seasonal = self.forecaster.seasonal(
            at, self.section.forecast_horizon_s + self.section.cool_down_s)
        if seasonal is None:
            return self.section.min_slots
        return self._slots_for(seasonal * DOWN_HEADROOM / self.section.target_utilisation,
                               slot_rate)


# --------------------------------------------------------------------------- registry

PolicyFactory = Callable[[ScalingSection], ScalingPolicy]

POLICIES: dict[str, PolicyFactory] = {
    "static": StaticPolicy,
    "reactive": ReactivePolicy,
    "predictive": PredictivePolicy,
}
"""Policy factories by name: the built-ins, in-process registrations, loaded entry points."""


def register_policy(name: str, factory: PolicyFactory) -> None:
    POLICIES[name] = factory


def build_policy(section: ScalingSection) -> ScalingPolicy:
    """The policy ``section.policy`` names, made from the section; ValueError if unknown."""
    return build_named("scaling.policy", section.policy, section, POLICIES, ENTRY_POINT_GROUP,
                       ScalingPolicy, "`name` and `decide(sample)`", entry_points)


HOOK_FIELDS = ("desired_replicas", "capacity_slots", "forecast", "arrivals", "node_id",
               "region", "policy")
"""Fields a hook's argv template may use, e.g. ``"{desired_replicas}"``."""


def check_scaling(section: ScalingSection) -> None:
    """What decoding cannot check: the policy exists, the hook's template fields are known.
    ValueError names the place."""
    build_policy(section)
    values = dict.fromkeys(HOOK_FIELDS, "x")
    for arg in section.hook.command:
        try:
            arg.format(**values)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"scaling.hook.command: {arg!r} has an unknown or bad field "
                             f"{err} (known: {', '.join(HOOK_FIELDS)})") from None
