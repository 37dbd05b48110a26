"""Elasticity at run time: the scaling policy's decisions applied to this node and exported.

Theory of operation
-------------------
Every ``scaling.interval_s`` the gateway measures its load from the dispatcher and asks the
policy (``policies.scaling``: static, reactive, predictive or a plugin) what it needs:

* per tier (most urgent first; the anomaly lanes count with the most urgent tier, whose
  pipeline they run): arrivals over the interval (served + growth of the backlog), the
  backlog, and how long its oldest message has waited against the tier's bound;
* the messages processed, and the *slot rate*: messages one slot processes per second of
  processing (the dispatcher's busy time: a drain runs its batches one after another),
  smoothed. A slot is one batch per dispatcher drain, the unit of ``dispatch.slots``: more
  slots give processing a larger share of each loop turn, and the isolated stages' process
  pool (CPU-heavy stages, ``isolate = true``) is sized from them up to the CPU count. Past
  what one process can do, the answer is more processes (``serve --workers``) and more
  replicas: that is what ``desired_replicas`` asks the fleet's autoscaler for.

The decision's ``slots`` become the dispatcher's slots (and the pool's size) at once; its
``desired_replicas`` and ``forecast`` are for the fleet: Prometheus gauges
(``iotgw_scaling_*``), ``GET /v1/scaling`` (the JSON KEDA's metrics-api scaler reads) and the
optional command hook (``[scaling.hook]``: an argv template run at most once per
``min_interval_s``, killed after ``timeout_s``, never two at once; a change that arrives
while the hook may not run yet is run when it may, with the latest figures).

A decision that changes something (capacity or desired replicas) is counted and audited with
the inputs that produced it; holding steady is not (it would be two records a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from gateway.dispatch import Dispatcher
from gateway.metrics import Metrics
from gateway.workers import Workers
from policies.scaling import (
    Decision,
    LoadSample,
    ScalingPolicy,
    ScalingSection,
    TierLoad,
    build_policy,
)

log = logging.getLogger("iotgw.scaling")

__all__ = ["Elasticity"]

SLOT_RATE_ALPHA = 0.3
"""Smoothing of the measured slot rate per interval: a few intervals of memory."""
MIN_BUSY_S = 0.005
"""Less processing than this in an interval says nothing about the slot rate."""
HOOK_OUTPUT_LIMIT = 2000
"""Characters of a failing hook's output kept for the log and the audit."""


