"""The AMQP side of a running gateway: ``start_amqp`` → ``AmqpHandle`` → ``close()``.

``start_amqp`` returns at once: the consumer and the alert publisher connect in the
background and keep reconnecting, so a gateway starts (and keeps serving MQTT) while RabbitMQ
is away. ``with_amqp`` is what ``serve --amqp-url URL`` runs with: ``[amqp] url`` set and,
unless the config routes to an ``amqp`` sink itself, processed results routed to one (named
``amqp``) publishing to ``[amqp.processed]``.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from gateway.config import Config, Sink
from gateway.errors import ConfigError
from gateway.ingest import MQTTIngest
from gateway.metrics import Metrics
from protocols.amqp.config import AmqpSection, check_tiers, check_url
from protocols.amqp.consumer import AmqpConsumer
from protocols.amqp.errors import AmqpError
from protocols.amqp.mapping import render_key, template_fields
from protocols.amqp.publisher import ConfirmedPublisher, LinkSettings, Outgoing
from protocols.amqp.wire import encode_properties

log = logging.getLogger("iotgw.amqp")

SINK_NAME = "amqp"
_ALERT_PROPERTIES = encode_properties(content_type="application/json", delivery_mode=2)
MAX_PREFETCH = 65535


def prefetch_for(section: AmqpSection, batch_size: int, slots: int) -> int:
    """``section.prefetch``, or what the gateway takes in one drain: batch size × slots."""
    if section.prefetch is not None:
        return section.prefetch
    return max(1, min(MAX_PREFETCH, batch_size * slots))


def link_settings(section: AmqpSection) -> LinkSettings:
    return LinkSettings(section.heartbeat_s, section.connect_timeout_s,
                        section.reconnect_initial_s, section.reconnect_max_s)


class AlertPublisher:
    """Alerts (the JSON the Alerter publishes over MQTT) to ``[amqp.alerts]``, best effort:
    confirmed, published again after a lost link, at most ``max_buffered`` held."""

    def __init__(self, section: AmqpSection, metrics: Metrics, name: str) -> None:
        assert section.url is not None and section.alerts.exchange is not None
        self._template = section.alerts.routing_key
        self._fields = template_fields(self._template)
        self._decode = msgspec.json.Decoder(dict[str, Any]).decode
        self._timeout = section.confirm_timeout_s
        self.publisher = ConfirmedPublisher(
            "alerts", section.url, section.alerts.exchange, metrics.amqp,
            exchange_type=section.alerts.type, declare=section.declare,
            settings=link_settings(section), window=100, max_buffered=section.max_buffered,
            name=name)

    def publish(self, topic: str, payload: bytes) -> None:
        try:
            alert = self._decode(payload)
        except msgspec.DecodeError:
            alert = {}
        if "severity" not in alert:  # alerts/<severity>/<device>
            parts = topic.split("/", 2)
            if len(parts) == 3:
                alert.setdefault("severity", parts[1])
                alert.setdefault("device", parts[2])
        key = render_key(self._template,
                         {f: str(alert.get(f) or "none") for f in self._fields})
        self.publisher.put([Outgoing(key, payload, _ALERT_PROPERTIES, keep=False)])

    async def close(self) -> None:
        await self.publisher.close(self._timeout)


class AmqpHandle:
    """What ``start_amqp`` started; ``close()`` stops it (consumer first, then alerts)."""

    def __init__(self, consumer: AmqpConsumer | None, alerts: AlertPublisher | None) -> None:
        self.consumer = consumer
        self.alerts = alerts

    def publish_alert(self, topic: str, payload: bytes) -> None:
        """For ``Alerter``'s publish callback: never raises (logs at ERROR instead)."""
        if self.alerts is None:
            return
        try:
            self.alerts.publish(topic, payload)
        except Exception as err:
            log.error("alert %s not queued for AMQP: %r", topic, err)

    async def stop_consuming(self) -> None:
        """Stop taking deliveries (a drain): in-flight appends are still acked."""
        if self.consumer is not None:
            await self.consumer.close()

    async def close(self) -> None:
        await self.stop_consuming()
        if self.alerts is not None:
            try:
                await self.alerts.close()
            except AmqpError as err:
                log.warning("%s", err)


