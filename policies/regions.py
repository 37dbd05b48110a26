"""Regional processing: the topology, residency rules and the placement policy.

Theory of operation
-------------------
Each gateway knows its own region (``[gateway] region``) and the ``[regions]`` section:
the regions (with the messages/s each sustains), the links between them (what a GB costs
to move, and the latency), and residency rules. A message's placement is decided where it
arrived (``here``) from its tenant and device class (the data class), whether this region
is saturated, and what the runtime knows about the others right now (:class:`RegionState`:
heartbeats arriving, link working, room or not). The answer is a :class:`Placement`:

* ``local``: process here;
* ``forward``: publish it to the target region's queue (``exchange``, routing key = region);
* ``spool``: keep it durably and retry every ``spool_retry_s`` (nothing allowed is up).

*Residency* is a list of rules, the first that matches (tenant glob and device-class glob,
an empty list matching anything) wins; its ``allowed`` regions are the only places the data
may be processed or stored. No rule matches: anywhere. Residency is never traded for
availability: no policy here returns a region outside the allowed set, also not in
failover, and a gateway whose own region is not allowed never processes the data locally.

*local-first* (the default): here when allowed and not saturated; otherwise the cheapest
allowed region (cost, then latency, then name: :meth:`Topology.cheapest`) that is up and not
saturated. Here allowed but saturated and nowhere else with room: here anyway (back-pressure
deals with it; data that may stay is never spooled). Here not allowed: the cheapest allowed
region with room; failing that, the cheapest that is up (its back-pressure deals with it);
failing that, spool.

*global-spread* is the naive global balancer the benchmark compares against: round-robin
over every allowed region (this one included) regardless of origin and cost, skipping the
ones that are down, spooling when none is up.

Hot path. The runtime asks for every message, so everything that depends only on
(tenant, class, here) — the allowed set, the cost-ordered targets, the :class:`Placement`
objects and their reasons — is computed once and cached; a call is one dict lookup plus a
walk over the (few) allowed targets reading their states. Region states are read, not
cached, so a state change takes effect on the next message with nothing to invalidate.
A region absent from ``regions`` (the runtime's states) counts as down: data is never sent
where no heartbeat has been heard.

Nothing here does I/O or knows asyncio. Policies are plugins (:class:`PlacementPolicy`),
registered by name in :data:`POLICIES` or through the ``iot_gateway.placement_policies``
entry-point group (a class or factory taking the :class:`RegionsSection`);
:func:`build_placement` makes one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib.metadata import entry_points
from typing import Annotated, Literal, Protocol, runtime_checkable

from msgspec import Meta, Struct

from policies.plugins import build_named

__all__ = [
    "ENTRY_POINT_GROUP",
    "POLICIES",
    "GlobalSpreadPolicy",
    "LinkSpec",
    "LocalFirstPolicy",
    "Placement",
    "PlacementPolicy",
    "RegionSpec",
    "RegionState",
    "RegionsSection",
    "ResidencyRule",
    "Topology",
    "build_placement",
    "check_regions",
    "register_placement",
]

ENTRY_POINT_GROUP = "iot_gateway.placement_policies"

CACHE_LIMIT = 65_536
"""Cached (tenant, class, here) entries before the cache starts afresh: bounded memory
against an unbounded tenant population, at the price of recomputing now and then."""

Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]
PolicyName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]
AmqpName = Annotated[str, Meta(min_length=1, max_length=255)]
NonNegFloat = Annotated[float, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Glob = Annotated[str, Meta(min_length=1, max_length=255)]


# --------------------------------------------------------------------------- config


class RegionSpec(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[[regions.regions]]``: one region."""

    name: Name
    capacity_per_s: NonNegFloat = 0.0
    """Messages/s the region sustains; 0: not known (never "full" by itself)."""


