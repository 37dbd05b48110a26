"""Which regions are up, from heartbeats and the state of the link. Sans-I/O: the caller
passes the (monotonic) time.

A remote region is up while a heartbeat of any of its gateways arrived within
``down_after_missed`` × ``interval`` and the link (this gateway's connection to RabbitMQ, and
its forwards being confirmed in time) works; while the link is down every remote region is
down for placement. This gateway's own region is always up: local work continues whatever
the others do. A region is saturated while the latest heartbeat of each of its gateways said
so. ``update`` returns the transitions, each with how long detection took: for a region
going down, the time since its last heartbeat (an upper bound of the outage's age when it
was noticed); for one coming back, the time it was down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from policies.regions import RegionState


@dataclass(frozen=True, slots=True)
class Transition:
    region: str
    up: bool
    after_s: float
    """Down: seconds since its last heartbeat (or since the link was lost); up: seconds it
    was down."""
    cause: str


class RegionHealth:
    def __init__(self, names: Iterable[str], here: str, interval_s: float,
                 down_after_missed: int, now: float) -> None:
        self.here = here
        self.window = interval_s * down_after_missed
        self.last_beat: dict[str, float] = {}
        self.saturated_nodes: dict[str, dict[str, bool]] = {}
        self.down_since: dict[str, float] = {}
        self.link_up = False
        self.link_changed = now
        self.states: dict[str, RegionState] = {}
        for name in names:
            up = name == here
            self.states[name] = RegionState(name, up, False)
            if not up:
                self.down_since[name] = now

    def beat(self, region: str, node: str, saturated: bool, now: float,
             age_s: float = 0.0) -> None:
        """A heartbeat, ``age_s`` old when it arrived (a stale one is ignored)."""
        if region not in self.states or age_s > self.window:
            return
        self.last_beat[region] = now
        self.saturated_nodes.setdefault(region, {})[node] = saturated

    def link(self, up: bool, now: float) -> None:
        if up != self.link_up:
            self.link_up = up
            self.link_changed = now

    def update(self, now: float) -> list[Transition]:
        """Recomputes ``states``; returns what changed."""
        changes: list[Transition] = []
        window = self.window
        for name, old in self.states.items():
            if name == self.here:
                continue
            last = self.last_beat.get(name)
            beating = last is not None and now - last <= window
            up = beating and self.link_up
            nodes = self.saturated_nodes.get(name)
            saturated = bool(nodes) and all(nodes.values())  # type: ignore[union-attr]
            if up != old.up:
                if up:
                    since = self.down_since.pop(name, now)
                    changes.append(Transition(name, True, now - since, "heartbeat"))
                else:
                    if not self.link_up:
                        cause = "link down"
                        after = now - max(self.link_changed, last or self.link_changed)
                    else:
                        cause = "missed heartbeats"
                        after = now - last if last is not None else window
                    self.down_since[name] = now
                    changes.append(Transition(name, False, after, cause))
                if not up and nodes:
                    nodes.clear()  # who is saturated is learnt again when it is back
                    saturated = False
            if up != old.up or saturated != old.saturated:
                self.states[name] = RegionState(name, up, saturated)
        return changes
