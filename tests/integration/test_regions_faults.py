"""Regional processing under faults, with three real ``iot-gateway serve`` processes (one per
region) sharing the real RabbitMQ: a region's gateway killed and restarted, a link cut and
healed, a partition isolating one gateway.

The cluster and the load are ``gateway.regions_bench``'s: devices with home regions, one
tenant (``acme-health``) resident in the first region, some of whose devices roam to the
other regions' gateways, so their messages must be forwarded home (or spooled while home is
out of reach). Every message is QoS 1 and carries its device's sequence number; what counts
is what a user sees: every acknowledged message is in exactly one lake (a replay of the same
message id after a kill -9 is the documented at-least-once, which consumers drop by id), no
lake holds data of a tenant that may not be in its region, and each test prints its
detection and recovery times.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.regions_bench import (
    RESIDENT_TENANT,
    Cluster,
    LakeAudit,
    Load,
    Workload,
    WorkloadSpec,
    audit_lakes,
    build_workload,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST, PORT = "127.0.0.1", 5672
HOME = "eu"
"""The resident tenant's only allowed region."""
SPEC = WorkloadSpec(regions=("eu", "us", "ap"), devices_per_region=20, seconds=9.0,
                    rate_per_region=150.0, spike_factor=1.0, roam_share=0.1,
                    resident_share=0.5, resident_roam_share=0.6, connections_per_gateway=2,
                    seed=3)


@pytest.fixture
def workload() -> Workload:
    w = build_workload(SPEC)
    roaming = {d.publishes_to for d in w.devices.values()
               if d.tenant == RESIDENT_TENANT and d.publishes_to != HOME}
    assert roaming == {"us", "ap"}, "resident devices roam to both other regions"
    return w


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(workload: Workload, urls: dict[str, str] | None = None) -> Cluster:
        cluster = Cluster(workload, "local-first", tmp_path / f"cluster-{len(made)}",
                          urls=urls)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(HOST, PORT) as p:
        yield p