async def start_amqp(section: AmqpSection, ingest: MQTTIngest, metrics: Metrics, *,
                     name: str = "iot-gateway") -> AmqpHandle:
    """Consume ``section.queues`` into ``ingest`` and publish alerts (see the module doc).
    Raises ConfigError when AMQP is off (no url) or ``priority_tiers`` names unknown tiers."""
    if section.url is None:
        raise ConfigError("amqp.url: not set (AMQP is off)")
    dispatcher = ingest.dispatcher
    tiers = [lane.name for lane in dispatcher.routine_lanes]
    try:
        check_tiers(section, tiers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    gauges = metrics.amqp
    consumer = AmqpConsumer(
        section, ingest, gauges, metrics.messages_refused.labels("amqp", "overload"),
        prefetch=prefetch_for(section, dispatcher.batch_size, dispatcher.slots), tiers=tiers,
        name=name)
    consumer.start()
    alerts = AlertPublisher(section, metrics, name) if section.alerts.exchange else None
    return AmqpHandle(consumer, alerts)


def with_amqp(config: Config, url: str | None = None, *,
              section: AmqpSection | None = None) -> Config:
    """The config a gateway runs with ``--amqp-url url``: see the module doc. The sink gets
    the section's url, exchange, routing key and link settings; every route stage's
    non-empty sink lists get ``amqp`` added. Amqp sinks without a url get the section's.
    ``section``: instead of ``config.amqp``."""
    if section is None:
        section = getattr(config, "amqp", None) or AmqpSection()
    if url is not None:
        try:
            check_url(url)
        except ValueError as err:
            raise ConfigError(f"--amqp-url: {err}") from None
        section = msgspec.structs.replace(section, url=url)
        config = msgspec.structs.replace(config, amqp=section)
    if section.url is None:
        return config
    sinks = {}
    for name, sink in config.sinks.items():
        if sink.type == "amqp" and sink.options.get("url") is None:
            sink = Sink(type=sink.type, options={**sink.options, "url": section.url})
        sinks[name] = sink
    pipelines = config.pipelines
    processed = section.processed
    if processed.exchange is not None and not any(s.type == "amqp" for s in sinks.values()):
        if SINK_NAME in sinks:
            raise ConfigError(f"sinks.{SINK_NAME}: the name is taken; --amqp-url routes "
                              f"processed results to a sink of that name")
        sinks[SINK_NAME] = Sink(type="amqp", options={
            "url": section.url, "exchange": processed.exchange,
            "exchange_type": processed.type, "routing_key": processed.routing_key,
            "declare": section.declare, "confirm_timeout_s": section.confirm_timeout_s,
            "max_buffered": section.max_buffered, "heartbeat_s": section.heartbeat_s,
            "connect_timeout_s": section.connect_timeout_s,
            "reconnect_initial_s": section.reconnect_initial_s,
            "reconnect_max_s": section.reconnect_max_s})
        pipelines = [msgspec.structs.replace(p, stages=[_route_also(stage) for stage in p.stages])
                     for p in config.pipelines]
    return msgspec.structs.replace(config, sinks=sinks, pipelines=pipelines)


def _route_also(stage: dict[str, Any]) -> dict[str, Any]:
    if stage.get("type") != "route":
        return stage

    def plus(names: Any) -> Any:
        if isinstance(names, list) and names and SINK_NAME not in names:
            return [*names, SINK_NAME]
        return names

    stage = {**stage, "sinks": plus(stage.get("sinks", ["lake"]))}
    rules = stage.get("rules")
    if isinstance(rules, list):
        stage["rules"] = [{**rule, "sinks": plus(rule.get("sinks"))}
                          if isinstance(rule, dict) else rule for rule in rules]
    return stage

