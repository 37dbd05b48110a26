"""The admin HTTP API (aiohttp): metrics, health, readiness, a JSON status, drain,
anomaly acknowledgement, maintenance reservations.

Errors are JSON objects ``{"error": "..."}`` with a 4xx status naming what was wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, TypeVar

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from gateway.app import Gateway


T = TypeVar("T")


class Acknowledge(msgspec.Struct, forbid_unknown_fields=True):
    device: Annotated[str, msgspec.Meta(min_length=1)]
    detector: Annotated[str, msgspec.Meta(min_length=1)]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request, kind: type[T]) -> T | web.Response:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.ValidationError as err:
        return _error(400, f"invalid request: {err}")
    except msgspec.DecodeError as err:
        return _error(400, f"the body is not JSON: {err}")


def make_app(gateway: Gateway) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(gateway.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(gateway.health())

    async def readyz(request: web.Request) -> web.Response:
        ready = gateway.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(gateway.stats())

    async def drain(request: web.Request) -> web.Response:
        gateway.request_stop("admin drain")
        return web.json_response({"draining": True, "queued": gateway.dispatcher.queued},
                                 status=202)

    async def acknowledge(request: web.Request) -> web.Response:
        ack = await _body(request, Acknowledge)
        if isinstance(ack, web.Response):
            return ack
        if not gateway.acknowledge_anomaly(ack.device, ack.detector):
            return _error(404, f"no anomaly of detector {ack.detector!r} is raised for device "
                               f"{ack.device!r}")
        return web.json_response({"acknowledged": True})

    app = web.Application()
    app.router.add_post("/v1/drain", drain)
    app.router.add_post("/v1/anomalies/ack", acknowledge)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/stats", stats)
    return app
