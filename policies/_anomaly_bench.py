"""Anomaly triage benchmark: per-device memory and checks/s (``python -m policies._anomaly_bench``).

Memory: tracemalloc around creating N device ids and one ``check`` per device, with two
stateful detectors (zscore + silence). Counted twice: all in (the id strings too, as if
only the detector kept them alive) and state only (ids owned elsewhere, e.g. the registry).
Speed: ``check`` on the no-anomaly path, on the anomaly path (threshold firing, suppressed
and not), and a dict lookup as the peer to compare against.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Callable

from policies.anomaly import AnomalyDetector, AnomalySection, Detector


def _detector() -> AnomalyDetector:
    return AnomalyDetector(AnomalySection(detectors=[
        Detector(name="temp-z", kind="zscore", field="t", min_samples=5),
        Detector(name="gone", kind="silence", silent_s=300),
    ]))


def memory(n: int) -> tuple[float, float]:
    data = {"t": 21.5}
    tracemalloc.start()
    det = _detector()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        det.check(f"sensor-{i:07d}", data, now=1.0)
    all_in = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()

    ids = [f"sensor-{i:07d}" for i in range(n)]
    tracemalloc.start()
    det = _detector()
    base = tracemalloc.get_traced_memory()[0]
    for device in ids:
        det.check(device, data, now=1.0)
    state_only = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    return all_in, state_only


def speed(devices: int, n: int) -> dict[str, float]:
    det = _detector()
    ids = [f"sensor-{i:07d}" for i in range(devices)]
    for device in ids:
        for k in range(6):
            det.check(device, {"t": 21.0 + k % 2}, now=float(k))
    normal = {"t": 21.4}
    out: dict[str, float] = {}

    def loop(check: Callable[[str], object], label: str) -> None:
        t0 = time.perf_counter()
        for i in range(n):
            check(ids[i % devices])
        out[label] = n / (time.perf_counter() - t0)

    loop(lambda d: d, "peer: bare loop + lambda call")
    slots = det._slots
    loop(lambda d: slots.get(d), "peer: one dict lookup")
    loop(lambda d: det.check(d, normal, "", "", 10.0), "zscore+silence, no anomaly")
    none = AnomalyDetector(AnomalySection(detectors=[
        Detector(name="m", kind="threshold", field="t", above=1, device_class="meter")]))
    loop(lambda d: none.check(d, normal, "sensor", "", 10.0), "no matching rule")
    hot = AnomalyDetector(AnomalySection(detectors=[
        Detector(name="hot", kind="threshold", field="t", above=1, suppress_s=0)]))
    loop(lambda d: hot.check(d, normal, "", "", 10.0), "anomaly raised every time")
    supp = AnomalyDetector(AnomalySection(detectors=[
        Detector(name="hot", kind="threshold", field="t", above=1, suppress_s=60)]))
    loop(lambda d: supp.check(d, normal, "", "", 10.0), "anomaly, suppressed duplicate")
    silence = det._silence[0]
    silence.next_due = 0.0  # force a full scan that finds nothing overdue
    t0 = time.perf_counter()
    det.check_silence(11.0)
    out[f"check_silence scan, {devices} devices, none due"] = 1 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    det.check_silence(10_000.0)
    out[f"check_silence, {devices} devices all gone silent"] = 1 / (time.perf_counter() - t0)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    all_in, state_only = memory(n)
    print(f"{n} devices, zscore + silence:")
    print(f"  bytes/device all in (ids, dict entry, slot int, slabs): {all_in:7.1f}")
    print(f"  bytes/device state only (ids owned elsewhere):          {state_only:7.1f}")
    print(f"  → {all_in * n / 2**20:.0f} MiB for {n} devices")
    for label, per_s in speed(min(n, 100_000), 1_000_000).items():
        print(f"  {label:48s} {per_s:12,.0f} /s")


if __name__ == "__main__":
    main()