class LinkSpec(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[[regions.links]]``: the link between two regions (symmetric)."""

    between: tuple[str, str]
    cost_per_gb: NonNegFloat = 0.0
    """What moving a GB over this link costs (placement minimises it)."""
    latency_ms: NonNegFloat = 0.0


class ResidencyRule(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[[regions.residency]]``: where matching data may be processed or stored."""

    tenants: list[Glob] = []
    """fnmatch globs (case-sensitive); empty: any tenant."""
    device_classes: list[Glob] = []
    """Device classes (the data class), fnmatch globs; empty: any."""
    allowed: Annotated[list[str], Meta(min_length=1)]
    """The regions the data may be processed or stored in."""

    def matches(self, tenant: str, device_class: str) -> bool:
        return ((not self.tenants or any(fnmatchcase(tenant, g) for g in self.tenants))
                and (not self.device_classes
                     or any(fnmatchcase(device_class, g) for g in self.device_classes)))


class RegionsSection(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[regions]``: the topology, residency rules and how placement talks to the others."""

    regions: list[RegionSpec] = []
    """Empty: regions off (single-region behaviour, nothing changes)."""
    links: list[LinkSpec] = []
    """A pair without a link costs ``default_cost_per_gb``, its latency unknown."""
    default_cost_per_gb: NonNegFloat = 0.02
    residency: list[ResidencyRule] = []
    """First matching rule wins; none matches: anywhere."""
    placement: PolicyName = "local-first"
    """``local-first``, ``global-spread`` or a plugin (``iot_gateway.placement_policies``)."""
    exchange: AmqpName = "iotgw.regions"
    """Direct exchange; routing key = region name."""
    queue: AmqpName = "iotgw.region.{region}"
    """Each region's work queue; must contain ``{region}``."""
    heartbeat_interval_s: PositiveFloat = 1.0
    down_after_missed: Annotated[int, Meta(ge=1)] = 3
    """A region whose heartbeats stop for this many intervals is down."""
    spool_retry_s: PositiveFloat = 1.0
    max_spooled: Annotated[int, Meta(ge=1)] = 1_000_000

    def __post_init__(self) -> None:
        # Messages name the field relative to the section; gateway.config's format_error
        # prefixes "regions." when the section is decoded inside the whole config.
        names: set[str] = set()
        for i, spec in enumerate(self.regions):
            if spec.name in names:
                raise ValueError(f"regions[{i}].name: duplicate region {spec.name!r}")
            names.add(spec.name)
        known = ", ".join(sorted(names)) or "none configured"

        def check_known(place: str, name: str) -> None:
            if name not in names:
                raise ValueError(f"{place}: {name!r} is not a region (known: {known})")

        pairs: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            a, b = link.between
            check_known(f"links[{i}].between", a)
            check_known(f"links[{i}].between", b)
            if a == b:
                raise ValueError(f"links[{i}].between: a link from {a!r} to itself")
            pair = frozenset(link.between)
            if pair in pairs:
                raise ValueError(f"links[{i}].between: a second link between {a!r}"
                                 f" and {b!r}")
            pairs.add(pair)
        for i, rule in enumerate(self.residency):
            for name in rule.allowed:
                check_known(f"residency[{i}].allowed", name)
        try:
            formatted = self.queue.format(region="\0")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"queue: {self.queue!r} has an unknown or bad field {err}"
                             f" (known: region)") from None
        if "\0" not in formatted:
            raise ValueError(f"queue: {self.queue!r} must contain {{region}}"
                             f" (one queue per region)")

    @property
    def enabled(self) -> bool:
        return bool(self.regions)

    def queue_for(self, region: str) -> str:
        return self.queue.format(region=region)


def check_regions(section: RegionsSection, region: str) -> None:
    """What the section alone cannot check: this gateway's region is one of the configured
    ones (when any are), and the placement policy exists. ValueError names the place."""
    if section.regions and region not in {spec.name for spec in section.regions}:
        known = ", ".join(spec.name for spec in section.regions)
        raise ValueError(f"gateway.region: {region!r} is not one of regions.regions"
                         f" ({known})")
    build_placement(section)


# --------------------------------------------------------------------------- states


@dataclass(frozen=True, slots=True)
class RegionState:
    """What the runtime knows about a region right now."""

    name: str
    up: bool
    """Heartbeats arriving and the link to it working."""
    saturated: bool
    """It said it has no room (its backlog past its overflow threshold)."""


@dataclass(frozen=True, slots=True)
class Placement:
    action: Literal["local", "forward", "spool"]
    region: str
    """Where it is processed: here (local), the target (forward), "" (spool)."""
    reason: str
    """Short, from a small set per rule, for audit summaries."""


@runtime_checkable
class PlacementPolicy(Protocol):
    name: str

    def place(self, tenant: str, device_class: str, here: str, local_saturated: bool,
              regions: Mapping[str, RegionState]) -> Placement: ...


# --------------------------------------------------------------------------- topology


class Topology:
    """The section, indexed for the hot path: residency per (tenant, class), link cost and
    latency per pair (symmetric; a == b: 0)."""

    __slots__ = ("_allowed", "_cost", "_latency", "default_cost_per_gb", "names", "rules",
                 "section")

    def __init__(self, section: RegionsSection) -> None:
        self.section = section
        self.names: tuple[str, ...] = tuple(spec.name for spec in section.regions)
        self.rules: tuple[ResidencyRule, ...] = tuple(section.residency)
        self.default_cost_per_gb = section.default_cost_per_gb
        self._cost: dict[tuple[str, str], float] = {}
        self._latency: dict[tuple[str, str], float] = {}
        for link in section.links:
            a, b = link.between
            self._cost[a, b] = self._cost[b, a] = link.cost_per_gb
            self._latency[a, b] = self._latency[b, a] = link.latency_ms
        self._allowed: dict[tuple[str, str], frozenset[str] | None] = {}

    def rule_for(self, tenant: str, device_class: str) -> ResidencyRule | None:
        """The first residency rule that matches, if any."""
        for rule in self.rules:
            if rule.matches(tenant, device_class):
                return rule
        return None

    def allowed(self, tenant: str, device_class: str) -> frozenset[str] | None:
        """The regions this data may be processed or stored in; None: anywhere."""
        key = (tenant, device_class)
        try:
            return self._allowed[key]
        except KeyError:
            pass
        rule = self.rule_for(tenant, device_class)
        allowed = None if rule is None else frozenset(rule.allowed)
        if len(self._allowed) >= CACHE_LIMIT:
            self._allowed.clear()
        self._allowed[key] = allowed
        return allowed

    def cost(self, a: str, b: str) -> float:
        """Per GB from a to b: 0 within a region, the link's, else the default."""
        if a == b:
            return 0.0
        return self._cost.get((a, b), self.default_cost_per_gb)

    def latency_ms(self, a: str, b: str) -> float:
        """0 within a region, the link's, else ``math.inf`` (unknown: sorted last)."""
        if a == b:
            return 0.0
        return self._latency.get((a, b), math.inf)

    def cheapest(self, here: str, candidates: Iterable[str]) -> list[str]:
        """The candidates, cheapest from ``here`` first: by cost, then latency, then name."""
        return sorted(candidates,
                      key=lambda name: (self.cost(here, name), self.latency_ms(here, name), name))


# --------------------------------------------------------------------------- policies


def _describe(allowed: frozenset[str]) -> str:
    return ",".join(sorted(allowed))


@dataclass(frozen=True, slots=True)
class _Route:
    """Everything about (tenant, class, here) that does not depend on region states."""

    here_allowed: bool
    local: Placement
    """Here, reason "local"."""
    local_full: Placement
    """Here although saturated: nowhere else allowed has room."""
    targets: tuple[Placement, ...]
    """Forwards to the other allowed regions, cheapest first (reason says why)."""
    targets_full: tuple[Placement, ...]
    """The same, for when every one with a heartbeat is saturated (here not allowed)."""
    spool: Placement


class LocalFirstPolicy:
    """Here when allowed and with room; else the cheapest allowed region with room; spool
    only what may not stay when nothing allowed is up."""

    name = "local-first"

    def __init__(self, section: RegionsSection) -> None:
        self.topology = Topology(section)
        self._routes: dict[tuple[str, str, str], _Route] = {}

    def route(self, tenant: str, device_class: str, here: str) -> _Route:
        key = (tenant, device_class, here)
        route = self._routes.get(key)
        if route is None:
            route = self._build(tenant, device_class, here)
            if len(self._routes) >= CACHE_LIMIT:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _build(self, tenant: str, device_class: str, here: str) -> _Route:
        topo = self.topology
        allowed = topo.allowed(tenant, device_class)
        if allowed is None:
            here_allowed = True
            others: Iterable[str] = (n for n in topo.names if n != here)
            why = f"{here} saturated"
        elif here in allowed:
            here_allowed = True
            others = (n for n in allowed if n != here)
            why = f"{here} saturated"
        else:
            here_allowed = False
            others = allowed
            why = f"residency: {_describe(allowed)} only"
        ordered = topo.cheapest(here, others)
        spool_why = (f"residency: {_describe(allowed)} only; none up" if allowed is not None
                     else "none up")
        return _Route(
            here_allowed=here_allowed,
            local=Placement("local", here, "local"),
            local_full=Placement("local", here, f"{here} saturated; no room elsewhere"),
            targets=tuple(Placement("forward", n, why) for n in ordered),
            targets_full=tuple(Placement("forward", n, f"{why}; all saturated")
                               for n in ordered),
            spool=Placement("spool", "", spool_why),
        )

    def place(self, tenant: str, device_class: str, here: str, local_saturated: bool,
              regions: Mapping[str, RegionState]) -> Placement:
        route = self.route(tenant, device_class, here)
        if route.here_allowed and not local_saturated:
            return route.local
        fallback = -1
        for i, target in enumerate(route.targets):
            state = regions.get(target.region)
            if state is None or not state.up:
                continue
            if not state.saturated:
                return target
            if fallback < 0:
                fallback = i
        if route.here_allowed:
            return route.local_full
        if fallback >= 0:
            return route.targets_full[fallback]
        return route.spool


@dataclass(slots=True)
class _Spread:
    choices: tuple[Placement, ...]
    """Every allowed region (never empty: here when no rule applies), by name."""
    spool: Placement
    turn: int = 0
    """Per (tenant, class, here): one shared counter would bias interleaved streams."""


class GlobalSpreadPolicy:
    """The naive global balancer (benchmark peer): round-robin over every allowed region,
    here included, regardless of origin and cost; down regions skipped; residency kept."""

    name = "global-spread"

    def __init__(self, section: RegionsSection) -> None:
        self.topology = Topology(section)
        self._routes: dict[tuple[str, str, str], _Spread] = {}

    def _build(self, tenant: str, device_class: str, here: str) -> _Spread:
        allowed = self.topology.allowed(tenant, device_class)
        if allowed is None:
            names = sorted(set(self.topology.names) | {here})
            spool = Placement("spool", "", "none up")
        else:
            names = sorted(allowed)
            spool = Placement("spool", "", f"residency: {_describe(allowed)} only; none up")
        return _Spread(tuple(Placement("local", n, "spread") if n == here
                             else Placement("forward", n, "spread") for n in names), spool)

    def place(self, tenant: str, device_class: str, here: str, local_saturated: bool,
              regions: Mapping[str, RegionState]) -> Placement:
        key = (tenant, device_class, here)
        route = self._routes.get(key)
        if route is None:
            route = self._build(tenant, device_class, here)
            if len(self._routes) >= CACHE_LIMIT:
                self._routes.clear()
            self._routes[key] = route
        choices = route.choices
        count = len(choices)
        start = route.turn
        route.turn = (start + 1) % count
        for step in range(count):
            choice = choices[(start + step) % count]
            if choice.action == "local":
                return choice
            state = regions.get(choice.region)
            if state is not None and state.up:
                return choice
        return route.spool


# --------------------------------------------------------------------------- registry

PlacementFactory = Callable[[RegionsSection], PlacementPolicy]

POLICIES: dict[str, PlacementFactory] = {
    "local-first": LocalFirstPolicy,
    "global-spread": GlobalSpreadPolicy,
}
"""Placement factories by name: the built-ins, in-process registrations, entry points."""


def register_placement(name: str, factory: PlacementFactory) -> None:
    POLICIES[name] = factory


def build_placement(section: RegionsSection) -> PlacementPolicy:
    """The policy ``section.placement`` names, made from the section; ValueError if unknown."""
    return build_named("regions.placement", section.placement, section, POLICIES, ENTRY_POINT_GROUP,
                       PlacementPolicy, "`name` and `place(...)`", entry_points)
