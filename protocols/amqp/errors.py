"""The AMQP package's exceptions: one root, under the gateway's."""

from __future__ import annotations

from gateway.errors import GatewayError


class AmqpError(GatewayError):
    """Root of the errors the AMQP side raises on purpose."""


class AmqpUnavailable(AmqpError):
    """RabbitMQ did not confirm what was published (unreachable, or not within the confirm
    timeout): the caller keeps it (the write-ahead log does) and tries again later."""
