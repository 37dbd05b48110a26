"""The device registry: TOML and CSV files, lookups, and errors that name file and line."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.registry
from gateway.errors import ConfigError
from gateway.registry import DeviceInfo, DeviceRegistry

TOML = """\
[devices."dev-1"]
tenant = "acme"
tier = "critical"
device_class = "thermometer"
region = "eu"
site = "plant-3"
firmware = 12
calibrated = true

[devices.dev-2]
tenant = "globex"
model = "TX-9"
"""

CSV = """\
device,tenant,tier,device_class,region,site,model
dev-1,acme,critical,thermometer,eu,plant-3,TX-1
dev-2,acme,standard,meter,us,,TX-2

"dev,3",globex,standard,meter,us,"plant, 4"
dev-4,globex,standard,meter,us
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_devices_with_extra_attributes(tmp_path: Path) -> None:
    registry = DeviceRegistry.load(write(tmp_path, "devices.toml", TOML))
    assert len(registry) == 2
    assert registry.lookup("dev-1") == DeviceInfo(
        tenant="acme", tier="critical", device_class="thermometer", region="eu",
        attributes={"site": "plant-3", "firmware": "12", "calibrated": "true"})
    # Keys left out are empty: classification applies its defaults.
    assert registry.lookup("dev-2") == DeviceInfo(
        tenant="globex", tier="", device_class="", region="", attributes={"model": "TX-9"})
    assert registry.lookup("nope") is None
    assert "dev-1" in registry and "nope" not in registry
    assert sorted(registry) == ["dev-1", "dev-2"]
    assert registry.attribute_names == ("calibrated", "firmware", "model", "site")


def test_csv_devices_with_extra_columns(tmp_path: Path) -> None:
    registry = DeviceRegistry.load(write(tmp_path, "devices.csv", CSV))
    assert len(registry) == 4
    assert registry.lookup("dev-1") == DeviceInfo(
        tenant="acme", tier="critical", device_class="thermometer", region="eu",
        attributes={"site": "plant-3", "model": "TX-1"})
    # An empty cell is no attribute; quoted commas are values; short rows lack the rest.
    assert registry.lookup("dev-2").attributes == {"model": "TX-2"}  # type: ignore[union-attr]
    assert registry.lookup("dev,3").attributes == {"site": "plant, 4"}  # type: ignore[union-attr]
    assert registry.lookup("dev-4") == DeviceInfo(
        tenant="globex", tier="standard", device_class="meter", region="us")


def test_record_is_stored_once_and_shares_strings(tmp_path: Path) -> None:
    registry = DeviceRegistry.load(write(tmp_path, "devices.csv", CSV))
    first = registry.record("dev-1")
    assert first is not None and first is registry.record("dev-1")
    assert first.tenant is registry.record("dev-2").tenant  # type: ignore[union-attr]
    assert registry.attributes(first) == {"site": "plant-3", "model": "TX-1"}
    assert registry.record("nope") is None
    # The public DeviceInfo is a fresh copy: changing it changes nothing stored.
    info = registry.lookup("dev-1")
    assert info is not None
    info.attributes["site"] = "elsewhere"
    assert registry.lookup("dev-1").attributes["site"] == "plant-3"  # type: ignore[union-attr]


def test_empty_and_in_memory_registries() -> None:
    empty = DeviceRegistry.empty()
    assert len(empty) == 0 and empty.lookup("x") is None
    info = DeviceInfo(tenant="t", tier="critical", device_class="c", region="r",
                      attributes={"site": "s"})
    plain = DeviceInfo(tenant="t", tier="standard", device_class="c", region="r")
    registry = DeviceRegistry.from_devices({"a": info, "b": plain})
    assert registry.lookup("a") == info
    assert registry.lookup("b") == plain
    assert "2 devices" in repr(registry)
    no_attributes = DeviceRegistry.from_devices({"b": plain})
    assert no_attributes.lookup("b") == plain


