"""CoAP device ingest (UDP, aiocoap): readings in, commands out.

* ``protocols.coap.config``: ``CoapSection``, the ``[coap]`` table (no aiocoap import, so
  that ``gateway.config`` can import it).
* ``protocols.coap.payload``: content formats (JSON, CBOR, SenML JSON/CBOR) → stored JSON;
  sans-I/O.
* ``protocols.coap.server``: ``start_coap`` → ``CoapServer``, the aiocoap resource tree.

The server module imports ``gateway.ingest``, which imports ``gateway.config``: import it
by its own name (``from protocols.coap.server import start_coap``), never from here.
"""
