"""Routing benchmark of the subscription trie: `uv run python -m protocols.mqtt._trie_bench`.

Subscribes 1,000 / 10,000 / 100,000 filters of IoT shapes (per tenant of 100 filters: 97
``tenants/t{i}/devices/d{j}/cmd``, ``tenants/t{i}/+/status``,
``tenants/t{i}/devices/+/telemetry/#``, ``tenants/t{i}/devices/d0/#``; plus ``alerts/#``,
``alerts/+/critical``, ``$SYS/#`` and a ``#`` monitor) and prints the topics matched per
second by `SubscriptionTrie.match` and, measured in the same run, by the peer: scanning the
list of compiled regexes (`compile_topic_filter`) as a broker without a trie does, and the
ratio. The published topics are a fixed mix of commands, telemetry, status, alerts and
topics nobody but the monitor wants. Both sides must find the same subscriptions. Single
core, no I/O; about 6 s in all, most of it compiling the peer's 100,000 regexes.
"""

import argparse
import random
import re
import time
from collections.abc import Callable

from .topics import compile_topic_filter
from .trie import SubscriptionTrie

SIZES = (1_000, 10_000, 100_000)
PER_TENANT = 100
GLOBAL_FILTERS = ("alerts/#", "alerts/+/critical", "$SYS/#", "#")


def filters_for(count: int) -> list[str]:
    filters = list(GLOBAL_FILTERS)
    tenant = 0
    while len(filters) < count:
        filters += (f"tenants/t{tenant}/+/status", f"tenants/t{tenant}/devices/+/telemetry/#",
                    f"tenants/t{tenant}/devices/d0/#")
        filters += (f"tenants/t{tenant}/devices/d{device}/cmd"
                    for device in range(PER_TENANT - 3))
        tenant += 1
    return filters[:count]


def topics_for(count: int, how_many: int = 1_000) -> list[str]:
    tenants = max(1, count // PER_TENANT)
    draw = random.Random(count).randrange
    shapes = (
        "tenants/t{t}/devices/d{d}/cmd",
        "tenants/t{t}/devices/d{d}/telemetry/temp",
        "tenants/t{t}/devices/d{d}/telemetry/env/humidity",
        "tenants/t{t}/gw{d}/status",
        "tenants/t{t}/devices/d{d}/ack",  # only "#" wants it
        "alerts/t{t}/critical",
        "$SYS/broker/clients/connected",
    )
    weights = (30, 30, 10, 10, 15, 3, 2)
    pool = [shape for shape, weight in zip(shapes, weights, strict=True) for _ in range(weight)]
    return [pool[draw(len(pool))].format(t=draw(tenants), d=draw(PER_TENANT))
            for _ in range(how_many)]


def rate(match_one: Callable[[str], object], topics: list[str], seconds: float) -> float:
    """Topics matched per second, cycling through `topics` for about `seconds`; the clock
    is read once per batch of about 10 ms, so that reading it costs nothing measurable."""
    clock = time.perf_counter
    started = clock()
    match_one(topics[0])
    batch = max(1, min(len(topics), int(0.01 / max(clock() - started, 1e-9))))
    done = 0
    position = 0
    started = clock()
    while True:
        for topic in topics[position : position + batch]:
            match_one(topic)
        done += len(topics[position : position + batch])
        position = position + batch if position + batch < len(topics) else 0
        elapsed = clock() - started
        if elapsed >= seconds:
            return done / elapsed


Compiled = list[tuple[str, int, re.Pattern[str]]]


def compile_all(filters: list[str]) -> Compiled:
    """The peer's subscriptions: (client, qos, regex) in a list, as a broker without a trie
    keeps them."""
    return [(f"client-{index}", index % 3, compile_topic_filter(topic_filter))
            for index, topic_filter in enumerate(filters)]


def bench(
    filters: list[str], compiled: Compiled, seconds: float, repeats: int
) -> tuple[float, float, float]:
    """(trie build seconds, trie matches/s, regex scan matches/s), rates the best of
    `repeats` runs of `seconds` each."""
    topics = topics_for(len(filters))
    started = time.perf_counter()
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for index, topic_filter in enumerate(filters):
        trie.add(topic_filter, f"client-{index}", index % 3)
    build = time.perf_counter() - started

    def scan(topic: str) -> list[tuple[str, int, str]]:
        return [(key, qos, pattern.pattern) for key, qos, pattern in compiled
                if pattern.match(topic)]

    for topic in topics[:10]:  # both sides find the same subscriptions
        assert len(trie.match(topic)) == len(scan(topic)), topic
    return (
        build,
        max(rate(trie.match, topics, seconds) for _ in range(repeats)),
        max(rate(scan, topics, seconds) for _ in range(repeats)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.1, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of N")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    arguments = parser.parse_args()
    # Every size's filters are a prefix of the largest one's: compile the regexes once.
    all_filters = filters_for(max(arguments.sizes))
    started = time.perf_counter()
    all_compiled = compile_all(all_filters)
    print(f"{len(all_filters):,} regexes compiled in {time.perf_counter() - started:.1f} s")
    header = ("filters", "trie match/s", "regex scan/s", "ratio", "trie build s")
    print(f"{header[0]:>9}{header[1]:>15}{header[2]:>15}{header[3]:>10}{header[4]:>14}")
    for count in arguments.sizes:
        build, trie_rate, scan_rate = bench(
            all_filters[:count], all_compiled[:count], arguments.seconds, arguments.repeats
        )
        print(f"{count:>9,}{trie_rate:>15,.0f}{scan_rate:>15,.0f}"
              f"{trie_rate / scan_rate:>9,.0f}x{build:>14.2f}")


if __name__ == "__main__":
    main()