def proxied(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


def wait_until(load: Load, seconds: float) -> None:
    Cluster.wait_for(lambda: load.elapsed() >= seconds, seconds + 5, f"{seconds} s of load")


def check(cluster: Cluster, load: Load, *, replays_allowed: bool = False) -> LakeAudit:
    """Everything acknowledged in exactly one lake, in an allowed region."""
    load.join(SPEC.seconds + 60)
    acked = load.acked_keys()
    cluster.wait_processed(acked, timeout=60)
    audit = audit_lakes(cluster.workload, cluster.lakes(), acked)
    assert audit.violations == 0, audit.violation_examples
    assert audit.missing_acked == 0, f"{audit.missing_acked} acknowledged messages lost"
    if replays_allowed:  # kill -9: a record in the lake whose retirement was not yet logged
        assert audit.duplicates == audit.duplicate_ids, "a message processed twice as two"
    else:
        assert audit.duplicates == 0, "a message processed twice"
    assert len(acked) >= 0.9 * cluster.workload.total
    return audit


def seqs_in_lake_order(cluster: Cluster, region: str, devices: set[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for record in cluster.gateways[region].lake():
        if record.device in devices:
            out[record.device].append(record.seq)
    return out


def test_a_region_killed_and_restarted_loses_nothing_acknowledged(
        clusters: Callable[..., Cluster], workload: Workload) -> None:
    cluster = clusters(workload)
    eu = cluster.gateways[HOME]
    load = Load(workload, cluster).start()
    wait_until(load, 2.5)
    killed_at = load.elapsed()
    eu.kill()  # SIGKILL: its acknowledged messages are only in its write-ahead log
    detected = cluster.wait_for(lambda: cluster.sees("us", HOME, False)
                                and cluster.sees("ap", HOME, False), 10, "eu seen down")
    assert detected < 5.0
    # Meanwhile the resident tenant's roaming data may go nowhere: spooled, never elsewhere.
    cluster.wait_for(lambda: sum(m.spooled for m in cluster.metrics().values()) > 0, 10,
                     "the resident tenant's forwards spooled")
    wait_until(load, killed_at + 3.0)
    spooled = sum(m.spooled for m in cluster.metrics().values())
    restarted_at = load.elapsed()
    eu.start()
    eu.wait_listening()
    cluster.wait_all_up(20)
    recovered = cluster.wait_for(lambda: all(m.spooled == 0 for m in
                                             cluster.metrics().values()), 30, "spools drained")
    recovery = load.elapsed() - restarted_at
    audit = check(cluster, load, replays_allowed=True)
    replayed = re.findall(r"replaying (\d+) unretired", eu.log_tail(1_000_000))
    print(f"\nkill -9 of {HOME} at {killed_at:.1f} s: seen down by the others in "
          f"{detected:.2f} s; {spooled:.0f} messages spooled; restarted after "
          f"{restarted_at - killed_at:.1f} s; every region up and spools drained "
          f"{recovery:.2f} s after the restart ({recovered:.2f} s after all up); "
          f"{load.acked:,} acknowledged, {load.lost_in_flight} in flight at the kill never "
          f"acknowledged; its write-ahead log replayed {', '.join(replayed) or 0} messages at the "
          f"restart; {audit.distinct:,} processed, {audit.duplicate_ids} copies by id")


def test_a_cut_link_spools_remote_work_and_drains_it_in_order_after_the_heal(
        clusters: Callable[..., Cluster], workload: Workload, proxy: TcpProxy) -> None:
    cut_region = "us"
    cluster = clusters(workload, urls={cut_region: proxied(proxy)})
    us = cluster.gateways[cut_region]
    load = Load(workload, cluster).start()
    wait_until(load, 2.0)
    cut_at = load.elapsed()
    proxy.cut()
    down = cluster.wait_for(lambda: cluster.sees(cut_region, HOME, False), 10,
                            "us seeing eu down")
    cluster.wait_for(lambda: us.metrics().spooled > 0, 10, "us spooling eu's work")
    processed_before = sum(us.metrics().processed.values())
    wait_until(load, cut_at + 3.5)
    spooled = us.metrics().spooled
    local = sum(us.metrics().processed.values()) - processed_before
    assert local > 0, "local processing went on during the cut"
    healed_at = load.elapsed()
    proxy.restore()
    recovery = cluster.wait_for(lambda: cluster.sees(cut_region, HOME, True)
                                and us.metrics().spooled == 0, 30, "us's spool drained")
    check(cluster, load)
    # In order: each resident device roaming to us, as processed in eu.
    roamers = {d.name for d in workload.devices.values()
               if d.tenant == RESIDENT_TENANT and d.publishes_to == cut_region}
    for device, seqs in seqs_in_lake_order(cluster, HOME, roamers).items():
        assert seqs == sorted(seqs), f"{device} out of order in {HOME}'s lake"
    print(f"\nlink of {cut_region} cut at {cut_at:.1f} s: eu seen down in {down:.2f} s; "
          f"{spooled:.0f} messages spooled, {local:.0f} processed locally meanwhile; healed "
          f"after {healed_at - cut_at:.1f} s; spool drained in order {recovery:.2f} s after "
          f"the heal")


def test_a_partitioned_gateway_serves_its_own_devices_and_the_others_see_it_down(
        clusters: Callable[..., Cluster], workload: Workload, proxy: TcpProxy) -> None:
    isolated = "ap"
    cluster = clusters(workload, urls={isolated: proxied(proxy)})
    ap = cluster.gateways[isolated]
    others = [r for r in SPEC.regions if r != isolated]
    load = Load(workload, cluster).start()
    wait_until(load, 2.0)
    started = load.elapsed()
    proxy.half_open()  # a silent link: nothing closes, nothing arrives
    seen_down = sees_alone = 0.0

    def down_both_ways() -> bool:
        nonlocal seen_down, sees_alone
        now = load.elapsed() - started
        if not seen_down and all(cluster.sees(o, isolated, False) for o in others):
            seen_down = now
        if not sees_alone and all(cluster.sees(isolated, o, False) for o in others):
            sees_alone = now
        return bool(seen_down and sees_alone)

    cluster.wait_for(down_both_ways, 20, "the partition seen from both sides")
    assert seen_down < 5.0, "the others see a partitioned gateway down within seconds"
    before = sum(ap.metrics().processed.values())
    window_began = load.elapsed()
    wait_until(load, started + 5.0)
    during = sum(ap.metrics().processed.values()) - before
    rate = during / (load.elapsed() - window_began)
    sent_here = [m for c in workload.connections[isolated] for m in c]
    own = sum(1 for m in sent_here if isolated in workload.allowed(
        workload.devices[m.device].tenant, workload.devices[m.device].device_class))
    own_rate = own / SPEC.seconds  # what may stay here; the rest must wait for its region
    assert rate > 0.7 * own_rate, (f"ap processed {rate:.0f} msg/s of the {own_rate:.0f} it "
                                   f"may keep while partitioned")
    healed_at = load.elapsed()
    proxy.restore()
    recovery = cluster.wait_for(lambda: all(cluster.sees(o, isolated, True) for o in others)
                                and all(cluster.sees(isolated, o, True) for o in others)
                                and ap.metrics().spooled == 0, 30, "the partition healed")
    check(cluster, load)
    print(f"\n{isolated} partitioned at {started:.1f} s: the others saw it down in "
          f"{seen_down:.2f} s, it saw them down in {sees_alone:.2f} s; meanwhile it processed "
          f"{rate:.0f} msg/s locally (its devices send {own_rate:.0f} msg/s that may stay "
          f"there, {(len(sent_here) - own) / SPEC.seconds:.0f} that may not); healed after "
          f"{healed_at - started:.1f} s, all up and its spool drained {recovery:.2f} s after "
          f"the heal")
