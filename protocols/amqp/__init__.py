"""AMQP (RabbitMQ): ingest from queues, processed results and alerts out to exchanges.

Modules, as for MQTT: ``wire`` (sans-I/O AMQP 0-9-1 client: bytes in, events and
deliveries out; frames by pamqp, the per-message frames by ``struct``), ``client`` (the thin
asyncio adapter: one ``Protocol`` per connection, heartbeats, awaitable method calls),
``mapping`` (sans-I/O: what a message means to the gateway, routing keys), ``config`` (the
``[amqp]`` section), ``consumer`` (queues → ``MQTTIngest.submit``, acked after the durable
append), ``publisher`` (ordered publishing with confirms over a link that reconnects),
``sink`` (the ``amqp`` sink type), ``service`` (``start_amqp``, ``with_amqp``).

Why not aio-pika on the hot path: it reaches the wire through aiormq, which moves every frame
through an ``asyncio.Queue`` and runs a task per delivery (aio-pika adds a second one), and
awaits each ack; measured here that is ~65 µs of CPU per message before the gateway does any
work. The adapter takes a read's deliveries as one list and acknowledges a group commit's
worth with one frame (~17 µs per message, all in). aio-pika stays the peer the tests and the
benchmark use.

This package imports nothing at import time, so that ``gateway.config`` and
``gateway.sinks`` may import ``protocols.amqp.config`` and ``protocols.amqp.sink``.
"""