class Elasticity:
    def __init__(self, section: ScalingSection, dispatcher: Dispatcher, workers: Workers,
                 metrics: Metrics, *, audit: Callable[..., None], node_id: str, region: str,
                 tier_bounds: dict[str, float], clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.dispatcher = dispatcher
        self.workers = workers
        self.metrics = metrics
        self._audit = audit
        self.node_id = node_id
        self.region = region
        self._clock = clock
        self.section = section
        self.policy: ScalingPolicy = build_policy(section)
        self.tier_bounds = tier_bounds
        self.decision: Decision | None = None
        self.sample: LoadSample | None = None
        self.slot_rate = 0.0
        self._last_at = clock()
        self._served = list(dispatcher.served)
        self._backlog = [len(lane) for lane in dispatcher.lanes]
        self._busy_ns = dispatcher.busy_ns
        self._hook_task: asyncio.Task[None] | None = None
        self._hook_last = -math.inf  # when the hook last started
        self._hook_ran_for: int | None = None  # desired replicas it was last run with
        self._hook_timer: asyncio.TimerHandle | None = None
        self.slots = self._bounded(dispatcher.slots)
        self._apply(self.slots)

    def _bounded(self, slots: int) -> int:
        return max(self.section.min_slots, min(self.section.max_slots, slots))

    def reconfigure(self, section: ScalingSection, tier_bounds: dict[str, float]) -> None:
        """A reloaded config: a new policy (it learns afresh if it changed) and bounds; the
        capacity in effect is kept within them (the dispatcher's reload reset it)."""
        if section != self.section:
            self.section = section
            self.policy = build_policy(section)
        self.tier_bounds = tier_bounds
        self._served = list(self.dispatcher.served)
        self._backlog = [len(lane) for lane in self.dispatcher.lanes]
        self.slots = self._bounded(self.slots)
        self._apply(self.slots)

    def _apply(self, slots: int) -> None:
        self.dispatcher.slots = slots
        self.workers.resize()
        self.metrics.scaling_capacity_slots.set(slots)
        self.dispatcher.kick()  # more slots: the backlog may go now

    # -- one decision ---------------------------------------------------------------------
    def measure(self) -> LoadSample:
        """The load since the last call."""
        now = self._clock()
        dt = max(now - self._last_at, 1e-3)
        self._last_at = now
        dispatcher = self.dispatcher
        lanes = dispatcher.lanes
        served_now = dispatcher.served
        if len(self._served) != len(served_now):  # lanes changed on reload
            self._served = [0] * len(served_now)
            self._backlog = [0] * len(served_now)
        now_ns = time.monotonic_ns()
        per_lane: list[tuple[float, int, float]] = []
        for i, lane in enumerate(lanes):
            served = max(served_now[i] - self._served[i], 0)
            backlog = len(lane)
            arrivals = max(served + backlog - self._backlog[i], 0) / dt
            oldest = (now_ns - lane.items[0].received_ns) / 1e9 if lane.items else 0.0
            per_lane.append((arrivals, backlog, max(oldest, 0.0)))
        total_served = sum(served_now) - sum(self._served)
        self._served = list(served_now)
        self._backlog = [len(lane) for lane in lanes]
        busy_s = (dispatcher.busy_ns - self._busy_ns) / 1e9
        self._busy_ns = dispatcher.busy_ns
        if busy_s >= MIN_BUSY_S and total_served > 0:
            rate = total_served / busy_s  # a drain runs its batches one after another
            self.slot_rate = (rate if not self.slot_rate
                              else self.slot_rate + SLOT_RATE_ALPHA * (rate - self.slot_rate))

        # The anomaly lanes run the most urgent tier's pipeline: their load is that tier's.
        anomalies = len(dispatcher.anomaly_lanes)
        tiers: list[TierLoad] = []
        for j, lane in enumerate(dispatcher.routine_lanes):
            arrivals, backlog, oldest = per_lane[anomalies + j]
            if j == 0:
                for a, b, o in per_lane[:anomalies]:
                    arrivals, backlog, oldest = arrivals + a, backlog + b, max(oldest, o)
            tiers.append(TierLoad(lane.name, arrivals, backlog, oldest,
                                  self.tier_bounds.get(lane.name, math.inf)))
        return LoadSample(now, tuple(tiers), max(total_served, 0) / dt, dispatcher.slots,
                          self.slot_rate)

    def tick(self) -> Decision:
        """Measure, decide, apply; audit and hook what changed."""
        sample = self.sample = self.measure()
        decision = self.policy.decide(sample)
        previous = self.decision
        self.decision = decision
        slots = self._bounded(decision.slots)
        metrics = self.metrics
        metrics.scaling_arrivals.set(sum(t.arrivals for t in sample.tiers))
        metrics.scaling_forecast.set(decision.forecast)
        metrics.scaling_desired_replicas.set(decision.desired_replicas)
        changed_replicas = (previous is None
                            or previous.desired_replicas != decision.desired_replicas)
        if slots != self.slots:
            action = "scale-up" if slots > self.slots else "scale-down"
            log.info("scaling: %s %d → %d slots (%s)", action, self.slots, slots,
                     decision.reason)
            self.slots = slots
            self._apply(slots)
            metrics.scaling_decisions.labels(action).inc()
            self._record(action, decision, slots)
        elif changed_replicas and previous is not None:
            metrics.scaling_decisions.labels("replicas").inc()
            self._record("replicas", decision, slots)
        if self.section.hook.command:
            self._want_hook()
        return decision

    def _record(self, action: str, decision: Decision, slots: int) -> None:
        self._audit("scaling.decision", action=action, policy=self.policy.name, slots=slots,
                    desired_replicas=decision.desired_replicas,
                    forecast=round(decision.forecast, 3), reason=decision.reason,
                    inputs={k: round(v, 6) for k, v in decision.inputs.items()})

    async def run(self) -> None:
        """Decide every ``interval_s`` until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.section.interval_s)
                try:
                    self.tick()
                except Exception:  # a plugin policy that raises must not stop the gateway
                    log.exception("scaling policy %r raised; capacity kept at %d slots",
                                  self.policy.name, self.slots)
        finally:
            if self._hook_timer is not None:
                self._hook_timer.cancel()

    # -- what others read -------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """``GET /v1/scaling``: flat numbers first, for KEDA's metrics-api scaler
        (``valueLocation: desiredReplicas``), then the detail."""
        decision, sample = self.decision, self.sample
        arrivals = sum(t.arrivals for t in sample.tiers) if sample is not None else 0.0
        return {
            "desiredReplicas": decision.desired_replicas if decision else self.section.min_replicas,
            "capacitySlots": self.slots,
            "forecastMessagesPerSecond": round(decision.forecast, 3) if decision else 0.0,
            "arrivalMessagesPerSecond": round(arrivals, 3),
            "slotRateMessagesPerSecond": round(self.slot_rate, 3),
            "policy": self.policy.name,
            "nodeId": self.node_id,
            "region": self.region,
            "bounds": {"minSlots": self.section.min_slots, "maxSlots": self.section.max_slots,
                       "minReplicas": self.section.min_replicas,
                       "maxReplicas": self.section.max_replicas},
            "decision": None if decision is None else {
                "action": decision.action, "reason": decision.reason,
                "inputs": decision.inputs},
            "tiers": [] if sample is None else [
                {"name": t.name, "arrivalsPerSecond": round(t.arrivals, 3),
                 "backlog": t.backlog, "oldestWaitSeconds": round(t.oldest_wait_s, 6),
                 "maxLatencySeconds": t.max_latency_s} for t in sample.tiers],
        }

    # -- the command hook -------------------------------------------------------------------
    def _want_hook(self) -> None:
        hook = self.section.hook
        decision = self.decision
        if decision is None or self._hook_timer is not None:
            return  # a run is already scheduled: it takes the latest decision
        if (hook.on_change_only and self._hook_ran_for == decision.desired_replicas):
            return
        if self._hook_task is not None and not self._hook_task.done():
            return  # the next tick asks again once it is done
        wait = self._hook_last + hook.min_interval_s - self._clock()
        loop = asyncio.get_running_loop()
        if wait > 0:
            self._hook_timer = loop.call_later(wait, self._hook_due)
            return
        self._start_hook()

    def _hook_due(self) -> None:
        self._hook_timer = None
        self._want_hook()

    def _start_hook(self) -> None:
        decision = self.decision
        assert decision is not None
        values = {"desired_replicas": decision.desired_replicas, "capacity_slots": self.slots,
                  "forecast": f"{decision.forecast:.3f}",
                  "arrivals": f"{sum(t.arrivals for t in self.sample.tiers):.3f}"
                  if self.sample else "0", "node_id": self.node_id, "region": self.region,
                  "policy": self.policy.name}
        argv = [arg.format(**values) for arg in self.section.hook.command]
        self._hook_last = self._clock()
        self._hook_ran_for = decision.desired_replicas
        self._hook_task = asyncio.get_running_loop().create_task(
            self._run_hook(argv, self.section.hook.timeout_s))

    async def _run_hook(self, argv: list[str], timeout: float) -> None:
        started = time.monotonic()
        output = ""
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except OSError as err:
            outcome, code = "error", None
            output = f"cannot run {argv[0]!r}: {err.strerror or err}"
        else:
            try:
                raw, _ = await asyncio.wait_for(process.communicate(), timeout)
                output = raw.decode(errors="replace")[-HOOK_OUTPUT_LIMIT:]
                code = process.returncode
                outcome = "ok" if code == 0 else "failed"
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                outcome, code = "timeout", None
                output = f"killed after its timeout of {timeout:g} s"
        took = time.monotonic() - started
        self.metrics.scaling_hook_runs.labels(outcome).inc()
        if outcome == "ok":
            log.info("scaling hook ran in %.2f s: %s", took, " ".join(argv))
        else:
            self._hook_ran_for = None  # not done: the next decision tries again
            log.error("scaling hook %s (%s, exit %s): %s", outcome, " ".join(argv), code,
                      output.strip())
        self._audit("scaling.hook", argv=argv, outcome=outcome, exit_code=code,
                    seconds=round(took, 3), output=output.strip()[-500:])
