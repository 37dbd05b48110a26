"""Pipeline stages (and a sink) that fail on purpose, for the tests of ``gateway.workers``.

A module of its own so that the isolated-stage pool's worker processes can import the
classes by name (they run with the parent's ``sys.path``). Tests register them in
``gateway.pipeline.STAGES`` / ``gateway.sinks.SINKS`` (see ``test_workers.py``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from gateway.envelope import Envelope
from gateway.metrics import Metrics

CALLS: dict[str, list[float]] = {}
"""Message id → ``time.monotonic()`` of each ``process`` call that saw it (in this process)."""


class _Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def _flagged(env: Envelope, field: str) -> bool:
    return type(env.data) is dict and bool(env.data.get(field))


class PoisonOptions(_Options):
    field: str = "poison"
    undecoded: bool = False
    """Also raise on a message whose payload was not JSON (``data`` is None)."""


class PoisonStage:
    """Raises on any batch holding a message whose data has a true ``field``."""

    Options: ClassVar[type[msgspec.Struct]] = PoisonOptions

    def __init__(self, options: PoisonOptions, context: Any) -> None:
        self.field = options.field
        self.undecoded = options.undecoded

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        for env in batch:
            if _flagged(env, self.field) or (self.undecoded and env.data is None):
                CALLS.setdefault(env.id, []).append(time.monotonic())
                raise ValueError(f"poison message {env.id}")
        return batch


class FlakyOptions(_Options):
    failures: int = 2
    field: str = "flaky"


class FlakyStage:
    """Raises the first ``failures`` times it sees a message whose data has a true ``field``."""

    Options: ClassVar[type[msgspec.Struct]] = FlakyOptions

    def __init__(self, options: FlakyOptions, context: Any) -> None:
        self.failures = options.failures
        self.field = options.field
        self.seen: dict[str, int] = {}

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        for env in batch:
            if _flagged(env, self.field):
                self.seen[env.id] = self.seen.get(env.id, 0) + 1
                if self.seen[env.id] <= self.failures:
                    raise RuntimeError(f"flaky failure {self.seen[env.id]} on {env.id}")
        return batch


class SleepyOptions(_Options):
    seconds: float = 30.0
    field: str = "slow"
    """Sleep on a batch with a message whose data has this field true, or as many seconds
    as it says if it is a number."""
    log: str = ""
    """Append "<tag> <id>" for each message it processed to this file (counts runs)."""
    tag: str = ""


class SleepyStage:
    """Sleeps ``seconds`` on a batch holding a message whose data has a true ``field``; stamps
    every dict payload with the pid of the process it ran in."""

    Options: ClassVar[type[msgspec.Struct]] = SleepyOptions

    def __init__(self, options: SleepyOptions, context: Any) -> None:
        self.seconds = options.seconds
        self.field = options.field
        self.log = options.log
        self.tag = options.tag

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        for env in batch:
            if _flagged(env, self.field):
                value = env.data[self.field]
                time.sleep(self.seconds if value is True else value)
                break
        for env in batch:
            if type(env.data) is dict:
                env.data["pid"] = os.getpid()
        if self.log:
            with open(self.log, "a") as file:
                file.writelines(f"{self.tag} {env.id}\n" for env in batch)
        return batch


class KillOnceOptions(_Options):
    marker: str


class KillOnceStage:
    """The first time (over all processes: ``marker`` is a file) it kills its own process
    with SIGKILL; afterwards it stamps every dict payload with its pid."""

    Options: ClassVar[type[msgspec.Struct]] = KillOnceOptions

    def __init__(self, options: KillOnceOptions, context: Any) -> None:
        self.marker = Path(options.marker)

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        for env in batch:
            if type(env.data) is dict:
                env.data["pid"] = os.getpid()
        return batch


class SplitOptions(_Options):
    keep: bool = True


class SplitStage:
    """Adds a derived envelope ``<id>-copy`` after each message (a stage's additions);
    ``keep = false`` passes on the copies only."""

    Options: ClassVar[type[msgspec.Struct]] = SplitOptions

    def __init__(self, options: SplitOptions, context: Any) -> None:
        self.keep = options.keep

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        out: list[Envelope] = []
        for env in batch:
            if self.keep:
                out.append(env)
            out.append(msgspec.structs.replace(env, id=f"{env.id}-copy", ack=None,
                                               data=msgspec.json.decode(env.payload)))
        return out


class BrokenWindowOptions(_Options):
    pass


class BrokenWindowStage:
    """A time-based stage whose windows cannot be closed."""

    Options: ClassVar[type[msgspec.Struct]] = BrokenWindowOptions

    def __init__(self, options: BrokenWindowOptions, context: Any) -> None:
        pass

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        return batch

    def flush(self, now: float) -> list[Envelope]:
        raise OSError("window store unavailable")


class FlakySinkOptions(_Options):
    failures: int = 1


class FlakySink:
    """A sink whose first ``failures`` writes raise; it keeps the ids of what it took."""

    Options: ClassVar[type[msgspec.Struct]] = FlakySinkOptions

    def __init__(self, name: str, options: FlakySinkOptions, metrics: Metrics) -> None:
        self.failures = options.failures
        self.ids: list[str] = []

    def write(self, batch: list[Envelope]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("sink peer went away")
        self.ids.extend(env.id for env in batch)

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


STAGES = {"poison": PoisonStage, "flaky": FlakyStage, "sleepy": SleepyStage,
          "kill_once": KillOnceStage, "split": SplitStage, "broken_window": BrokenWindowStage}
SINKS = {"flaky_sink": FlakySink}
