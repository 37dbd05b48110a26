"""Processing workers: the normal path, retries with backoff, dead letters, isolated stages
in a process pool (timeouts, killed processes), and capacity towards the dispatcher.

Real pipelines built from config, the real JSON-lines sink in ``tmp_path``, real worker
processes; the failing stages live in ``failing_stages`` so that those processes can import
them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import math
import os
import pickle
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import failing_stages
import msgspec
import pytest
from failing_stages import CALLS

import gateway.workers
from gateway.config import Config, parse_config
from gateway.dispatch import Dispatcher, Lane
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import STAGES, Pipeline, StageContext, build_pipelines
from gateway.registry import DeviceInfo, DeviceRegistry
from gateway.sinks import SINKS, Sink, build_sinks
from gateway.workers import Workers

TIER = "standard"


def config_text(tmp_path: Path, stages: str, *, attempts: int = 3, initial: float = 10,
                maximum: float = 1000, timeout: float = 5.0, slots: int = 2,
                batch_size: int = 16, dead: Path | None = None, extra: str = "",
                tiers: str | None = f'["{TIER}"]') -> str:
    dead_dir = dead if dead is not None else tmp_path / "dead"
    served = f"tiers = {tiers}" if tiers is not None else ""
    return f"""
[[tiers]]
name = "{TIER}"
max_latency_ms = 1000

[[tiers]]
name = "bulk"
max_latency_ms = 60000

[dispatch]
batch_size = {batch_size}
slots = {slots}

[retry]
attempts = {attempts}
backoff_initial_ms = {initial}
backoff_max_ms = {maximum}
stage_timeout_s = {timeout}
dead_letter_dir = {json.dumps(str(dead_dir))}

[sinks.lake]
type = "jsonl"
[sinks.lake.options]
dir = {json.dumps(str(tmp_path / "lake"))}

