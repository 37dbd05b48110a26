"""Measure the write-ahead log: ``python -m gateway._wal_bench [--seconds S] [--rate R]``.

For fsync on and off, on uvloop, with batches of ``--batch`` envelopes of 100-byte payloads:

- saturated: a producer appends as fast as it can while at most ``--window`` records wait
  for their ``done`` (as many clients' receive-maximum would allow), yielding to the loop
  after each batch and retiring each batch once durable: records made durable per second,
  batches per group commit, and the CPU ``append`` costs per record. (Its latency is only
  window / throughput, so it is not reported.)
- paced: the same at a steady ``--rate`` records/s: commit latency (``append`` to ``done``)
  of a batch, p50 / p99 / max.
- the peer, measured in the same run: the same records (same encoding) written with one
  write (+ fsync) per batch, no group commit, and the ratio of the throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import uvloop

from gateway.config import WALSection
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from gateway.wal import WriteAheadLog, encode_appends


def make_batches(count: int, size: int) -> list[list[Envelope]]:
    payload = os.urandom(100)
    now = time.time()
    return [[Envelope(f"gw-1-bench-{b}-{i}", f"dev-{i % 500:05d}", "acme", "premium",
                      "eu-west", f"telemetry/dev-{i % 500:05d}/reading", payload,
                      time.monotonic_ns(), now, "mqtt", 1, "thermometer")
             for i in range(size)] for b in range(count)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run_paced(directory: Path, fsync: bool, seconds: float, batch: int,
                    rate: float) -> dict[str, float]:
    metrics = Metrics()
    wal = WriteAheadLog(directory, WALSection(fsync=fsync), metrics)
    wal.recover()
    pool = make_batches(max(64, int(rate * 0.1 / batch)), batch)  # ≥ 100 ms of traffic
    latencies: list[float] = []

    def done_for(envs: list[Envelope], started: float) -> Callable[[OSError | None], None]:
        def done(error: OSError | None) -> None:
            assert error is None, error
            latencies.append(time.perf_counter() - started)
            wal.retire([e.wal_seq for e in envs])
        return done

    start = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - start < seconds:
        for _ in range(int((now - start) * rate / batch) - sent):
            envs = pool[sent % len(pool)]
            wal.append(envs, done_for(envs, time.perf_counter()))
            sent += 1
        await asyncio.sleep(0.001)  # an idle loop waits on its sockets
    await wal.close()
    return {"p50_ms": _percentile(latencies, 0.50) * 1e3,
            "p99_ms": _percentile(latencies, 0.99) * 1e3,
            "max_ms": max(latencies, default=0.0) * 1e3,
            "records_per_s": sent * batch / seconds,
            "fsync_p50_ms": _histogram_quantile(metrics, "iotgw_wal_fsync_seconds", 0.5) * 1e3,
            "fsync_p99_ms": _histogram_quantile(metrics, "iotgw_wal_fsync_seconds", 0.99) * 1e3}


def _histogram_quantile(metrics: Metrics, name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of a histogram."""
    buckets = [(float(s.labels["le"]), s.value) for family in metrics.registry.collect()
               if family.name == name for s in family.samples if s.name == name + "_bucket"]
    total = buckets[-1][1] if buckets else 0.0
    for bound, cumulative in buckets:
        if total and cumulative >= q * total:
            return bound
    return 0.0


