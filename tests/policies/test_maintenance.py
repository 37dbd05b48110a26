"""Maintenance reservations: admission, adjustment, deferral, cron windows, config errors."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.maintenance import (
    ENTRY_POINT_GROUP,
    Decision,
    MaintenanceError,
    MaintenancePlanner,
    MaintenanceSection,
    Reservation,
    load_task_plugins,
)

START = "2024-01-01T00:00:00Z"
T0 = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
CAPACITY = 10
HEADROOM = 0.25  # ceil(10 * 0.25) = 3 slots always left to anomaly + critical work


def fixed(name: str = "compact", **overrides: object) -> Reservation:
    fields: dict[str, object] = {
        "name": name,
        "task": "wal_compaction",
        "start": START,
        "duration_s": 600.0,
        "min_slots": 2,
        "max_slots": 5,
        "max_defer_s": 120.0,
    }
    fields.update(overrides)
    return Reservation(**fields)  # type: ignore[arg-type]


def planner(*reservations: Reservation) -> MaintenancePlanner:
    return MaintenancePlanner(
        MaintenanceSection(reservations=list(reservations), critical_headroom=HEADROOM)
    )


def tick(
    p: MaintenancePlanner,
    now: float,
    *,
    total: float = 0.0,
    critical: float = 0.0,
    forecast: float = 0.0,
    capacity: int = CAPACITY,
) -> list[tuple[str, int]]:
    decisions = p.tick(
        now,
        capacity_slots=capacity,
        critical_load_slots=critical,
        total_load_slots=total,
        forecast_load_slots=forecast,
    )
    assert all(d.at == now for d in decisions)
    return [(d.action, d.slots) for d in decisions]


# ---------------------------------------------------------------- fixed windows


def test_fixed_window_waits_then_is_granted_max_when_idle() -> None:
    p = planner(fixed())
    assert tick(p, T0 - 1) == []
    assert tick(p, T0) == [("grant", 5)]
    assert p.reserved_slots() == 5
    assert tick(p, T0 + 1) == []  # decisions only on change


def test_shrinks_toward_min_as_routine_load_rises_pauses_for_critical_load_only() -> None:
    p = planner(fixed())
    assert tick(p, T0) == [("grant", 5)]
    # 10 - 3 (headroom) = 7 may be reserved; routine load takes what is above min
    assert tick(p, T0 + 1, total=4) == [("shrink", 3)]
    assert tick(p, T0 + 2, total=5) == [("shrink", 2)]
    assert tick(p, T0 + 3, total=10) == []  # min is held against routine work
    assert p.reserved_slots() == 2
    assert tick(p, T0 + 4, critical=8.5, total=10) == [("pause", 0)]  # 9 slots protected
    assert p.reserved_slots() == 0
    assert tick(p, T0 + 5, critical=8.2, total=8.2) == []
    assert tick(p, T0 + 6, total=4) == [("resume", 3)]
    assert tick(p, T0 + 7, total=0) == [("grow", 5)]
    assert [s.phase for s in p.list()] == ["running"]


def test_critical_load_above_headroom_is_never_taken() -> None:
    p = planner(fixed())
    tick(p, T0)
    # critical work needs 7 slots: only 3 remain, routine load is counted on top
    assert tick(p, T0 + 1, critical=7, total=7) == [("shrink", 3)]
    assert tick(p, T0 + 2, critical=7.5, total=7.5) == [("shrink", 2)]  # ceil(7.5) = 8
    assert tick(p, T0 + 3, critical=8.5, total=8.5) == [("pause", 0)]


def test_completes_at_window_end_and_frees_slots() -> None:
    p = planner(fixed())
    tick(p, T0)
    assert tick(p, T0 + 599) == []
    assert tick(p, T0 + 600) == [("complete", 0)]
    assert p.reserved_slots() == 0
    assert [s.phase for s in p.list()] == ["done"]
    assert tick(p, T0 + 10_000) == []


def test_paused_window_also_completes_at_its_end() -> None:
    p = planner(fixed())
    tick(p, T0)
    assert tick(p, T0 + 1, critical=10, total=10) == [("pause", 0)]
    assert tick(p, T0 + 600, critical=10, total=10) == [("complete", 0)]


def test_deferred_when_forecast_does_not_admit_then_granted_later() -> None:
    p = planner(fixed())
    decisions = p.tick(
        T0, capacity_slots=10, critical_load_slots=0, total_load_slots=0, forecast_load_slots=9
    )
    assert [(d.action, d.slots) for d in decisions] == [("defer", 0)]
    assert "min needs 2" in decisions[0].reason
    assert tick(p, T0 + 1, forecast=9) == []  # still deferred, not re-audited
    assert tick(p, T0 + 60, forecast=6) == [("grant", 4)]
    # a deferral shifts the window rather than shortening it
    assert p.list()[0].window_end == T0 + 60 + 600
    # once running, only the real load sizes it
    assert tick(p, T0 + 61, forecast=9) == [("grow", 5)]
    assert tick(p, T0 + 659) == []
    assert tick(p, T0 + 660) == [("complete", 0)]


def test_deferred_by_real_critical_load_too_never_by_routine_load() -> None:
    p = planner(fixed())
    assert tick(p, T0, critical=8.5, total=8.5) == [("defer", 0)]
    assert tick(p, T0 + 1, critical=2, total=10) == [("grant", 2)]


def test_skipped_after_max_defer_s() -> None:
    p = planner(fixed())
    assert tick(p, T0, forecast=9) == [("defer", 0)]
    assert tick(p, T0 + 119, forecast=9) == []
    assert tick(p, T0 + 120, forecast=9) == [("skip", 0)]
    assert [s.phase for s in p.list()] == ["done"]
    assert tick(p, T0 + 121) == []


def test_first_seen_too_late_is_skipped() -> None:
    p = planner(fixed())
    assert tick(p, T0 + 121) == [("skip", 0)]


def test_two_reservations_share_what_is_left_in_order() -> None:
    p = planner(fixed("a"), fixed("b"))
    assert tick(p, T0) == [("grant", 5), ("grant", 2)]
    # critical load rises: the later reservation yields first
    assert tick(p, T0 + 1, critical=4, total=4) == [("pause", 0)]
    assert p.reserved_slots() == 5


# ----------------------------------------------------------------- cron windows


def test_cron_window_opens_at_0200_utc_and_completes_at_0300() -> None:
    r = Reservation(
        name="rotate",
        task="audit_rotation",
        cron="0 2 * * *",
        duration_s=3600,
        min_slots=1,
        max_slots=2,
    )
    p = planner(r)
    two = T0 + 2 * 3600
    assert tick(p, two - 60) == []
    assert p.list()[0].scheduled_start == two
    assert tick(p, two) == [("grant", 2)]
    assert tick(p, two + 3599) == []
    assert tick(p, two + 3600) == [("complete", 0)]
    state = p.list()[0]
    assert state.phase == "waiting"
    assert state.scheduled_start == two + 86_400  # tomorrow 02:00 UTC
    assert tick(p, two + 86_400) == [("grant", 2)]


# ---------------------------------------------------------------- admin surface


def test_cancel_frees_slots() -> None:
    p = planner(fixed())
    tick(p, T0)
    assert p.cancel("compact") is True
    assert p.reserved_slots() == 0
    assert p.list() == []
    assert p.cancel("compact") is False


def test_add_rejects_duplicate_names() -> None:
    p = planner(fixed())
    with pytest.raises(MaintenanceError, match="already exists"):
        p.add(fixed())
    p.add(fixed("other"))
    assert [s.name for s in p.list()] == ["compact", "other"]


def test_task_plugins_load_from_entry_points() -> None:
    assert ENTRY_POINT_GROUP == "iot_gateway.maintenance_tasks"
    assert isinstance(load_task_plugins(), dict)


# --------------------------------------------------------------- config errors


def decode(text: str) -> MaintenanceSection:
    return msgspec.toml.decode(text, type=MaintenanceSection)


BASE = 'name = "x"\ntask = "t"\nduration_s = 60\nmin_slots = 1\nmax_slots = 2\n'


def test_config_decodes_from_toml() -> None:
    section = decode(f'critical_headroom = 0.4\n[[reservations]]\n{BASE}start = "{START}"\n')
    assert section.critical_headroom == 0.4
    assert section.reservations[0].max_defer_s == 3600


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (f'start = "{START}"\ncron = "0 2 * * *"\n', "`start` or `cron`"),
        ("", "`start` or `cron`"),
        ('start = "yesterday"\n', "`start`"),
        ('cron = "not a cron"\n', "`cron`"),
    ],
)
def test_config_errors_name_start_and_cron(extra: str, needle: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode(f"[[reservations]]\n{BASE}{extra}")
    assert needle in str(info.value)
    assert "$.reservations[0]" in str(info.value)


def test_config_error_max_below_min_names_fields() -> None:
    text = f'[[reservations]]\nname = "x"\ntask = "t"\nstart = "{START}"\n'
    text += "duration_s = 60\nmin_slots = 3\nmax_slots = 2\n"
    with pytest.raises(msgspec.ValidationError, match=r"`max_slots` \(2\).*`min_slots` \(3\)"):
        decode(text)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("critical_headroom = 0\n", "$.critical_headroom"),
        ("critical_headroom = 1.5\n", "$.critical_headroom"),
        (f'[[reservations]]\n{BASE}start = "{START}"\nduration_s2 = 1\n', "duration_s2"),
        (
            f'[[reservations]]\nname = "x"\ntask = "t"\nstart = "{START}"\n'
            "duration_s = 0\nmin_slots = 1\nmax_slots = 2\n",
            "$.reservations[0].duration_s",
        ),
    ],
)
def test_config_field_constraints(text: str, where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r".*") as info:
        decode(text)
    assert where in str(info.value)


def test_direct_construction_checks_too() -> None:
    with pytest.raises(ValueError, match="neither"):
        Reservation(name="x", task="t", duration_s=1, min_slots=0, max_slots=1)


# ------------------------------------------------------------ headroom property

loads = st.tuples(
    st.floats(min_value=0.5, max_value=120),  # seconds since the last tick
    st.integers(min_value=0, max_value=64),  # capacity
    st.floats(min_value=0, max_value=80),  # critical load
    st.floats(min_value=0, max_value=80),  # routine load on top of it
    st.floats(min_value=0, max_value=80),  # forecast
)
reservations = st.builds(
    lambda i, start, min_slots, extra, duration, defer: fixed(
        f"r{i}",
        start=datetime.fromtimestamp(T0 + start, UTC).isoformat(),
        min_slots=min_slots,
        max_slots=max(min_slots, 1) + extra,
        duration_s=duration,
        max_defer_s=defer,
    ),
    st.integers(),
    st.integers(min_value=0, max_value=600),
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=0, max_value=16),
    st.floats(min_value=1, max_value=900),
    st.floats(min_value=0, max_value=300),
)


@settings(max_examples=200, deadline=None)
@given(
    headroom=st.floats(min_value=0.01, max_value=1.0),
    specs=st.lists(reservations, max_size=4, unique_by=lambda r: r.name),
    steps=st.lists(loads, max_size=60),
)
def test_headroom_invariant_over_random_loads(
    headroom: float,
    specs: list[Reservation],
    steps: list[tuple[float, int, float, float, float]],
) -> None:
    p = MaintenancePlanner(MaintenanceSection(reservations=specs, critical_headroom=headroom))
    now = T0
    last: dict[str, int] = {}
    for dt, capacity, critical, routine, forecast in steps:
        now += dt
        decisions: list[Decision] = p.tick(
            now,
            capacity_slots=capacity,
            critical_load_slots=critical,
            total_load_slots=critical + routine,
            forecast_load_slots=forecast,
        )
        reserved = p.reserved_slots()
        assert capacity - reserved >= math.ceil(capacity * headroom)
        assert capacity - reserved >= min(critical, capacity)  # critical work may queue
        for state in p.list():
            r = state.reservation
            assert state.slots == 0 or max(r.min_slots, 1) <= state.slots <= r.max_slots
            assert (state.slots > 0) == (state.phase == "running")
        for d in decisions:
            last[d.name] = d.slots
        # the audited decisions alone reconstruct the live holding
        assert sum(last.values()) == reserved
