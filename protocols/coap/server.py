"""CoAP device ingest and commands, on aiocoap (UDP).

Theory of operation
-------------------
One aiocoap server context serves one root resource, ``_Resources``, whose
``render_to_pipe`` is the single dispatch point for every request:

1. Route: the path is ``/<telemetry_resource>/<device>`` (POST, PUT) or
   ``/<commands_resource>/<device>`` (GET, Observe); anything else is 4.04, another method
   4.05, a device name that cannot be a topic level 4.00.
2. Key: a device listed in ``[coap.psk]`` sends its key as the URI query ``k=<key>``
   (missing or wrong: 4.01); with ``require_psk`` an unlisted device gets 4.03. The key
   travels in clear over UDP: it keeps strangers' devices out, not eavesdroppers (DTLS-PSK
   needs aiocoap's experimental tinydtls server and the DTLSSocket package, OSCORE needs
   cryptography and more; neither is installed).
3. Size: a request (or a block-wise upload, by its Size1 or by where its next block
   ends) past ``max_payload`` gets 4.13 with Size1 before anything is kept.
These three run on every block of a block-wise upload, so a refused one costs nothing.

Readings: blocks are put together by aiocoap's ``Block1Spool``, the payload turned into
JSON by ``protocols.coap.payload`` (4.00 if it cannot be), and the request joins the
current batch: one ``MQTTIngest.submit`` takes the readings of ``BATCH_WINDOW_S`` (aiocoap
reads one datagram per loop turn, so a loop turn holds one), which costs one
classification pass, one write-ahead-log append and one dispatcher wake-up per batch, as a
read of many PUBLISH packets does. No future or task waits per request: the batch's
outcome puts each answer into its request's pipe. A confirmable (CON) request is a QoS 1
message: it is answered 2.04 Changed once ``done(True)`` says the batch is durable; a
commit that failed is 5.00 (the device sends it again). A non-confirmable (NON) request is
a QoS 0 message: 2.04 as soon as the batch is taken. When the gateway refuses work
(draining, the log refusing, the backlog past ``dispatch.max_queued``) every request of
the batch gets 5.03 with Max-Age ``overload_max_age_s``, and nothing of it was taken.

Commands: GET answers the retained message of the device's commands topic (2.05), or
4.04 when there is none. An Observe registration is answered at once (2.05, empty when
nothing is retained yet, so the observation holds) and notified of every message later
published to that topic (an empty one, which clears a retained command, as an empty
2.05): one ``Broker.watch`` per observed device, stopped with its last observer. The
content format announced is the MQTT 5 content type's when it names a known one, else
JSON when the payload is JSON, else application/octet-stream.

Refusals go through one table (``REFUSALS``: reason → response code, log level), are
counted in ``iotgw_protocol_errors_total{protocol="coap",reason}`` and logged with the
source address (at most one line per reason a second, with the count of the others).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import socket
import time
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

import aiocoap  # type: ignore[import-untyped]
import aiocoap.error  # type: ignore[import-untyped]
from aiocoap import interfaces
from aiocoap.blockwise import (  # type: ignore[import-untyped]
    ContinueException,
    IncompleteException,
)
from aiocoap.numbers.codes import Code  # type: ignore[import-untyped]
from aiocoap.numbers.types import Type  # type: ignore[import-untyped]

from gateway.config import split_host_port
from gateway.errors import GatewayError
from gateway.ingest import Inbound
from protocols.coap.config import DEVICE_NAME, DEVICE_PLACEHOLDER, CoapSection
from protocols.coap.payload import PayloadError, content_format_of, to_json

if TYPE_CHECKING:
    from gateway.broker import Broker, Message
    from gateway.metrics import Metrics

log = logging.getLogger("iotgw.coap")

PROTOCOL = "coap"
LOG_EVERY_S = 1.0
BATCH_WINDOW_S = 0.001
"""How long a reading waits for others to be handed to ingest with it."""
MAX_BATCH = 512
CLOSE_WAIT_S = 2.0
"""Longest ``close`` waits for the answers in hand and the observations' last notification."""
KEY_QUERY = "k="
Request = Any
"""An ``aiocoap.Message`` (aiocoap has no type annotations)."""