def test_high_cardinality_columns_load_correctly(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.registry, "_DEDUP_LIMIT", 3)
    rows = "".join(f"d{i},t,standard,c,r,SN{i},site-{i % 2}\n" for i in range(20))
    path = write(tmp_path, "devices.csv",
                 "device,tenant,tier,device_class,region,serial,site\n" + rows)
    registry = DeviceRegistry.load(path)
    for i in range(20):
        assert registry.lookup(f"d{i}").attributes == {  # type: ignore[union-attr]
            "serial": f"SN{i}", "site": f"site-{i % 2}"}


def test_tiers_are_checked_when_given(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "devices.csv", CSV)
    assert len(DeviceRegistry.load(csv_path, tiers=["critical", "standard"])) == 4
    with pytest.raises(ConfigError, match=r"devices\.csv:3: unknown tier 'standard' "
                                          r"\(known: critical\)"):
        DeviceRegistry.load(csv_path, tiers=["critical"])
    toml_path = write(tmp_path, "devices.toml", TOML)
    with pytest.raises(ConfigError, match=r"devices\.dev-1\.tier: unknown tier 'critical'"):
        DeviceRegistry.load(toml_path, tiers=["standard"])


@pytest.mark.parametrize(("text", "error"), [
    ("", r"devices\.csv: empty file"),
    ("device,tenant,tier\n", r"devices\.csv:1: expected header device,tenant,tier,"),
    ("device,tenant,tier,device_class,region,a,a\n", r"devices\.csv:1: extra column names"),
    ("device,tenant,tier,device_class,region\nd,t,standard,c,r\nd2,t,standard\n",
     r"^registry .*devices\.csv:3: expected 5\+ columns, got 3$"),
    ("device,tenant,tier,device_class,region\nd,t,standard,c,r,x\n",
     r"devices\.csv:2: expected at most 5 columns, got 6"),
    ("device,tenant,tier,device_class,region\n,t,standard,c,r\n",
     r"devices\.csv:2: empty device id"),
    ("device,tenant,tier,device_class,region\nd,t,s,c,r\n\nd,t,s,c,r\n",
     r"devices\.csv:4: duplicate device 'd'"),
    ('device,tenant,tier,device_class,region\n"d,t,s,c,r\n', r"devices\.csv:2: expected 5\+"),
    ("device,tenant,tier,device_class,region\nd,t,s,c," + "r" * 200_000 + "\n",
     r"devices\.csv:2: field larger than field limit"),
])
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path, "devices.csv", text)
    with pytest.raises(ConfigError, match=error):
        DeviceRegistry.load(path)


@pytest.mark.parametrize(("text", "error"), [
    ("devices = 3", r"devices\.toml: devices: expected a table, got integer"),
    ("[other]\nx = 1", r"devices\.toml: unknown key 'other'"),
    ("[devices]\nd = 1", r"devices\.toml: devices\.d: expected a table, got integer"),
    ('[devices.d]\ntier = 1', r"devices\.toml: devices\.d\.tier: expected string, got integer"),
    ('[devices."a b"]\nloc = [1, 2]',
     r'devices\.toml: devices\."a b"\.loc: expected a string, number or boolean attribute, '
     r"got array"),
    ("[devices\n", r"devices\.toml: .*line 1"),
])
def test_toml_errors_name_the_place(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path, "devices.toml", text)
    with pytest.raises(ConfigError, match=error):
        DeviceRegistry.load(path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"registry .*missing\.csv: cannot read: No such file"):
        DeviceRegistry.load(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match=r"devices\.json: unsupported format '\.json'"):
        DeviceRegistry.load(write(tmp_path, "devices.json", "{}"))
    with pytest.raises(ConfigError, match=r"devices: unsupported format '\(none\)'"):
        DeviceRegistry.load(tmp_path / "devices")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"device,tenant,tier,device_class,region\nd\xe9,t,s,c,r\n")
    with pytest.raises(ConfigError, match=r"latin1\.csv: not UTF-8"):
        DeviceRegistry.load(bad)
    empty_toml = write(tmp_path, "empty.toml", "")
    assert len(DeviceRegistry.load(empty_toml)) == 0


_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00\r"),
                max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(
    _text.filter(bool),
    st.tuples(_text, _text, _text, _text, st.lists(_text, min_size=2, max_size=2)),
    max_size=20))
