"""Regional placement: residency, local first, cheapest failover, saturation, spooling, the
config's checks, plugins and the topology. Pure: no sockets, no clock."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import policies.regions as regions
from gateway.config import format_error
from policies.regions import (
    ENTRY_POINT_GROUP,
    GlobalSpreadPolicy,
    LocalFirstPolicy,
    Placement,
    PlacementPolicy,
    RegionsSection,
    RegionState,
    Topology,
    build_placement,
    check_regions,
    register_placement,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "examples" / "regions.toml"

THREE = """
[[regions]]
name = "eu"
[[regions]]
name = "de"
[[regions]]
name = "us"
[[links]]
between = ["eu", "de"]
cost_per_gb = 0.01
latency_ms = 10
[[links]]
between = ["eu", "us"]
cost_per_gb = 0.05
latency_ms = 80
[[links]]
between = ["de", "us"]
cost_per_gb = 0.05
latency_ms = 90
[[residency]]
tenants = ["health-*"]
allowed = ["eu", "de"]
[[residency]]
tenants = ["bank"]
allowed = ["de"]
[[residency]]
device_classes = ["meter"]
allowed = ["us"]
"""


def load(text: str) -> RegionsSection:
    return msgspec.toml.decode(text, type=RegionsSection)


def states(*down: str, saturated: tuple[str, ...] = (),
           names: tuple[str, ...] = ("eu", "de", "us")) -> dict[str, RegionState]:
    return {n: RegionState(n, up=n not in down, saturated=n in saturated) for n in names}


@pytest.fixture
def policy() -> LocalFirstPolicy:
    made = build_placement(load(THREE))
    assert isinstance(made, LocalFirstPolicy)
    return made


# --------------------------------------------------------------------------- local-first


def test_local_first_when_allowed_and_with_room(policy: LocalFirstPolicy) -> None:
    assert policy.place("anyone", "sensor", "us", False, states()) == Placement(
        "local", "us", "local")
    assert policy.place("health-1", "sensor", "de", False, states()).action == "local"
    # Other regions' states do not matter to local work.
    assert policy.place("health-1", "sensor", "eu", False, states("de", "us")).action == "local"


def test_data_that_may_not_stay_goes_to_the_cheapest_allowed_region(
        policy: LocalFirstPolicy) -> None:
    placed = policy.place("health-1", "sensor", "us", False, states())
    # eu and de cost the same from us (0.05); eu's latency (80) beats de's (90).
    assert placed == Placement("forward", "eu", "residency: de,eu only")
    assert policy.place("bank", "sensor", "eu", False, states()) == Placement(
        "forward", "de", "residency: de only")
    # The first matching rule wins: a health tenant's meter is health data, not a meter.
    assert policy.place("health-1", "meter", "eu", False, states()).action == "local"
    assert policy.place("acme", "meter", "eu", False, states()).region == "us"


def test_failover_goes_to_the_next_cheapest_allowed_region(policy: LocalFirstPolicy) -> None:
    assert policy.place("health-1", "x", "us", False, states("eu")).region == "de"
    assert policy.place("health-1", "x", "us", False,
                        states(saturated=("eu",))) == Placement("forward", "de",
                                                                "residency: de,eu only")


def test_a_saturated_region_forwards_to_the_cheapest_with_room(
        policy: LocalFirstPolicy) -> None:
    placed = policy.place("anyone", "x", "eu", True, states())
    assert placed == Placement("forward", "de", "eu saturated")
    assert policy.place("anyone", "x", "eu", True, states("de")).region == "us"
    assert policy.place("anyone", "x", "eu", True, states(saturated=("de",))).region == "us"


def test_a_saturated_region_keeps_what_may_stay_when_nothing_else_has_room(
        policy: LocalFirstPolicy) -> None:
    # Allowed here, all others down or full: local anyway, never spooled.
    for others in (states("de", "us"), states(saturated=("de", "us")), {}):
        placed = policy.place("anyone", "x", "eu", True, others)
        assert placed == Placement("local", "eu", "eu saturated; no room elsewhere")
    # health data may stay in eu; us has room but is not allowed.
    assert policy.place("health-1", "x", "eu", True, states("de")).action == "local"


def test_spool_only_when_no_allowed_region_is_up(policy: LocalFirstPolicy) -> None:
    assert policy.place("health-1", "x", "us", False, states("eu", "de")) == Placement(
        "spool", "", "residency: de,eu only; none up")
    # Up but saturated: forward (its back-pressure deals with it), not spool.
    placed = policy.place("health-1", "x", "us", False, states(saturated=("eu", "de")))
    assert placed == Placement("forward", "eu", "residency: de,eu only; all saturated")
    # A region the runtime has heard nothing of counts as down.
    assert policy.place("bank", "x", "us", False, {}).action == "spool"


def test_regions_off_is_always_local() -> None:
    policy = build_placement(RegionsSection())
    assert policy.place("t", "c", "local", False, {}) == Placement("local", "local", "local")
    assert policy.place("t", "c", "local", True, {}).action == "local"
    check_regions(RegionsSection(), "anything")


def test_state_changes_take_effect_at_once(policy: LocalFirstPolicy) -> None:
    live = states()
    assert policy.place("health-1", "x", "us", False, live).region == "eu"
    live["eu"] = RegionState("eu", up=False, saturated=False)
    assert policy.place("health-1", "x", "us", False, live).region == "de"
    live["de"] = RegionState("de", up=False, saturated=False)
    assert policy.place("health-1", "x", "us", False, live).action == "spool"
    live["eu"] = RegionState("eu", up=True, saturated=False)
    assert policy.place("health-1", "x", "us", False, live).region == "eu"


def test_placements_are_cached_per_tenant_class_and_origin(policy: LocalFirstPolicy) -> None:
    first = policy.place("health-1", "x", "us", False, states())
    assert policy.place("health-1", "x", "us", False, states()) is first
    assert policy.topology.allowed("health-1", "x") is policy.topology.allowed("health-1", "x")


def test_the_caches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regions, "CACHE_LIMIT", 4)
    policy = LocalFirstPolicy(load(THREE))
    for i in range(20):
        assert policy.place(f"health-{i}", "x", "us", False, states()).region == "eu"
    assert len(policy._routes) <= 4
    assert len(policy.topology._allowed) <= 4


# --------------------------------------------------------------------------- global-spread


def test_global_spread_round_robins_over_the_allowed_regions() -> None:
    policy = build_placement(msgspec.structs.replace(load(THREE), placement="global-spread"))
    assert isinstance(policy, GlobalSpreadPolicy)
    spread = Counter(policy.place("anyone", "x", "eu", False, states()).region
                     for _ in range(300))
    assert spread == {"eu": 100, "de": 100, "us": 100}
    assert {policy.place("anyone", "x", "eu", False, states()).action
            for _ in range(3)} == {"local", "forward"}
    health = Counter(policy.place("health-1", "x", "us", False, states()).region
                     for _ in range(100))
    assert health == {"eu": 50, "de": 50}
    # Down regions are skipped; here is always up; nothing allowed up → spool.
    assert {policy.place("anyone", "x", "eu", False, states("de", "us")).region
            for _ in range(10)} == {"eu"}
    assert policy.place("bank", "x", "us", False, states("de")).action == "spool"


# --------------------------------------------------------------------------- residency


TENANTS = st.sampled_from(["health-1", "health-x", "bank", "acme", "bank-2", ""])
CLASSES = st.sampled_from(["meter", "sensor", "medical", ""])
NAMES = ("eu", "de", "us")


@st.composite
def region_states(draw: st.DrawFn) -> dict[str, RegionState]:
    out = {}
    for name in NAMES:
        if draw(st.booleans()):  # absent sometimes: nothing heard
            out[name] = RegionState(name, up=draw(st.booleans()), saturated=draw(st.booleans()))
    return out


@settings(max_examples=500, deadline=None)
@given(tenant=TENANTS, device_class=CLASSES, here=st.sampled_from(NAMES),
       local_saturated=st.booleans(), live=region_states(),
       name=st.sampled_from(["local-first", "global-spread"]))
def test_residency_is_never_violated(tenant: str, device_class: str, here: str,
                                     local_saturated: bool, live: dict[str, RegionState],
                                     name: str) -> None:
    section = msgspec.structs.replace(load(THREE), placement=name)
    policy = build_placement(section)
    allowed = Topology(section).allowed(tenant, device_class)
    for _ in range(3):  # global-spread moves on each call
        placed = policy.place(tenant, device_class, here, local_saturated, live)
        if placed.action == "spool":
            assert placed.region == ""
            # Spool only when nothing allowed is up, and never what may stay here.
            assert allowed is not None and here not in allowed
            assert not any(live.get(n, RegionState(n, False, False)).up for n in allowed)
            continue
        assert allowed is None or placed.region in allowed
        if placed.action == "local":
            assert placed.region == here
        else:
            assert placed.region != here
            assert live[placed.region].up  # never forwarded where nothing is heard
        if name == "local-first":
            may_stay = allowed is None or here in allowed
            if may_stay and not local_saturated:
                assert placed.action == "local"
            if placed.action == "forward" and not live[placed.region].saturated:
                # The cheapest allowed region with room.
                candidates = [n for n in (allowed or NAMES) if n != here
                              and live.get(n) and live[n].up and not live[n].saturated]
                assert placed.region == Topology(section).cheapest(here, candidates)[0]


# --------------------------------------------------------------------------- topology


def test_topology_costs_are_symmetric_with_defaults() -> None:
    without_de_us = THREE.replace('[[links]]\nbetween = ["de", "us"]\ncost_per_gb = 0.05'
                                  '\nlatency_ms = 90\n', "")
    assert without_de_us != THREE
    topo = Topology(load("default_cost_per_gb = 0.03\n" + without_de_us))
    assert topo.cost("eu", "de") == topo.cost("de", "eu") == 0.01
    assert topo.latency_ms("eu", "us") == topo.latency_ms("us", "eu") == 80
    assert topo.cost("de", "us") == topo.cost("us", "de") == 0.03
    assert topo.latency_ms("de", "us") == float("inf")
    assert topo.cost("eu", "eu") == topo.latency_ms("eu", "eu") == 0
    assert topo.cost("x", "y") == 0.03  # unknown pairs: the default


def test_cheapest_orders_by_cost_then_latency_then_name() -> None:
    topo = Topology(load(THREE))
    assert topo.cheapest("us", ["de", "eu", "us"]) == ["us", "eu", "de"]
    assert topo.cheapest("eu", ["us", "de"]) == ["de", "us"]
    flat = Topology(load('[[regions]]\nname = "b"\n[[regions]]\nname = "a"\n'
                         '[[regions]]\nname = "c"\n'))
    assert flat.cheapest("c", ["b", "a"]) == ["a", "b"]


def test_residency_globs_and_first_match() -> None:
    topo = Topology(load(THREE))
    assert topo.allowed("health-7", "anything") == frozenset({"eu", "de"})
    assert topo.allowed("Health-7", "x") is None  # case-sensitive
    assert topo.allowed("bank", "meter") == frozenset({"de"})
    assert topo.allowed("bank2", "meter") == frozenset({"us"})
    assert topo.allowed("acme", "sensor") is None


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("toml", "message"), [
    ('[[regions]]\nname = "a"\n[[regions]]\nname = "a"',
     "regions[1].name: duplicate region 'a'"),
    ('[[regions]]\nname = "a b"', "Expected `str` matching regex"),
    ('[[regions]]\nname = "a"\n[[links]]\nbetween = ["a", "b"]',
     "links[0].between: 'b' is not a region (known: a)"),
    ('[[regions]]\nname = "a"\n[[links]]\nbetween = ["a", "a"]',
     "links[0].between: a link from 'a' to itself"),
    ('[[regions]]\nname = "a"\n[[regions]]\nname = "b"\n[[links]]\nbetween = ["a", "b"]\n'
     '[[links]]\nbetween = ["b", "a"]', "links[1].between: a second link between 'b' and 'a'"),
    ('[[regions]]\nname = "a"\n[[residency]]\nallowed = ["a", "z"]',
     "residency[0].allowed: 'z' is not a region (known: a)"),
    ('[[residency]]\nallowed = ["a"]',
     "residency[0].allowed: 'a' is not a region (known: none configured)"),
    ('[[residency]]\nallowed = []', "Expected `array` of length >= 1"),
    ('[[residency]]\ntenants = ["x"]', "Object missing required field `allowed`"),
    ('[[regions]]\nname = "a"\ncapacity = 5', "Object contains unknown field `capacity`"),
    ('[[regions]]\nname = "a"\ncapacity_per_s = -1', "Expected `float` >= 0"),
    ('[[links]]\nbetween = ["a"]', "Expected `array` of length 2"),
    ('queue = "iotgw.q"', "queue: 'iotgw.q' must contain {region}"),
    ('queue = "iotgw.{node}"', "queue: 'iotgw.{node}' has an unknown or bad field 'node'"),
    ("down_after_missed = 0", "Expected `int` >= 1"),
    ("heartbeat_interval_s = 0", "Expected `float` > 0"),
])
def test_config_errors_name_the_field(toml: str, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        load(toml)
    assert message in str(err.value)


class _Config(msgspec.Struct, forbid_unknown_fields=True):
    regions: RegionsSection = RegionsSection()


def test_errors_inside_the_whole_config_name_the_section() -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.toml.decode('[[regions.links]]\nbetween = ["a", "b"]', type=_Config)
    assert format_error(err.value).startswith("regions.links[0].between: 'a' is not a region")
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.toml.decode('[[regions.regions]]\nname = "a"\nx = 1', type=_Config)
    assert format_error(err.value) == (
        "regions.regions[0]: object contains unknown field `x`")


def test_the_gateways_region_must_be_configured() -> None:
    section = load(THREE)
    check_regions(section, "de")
    with pytest.raises(ValueError, match=r"gateway.region: 'local' is not one of"
                                         r" regions.regions \(eu, de, us\)"):
        check_regions(section, "local")
    with pytest.raises(ValueError, match="unknown policy"):
        check_regions(msgspec.structs.replace(section, placement="nope"), "de")


def test_the_defaults_and_the_example_load() -> None:
    assert load("") == RegionsSection()
    assert not RegionsSection().enabled
    example = msgspec.toml.decode(EXAMPLE.read_bytes())
    gateway_region = "eu-west"
    section = msgspec.convert(example["regions"], RegionsSection)
    assert section.enabled and len(section.regions) == 3 and section.residency
    check_regions(section, gateway_region)
    assert section.queue_for("us-east") == "iotgw.region.us-east"
    policy = build_placement(section)
    assert isinstance(policy, LocalFirstPolicy)
    live = states(names=("eu-west", "eu-central", "us-east"))
    assert policy.place("health-9", "medical", "us-east", False, live).region == "eu-west"
    assert policy.place("bank-de", "x", "eu-west", False, live).region == "eu-central"
    assert policy.place("acme", "sensor", "us-east", False, live).action == "local"


def test_the_example_parses_as_the_whole_config() -> None:
    from gateway.config import Config, parse_config
    if "regions" not in Config.__struct_fields__:
        pytest.skip("[regions] not yet embedded in gateway.config.Config")
    from gateway.config import default_config_path
    base = default_config_path().read_text().replace('region = "local"', 'region = "eu-west"')
    config: Any = parse_config(base + "\n" + EXAMPLE.read_text(), str(EXAMPLE))
    assert config.regions.enabled and config.gateway.region == "eu-west"
    check_regions(config.regions, config.gateway.region)


# --------------------------------------------------------------------------- plugins


class Pinned:
    """A plugin: everything to one region (still a PlacementPolicy)."""

    name = "pinned"

    def __init__(self, section: RegionsSection) -> None:
        self.target = section.regions[0].name if section.regions else "local"

    def place(self, tenant: str, device_class: str, here: str, local_saturated: bool,
              regions: Mapping[str, RegionState]) -> Placement:
        return Placement("local" if here == self.target else "forward", self.target, "pinned")


def test_a_plugin_by_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    class EntryPoint:
        name = "pinned"

        def load(self) -> type[Pinned]:
            return Pinned

    def entry_points(group: str) -> list[EntryPoint]:
        return [EntryPoint()] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(regions, "entry_points", entry_points)
    monkeypatch.setattr(regions, "POLICIES", dict(regions.POLICIES))
    section = msgspec.structs.replace(load(THREE), placement="pinned")
    policy = build_placement(section)
    assert isinstance(policy, PlacementPolicy)
    assert policy.place("t", "c", "us", False, {}) == Placement("forward", "eu", "pinned")
    check_regions(section, "us")

    register_placement("made", lambda s: Pinned(s))
    assert build_placement(msgspec.structs.replace(section, placement="made")).name == "pinned"


def test_an_unknown_or_broken_plugin_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regions, "entry_points", lambda group: [])
    monkeypatch.setattr(regions, "POLICIES", dict(regions.POLICIES))
    with pytest.raises(ValueError, match=r"regions.placement: unknown policy 'local-frist'"
                                         r" \(known: global-spread, local-first\)"):
        build_placement(RegionsSection(placement="local-frist"))
    register_placement("broken", lambda s: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="has no `name` and `place"):
        build_placement(RegionsSection(placement="broken"))


def test_global_spread_is_even_per_stream_when_streams_interleave() -> None:
    policy = GlobalSpreadPolicy(load(THREE))
    health: Counter[str] = Counter()
    for _ in range(100):
        health[policy.place("health-1", "x", "us", False, states()).region] += 1
        policy.place("anyone", "x", "us", False, states())
    assert health == {"eu": 50, "de": 50}
