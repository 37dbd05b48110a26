"""Measure loading a large device registry: ``python -m gateway._registry_bench [--rows N]``.

Generates a CSV (device,tenant,tier,device_class,region,site,model,firmware[,serial]) with
independently drawn attribute values, so that few rows share their attributes (a harder case
than real fleets, where a site's devices share model and firmware), then loads it in a fresh
interpreter and prints the load time, the resident memory the registry added and the peak.
The target: 1,000,000 devices in ≤ 10 s and ≤ 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(path: Path, rows: int, serial: bool, seed: int = 7) -> None:
    rng = random.Random(seed)
    tenants = [f"tenant-{i:03d}" for i in range(200)]
    tiers = ["critical", "premium", "standard"]
    classes = [f"class-{i:02d}" for i in range(24)]
    regions = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"]
    sites = [f"site-{i:05d}" for i in range(5000)]
    models = [f"model-{i:03d}" for i in range(60)]
    firmware = [f"fw-{a}.{b}.{c}" for a in range(3) for b in range(5) for c in range(4)]
    header = "device,tenant,tier,device_class,region,site,model,firmware"
    with open(path, "w", encoding="utf-8") as out:
        out.write(header + (",serial\n" if serial else "\n"))
        choice = rng.choice
        for i in range(rows):
            line = (f"dev-{i:07d},{choice(tenants)},{choice(tiers)},{choice(classes)},"
                    f"{choice(regions)},{choice(sites)},{choice(models)},{choice(firmware)}")
            if serial:
                line += f",SN{rng.getrandbits(40):012x}"
            out.write(line + "\n")


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - not Linux


def measure(path: Path) -> dict[str, float]:
    """Run in a fresh interpreter: load ``path`` and report time and memory."""
    from gateway.registry import DeviceRegistry

    before = _rss_bytes()
    start = time.perf_counter()
    registry = DeviceRegistry.load(path)
    seconds = time.perf_counter() - start
    after = _rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lookups = list(registry)[:: max(1, len(registry) // 100_000)]
    start = time.perf_counter()
    for device in lookups:
        registry.record(device)
    record_ns = (time.perf_counter() - start) / len(lookups) * 1e9
    start = time.perf_counter()
    for device in lookups:
        registry.lookup(device)
    lookup_ns = (time.perf_counter() - start) / len(lookups) * 1e9
    return {"devices": len(registry), "load_s": seconds, "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20, "registry_mb": (after - before) / 2**20,
            "peak_rss_mb": peak / 2**20, "record_ns": record_ns, "lookup_ns": lookup_ns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--serial", action="store_true",
                        help="add a unique serial-number column (no sharing possible)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "devices.csv"
        start = time.perf_counter()
        generate(path, args.rows, args.serial)
        print(f"generated {args.rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) "
              f"in {time.perf_counter() - start:.1f} s")
        out = subprocess.run([sys.executable, "-m", "gateway._registry_bench", "--measure",
                              str(path)], check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
        figures = json.loads(out.stdout)
    print(f"loaded {figures['devices']:,} devices in {figures['load_s']:.2f} s; "
          f"RSS {figures['rss_before_mb']:.0f} → {figures['rss_after_mb']:.0f} MB "
          f"(registry {figures['registry_mb']:.0f} MB, peak {figures['peak_rss_mb']:.0f} MB); "
          f"record() {figures['record_ns']:.0f} ns, lookup() {figures['lookup_ns']:.0f} ns")
    ok = figures["load_s"] <= 10 and figures["peak_rss_mb"] <= 300
    print("target (≤ 10 s, ≤ 300 MB):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
