"""A pipeline stage for the fleet tests: it stamps each message with the node that processed
it and when (``time.monotonic_ns()``: the gateways of a test share one machine, so stamps of
two gateways compare), and can be slow, so that a gateway saturates."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import msgspec

from gateway.envelope import Envelope


class StampOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    node: str
    seconds_per_batch: float = 0.0


class StampStage:
    Options: ClassVar[type[msgspec.Struct]] = StampOptions

    def __init__(self, options: StampOptions, context: Any) -> None:
        self.node = options.node
        self.pause = options.seconds_per_batch

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        if self.pause:
            time.sleep(self.pause)
        for env in batch:
            if type(env.data) is dict:
                env.data["node"] = self.node
                env.data["processed_ns"] = time.monotonic_ns()
        return batch
