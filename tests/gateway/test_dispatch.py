"""The dispatcher's scheduling guarantees: priority, guaranteed shares, order, back-pressure."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DispatchSection, Tier
from gateway.dispatch import Dispatcher
from gateway.envelope import Envelope

TIERS = [
    Tier(name="critical", max_latency_ms=50, guaranteed_share=0.0),
    Tier(name="premium", max_latency_ms=200, guaranteed_share=0.3),
    Tier(name="standard", max_latency_ms=1000, guaranteed_share=0.2),
    Tier(name="bulk", max_latency_ms=60000, guaranteed_share=0.1),
]


def envelope(tier: str, seq: int, device: str = "d") -> Envelope:
    return Envelope(id=str(seq), device=device, tenant="t", tier=tier, region="r", topic="x",
                    payload=b"", received_ns=seq, received_at=0.0, deadline_ns=seq)


def make(batch_size: int = 1, slots: int = 1, **kw: int) -> tuple[Dispatcher, list[str]]:
    order: list[str] = []
    d = Dispatcher(TIERS, DispatchSection(batch_size=batch_size, slots=slots, **kw),
                   lambda lane, batch: order.extend(e.tier for e in batch))
    return d, order


def fill(d: Dispatcher, counts: dict[str, int]) -> None:
    seq = 0
    for tier, n in counts.items():
        for _ in range(n):
            seq += 1
            d.lane_by_tier[tier].items.append(envelope(tier, seq))
    d.queued += seq


def drain_all(d: Dispatcher) -> list[tuple[str, int]]:
    out = []
    while (picked := d.next_batch()) is not None:
        out.append((picked[0].name, len(picked[1])))
    return out


def test_higher_tier_first_when_no_share_is_owed() -> None:
    d, _ = make(batch_size=10)
    fill(d, {"bulk": 5, "critical": 5})
    lane, batch = d.next_batch()  # type: ignore[misc]
    assert lane.name == "critical" and len(batch) == 5


@given(
    counts=st.fixed_dictionaries({t.name: st.integers(0, 300) for t in TIERS}),
    batch_size=st.integers(1, 64),
)
@settings(max_examples=200, deadline=None)
def test_every_message_is_dispatched_exactly_once(counts: dict[str, int], batch_size: int) -> None:
    d, _ = make(batch_size=batch_size)
    fill(d, counts)
    dispatched: dict[str, int] = {}
    for tier, n in drain_all(d):
        dispatched[tier] = dispatched.get(tier, 0) + n
    assert {t: n for t, n in dispatched.items() if n} == {t: n for t, n in counts.items() if n}
    assert d.queued == 0


@given(backlogged=st.sets(st.sampled_from([t.name for t in TIERS]), min_size=1),
       window=st.integers(20, 400), batch_size=st.sampled_from([1, 1, 2, 7, 32]))
@settings(max_examples=300, deadline=None)
def test_a_tier_with_work_waiting_gets_its_guaranteed_share(backlogged: set[str],
                                                            window: int,
                                                            batch_size: int) -> None:
    # Every tier in `backlogged` always has work waiting while `window` messages go out:
    # each gets its share of them, less at most one batch (one message with batch_size 1).
    d, _ = make(batch_size=batch_size)
    fill(d, {t: window + batch_size for t in backlogged})
    served = dict.fromkeys(backlogged, 0)
    dispatched = 0
    while dispatched < window:
        lane, batch = d.next_batch()  # type: ignore[misc]
        served[lane.name] += len(batch)
        dispatched += len(batch)
    for tier in TIERS:
        if tier.name in backlogged:
            assert served[tier.name] >= tier.guaranteed_share * dispatched - batch_size, served


@given(st.lists(st.sampled_from([t.name for t in TIERS]), min_size=1, max_size=300),
       st.integers(1, 32))
@settings(max_examples=200, deadline=None)
def test_a_lower_tier_never_runs_ahead_of_a_higher_one_beyond_its_share(
        arrivals: list[str], batch_size: int) -> None:
    d, _ = make(batch_size=batch_size)
    rank = {t.name: i for i, t in enumerate(TIERS)}
    share = {t.name: t.guaranteed_share for t in TIERS}
    for seq, tier in enumerate(arrivals):
        d.lane_by_tier[tier].items.append(envelope(tier, seq))
        d.queued += 1
    dispatched = 0
    ahead = dict.fromkeys(share, 0)  # messages served while a higher tier had work waiting
    while True:
        waiting = [lane.name for lane in d.lanes if lane.items]
        picked = d.next_batch()
        if picked is None:
            break
        chosen, n = picked[0].name, len(picked[1])
        dispatched += n
        if any(rank[t] < rank[chosen] for t in waiting):
            ahead[chosen] += n
            assert ahead[chosen] <= share[chosen] * dispatched + batch_size, (chosen, ahead)


def test_messages_of_one_lane_leave_in_arrival_order() -> None:
    d, _ = make(batch_size=7)
    for seq in range(100):
        d.lane_by_tier["standard"].items.append(envelope("standard", seq, device=f"d{seq % 3}"))
    d.queued = 100
    seen = []
    while (picked := d.next_batch()) is not None:
        seen += [e.received_ns for e in picked[1]]
    assert seen == list(range(100))


async def test_backpressure_pauses_above_max_and_resumes_below_resume() -> None:
    signals: list[bool] = []
    processed: list[int] = []
    d = Dispatcher(TIERS, DispatchSection(batch_size=10, slots=1, max_queued=50,
                                          resume_queued=20, shed_above=40),
                   lambda lane, batch: processed.append(len(batch)), signals.append)
    for seq in range(60):
        d.put(envelope("standard", seq))
    assert signals == [True]
    await d.wait_idle()
    assert signals == [True, False]
    assert sum(processed) == 60


async def test_drain_yields_to_the_loop_between_slot_rounds() -> None:
    rounds: list[int] = []
    d = Dispatcher(TIERS, DispatchSection(batch_size=10, slots=2),
                   lambda lane, batch: rounds.append(len(batch)))
    for seq in range(100):
        d.lane_by_tier["bulk"].items.append(envelope("bulk", seq))
    d.accepted(100)
    await asyncio.sleep(0)  # one loop turn: one drain of at most `slots` batches
    assert sum(rounds) == 20
    await d.wait_idle()
    assert sum(rounds) == 100


def test_reconfigure_moves_queued_messages_and_keeps_their_order() -> None:
    d, _ = make(batch_size=100)
    for seq in range(5):
        d.lane_by_tier["bulk"].items.append(envelope("bulk", seq))
        d.lane_by_tier["premium"].items.append(envelope("premium", 10 + seq))
    d.queued = 10
    d.reconfigure([Tier(name="premium", max_latency_ms=100),
                   Tier(name="standard", max_latency_ms=1000)],
                  DispatchSection(batch_size=100), default_tier="standard")
    assert [lane.name for lane in d.lanes] == ["premium", "standard"]
    premium = d.next_batch()
    standard = d.next_batch()
    assert premium is not None and standard is not None
    assert [e.received_ns for e in premium[1]] == [10, 11, 12, 13, 14]
    # bulk is gone: its messages moved to the default tier, in order, none lost.
    assert [(e.tier, e.received_ns) for e in standard[1]] == [("standard", s) for s in range(5)]
    assert d.next_batch() is None and d.queued == 0


# -- anomalies, weights, late work, preempted work, maintenance ---------------------------

SEVERITY_LANES = ["anomaly-emergency", "anomaly-critical", "anomaly-warning", "anomaly-info"]


def with_anomalies(batch_size: int = 1, slots: int = 1, routine_floor: float = 0.2,
                   tiers: list[Tier] = TIERS) -> tuple[Dispatcher, list[str]]:
    order: list[str] = []
    d = Dispatcher(tiers, DispatchSection(batch_size=batch_size, slots=slots,
                                          routine_floor=routine_floor),
                   lambda lane, batch: order.extend(lane.name for _ in batch),
                   anomaly_lanes=SEVERITY_LANES)
    return d, order


def test_anomalies_jump_every_tier_most_severe_first() -> None:
    d, _ = with_anomalies(batch_size=10, routine_floor=0.0)
    fill(d, {"critical": 5, "anomaly-info": 2, "anomaly-emergency": 3})
    assert [(lane.name, len(b)) for lane, b in iter(d.next_batch, None)] == [
        ("anomaly-emergency", 3), ("anomaly-info", 2), ("critical", 5)]


@given(floor=st.sampled_from([0.05, 0.1, 0.2, 0.5]), batch_size=st.sampled_from([1, 4, 32]),
       window=st.integers(50, 600))
@settings(max_examples=100, deadline=None)
def test_routine_work_keeps_its_floor_while_anomalies_exceed_capacity(
        floor: float, batch_size: int, window: int) -> None:
    d, _ = with_anomalies(batch_size=batch_size, routine_floor=floor)
    fill(d, {"anomaly-critical": 10 * window, "bulk": 10 * window})
    routine = dispatched = 0
    while dispatched < window:
        lane, batch = d.next_batch()  # type: ignore[misc]
        dispatched += len(batch)
        routine += len(batch) if lane.name == "bulk" else 0
    assert routine >= floor * dispatched - batch_size
    # ... and no more than that: the rest goes to the anomalies.
    assert routine <= floor * dispatched + batch_size


def test_spare_capacity_is_divided_by_weight() -> None:
    tiers = [Tier(name="gold", max_latency_ms=50, guaranteed_share=0.1, weight=1),
             Tier(name="silver", max_latency_ms=50, guaranteed_share=0.1, weight=3)]
    d = Dispatcher(tiers, DispatchSection(batch_size=1), lambda lane, batch: None)
    fill(d, {"gold": 5000, "silver": 5000})
    served = {"gold": 0, "silver": 0}
    for _ in range(4000):
        lane, batch = d.next_batch()  # type: ignore[misc]
        served[lane.name] += len(batch)
    # Spare 0.8 split 1:3: gold 0.1 + 0.2 = 0.3, silver 0.1 + 0.6 = 0.7.
    assert abs(served["gold"] / 4000 - 0.3) < 0.01, served


def test_without_weights_spare_capacity_goes_to_the_most_urgent_tier() -> None:
    d, _ = make(batch_size=1)
    fill(d, {"premium": 5000, "bulk": 5000})
    served = {"premium": 0, "bulk": 0}
    for _ in range(1000):
        lane, batch = d.next_batch()  # type: ignore[misc]
        served[lane.name] += len(batch)
    assert abs(served["bulk"] - 100) <= 1, served  # bulk's share 0.1, no more


def test_a_late_tier_sheds_late_qos0_and_keeps_every_acknowledged_message() -> None:
    tiers = [Tier(name="live", max_latency_ms=1, late="shed"),
             Tier(name="kept", max_latency_ms=1)]
    shed: list[Envelope] = []
    d = Dispatcher(tiers, DispatchSection(batch_size=100), lambda lane, batch: None,
                   on_shed=lambda lane, envelopes: shed.extend(envelopes))
    old = time.monotonic_ns() - 10_000_000  # 10 ms ago: past the 1 ms deadline
    for seq, qos in enumerate([0, 1, 0, 2]):
        d.lane_by_tier["live"].items.append(
            Envelope(id=str(seq), device="d", tenant="t", tier="live", region="r", topic="x",
                     payload=b"", received_ns=old, received_at=0.0, qos=qos))
        d.lane_by_tier["kept"].items.append(
            Envelope(id=f"k{seq}", device="d", tenant="t", tier="kept", region="r",
                     topic="x", payload=b"", received_ns=old, received_at=0.0, qos=qos))
    d.lane_by_tier["live"].items.append(envelope("live", time.monotonic_ns() + 10**9))
    d.queued = 9
    live = d.next_batch()
    kept = d.next_batch()
    assert live is not None and kept is not None
    assert [e.id for e in shed] == ["0", "2"]
    assert [e.qos for e in live[1]] == [1, 2, 0]  # acknowledged ones and the fresh one
    assert len(kept[1]) == 4  # a "process" tier keeps late work


async def test_preempted_work_resumes_first_in_its_lane() -> None:
    order: list[str] = []
    d = Dispatcher(TIERS, DispatchSection(batch_size=10),
                   lambda lane, batch: order.extend(e.id for e in batch))
    for seq in range(3):
        d.put(envelope("bulk", seq))
    await d.wait_idle()
    d.put(envelope("bulk", 7))
    d.requeue("bulk", 2, lambda: order.append("resumed"))
    await d.wait_idle()
    assert order == ["0", "1", "2", "resumed", "7"]
    assert d.queued == 0


async def test_a_busy_drain_asks_for_preemption_when_anomalies_wait() -> None:
    wanted: list[int] = []
    d = Dispatcher(TIERS, DispatchSection(batch_size=4), lambda lane, batch: None,
                   can_process=lambda: False, anomaly_lanes=SEVERITY_LANES,
                   preempt=wanted.append)
    for seq in range(9):
        d.lane_by_tier["anomaly-warning"].items.append(envelope("anomaly-warning", seq))
    d.accepted(9)
    await asyncio.sleep(0)
    assert wanted == [3]  # nine anomalous messages: three batches of four


async def test_maintenance_takes_reserved_slots_from_routine_work_never_critical() -> None:
    processed: list[str] = []
    slices: list[int] = []
    d = Dispatcher(TIERS, DispatchSection(batch_size=1, slots=4),
                   lambda lane, batch: processed.extend(lane.name for _ in batch),
                   anomaly_lanes=SEVERITY_LANES)
    d.protect(["critical"])

    def run_slice() -> bool:
        slices.append(len(processed))
        return True

    d.set_maintenance(1, run_slice)
    fill(d, {"critical": 8})
    d.kick()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert processed == ["critical"] * 8
    assert all(seen == 8 for seen in slices)  # no slice while critical work waited
    processed.clear()
    slices.clear()
    fill(d, {"standard": 12})
    await asyncio.sleep(0)  # one drain of four slots: one for maintenance, three for standard
    assert len(processed) == 3 and slices == [0]
    await asyncio.sleep(0)
    assert len(processed) == 6 and slices == [0, 3]
    d.set_maintenance(0, None)
    await d.wait_idle()
    assert processed == ["standard"] * 12


async def test_maintenance_waits_until_its_task_is_ready() -> None:
    calls = 0

    def run_slice() -> bool:
        nonlocal calls
        calls += 1
        return False  # waiting for something else

    d = Dispatcher(TIERS, DispatchSection(batch_size=1, slots=4), lambda lane, batch: None)
    d.set_maintenance(2, run_slice)
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls == 1  # not called again until it says it is ready
    d.maintenance_ready()
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls == 2