async def run_wal(directory: Path, fsync: bool, seconds: float, batch: int,
                  window: int) -> dict[str, float]:
    metrics = Metrics()
    wal = WriteAheadLog(directory, WALSection(fsync=fsync), metrics)
    wal.recover()
    free = deque(make_batches(window // batch, batch))
    latencies: list[float] = []
    durable = 0
    room = asyncio.Event()
    append_seconds = 0.0
    appended = 0

    def done_for(envs: list[Envelope], started: float) -> Callable[[OSError | None], None]:
        def done(error: OSError | None) -> None:
            nonlocal durable
            assert error is None, error
            latencies.append(time.perf_counter() - started)
            durable += len(envs)
            wal.retire([e.wal_seq for e in envs])
            free.append(envs)
            room.set()
        return done

    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if not free:
            room.clear()
            await room.wait()
            continue
        envs = free.popleft()
        t0 = time.perf_counter()
        wal.append(envs, done_for(envs, t0))
        append_seconds += time.perf_counter() - t0
        appended += len(envs)
        await asyncio.sleep(0)  # a loop turn, as between two socket reads
    while free.__len__() < window // batch:
        room.clear()
        await room.wait()
    elapsed = time.perf_counter() - start
    await wal.close()
    sample = metrics.registry.get_sample_value
    commits = sample("iotgw_wal_commits_total") or 0.0
    return {
        "records_per_s": durable / elapsed,
        "append_ns_per_record": append_seconds / max(1, appended) * 1e9,
        "batches_per_commit": len(latencies) / max(1.0, commits),
        "fsyncs": sample("iotgw_wal_fsync_seconds_count") or 0.0,
    }


def run_per_batch_fsync(directory: Path, fsync: bool, seconds: float,
                        batch: int) -> dict[str, float]:
    """The peer: the same records written with a write (+ fsync) per batch."""
    batches = make_batches(16, batch)
    seq = 1
    fd = os.open(directory / "per-batch.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    latencies: list[float] = []
    records = 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            envs = batches[len(latencies) % len(batches)]
            t0 = time.perf_counter()
            data = bytearray()
            seq = encode_appends(data, envs, seq)
            os.write(fd, data)
            if fsync:
                os.fsync(fd)
            latencies.append(time.perf_counter() - t0)
            records += len(envs)
    finally:
        os.close(fd)
    return {"records_per_s": records / (time.perf_counter() - start),
            "p50_ms": _percentile(latencies, 0.5) * 1e3,
            "p99_ms": _percentile(latencies, 0.99) * 1e3}


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if str(path).startswith(point) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a temporary directory under the cwd)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=100, help="envelopes per append")
    parser.add_argument("--window", type=int, default=20_000,
                        help="most records waiting for their done() at once (saturated run)")
    parser.add_argument("--rate", type=float, default=200_000,
                        help="records/s offered in the paced run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wal-bench-", dir=args.dir or Path.cwd()))
    print(f"writing under {root} ({filesystem_of(root.resolve())}), batches of {args.batch} "
          f"envelopes with 100-byte payloads, window {args.window} records, "
          f"{args.seconds:g} s per run")
    try:
        for fsync in (True, False):
            ours = uvloop.run(run_wal(root / f"saturated-{fsync}", fsync, args.seconds,
                                      args.batch, args.window))
            paced = uvloop.run(run_paced(root / f"paced-{fsync}", fsync, args.seconds,
                                         args.batch, args.rate))
            peer = run_per_batch_fsync(root, fsync, args.seconds, args.batch)
            print(f"\nfsync {'on' if fsync else 'off'}:")
            print(f"  saturated: {ours['records_per_s']:>10,.0f} records/s durable, "
                  f"{ours['batches_per_commit']:.0f} batches per commit, "
                  f"{ours['fsyncs']:.0f} fsyncs; append() {ours['append_ns_per_record']:.0f} "
                  f"ns/record on the loop")
            print(f"  paced at {paced['records_per_s']:,.0f} records/s: commit latency "
                  f"p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms, "
                  f"max {paced['max_ms']:.2f} ms"
                  + (f" (fsync p50 ≤ {paced['fsync_p50_ms']:.2f} ms, p99 ≤ "
                     f"{paced['fsync_p99_ms']:.2f} ms)" if fsync else ""))
            print(f"  peer, 1 write{' + fsync' if fsync else ''} per batch: "
                  f"{peer['records_per_s']:>10,.0f} records/s, latency p50 "
                  f"{peer['p50_ms']:.2f} ms, p99 {peer['p99_ms']:.2f} ms (blocking the loop)")
            print(f"  group commit / peer: {ours['records_per_s'] / peer['records_per_s']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