REFUSALS: dict[str, tuple[Code, int]] = {
    # reason: response code, log level (WARNING: the peer did wrong; INFO: we say "later")
    "unknown_resource": (Code.NOT_FOUND, logging.WARNING),
    "method_not_allowed": (Code.METHOD_NOT_ALLOWED, logging.WARNING),
    "bad_device": (Code.BAD_REQUEST, logging.WARNING),
    "bad_payload": (Code.BAD_REQUEST, logging.WARNING),
    "too_large": (Code.REQUEST_ENTITY_TOO_LARGE, logging.WARNING),
    "block_incomplete": (Code.REQUEST_ENTITY_INCOMPLETE, logging.WARNING),
    "missing_key": (Code.UNAUTHORIZED, logging.WARNING),
    "bad_key": (Code.UNAUTHORIZED, logging.WARNING),
    "unknown_device": (Code.FORBIDDEN, logging.WARNING),
    "overload": (Code.SERVICE_UNAVAILABLE, logging.INFO),
    "commit_failed": (Code.INTERNAL_SERVER_ERROR, logging.ERROR),
}


class CoapListenError(GatewayError):
    """The CoAP endpoint cannot be bound; the message names the address and what to do."""


class Submitter(Protocol):
    """What the CoAP server needs from ingest (``gateway.ingest.MQTTIngest``)."""

    def submit(self, protocol: str, items: list[Inbound],
               done: Callable[[bool], None] | None = None) -> bool: ...


class _Outcome(IntEnum):
    TAKEN = 0  # durable (CON) or taken (NON)
    REFUSED = 1  # submit said "not now": nothing of the batch was taken
    FAILED = 2  # the commit failed: nothing of the batch was taken


