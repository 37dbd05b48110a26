"""The consumer's bookkeeping without a broker: deliveries in, batches to ``submit``, and
acks/nacks (all ``multiple=True``) out in tag order, coalesced."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.ingest import Inbound
from protocols.amqp.config import AmqpSection
from protocols.amqp.consumer import AmqpConsumer, _Session
from protocols.amqp.link import AmqpMetrics
from protocols.amqp.wire import Delivery, Properties

TIERS = ["critical", "premium", "standard", "bulk"]


class FakeLink:
    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []

    def ack(self, channel: int, delivery_tag: int) -> None:
        assert channel == 1
        self.frames.append(("ack", delivery_tag))

    def nack(self, channel: int, delivery_tag: int) -> None:
        assert channel == 1
        self.frames.append(("nack", delivery_tag))


class FakeIngest:
    def __init__(self) -> None:
        self.accepting = True
        self.calls: list[tuple[list[Inbound], Callable[[bool], None]]] = []

    def submit(self, protocol: str, items: list[Inbound],
               done: Callable[[bool], None] | None = None) -> bool:
        assert protocol == "amqp" and done is not None
        if not self.accepting:
            return False
        self.calls.append((items, done))
        return True

    def finish(self, index: int, durable: bool = True) -> None:
        self.calls[index][1](durable)


def delivery(tag: int, *, message_id: str | None = None, redelivered: bool = False,
             headers: dict[str, Any] | None = None, priority: int | None = None,
             exchange: str = "", key: str = "q") -> Delivery:
    return Delivery(1, "tag-q", tag, redelivered, exchange, key,
                    Properties(headers=headers, priority=priority, message_id=message_id),
                    b'{"n": %d}' % tag)


class Rig:
    def __init__(self, **settings: Any) -> None:
        registry = CollectorRegistry()
        self.ingest = FakeIngest()
        self.link = FakeLink()
        section = AmqpSection(url="amqp://h/", refused_delay_s=0.05, **settings)
        self.consumer = AmqpConsumer(
            section, self.ingest, AmqpMetrics(registry),
            Counter("refused", "refused", registry=registry), prefetch=100, tiers=TIERS)
        self.session = _Session(self.consumer, self.link, {"tag-q": "q"})

    async def deliver(self, *messages: Delivery) -> None:
        """Deliveries of one read, then the loop turns that settle them."""
        self.session.take(list(messages))
        await settle()


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_deliveries_of_one_turn_are_submitted_together_at_qos_1() -> None:
    rig = Rig()
    await rig.deliver(delivery(1, headers={"device": "d1"}),
                      delivery(2, exchange="ex", key="medical.p-2.vitals"))
    assert len(rig.ingest.calls) == 1
    items, _ = rig.ingest.calls[0]
    assert [(i.device, i.topic, i.qos) for i in items] == [
        ("d1", "amqp/q/d1", 1), ("p-2", "medical/p-2/vitals", 1)]
    assert items[0].payload == b'{"n": 1}'
    assert rig.link.frames == []  # nothing is durable yet
    rig.ingest.finish(0)
    await settle()
    assert rig.link.frames == [("ack", 2)]
    assert rig.consumer.acked == 2


async def test_settlements_go_out_in_tag_order_and_coalesce() -> None:
    rig = Rig()
    await rig.deliver(delivery(1), delivery(2))
    await rig.deliver(delivery(3))
    await rig.deliver(delivery(4), delivery(5), delivery(6))
    rig.ingest.finish(2)  # the last batch first: nothing may be acked yet
    await settle()
    assert rig.link.frames == []
    rig.ingest.finish(0)
    await settle()
    assert rig.link.frames == [("ack", 2)]
    rig.ingest.finish(1)  # frees the run 3..6 at once: one frame
    await settle()
    assert rig.link.frames == [("ack", 2), ("ack", 6)]


async def test_a_failed_commit_is_nacked_with_requeue_between_acks() -> None:
    rig = Rig()
    await rig.deliver(delivery(1))
    await rig.deliver(delivery(2), delivery(3))
    await rig.deliver(delivery(4))
    rig.ingest.finish(1, durable=False)
    rig.ingest.finish(2)
    rig.ingest.finish(0)
    await settle()
    assert rig.link.frames == [("ack", 1), ("nack", 3), ("ack", 4)]


async def test_refused_work_waits_then_is_nacked_and_later_batches_keep_their_place() -> None:
    rig = Rig()
    rig.ingest.accepting = False
    await rig.deliver(delivery(1), delivery(2))
    rig.ingest.accepting = True
    await rig.deliver(delivery(3))  # would be taken, but must not overtake 1 and 2
    assert rig.ingest.calls == []
    assert rig.link.frames == []  # not at once: no busy loop on redeliveries
    await asyncio.sleep(0.08)
    await settle()
    assert rig.link.frames == [("nack", 3)]
    assert rig.consumer.refused == 3
    assert rig.consumer.refused_delay_s == pytest.approx(0.1)  # refusals go on: wait longer
    await rig.deliver(delivery(4))  # after the requeue, work is taken again
    assert len(rig.ingest.calls) == 1
    assert rig.consumer.refused_delay_s == pytest.approx(0.05)


async def test_the_refusal_delay_doubles_up_to_its_limit() -> None:
    rig = Rig(refused_max_delay_s=0.15)
    rig.ingest.accepting = False
    for _ in range(3):
        await rig.deliver(delivery(len(rig.link.frames) + 1))
        await asyncio.sleep(rig.consumer.refused_delay_s + 0.03)
        await settle()
    assert rig.consumer.refused_delay_s == pytest.approx(0.15)
    assert [kind for kind, _ in rig.link.frames] == ["nack"] * 3


async def test_redeliveries_of_durable_messages_are_acked_without_being_taken() -> None:
    rig = Rig()
    await rig.deliver(delivery(1, message_id="a"), delivery(2, message_id="b"))
    rig.ingest.finish(0)
    await settle()
    # The link went away before the ack arrived: RabbitMQ delivers them again.
    await rig.deliver(delivery(3, message_id="a", redelivered=True),
                      delivery(4, message_id="c", redelivered=True),
                      delivery(5, message_id="b", redelivered=True))
    assert len(rig.ingest.calls) == 2
    assert [i.payload for i in rig.ingest.calls[1][0]] == [b'{"n": 4}']
    assert rig.consumer.duplicates == 2
    rig.ingest.finish(1)
    await settle()
    assert rig.link.frames == [("ack", 2), ("ack", 5)]


async def test_a_batch_of_duplicates_only_is_acked_at_once() -> None:
    rig = Rig()
    rig.consumer.remember(["x"])
    await rig.deliver(delivery(1, message_id="x", redelivered=True))
    assert rig.ingest.calls == []
    assert rig.link.frames == [("ack", 1)]


async def test_a_first_delivery_is_taken_even_if_its_id_was_seen() -> None:
    rig = Rig()
    rig.consumer.remember(["x"])
    await rig.deliver(delivery(1, message_id="x"))  # not redelivered: a new message
    assert len(rig.ingest.calls) == 1


async def test_the_dedupe_window_keeps_the_latest_ids() -> None:
    rig = Rig(dedupe_window=3)
    rig.consumer.remember(["a", "b"])
    rig.consumer.remember(["c", "d", "e"])
    assert list(rig.consumer.recent) == ["c", "d", "e"]
    off = Rig(dedupe_window=0)
    await off.deliver(delivery(1, message_id="a"))
    off.ingest.finish(0)
    assert not off.consumer.recent


async def test_after_the_link_is_gone_outcomes_are_ignored_but_durable_ids_remembered() -> None:
    rig = Rig()
    await rig.deliver(delivery(1, message_id="a"))
    rig.session.abandon()
    rig.ingest.finish(0)
    await settle()
    assert rig.link.frames == []
    assert "a" in rig.consumer.recent


async def test_big_turns_are_split_into_batches_of_max_batch() -> None:
    rig = Rig(max_batch=2)
    await rig.deliver(*(delivery(t) for t in range(1, 6)))
    assert [len(items) for items, _ in rig.ingest.calls] == [2, 2, 1]
    for i in range(3):
        rig.ingest.finish(i)
    await settle()
    assert rig.link.frames == [("ack", 5)]


@pytest.mark.parametrize("in_time", [True, False])
async def test_finishing_acks_what_becomes_durable_in_time(in_time: bool) -> None:
    rig = Rig()
    await rig.deliver(delivery(1), delivery(2))
    rig.ingest.accepting = False
    await rig.deliver(delivery(3))  # parked
    if in_time:
        asyncio.get_running_loop().call_later(0.02, rig.ingest.finish, 0)
    await rig.session.finish(timeout=0.1)
    expected = [("ack", 2), ("nack", 3)] if in_time else []
    assert rig.link.frames == expected
    await rig.deliver(delivery(4))  # no longer taking
    assert len(rig.ingest.calls) == 1