[[pipelines]]
name = "main"
{served}
stages = {stages}
{extra}
"""


class Rig:
    """A config's pipelines and sinks, served by ``Workers``; what finished, what was audited."""

    def __init__(self, tmp_path: Path, config: Config,
                 registry: DeviceRegistry | None = None) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.metrics = Metrics()
        self.registry = registry or DeviceRegistry.empty()
        self.pipelines = self.build(config)
        self.sinks: dict[str, Sink] = build_sinks(config, self.metrics)
        self.finished: list[str] = []
        self.audits: list[tuple[str, dict[str, Any]]] = []
        self.workers = Workers(self.pipelines, self.metrics, config.retry,
                               on_finished=lambda envs: self.finished.extend(e.id for e in envs),
                               audit=lambda event, **fields: self.audits.append((event, fields)))
        self.lane = Lane(0, TIER, 0.0)

    def build(self, config: Config) -> dict[str, Pipeline]:
        context = StageContext(config=config, registry=self.registry, metrics=self.metrics,
                               schemas=config.schemas)
        return build_pipelines(config, context)

    def run(self, batch: list[Envelope]) -> None:
        self.workers.process(self.lane, batch)

    async def settle(self, timeout: float = 30.0) -> None:
        assert await self.workers.drain(timeout), f"still pending: {self.workers.pending}"

    async def lake(self) -> dict[str, dict[str, Any]]:
        for sink in self.sinks.values():
            await sink.flush()
        records: dict[str, dict[str, Any]] = {}
        for path in sorted((self.tmp_path / "lake").rglob("*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                assert record["id"] not in records, f"{record['id']} delivered twice"
                records[record["id"]] = record
        return records

    def dead_letters(self, directory: Path | None = None) -> list[dict[str, Any]]:
        found = sorted((directory or self.tmp_path / "dead").glob("dead-letter-*.jsonl"))
        assert len(found) <= 1
        return [json.loads(line) for path in found for line in path.read_text().splitlines()]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


_sequence = iter(range(1, 1_000_000))


def message(tier: str = TIER, **data: Any) -> Envelope:
    n = next(_sequence)
    body = {"x": n, **data}
    return Envelope(id=f"m{n}", device=f"dev-{n % 3}", tenant="acme", tier=tier, region="eu",
                    topic=f"sensors/dev-{n % 3}", payload=json.dumps(body).encode(),
                    received_ns=time.monotonic_ns(), received_at=time.time(), qos=1)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, stage in failing_stages.STAGES.items():
        monkeypatch.setitem(STAGES, name, stage)  # type: ignore[arg-type]
    for name, sink in failing_stages.SINKS.items():
        monkeypatch.setitem(SINKS, name, sink)  # type: ignore[arg-type]
    CALLS.clear()


@pytest.fixture
async def rig(tmp_path: Path, plugins: None) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(stages: str, registry: DeviceRegistry | None = None, **options: Any) -> Rig:
        made.append(Rig(tmp_path, parse_config(config_text(tmp_path, stages, **options)),
                        registry))
        return made[-1]

    yield make
    for built in made:
        built.workers.close()
        for sink in built.sinks.values():
            await sink.close()
    await asyncio.sleep(0)  # let cancelled work unwind inside the loop


DECODE_PLUS_ONE = '{type = "decode"}, {type = "transform", scale = {x = {offset = 1000.0}}}'


# ----------------------------------------------------------------------------------------
# the normal path


async def test_a_batch_goes_through_and_is_finished_once(rig: Callable[..., Rig]) -> None:
    r = rig(f'[{DECODE_PLUS_ONE}, {{type = "route", sinks = ["lake"]}}]')
    batch = [message() for _ in range(5)]
    r.run(batch)
    assert r.finished == [e.id for e in batch]
    assert r.workers.pending == 0 and not r.workers.busy
    lake = await r.lake()
    assert {i: rec["payload"]["x"] for i, rec in lake.items()} == {
        e.id: json.loads(e.payload)["x"] + 1000 for e in batch}
    assert r.workers.processed == 5
    assert r.metric("iotgw_messages_processed_total", tier=TIER) == 5
    assert r.metrics.processing_latency.count(TIER) == 5
    assert r.metric("iotgw_stage_failures_total", stage="transform", reason="error") == 0


async def test_a_tier_no_pipeline_serves_is_finished_and_logged(
        rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    r = rig('[{type = "route", sinks = ["lake"]}]')
    bulk = [message(tier="bulk"), message(tier="bulk")]
    with caplog.at_level(logging.ERROR, "iotgw.workers"):
        r.workers.process(Lane(1, "bulk", 0.0), bulk)
        r.workers.process(Lane(1, "bulk", 0.0), [message(tier="bulk")])
    assert len(r.finished) == 3
    assert [rec.message for rec in caplog.records] == [
        "no pipeline serves tier bulk: its messages are finished unprocessed"]


# ----------------------------------------------------------------------------------------
# retries and dead letters (stages in the event loop)


async def test_a_poison_message_is_retried_with_backoff_then_dead_lettered(
        rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    r = rig(f'[{DECODE_PLUS_ONE}, {{type = "poison"}}, {{type = "route", sinks = ["lake"]}}]',
            attempts=4, initial=40, maximum=1000)
    batch = [message() for _ in range(3)] + [message(poison=True)] + [message() for _ in range(4)]
    poison = batch[3]
    with caplog.at_level(logging.ERROR, "iotgw.workers"):
        r.run(batch)
        assert r.finished == [] and r.workers.pending == len(batch)
        await r.settle()

    # the good part of the batch completed, transformed exactly once
    lake = await r.lake()
    good = [e for e in batch if e is not poison]
    assert sorted(lake) == sorted(e.id for e in good)
    for env in good:
        assert lake[env.id]["payload"]["x"] == json.loads(env.payload)["x"] + 1000
    # every envelope finished exactly once, the dead-lettered one included
    assert sorted(r.finished) == sorted(e.id for e in batch)
    assert r.workers.processed == len(good) and r.workers.failed == 1

    # the batch run, then `attempts` runs alone: at once, then after 40, 80 and 160 ms
    calls = CALLS[poison.id]
    assert len(calls) == 1 + 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] < 0.030, gaps
    for gap, expected in zip(gaps[1:], (0.040, 0.080, 0.160), strict=True):
        assert expected * 0.9 <= gap < expected + 1.0, gaps
    assert gaps[0] < gaps[1] < gaps[2] < gaps[3]

    [letter] = r.dead_letters()
    assert letter["id"] == poison.id and letter["stage"] == "poison"
    assert letter["error"] == {"type": "ValueError", "message": f"poison message {poison.id}"}
    assert letter["attempts"] == 4
    assert letter["payload"] == json.loads(poison.payload)  # as received, for a replay
    assert letter["payload_encoding"] == "json"
    assert (letter["device"], letter["tenant"], letter["tier"], letter["topic"],
            letter["qos"]) == (poison.device, "acme", TIER, poison.topic, 1)
    assert letter["received_at"].endswith("Z")

    assert r.metric("iotgw_dead_letters_total", stage="poison") == 1
    # each good message once, the poison one `attempts` times
    assert r.metric("iotgw_stage_retries_total", stage="poison") == len(good) + 4
    assert r.metric("iotgw_stage_failures_total", stage="poison", reason="error") == 1 + 4
    assert r.audits == [("dead_letter", {"id": poison.id, "stage": "poison", "attempts": 4,
                                         "error": f"ValueError: poison message {poison.id}"})]
    [logged] = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert poison.id in logged.getMessage() and "poison" in logged.getMessage()
    assert r.workers.pending == 0


async def test_a_stage_that_fails_twice_then_succeeds_keeps_the_progress(
        rig: Callable[..., Rig]) -> None:
    r = rig(f'[{DECODE_PLUS_ONE}, {{type = "flaky", failures = 2}}, '
            '{type = "route", sinks = ["lake"]}]', attempts=3, initial=5)
    batch = [message(), message(flaky=True), message()]
    r.run(batch)
    await r.settle()
    lake = await r.lake()
    assert sorted(lake) == sorted(e.id for e in batch)
    for env in batch:  # the stage before the failing one ran once
        assert lake[env.id]["payload"]["x"] == json.loads(env.payload)["x"] + 1000
    assert sorted(r.finished) == sorted(e.id for e in batch)
    assert r.dead_letters() == [] and r.workers.failed == 0
    # the batch failed (everyone retried once), then the flaky message failed once more
    assert r.metric("iotgw_stage_retries_total", stage="flaky") == 4
    assert r.metric("iotgw_stage_failures_total", stage="flaky", reason="error") == 2
    assert r.metric("iotgw_dead_letters_total", stage="flaky") == 0
    assert r.workers.processed == 3


async def test_a_failing_sink_write_is_retried_as_the_deliver_step(
        rig: Callable[..., Rig]) -> None:
    r = rig('[{type = "decode"}, {type = "route", sinks = ["lake", "flaky"]}]',
            extra='[sinks.flaky]\ntype = "flaky_sink"\n')
    batch = [message(), message()]
    r.run(batch)
    await r.settle()
    flaky = r.sinks["flaky"]
    assert isinstance(flaky, failing_stages.FlakySink)
    assert sorted(flaky.ids) == sorted(e.id for e in batch)
    assert r.metric("iotgw_stage_failures_total", stage="deliver", reason="error") == 1
    assert r.metric("iotgw_stage_retries_total", stage="deliver") == 2
    assert sorted(r.finished) == sorted(e.id for e in batch)


async def test_additions_of_a_stage_are_retried_but_never_finished(
        rig: Callable[..., Rig]) -> None:
    r = rig('[{type = "decode"}, {type = "split"}, {type = "poison", field = "bad"}, '
            '{type = "route", sinks = ["lake"]}]', attempts=2, initial=5)
    batch = [message(), message(bad=True)]
    r.run(batch)
    await r.settle()
    # the copy of the bad message carries its data: it fails too, and is dead-lettered
    assert sorted(rec["id"] for rec in r.dead_letters()) == sorted(
        [batch[1].id, f"{batch[1].id}-copy"])
    assert sorted(await r.lake()) == sorted([batch[0].id, f"{batch[0].id}-copy"])
    assert sorted(r.finished) == sorted(e.id for e in batch)  # never the copies
    assert r.workers.failed == 2


async def test_messages_an_earlier_stage_consumed_are_finished_when_a_later_one_fails(
        rig: Callable[..., Rig]) -> None:
    # The aggregate keeps no raw message (passthrough = false): a window closed by a later
    # message is emitted, then the poison stage fails on that aggregate only.
    r = rig('[{type = "decode"}, {type = "aggregate", fields = ["x"], window_s = 1.0, '
            'passthrough = false}, {type = "poison", field = "messages"}, '
            '{type = "route", sinks = ["lake"]}]', attempts=1)
    first, second = message(), message()
    first.device = second.device = "dev-a"
    second.received_at = first.received_at + 5.0
    r.run([first, second])
    assert r.finished == [first.id, second.id]  # consumed: finished, nothing to retry
    await r.settle()
    [letter] = r.dead_letters()
    assert letter["id"].startswith("dev-a-agg-") and letter["stage"] == "poison"
    assert letter["attempts"] == 1 and r.finished == [first.id, second.id]


async def test_a_failed_dead_letter_write_keeps_the_message_pending_until_it_succeeds(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    r = rig('[{type = "decode"}, {type = "poison"}, {type = "route", sinks = ["lake"]}]',
            attempts=1, maximum=20, dead=blocker / "dead")
    poison = message(poison=True)
    r.run([poison, message()])
    await asyncio.sleep(0.05)
    assert poison.id not in r.finished and r.workers.pending == 1
    assert r.metric("iotgw_dead_letters_total", stage="poison") == 0
    blocker.unlink()
    await r.settle()
    assert [rec["id"] for rec in r.dead_letters(blocker / "dead")] == [poison.id]
    assert poison.id in r.finished and r.workers.failed == 1


async def test_drain_times_out_and_close_leaves_pending_work_unfinished(
        rig: Callable[..., Rig]) -> None:
    r = rig('[{type = "decode"}, {type = "poison"}, {type = "route", sinks = ["lake"]}]',
            attempts=3, initial=10_000, maximum=10_000)
    poison = message(poison=True)
    r.run([poison])
    assert not await r.workers.drain(0.05)
    r.workers.close()
    assert r.workers.pending == 1 and r.finished == [] and r.dead_letters() == []
    assert await Workers(r.pipelines, r.metrics, r.config.retry,
                         on_finished=lambda envs: None).drain(0.0)


async def test_closing_windows_runs_what_they_emit_through_the_rest_of_the_pipeline(
        rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    r = rig('[{type = "decode"}, {type = "broken_window"}, {type = "aggregate", '
            'fields = ["x"], window_s = 60.0, passthrough = false}, '
            '{type = "route", sinks = ["lake"]}]', tiers=None)
    assert r.pipelines[TIER] is r.pipelines["bulk"]
    batch = [message(), message()]
    batch[1].device = batch[0].device
    r.run(batch)
    assert r.finished == [e.id for e in batch] and await r.lake() == {}
    with caplog.at_level(logging.ERROR, "iotgw.workers"):
        r.workers.flush_windows(math.inf)
    lake = await r.lake()
    [(key, record)] = lake.items()
    assert key.startswith(f"{batch[0].device}-agg-") and record["payload"]["messages"] == 2
    assert r.metric("iotgw_stage_failures_total", stage="broken_window", reason="error") == 1
    assert "failed to close its windows" in caplog.text


# ----------------------------------------------------------------------------------------
# isolated stages


def isolated(stage: str, timeout: float | None = None) -> str:
    limit = f", timeout_s = {timeout}" if timeout is not None else ""
    return (f'[{{type = "decode"}}, {{type = "{stage}", isolate = true{limit}, OPTIONS}}, '
            '{type = "route", sinks = ["lake"]}]')


async def test_an_isolated_stage_runs_in_a_worker_process(rig: Callable[..., Rig]) -> None:
    ack = object()  # not picklable as a handle would be: it never leaves the loop's process
    r = rig('[{type = "decode"}, {type = "sleepy", isolate = true, seconds = 0.0}, '
            '{type = "split", isolate = true}, {type = "route", sinks = ["lake"]}]')
    batch = [message(), message()]
    batch[0].ack = ack
    r.run(batch)
    assert r.finished == [] and r.workers.pending == 2 and r.workers.busy is False
    await r.settle()
    lake = await r.lake()
    assert sorted(r.finished) == sorted(e.id for e in batch)  # the copies are not finished
    assert sorted(lake) == sorted([e.id for e in batch] + [f"{e.id}-copy" for e in batch])
    pids = {rec["payload"]["pid"] for rec in lake.values() if "pid" in rec["payload"]}
    assert len(pids) == 1 and os.getpid() not in pids
    assert batch[0].ack is ack and batch[0].data["pid"] in pids  # copied back in place
    assert r.metrics.processing_latency.count(TIER) == 2


async def test_an_isolated_stage_past_its_timeout_is_retried_then_dead_lettered(
        rig: Callable[..., Rig]) -> None:
    # 2 s: a worker process restarted after a timeout must answer a fast message within it
    # even on a loaded machine (0.5 s was not always enough).
    r = rig(isolated("sleepy", timeout=2.0).replace("OPTIONS", "seconds = 30.0"),
            attempts=2, initial=10)
    slow = message(slow=True)
    batch = [message(), slow, message()]
    started = time.monotonic()
    r.run(batch)
    await r.settle()
    assert time.monotonic() - started < 20
    [letter] = r.dead_letters()
    assert letter["id"] == slow.id and letter["stage"] == "sleepy"
    assert letter["error"]["type"] == "TimeoutError" and letter["attempts"] == 2
    assert r.metric("iotgw_dead_letters_total", stage="sleepy") == 1
    # the batch, then the slow message alone twice
    assert r.metric("iotgw_stage_failures_total", stage="sleepy", reason="timeout") == 3
    assert r.metric("iotgw_isolated_pool_restarts_total", reason="timeout") == 3
    assert sorted(r.finished) == sorted(e.id for e in batch)

    # the pool works for the next batch
    after = [message(), message()]
    r.run(after)
    await r.settle()
    lake = await r.lake()
    assert sorted(lake) == sorted(e.id for e in batch + after if e is not slow)
    assert all(lake[e.id]["payload"]["pid"] != os.getpid() for e in after)


async def test_a_killed_worker_process_fails_the_batch_which_is_retried(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    marker = tmp_path / "killed-once"
    r = rig(isolated("kill_once").replace("OPTIONS", f"marker = {json.dumps(str(marker))}"),
            attempts=3, initial=10)
    batch = [message() for _ in range(3)]
    r.run(batch)
    await r.settle()
    assert marker.exists()
    lake = await r.lake()
    assert sorted(lake) == sorted(e.id for e in batch)
    assert all(rec["payload"]["pid"] != os.getpid() for rec in lake.values())
    assert r.metric("iotgw_stage_failures_total", stage="kill_once", reason="crash") == 1
    assert r.metric("iotgw_isolated_pool_restarts_total", reason="crash") == 1
    assert r.metric("iotgw_stage_retries_total", stage="kill_once") == 3
    assert r.dead_letters() == [] and sorted(r.finished) == sorted(e.id for e in batch)


async def test_an_error_raised_in_a_worker_process_is_retried(rig: Callable[..., Rig]) -> None:
    r = rig(isolated("poison").replace(", OPTIONS", ""), attempts=2, initial=5)
    poison = message(poison=True)
    r.run([message(), poison])
    await r.settle()
    [letter] = r.dead_letters()
    assert letter["id"] == poison.id
    assert letter["error"] == {"type": "ValueError", "message": f"poison message {poison.id}"}
    assert r.metric("iotgw_stage_failures_total", stage="poison", reason="error") == 1 + 2
    assert r.metric("iotgw_isolated_pool_restarts_total", reason="crash") == 0
    assert len(await r.lake()) == 1


async def test_an_isolated_stage_is_built_with_the_registry(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    stages = ('[{type = "enrich", isolate = true}, {type = "route", sinks = ["lake"]}]')
    devices = {"dev-0": DeviceInfo(tenant="acme", tier=TIER, device_class="meter",
                                   region="eu", attributes={"site": "plant-3"})}
    in_memory = rig(stages, DeviceRegistry.from_devices(devices))
    registry_file = tmp_path / "devices.csv"
    registry_file.write_text("device,tenant,tier,device_class,region,site\n"
                             "dev-0,acme,standard,meter,eu,plant-9\n")
    from_file = rig(stages, DeviceRegistry.load(registry_file))
    for r, site in ((in_memory, "plant-3"), (from_file, "plant-9")):
        env = message()
        env.device = "dev-0"
        r.run([env])
        await r.settle()
        assert env.meta == {"site": site} and env.device_class == "meter"
        r.workers.close()


async def test_reconfigure_serves_new_pipelines_with_a_new_pool(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    r = rig(isolated("sleepy").replace("OPTIONS", "seconds = 0.0"))
    r.run([message()])
    await r.settle()
    new = parse_config(config_text(
        tmp_path, '[{type = "decode"}, {type = "transform", isolate = true, '
        'scale = {x = {factor = 2.0}}}, {type = "route", sinks = ["lake"]}]'))
    r.workers.reconfigure(r.build(new), new.retry)
    assert set(r.workers.pipelines) == {TIER}
    env = message()
    r.run([env])
    await r.settle()
    assert env.data["x"] == 2 * json.loads(env.payload)["x"] and "pid" not in env.data


async def test_close_ends_isolated_work_in_flight(rig: Callable[..., Rig]) -> None:
    r = rig(isolated("sleepy").replace("OPTIONS", "seconds = 30.0"))
    r.run([message(slow=True)])
    assert not await r.workers.drain(1.0)
    r.workers.close()
    await asyncio.sleep(0.05)
    assert r.finished == [] and await r.lake() == {}


# ----------------------------------------------------------------------------------------
# capacity: the dispatcher waits while the workers are busy


async def test_the_dispatcher_waits_while_workers_are_busy_and_resumes(
        rig: Callable[..., Rig]) -> None:
    r = rig(isolated("sleepy").replace("OPTIONS", "seconds = 0.3"), slots=2, batch_size=2)
    dispatcher = Dispatcher(r.config.tiers, r.config.dispatch, r.workers.process,
                            can_process=lambda: not r.workers.busy)
    r.workers.dispatcher = dispatcher
    batch = [message(slow=True) for _ in range(10)]
    for env in batch:
        dispatcher.put(env)
    samples: list[tuple[bool, int, int]] = []
    deadline = time.monotonic() + 30
    while len(r.finished) < len(batch):
        assert time.monotonic() < deadline, samples[-5:]
        samples.append((r.workers.busy, dispatcher.queued, r.workers.pending))
        await asyncio.sleep(0.01)
    # never more than `slots` batches held, and the rest waited in the dispatcher meanwhile
    assert max(pending for _, _, pending in samples) <= 4
    assert (True, 6, 4) in samples
    assert dispatcher.queued == 0 and sorted(r.finished) == sorted(e.id for e in batch)
    assert len(await r.lake()) == len(batch)


async def test_a_blocked_dispatcher_hands_out_nothing_until_kicked() -> None:
    config = parse_config(f'[[tiers]]\nname = "{TIER}"\nmax_latency_ms = 10\n'
                          '[dispatch]\nbatch_size = 1\nslots = 4\n')
    room = [False]
    done: list[str] = []
    dispatcher = Dispatcher(config.tiers, config.dispatch,
                            lambda lane, batch: done.extend(e.id for e in batch),
                            can_process=lambda: room[0])
    dispatcher.kick()  # nothing queued: nothing scheduled
    for _ in range(3):
        dispatcher.put(message())
    for _ in range(5):
        await asyncio.sleep(0)
    assert done == [] and dispatcher.queued == 3
    room[0] = True
    dispatcher.kick()
    await asyncio.wait_for(dispatcher.wait_idle(), 5)
    assert len(done) == 3


# ----------------------------------------------------------------------------------------
# stage options that belong to the pipeline


@pytest.mark.parametrize(("stage", "error"), [
    ('{type = "transform", isolate = "yes"}', "stages[0].isolate: expected bool, got str"),
    ('{type = "transform", timeout_s = 2}',
     "stages[0].timeout_s: only an isolated stage (isolate = true) can be timed out"),
    ('{type = "transform", isolate = true, timeout_s = 0}', "stages[0].timeout_s: expected > 0"),
    ('{type = "transform", isolate = true, timeout_s = "1"}',
     "stages[0].timeout_s: expected number, got str"),
    ('{type = "aggregate", fields = ["x"], isolate = true}',
     "stages[0].isolate: stage 'aggregate' emits on time"),
])
def test_isolation_options_are_checked(tmp_path: Path, stage: str, error: str) -> None:
    config = parse_config(config_text(tmp_path, f"[{stage}]"))
    context = StageContext(config=config, registry=DeviceRegistry.empty(), metrics=Metrics(),
                           schemas={})
    with pytest.raises(ConfigError, match=re.escape(error)):
        build_pipelines(config, context)


def test_an_unpicklable_stage_cannot_be_isolated(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    class LocalStage(failing_stages.SplitStage):  # defined in a function: not importable
        pass

    monkeypatch.setitem(STAGES, "local", LocalStage)  # type: ignore[arg-type]
    config = parse_config(config_text(tmp_path, '[{type = "local", isolate = true}]'))
    context = StageContext(config=config, registry=DeviceRegistry.empty(), metrics=Metrics(),
                           schemas={})
    with pytest.raises(ConfigError,
                       match=re.escape("stages[0].isolate: stage 'local' cannot be sent")):
        build_pipelines(config, context)


def test_pipeline_knows_each_stage_type_and_isolation(tmp_path: Path, plugins: None) -> None:
    config = parse_config(config_text(
        tmp_path, '[{type = "decode"}, {type = "sleepy", isolate = true, timeout_s = 2.5}]'))
    context = StageContext(config=config, registry=DeviceRegistry.empty(), metrics=Metrics(),
                           schemas={})
    pipeline = build_pipelines(config, context)[TIER]
    assert pipeline.stage_types == ("decode", "sleepy")
    first, second = pipeline.isolation
    assert first is None and second is not None
    assert second.timeout_s == 2.5 and second.factory is failing_stages.SleepyStage
    with pytest.raises(ValueError, match="one entry per stage"):
        Pipeline("p", list(pipeline.stages), {}, Metrics(), stage_types=["decode"])
    assert gateway.workers.__all__ == ["Workers"]


# ----------------------------------------------------------------------------------------
# more of the failure path


async def test_a_dead_letter_keeps_a_raw_payload_as_base64(rig: Callable[..., Rig]) -> None:
    r = rig('[{type = "decode"}, {type = "poison", undecoded = true}, '
            '{type = "route", sinks = ["lake"]}]', attempts=1)

    def audit(event: str, **fields: Any) -> None:
        raise OSError("audit log unavailable")

    r.workers.audit = audit
    raw = message()
    raw.payload = b"\xff\x00 not json"
    raw.meta = {"handle": object()}  # a stage left something that has no JSON form
    r.run([raw])
    await r.settle()
    [letter] = r.dead_letters()
    assert letter["payload_encoding"] == "base64" and "meta" not in letter
    assert base64.b64decode(letter["payload"]) == raw.payload
    assert letter["errors"][0].startswith("meta: not JSON-encodable, dropped")
    assert r.finished == [raw.id]  # audited or not, it is finished


async def test_a_message_that_gets_further_starts_a_new_count(rig: Callable[..., Rig]) -> None:
    r = rig('[{type = "decode"}, {type = "flaky", field = "f", failures = 1}, '
            '{type = "poison", field = "f"}, {type = "route", sinks = ["lake"]}]',
            attempts=2, initial=5)
    env = message(f=True)
    r.run([env])
    await r.settle()
    [letter] = r.dead_letters()
    assert letter["stage"] == "poison" and letter["attempts"] == 2
    assert r.metric("iotgw_stage_failures_total", stage="flaky", reason="error") == 1
    assert r.metric("iotgw_stage_retries_total", stage="flaky") == 1
    assert r.metric("iotgw_stage_retries_total", stage="poison") == 1


async def test_a_retried_message_a_stage_replaces_is_finished_once(
        rig: Callable[..., Rig]) -> None:
    r = rig('[{type = "decode"}, {type = "flaky", field = "f", failures = 1}, '
            '{type = "split", keep = false}, {type = "poison", field = "bad"}, '
            '{type = "route", sinks = ["lake"]}]', attempts=2, initial=5)
    env = message(f=True, bad=True)
    r.run([env])
    await r.settle()
    assert [letter["id"] for letter in r.dead_letters()] == [f"{env.id}-copy"]
    assert r.finished == [env.id] and r.workers.pending == 0


async def test_closing_with_a_dead_letter_write_pending_leaves_it_unfinished(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    r = rig('[{type = "decode"}, {type = "poison"}]', attempts=1, maximum=20,
            dead=blocker / "dead")
    r.run([message(poison=True)])
    await asyncio.sleep(0.01)
    r.workers.close()
    blocker.unlink()
    await asyncio.sleep(0.1)
    assert r.finished == [] and r.workers.pending == 1
    assert not (blocker / "dead").exists()


async def test_a_pool_that_does_not_start_in_time_fails_the_batch(
        rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.workers, "POOL_START_TIMEOUT_S", 0.0)
    r = rig(isolated("sleepy").replace("OPTIONS", "seconds = 0.0"), attempts=1)
    env = message()
    r.run([env])
    await r.settle()
    [letter] = r.dead_letters()
    assert letter["error"]["message"] == "the worker processes did not start within 0 s"
    assert r.metric("iotgw_isolated_pool_restarts_total", reason="timeout") == 1


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two worker processes")
async def test_a_batch_caught_in_another_batchs_timeout_runs_again_at_no_cost(
        rig: Callable[..., Rig]) -> None:
    r = rig(isolated("sleepy", timeout=1.0).replace("OPTIONS", "seconds = 30.0"),
            attempts=1, slots=2)
    hung = message(slow=True)
    r.run([hung])
    await asyncio.sleep(0.5)
    bystander = message(slow=0.8)  # still running when the hung batch's timeout hits
    r.run([bystander])
    await r.settle()
    assert [letter["id"] for letter in r.dead_letters()] == [hung.id]
    assert sorted(r.finished) == sorted([hung.id, bystander.id])
    assert list(await r.lake()) == [bystander.id]
    assert r.metric("iotgw_stage_failures_total", stage="sleepy", reason="timeout") == 1
    assert r.metric("iotgw_stage_failures_total", stage="sleepy", reason="crash") == 0


async def test_the_worker_process_side_builds_each_stage_once(
        rig: Callable[..., Rig]) -> None:
    # What the pool's processes run, run here: load the recipes, build, process.
    r = rig('[{type = "decode"}, {type = "transform", isolate = true, '
            'scale = {x = {factor = 3.0}}}]')
    [key] = r.workers._recipes
    gateway.workers._child_load(list(sys.path), pickle.dumps(r.workers._recipes))
    try:
        env = message()
        env.data = {"x": 2}
        [out] = gateway.workers._child_run(key, [env])
        assert out.data == {"x": 6.0}
        stage = gateway.workers._CHILD_STAGES[key]
        gateway.workers._child_run(key, [message()])
        assert gateway.workers._CHILD_STAGES[key] is stage
        assert gateway.workers._child_ping() == os.getpid()
    finally:
        gateway.workers._CHILD_RECIPES.pop(key, None)
        gateway.workers._CHILD_STAGES.pop(key, None)


# ----------------------------------------------------------------------------------------
# preemption: a routine batch yields its slot to an anomaly at its next stage boundary


async def test_a_routine_batch_yields_to_an_anomaly_and_resumes_where_it_stopped(
        rig: Callable[..., Rig], tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    stage = ('{{type = "sleepy", isolate = true, seconds = 1.0, log = {log}, tag = "{tag}"}}')
    stages = ("[" + ", ".join([
        '{type = "decode"}',
        stage.format(log=json.dumps(str(runs)), tag="first"),
        stage.format(log=json.dumps(str(runs)), tag="second"),
        '{type = "route", sinks = ["lake"]}']) + "]")
    r = rig(stages, slots=2, batch_size=2, tiers=None)
    urgent = "anomaly-critical"
    r.workers.reconfigure({**r.pipelines, urgent: r.pipelines[TIER]}, r.config.retry)
    settings = msgspec.structs.replace(r.config.dispatch, routine_floor=0.0)
    dispatcher = Dispatcher(r.config.tiers, settings, r.workers.process,
                            can_process=lambda: not r.workers.busy,
                            anomaly_lanes=[urgent], preempt=r.workers.preempt)
    r.workers.dispatcher = dispatcher
    bulk = [message("bulk", slow=True) for _ in range(4)]  # two batches, one per slot
    for env in bulk:
        dispatcher.put(env)
    await asyncio.sleep(0.3)  # both batches are in their first (slow) stage
    anomaly = message(urgent)
    dispatcher.put(anomaly)
    deadline = time.monotonic() + 30
    while len(r.finished) < 5:
        assert time.monotonic() < deadline, r.finished
        await asyncio.sleep(0.01)
    # The anomaly did not wait for a bulk batch to finish: one yielded its slot after its
    # first stage, and the anomaly finished first.
    assert r.finished[0] == anomaly.id
    assert r.metric("iotgw_preemptions_total", tier="bulk") == 1
    # Every bulk message ran each stage exactly once: the preempted batch resumed at its
    # second stage, its first was not run again.
    lines = runs.read_text().split("\n")[:-1]
    for env in bulk:
        assert lines.count(f"first {env.id}") == 1 and lines.count(f"second {env.id}") == 1
    assert sorted(r.finished) == sorted(e.id for e in [*bulk, anomaly])
    assert set(await r.lake()) == {e.id for e in [*bulk, anomaly]}


async def test_preemption_leaves_routine_work_its_floor(rig: Callable[..., Rig]) -> None:
    r = rig(isolated("sleepy").replace("OPTIONS", "seconds = 0.5"), slots=2, batch_size=1,
            tiers=None)
    urgent = "anomaly-critical"
    r.workers.reconfigure({**r.pipelines, urgent: r.pipelines[TIER]}, r.config.retry)
    settings = msgspec.structs.replace(r.config.dispatch, routine_floor=0.5)
    dispatcher = Dispatcher(r.config.tiers, settings, r.workers.process,
                            can_process=lambda: not r.workers.busy,
                            anomaly_lanes=[urgent], preempt=r.workers.preempt)
    r.workers.dispatcher = dispatcher
    for _ in range(2):
        dispatcher.put(message("bulk", slow=True))
    await asyncio.sleep(0.1)
    for _ in range(5):
        dispatcher.put(message(urgent))
    deadline = time.monotonic() + 30
    while len(r.finished) < 7:
        assert time.monotonic() < deadline, r.finished
        await asyncio.sleep(0.01)
    # Half the two slots stay with routine work: one of the two bulk batches yields, no more.
    assert r.metric("iotgw_preemptions_total", tier="bulk") == 1