class _Batcher:
    """Readings of a ``BATCH_WINDOW_S`` → one ``submit``; each is answered by its callback.

    aiocoap reads one datagram per loop turn, so a batch per loop turn would be a batch
    of one; a window shorter than the write-ahead log's group commit costs a CON request
    little latency and saves a classification pass, an append and a dispatcher wake-up per
    request. No future or task waits per request: the outcome calls its ``answer``."""

    def __init__(self, ingest: Submitter) -> None:
        self.ingest = ingest
        self._items: list[Inbound] = []
        self._answers: list[Callable[[_Outcome], None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, item: Inbound, answer: Callable[[_Outcome], None]) -> None:
        items = self._items
        if not items:
            self._timer = asyncio.get_running_loop().call_later(BATCH_WINDOW_S, self.flush)
        items.append(item)
        self._answers.append(answer)
        if len(items) >= MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, answers = self._items, self._answers
        if not items:
            return
        self._items, self._answers = [], []
        durable = [answer for item, answer in zip(items, answers, strict=True) if item.qos]
        at_once = [answer for item, answer in zip(items, answers, strict=True) if not item.qos]

        def done(ok: bool) -> None:  # the durable ones are on disk (or not)
            _tell(durable, _Outcome.TAKEN if ok else _Outcome.FAILED)

        try:
            taken = self.ingest.submit(PROTOCOL, items, done)
        except Exception:
            log.exception("CoAP: ingest failed on a batch of %d requests", len(items))
            _tell(answers, _Outcome.FAILED)
            return
        if taken:
            _tell(at_once, _Outcome.TAKEN)  # NON: taken is enough
        else:
            _tell(answers, _Outcome.REFUSED)


def _tell(answers: list[Callable[[_Outcome], None]], outcome: _Outcome) -> None:
    for answer in answers:
        try:
            answer(outcome)
        except Exception:  # one answer that cannot be sent must not cost the others theirs
            log.exception("CoAP: answering a request failed")
    answers.clear()  # each is answered once


class _ErrorLog:
    """One line per reason a second at most; the others are counted into the next line."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def log(self, level: int, reason: str, peer: str, text: str) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        if now < self._next.get(reason, 0.0):
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        self._next[reason] = now + LOG_EVERY_S
        more = self._quiet.pop(reason, 0)
        log.log(level, "coap client %s: %s (%s)%s", peer, text, reason,
                f"; {more} more like it in the last second" if more else "")


class _Topic:
    """A topic template with its ``{device}`` filled in by concatenation."""

    def __init__(self, template: str) -> None:
        self.prefix, _, self.suffix = template.partition(DEVICE_PLACEHOLDER)

    def __call__(self, device: str) -> str:
        return self.prefix + device + self.suffix


class _Resources(interfaces.ObservableResource):  # type: ignore[misc]
    """The root resource: every request goes through ``render_to_pipe``."""

    def __init__(self, section: CoapSection, ingest: Submitter, broker: Broker,
                 metrics: Metrics) -> None:
        super().__init__()  # the Block1Spool and Block2Cache
        self.broker = broker
        self.metrics = metrics
        self.batcher = _Batcher(ingest)
        self._errors = _ErrorLog()
        self._counters: dict[str, Any] = {}
        # commands topic → (stop the broker watch, its observations)
        self.watches: dict[str, tuple[Callable[[], None], set[Any]]] = {}
        self.observations = 0
        self.unanswered = 0
        """Readings handed to the batch whose answer is not decided yet."""
        self.configure(section)

    def configure(self, section: CoapSection) -> None:
        self.section = section
        self._telemetry = section.telemetry_path
        self._commands = section.commands_path
        self._telemetry_topic = _Topic(section.telemetry_topic)
        self._commands_topic = _Topic(section.commands_topic)
        self._keys = {device: key.encode() for device, key in section.psk.items()}

    # -- the dispatch point ---------------------------------------------------------------
    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        options = request.opt
        path = options.uri_path
        route = self._route(path)
        refusal = self._check(request, path, route)
        if refusal is not None:
            pipe.add_response(refusal, is_last=True)
            return
        assert route is not None
        if request.code == Code.GET:
            await interfaces.ObservableResource._render_to_pipe(self, pipe)
            return
        limit = self.section.max_payload
        block1 = options.block1
        if block1 is None:
            if len(request.payload) > limit:
                pipe.add_response(self._too_large(request, len(request.payload)),
                                  is_last=True)
                return
        else:
            end = block1.start + len(request.payload)
            size1 = options.size1
            if end > limit or (size1 is not None and size1 > limit):
                pipe.add_response(self._too_large(request, max(end, size1 or 0)),
                                  is_last=True)
                return
            try:
                request = self._block1.feed_and_take(request)
            except ContinueException as more:  # 2.31: send the next block
                pipe.add_response(more.to_message(), is_last=True)
                return
            except IncompleteException:
                pipe.add_response(self._refuse(request, "block_incomplete",
                                               "a block that continues no upload"),
                                  is_last=True)
                return
        self._take(pipe, request, route[1], block1)

    def _route(self, path: tuple[str, ...]) -> tuple[bool, str] | None:
        """(is_telemetry, device), or None when the path names no resource of ours."""
        if len(path) == len(self._telemetry) + 1 and path[:-1] == self._telemetry:
            return True, path[-1]
        if len(path) == len(self._commands) + 1 and path[:-1] == self._commands:
            return False, path[-1]
        return None

    def _check(self, request: Request, path: tuple[str, ...],
               route: tuple[bool, str] | None) -> Any:
        """A refusal for the resource, the method or the key, else None."""
        if route is None:
            return self._refuse(request, "unknown_resource", f"no resource /{'/'.join(path)}")
        telemetry, device = route
        code = request.code
        if (code not in (Code.POST, Code.PUT)) if telemetry else code != Code.GET:
            return self._refuse(request, "method_not_allowed", f"{code} on /{'/'.join(path)}")
        if DEVICE_NAME.match(device) is None:
            return self._refuse(request, "bad_device", f"{device!r} is not a device name")
        key = self._keys.get(device)
        if key is not None:
            given = _query_key(request)
            if given is None:
                return self._refuse(request, "missing_key", f"no key for device {device!r}")
            if not hmac.compare_digest(given, key):
                return self._refuse(request, "bad_key", f"wrong key for device {device!r}")
        elif self.section.require_psk:
            return self._refuse(request, "unknown_device", f"device {device!r} has no key")
        return None

    def _too_large(self, request: Request, size: int) -> Any:
        limit = self.section.max_payload
        return self._refuse(request, "too_large", f"{size} bytes, more than {limit}",
                            size1=limit)

    def _refuse(self, request: Request, reason: str, text: str, **options: Any) -> Any:
        code, level = REFUSALS[reason]
        counter = self._counters.get(reason)
        if counter is None:
            counter = self._counters[reason] = self.metrics.protocol_errors.labels(
                PROTOCOL, reason)
        counter.inc()
        self._errors.log(level, reason, _peer(request), text)
        return aiocoap.Message(code=code, payload=text.encode()[:256], **options)

    # -- aiocoap's Resource interface ----------------------------------------------------------
    async def needs_blockwise_assembly(self, request: Request) -> bool:
        return True

    async def render(self, request: Request) -> Any:
        """GET of a command resource (aiocoap calls it; readings go to ``_take``)."""
        route = self._route(request.opt.uri_path)
        assert route is not None and not route[0]  # checked by render_to_pipe
        return self._command(request, route[1])

    async def add_observation(self, request: Request, observation: Any) -> None:
        if self.observations >= self.section.max_observations:
            # served as a plain GET (aiocoap calls the callback of even a refused one)
            observation.accept(_nothing)
            observation.deregister()
            return
        route = self._route(request.opt.uri_path)
        assert route is not None and not route[0]
        topic = self._commands_topic(route[1])
        watch = self.watches.get(topic)
        if watch is None:
            stop = self.broker.watch(topic, self._notify)
            watch = self.watches[topic] = (stop, set())
        observers = watch[1]
        observers.add(observation)
        self.observations += 1

        def cancelled() -> None:
            observers.discard(observation)
            self.observations -= 1
            if not observers and self.watches.get(topic) is watch:
                del self.watches[topic]
                watch[0]()

        observation.accept(cancelled)

    # -- readings -------------------------------------------------------------------------
    def _take(self, pipe: Any, request: Request, device: str, block1: Any) -> None:
        """Hand a reading to the batch; its answer goes into ``pipe`` once decided."""
        content_format = request.opt.content_format
        try:
            payload = to_json(request.payload,
                              None if content_format is None else int(content_format),
                              time.time())
        except PayloadError as err:
            pipe.add_response(self._refuse(request, "bad_payload", str(err)), is_last=True)
            return
        qos = 0 if request.mtype == Type.NON else 1
        self.unanswered += 1
        self.batcher.add(Inbound(device, self._telemetry_topic(device), payload, qos),
                         functools.partial(self._answer, pipe, request, block1))

    def _answer(self, pipe: Any, request: Request, block1: Any, outcome: _Outcome) -> None:
        self.unanswered -= 1
        if outcome is _Outcome.TAKEN:
            response = aiocoap.Message(code=Code.CHANGED)
        elif outcome is _Outcome.REFUSED:
            response = self._refuse(request, "overload", "the gateway takes no work now",
                                    max_age=self.section.overload_max_age_s)
            if request.mtype == Type.CON:  # a reading it would have acknowledged
                self.metrics.messages_refused.labels(PROTOCOL, "overload").inc()
        else:
            response = self._refuse(request, "commit_failed", "not stored; send it again")
        if block1 is not None:  # the last block's, as aiocoap's own resources answer
            response.opt.block1 = block1
        pipe.add_response(response, is_last=True)

    # -- commands -------------------------------------------------------------------------
    def _command(self, request: Request, device: str) -> Any:
        message = self.broker.retained.get(self._commands_topic(device))
        if message is not None and (message.expires_at is None
                                    or message.expires_at > time.time()):
            return _content(message)
        if request.opt.observe == 0:  # an observation waits for the first command
            return aiocoap.Message(code=Code.CONTENT)
        # Not an error: no command was published for this device yet (not counted).
        return aiocoap.Message(code=Code.NOT_FOUND, payload=b"no command yet")

    def _notify(self, message: Message) -> None:
        watch = self.watches.get(message.topic)
        if watch is not None:
            for observation in list(watch[1]):
                observation.trigger(_content(message))

    def end_observations(self) -> None:
        """Tell every observer the resource goes away (5.03 ends an observation)."""
        for _, observers in list(self.watches.values()):
            for observation in list(observers):
                observation.trigger(aiocoap.Message(
                    code=Code.SERVICE_UNAVAILABLE, max_age=self.section.overload_max_age_s))


def _nothing() -> None:
    pass


def _content(message: Message) -> Any:
    content_type = message.properties.get("content_type")
    return aiocoap.Message(code=Code.CONTENT, payload=message.payload,
                           content_format=content_format_of(
                               message.payload,
                               content_type if isinstance(content_type, str) else None))


def _query_key(request: Request) -> bytes | None:
    for query in request.opt.uri_query:
        if query.startswith(KEY_QUERY):
            return str(query[len(KEY_QUERY):]).encode()
    return None


def _peer(request: Request) -> str:
    try:
        return str(request.remote.hostinfo)
    except Exception:  # an address aiocoap cannot print
        return repr(request.remote)


class CoapServer:
    """A running CoAP endpoint (``start_coap``): its bound address, a reload, ``close``."""

    def __init__(self, context: Any, resources: _Resources, address: tuple[str, int]) -> None:
        self._context = context
        self._resources = resources
        self.address = address
        """(host, port) actually bound (port 0 resolved)."""

    @property
    def observations(self) -> int:
        """Observations of command resources held now."""
        return self._resources.observations

    def reconfigure(self, section: CoapSection) -> None:
        """A reloaded ``[coap]``: keys, resources, topics and limits apply to the next
        request (``listen`` and ``enabled`` need a restart; observations made before keep
        their topic until they end)."""
        self._resources.configure(section)

    async def close(self) -> None:
        """Answer the readings in hand (those taken once durable: call it before the
        write-ahead log closes), end the observations, stop the watches, unbind."""
        resources = self._resources
        resources.batcher.flush()
        resources.end_observations()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_S
        while (resources.observations or resources.unanswered) and loop.time() < deadline:
            await asyncio.sleep(0.005)  # last answers and notifications go out
        if resources.unanswered:
            log.warning("CoAP endpoint closed with %d readings unanswered (their devices "
                        "send them again)", resources.unanswered)
        for stop, _ in list(resources.watches.values()):
            stop()
        resources.watches.clear()
        await self._context.shutdown()
        log.debug("CoAP endpoint on %s closed", _hostport(self.address))


async def start_coap(section: CoapSection, ingest: Submitter, broker: Broker,
                     metrics: Metrics, listen: str | None = None) -> CoapServer:
    """Bind the CoAP UDP endpoint on ``listen`` (default: ``section.listen``; port 0: any
    free port) and serve it on the running loop. Raises ``CoapListenError`` when it cannot
    be bound (address in use, unknown host)."""
    where = listen or section.listen
    try:
        host, port = split_host_port(where)
    except ValueError as err:
        raise CoapListenError(f"cannot listen for CoAP on {where!r}: {err}") from None
    await _probe(where, host, port)
    resources = _Resources(section, ingest, broker, metrics)
    try:
        # udp6 is aiocoap's full UDP transport (dual-stack; SO_REUSEPORT, as the MQTT
        # listener, so that a new daemon can bind beside the old one during an upgrade).
        context = await aiocoap.Context.create_server_context(
            resources, bind=(host, port), transports=["udp6"], loggername="iotgw.coap.aiocoap")
    except OSError as err:
        raise CoapListenError(_listen_message(where, _why(err))) from None
    except aiocoap.error.ResolutionError as err:
        raise CoapListenError(_listen_message(where, str(err))) from None
    try:
        address = _bound_address(context)
    except Exception:
        await context.shutdown()
        raise
    log.info("CoAP on udp %s", _hostport(address))
    return CoapServer(context, resources, address)


async def _probe(where: str, host: str, port: int) -> None:
    """Bind as aiocoap is about to, and let go: a clear error before aiocoap tries (which
    leaks its socket when the bind fails)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise CoapListenError(_listen_message(where, f"unknown host ({err})")) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            probe.bind(address)
        except OSError as err:
            raise CoapListenError(_listen_message(where, _why(err))) from None


def _why(err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return "address already in use (is another CoAP server running there?)"
    return err.strerror or str(err)


def _listen_message(where: str, why: str) -> str:
    return (f"cannot listen for CoAP on {where}: {why}; choose another address with "
            "--coap-listen HOST:PORT (port 0 = any free port)")


def _bound_address(context: Any) -> tuple[str, int]:
    """The UDP socket's address (aiocoap does not expose it: walk to the transport)."""
    for interface in context.request_interfaces:
        transport = getattr(getattr(getattr(interface, "token_interface", None),
                                    "message_interface", None), "transport", None)
        if transport is not None:
            host, port = transport.get_extra_info("socket").getsockname()[:2]
            return str(host).removeprefix("::ffff:"), int(port)
    raise CoapListenError("aiocoap bound no UDP socket (is the udp6 transport available?)")


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