def test_csv_round_trip(devices: dict[str, tuple[str, str, str, str, list[str]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "devices.csv"
        with open(path, "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["device", "tenant", "tier", "device_class", "region", "site",
                             "model"])
            for device, (tenant, tier, device_class, region, extra) in devices.items():
                writer.writerow([device, tenant, tier, device_class, region, *extra])
        registry = DeviceRegistry.load(path)
    assert len(registry) == len(devices)
    for device, (tenant, tier, device_class, region, extra) in devices.items():
        expected = {k: v for k, v in zip(("site", "model"), extra, strict=True) if v}
        assert registry.lookup(device) == DeviceInfo(
            tenant=tenant, tier=tier, device_class=device_class, region=region,
            attributes=expected)


def test_load_benchmark_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke run of ``python -m gateway._registry_bench`` on a small file (not a benchmark)."""
    from gateway import _registry_bench

    path = tmp_path / "devices.csv"
    _registry_bench.generate(path, 50, serial=False)
    assert _registry_bench.measure(path)["devices"] == 50
    monkeypatch.setattr("sys.argv", ["_registry_bench", "--rows", "300", "--serial"])
    _registry_bench.main()
    out = capsys.readouterr().out
    assert "loaded 300 devices" in out and "target" in out


def _drive(loading: Any) -> DeviceRegistry:
    while True:
        try:
            next(loading)
        except StopIteration as done:
            return cast(DeviceRegistry, done.value)


def test_a_rebuild_says_which_devices_changed(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    rows = [f"dev-{i},acme,standard,meter,eu" for i in range(1000)]
    path.write_text("device,tenant,tier,device_class,region\n" + "\n".join(rows) + "\n")
    before = DeviceRegistry.load(path)
    rows[7] = "dev-7,acme,premium,meter,eu"  # changed
    path.write_text("device,tenant,tier,device_class,region\n" + "\n".join(rows)
                    + "\ndev-new,acme,standard,meter,eu\n")  # added
    after = _drive(DeviceRegistry.loading(path, rows_per_step=100, previous=before))
    assert after.changed == {"dev-7", "dev-new"}
    assert after.record("dev-7").tier == "premium"  # type: ignore[union-attr]
    # A removed device: no list of what changed can be trusted; callers forget everything.
    path.write_text("device,tenant,tier,device_class,region\n" + "\n".join(rows[1:]) + "\n")
    assert _drive(DeviceRegistry.loading(path, previous=before)).changed is None


def test_dismantle_empties_a_registry_in_steps(tmp_path: Path) -> None:
    registry = DeviceRegistry.from_devices({
        f"d{i}": DeviceInfo(tenant="t", tier="standard", device_class="c", region="r",
                            attributes={}) for i in range(5000)})
    steps = sum(1 for _ in registry.dismantle(per_step=1000))
    assert steps >= 5 and len(registry) == 0 and registry.record("d1") is None


def test_reloading_an_unchanged_file_with_attributes_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("device,tenant,tier,device_class,region,site\n"
                    + "".join(f"dev-{i},acme,standard,meter,eu,site-{i % 7}\n"
                              for i in range(500)))
    before = DeviceRegistry.load(path)
    assert _drive(DeviceRegistry.loading(path, previous=before)).changed == frozenset()


async def test_a_load_stopped_half_way_frees_its_records_between_loop_turns(
        tmp_path: Path) -> None:
    # A maintenance window that ends mid-rebuild stops the load; what it built (up to a
    # million records) must not be freed in one go while the loop waits.
    import asyncio
    import tracemalloc

    path = tmp_path / "devices.csv"
    path.write_text("device,tenant,tier,device_class,region,serial\n" + "".join(
        f"dev-{i},acme,standard,meter,eu,sn-{i:08d}\n" for i in range(30_000)))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        loading = DeviceRegistry.loading(path, rows_per_step=1000)
        for _ in range(25):  # 25,000 records built
            next(loading)
        built = tracemalloc.get_traced_memory()[0] - base
        loading.close()
        held = [tracemalloc.get_traced_memory()[0] - base]
        for _ in range(40):  # loop turns: other callbacks run between the frees
            await asyncio.sleep(0)
            held.append(tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    assert built > 2_000_000
    assert held[0] > built / 2  # not freed all at once ...
    assert held[-1] < built / 10  # ... but freed within a few loop turns
